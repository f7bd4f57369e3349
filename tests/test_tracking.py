"""MLflow tracking: fail fast on a dead store, survive an outage mid-run, never log twice."""

from __future__ import annotations

import base64
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from mlflow.exceptions import MlflowException

from svt_ray.config import load_config
from svt_ray.tracking import (
    METRICS_FILE,
    MLflowTracker,
    NullTracker,
    TrackingUnavailableError,
    check_tracking_uri,
    make_tracker,
    missing_metrics,
    plot_training_curves,
    read_metrics_file,
    sync_metrics,
)


def test_unreachable_server_fails_before_training():
    with pytest.raises(TrackingUnavailableError, match=r"127\.0\.0\.1:9 is unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout_s=2)


class _HealthBehindBasicAuth(http.server.BaseHTTPRequestHandler):
    """/health for user svt, password "p@ss word" only (a proxy in front of `mlflow server`)."""

    def do_GET(self):
        expected = "Basic " + base64.b64encode(b"svt:p@ss word").decode()
        allowed = self.path == "/health" and self.headers.get("Authorization") == expected
        self.send_response(200 if allowed else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tracking_uri_with_user_and_password(caplog):
    """MLflow sends a URI's user:password@ as basic auth; urllib took it for part of the host
    name, so the check refused the URI, printing the password, and `cluster_tracking_uri`
    kept a loopback URI with a false warning. No message shows the password."""
    from svt_ray.tracking import cluster_tracking_uri, viewing_hint

    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthBehindBasicAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        check_tracking_uri(f"http://svt:p%40ss%20word@127.0.0.1:{port}", timeout_s=5)
        with pytest.raises(
            TrackingUnavailableError, match=rf"svt:\*\*\*@127\.0\.0\.1:{port} answered 401"
        ):
            check_tracking_uri(f"http://svt:not-it@127.0.0.1:{port}", timeout_s=5)
        with pytest.raises(TrackingUnavailableError, match="answered 401"):  # none given
            check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=5)
        given = f"http://svt:p%40ss%20word@localhost:{port}"
        with caplog.at_level("INFO", logger="svt_ray.tracking"):
            rewritten = cluster_tracking_uri(given, "127.0.0.1")
        assert rewritten == f"http://svt:p%40ss%20word@127.0.0.1:{port}"  # MLflow needs it
        assert f"-> http://svt:***@127.0.0.1:{port}, which every node" in caplog.text
        assert "does not answer" not in caplog.text and "p%40ss" not in caplog.text
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(TrackingUnavailableError) as unreachable:
        check_tracking_uri("http://svt:secret@127.0.0.1:9", timeout_s=2)
    assert "tracking server http://svt:***@127.0.0.1:9 is unreachable" in str(unreachable.value)
    assert "secret" not in str(unreachable.value)
    assert viewing_hint("http://svt:secret@host:5000") == (
        "open http://svt:***@host:5000 (the MLflow server's UI)"
    )


def test_file_store_and_missing_folder_are_explained(tmp_path):
    with pytest.raises(TrackingUnavailableError, match="no longer writes file stores"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    with pytest.raises(TrackingUnavailableError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")


def test_mistyped_tracking_uris_are_refused_before_any_work(tmp_path, mlflow_db):
    """Each passed the check and failed at MLflow's first use: SQLAlchemy's 'Invalid SQLite
    URL', 'file is not a database', MLflow's unknown-scheme error."""
    from mlflow.tracking import MlflowClient

    from svt_ray.tracking import experiment_id

    with pytest.raises(TrackingUnavailableError, match="a SQLite store is sqlite:/// and its"):
        check_tracking_uri("sqlite://mlflow.db")
    (tmp_path / "notes.txt").write_text("not a database")
    with pytest.raises(TrackingUnavailableError, match=r"notes\.txt is not a SQLite database"):
        check_tracking_uri(f"sqlite:///{tmp_path}/notes.txt")
    with pytest.raises(TrackingUnavailableError, match=r"no store for scheme .htp. .*http, https"):
        check_tracking_uri("htp://127.0.0.1:5000")
    for database in ("postgresql+psycopg2", "mysql+pymysql", "postgresql"):  # SQLAlchemy URLs
        check_tracking_uri(f"{database}://user@127.0.0.1:1/mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id(client, "gone", uri)
    check_tracking_uri(uri)  # the database MLflow made passes
    client.delete_experiment(client.get_experiment_by_name("gone").experiment_id)
    with pytest.raises(TrackingUnavailableError, match=r"experiment .gone. .* is deleted; restore"):
        experiment_id(client, "gone", uri)


def test_only_rank_zero_tracks(tmp_path, mlflow_db):
    assert isinstance(make_tracker(1, tracking_uri="unused"), NullTracker)
    tracked = make_tracker(
        0,
        tracking_uri=f"sqlite:///{mlflow_db}",
        experiment="tests",
        run_name="r",
        local_dir=tmp_path / "r",
    )
    assert isinstance(tracked, MLflowTracker)
    assert tracked.client.get_run(tracked.run_id).info.run_name == "r"
    tracked.close()


def tracker(tmp_path, **kwargs) -> MLflowTracker:
    return MLflowTracker(
        f"sqlite:///{tmp_path}/mlflow.db", "tests", "run", tmp_path / "run", **kwargs
    )


class _Outage:
    """A store that fails every log_batch as a dead server does (after `stall_s`, MLflow's
    own retries) while `down` is set; `sent` counts the values of each call it took."""

    def __init__(self, run: MLflowTracker, stall_s: float = 0.0):
        self.down, self.stall_s, self.sent = threading.Event(), stall_s, []
        self.refused = threading.Event()  # a call met the outage
        self.real = run.client.log_batch
        run.client.log_batch = self
        run._sender.retry_s = (0.01, 0.05)

    def __call__(self, *args, **kwargs):
        if self.down.is_set():
            time.sleep(self.stall_s)
            self.refused.set()
            raise MlflowException("API request failed with exception Connection refused")
        self.real(*args, **kwargs)
        self.sent.append(len(kwargs.get("metrics") or []))


def _history(run: MLflowTracker, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in run.client.get_metric_history(run.run_id, key))


def test_an_outage_mid_run_holds_values_back_without_stalling_training(tmp_path, mlflow_db, caplog):
    run = tracker(tmp_path)
    outage = _Outage(run, stall_s=0.5)
    run.log_metrics({"loss": 8.0}, step=8)
    assert run.flush(timeout_s=30)
    outage.down.set()
    started = time.perf_counter()
    for step in range(16, 88, 8):  # 9 steps while the store is down
        run.log_metrics({"loss": float(step)}, step=step)
    assert time.perf_counter() - started < 0.5  # one failed call takes 0.5 s: none waited
    assert not run.flush(timeout_s=0.2)  # still held back
    assert "has not taken 9 call(s)" in caplog.text and "tracking sync" in caplog.text
    assert outage.refused.wait(30)  # the sender met the outage (its thread's pace, not ours)
    outage.down.clear()
    assert run.flush(timeout_s=30)
    assert "training goes on" in caplog.text
    assert _history(run) == [(step, float(step)) for step in range(8, 88, 8)]  # each once
    assert len(outage.sent) <= 3  # the 9 held back went as few log_batch calls, not 9
    assert "answers again" in caplog.text
    lines = [json.loads(x) for x in run.metrics_file.read_text().splitlines()]
    assert [x["clips_seen"] for x in lines] == list(range(8, 88, 8))


def test_a_refused_call_is_dropped_and_the_calls_behind_it_go_on(tmp_path, mlflow_db, caplog):
    run = tracker(tmp_path)
    run.log_params({"optim.lr": 1})
    run.log_params({"optim.lr": 2})  # MLflow refuses to change a logged param
    run.log_params({"optim.lr": 3})
    run.log_metrics({"loss": 1.0}, step=4)
    run.finish()
    assert caplog.text.count("refused log_params") == 1  # warned once, not per call
    assert run.client.get_run(run.run_id).data.params == {"optim.lr": "1"}
    assert _history(run) == [(4, 1.0)]
    assert run.client.get_run(run.run_id).info.status == "FINISHED"


def test_a_run_that_ends_in_an_outage_is_synced_afterwards(tmp_path, mlflow_db, caplog):
    run = tracker(tmp_path, flush_timeout_s=0.3)
    outage = _Outage(run)
    run.log_metrics({"loss": 4.0, "lr": 0.1}, step=4)
    assert run.flush(timeout_s=30)
    outage.down.set()
    run.log_metrics({"loss": 8.0, "lr": 0.2}, step=8)
    run.log_metrics({"loss": 12.0, "lr": 0.3}, step=12)
    run.log_summary({"eval/knn_top1": 61.5})  # the demo's evaluation, after training
    started = time.perf_counter()
    run.finish()
    assert time.perf_counter() - started < 10  # waited flush_timeout_s, not for ever
    assert "has not taken 4 call(s)" in caplog.text and "svt-ray tracking sync" in caplog.text
    assert run.client.get_run(run.run_id).info.status == "RUNNING"  # set_terminated not taken
    assert sync_metrics(run.tracking_uri, run.run_id, run.metrics_file) == [8, 12]
    assert _history(run) == [(4, 4.0), (8, 8.0), (12, 12.0)]
    assert _history(run, "clips_seen") == []  # each line's step, never logged here
    assert _history(run, "lr") == [(4, 0.1), (8, 0.2), (12, 0.3)]
    assert _history(run, "eval/knn_top1") == [(12, 61.5)]  # summaries are in the file too
    assert sync_metrics(run.tracking_uri, run.run_id, run.metrics_file) == []  # nothing twice


def test_sync_sends_no_clips_seen_that_was_only_a_lines_step(tmp_path, mlflow_db):
    """Every metrics.jsonl line has its step as clips_seen, also where clips_seen was not
    logged (the online kNN at the start, a summary): sync sent a run MLflow had whole a
    clips_seen of 0 at step 0 that nothing logged, and said it sent a step it lacked."""
    run = tracker(tmp_path)
    run.log_metrics({"online_knn_top1": 30.0, "online_knn_top5": 60.0}, step=0)  # train.py
    run.log_metrics({"loss": 5.0, "clips_seen": 16.0, "step": 1.0}, step=16)
    run.log_summary({"eval/knn_top1": 50.0})
    run.finish()
    assert [line["clips_seen"] for line in read_metrics_file(run.metrics_file)] == [0, 16, 16]
    assert sync_metrics(run.tracking_uri, run.run_id, run.metrics_file) == []
    assert _history(run, "clips_seen") == [(16, 16.0)]
    resent = missing_metrics(run.client, run.run_id, read_metrics_file(run.metrics_file), -1)
    assert sorted((m.key, m.step) for m in resent if m.key == "clips_seen") == [("clips_seen", 16)]
    # A file written before the step was kept apart: the step an int, training's a float.
    old = tmp_path / "old.jsonl"
    old.write_text(
        '{"clips_seen": 0, "time": 1.0, "online_knn_top1": 30.0}\n'
        '{"clips_seen": 16.0, "time": 2.0, "loss": 5.0, "step": 1.0}\n'
        '{"clips_seen": 16, "time": 3.0, "eval/knn_top1": 50.0}\n'
    )
    assert sync_metrics(run.tracking_uri, run.run_id, old) == []


def test_resumed_tracker_skips_steps_already_logged(tmp_path, mlflow_db):
    first = tracker(tmp_path)
    for step in (4, 8, 12):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close()
    again = tracker(tmp_path, run_id=first.run_id)
    assert again.last_logged == 12
    for step in (8, 12, 16):  # a restart from the checkpoint at 4 redoes 8 and 12
        again.log_metrics({"loss": -1.0}, step=step)
    again.close()
    assert _history(again) == [(4, 4.0), (8, 8.0), (12, 12.0), (16, -1.0)]
    assert [line["clips_seen"] for line in read_metrics_file(again.metrics_file)] == [4, 8, 12, 16]

    # Restarted on a node whose metrics.jsonl ends at the checkpoint (4): the file gets the
    # redone steps, MLflow only the new one.
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / METRICS_FILE).write_text(_metrics_lines([4]))
    moved = MLflowTracker(
        again.tracking_uri, "tests", "run", tmp_path / "moved", run_id=first.run_id
    )
    for step in (8, 12, 16, 20):
        moved.log_metrics({"loss": -2.0}, step=step)
    moved.close()
    written = [line["clips_seen"] for line in read_metrics_file(moved.metrics_file)]
    assert written == [4, 8, 12, 16, 20]
    assert _history(moved) == [(4, 4.0), (8, 8.0), (12, 12.0), (16, -1.0), (20, -2.0)]


def test_results_added_to_an_ended_run_leave_its_status_alone(tmp_path, mlflow_db):
    """The demo adds its evaluation to the finished pretraining run. Continued as a worker
    continues one, the run was RUNNING until the last call: a process killed in between
    left a finished run RUNNING for good. `reopen=False` never touches the status."""
    first = tracker(tmp_path)
    first.log_metrics({"loss": 1.0}, step=8)
    first.finish()
    added = tracker(tmp_path, run_id=first.run_id, reopen=False)
    assert added.client.get_run(first.run_id).info.status == "FINISHED"
    added.log_summary({"eval/knn": 70.0})
    added.log_text("| table |\n", "evaluation.md")
    assert added.flush(timeout_s=30)
    assert added.client.get_run(first.run_id).info.status == "FINISHED"
    added.close()
    assert _history(added, "eval/knn") == [(8, 70.0)]
    assert added.client.get_run(first.run_id).info.status == "FINISHED"
    # Continued as a worker does, the run is RUNNING until finish().
    tracker(tmp_path, run_id=first.run_id).close()
    assert added.client.get_run(first.run_id).info.status == "RUNNING"


def test_a_restart_sends_what_the_crashed_worker_held_back(tmp_path, mlflow_db):
    first = tracker(tmp_path)
    outage = _Outage(first)
    first.log_metrics({"loss": 4.0}, step=4)
    assert first.flush(timeout_s=30)
    outage.down.set()
    first.log_metrics({"loss": 8.0}, step=8)
    first.log_metrics({"loss": 12.0}, step=12)
    first._sender.stop()  # the worker dies with 8 and 12 held back: only metrics.jsonl has them
    again = tracker(tmp_path, run_id=first.run_id)  # the restarted worker; the store is back
    assert again.last_logged == 12  # from metrics.jsonl: 8 and 12 are not logged twice
    for step in (8, 12, 16):  # redone from the checkpoint at 4
        again.log_metrics({"loss": -1.0}, step=step)
    assert again.flush(timeout_s=30)
    assert _history(again) == [(4, 4.0), (8, 8.0), (12, 12.0), (16, -1.0)]
    lines = [json.loads(x)["clips_seen"] for x in again.metrics_file.read_text().splitlines()]
    assert lines == [4, 8, 12, 16]


@pytest.mark.slow  # a minute of two server starts; the fake outages above test the logic
@pytest.mark.extended  # (slow too: `pytest -m "not slow"` replaces the default selection)
def test_a_real_server_that_restarts_mid_run_gets_every_value(tmp_path, caplog):
    """`mlflow server` stopped and started again on its port while a run logs."""
    from conftest import free_port, serving

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    with serving("mlflow server", command, f"{uri}/health", tmp_path, timeout_s=120, poll_s=0.5):
        run = make_tracker(0, tracking_uri=uri, experiment="tests", run_name="run",
                           local_dir=tmp_path / "run")  # fmt: skip
        run._sender.retry_s = (0.2, 1.0)
        run.log_metrics({"loss": 1.0}, step=1)
        assert run.flush(timeout_s=60)
    started = time.perf_counter()
    for step in range(2, 6):  # each call to a dead server takes MLflow's retries (~5 s)
        run.log_metrics({"loss": float(step)}, step=step)
    assert time.perf_counter() - started < 1.0
    with serving("mlflow server", command, f"{uri}/health", tmp_path, timeout_s=120, poll_s=0.5):
        run.log_metrics({"loss": 6.0}, step=6)
        run.finish()
        assert _history(run) == [(step, float(step)) for step in range(1, 7)]
        assert run.client.get_run(run.run_id).info.status == "FINISHED"
    assert "training goes on" in caplog.text and "answers again" in caplog.text


def test_tracking_subcommands_help_says_what_their_defaults_are():
    """sync's --tracking-uri help was pretrain's: "sqlite:///mlflow.db ... for a new run"."""
    import typer

    from svt_ray.cli import app

    tracking = typer.main.get_command(app).commands["tracking"]
    helps = {
        f"{name} {param.name}": param.help or ""
        for name, command in tracking.commands.items()
        for param in command.params
    }
    assert "new run" not in helps["sync tracking_uri"]
    assert "the one the run was started with (its run.json)" in helps["sync tracking_uri"]
    assert "default svt_runs" in helps["sync storage"]


def test_tracking_sync_command(tmp_path, mlflow_db):
    from typer.testing import CliRunner

    from svt_ray.cli import app, build_config
    from svt_ray.runs import RUN_FILE, write_json

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "runs"
    config = build_config("tiny", None, [f"tracking.tracking_uri={uri}",
                                         f"train.storage_path={storage}"])  # fmt: skip
    run = MLflowTracker(uri, "tests", "r1", storage / "r1")
    write_json(str(storage / "r1" / RUN_FILE),
               {"mlflow_run_id": run.run_id, "config": config.model_dump(mode="json")})  # fmt: skip
    outage = _Outage(run)
    outage.down.set()
    run.log_metrics({"loss": 2.0}, step=2)
    run._sender.stop()
    runner = CliRunner()
    result = runner.invoke(app, ["tracking", "sync", "r1", "--storage", str(storage)])
    assert result.exit_code == 0 and "values of 1 step(s)" in result.output, result.output
    assert _history(run) == [(2, 2.0)]
    result = runner.invoke(app, ["tracking", "sync", "r1", "--storage", str(storage)])
    assert result.exit_code == 0 and "has every metric" in result.output
    result = runner.invoke(app, ["tracking", "sync", "r2", "--storage", str(storage)])
    assert result.exit_code != 0 and "no run.json" in result.output


def test_tracking_sync_finishes_what_an_outage_kept_from_mlflow(tmp_path, mlflow_db):
    """An outage through a run's end: sync sent the losses, but not clips_seen (a metric
    too: compare read 80 of 256), left the run RUNNING and the curves unlogged; a run not
    finished stays as it is."""
    from typer.testing import CliRunner

    from svt_ray.cli import app
    from svt_ray.runs import PROGRESS_FILE, RUN_FILE, write_json

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "runs"
    config = load_config(
        "tiny", overrides=[f"tracking.tracking_uri={uri}", f"train.storage_path={storage}"]
    ).resolve(64)
    total = config.derived.total_steps
    run = MLflowTracker(uri, "tests", "r1", storage / "r1")
    write_json(str(storage / "r1" / RUN_FILE),
               {"mlflow_run_id": run.run_id, "config": config.model_dump(mode="json")})  # fmt: skip
    outage = _Outage(run)
    run.log_metrics({"loss": 3.0, "clips_seen": 16.0}, step=16)
    assert run.flush(timeout_s=30)
    outage.down.set()
    run.log_metrics({"loss": 2.0, "clips_seen": 32.0}, step=32)
    run.log_summary({"knn_top1": 50.0})
    run._sender.stop()
    runner = CliRunner()
    write_json(str(storage / "r1" / PROGRESS_FILE), {"step": total - 1})
    result = runner.invoke(app, ["tracking", "sync", "r1", "--storage", str(storage)])
    assert result.exit_code == 0, result.output
    assert f"MLflow says RUNNING; its last checkpoint is step {total - 1} of {total}" in (
        result.output
    )
    assert _history(run, "clips_seen") == [(16, 16.0), (32, 32.0)]
    assert _history(run, "knn_top1") == [(32, 50.0)]
    assert run.client.get_run(run.run_id).info.status == "RUNNING"
    write_json(str(storage / "r1" / PROGRESS_FILE), {"step": total})
    result = runner.invoke(app, ["tracking", "sync", "r1", "--storage", str(storage)])
    assert result.exit_code == 0, result.output
    assert "has every metric" in result.output and "marked FINISHED" in result.output
    assert run.client.get_run(run.run_id).info.status == "FINISHED"
    assert [item.path for item in run.client.list_artifacts(run.run_id)] == ["training_curves.png"]
    result = runner.invoke(app, ["tracking", "sync", "r1", "--storage", str(storage)])
    assert "FINISHED" not in result.output and "logged" not in result.output  # done once


def _metrics_lines(steps) -> str:
    return "".join(
        json.dumps({"clips_seen": s, "time": 1.0, "loss": 9.0 - s}) + "\n" for s in steps
    )


def test_metrics_travel_with_a_remote_run_directory(tmp_path, mlflow_db, monkeypatch):
    """With remote storage, metrics.jsonl lives on rank 0's node; a copy in the run directory
    serves a rank 0 restarted elsewhere, the driver's curve plot and `tracking sync`."""
    from typer.testing import CliRunner

    from svt_ray.cli import app, build_config
    from svt_ray.runs import (
        RUN_FILE,
        fetch_metrics,
        local_log_directory,
        mirror_metrics,
        write_json,
    )

    storage = f"file://{tmp_path}/bucket/runs"  # a URI: remote storage to svt-ray
    run_dir = f"{storage}/r1"
    trained_on = tmp_path / "node-a"
    trained_on.mkdir()
    (trained_on / METRICS_FILE).write_text(_metrics_lines([4, 8, 12]))
    mirror_metrics(trained_on, run_dir)
    copy = tmp_path / "bucket/runs/r1" / METRICS_FILE
    assert copy.read_text() == (trained_on / METRICS_FILE).read_text()

    elsewhere = tmp_path / "node-b"  # nothing here yet: the copy comes down
    assert fetch_metrics(elsewhere, run_dir).read_text() == copy.read_text()
    further = tmp_path / "node-c"  # this node's file reaches a later step: it stays
    further.mkdir()
    (further / METRICS_FILE).write_text(_metrics_lines([4, 8, 12, 16]))
    assert len(read_metrics_file(fetch_metrics(further, run_dir))) == 4
    assert not list(further.glob(".*")), "the downloaded copy is left behind"
    local_run = tmp_path / "local-runs" / "r1"  # a local run directory: nothing to copy
    local_run.mkdir(parents=True)
    (local_run / METRICS_FILE).write_text(_metrics_lines([4]))
    mirror_metrics(local_run, str(local_run))
    assert fetch_metrics(local_run, str(local_run)) == local_run / METRICS_FILE

    # `tracking sync` on a machine where the run never trained sends the copy's values.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sync-machine"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = build_config("tiny", None, [f"tracking.tracking_uri={uri}",
                                         f"train.storage_path={storage}"])  # fmt: skip
    run = MLflowTracker(uri, "tests", "r1", tmp_path / "driver")
    run.close()
    write_json(f"{run_dir}/{RUN_FILE}",
               {"mlflow_run_id": run.run_id, "config": config.model_dump(mode="json")})  # fmt: skip
    assert not (local_log_directory(config, "r1") / METRICS_FILE).exists()
    result = CliRunner().invoke(app, ["tracking", "sync", "r1", "--storage", storage])
    assert result.exit_code == 0 and "values of 3 step(s)" in result.output, result.output
    assert _history(run) == [(4, 5.0), (8, 1.0), (12, -3.0)]


def test_a_line_cut_short_by_a_crash_does_not_swallow_the_next(tmp_path, mlflow_db):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / METRICS_FILE).write_text(_metrics_lines([4]) + '{"clips_seen": 8, "lo')
    run = MLflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "tests", "r", folder)
    run.log_metrics({"loss": 1.0}, step=12)
    run.close()
    assert [line["clips_seen"] for line in read_metrics_file(folder / METRICS_FILE)] == [4, 12]


