"""`svt-ray demo` end to end at reduced size: videos -> shards -> Ray Train -> evaluation."""

from __future__ import annotations

import pytest
from factories import SMALL_MODEL

from svt_ray.demo import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_runs_every_stage_and_records_the_evaluation(tmp_path, ray_session, capsys):
    overrides = [
        *SMALL_MODEL,
        "optim.batch_size=8",
        "optim.epochs=2",
        "data.decode_actors=1",
        "eval.linear_epochs=10",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    summary = run_demo(tmp_path / "demo", num_clips=40, workers=2, overrides=overrides)
    printed = capsys.readouterr().out
    for row in ("SVT (learned)", "random init", "frame pixels", "slow-fast"):
        assert row in printed
    learned, start = summary["knn_top1_learned"], summary["knn_top1_random_init"]
    assert 0 <= learned <= 100 and 0 <= start <= 100
    assert summary["knn_gain_points"] == pytest.approx(learned - start)
    assert f"SVT features beat random initialisation by {learned - start:+.1f} kNN" in printed
    assert f"| SVT (learned) | {learned:.1f} |" in printed and f"| random init | {start:.1f} |" in (
        printed
    )

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("svt-ray").experiment_id)
    assert run.data.metrics["eval/SVT_learned/knn_top1"] == pytest.approx(learned)
    assert run.data.metrics["eval/random_init/knn_top1"] == pytest.approx(start)
    assert run.info.status == "FINISHED"  # the evaluation was added without reopening it
    assert {"evaluation.md", "training_curves.png", "config.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }

    again = run_demo(tmp_path / "demo", num_clips=40, workers=2, overrides=overrides)
    assert again["knn_top1_learned"] == summary["knn_top1_learned"]  # finished run: eval only


def test_the_demo_data_grows_with_more_clips_asked_for(tmp_path, ray_session, capsys):
    """A second demo with more --clips in the same folder makes and shards the extra clips
    (it trained on the first demo's shards before); fewer clips than made is said."""
    import json

    from svt_ray.config import load_config
    from svt_ray.demo import prepare_synthetic_data

    config = load_config("tiny")

    def sharded(num_clips: int) -> int:
        shards = prepare_synthetic_data(tmp_path, config, num_clips)
        return json.loads((shards / "manifest.json").read_text())["counts"]["inputs"]

    assert sharded(8) == 8
    assert sharded(12) == 12
    capsys.readouterr()
    assert sharded(10) == 12
    assert "holds 12 clips, made by an earlier run for more than the 10 asked for" in (
        capsys.readouterr().out
    )


def test_a_demo_with_more_clips_in_a_used_workdir_is_refused_before_any_work(tmp_path):
    """Its finished run would refuse the grown data (another schedule): said at once, with
    the way out, before clips are made and sharded."""
    import json

    from svt_ray.config import ConfigError

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "progress.json").write_text('{"step": 304}')
    (tmp_path / "synthetic_shards").mkdir()
    manifest = {"counts": {"inputs": 400}}
    (tmp_path / "synthetic_shards" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="holds a demo trained on 400 clips; for --clips 800"):
        run_demo(tmp_path, num_clips=800, workers=1, overrides=[])
    assert not (tmp_path / "synthetic_videos").exists()


def test_ctrl_c_while_the_demo_data_is_sharded_is_an_interruption_not_a_failure(
    tmp_path, monkeypatch
):
    """data_prep stops on Ctrl-C with exit 130 and says its shards stay: the demo (and a
    study making its data) then stops as interrupted, 130, not 'data_prep failed'."""
    import data_prep.cli
    from svt_ray import synthetic
    from svt_ray.config import load_config
    from svt_ray.demo import prepare_synthetic_data
    from svt_ray.train import RunInterruptedError

    monkeypatch.setattr(synthetic, "synth_main", lambda *args, **kwargs: 0)
    monkeypatch.setattr(data_prep.cli, "main", lambda argv: 130)
    with pytest.raises(RunInterruptedError, match="synthetic_videos was interrupted; the shards"):
        prepare_synthetic_data(tmp_path, load_config("tiny"), 40)
