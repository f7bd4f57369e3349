"""Ray Tune studies: sweep parsing, recipes, trial bookkeeping, and a smoke study end to end
(parent + child runs in MLflow, a failing trial, restore after the driver is killed, compare)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import SMALL_MODEL, RayStarted, no_ray

from svt_ray.config import ConfigError
from svt_ray.studies import (
    SMALL_BUDGET,
    StudyOptions,
    StudySpec,
    Sweep,
    asha_grace,
    check_grace_after_first_knn,
    run_study,
    setting_configs,
    trial_label,
    trial_overrides,
)
from svt_ray.study_report import batch_size_verdict, collect_study

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


def test_a_scripts_sweeps_that_set_one_path_twice_or_hold_no_tuple_are_refused():
    """Two sweeps of one path ran only the later's values (every trial overwrote the first),
    with a trial count that never matched Tune's, so the study never counted as finished."""
    batch = Sweep("optim.batch_size", (8, 16))
    with pytest.raises(ConfigError, match=r"two sweeps are named optim.batch_size; give all"):
        StudySpec("s", "q?", [batch, Sweep("optim.batch_size", (32,))])
    schedule = Sweep("lr", ({"optim.base_lr": 1e-3, "optim.warmup_epochs": 0},), labels=("a",))
    with pytest.raises(ConfigError, match=r"sweeps lr and optim.base_lr both set optim.base_lr"):
        StudySpec("s", "q?", [schedule, Sweep("optim.base_lr", (2e-3,))])
    StudySpec("s", "q?", [batch, schedule])  # disjoint paths: fine
    with pytest.raises(ConfigError, match=r"two sweeps are named lr; give all its values in one"):
        StudySpec("s", "q?", [schedule, schedule])  # Tune's grid is keyed by the name
    epochs = Sweep("optim.batch_size", ({"optim.epochs": 2},), labels=("short",))
    with pytest.raises(ConfigError, match=r"two sweeps are named optim.batch_size"):
        StudySpec("s", "q?", [batch, epochs])
    mixed = Sweep("optim.base_lr", (1e-3, {"optim.base_lr": 2e-3, "optim.warmup_epochs": 0}))
    with pytest.raises(ConfigError, match=r"sweeps optim.base_lr and lr both set optim.base_lr"):
        StudySpec("s", "q?", [mixed, schedule])  # its plain value sets the path it is named
    with pytest.raises(ConfigError, match=r"sweep loss.koleo_weight: values must be a tuple"):
        Sweep("loss.koleo_weight", 0.3)
    with pytest.raises(ConfigError, match=r"sweep loss.koleo_weight: give it one value or more"):
        Sweep("loss.koleo_weight", ())
    with pytest.raises(ConfigError, match=r"sweep lr: a setting of several paths names one"):
        Sweep("lr", ({},))
    assert hash(Sweep("optim.batch_size", [8, 16])) == hash(Sweep("optim.batch_size", (8, 16)))


