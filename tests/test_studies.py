"""Ray Tune studies: sweep parsing, verdicts from data, and a smoke study end to end
(parent + child runs in MLflow, a failing trial, restore after the driver is killed, compare)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import SMALL_MODEL

from svt_ray.config import ConfigError
from svt_ray.studies import (
    METRIC,
    StudyOptions,
    StudyReport,
    StudySpec,
    Sweep,
    TrialRecord,
    asha_grace,
    batch_size_verdict,
    best_vs_worst_verdict,
    collect_study,
    curve_auc,
    run_study,
    scaling_table,
    trial_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


# -- no Ray ------------------------------------------------------------------------------------


def test_sweep_parsing_keeps_lists_whole_and_names_the_bad_flag():
    assert Sweep.parse("views.num_local=0,2,4").values == (0, 2, 4)
    assert Sweep.parse("views.global_frames=[8,8],[4,8]").values == ([8, 8], [4, 8])
    assert Sweep.parse("loss.centering=ema,sinkhorn_knopp").values == ("ema", "sinkhorn_knopp")
    with pytest.raises(ConfigError, match=r"--grid 'views\.num_local'"):
        Sweep.parse("views.num_local")
    with pytest.raises(ConfigError, match="repeats a value"):
        Sweep.parse("optim.batch_size=8,8")


def test_trial_overrides_expand_coupled_settings():
    trial = {
        "base": ["optim.epochs=2"],
        "seed": 3,
        "sweep": {"loss_terms": {"loss.cross_view_weight": 1.0, "loss.motion_weight": 0.0},
                  "views.global_frames": [4, 8]},
    }  # fmt: skip
    assert trial_overrides(trial) == [
        "optim.epochs=2",
        "loss.cross_view_weight=1.0",
        "loss.motion_weight=0.0",
        "views.global_frames=[4, 8]",
        "train.seed=3",
    ]


def test_a_trials_progress_lines_name_its_swept_values():
    from svt_ray.studies import trial_label

    coupled = {"loss.cross_view_weight": 1.0, "loss.motion_weight": 0.0}
    trial = {
        "study": "loss_terms",
        "seed": 2,
        "sweep": {"loss_terms": coupled, "views.num_local": 4},
        "labels": {"loss_terms": {json.dumps(coupled): "cross-view only"}},
    }
    assert trial_label(trial) == "loss_terms loss_terms=cross-view only views.num_local=4 seed 2"


def test_curve_auc_against_an_explicit_integral():
    curve = [(0, 10.0), (100, 30.0), (300, 50.0)]
    # Trapezoids: 100 * 20 + 200 * 40 = 10000 over 300 clips; then hold 50 to a 400 budget.
    assert curve_auc(curve, 300) == pytest.approx(10000 / 300)
    assert curve_auc(curve, 400) == pytest.approx((10000 + 100 * 50) / 400)
    assert curve_auc([], 100) is None


def _trial(sweep, seed, curve, status="FINISHED", clips_per_s=None, hours_per_point=0.01):
    wall = [(hours_per_point * i, v) for i, (_, v) in enumerate(curve)]
    return TrialRecord(
        run_id=f"r{seed}{sweep}", trial_id="t", status=status, seed=seed, sweep=sweep,
        final=curve[-1][1] if curve else None, best=max(v for _, v in curve) if curve else None,
        clips_seen=curve[-1][0] if curve else None, hours=0.1, curve=curve, wall_curve=wall,
        clips_per_s=clips_per_s,
    )  # fmt: skip


def _report(trials, swept):
    return StudyReport("s", "q?", "", "sqlite://", swept, trials, budget_clips=200)


def test_batch_size_verdict_reads_the_curves():
    bs = "optim.batch_size"
    fast = [(0, 10.0), (100, 40.0), (200, 50.0)]
    slow = [(0, 10.0), (100, 20.0), (200, 50.0)]
    seeds = [(0, 0.0), (1, 1.0), (2, -1.0)]

    def shifted(curve, d):
        return [(x, y + d) for x, y in curve]

    yes = _report(
        [_trial({bs: 8}, s, shifted(fast, d)) for s, d in seeds]
        + [_trial({bs: 64}, s, shifted(slow, d)) for s, d in seeds],
        [bs],
    )
    assert batch_size_verdict(yes).startswith("yes")
    assert "smaller is better at every step" in batch_size_verdict(yes)
    no = _report(
        [_trial({bs: 8}, s, shifted(slow, d)) for s, d in seeds]
        + [_trial({bs: 64}, s, shifted(fast, d)) for s, d in seeds],
        [bs],
    )
    assert batch_size_verdict(no).startswith("no")
    single = _report([_trial({bs: 8}, 0, slow), _trial({bs: 64}, 0, fast)], [bs])
    assert batch_size_verdict(single).startswith("leans no")
    assert "one seed per setting" in batch_size_verdict(single)
    noisy = _report(
        [_trial({bs: 8}, s, shifted(slow, d * 20 + 1)) for s, d in seeds]
        + [_trial({bs: 64}, s, shifted(slow, d * 20)) for s, d in seeds],
        [bs],
    )
    assert batch_size_verdict(noisy).startswith("inconclusive")
    middle = _report(
        [_trial({bs: 8}, 0, slow), _trial({bs: 16}, 0, fast), _trial({bs: 64}, 0, slow)], [bs]
    )
    assert "not monotone, best batch 16" in batch_size_verdict(middle)
    one = _report([_trial({bs: 8}, 0, fast)], [bs])
    assert "fewer than two" in batch_size_verdict(one)
    # Batch 64 saw 180 of the 200 clips (it does not divide the split): both are judged over
    # the 180 clips both saw, not with batch 64's last value held to 200.
    short = [(0, 10.0), (100, 20.0), (180, 60.0)]
    uneven = _report([_trial({bs: 8}, 0, fast), _trial({bs: 64}, 0, short)], [bs])
    area_8 = curve_auc(fast, 180)
    area_64 = curve_auc(short, 180)
    assert f"8: {area_8:.1f}, 64: {area_64:.1f}" in batch_size_verdict(uneven)


def test_best_vs_worst_and_scaling_tables():
    views = "views.num_local"
    report = _report(
        [_trial({views: 0}, s, [(0, 10.0), (200, 20.0 + s)]) for s in (0, 1)]
        + [_trial({views: 4}, s, [(0, 10.0), (200, 40.0 + s)]) for s in (0, 1)],
        [views],
    )
    verdict = best_vs_worst_verdict(report)
    assert verdict.startswith("best views.num_local=4 (40.5)") and "beyond the noise" in verdict
    rows = report.aggregate()
    assert [r["knn_top1_mean"] for r in rows] == [20.5, 40.5] and rows[0]["knn_top1_sem"] == 0.5
    assert "| views.num_local | trials |" in report.markdown()
    assert report.csv().splitlines()[0].startswith("views.num_local,seed,status")

    # ASHA stopped all but one setting: they are compared where all of them were measured.
    asha = _report(
        [_trial({views: 0}, 0, [(0, 10.0), (100, 12.0), (200, 15.0)]),
         _trial({views: 4}, 0, [(0, 10.0), (100, 20.0)], status="KILLED"),
         _trial({views: 8}, 0, [(0, 10.0), (50, 11.0), (150, 30.0)], status="KILLED")],
        [views],
    )  # fmt: skip
    assert best_vs_worst_verdict(asha).startswith(
        "at 100 clips seen (the furthest every setting got before ASHA stopped it): best "
        "views.num_local=4 (20.0); over worst views.num_local=8: +9.0 points"
    )

    # Two settings finished with the same accuracy and ASHA stopped a third: a tie, then the
    # comparison at the clip count every setting reached.
    tie = _report(
        [_trial({views: 0}, 0, [(0, 10.0), (100, 30.0), (200, 50.0)]),
         _trial({views: 4}, 0, [(0, 10.0), (100, 20.0), (200, 50.0)]),
         _trial({views: 8}, 0, [(0, 10.0), (100, 12.0)], status="KILLED")],
        [views],
    )  # fmt: skip
    assert best_vs_worst_verdict(tie) == (
        "finished: the finished settings tie at 50.0 (views.num_local=0; views.num_local=4); "
        "at 100 clips seen (the furthest every setting got before ASHA stopped it): best "
        "views.num_local=0 (30.0); over worst views.num_local=8: +18.0 points (one seed per "
        "setting: no error bars, indicative only)"
    )

    workers = "scaling.num_workers"
    scaling = _report(
        [_trial({workers: 1}, 0, [(0, 10.0), (200, 30.0)], clips_per_s=10.0, hours_per_point=1),
         _trial({workers: 2}, 0, [(0, 10.0), (200, 30.0)], clips_per_s=16.0,
                hours_per_point=0.5)],
        [workers],
    )  # fmt: skip
    table = scaling_table(scaling, threshold=30.0)
    assert [(r["workers"], r["efficiency"], r["hours_to_threshold"]) for r in table] == [
        (1, 1.0, 1.0),
        (2, 0.8, 0.5),
    ]
    # Default threshold: 90% of the way from the start (10) to the lowest final (30) = 28.
    assert [(r["threshold_knn_top1"], r["hours_to_threshold"]) for r in scaling_table(scaling)] == [
        (28.0, 1.0),
        (28.0, 0.5),
    ]
    flat = _report(
        [_trial({workers: n}, 0, [(0, 10.0), (200, 9.0)], clips_per_s=10.0 * n) for n in (1, 2)],
        [workers],
    )
    assert [r["hours_to_threshold"] for r in scaling_table(flat)] == [None, None]


# -- a smoke study on local Ray ------------------------------------------------------------------


def _smoke_options(tmp_path: Path, shards: Path) -> StudyOptions:
    return StudyOptions(
        preset="tiny",
        overrides=[
            *SMALL_MODEL,
            "optim.epochs=1",
            "optim.warmup_epochs=0.5",
            "data.shuffle_buffer=0",
            "data.decode_actors=1",
            "train.checkpoint_every=1",
            "eval.online_every_clips=4",
            "eval.clip_size=32",
            "eval.online_bank_clips=8",
            "eval.online_query_clips=4",
        ],
        storage_path=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="smoke",
        data_path=str(shards),
        max_concurrent_trials=1,
    )


SMOKE = StudySpec(
    name="batch_smoke",
    question="smoke: batch 2 vs 4, and an invalid batch",
    sweeps=[Sweep("optim.batch_size", (2, 4, -1))],
    verdict=batch_size_verdict,
    asha=False,
)


def _children(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    if experiment is None:
        return client, []
    runs = client.search_runs([experiment.experiment_id], "tags.`svt.study` = 'batch_smoke'")
    return client, [r for r in runs if r.data.tags.get("svt.study_role") != "parent"]


def _study_driver(tmp_path: Path, call: str) -> Path:
    """A study driver script for a subprocess: joins the Ray instance at argv[1] (the
    session's), then runs `call`, which may use SMOKE, _smoke_options, run_study, study_main."""
    driver = tmp_path / "driver.py"
    paths = [str(ROOT / "tests"), str(ROOT)]
    driver.write_text(
        f"import sys; sys.path[:0] = {paths!r}\n"
        "from pathlib import Path\n"
        "import ray\n"
        "from test_studies import SMOKE, _smoke_options\n"
        "from svt_ray.studies import run_study, study_main\n"
        "ray.init(address=sys.argv[1])\n"
        f"{call}\n"
    )
    return driver


def _finished_trials(database: Path) -> dict[str, tuple[str, int]]:
    """{trial id: (run id, end time)} of the FINISHED child runs, read with sqlite3: an
    MlflowClient would keep the file open in this process and see it after it moves."""
    import sqlite3
    from contextlib import closing

    if not database.exists():
        return {}
    with closing(sqlite3.connect(database)) as db:
        rows = db.execute(
            "SELECT tags.value, runs.run_uuid, runs.end_time FROM runs JOIN tags ON "
            "tags.run_uuid = runs.run_uuid AND tags.key = 'svt.trial_id' "
            "WHERE runs.status = 'FINISHED'"
        ).fetchall()
    return {trial_id: (run_id, end_time) for trial_id, run_id, end_time in rows}


@pytest.mark.ray
@pytest.mark.slow
def test_study_smoke_restore_failure_and_compare(tmp_path, synthetic_shards, ray_session):
    # 1. The study driver runs in its own process on the session's Ray; kill -9 it as soon as
    #    the first trial has finished.
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    driver = _study_driver(
        tmp_path, "run_study(SMOKE, _smoke_options(Path(sys.argv[2]), Path(sys.argv[3])))"
    )
    address = ray_session.get_runtime_context().gcs_address
    process = subprocess.Popen(
        [sys.executable, str(driver), address, str(old), str(synthetic_shards)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 420
    while time.time() < deadline and process.poll() is None:
        if _finished_trials(old / "mlflow.db"):
            break
        time.sleep(2)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = _finished_trials(old / "mlflow.db")
    assert len(finished_before) == 1

    # 2. Run it again somewhere else, as on a new cluster whose head restored the MLflow store
    #    and the study's storage: Tune restores the study; the finished trial is not re-run;
    #    the restored trials use the new places, not the ones Tune saved in their configs.
    # The killed driver's trial actors go with it: wait until Ray has every CPU back.
    deadline = time.time() + 120
    while time.time() < deadline and ray_session.available_resources().get(
        "CPU", 0
    ) < ray_session.cluster_resources().get("CPU", 0):
        time.sleep(0.5)
    old.rename(new)
    old.mkdir()  # the old path exists on the new machine, empty: nothing may write there
    options = _smoke_options(new, synthetic_shards)
    report = run_study(SMOKE, options)
    assert not (old / "mlflow.db").exists() and not (old / "runs").exists()
    client, children = _children(new)
    by_trial = {}
    for run in children:
        by_trial.setdefault(run.data.tags["svt.trial_id"], []).append(run)
    assert len(by_trial) == 3 and all(len(runs) == 1 for runs in by_trial.values())
    ((trial_id, (run_id, end_time)),) = finished_before.items()
    after = by_trial[trial_id][0]
    assert (after.info.run_id, after.info.end_time) == (run_id, end_time)
    history = client.get_metric_history(after.info.run_id, "loss")
    assert len(history) == len({m.step for m in history})  # no step trained twice

    # 3. Two finished children with their curves; the invalid batch failed alone, with its error.
    statuses = {
        json.loads(r[0].data.tags["svt.sweep.optim.batch_size"]): r[0] for r in by_trial.values()
    }
    assert statuses[2].info.status == statuses[4].info.status == "FINISHED"
    assert statuses[-1].info.status == "FAILED"
    assert "optim.batch_size" in statuses[-1].data.tags["svt.error"]
    for batch in (2, 4):
        curve = client.get_metric_history(statuses[batch].info.run_id, "online_knn_top1")
        assert len(curve) >= 2 and curve[0].step == 0
    rows = {row["optim.batch_size"]: row for row in report.rows()}
    assert rows[-1]["status"] == "FAILED" and rows[2]["final_knn_top1"] is not None

    # 4. The parent run holds the table and the plots; compare rebuilds the same table.
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id)}
    assert {"results.csv", "results.md", "curves.png", "final.png"} <= artifacts
    assert client.get_run(report.parent_run_id).info.status == "FINISHED"
    table = Path(client.download_artifacts(report.parent_run_id, "results.md", str(tmp_path)))
    again = collect_study(options.tracking_uri, "smoke", "batch_smoke")
    assert again.markdown() == table.read_text() == report.markdown()
    assert report.verdict and report.verdict == again.verdict

    from typer.testing import CliRunner

    from svt_ray.cli import app

    result = CliRunner().invoke(
        app,
        ["compare", "--study", "batch_smoke", "--tracking-uri", options.tracking_uri,
         "--experiment", "smoke", "--output", str(tmp_path / "cmp")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "batch_smoke" / "results.md").read_text() == report.markdown()


@pytest.mark.ray
@pytest.mark.slow
def test_asha_lets_a_trial_that_reaches_the_budget_finish(tmp_path, synthetic_shards, ray_session):
    """Ray's ASHA stops a trial at its last report by default, killing its run while it
    finishes (last metrics, curves artifact, run status): with ASHA on, a trial that runs to
    the budget ends FINISHED with its curves. Batch 2 divides the fixture's 14 training clips,
    so the last report reaches the budget, as the shipped studies' 608 clips in batches do."""
    spec = StudySpec(
        "asha_smoke", "smoke: one setting to the end", [Sweep("optim.batch_size", (2,))]
    )
    options = _smoke_options(tmp_path, synthetic_shards)
    options.asha, options.asha_grace_clips = True, 4
    report = run_study(spec, options)
    (trial,) = report.trials
    assert trial.status == "FINISHED" and trial.clips_seen == report.budget_clips
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(options.tracking_uri).list_artifacts(trial.run_id)}
    assert "training_curves.png" in artifacts


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_on_a_study_says_how_to_continue_and_writes_no_report(
    tmp_path, synthetic_shards, ray_session
):
    """SIGINT to a study's driver: Tune saves its state; the study exits 130 with the command
    that continues it, closes the running trial's child run, and writes no report (it wrote
    one, with a verdict on the partial grid, and exited 0)."""
    driver = _study_driver(tmp_path, "sys.exit(study_main(SMOKE, sys.argv[2:]))")
    options = _smoke_options(tmp_path, synthetic_shards)
    flags = [flag for item in [*options.overrides, "optim.epochs=20"] for flag in ("--set", item)]
    process = subprocess.Popen(
        [sys.executable, str(driver), ray_session.get_runtime_context().gcs_address,
         "--data", str(synthetic_shards), "--storage", options.storage_path,
         "--tracking-uri", options.tracking_uri, "--experiment", "smoke", "--no-asha",
         "--max-concurrent", "1", "--grid", "optim.batch_size=2,4", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            client, children = _children(tmp_path)
            if children and client.get_metric_history(children[0].info.run_id, "loss"):
                break
            time.sleep(1)
        assert process.poll() is None, process.communicate()[1][-3000:]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err[-3000:]
    assert "study batch_smoke interrupted: 0 of 2 trials finished. Run the same command" in err
    assert "## Verdict" not in out and not (tmp_path / "runs" / "batch_smoke" / "report").exists()
    assert "Tuner.restore" not in out + err  # Tune's own hint names an API, not the command
    assert "batch_smoke optim.batch_size=2 seed 0 step 1/" in out + err  # the trial's first line
    client, children = _children(tmp_path)
    assert [run.info.status for run in children] == ["KILLED"]
    parent_id = children[0].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "KILLED"


def test_ashas_first_rung_comes_from_the_flag_the_study_or_the_budget(
    tmp_path, synthetic_shards, ray_session
):
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (2, 4))])
    assert asha_grace(spec, StudyOptions(), 4864) == 1216  # a quarter of the budget
    spec.asha_grace_clips = 1200
    assert asha_grace(spec, StudyOptions(), 4864) == 1200
    assert asha_grace(spec, StudyOptions(asha_grace_clips=800), 4864) == 800
    assert asha_grace(spec, StudyOptions(asha_grace_clips=0), 4864) == 0  # refused below, not 1216
    options = _smoke_options(tmp_path, synthetic_shards)
    options.asha, options.asha_grace_clips = True, 10**6
    with pytest.raises(
        ConfigError, match=r"--asha-grace: .* at 1000000 clips .* budget of \d+ clips"
    ):
        run_study(spec, options)