def test_training_curves_plot(tmp_path, monkeypatch):
    """What is drawn, not only that a PNG was written: each series against clips seen, in the
    order of the clips (lines of a resumed run's metrics.jsonl may come out of order), the
    missing ones as NaN, online kNN only at the points it was measured."""
    from matplotlib.axes import Axes

    rows = [{"clips_seen": i * 4, "loss": 5.0 - i, "collapse_uniform": 0.1 * i} for i in range(5)]
    rows[2]["online_knn_top1"], rows[2]["online_knn_top5"] = 40.0, 90.0
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in [rows[3], *rows[:3], rows[4]]))
    drawn, plot = {}, Axes.plot

    def recorded(self, x, y, *args, **kwargs):
        drawn[kwargs["label"]] = (list(x), list(y))
        return plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recorded)
    png = plot_training_curves(metrics, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    clips = [0, 4, 8, 12, 16]
    assert drawn["loss"] == (clips, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert drawn["collapse_uniform"][0] == clips
    assert drawn["collapse_uniform"][1] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert all(math.isnan(v) for v in drawn["collapse_dominant"][1])  # not logged: NaN
    assert drawn["knn_top1"] == ([8], [40.0]) and drawn["knn_top5"] == ([8], [90.0])
    assert plot_training_curves(tmp_path / "absent.jsonl", tmp_path / "x.png") is None


def test_relative_sqlite_uri_is_pinned_for_workers(tmp_path, monkeypatch):
    from svt_ray.tracking import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_sqlite_artifacts_live_beside_the_database(tmp_path, mlflow_db):
    run = tracker(tmp_path)
    (tmp_path / "note.txt").write_text("hello")
    run.log_artifact(tmp_path / "note.txt")
    assert run.flush(timeout_s=30)
    experiment = run.client.get_experiment_by_name("tests")
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    assert list((tmp_path / "mlruns").rglob("note.txt"))


def test_a_loopback_uri_is_given_as_the_drivers_address_on_a_cluster(mlflow_server, caplog):
    """Workers on other nodes use the driver node's address, if the server answers there.

    The session's server listens on 127.0.0.1 only: standing in for the driver node's address,
    127.0.0.1 answers (rewritten) and 127.0.0.2 (loopback too, but not bound) does not (kept).
    """
    from svt_ray.tracking import cluster_tracking_uri

    port = mlflow_server.rsplit(":", 1)[1]
    given = f"http://localhost:{port}"
    assert cluster_tracking_uri(given, "127.0.0.1") == f"http://127.0.0.1:{port}"
    assert cluster_tracking_uri(given, "127.0.0.2", timeout_s=2) == given
    assert "Train workers on other nodes cannot reach it" in caplog.text
    assert cluster_tracking_uri("http://mlflow.internal:5000", "127.0.0.3") == (
        "http://mlflow.internal:5000"  # not loopback: every node resolves it alike
    )
    assert cluster_tracking_uri("sqlite:////data/mlflow.db", "127.0.0.3") == (
        "sqlite:////data/mlflow.db"
    )
    assert "cannot write to this node's SQLite file" in caplog.text


def test_a_worker_that_cannot_reach_the_store_trains_on_without_mlflow(
    tmp_path, mlflow_db, caplog, monkeypatch
):
    """A Train worker joins the driver's run; where the store is unreachable from its node it
    warns once and keeps metrics.jsonl, without waiting out MLflow's retries on every call."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's 7 take minutes
    first = tracker(tmp_path)
    worker = MLflowTracker(
        "http://svt:secret@127.0.0.1:9", "tests", "run", tmp_path / "worker", run_id=first.run_id
    )
    assert worker.offline and "not reachable from this node" in caplog.text
    assert "http://svt:***@127.0.0.1:9" in caplog.text and "secret" not in caplog.text

    def no_call(*args, **kwargs):
        raise AssertionError("an offline tracker called MLflow")

    worker.client.log_batch = worker.client.set_terminated = no_call
    worker.log_metrics({"loss": 1.0}, step=4)
    worker.finish()
    lines = (tmp_path / "worker" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["clips_seen"] for line in lines] == [4]


# -- backing up the cluster head's SQLite store -----------------------------------------------


def _store_with_a_run(path, empty_store=None):
    """A store at `path` with one run; an `empty_store` to copy saves MLflow making one."""
    from mlflow.tracking import MlflowClient

    if empty_store is not None:
        shutil.copyfile(empty_store, path)
    client = MlflowClient(f"sqlite:///{path}")
    run = client.create_run(client.create_experiment("backup"))
    return client, run.info.run_id


def _loss_steps(path, run_id) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(f"sqlite:///{path}").get_metric_history(run_id, "loss")]


def _read(location: str) -> bytes:
    from data_prep.inputs import resolve_filesystem

    filesystem, path = resolve_filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def test_a_backup_taken_during_a_write_holds_all_of_it_or_none(
    tmp_path, empty_mlflow_store, monkeypatch
):
    """A write of many steps, open while the backup runs, whose pages spill to the file before
    it commits (a one-page cache): a plain copy of the file catches some of them (11 of 5,000),
    SQLite's backup holds none or all, and restores to a sound store."""
    import sqlite3
    import threading
    import time

    from svt_ray.tracking import backup_sqlite_store, restore_sqlite_store

    database = tmp_path / "head" / "mlflow.db"
    database.parent.mkdir()
    _, run_id = _store_with_a_run(database, empty_mlflow_store)
    steps = 5000
    writer = sqlite3.connect(database, isolation_level=None)  # the server, mid-transaction
    writer.execute("PRAGMA cache_size=1")
    writer.execute("BEGIN")
    writer.executemany(
        "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
        "VALUES ('loss', 1.0, 0, ?, ?, 0)",
        [(run_id, step) for step in range(steps)],
    )
    assert (tmp_path / "head" / "mlflow.db-journal").is_file()  # pages spilled: a hot journal
    destination = (tmp_path / "bucket" / "mlflow.db").as_uri()  # a file:// URI
    errors = []

    def back_up():
        try:
            backup_sqlite_store(f"sqlite:///{database}", destination)
        except Exception as error:  # reported below: a thread's error would pass unseen
            errors.append(error)

    opened, connect = threading.Event(), sqlite3.connect

    def connecting(path, *args, **kwargs):  # the backup's reader: it now runs into the write
        connection = connect(path, *args, **kwargs)
        if str(path) == str(database):
            opened.set()
        return connection

    monkeypatch.setattr(sqlite3, "connect", connecting)
    backup = threading.Thread(target=back_up)
    backup.start()
    assert opened.wait(timeout=60)  # however loaded the machine, the reader is open first
    time.sleep(0.2)  # and reading: it waits out the writer's lock
    writer.execute("COMMIT")
    writer.close()
    backup.join(timeout=120)
    monkeypatch.undo()
    assert not backup.is_alive() and not errors, errors
    restored = tmp_path / "new_head" / "mlflow.db"
    assert restore_sqlite_store(destination, restored)  # it checks the integrity
    assert len(_loss_steps(restored, run_id)) in (0, steps)
    assert not list((tmp_path / "bucket").glob(".tmp-*"))  # written through a temp + rename


def test_restore_never_overwrites_and_refuses_a_broken_backup(tmp_path, mlflow_db):
    from svt_ray.tracking import backup_sqlite_store, restore_sqlite_store

    database = tmp_path / "mlflow.db"
    _, run_id = _store_with_a_run(database)
    backup = str(tmp_path / "backup.db")
    backup_sqlite_store(database, backup)

    assert not restore_sqlite_store(str(tmp_path / "none.db"), tmp_path / "a.db")  # no backup yet
    assert not (tmp_path / "a.db").exists()
    database.write_bytes(b"the head's own store")
    assert not restore_sqlite_store(backup, database)
    assert database.read_bytes() == b"the head's own store"

    broken = tmp_path / "broken.db"
    broken.write_bytes(b"SQLite format 3\x00" + bytes(4000))
    with pytest.raises(ValueError, match=r"broken\.db is not a sound SQLite database"):
        restore_sqlite_store(str(broken), tmp_path / "b.db")
    assert list(tmp_path.glob("*b.db*")) == []  # no store, no partial file

    assert restore_sqlite_store(backup, f"sqlite:///{tmp_path}/c.db")
    assert _loss_steps(tmp_path / "c.db", run_id) == []

    from typer.testing import CliRunner

    from svt_ray.cli import app

    folder = tmp_path / "stores"  # said "exists: kept" with status 0, as if a store were there
    folder.mkdir()
    result = CliRunner().invoke(app, ["tracking", "restore", backup, str(folder)])
    assert result.exit_code == 2 and f"DATABASE {folder} is a folder" in result.stderr


def test_tracking_backup_command_once_on_a_schedule_and_on_bad_input(tmp_path, mlflow_db):
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from svt_ray.cli import app

    database = tmp_path / "mlflow.db"
    client, run_id = _store_with_a_run(database)
    runner = CliRunner()
    result = runner.invoke(app, ["tracking", "backup", str(tmp_path / "no.db"), "x.db"])
    assert result.exit_code == 2 and "no SQLite store at" in result.output
    (tmp_path / "notes.txt").write_text("not a database")
    result = runner.invoke(app, ["tracking", "backup", str(tmp_path / "notes.txt"), "x.db"])
    assert result.exit_code == 2, result.output
    assert "notes.txt is not a SQLite database" in result.stderr
    result = runner.invoke(app, ["tracking", "backup", str(database), "x.db", "--every", "-1"])
    assert result.exit_code == 2 and "--every" in result.output
    once = tmp_path / "once.db"
    result = runner.invoke(app, ["tracking", "backup", f"sqlite:///{database}", str(once)])
    assert result.exit_code == 0 and once.is_file(), result.output

    # --every: a change to the store reaches the backup on the next round.
    scheduled = tmp_path / "bucket" / "mlflow.db"
    command = [sys.executable, "-m", "svt_ray.cli", "tracking", "backup", str(database),
               str(scheduled), "--every", "0.2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client.log_metric(run_id, "loss", 0.5, step=0)
        deadline = time.time() + 60
        restored = tmp_path / "restored.db"
        while time.time() < deadline:
            if scheduled.is_file():
                restored.unlink(missing_ok=True)
                runner.invoke(app, ["tracking", "restore", str(scheduled), str(restored)])
                if _loss_steps(restored, run_id) == [0]:
                    break
            time.sleep(0.2)
        assert _loss_steps(restored, run_id) == [0]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
    assert "backed up" in output


def test_a_backup_killed_mid_copy_leaves_no_copy_behind_once_the_next_one_is_written(
    tmp_path, mlflow_db
):
    """kill -9 during a backup leaves its hidden temporary copy beside the destination (a
    whole store each time); the next backup of that destination deletes its stale ones, and
    not a younger one (a backup that may be writing now) nor another file's."""
    from data_prep.shards import TEMPORARY_AGE_S
    from svt_ray.tracking import backup_sqlite_store, run_ids

    database = tmp_path / "mlflow.db"
    _store_with_a_run(database)
    folder = tmp_path / "bucket"
    folder.mkdir()
    stale = folder / ".tmp-0123456789ab-mlflow.db"
    young = folder / ".tmp-ba9876543210-mlflow.db"
    other = folder / ".tmp-0123456789ab-other.db"
    not_ours = folder / ".tmp-notes-by-me-mlflow.db"  # not a 12-hex-digit token
    for path in (stale, young, other, not_ours):
        path.write_bytes(b"half a store")
    long_ago = time.time() - TEMPORARY_AGE_S - 60
    for path in (stale, other, not_ours):
        os.utime(path, (long_ago, long_ago))
    backup_sqlite_store(database, str(folder / "mlflow.db"))
    kept = ["mlflow.db", young.name, other.name, not_ours.name]
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)
    assert run_ids(folder / "mlflow.db")  # the backup itself is whole


def test_a_backup_onto_the_store_itself_or_every_nan_seconds_is_refused(tmp_path, mlflow_db):
    """A backup over its own store renamed a new file over the open one (a server writing to it
    failed from then on: "attempt to write a readonly database"); --every nan or inf failed in
    time.sleep after the first copy."""
    from typer.testing import CliRunner

    from svt_ray.cli import app

    inode = mlflow_db.stat().st_ino
    for destination in (str(mlflow_db), mlflow_db.as_uri(), f"{tmp_path}/./mlflow.db"):
        result = CliRunner().invoke(app, ["tracking", "backup", str(mlflow_db), destination])
        assert result.exit_code == 2, result.output
        assert f"DESTINATION {destination} is the store itself" in result.stderr
    assert mlflow_db.stat().st_ino == inode
    for every in ("nan", "inf"):
        command = ["tracking", "backup", str(mlflow_db), str(tmp_path / "b.db"), "--every", every]
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and f"--every: {every}; give seconds" in result.stderr
    assert not (tmp_path / "b.db").exists()


def test_a_backup_refuses_to_replace_one_of_another_store(tmp_path, empty_mlflow_store):
    """A head whose restore read another place than its backup writes starts an empty store,
    and its backup loop replaced the real backup (15 runs became 0): refused unless --force,
    checked on the first round only (later rounds replace what the loop itself wrote)."""
    from typer.testing import CliRunner

    from svt_ray.cli import app

    old_head = tmp_path / "old" / "mlflow.db"
    old_head.parent.mkdir()
    client, _ = _store_with_a_run(old_head, empty_mlflow_store)
    client.create_run(client.get_experiment_by_name("backup").experiment_id)
    new_head = tmp_path / "new" / "mlflow.db"
    new_head.parent.mkdir()
    shutil.copyfile(empty_mlflow_store, new_head)  # MLflow's tables, no runs
    runner = CliRunner()
    for destination in [str(tmp_path / "bucket" / "mlflow.db"), (tmp_path / "s3").as_uri()]:
        result = runner.invoke(app, ["tracking", "backup", str(old_head), destination])
        assert result.exit_code == 0, result.output
        written = _read(destination)
        for every in [[], ["--every", "0.05"]]:
            command = ["tracking", "backup", str(new_head), destination, *every]
            result = runner.invoke(app, command)
            assert result.exit_code == 1, result.output
            said = result.stderr.replace("\n", " ").strip()
            assert said.startswith(f"error: {destination} holds 2 run(s), none of which {new_head}")
            assert said.endswith(
                "not replaced (was the store restored from it?); pass --force to replace it"
            )
            assert _read(destination) == written
        result = runner.invoke(app, ["tracking", "backup", str(new_head), destination, "--force"])
        assert result.exit_code == 0, result.output
        assert _read(destination) != written
    assert sorted(p.name for p in (tmp_path / "bucket").iterdir()) == ["mlflow.db"]

    # A run deleted and purged (`mlflow gc`) since the last backup: the store still shares
    # the other run with the backup, which is replaced.
    gone = tmp_path / "bucket" / "gc.db"
    assert runner.invoke(app, ["tracking", "backup", str(old_head), str(gone)]).exit_code == 0
    first = client.search_runs([client.get_experiment_by_name("backup").experiment_id])[0]
    client.delete_run(first.info.run_id)
    store = f"sqlite:///{old_head}"
    purge = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", store]
    subprocess.run(purge, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "MLFLOW_TRACKING_URI": store})  # fmt: skip
    with pytest.raises(MlflowException):
        client.get_run(first.info.run_id)  # purged, not only deleted
    result = runner.invoke(app, ["tracking", "backup", str(old_head), str(gone)])
    assert result.exit_code == 0, result.output

    not_a_store = tmp_path / "bucket" / "other.db"  # not readable as a store: replaced
    not_a_store.write_bytes(b"something else")
    result = runner.invoke(app, ["tracking", "backup", str(new_head), str(not_a_store)])
    assert result.exit_code == 0 and not_a_store.read_bytes() != b"something else"


def test_a_backup_loop_checks_the_runs_on_its_first_round_only(tmp_path, monkeypatch):
    """Runs gone from the store while the loop goes on: the loop replaces its own backup,
    which it fetches only once. Between the rounds every run it backed up is gone (a check on
    the second round would refuse: the backup's runs, none in the store)."""
    import sqlite3
    import time

    from typer.testing import CliRunner

    from svt_ray.cli import app
    from svt_ray.tracking import run_ids

    database, destination = tmp_path / "mlflow.db", tmp_path / "bucket" / "mlflow.db"
    with sqlite3.connect(database) as store:
        store.execute("CREATE TABLE runs (run_uuid TEXT, lifecycle_stage TEXT)")
        store.executemany("INSERT INTO runs VALUES (?, 'active')", [("a",), ("b",)])
    rounds = []

    def between_rounds(seconds):
        rounds.append(len(run_ids(destination)))
        if len(rounds) == 2:
            raise KeyboardInterrupt  # Ctrl-C: the loop's only way out
        with sqlite3.connect(database) as store:
            store.execute("DELETE FROM runs")
            store.execute("INSERT INTO runs VALUES ('c', 'active')")

    monkeypatch.setattr(time, "sleep", between_rounds)
    command = ["tracking", "backup", str(database), str(destination), "--every", "300"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 130, result.output  # typer's code for Ctrl-C
    assert rounds == [2, 1] and run_ids(destination) == {"c"}


def test_a_backup_loop_sees_commits_to_a_store_in_wal_mode(tmp_path, monkeypatch):
    """In WAL mode (`mlflow migrate-filestore` sets it) a commit goes to DATABASE-wal and the
    file itself changes only at a checkpoint: the loop, watching the file alone, never copied
    again."""
    import sqlite3
    import time
    from contextlib import closing

    from typer.testing import CliRunner

    from svt_ray.cli import app
    from svt_ray.tracking import run_ids

    database, destination = tmp_path / "mlflow.db", tmp_path / "bucket" / "mlflow.db"
    with closing(sqlite3.connect(database, isolation_level=None)) as server:
        assert server.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        server.execute("CREATE TABLE runs (run_uuid TEXT, lifecycle_stage TEXT)")
        server.execute("INSERT INTO runs VALUES ('a', 'active')")
        rounds = []

        def between_rounds(seconds):  # the server, open throughout, commits a run
            rounds.append(len(run_ids(destination)))
            if len(rounds) == 2:
                raise KeyboardInterrupt
            server.execute("INSERT INTO runs VALUES ('b', 'active')")

        monkeypatch.setattr(time, "sleep", between_rounds)
        command = ["tracking", "backup", str(database), str(destination), "--every", "300"]
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 130, result.output
    assert rounds == [1, 2]


def test_the_viewing_hint_fits_the_store():
    """`mlflow ui --backend-store-uri http://...` fails: a server is its own UI."""
    from svt_ray.tracking import viewing_hint

    assert (
        viewing_hint("http://127.0.0.1:5000")
        == "open http://127.0.0.1:5000 (the MLflow server's UI)"
    )
    assert viewing_hint("sqlite:////tmp/my runs/mlflow.db") == (
        "mlflow ui --backend-store-uri 'sqlite:////tmp/my runs/mlflow.db'"
    )


def test_values_sent_make_room_for_later_ones(tmp_path, monkeypatch):
    """HELD_VALUES_LIMIT bounds what an outage holds back, not what a run sends: with room for
    3 values, 8 steps logged with the store up all reach it."""
    from svt_ray import tracking

    monkeypatch.setattr(tracking, "HELD_VALUES_LIMIT", 3)
    run = MLflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "t", "r", tmp_path / "r")
    for step in range(1, 9):
        run.log_metrics({"loss": float(step)}, step=step)
        assert run.flush(timeout_s=30)
    run.close()
    history = run.client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))


def test_sync_sends_more_values_than_one_call_takes(tmp_path, monkeypatch):
    """`tracking sync` sends what MLflow lacks in calls of METRICS_PER_CALL values: all of
    them, not the first call's."""
    from svt_ray import tracking

    monkeypatch.setattr(tracking, "METRICS_PER_CALL", 2)
    run = MLflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "t", "r", tmp_path / "r")
    run.close()
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"clips_seen": step, "time": 1.0, "loss": float(step)} for step in range(1, 6)]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert sync_metrics(run.tracking_uri, run.run_id, metrics) == [1, 2, 3, 4, 5]
    history = run.client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