def test_a_study_script_copied_anywhere_runs_without_the_studies_folder(tmp_path):
    """README: "A new study is a copy of a shipped script, kept anywhere"; the scripts once
    imported their budget from studies/_common.py, found only beside them."""
    import importlib.util
    import sys

    copy = tmp_path / "my_study.py"
    copy.write_text((ROOT / "studies" / "loss_terms.py").read_text())
    assert str(ROOT / "studies") not in sys.path
    spec = importlib.util.spec_from_file_location("my_study", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SPEC.fixed == SMALL_BUDGET


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


def test_tunes_grid_holds_a_labelled_mapping_by_its_label():
    """Tune's status table prints a trial's swept value: a mapping showed its tail
    (`...ion_weight': 0.0}`), and its trial folders spelt it out. The grid holds the label; the
    trial's --set items are the mapping's, as are those of a study saved before (its trials
    hold the mapping itself)."""
    terms = Sweep(
        "loss_terms",
        ({"loss.cross_view_weight": 1.0, "loss.motion_weight": 0.0},
         {"loss.cross_view_weight": 1.0, "loss.motion_weight": 1.0}),
        labels=("cross-view only", "both"),
    )  # fmt: skip
    assert terms.grid_values() == ["cross-view only", "both"]
    settings = {"loss_terms": terms.labelled_settings()}
    both = ["loss.cross_view_weight=1.0", "loss.motion_weight=1.0", "train.seed=0"]
    trial = {"base": [], "seed": 0, "sweep": {"loss_terms": "both"}, "settings": settings}
    assert trial_overrides(trial) == both
    saved = {"base": [], "seed": 0, "sweep": {"loss_terms": terms.values[1]}}
    assert trial_overrides(saved) == both
    labels = {"loss_terms": {json.dumps(v): terms.label(v) for v in terms.values}}
    assert trial_label({**trial, "study": "s", "labels": labels}) == "s loss_terms=both seed 0"
    assert trial_label({**saved, "study": "s", "labels": labels}) == "s loss_terms=both seed 0"
    plain = Sweep("optim.batch_size", (8, 16))
    assert plain.grid_values() == [8, 16] and plain.labelled_settings() == {}
    counts = Sweep("views.num_local", (0, 4), labels=("none", "four"))  # labelled numbers stay
    assert counts.grid_values() == [0, 4]
    with pytest.raises(ConfigError, match=r"sweep loss_terms: give one label per value, each once"):
        Sweep("loss_terms", terms.values, labels=("same", "same"))  # one setting would run twice


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
def test_study_smoke_restore_failure_and_compare(
    tmp_path, synthetic_shards, ray_session, empty_mlflow_store
):
    # 1. The study driver runs in its own process on the session's Ray; kill -9 it as soon as
    #    the first trial has finished.
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    shutil.copyfile(empty_mlflow_store, old / "mlflow.db")
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
    from svt_ray.evaluate import OnlineKNN

    prepared, prepare = [], OnlineKNN.prepare  # in this driver (the trials run in actors)

    def recorded(configs):
        prepared.append(configs)
        return prepare(configs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnlineKNN, "prepare", recorded)
        report = run_study(SMOKE, options)
    assert not (old / "mlflow.db").exists() and not (old / "runs").exists()
    # The online kNN clips of both valid settings, decoded before the trials, by the driver
    # that started the study; the one that restored it found them, for both (one set).
    (configs,) = prepared
    assert sorted(c.optim.batch_size for c in configs) == [2, 4]
    folders = {f for c in configs for f in OnlineKNN.cache_folders(c).values()}
    cache = new / "runs" / "batch_smoke" / "runs" / OnlineKNN.CACHE_FOLDER
    assert {Path(f) for f in folders} == set(cache.iterdir()) and len(folders) == 2
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


@pytest.mark.extended  # Tune ASHA on: run when ASHA or the trial end changes
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


@pytest.mark.extended  # run when the study driver changes
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


def test_asha_judges_trials_at_its_rungs_and_never_at_the_budget():
    """max_t=budget put a rung at the budget whenever the first rung was a quarter of it (the
    default): the second trial to finish was stopped at its last report when it ended below
    the first, and reported as stopped early, out of the final comparison."""
    from ray.tune.schedulers import TrialScheduler

    from svt_ray.studies import METRIC, TIME_ATTR, asha_scheduler

    scheduler = asha_scheduler(4864, 1216)
    scheduler.set_search_properties(METRIC, "max")

    def run(trial_id: str, knn: dict[int, float]) -> list[str]:
        trial = dataclasses.make_dataclass("Trial", ["trial_id"])(trial_id)
        scheduler.on_trial_add(None, trial)
        return [
            scheduler.on_trial_result(None, trial, {TIME_ATTR: clips, METRIC: value})
            for clips, value in knn.items()
        ]

    assert set(run("a", {1216: 50, 2432: 60, 3648: 62, 4864: 70})) == {TrialScheduler.CONTINUE}
    assert set(run("b", {1216: 52, 2432: 62, 3648: 61, 4864: 60})) == {TrialScheduler.CONTINUE}
    assert run("c", {1216: 30})[-1] == TrialScheduler.STOP  # below the first rung's cut
    assert run("d", {1216: 60, 2432: 40})[-1] == TrialScheduler.STOP  # below the second's


def test_ashas_first_rung_comes_from_the_flag_the_study_or_the_budget(
    tmp_path, synthetic_shards, ray_session, caplog
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
    # online kNN every 4 clips (2 steps of 2, 1 of 4): a rung at 2 would judge initial weights
    options.asha_grace_clips = 2
    with pytest.raises(
        ConfigError, match=r"first rung at 2 clips seen comes before .* \(at 4 clips seen"
    ):
        run_study(spec, options)
    configs = setting_configs(spec, "tiny", options.overrides)
    check_grace_after_first_knn(4, configs)  # the first evaluation's own report: allowed
    check_grace_after_first_knn(2, configs, refuse=False)  # the default grace: a warning
    assert "first rung at 2 clips seen comes before" in caplog.text


def test_a_study_without_the_online_knns_splits_fails_before_decoding_or_any_trial(
    tmp_path, synthetic_shards, ray_session, monkeypatch
):
    from svt_ray.evaluate import OnlineKNN

    monkeypatch.setattr(OnlineKNN, "prepare", lambda configs: pytest.fail("decoded"))
    options = _smoke_options(tmp_path, synthetic_shards)
    options.overrides.append("eval.test_split=test")
    with pytest.raises(ConfigError, match=r"has no clips of split 'test'"):
        run_study(SMOKE, options)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_local_study_asking_for_gpus_ray_lacks_fails_before_any_trial(
    tmp_path, synthetic_shards, ray_session
):
    spec = StudySpec("gpu", "q", [Sweep("optim.batch_size", (2, 4))])
    options = _smoke_options(tmp_path, synthetic_shards)
    options.overrides = [*options.overrides, "scaling.gpus_per_worker=64"]
    with pytest.raises(ConfigError, match=r"need 64 GPU\(s\), and the local Ray instance has"):
        run_study(spec, options)
    assert not (tmp_path / "runs").exists()


def test_a_trial_stopped_early_ends_when_it_last_logged_not_when_the_study_ends(
    tmp_path, mlflow_db
):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray.studies import _close_stopped_runs
    from svt_ray.study_report import _trial_record

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


def test_a_stopped_trial_is_closed_when_tune_ends_it_and_only_that_trial(tmp_path, mlflow_db):
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
    # A trial whose process died (out of memory, its node lost) was KILLED too, as if ASHA
    # had stopped it: the report said "0 failed, 1 stopped early". FAILED, with Tune's error.
    # Tune has just written the error beside the driver; the storage's copy (get_error) is
    # synced later: the error before, here, or none.
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\n\nray.exceptions.OutOfMemoryError: Task was killed\n")
    died = SimpleNamespace(
        trial_id="t_running",
        error_file=str(error_file),
        get_error=lambda: "ray.exceptions.RayActorError: an earlier failure",
    )
    _run_closer(options, parent.info.run_id).on_trial_error(0, [], died)
    failed = client.get_run(runs["t_running"])
    assert (failed.info.status, failed.info.end_time) == ("FAILED", 5_000)
    assert failed.data.tags["svt.error"] == "ray.exceptions.OutOfMemoryError: Task was killed"


def test_a_studys_parent_run_has_its_params_whenever_study_json_names_it(tmp_path, mlflow_db):
    """The params were logged one call each after study.json: a first start stopped in
    between left a parent without its sweeps for good (the restore found study.json and went
    on), and `svt-ray compare` put every trial in one row. They go in one call before it, a
    start stopped there leaves neither, and a restore logs what its parent lacks."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import join_uri, read_json
    from svt_ray.studies import STUDY_FILE, _parent_run, _study_recipe

    options = StudyOptions(tracking_uri=f"sqlite:///{mlflow_db}", experiment="x")
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16))])
    study_dir = str(tmp_path / "s")
    recipe = _study_recipe(options, spec, [], budget=1000, grace=250)
    client = MlflowClient(options.tracking_uri)

    def parent() -> str:
        recorded = read_json(join_uri(study_dir, STUDY_FILE))
        return _parent_run(options, spec, study_dir, [], recipe, recorded, 1)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", stopped)
        with pytest.raises(KeyboardInterrupt):
            parent()
    assert read_json(join_uri(study_dir, STUDY_FILE)) is None
    experiment = client.get_experiment_by_name("x").experiment_id
    assert client.search_runs([experiment]) == []  # no parent left behind, RUNNING for good
    first = parent()
    assert client.get_run(first).data.params["sweep.optim.batch_size"] == "8,16"
    import sqlite3

    with sqlite3.connect(mlflow_db) as store:  # as a parent of a version that logged less
        store.execute("DELETE FROM params WHERE run_uuid = ? AND key = 'budget_clips'", (first,))
    assert "budget_clips" not in client.get_run(first).data.params
    assert parent() == first
    assert client.get_run(first).data.params["budget_clips"] == "1000"


def test_a_study_continues_only_with_the_recipe_it_was_started_with(tmp_path, mlflow_db):
    """Tune restores a study's recorded trials, so new seeds, grids, --set items or ASHA
    settings would be dropped without a word: they are refused, naming what changed. Where it
    runs (data, storage, tracking, cluster) may change; the parent run is RUNNING again."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import join_uri, read_json
    from svt_ray.studies import STUDY_FILE, _parent_run, _study_recipe

    options = StudyOptions(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="x")
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16))])
    study_dir, base = str(tmp_path / "s"), ["optim.epochs=2"]

    def parent(placement: str = "data.path=/a") -> str:
        recipe = _study_recipe(options, spec, base, budget=1000, grace=250)
        recorded = read_json(join_uri(study_dir, STUDY_FILE))  # as run_study reads it
        return _parent_run(options, spec, study_dir, [*base, placement], recipe, recorded, 3)

    first = parent()
    # Tune keeps the trials at once a study started with; study.json keeps the number too.
    from svt_ray.studies import trials_running

    started = read_json(join_uri(study_dir, STUDY_FILE))
    assert started["max_concurrent_trials"] == 3
    assert trials_running(started, restoring=True, concurrent=1) == 3
    assert trials_running(started, restoring=False, concurrent=1) == 1  # Tune starts anew
    assert trials_running({"recipe": {}}, restoring=True, concurrent=2) == 2  # older study.json
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
    base = ["optim.epochs=3", "optim.lr=1"]
    with pytest.raises(
        ConfigError,  # only what differs, by key
        match=r"other settings \(--set optim.epochs: 2 -> 3; --set optim.lr: \(not set\) -> 1\)",
    ):
        parent()
    base = ["eval.knn_k=5", "optim.epochs=2"]
    with pytest.raises(ConfigError, match=r"\(--set eval.knn_k: \(not set\) -> 5\)"):
        parent()
    (first_given,) = read_json(join_uri(study_dir, STUDY_FILE))["recipe"]["overrides"]
    base = ["optim.epochs=2", first_given, "optim.epochs=2"]  # the same, given again: no change
    assert parent() == first
    from svt_ray.studies import _override_changes

    assert _override_changes(["a=1", "b=2"], ["b=2", "a=1"]) == []  # another order: the same
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


