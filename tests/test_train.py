"""Pretraining on Ray Train: MLflow record, exact resume, divergence, the local command."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from factories import SHORT_RUN

from svt_ray import train as train_module
from svt_ray.cluster import cpus_per_run, local_ray_cpus
from svt_ray.config import ConfigError, load_config
from svt_ray.evaluate import evaluate_backbones, load_state
from svt_ray.runs import PROGRESS_FILE
from svt_ray.train import RunStoppedError, TrainingDivergedError, run_pretraining

pytestmark = pytest.mark.ray


def experiment(tmp_path: Path, shards: Path, *overrides: str):
    return load_config(
        "tiny",
        overrides=[
            *SHORT_RUN,
            f"data.path={shards}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ],
    )


def mlflow_client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


# Two workers, two decode actors, a shuffle buffer and online kNN: the recipe of the MLflow
# test's run, which the test of a run repeated with its seed runs again (one run of 2 workers
# takes a minute on 2 cores).
TWO_WORKERS = (
    "scaling.num_workers=2",
    "data.decode_actors=2",
    "data.shuffle_buffer=16",
    "eval.online_every=3",
    "eval.clip_size=32",
)


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, synthetic_shards, ray_session, mlflow_server):
    """Recorded through a real `mlflow server` (server mode); SQLite is the other tests' store.
    The data is named by a relative path, as the quick tour does: each Ray Train worker runs in
    a working directory of its own, where the online kNN found no dataset."""
    root = tmp_path_factory.mktemp("two_workers")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(synthetic_shards.parent)
        config = experiment(
            root,
            synthetic_shards,
            *TWO_WORKERS,
            f"data.path={synthetic_shards.name}",
            "train.run_name=two",
            f"tracking.tracking_uri={mlflow_server}",
        )
        return run_pretraining(config)


# Stochastic depth and a frozen last layer too: state a resume must restore or recompute
# (torch's global generator, the freeze's end), which the tiny preset leaves out.
DETERMINISTIC = (
    "data.deterministic=true", "train.max_failures=0", "model.drop_path_rate=0.2",
    "optim.freeze_last_layer_epochs=1",
)  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_shards, ray_session, empty_mlflow_store):
    """One worker, deterministic data, no restarts: the uninterrupted run that a resumed one
    must end equal to, and a checkpoint to evaluate."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copyfile(empty_mlflow_store, root / "mlflow.db")
    config = experiment(root, synthetic_shards, *DETERMINISTIC, "train.run_name=whole")
    return run_pretraining(config)


def test_two_worker_run_is_recorded_in_mlflow(two_worker_run, synthetic_shards, mlflow_server):
    result = two_worker_run
    assert result.config.data.path == str(synthetic_shards)
    steps = result.config.derived.total_steps
    assert Path(result.checkpoint_path, "state.pt").is_file()
    assert load_state(result.checkpoint_path)["step"] == steps

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert run.data.params["optim.batch_size"] == "4"
    assert run.data.params["derived.per_worker_batch"] == "2"
    assert run.data.tags["svt.world_size"] == "2" and run.data.tags["svt.preset"] == "tiny"
    assert len(run.data.tags["svt.dataset_checksum"]) == 16
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [4 * (i + 1) for i in range(steps)]  # MLflow step = clips
    for name in ("clips_seen", "lr", "collapse", "teacher_entropy", "grad_norm",
                 "data_wait_fraction", "clips_per_s", "loss_cross_view", "loss_motion"):  # fmt: skip
        assert len(client.get_metric_history(run.info.run_id, name)) == steps, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "training_curves.png"} <= artifacts
    # Online kNN: at the start, every 3 steps and at the end, on rank 0, also reported to Ray.
    online = client.get_metric_history(run.info.run_id, "online_knn_top1")
    assert [m.step for m in online] == [0, 12, 24] and steps == 6
    assert all(0.0 <= m.value <= 100.0 for m in online)
    assert result.metrics["online_knn_top1"] == online[-1].value
    # ...and it is the kNN of the final teacher, recomputed here from the checkpoint.
    from svt_ray.evaluate import OnlineKNN
    from svt_ray.export import backbone_state
    from svt_ray.model import build_backbone

    backbone = build_backbone(result.config)
    backbone.load_state_dict(backbone_state(load_state(result.checkpoint_path)))
    again_knn = OnlineKNN.from_config(result.config)  # the clips its driver decoded for it:
    decoded = Path(result.config.train.storage_path, OnlineKNN.CACHE_FOLDER).glob("*/clips.json")
    assert sorted(p.parent.name for p in decoded) == sorted(
        Path(folder).name for folder in OnlineKNN.cache_folders(result.config).values()
    )
    again = again_knn(backbone)
    assert again.top1 == pytest.approx(online[-1].value)
    # The clips it scored, as the data allowed (the params hold what was asked for).
    assert run.data.tags["svt.online_knn_query_clips"] == str(len(again_knn.query["label"]))
    assert run.data.tags["svt.online_knn_bank_clips"] == str(len(again_knn.bank["label"]))
    lines = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps + 1 and json.loads(lines[-1])["clips_seen"] == 4 * steps
    # One training session, as a study's report reads the steps' wall times: it began after
    # the run started (Ray Train's start-up is not training time) and ends at the last step.
    from svt_ray.study_report import _training_sessions

    wall = client.get_metric_history(run.info.run_id, "wall_time_s")
    ((began, last),) = _training_sessions(wall)
    assert run.info.start_time < began < min(m.timestamp for m in wall)
    assert last == max(m.timestamp for m in wall) and len(wall) == steps


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path, mlflow_db, synthetic_shards, ray_session, finished_run, monkeypatch
):
    whole = finished_run
    interrupted = experiment(tmp_path, synthetic_shards, *DETERMINISTIC, "train.run_name=cut")
    with pytest.raises(RunStoppedError, match=r"failed more than train.max_failures=0 times"):
        run_pretraining(interrupted, fail_at_step=3)  # the worker is killed at step 3
    run_dir = tmp_path / "runs" / "cut"
    assert (run_dir / "injected_failure_3.json").exists()  # and not by another error
    progress = json.loads((run_dir / PROGRESS_FILE).read_text())
    assert progress["step"] == 2  # the checkpoint before the failure
    # As if the run had stopped after rank 0 saved checkpoint 2 but before Ray Train
    # registered it (Ctrl-C then): neither Ray Train's record nor progress.json names it.
    # The resume started over from step 0 and wrote over it.
    (run_dir / PROGRESS_FILE).unlink()
    (run_dir / "checkpoint_manager_snapshot.json").unlink()
    resumed = run_pretraining(interrupted, resume=True)
    assert (
        mlflow_client(tmp_path).get_run(resumed.mlflow_run_id).data.tags["svt.resumed_at_step"]
        == "2"
    )
    # Ray Train prunes the checkpoints it registered (keep 2); the adopted one goes too.
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000004", "checkpoint_00000006",
    ]  # fmt: skip
    a, b = load_state(whole.checkpoint_path), load_state(resumed.checkpoint_path)
    assert a["step"] == b["step"]
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), name  # same data, same steps: bit for bit

    # Resuming the finished run again trains nothing and starts no Ray Train workers.
    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run started Ray Train")

    monkeypatch.setattr(train_module, "TorchTrainer", no_trainer)
    again = run_pretraining(interrupted, resume=True)
    assert again.already_finished and not resumed.already_finished
    assert again.checkpoint_path == resumed.checkpoint_path
    assert again.mlflow_run_id == resumed.mlflow_run_id
    assert again.metrics["step"] == b["step"]
    status = mlflow_client(tmp_path).get_run(again.mlflow_run_id).info.status
    assert status == "FINISHED"
    # Ctrl-C as the last checkpoint was saved: marked KILLED, its last checkpoint unregistered.
    # The run is finished all the same; a resume said "no checkpoint yet" and trained it again.
    (run_dir / PROGRESS_FILE).unlink()
    mlflow_client(tmp_path).set_terminated(again.mlflow_run_id, "KILLED")
    last = run_pretraining(interrupted, resume=True)
    assert last.already_finished and last.checkpoint_path == resumed.checkpoint_path
    status = mlflow_client(tmp_path).get_run(again.mlflow_run_id).info.status
    assert status == "FINISHED"


