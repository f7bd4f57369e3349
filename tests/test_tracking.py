"""MLflow tracking: fail fast on a dead store, survive an outage mid-run, never log twice."""

from __future__ import annotations

import json

import pytest

from svt_ray.tracking import (
    MLflowTracker,
    NullTracker,
    TrackingUnavailableError,
    check_tracking_uri,
    make_tracker,
    plot_training_curves,
)


def test_unreachable_server_fails_before_training():
    with pytest.raises(TrackingUnavailableError, match=r"127\.0\.0\.1:9 is unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout_s=2)


def test_file_store_and_missing_folder_are_explained(tmp_path):
    with pytest.raises(TrackingUnavailableError, match="no longer writes file stores"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    with pytest.raises(TrackingUnavailableError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")


def test_only_rank_zero_tracks(tmp_path):
    assert isinstance(make_tracker(1, tracking_uri="unused"), NullTracker)


def tracker(tmp_path, **kwargs) -> MLflowTracker:
    return MLflowTracker(
        f"sqlite:///{tmp_path}/mlflow.db", "tests", "run", tmp_path / "run", **kwargs
    )


def test_outage_mid_run_keeps_training_and_the_local_record(tmp_path, caplog):
    run = tracker(tmp_path)

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    run.client.log_batch = broken
    run.log_metrics({"loss": 1.5}, step=8)
    run.log_metrics({"loss": 1.4}, step=16)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["clips_seen"], x["loss"]) for x in lines] == [(8, 1.5), (16, 1.4)]
    assert "training goes on" in caplog.text


def test_resumed_tracker_skips_steps_already_logged(tmp_path):
    first = tracker(tmp_path)
    for step in (4, 8, 12):
        first.log_metrics({"loss": float(step)}, step=step)
    again = tracker(tmp_path, run_id=first.run_id)
    assert again.last_logged == 12
    for step in (8, 12, 16):  # a restart from the checkpoint at 4 redoes 8 and 12
        again.log_metrics({"loss": -1.0}, step=step)
    history = again.client.get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [
        (4, 4.0),
        (8, 8.0),
        (12, 12.0),
        (16, -1.0),
    ]


def test_training_curves_plot(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"clips_seen": i * 4, "loss": 5 - i, "collapse_uniform": 0.5}) + "\n"
            for i in range(5)
        )
    )
    png = plot_training_curves(metrics, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_training_curves(tmp_path / "absent.jsonl", tmp_path / "x.png") is None


def test_relative_sqlite_uri_is_pinned_for_workers(tmp_path, monkeypatch):
    from svt_ray.tracking import absolute_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_sqlite_artifacts_live_beside_the_database(tmp_path):
    run = tracker(tmp_path)
    (tmp_path / "note.txt").write_text("hello")
    run.log_artifact(tmp_path / "note.txt")
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
    tmp_path, caplog, monkeypatch
):
    """A Train worker joins the driver's run; where the store is unreachable from its node it
    warns once and keeps metrics.jsonl, without waiting out MLflow's retries on every call."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's 7 take minutes
    first = tracker(tmp_path)
    worker = MLflowTracker(
        "http://127.0.0.1:9", "tests", "run", tmp_path / "worker", run_id=first.run_id
    )
    assert worker.offline and "not reachable from this node" in caplog.text

    def no_call(*args, **kwargs):
        raise AssertionError("an offline tracker called MLflow")

    worker.client.log_batch = worker.client.set_terminated = no_call
    worker.log_metrics({"loss": 1.0}, step=4)
    worker.finish()
    lines = (tmp_path / "worker" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["clips_seen"] for line in lines] == [4]