def test_a_changed_flag_is_refused_before_the_data_is_read_or_ray_starts(tmp_path, monkeypatch):
    """The recipe's parts that need no data are compared first: a continued study with other
    seeds is refused at once, not after the data is checked (or made) and Ray has started."""
    from svt_ray import cluster
    from svt_ray.studies import STUDY_FILE, _study_base, _study_recipe

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16))])
    options = StudyOptions(
        storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        data_path=str(tmp_path / "no_such_data"),
    )  # fmt: skip
    recipe = _study_recipe(options, spec, _study_base(options, spec), 1000, 250)
    (tmp_path / "runs" / "s").mkdir(parents=True)
    (tmp_path / "runs" / "s" / STUDY_FILE).write_text(
        json.dumps({"recipe": recipe, "parent_run_id": "p"})
    )
    options.seeds = [0, 1]
    with pytest.raises(
        ConfigError, match=r"started with other settings \(seeds: \[0\] -> \[0, 1\]\)"
    ):
        run_study(spec, options)
    options.seeds = [0]  # the same flags: on to the data, which is missing
    with pytest.raises(ConfigError, match="no_such_data"):
        run_study(spec, options)


def test_a_finished_study_run_again_reports_from_mlflow_without_starting_ray(
    tmp_path, mlflow_db, monkeypatch, caplog
):
    """The same command after a study ended would start Ray and Tune (half a minute here) only
    to restore trials that all ended: it prints the report from MLflow instead. A study with
    a failed trial, or one that did not end, is restored (the failed trial is tried again)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray import cluster
    from svt_ray.studies import STUDY_FILE, _study_base, _study_recipe

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16))],
                     fixed=["eval.online_every_clips=50"], verdict=batch_size_verdict)  # fmt: skip
    options = StudyOptions(
        storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="x", workdir=str(tmp_path), asha=False,
    )  # fmt: skip
    client = MlflowClient(options.tracking_uri)
    experiment_id = client.create_experiment("x")
    parent = client.create_run(
        experiment_id, tags={"svt.study": "s", "svt.study_role": "parent"}
    ).info.run_id
    client.log_param(parent, "sweep.optim.batch_size", "8,16")
    client.log_param(parent, "budget_clips", "100")
    children = {}
    for batch, knn in ((8, 60.0), (16, 50.0)):
        run = client.create_run(experiment_id, tags={
            "mlflow.parentRunId": parent, "svt.study": "s", "svt.trial_id": f"t{batch}",
            "svt.seed": "0", "svt.sweep.optim.batch_size": str(batch),
        }).info.run_id  # fmt: skip
        client.log_batch(run, metrics=[Metric("online_knn_top1", v, 1_000 + c, c)
                                       for c, v in ((0, 30.0), (100, knn))])  # fmt: skip
        client.set_terminated(run, "FINISHED")
        children[batch] = run
    client.set_tag(parent, "svt.errored_trials", "0")  # Tune's count when the sweep ended
    client.set_terminated(parent, "FINISHED")
    recipe = _study_recipe(options, spec, _study_base(options, spec), 100, 25)
    (tmp_path / "runs" / "s").mkdir(parents=True)
    (tmp_path / "runs" / "s" / STUDY_FILE).write_text(
        json.dumps({"recipe": recipe, "parent_run_id": parent})
    )

    with caplog.at_level("INFO", logger="svt_ray.studies"):
        report = run_study(spec, options)
    assert "study s finished before, every trial with it" in caplog.text
    assert "another --name" in caplog.text
    assert {row["optim.batch_size"]: row["final_knn_top1"] for row in report.rows()} == {
        8: 60.0, 16: 50.0
    }  # fmt: skip
    assert report.verdict == batch_size_verdict(report)
    written = tmp_path / "runs" / "s" / "report" / "results.md"
    assert report.files["results.md"] == written and written.read_text() == report.markdown()
    # Flags that change the budget or ASHA's first rung: refused, not answered by the old report
    (tmp_path / "synthetic_videos").mkdir()
    (tmp_path / "synthetic_videos" / "synthetic.json").write_text('{"config": {"num_clips": 800}}')
    with pytest.raises(
        ConfigError, match=r"other settings \(--num-clips: 800 synthetic clips -> 900\)"
    ):
        run_study(spec, dataclasses.replace(options, num_clips=900))
    assert run_study(spec, dataclasses.replace(options, num_clips=700)).rows()  # 800 stay
    with_asha = dataclasses.replace(options, asha=True)
    recorded = {"recipe": _study_recipe(with_asha, spec, _study_base(with_asha, spec), 100, 25),
                "parent_run_id": parent}  # fmt: skip
    (tmp_path / "runs" / "s" / STUDY_FILE).write_text(json.dumps(recorded))
    assert run_study(spec, with_asha).rows()  # its grace: a quarter of the budget, as recorded
    with pytest.raises(ConfigError, match=r"other settings \(asha_grace_clips: 25 -> 50\)"):
        run_study(spec, dataclasses.replace(with_asha, asha_grace_clips=50))
    with pytest.raises(ConfigError, match=r"--asha-grace 0: give clips seen, 1 or more"):
        run_study(spec, dataclasses.replace(with_asha, asha_grace_clips=0))  # not "25 -> 0"
    (tmp_path / "runs" / "s" / STUDY_FILE).write_text(
        json.dumps({"recipe": recipe, "parent_run_id": parent})
    )

    client.set_terminated(children[16], "FAILED")  # tried again: Tune restores the study
    with pytest.raises(RayStarted):
        run_study(spec, options)
    client.set_terminated(children[16], "FINISHED")
    client.set_terminated(parent, "KILLED")  # a Ctrl-C'd study: continued
    with pytest.raises(RayStarted):
        run_study(spec, options)
    client.set_terminated(parent, "FINISHED")
    client.set_tag(parent, "svt.errored_trials", "1")  # an actor died: its run only KILLED
    with pytest.raises(RayStarted):
        run_study(spec, options)
    client.set_tag(parent, "svt.errored_trials", "0")
    client.delete_run(children[16])  # a trial without a run: the study runs it
    with pytest.raises(RayStarted):
        run_study(spec, options)


def test_a_studys_help_shows_its_grid_fixed_settings_and_asha(capsys):
    """--help showed the question only: what --grid replaces, what the budget is and where
    ASHA's first rung lies were in the script's source."""
    from svt_ray.studies import study_main

    terms = Sweep("terms", ({"loss.motion_weight": 0.0}, {"loss.motion_weight": 1.0}),
                  labels=("cross-view only", "both"))  # fmt: skip
    spec = StudySpec("s", "Do both terms matter?", [Sweep("views.local_frames", ([8], [2, 4])),
                     terms], fixed=["optim.epochs=8", "eval.online_every_clips=400",
                     "optim.epochs=5"], asha_grace_clips=1200)  # fmt: skip
    with pytest.raises(SystemExit) as exit_code:
        study_main(spec, ["--help"])
    assert exit_code.value.code == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(
        "the study's grid (--grid PATH=V1,V2, repeatable, replaces all of it):\n"
        "  views.local_frames: [8] | [2, 4]\n"
        "  terms: cross-view only (loss.motion_weight=0.0) | both\n"
        "    (loss.motion_weight=1.0)\n"  # wrapped at 78 columns, kept by the formatter
        "fixed settings of every trial (a --set of the key wins; of a swept path, refused):\n"
        "  optim.epochs=5 eval.online_every_clips=400\n"
        "early stopping (ASHA): on, first rung at 1200 clips seen (--asha-grace, --no-asha)"
    )


def test_the_help_of_a_study_that_sweeps_the_workers_does_not_offer_workers(capsys):
    """scaling.py's --help offered `--workers` ("Train workers per trial"), which it refuses."""
    from svt_ray.studies import study_main

    spec = StudySpec("s", "Does it scale?", [Sweep("scaling.num_workers", (1, 2))])
    with pytest.raises(SystemExit):
        study_main(spec, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--workers WORKERS this study sweeps scaling.num_workers: refused" in out
    assert "GPUs per Train worker (default: 0)" in out


def test_a_grid_of_other_paths_drops_the_studys_axis_label_and_says_so(monkeypatch, capsys):
    """`view_count.py --grid views.num_local=0,4` kept the question's "(0, 2, 4, 8) or a third
    global view" and the axis "views (G global + L local)" under num_local ticks."""
    from svt_ray import studies

    seen = []

    def stop(spec, options):
        seen.append((spec.question, spec.x_label))
        raise studies.ConfigError("stop here")

    monkeypatch.setattr(studies, "run_study", stop)
    views = Sweep("views", ({"views.num_local": 2}, {"views.num_local": 4}), labels=("a", "b"))
    spec = StudySpec("s", "How many views?", [views], x_label="views (G + L)")
    assert studies.study_main(spec, ["--grid=views.num_local=0,4"]) == 2
    assert seen[-1] == ("How many views? (this run's grid: views.num_local=0,4)", None)
    assert (spec.question, spec.sweeps) == ("How many views?", [views])  # the script's own
    locals_ = StudySpec("s", "q?", [Sweep("views.num_local", (2, 4))], x_label="local views")
    assert studies.study_main(locals_, ["--grid=views.num_local=0,8"]) == 2
    assert seen[-1][1] == "local views"  # the same paths: its label still fits
    # A sweep of several paths named after one of them: that path may be given
    named = Sweep("views.num_local", ({"views.num_local": 2, "views.num_global": 2},))
    assert studies.study_main(StudySpec("s", "q?", [named]), ["--grid=views.num_local=0"]) == 2
    assert seen[-1][0] == "q? (this run's grid: views.num_local=0)"
    # A sweep of several paths is named, not a path (an unknown key only after Ray started)
    capsys.readouterr()
    runs = len(seen)
    assert studies.study_main(spec, ["--grid", "views=a,b"]) == 2 and len(seen) == runs
    assert (
        "--grid views: the study's name for settings of several config paths "
        "(views.num_local), not a path itself; --grid takes config paths, e.g. --grid "
        "views.num_local=V1,V2" in capsys.readouterr().err
    )


def test_bad_seeds_are_a_flag_error_not_a_traceback(capsys):
    from svt_ray.studies import study_main

    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8,))])
    assert study_main(spec, ["--name", "a/b"]) == 2  # its trials' run names would hold the /
    assert "--name 'a/b': a study's folder name, without / or" in capsys.readouterr().err

    assert (
        study_main(StudySpec("s", "q", [Sweep("optim.batch_size", (8,))]), ["--seeds", "0,x"]) == 2
    )
    assert "--seeds 0,x: comma-separated integers" in capsys.readouterr().err
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8,))])
    assert study_main(spec, ["--seeds", "0,-1"]) == 2  # each trial's train.seed would refuse it
    assert "--seeds 0,-1: seeds are 0 or more" in capsys.readouterr().err