def test_a_run_repeated_with_its_seed_ends_with_the_same_weights(
    tmp_path, mlflow_db, synthetic_shards, ray_session, two_worker_run
):
    """Shuffled files, a shuffle buffer, two decode actors and two workers: with
    data.preserve_order (the default) the same seed gives the same batches, so the same
    weights, bit for bit (without it, the first blocks come in the order their reads finish).
    The repeat is tracked elsewhere (SQLite) and names its data by absolute path: neither may
    change what is trained."""
    again = run_pretraining(
        experiment(tmp_path, synthetic_shards, *TWO_WORKERS, "train.run_name=repeat")
    )
    a, b = (load_state(run.checkpoint_path) for run in (two_worker_run, again))
    assert a["step"] == b["step"] > 0
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), f"{key}.{name}"


# A worker lost mid-run (FailureConfig restart from the last registered checkpoint, each step
# logged once) is tested where it is most likely: tests/test_multinode.py kills a node; the
# S3 test kills rank 1 with max_failures=0 and resumes.


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(
    tmp_path, mlflow_db, synthetic_shards, ray_session
):
    config = experiment(
        tmp_path, synthetic_shards, "train.run_name=diverge", "optim.base_lr=1e12",
        "optim.warmup_epochs=0", "optim.clip_grad=0", "train.checkpoint_every=1",
    )  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"the loss is (nan|inf).*last good checkpoint"):
        run_pretraining(config)
    run_dir = tmp_path / "runs" / "diverge"
    diverged = json.loads((run_dir / "diverged.json").read_text())
    progress = json.loads((run_dir / PROGRESS_FILE).read_text())
    assert progress["step"] == diverged["step"]  # checkpoints up to the last finite step
    checkpoints = sorted(run_dir.glob("checkpoint_0*"))
    state = load_state(str(checkpoints[-1]))
    assert all(torch.isfinite(t).all() for t in state["student"].values())


def test_evaluation_of_a_checkpoint_and_random_init(synthetic_shards, finished_run, monkeypatch):
    """Every row, and the same rows whatever order the decode actors return the clips in: the
    kNN and the linear probe get their rows in clip order (the probe's result depends on it).
    The second evaluation replays the first one's features in reverse instead of running the
    pipeline again; that two real evaluations agree is the demo test's last check."""
    from svt_ray import data
    from svt_ray import evaluate as evaluate_module

    result = finished_run
    arrivals, scored = [], []
    infer, score = data.run_batch_inference, evaluate_module.evaluate_features

    def recorded_inference(*args, **kwargs):
        arrivals.append(infer(*args, **kwargs))
        return arrivals[-1]

    def recorded_scoring(name, train_x, train_labels, test_x, *args):
        scored.append((name, train_x, train_labels, test_x))
        return score(name, train_x, train_labels, test_x, *args)

    def evaluate():
        return evaluate_backbones(
            result.config,
            {"learned": result.checkpoint_path, "random": None},
            str(synthetic_shards),
            pixel_baseline=True,
        )

    monkeypatch.setattr(data, "run_batch_inference", recorded_inference)
    monkeypatch.setattr(evaluate_module, "evaluate_features", recorded_scoring)
    rows = evaluate()
    names = [row.name for row in rows]
    assert names == ["learned", "learned slow-fast", "random", "random slow-fast", "frame pixels"]
    for row in rows:
        assert 0.0 <= row.knn.top1 <= row.knn.top5 <= 100.0
    assert len(arrivals) == 2  # the kNN bank's split and the queries'
    replayed = iter(arrivals)

    def reversed_rows(*args, **kwargs):
        return {key: values[::-1].copy() for key, values in next(replayed).items()}

    monkeypatch.setattr(data, "run_batch_inference", reversed_rows)
    assert [row.row() for row in evaluate()] == [row.row() for row in rows]
    half = len(scored) // 2
    assert half == len(rows)
    for first, again in zip(scored[:half], scored[half:], strict=True):
        assert first[0] == again[0]
        for a, b in zip(first[1:], again[1:], strict=True):
            assert torch.equal(a, b), first[0]


