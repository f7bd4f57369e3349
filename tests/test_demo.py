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
    assert 0 <= summary["knn_top1_learned"] <= 100 and 0 <= summary["knn_top1_random_init"] <= 100

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("svt-ray").experiment_id)
    assert "eval/SVT_learned/knn_top1" in run.data.metrics
    assert {"evaluation.md", "training_curves.png", "config.yaml"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }

    again = run_demo(tmp_path / "demo", num_clips=40, workers=2, overrides=overrides)
    assert again["knn_top1_learned"] == summary["knn_top1_learned"]  # finished run: eval only