def test_bad_study_input_is_refused_before_ray_starts(tmp_path, capsys, caplog, monkeypatch):
    """Each of these passed every check before Ray and then failed every trial inside Tune, or
    ended in a traceback after Ray started and the synthetic data was made."""
    from svt_ray import cluster
    from svt_ray.studies import study_main

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    where = ["--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
             "--workdir", str(tmp_path / "work")]  # fmt: skip

    def refused(flags: list[str], said: str) -> None:
        spec = StudySpec("s", "q", [Sweep("views.num_local", (2, 4))],
                         fixed=["eval.online_every_clips=400"])  # fmt: skip
        assert study_main(spec, [*where, *flags]) == 2, flags  # the later flag wins
        assert said in capsys.readouterr().err, flags

    refused(
        ["--grid", "views.num_locl=0,2"], "no setting of study s's grid is valid: views.num_locl"
    )
    refused(["--grid", "views.num_local=0,2,"], "has an empty value (a comma too many?)")
    refused(
        ["--grid", "views.num_local=0", "--grid", "views.num_local=2"],
        "names views.num_local twice",
    )
    refused(["--seeds", "0,0"], "--seeds 0,0 repeats a seed")
    refused(["--max-concurrent", "0"], "--max-concurrent 0: give 1 or more")
    refused(["--num-clips", "0"], "--num-clips 0: give 1 or more")
    refused(["--asha-grace", "0"], "--asha-grace 0: give clips seen")
    refused(["--set", "eval.online_every_clips=0"], "studies compare online kNN curves")
    (tmp_path / "a_file").write_text("")  # a folder under a file: no user can make it
    refused(["--workdir", str(tmp_path / "a_file" / "w")], "/a_file/w: cannot write there")
    refused(["--tracking-uri", "sqlite://m.db"], "a SQLite store is sqlite:/// and its path")
    refused(["--storage", "s4://bucket/runs"], "s4://bucket/runs")
    # Some settings invalid: the study runs, they fail alone, and it is said which.
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 30))], fixed=[
        "eval.online_every_clips=400", "scaling.num_workers=4"])  # fmt: skip
    with caplog.at_level("WARNING", logger="svt_ray.studies"), pytest.raises(RayStarted):
        study_main(spec, where)
    assert 'setting {"optim.batch_size": 30} will fail: optim.batch_size=30' in caplog.text
    with caplog.at_level("WARNING", logger="svt_ray.studies"), pytest.raises(RayStarted):
        study_main(spec, [*where, "--no-asha", "--asha-grace", "400"])
    assert "--asha-grace is ignored without ASHA (--no-asha)" in caplog.text