def test_asking_local_ray_for_gpus_it_lacks_fails_at_once(
    tmp_path, mlflow_db, synthetic_shards, ray_session
):
    """Not after train.wait_for_workers_s (64 GPUs: more than any test machine has)."""
    config = experiment(
        tmp_path, synthetic_shards, "train.run_name=gpu", "scaling.gpus_per_worker=64"
    )
    with pytest.raises(
        ConfigError, match=r"need 64 GPU\(s\), and the local Ray instance has [0-9]"
    ):
        run_pretraining(config)
    assert not (tmp_path / "runs" / "gpu").exists()  # nothing recorded for a run that never ran
    experiment_ = mlflow_client(tmp_path).get_experiment_by_name(config.tracking.experiment)
    assert experiment_ is None or not mlflow_client(tmp_path).search_runs(
        [experiment_.experiment_id]
    )


def test_a_local_ray_instance_has_room_for_the_workers_and_the_data(monkeypatch):
    two_workers = load_config("tiny", overrides=["scaling.num_workers=2"])
    assert cpus_per_run(two_workers) == 2 + 1 + 1  # workers, decode actor, read tasks
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert local_ray_cpus(cpus_per_run(two_workers)) == 4  # more logical CPUs than cores
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local_ray_cpus(cpus_per_run(two_workers)) == 16


def test_a_local_ray_gets_the_local_environment_unless_the_user_set_it(monkeypatch):
    from svt_ray import cluster

    seen, cpus = [], []

    def init(**kwargs):
        seen.append(dict(os.environ))
        cpus.append(kwargs["num_cpus"])

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", init)
    monkeypatch.setattr(cluster, "check_cluster_answers", lambda *a, **k: None)  # no host "head"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (name, value), *_ = cluster.LOCAL_RAY_ENV.items()
    monkeypatch.delenv(name, raising=False)
    cluster.ensure_ray("ray://head:10001")  # a cluster keeps Ray's defaults
    assert name not in seen[-1]
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # a `ray job submit` job: the same,
    cluster.ensure_ray(None, num_cpus=2)  # and no num_cpus, which ray.init refuses there
    assert name not in seen[-1] and cpus[-1] is None
    monkeypatch.delenv("RAY_ADDRESS")
    cluster.ensure_ray(None, num_cpus=2)  # a local Ray that svt-ray starts
    assert seen[-1][name] == value and cpus[-1] == 2
    monkeypatch.setenv(name, "3")
    cluster.ensure_ray(None, num_cpus=2)
    assert seen[-1][name] == "3"


def test_a_started_pass_yields_every_batch_once_and_raises_what_fetching_raised():
    from svt_ray.train import _StartedPass

    fetched = []

    def batches(n, error=None):
        for i in range(n):
            fetched.append(i)
            yield i
        if error is not None:
            raise error

    started = _StartedPass(batches(3))
    started._thread.join()
    assert fetched == [0]  # the first batch is asked for before anyone iterates
    assert list(started) == [0, 1, 2]
    assert list(_StartedPass(batches(0))) == []
    with pytest.raises(ValueError, match="bad shard"):  # raised while fetching the first
        list(_StartedPass(batches(0, ValueError("bad shard"))))
    with pytest.raises(OSError, match="late"):  # after the first batch: raised as usual
        list(_StartedPass(batches(2, OSError("late"))))


@pytest.mark.slow
def test_the_pretrain_command_starts_a_local_ray_and_ctrl_c_ends_the_run_at_its_checkpoints(
    tmp_path, synthetic_shards, private_ray_env
):
    """`svt-ray pretrain` without --address, 2 workers: on a 2-core machine Ray Data's read
    tasks used to get no CPU and the run waited forever. Then SIGINT: exit status 130, the
    MLflow run KILLED (it stayed RUNNING), and the command that continues it (the command
    printed nothing and exited 1). A run's normal end is tested in process (the demo, S3)
    and through a command on a cluster (test_multinode.py)."""
    import signal

    from mlflow.tracking import MlflowClient

    runs, database = tmp_path / "runs", tmp_path / "mlflow.db"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "svt-ray"), "pretrain", "--preset", "tiny",
         "--workers", "2", "--data", str(synthetic_shards), "--storage", str(runs),
         "--run-name", "local", "--tracking-uri", f"sqlite:///{database}",
         *[flag for setting in [*SHORT_RUN, "optim.epochs=100"] for flag in ("--set", setting)]],
        env=private_ray_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (runs / "local" / PROGRESS_FILE).exists() and time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=180)
    assert process.returncode == 130, out[-3000:] + err[-3000:]
    assert "300 steps; checkpoints every 2 steps and at the end in " in err
    assert "run 'local' interrupted. It keeps checkpoints up to step " in err
    assert f"`svt-ray pretrain --resume local --storage {runs}`" in err
    step = json.loads((runs / "local" / PROGRESS_FILE).read_text())["step"]
    assert 2 <= step < 300  # stopped mid-run, at a checkpoint it keeps
    assert (runs / "local" / f"checkpoint_{step:08d}" / "state.pt").is_file()
    assert "local step 1/300 (0%) | epoch 0.33 | loss " in out  # rank 0's first line
    assert "row/s" not in out + err  # no Ray Data bar redrawn into a file
    assert "Reporting training result" not in out + err  # Ray's 600-char lines
    client = MlflowClient(f"sqlite:///{database}")
    (run,) = client.search_runs([client.get_experiment_by_name("svt-ray").experiment_id])
    assert run.info.status == "KILLED"