def test_a_local_study_asking_for_gpus_ray_lacks_fails_before_any_trial(
    tmp_path, synthetic_shards, ray_session
):
    spec = StudySpec("gpu", "q", [Sweep("optim.batch_size", (2, 4))])
    options = _smoke_options(tmp_path, synthetic_shards)
    options.overrides = [*options.overrides, "scaling.gpus_per_worker=64"]
    with pytest.raises(ConfigError, match=r"need 64 GPU\(s\), and the local Ray instance has"):
        run_study(spec, options)
    assert not (tmp_path / "runs").exists()


def _finished_run(client, experiment_id: str, knn: float, **tags: str) -> str:
    """A FINISHED run whose online kNN goes from 30 at 0 clips seen to `knn` at 100."""
    from mlflow.entities import Metric

    run = client.create_run(experiment_id, tags=tags)
    points = [(0, 30.0), (100, knn)]
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(METRIC, value, 1_000 + step, step) for step, value in points],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_trial_stopped_early_ends_when_it_last_logged_not_when_the_study_ends(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray.studies import _close_stopped_runs, _trial_record

    options = StudyOptions(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="x")
    client = MlflowClient(options.tracking_uri)
    experiment_id = client.create_experiment("x")
    parent = client.create_run(experiment_id, start_time=1_000)
    stopped = client.create_run(
        experiment_id, start_time=2_000, tags={"mlflow.parentRunId": parent.info.run_id}
    )
    steps = [Metric("loss", 1.0, timestamp, step) for step, timestamp in enumerate((3_000, 9_000))]
    client.log_batch(stopped.info.run_id, metrics=steps)
    _close_stopped_runs(options, parent.info.run_id)
    run = client.get_run(stopped.info.run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", 9_000)
    assert _trial_record(client, run, []).hours == pytest.approx(7_000 / 3.6e6)
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # not a child: untouched


def test_a_trial_resumed_a_day_later_counts_its_training_hours_not_the_pause(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray.studies import _trial_record

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    hour, day, t0 = 3_600_000, 24 * 3_600_000, 1_000_000
    run = client.create_run(client.create_experiment("x"), start_time=t0).info.run_id
    # Session 1: an hour of training (kNN at 0 and 100 clips), Ctrl-C. Session 2, a day
    # later: half an hour more (wall_time_s starts again from 0), kNN at 200 clips.
    points = [(0, 0.01, 30.0), (100, 1.0, 40.0), (150, 0.001, None), (200, 0.5, 50.0)]
    starts = {0: t0, 100: t0, 150: t0 + hour + day, 200: t0 + hour + day}
    metrics = []
    for step, hours, knn in points:
        timestamp = starts[step] + int(hours * hour)
        metrics.append(Metric("wall_time_s", hours * 3600, timestamp, step))
        if knn is not None:
            metrics.append(Metric(METRIC, knn, timestamp, step))
    client.log_batch(run, metrics=metrics)
    client.set_terminated(run, "FINISHED", end_time=t0 + hour + day + hour // 2)
    record = _trial_record(client, client.get_run(run), [])
    assert record.hours == pytest.approx(1.5, abs=0.01)  # not 25.5
    assert [round(h, 2) for h, _ in record.wall_curve] == [0.01, 1.0, 1.5]


def test_a_stopped_trial_is_closed_when_tune_ends_it_and_only_that_trial(tmp_path):
    from types import SimpleNamespace

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray.studies import _run_closer

    options = StudyOptions(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="x")
    client = MlflowClient(options.tracking_uri)
    experiment_id = client.create_experiment("x")
    parent = client.create_run(experiment_id, start_time=1_000)
    runs = {
        trial: client.create_run(
            experiment_id,
            start_time=2_000,
            tags={"mlflow.parentRunId": parent.info.run_id, "svt.trial_id": trial},
        ).info.run_id
        for trial in ("t_stopped", "t_running")
    }
    for run_id in runs.values():
        client.log_batch(run_id, metrics=[Metric("loss", 1.0, 5_000, 0)])
    _run_closer(options, parent.info.run_id).on_trial_complete(
        0, [], SimpleNamespace(trial_id="t_stopped")
    )
    stopped, running = (client.get_run(runs[t]).info for t in ("t_stopped", "t_running"))
    assert (stopped.status, stopped.end_time) == ("KILLED", 5_000)
    assert running.status == "RUNNING"  # another trial, still training: untouched


def test_compare_recomputes_the_verdict_with_the_current_rules(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("x")

    def parent(name: str, verdict_fn: str) -> str:
        run = client.create_run(
            experiment_id,
            tags={"svt.study": name, "svt.study_role": "parent", "svt.x_label": "local views",
                  "svt.verdict": "stale words", "svt.verdict_fn": verdict_fn},
        )  # fmt: skip
        client.log_param(run.info.run_id, "sweep.views.num_local", "0,4")
        for locals_, knn in ((0, 40.0), (4, 70.0)):
            _finished_run(client, experiment_id, knn, **{
                "mlflow.parentRunId": run.info.run_id, "svt.seed": "0",
                "svt.sweep.views.num_local": str(locals_),
            })  # fmt: skip
        return run.info.run_id

    parent("current", "svt_ray.studies:best_vs_worst_verdict")
    report = collect_study(uri, "x", "current")
    assert report.verdict.startswith("best views.num_local=4 (70")
    assert report.verdict == best_vs_worst_verdict(report)
    assert report.x_label == "local views"
    # A verdict function that is gone, or not this package's, leaves the stored words.
    parent("gone", "svt_ray.studies:no_such_verdict")
    parent("foreign", "my_script:verdict")
    assert collect_study(uri, "x", "gone").verdict == "stale words"
    assert collect_study(uri, "x", "foreign").verdict == "stale words"


def test_a_study_continues_only_with_the_recipe_it_was_started_with(tmp_path):
    """Tune restores a study's recorded trials, so new seeds, grids, --set items or ASHA
    settings would be dropped without a word: they are refused, naming what changed. Where it
    runs (data, storage, tracking, cluster) may change; the parent run is RUNNING again."""
    from mlflow.tracking import MlflowClient

    from svt_ray.studies import _parent_run, _study_recipe

    options = StudyOptions(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="x")
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16))])
    study_dir, base = str(tmp_path / "s"), ["optim.epochs=2"]

    def parent(placement: str = "data.path=/a") -> str:
        recipe = _study_recipe(options, spec, base, budget=1000, grace=250)
        return _parent_run(options, spec, study_dir, [*base, placement], recipe)

    first = parent()
    client = MlflowClient(options.tracking_uri)
    client.set_terminated(first, "KILLED")  # as after a Ctrl-C
    assert parent("data.path=/moved") == first
    assert client.get_run(first).info.status == "RUNNING"
    options.seeds = [0, 1, 2]
    with pytest.raises(ConfigError, match=r"seeds: \[0\] -> \[0, 1, 2\]\)\. .* another --name"):
        parent()
    options.seeds = [0]
    spec.sweeps = [Sweep("optim.batch_size", (8, 32))]
    with pytest.raises(ConfigError, match=r"sweeps: .*\[8, 16\].* -> .*\[8, 32\]"):
        parent()
    spec.sweeps = [Sweep("optim.batch_size", (8, 16))]
    base = ["optim.epochs=3"]
    with pytest.raises(ConfigError, match=r"overrides: \[\"optim.epochs=2\"\] ->"):
        parent()
    base = ["optim.epochs=2"]
    options.asha = False
    with pytest.raises(ConfigError, match=r"asha: true -> false; asha_grace_clips: 250 -> null"):
        parent()
    options.asha = True
    # A study.json from before recipes were recorded is compared on its parent's params.
    record = json.loads((tmp_path / "s" / "study.json").read_text())
    del record["recipe"]
    (tmp_path / "s" / "study.json").write_text(json.dumps(record))
    assert parent() == first
    options.seeds = [0, 1]
    with pytest.raises(ConfigError, match=r'seeds: "0" -> "0,1"'):
        parent()


def test_a_report_reads_its_own_parent_run_and_compare_takes_runs_of_any_experiment(
    tmp_path, caplog
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    studies = client.create_experiment("svt-ray-studies")
    parents = []
    for start, knn in ((1_000, 40.0), (2_000, 90.0)):  # the same study under two --storage
        parent = client.create_run(
            studies, start_time=start, tags={"svt.study": "s", "svt.study_role": "parent"}
        ).info.run_id
        client.log_param(parent, "sweep.optim.batch_size", "8")
        _finished_run(client, studies, knn, **{"mlflow.parentRunId": parent,
                                      "svt.sweep.optim.batch_size": "8"})  # fmt: skip
        parents.append(parent)
    assert (
        collect_study(uri, "svt-ray-studies", "s", parent_run_id=parents[0]).trials[0].final == 40
    )
    newest = collect_study(uri, "svt-ray-studies", "s")
    assert newest.parent_run_id == parents[1] and newest.trials[0].final == 90
    assert f"others: {parents[0]}; pick one with --parent-run" in caplog.text

    # Plain pretraining runs, in their own experiment: batch sizes compare as numbers, and
    # seeds are repeats of a setting, not a setting.
    plain = client.create_experiment("svt-ray")
    run_ids = []
    for batch, seed in itertools.product((64, 8, 16), (0, 1)):
        run_id = _finished_run(client, plain, 50.0 + batch / 8 + seed)
        client.log_param(run_id, "optim.batch_size", str(batch))
        client.log_param(run_id, "train.seed", str(seed))
        client.log_param(run_id, "train.run_name", f"b{batch}-s{seed}")
        run_ids.append(run_id)
    report = collect_study(uri, "svt-ray-studies", "runs", run_ids=run_ids)
    assert report.swept == ["optim.batch_size"]
    rows = report.aggregate()
    assert [row["optim.batch_size"] for row in rows] == [8, 16, 64]
    assert [(row["finished"], row["knn_top1_mean"]) for row in rows] == [
        (2, 51.5), (2, 52.5), (2, 58.5)
    ]  # fmt: skip
    assert rows[0]["knn_top1_sem"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="no MLflow run 'deadbeef' in sqlite"):
        collect_study(uri, "svt-ray-studies", "runs", run_ids=["deadbeef"])


def test_a_verdict_says_which_side_has_a_single_seed():
    from svt_ray.studies import _difference_phrase

    assert "one seed per setting" in _difference_phrase((70.0, None, 1), (60.0, None, 1))
    phrase = _difference_phrase((71.0, 2.0, 3), (60.0, None, 1))
    assert phrase.startswith("+11.0 points (3 against 1 seed(s): one side has a single seed")
    assert "within" in _difference_phrase((61.0, 2.0, 3), (60.0, 1.0, 3))


def test_bad_seeds_are_a_flag_error_not_a_traceback(capsys):
    from svt_ray.studies import study_main

    assert (
        study_main(StudySpec("s", "q", [Sweep("optim.batch_size", (8,))]), ["--seeds", "0,x"]) == 2
    )
    assert "--seeds 0,x: comma-separated integers" in capsys.readouterr().err


def test_a_trial_whose_placement_group_was_removed_counts_as_stopped_not_failed():
    import ray.exceptions
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    from svt_ray.studies import _stopped_from_outside

    def died(detail: str) -> ray.exceptions.ActorDiedError:  # built as Ray builds it
        message = f"The actor is dead because its worker process has died. {detail}"
        context = ActorDiedErrorContext(
            class_name="TrainController", actor_id=bytes(16), error_message=message
        )
        return ray.exceptions.ActorDiedError(context)

    # What ASHA stopping a trial raised in a real study (frame_rate, Ray 2.60):
    assert _stopped_from_outside(
        died(
            "Worker exit type: INTENDED_SYSTEM_EXIT Worker exit detail: Destroying worker "
            "since its placement group was removed."
        )
    )
    assert not _stopped_from_outside(died("Worker exit type: SYSTEM_ERROR (out of memory)"))
    assert not _stopped_from_outside(ValueError("placement group was removed"))

    # What a trial that ASHA stopped at its last report raised (view_count, Ray 2.60): Tune
    # ended the trial's actor, the owner of the Train controller.
    def owner_died(exit_type: str) -> ray.exceptions.ActorDiedError:
        message = (
            "The actor is dead because its owner has died. Owner Id: 40892e Owner Ip address: "
            f"127.0.0.1 Owner worker exit type: {exit_type} Worker exit detail: Owner's worker "
            "process has crashed."
        )
        context = ActorDiedErrorContext(
            class_name="TrainController", actor_id=bytes(16), error_message=message
        )
        return ray.exceptions.ActorDiedError(context)

    assert _stopped_from_outside(owner_died("INTENDED_SYSTEM_EXIT"))
    assert not _stopped_from_outside(owner_died("SYSTEM_ERROR"))


def test_an_error_after_a_trial_finished_does_not_mark_it_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from svt_ray.studies import _record_failed_trial

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("x")
    parent = client.create_run(experiment_id)
    trial = {"experiment": "x", "study": "s", "parent_run_id": "p"}
    runs = {}
    for trial_id, status in (("done", "FINISHED"), ("midway", None)):
        tags = {"svt.trial_id": trial_id, "mlflow.parentRunId": parent.info.run_id}
        runs[trial_id] = client.create_run(experiment_id, tags=tags).info.run_id
        if status:
            client.set_terminated(runs[trial_id], status)
        _record_failed_trial(uri, trial, trial_id, {}, RuntimeError("boom"))
    done, midway = (client.get_run(runs[name]) for name in ("done", "midway"))
    assert done.info.status == "FINISHED" and "svt.error" not in done.data.tags
    assert midway.info.status == "FAILED" and midway.data.tags["svt.error"] == "RuntimeError: boom"


def test_trials_per_cluster_counts_workers_decode_and_gpus():
    from svt_ray.config import load_config
    from svt_ray.studies import trials_per_cluster

    cpu = load_config("tiny", overrides=["scaling.num_workers=2"])
    assert trials_per_cluster(cpu, {"CPU": 2}) == 1  # never zero
    assert trials_per_cluster(cpu, {"CPU": 9}) == 2  # 2 workers + decode + read CPU each
    gpu = load_config("tiny", overrides=["scaling.num_workers=2", "scaling.gpus_per_worker=1"])
    assert trials_per_cluster(gpu, {"CPU": 64, "GPU": 8}) == 4


def test_the_local_instance_is_sized_for_the_largest_valid_trial():
    from svt_ray.studies import largest_trial
    from svt_ray.train import cpus_per_run

    spec = StudySpec(
        name="sizes",
        question="",
        sweeps=[Sweep("scaling.num_workers", (1, 3, 2)), Sweep("optim.batch_size", (12, -1))],
    )
    config = largest_trial(spec, "tiny", ["data.decode_cpus=0.5"])
    assert config.scaling.num_workers == 3 and cpus_per_run(config) == 3 + 0.5 + 1
    # Every swept value invalid: the study's shared settings decide.
    broken = StudySpec(name="broken", question="", sweeps=[Sweep("optim.batch_size", (-1,))])
    assert largest_trial(broken, "tiny", []).scaling.num_workers == 1


@pytest.mark.parametrize("preset", ["tiny", "paper"])
@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "studies").glob("[!_]*.py")))
def test_every_trial_of_the_shipped_studies_is_a_valid_config(script, preset, monkeypatch):
    """A study script whose grid holds a setting the config rejects would lose that trial only
    after the others had run: check every trial of every script up front, on both presets."""
    import importlib

    from svt_ray.config import load_config

    monkeypatch.syspath_prepend(str(ROOT / "studies"))
    spec = importlib.import_module(script).SPEC
    assert spec.question.endswith("?") and spec.sweeps
    for sweep in spec.settings():
        trial = {"base": list(spec.fixed), "sweep": sweep, "seed": 0}
        try:
            config = load_config(preset, overrides=trial_overrides(trial))
        except ConfigError as error:
            pytest.fail(f"studies/{script}.py, {preset} preset, trial {sweep}: {error}")
        for path, value in sweep.items():  # the swept value reached the config
            for key, item in value.items() if isinstance(value, dict) else [(path, value)]:
                section, name = key.split(".")
                assert getattr(getattr(config, section), name) == item