def test_a_flag_for_a_swept_setting_is_refused_not_overridden_by_every_trial(tmp_path, capsys):
    """`studies/scaling.py --workers 4` ran 1 and 2 workers: each trial's swept value came
    after the flag. Coupled settings (one sweep moving two paths) count too. A study that
    recorded such a flag before the check continues with it."""
    from svt_ray.studies import _refuse_swept_overrides, study_main

    where = ["--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    scaling = StudySpec("scaling", "q", [Sweep("scaling.num_workers", (1, 2))])
    assert study_main(scaling, ["--workers", "4", *where]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --workers 4: study scaling sweeps scaling.num_workers itself "
        "(scaling.num_workers=1,2); drop it, or sweep other values with --grid "
        "scaling.num_workers=V1,V2"
    )
    coupled = {"loss.cross_view_weight": 1.0, "loss.motion_weight": 0.0}
    terms = StudySpec("terms", "q", [Sweep("terms", (coupled,), labels=("cross",))])
    assert study_main(terms, ["--set", "loss.motion_weight=1", *where]) == 2
    err = capsys.readouterr().err
    assert "--set loss.motion_weight=1: study terms sweeps loss.motion_weight itself (terms=" in err
    assert "--grid loss.motion_weight=V1,V2" in err
    _refuse_swept_overrides(scaling, ["scaling.num_workers=4"], ["scaling.num_workers=4"])


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


def test_an_error_after_a_trial_finished_does_not_mark_it_failed(tmp_path, mlflow_db):
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


def test_a_cluster_too_small_for_the_grid_is_named_and_max_concurrent_wins(caplog):
    """An autoscaling cluster (ray_cluster.yaml: workers from 0) holds little when the study
    starts, and Tune would keep the whole study that narrow: that is said, with the flag."""
    from svt_ray.config import load_config
    from svt_ray.studies import trials_at_once

    gpu = load_config("tiny", overrides=["scaling.num_workers=2", "scaling.gpus_per_worker=1"])
    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16, 32))])
    options = StudyOptions(seeds=[0, 1])
    head_only = {"CPU": 8}
    with caplog.at_level("WARNING", logger="svt_ray.studies"):
        assert trials_at_once(spec, options, gpu, head_only, on_cluster=True) == 1
    assert "1 of 6 trials at a time" in caplog.text and "0 GPUs" in caplog.text
    assert "holds 4.01 CPUs and 2 GPUs" in caplog.text and "--max-concurrent N" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="svt_ray.studies"):
        assert trials_at_once(spec, options, gpu, {"CPU": 64, "GPU": 16}, on_cluster=True) == 6
        assert trials_at_once(spec, options, gpu, head_only, on_cluster=False) == 1  # a laptop
        options.max_concurrent_trials = 3
        assert trials_at_once(spec, options, gpu, head_only, on_cluster=True) == 3
    assert not caplog.text
    spec.exclusive = True  # a timing study runs alone whatever is given
    assert trials_at_once(spec, options, gpu, {"CPU": 64, "GPU": 16}, on_cluster=True) == 1