def test_a_workers_read_only_batches_bring_no_warning_of_writes():
    """One worker's batches come on read-only Arrow memory: torch's warning of writes that
    never come was in the log of every single-worker run."""
    import warnings

    import numpy as np

    array = np.zeros(4, dtype=np.uint8)
    array.flags.writeable = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_module._quiet_read_only_batches()
        torch.as_tensor(array)
    assert caught == []


def test_run_json_keeps_the_tracking_uri_as_given_not_its_cluster_address(
    tmp_path, empty_mlflow_store
):
    """On a cluster the driver reaches the store at the head's address; a resume on another
    cluster must find the store the user named, so run.json records that one."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import RUN_FILE, start_mlflow_run

    given = f"sqlite:///{tmp_path / 'given.db'}"
    reached = f"sqlite:///{tmp_path / 'reached.db'}"  # stands for http://HEAD-IP:5000
    shutil.copyfile(empty_mlflow_store, tmp_path / "reached.db")
    overrides = [f"tracking.tracking_uri={given}", f"train.storage_path={tmp_path / 'runs'}"]
    config = load_config("tiny", overrides=overrides).resolve(64)
    run_dir = tmp_path / "runs" / "r"
    run_id = start_mlflow_run(config, "r", str(run_dir), "sum", None, None, tracking_uri=reached)
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["config"]["tracking"]["tracking_uri"] == given
    assert MlflowClient(reached).get_run(run_id).info.run_name == "r"  # created where reached


def test_the_password_of_a_tracking_uri_stays_out_of_the_mlflow_store(tmp_path, empty_mlflow_store):
    """Whoever reads the store sees the run's params and config.yaml: the tracking URI's
    password is masked there; run.json, in the run's own storage, keeps the URI whole."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import RUN_FILE, start_mlflow_run

    given = "http://svt:s3cret@127.0.0.1:5000"
    reached = f"sqlite:///{tmp_path / 'reached.db'}"
    shutil.copyfile(empty_mlflow_store, tmp_path / "reached.db")
    overrides = [f"tracking.tracking_uri={given}", f"train.storage_path={tmp_path / 'runs'}"]
    config = load_config("tiny", overrides=overrides).resolve(64)
    run_dir = tmp_path / "runs" / "r"
    run_id = start_mlflow_run(config, "r", str(run_dir), "sum", None, None, tracking_uri=reached)
    client = MlflowClient(reached)
    params = client.get_run(run_id).data.params
    assert params["tracking.tracking_uri"] == "http://svt:***@127.0.0.1:5000"
    assert "s3cret" not in " ".join(params.values())
    recorded = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "svt:***@127.0.0.1" in recorded and "s3cret" not in recorded
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["config"]["tracking"]["tracking_uri"] == given


def test_a_new_run_does_not_inherit_the_metrics_of_a_deleted_one(tmp_path, mlflow_db, monkeypatch):
    """A run directory deleted and a run of the same name started again: the metrics.jsonl
    left in its local log directory (remote storage: a temporary folder) is moved aside, or
    the new run's tracker would take its steps for logged ones and send them to MLflow."""
    from svt_ray.runs import local_log_directory, start_mlflow_run
    from svt_ray.tracking import METRICS_FILE

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    runs = f"file://{tmp_path}/bucket/runs"
    overrides = [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"train.storage_path={runs}"]  # fmt: skip
    config = load_config("tiny", overrides=overrides).resolve(64)
    log_dir = local_log_directory(config, "r")
    log_dir.mkdir(parents=True)
    (log_dir / METRICS_FILE).write_text('{"clips_seen": 400, "time": 1.0, "loss": 3.0}\n')
    start_mlflow_run(config, "r", f"{runs}/r", "sum", None, None)
    assert not (log_dir / METRICS_FILE).exists()
    (old,) = log_dir.glob(f"{METRICS_FILE}.*.old")
    assert "400" in old.read_text()