def test_trials_that_share_the_cpus_decode_on_their_share_of_them(caplog):
    """Uncapped, each trial's decode pool grows into every free CPU, and a trial that starts
    next waits for its Train workers' CPUs: trials run together get a share each."""
    from svt_ray.config import load_config
    from svt_ray.studies import cpus_per_trial, decode_actor_cap, trial_config_for

    options = StudyOptions()
    assert cpus_per_trial(options, {"CPU": 16}, 1, on_cluster=False) is None  # alone: all free
    assert cpus_per_trial(options, {"CPU": 16}, 3, on_cluster=False) == pytest.approx(16 / 3)
    assert cpus_per_trial(options, {"CPU": 64}, 4, on_cluster=True) == 16
    options.max_concurrent_trials = 4  # an autoscaling cluster adds nodes for what they ask
    assert cpus_per_trial(options, {"CPU": 8}, 4, on_cluster=True) is None
    assert cpus_per_trial(options, {"CPU": 8}, 4, on_cluster=False) == 2

    two = load_config("tiny", overrides=["scaling.num_workers=2"])  # 2 + decode 1 + read 1
    assert decode_actor_cap(two, None) is None
    assert decode_actor_cap(two, 16 / 3) == 2  # 5.33 - 4.01 held + the 1 decode CPU counted
    assert decode_actor_cap(two, 4.01) == 1 and decode_actor_cap(two, 2) == 1  # never 0
    wide = load_config("tiny", overrides=["scaling.num_workers=2", "data.decode_cpus=2"])
    assert decode_actor_cap(wide, 12) == 4  # 2 workers + 4 x 2 decode + 1 read <= 12
    chosen = load_config("tiny", overrides=["scaling.num_workers=2", "data.decode_actors=6"])
    assert decode_actor_cap(chosen, 16 / 3) is None  # the user's (or the grid's) value stands

    trial = {"study": "s", "preset": "tiny", "base": ["scaling.num_workers=2"], "seed": 0,
             "sweep": {"optim.batch_size": 8}}  # fmt: skip
    placement = {"data.path": "/data"}
    with caplog.at_level("INFO", logger="svt_ray.studies"):
        config = trial_config_for(trial, placement, "t1", 16 / 3)
    assert config.data.decode_actors == 2 and config.optim.batch_size == 8
    assert config.train.run_name == "s-t1" and config.data.path == "/data"
    assert "trial t1: 2 decode actor(s)" in caplog.text and "data.decode_actors" in caplog.text
    assert trial_config_for(trial, placement, "t1").data.decode_actors is None