def test_a_run_whose_run_json_cannot_be_written_is_not_left_running(
    tmp_path, mlflow_db, monkeypatch
):
    """A storage that refused run.json after the MLflow run was made left it RUNNING for good
    (no run.json names it, so nothing would ever close it)."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import start_mlflow_run

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # metrics.jsonl of a URI
    uri = f"sqlite:///{mlflow_db}"
    (tmp_path / "a_file").write_text("")
    runs = f"file://{tmp_path}/a_file/runs"  # under a file: no folder can be made there
    config = load_config(
        "tiny", overrides=[f"tracking.tracking_uri={uri}", f"train.storage_path={runs}"]
    ).resolve(64)
    with pytest.raises(OSError):
        start_mlflow_run(config, "r", f"{runs}/r", "sum", None, None)
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name(config.tracking.experiment).experiment_id]
    )
    assert run.info.status == "FAILED"


def test_a_run_whose_store_did_not_take_its_params_is_not_recorded(tmp_path, mlflow_db):
    """The store stopped answering after the run was made: its params and config.yaml were
    dropped at the flush timeout, run.json named the run all the same, and a resume logged
    nothing again: a run without its recipe in every comparison. It does not start."""
    from mlflow.tracking import MlflowClient

    from svt_ray import runs as runs_module
    from svt_ray.runs import RUN_FILE, start_mlflow_run
    from svt_ray.tracking import TrackingUnavailableError

    uri = f"sqlite:///{mlflow_db}"
    runs = str(tmp_path / "runs")
    config = load_config("tiny", overrides=[
        f"tracking.tracking_uri={uri}", f"train.storage_path={runs}",
        "tracking.flush_timeout_s=0.5",
    ]).resolve(64)  # fmt: skip

    def refused(*args, **kwargs):
        raise ConnectionError("Connection refused")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", refused)
        patch.setattr(MlflowClient, "log_text", refused)
        patch.setattr(runs_module, "START_FLUSH_FLOOR_S", 0.5)
        with pytest.raises(
            TrackingUnavailableError, match=r"not take the params and config\.yaml of"
        ):
            start_mlflow_run(config, "r", f"{runs}/r", "sum", None, None)
    assert not Path(runs, "r", RUN_FILE).exists()
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name(config.tracking.experiment).experiment_id]
    )
    assert run.info.status == "FAILED"
    # The store answers; a flush timeout of 0 (give up on an outage's values at the end) still
    # lets the start wait for its params (it had refused every start).
    config.tracking.flush_timeout_s = 0
    again = start_mlflow_run(config, "r", f"{runs}/r", "sum", None, None)
    assert again != run.info.run_id
    assert MlflowClient(uri).get_run(again).data.params["optim.batch_size"] == str(
        config.optim.batch_size
    )


def test_a_rerun_of_a_run_with_no_checkpoint_records_its_own_recipe(tmp_path, mlflow_db):
    """An attempt that ended before its first checkpoint left run.json: a new run of that name
    with another recipe starts anew (new MLflow run, its run.json), or a later --resume would
    train with the old recipe; the same recipe, or a run with checkpoints, keeps its run."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import PROGRESS_FILE, RUN_FILE, read_json, start_mlflow_run, write_json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = str(tmp_path / "runs")

    def start(*overrides: str) -> str:
        config = load_config(
            "tiny",
            overrides=[f"tracking.tracking_uri={uri}", f"train.storage_path={runs}", *overrides],
        ).resolve(64)
        return start_mlflow_run(config, "r", f"{runs}/r", "sum", None, None)

    first = start("optim.batch_size=32")
    assert start("optim.batch_size=32", "scaling.num_workers=2") == first  # how it runs
    second = start("optim.epochs=6")
    assert second != first
    assert MlflowClient(uri).get_run(first).info.status == "KILLED"
    recorded = read_json(f"{runs}/r/{RUN_FILE}")
    assert recorded["mlflow_run_id"] == second and recorded["config"]["optim"]["epochs"] == 6
    write_json(f"{runs}/r/{PROGRESS_FILE}", {"step": 2})  # a checkpoint: the run is kept
    assert start("optim.epochs=7") == second