def test_a_restored_study_says_it_keeps_its_recorded_concurrency(caplog):
    """Tune restores max_concurrent_trials with the study (Ray 2.60 keeps it in the restored
    Tuner's tune config, and its grid generator's state); --max-concurrent cannot change it."""
    from types import SimpleNamespace

    from svt_ray.studies import _note_restored_concurrency

    spec = StudySpec("s", "q", [Sweep("optim.batch_size", (8, 16))])

    def restored(recorded: int):
        config = SimpleNamespace(max_concurrent_trials=recorded)
        return SimpleNamespace(_local_tuner=SimpleNamespace(_tune_config=config))

    with caplog.at_level("WARNING", logger="svt_ray.studies"):
        _note_restored_concurrency(spec, restored(4), 4)
        assert not caplog.text
        _note_restored_concurrency(spec, restored(8), 2)
    assert "continues with 8 trials at a time" in caplog.text and "2 would suit" in caplog.text
    assert "wait for it, up to train.wait_for_workers_s" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="svt_ray.studies"):
        _note_restored_concurrency(spec, restored(1), 4)  # fewer: slower, nothing fails
    assert "continues with 1 trials" in caplog.text and "wait_for_workers_s" not in caplog.text


def test_trial_drivers_stay_on_the_node_that_declares_the_driver_resource():
    """ray_cluster.yaml's on-demand head declares TRAIN_DRIVER; a trial's driver (and the Train
    controller Ray pins to it) asks for a sliver of it there, and only there."""
    import yaml

    from svt_ray.studies import DRIVER_RESOURCE, TRIAL_DRIVER_CPUS, trial_driver_resources

    assert trial_driver_resources({"CPU": 2}) == {"CPU": TRIAL_DRIVER_CPUS}  # a laptop
    assert trial_driver_resources({"CPU": 8, DRIVER_RESOURCE: 1000}) == {
        "CPU": TRIAL_DRIVER_CPUS, DRIVER_RESOURCE: TRIAL_DRIVER_CPUS,
    }  # fmt: skip
    node_types = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())["available_node_types"]
    declares = {name for name, t in node_types.items() if DRIVER_RESOURCE in t["resources"]}
    assert declares == {"head"}
    assert "InstanceMarketOptions" not in node_types["head"]["node_config"]  # on demand


def test_the_local_instance_is_sized_for_the_largest_valid_trial():
    from svt_ray.cluster import cpus_per_run
    from svt_ray.studies import largest_trial

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