def test_a_trial_whose_driver_died_before_recording_its_run_goes_on_in_that_run(
    tmp_path, mlflow_db
):
    """A study driver killed between creating a trial's MLflow run and writing run.json: the
    restored trial continues in that child run, not in a second one next to an empty one."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import RUN_FILE, read_json, start_mlflow_run
    from svt_ray.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(
        "tiny", overrides=[f"tracking.tracking_uri={uri}", f"train.storage_path={tmp_path}"]
    ).resolve(64)
    client = MlflowClient(uri)
    # Its artifacts beside the database, as the runs' experiment has them: MLflow's default,
    # ./mlruns, would be the folder pytest runs in.
    experiment = experiment_id(client, config.tracking.experiment, uri)
    parent = client.create_run(experiment).info.run_id
    trial = {"svt.trial_id": "t1", "svt.study": "s"}
    orphan = client.create_run(experiment, tags={"mlflow.parentRunId": parent, **trial}).info.run_id
    client.set_terminated(orphan, "KILLED")  # the study's closer ended it
    assert start_mlflow_run(config, "r", f"{tmp_path}/r", "sum", parent, trial) == orphan
    assert read_json(f"{tmp_path}/r/{RUN_FILE}")["mlflow_run_id"] == orphan
    other = start_mlflow_run(config, "q", f"{tmp_path}/q", "sum", parent, {"svt.trial_id": "t2"})
    assert other != orphan  # another trial: a run of its own


def test_the_resumed_run_is_found_where_set_says_and_keeps_its_name(tmp_path):
    from svt_ray.config import ConfigError
    from svt_ray.runs import RUN_FILE, recorded_config, write_json

    runs = tmp_path / "elsewhere"
    config = load_config("tiny", overrides=[f"train.storage_path={runs}"]).resolve(64)
    write_json(str(runs / "r" / RUN_FILE), {"mlflow_run_id": "x", "config": config.model_dump(mode="json")})  # fmt: skip
    resumed = recorded_config("r", "svt_runs", [f"train.storage_path={runs}"])
    assert resumed.train.storage_path == str(runs)
    with pytest.raises(
        ConfigError,
        match=r"a resumed run keeps its name; drop --run-name / --set train\.run_name=s",
    ):
        recorded_config("r", str(runs), ["train.run_name=s"])


def test_a_resume_on_other_data_is_refused_if_its_schedule_would_change(tmp_path, caplog):
    from svt_ray.config import ConfigError
    from svt_ray.runs import RUN_FILE, check_resumed_data, read_json, write_json

    run_dir = str(tmp_path / "r")
    started = load_config("tiny").resolve(64)
    record = {"mlflow_run_id": "x", "config": started.model_dump(mode="json")}
    write_json(f"{run_dir}/{RUN_FILE}", {**record, "dataset_checksum": "aaaa"})
    recorded = read_json(f"{run_dir}/{RUN_FILE}")
    check_resumed_data(load_config("tiny").resolve(64), "r", recorded, "aaaa")  # moved: fine
    assert not caplog.text
    check_resumed_data(load_config("tiny").resolve(64), "r", recorded, "bbbb")
    assert "resumes on other data than it started with" in caplog.text
    with pytest.raises(ConfigError, match="holds 80 training clips, the run started with 64"):
        check_resumed_data(load_config("tiny").resolve(80), "r", recorded, "bbbb")


def test_a_run_with_checkpoints_continues_only_with_its_own_recipe(tmp_path):
    """The demo runs under a fixed name in its --workdir: `svt-ray demo --set train.seed=1`
    in a used folder reported the seed-0 checkpoint against a seed-1 random init. A recipe
    other than the recorded one is refused; where and how it runs may differ, and a setting
    the record lacks (added by a later version) is not compared."""
    from svt_ray.config import ConfigError
    from svt_ray.runs import RUN_FILE, check_resumed_recipe, read_json, write_json

    run_dir = str(tmp_path / "demo")
    recorded = load_config("tiny").resolve(64).model_dump(mode="json")
    del recorded["data"]["prefetch_batches"]  # a record from before that setting existed
    write_json(f"{run_dir}/{RUN_FILE}", {"mlflow_run_id": "x", "config": recorded})
    record = read_json(f"{run_dir}/{RUN_FILE}")
    check_resumed_recipe(load_config("tiny", overrides=["scaling.num_workers=2"]).resolve(64),
                          "demo", record)  # fmt: skip
    with pytest.raises(ConfigError, match=r"another recipe \(train.seed: 0 -> 1\)"):
        check_resumed_recipe(load_config("tiny", overrides=["train.seed=1"]).resolve(64),
                              "demo", record)  # fmt: skip


def test_an_address_where_no_ray_answers_is_one_line_naming_the_flag(monkeypatch):
    import ray

    from svt_ray.cluster import ensure_ray
    from svt_ray.config import ConfigError

    def no_cluster(**options):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ConfigError, match=r"scaling.address: no Ray cluster answers at auto .*"):
        ensure_ray("auto")


def test_an_address_where_nothing_listens_is_refused_before_ray_init(monkeypatch):
    """`ray.init` retried 127.0.0.1:1 for minutes, printing only its own C++ warnings (with
    another address in them); every command that joins a cluster asks the port first."""
    import socket

    import ray

    from svt_ray.cluster import ensure_ray, init_address
    from svt_ray.config import ConfigError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: pytest.fail("ray.init was reached"))
    with pytest.raises(ConfigError, match=rf"no Ray cluster answers at 127.0.0.1:{port} \("):
        ensure_ray(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=rf"at ray://127.0.0.1:{port} \(RAY_ADDRESS\) \("):
        init_address(None)  # data_prep and synth call it directly
    with socket.create_server(("127.0.0.1", 0)) as listening:  # something answers: Ray's turn
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert init_address(address) == address
    for left_to_ray in ("auto", "http://127.0.0.1:8265"):
        assert init_address(left_to_ray) == left_to_ray


def test_a_ray_job_without_address_counts_as_a_cluster(monkeypatch):
    """`ray job submit` sets RAY_ADDRESS and `ray.init()` joins it: no local-GPU check there."""
    from svt_ray.cluster import joins_a_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not joins_a_cluster(None) and not joins_a_cluster("local")
    assert joins_a_cluster("auto") and joins_a_cluster("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert not joins_a_cluster(None)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert joins_a_cluster(None)


def test_without_address_a_local_ray_is_started_even_beside_a_ray_start_cluster(
    monkeypatch, tmp_path, caplog
):
    """A bare `ray.init()` joins a cluster that `ray start --head` left on this machine, and
    then refuses num_cpus: `svt-ray pretrain` without --address ended in that ValueError."""
    import ray

    from svt_ray import cluster
    from svt_ray.cluster import ensure_ray, init_address

    monkeypatch.setattr(cluster, "check_cluster_answers", lambda *a, **k: None)  # no host "head"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records its address
    assert init_address(None) == "local" and init_address("local") == "local"
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379")
    with caplog.at_level(logging.WARNING, logger="svt_ray.cluster"):
        assert init_address(None) == "local"
    assert "`ray start` started runs on this machine (10.0.0.5:6379)" in caplog.text
    assert "To run on that cluster, pass --address auto" in caplog.text
    from ray._private.authentication import authentication_token_setup as auth

    class Kept(logging.Handler):  # Ray's loggers do not propagate to pytest's
        def emit(self, record):
            kept.append(record.getMessage()[:42])

    kept, handler = [], Kept()
    auth.logger.addHandler(handler)
    try:  # Ray's note on its default is left out, and nothing else
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(handler)
    assert kept == ["Token authentication is disabled for this "]
    assert init_address("auto") == "auto" and init_address("head:6379") == "head:6379"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # a `ray job submit` job: Ray's own choice
    assert init_address(None) is None
    monkeypatch.delenv("RAY_ADDRESS")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **options: calls.append(options))
    ensure_ray(None, num_cpus=3)
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 3


def test_a_run_left_on_cpu_by_the_default_is_told_what_it_costs(monkeypatch):
    """gpus_per_worker defaults to 0: `svt-ray pretrain --data X` on a GPU box, or the paper
    model anywhere without --gpus-per-worker, trained on CPU without a word."""
    import torch

    from svt_ray.cluster import cpu_training_note

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cpu_training_note(load_config("tiny")) is None
    note = cpu_training_note(load_config("paper"))
    assert note.startswith("the paper preset's model (~120M parameters) trains on CPU")
    assert cpu_training_note(load_config("paper", overrides=["scaling.gpus_per_worker=1"])) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    note = cpu_training_note(load_config("tiny"))
    assert note == (
        "this machine has 2 CUDA GPU(s) and the run uses none: pass --gpus-per-worker 1 to "
        "train on them"
    )
    # On a cluster the driver's machine says nothing of the workers' GPUs.
    assert cpu_training_note(load_config("tiny", overrides=["scaling.address=auto"])) is None


def test_the_console_shows_a_progress_line_every_so_often_and_at_the_end(capsys):
    from svt_ray.progress import ConsoleProgress

    def metrics(step, **extra):
        return {"epoch": step / 38, "loss": 7.5, "clips_per_s": 61.25,
                "data_wait_fraction": 0.04, **extra}  # fmt: skip

    progress = ConsoleProgress("tiny-seed0", 304, started=95.0, every_s=30)
    times = [(1, 100.5), (2, 101.0), (60, 130.0), (61, 130.6), (120, 160.0), (121, 160.6),
             (304, 251.0)]  # fmt: skip
    knn = {"online_knn_top1": 41.234}
    printed = [step for step, now in times if progress.maybe_print(step, metrics(step, **knn), now)]
    assert printed == [1, 61, 121, 304]  # the first step, then 30 s after the last line, the end
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| 6s")  # the first line: no rate yet, so no ETA
    # steps 1 -> 121 in 60 s: 2 steps/s, 183 steps left -> 92 s (the first batch's 5.5 s of
    # waiting for the pipeline left out)
    assert lines[2] == (
        "tiny-seed0 step 121/304 (40%) | epoch 3.18 | loss 7.500 | kNN 41.2 | 61.2 clips/s | "
        "data wait 4% | 1m06s, ETA 1m32s"
    )
    assert lines[3].endswith("| 2m36s")  # the last line: no ETA

    resumed = ConsoleProgress("r", 7200, started=0.0, every_s=1)  # resumed at step 3600
    for step, now in [(3601, 1.0), (3611, 11.0), (3612, 45.0)]:
        resumed.maybe_print(step, metrics(step), now)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("| 11s, ETA 59m49s")  # 10 steps in 10 s, 3589 left
    assert lines[2].endswith("| 45s, ETA 3h59m")  # 11 steps in 44 s, 3588 left: 14352 s
    silent = ConsoleProgress("r", 10, started=0.0, every_s=0)
    assert not silent.maybe_print(10, metrics(10), now=1.0)
    assert capsys.readouterr().out == ""


def test_a_run_that_waits_for_data_says_what_to_try():
    from svt_ray.progress import DataWait

    config = load_config("tiny")
    waits = DataWait()
    waits.add(30.0, 30.5)  # the first batch waits for the pipeline to start: left out
    for _ in range(9):
        waits.add(0.06, 0.5)
    assert waits.share == pytest.approx(0.12)
    assert "12% of its step time" in waits.hint(config)
    assert "data.preserve_order=false" in waits.hint(config)
    assert "raise data.prefetch_batches" in waits.hint(config)
    unordered = load_config("tiny", overrides=["data.preserve_order=false"])
    assert "decode CPUs" in waits.hint(unordered) and "preserve_order" not in waits.hint(unordered)
    waits.add(0.0, 1.0)  # 0.54 s of 5.5 s: 9.8%, under the 10% that gets a word
    assert waits.hint(config) is None
    assert DataWait().hint(config) is None


def test_the_checkpoints_kept_are_the_users_choice_and_0_keeps_all():
    from svt_ray.train import checkpoint_config

    assert checkpoint_config(load_config("tiny")).num_to_keep == 2  # ~2 GB each for paper
    keep = load_config("tiny", overrides=["train.keep_checkpoints=5"])
    assert checkpoint_config(keep).num_to_keep == 5
    assert (
        checkpoint_config(load_config("tiny", overrides=["train.keep_checkpoints=0"])).num_to_keep
        is None
    )


def test_resume_takes_the_settings_of_where_and_how_a_run_runs_and_refuses_the_rest(tmp_path):
    """`pretrain --resume RUN --set ...`: a data-loading or failure setting applies, a recipe
    setting is refused with what may change, and --config is refused (both were ignored)."""
    from typer.testing import CliRunner

    from svt_ray.cli import app
    from svt_ray.config import ConfigError
    from svt_ray.runs import RUN_FILE, recorded_config, write_json

    runs = tmp_path / "runs"
    config = load_config("tiny", overrides=[f"train.storage_path={runs}"]).resolve(64)
    write_json(str(runs / "r" / RUN_FILE), {"mlflow_run_id": "x", "config": config.model_dump(mode="json")})  # fmt: skip
    resumed = recorded_config("r", str(runs), ["data.prefetch_batches=6", "train.max_failures=5"])
    assert resumed.data.prefetch_batches == 6 and resumed.train.max_failures == 5
    assert resumed.optim == config.optim and resumed.model == config.model
    with pytest.raises(
        ConfigError, match=r"optim.epochs cannot change \(what may: .*data.prefetch"
    ) as refusal:
        recorded_config("r", str(runs), ["optim.epochs=9"])
    from svt_ray.config import resumable_settings_text

    listed = resumable_settings_text()  # the same list in --help and in the refusal
    import typer

    pretrain = typer.main.get_command(app).commands["pretrain"]
    (resume,) = [p for p in pretrain.params if p.name == "resume"]
    assert listed in str(refusal.value) and listed in resume.help
    assert "train.keep_checkpoints" in listed and "train.run_name" not in listed

    # A run.json of another version, whose config this one's schema rejects, says so.
    tree = config.model_dump(mode="json")
    tree["optim"]["old_knob"] = 1
    write_json(str(runs / "o" / RUN_FILE), {"config": tree, "svt_ray_version": "0.0.9"})
    with pytest.raises(
        ConfigError,
        match=r"--resume o: its recorded config was written by svt-ray 0\.0\.9 and does not "
        r"fit this one .*optim\.old_knob: unknown key.*start a new run",
    ):
        recorded_config("o", str(runs), [])
    # A bad value among the flags is the user's, not another version's.
    with pytest.raises(ConfigError) as bad_flag:
        recorded_config("r", str(runs), ["scaling.num_workers=3"])
    assert "does not split over scaling.num_workers=3" in str(bad_flag.value)
    assert "written by" not in str(bad_flag.value)

    runner = CliRunner()
    refused = runner.invoke(app, ["pretrain", "--resume", "r", "--storage", str(runs),
                                  "--set", "optim.epochs=9"])  # fmt: skip
    assert isinstance(refused.exception, ConfigError)  # main() prints it and exits 2
    assert "optim.epochs cannot change" in str(refused.exception)
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  epochs: 9\n")
    refused = runner.invoke(app, ["pretrain", "--resume", "r", "--storage", str(runs),
                                  "--config", str(extra)])  # fmt: skip
    assert refused.exit_code == 2 and "drop --config" in refused.output


def test_a_worker_fetches_the_configured_number_of_batches_ahead():
    from svt_ray.train import _one_pass

    class Shard:
        def iter_torch_batches(self, **options):
            self.options = options
            return iter(())

    shard = Shard()
    config = load_config("tiny", overrides=["data.prefetch_batches=6"]).resolve(64)
    _one_pass(shard, config, step=0)
    assert shard.options["prefetch_batches"] == 6
    assert shard.options["batch_size"] == config.derived.per_worker_batch


def test_ray_data_draws_progress_bars_on_a_terminal_only(monkeypatch):
    import io

    from svt_ray.data import progress_bars_wanted

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    assert progress_bars_wanted(Terminal()) is True
    assert progress_bars_wanted(io.StringIO()) is False  # a file, a pipe, `ray job logs`
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "0")  # the user decides
    assert progress_bars_wanted(io.StringIO()) is None


def test_progress_bars_turned_off_for_a_file_bring_no_warning_on_how_to_turn_them_on(
    ray_session, monkeypatch, caplog
):
    """The demo's evaluation, its output sent to a file, printed Ray Data's "Progress bars
    disabled. To enable, set ..." among its results: we turned them off on purpose."""
    import ray.data
    import ray.util.debug

    from svt_ray.data import set_progress_bars

    monkeypatch.setattr(ray.util.debug, "_logged", set())  # as in a new process
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", context.enable_progress_bars)
    ray_data = logging.getLogger("ray.data")  # its handlers write to stderr; no propagation
    ray_data.addHandler(caplog.handler)
    try:
        set_progress_bars(False)
        assert ray.data.range(4).map_batches(lambda batch: batch).count() == 4
    finally:
        ray_data.removeHandler(caplog.handler)
    assert "Execution plan" in caplog.text  # Ray Data's own log is seen here
    assert "Progress bars disabled" not in caplog.text


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_quiet_driver_prints_the_progress_lines_from_the_runs_metrics_file(tmp_path, capsys):
    """The demo's workers do not log to its console: the driver follows rank 0's
    metrics.jsonl instead, skipping rows of an earlier session and the kNN-only first row,
    and a row a crash cut short (its end written by the restarted rank 0), which had ended the
    reading thread with a JSONDecodeError."""
    from svt_ray.progress import progress_from_metrics

    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(json.dumps({"step": 3.0, "loss": 9.0}) + "\n")  # a session before

    def row(step, **extra):
        return {"step": float(step), "epoch": step / 10, "loss": 1.0 / step, "clips_per_s": 8.0,
                "data_wait_fraction": 0.5, **extra}  # fmt: skip

    printed: list[str] = []

    def wait_for_line(deadline_s: float = 30.0) -> None:  # the reader thread's pace, not ours
        deadline = time.monotonic() + deadline_s
        while not printed and time.monotonic() < deadline:
            printed.extend(capsys.readouterr().out.splitlines())
            time.sleep(0.02)

    following = progress_from_metrics(metrics_file, "demo", 20, every_s=3600, poll_s=0.02)
    with following, open(metrics_file, "a") as file:
        file.write(json.dumps({"clips_seen": 0, "online_knn_top1": 25.0}) + "\n")
        file.write(json.dumps(row(4)) + "\n")
        file.flush()
        wait_for_line()  # the first line, printed once read
        file.write(json.dumps(row(5))[:12] + "\n")  # cut by a crash, ended by the restart
        file.write(json.dumps(row(5)) + "\n" + json.dumps(row(20))[:10])  # half a row
        file.flush()
        time.sleep(0.3)  # step 5, not due, read or not; the half row waits
        file.write(json.dumps(row(20))[10:] + "\n")
    lines = printed + capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("demo step 4/20 (20%) | epoch 0.40 | loss 0.250 | kNN 25.0 |")
    assert lines[1].startswith("demo step 20/20 (100%) | epoch 2.00 | loss 0.050 | kNN 25.0 |")


def test_paths_on_the_drivers_own_disk_are_named_on_a_cluster(tmp_path, monkeypatch, caplog):
    """A local --storage on a cluster: each node kept its own checkpoints (a walkthrough's
    run wrote into the folder `ray start` ran in, without a word); NFS and buckets are quiet."""
    from svt_ray import cluster

    kinds = {str(tmp_path / "local"): "ext4", str(tmp_path / "nfs"): "nfs4"}
    monkeypatch.setattr(cluster, "_filesystem_type", lambda path: kinds.get(path))
    with caplog.at_level(logging.WARNING, logger="svt_ray.cluster"):
        cluster.warn_node_local_paths({
            "--storage": str(tmp_path / "local"), "--data": str(tmp_path / "nfs"),
            "--x": "s3://bucket/runs", "--y": None,
        })  # fmt: skip
    assert [record.getMessage()[:60] for record in caplog.records] == [
        f"--storage {tmp_path / 'local'} is on this node's own disk (ext4)"[:60]
    ]


def test_the_filesystem_of_a_path_is_its_deepest_mount(tmp_path):
    from svt_ray import cluster

    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/shared\\040data nfs4 rw 0 0\n"
        "tmpfs /mnt/shared\\040data/tmp tmpfs rw 0 0\n"
        "server:/scratch /scratch nfs4 rw 0 0\n"
        "tmpfs /scratch tmpfs rw 0 0\n"  # mounted over it: the one paths reach
    )
    kind = functools.partial(cluster._filesystem_type, mounts_file=str(mounts))
    assert kind("/mnt/shared data/runs") == "nfs4"
    assert kind("/mnt/shared data/tmp/x") == "tmpfs"
    assert kind("/mnt/shared datax") == "ext4"  # not inside the mount
    assert kind("/home/me/runs") == "ext4"
    assert kind("/scratch/runs") == "tmpfs"
