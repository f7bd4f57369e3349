"""What MLflow logging costs the training thread, per step, with `mlflow server` up and down.

Run: `python benchmarks/tracking.py` (about a minute; `--steps`, `--down-steps` for more).

Rank 0 logs about 30 values every step (`train.log_every=1`). Two ways to log them, measured
in the same run against one `mlflow server` on 127.0.0.1 (SQLite store, as on the cluster's
head), as the time a `log` call holds the training thread:

- synchronous: `MlflowClient.log_batch` on the training thread (svt-ray before its tracker
  had a thread of its own);
- tracker: `svt_ray.tracking.MLflowTracker.log_metrics` (metrics.jsonl, then queued; its
  thread sends), plus, once, the time `flush()` takes at the end to drain the queue.

Then the server is stopped (an outage) and both are timed again: the synchronous call waits
out MLflow's retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`, as rank 0 sets it). Prints a
Markdown table; the figures in README.md ("Tracking") come from it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # as make_tracker sets it

from svt_ray.tracking import MLflowTracker, TrackingUnavailableError, check_tracking_uri  # noqa: E402

KEYS = [f"metric_{index:02d}" for index in range(30)]  # about what one training step logs


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    root.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while True:
        try:
            check_tracking_uri(uri, timeout_s=2)
            return server, uri
        except TrackingUnavailableError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise SystemExit("mlflow server did not start") from None
            time.sleep(0.5)


def values(step: int) -> dict[str, float]:
    return {key: step + index / 100 for index, key in enumerate(KEYS)}


def time_calls(call, steps: range) -> list[float]:
    """Seconds each call(step) held the caller."""
    seconds = []
    for step in steps:
        started = time.perf_counter()
        call(step)
        seconds.append(time.perf_counter() - started)
    return seconds


def synchronous(client, run_id: str):
    from mlflow.entities import Metric

    def log(step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values(step).items()]
        with contextlib.suppress(Exception):  # what svt-ray did in an outage: warn, go on
            client.log_batch(run_id, metrics=metrics)

    return log


def row(store: str, state: str, path: str, seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    return (
        f"| {store} | {state} | {path} | {len(ms)} | {statistics.median(ms):.2f} | {ms[-1]:.2f} | "
        f"{sum(ms) / 1000:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="logged steps, server up")
    parser.add_argument("--down-steps", type=int, default=3, help="logged steps, server down")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    rows, drained = [], {}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        server, uri = start_server(root / "server")
        try:
            stores = {"server": uri, "SQLite file": f"sqlite:///{root / 'direct.db'}"}
            trackers = {}
            for store, store_uri in stores.items():
                client = MlflowClient(store_uri)
                sync_run = client.create_run(client.create_experiment("benchmark")).info.run_id
                tracker = MLflowTracker(store_uri, "benchmark", "tracker", root / store)
                up = range(args.steps)
                log = synchronous(client, sync_run)
                rows.append(row(store, "up", "synchronous log_batch", time_calls(log, up)))
                logged = time_calls(lambda step, t=tracker: t.log_metrics(values(step), step), up)
                rows.append(row(store, "up", "tracker.log_metrics", logged))
                started = time.perf_counter()
                assert tracker.flush(timeout_s=300), "the tracker did not drain"
                drained[store] = time.perf_counter() - started
                history = client.get_metric_history(tracker.run_id, KEYS[-1])
                assert sorted(m.step for m in history) == list(up), "the tracker lost values"
                trackers[store] = (client, sync_run, tracker)
        finally:
            server.terminate()
            server.wait(timeout=30)
        client, sync_run, tracker = trackers["server"]
        down = range(args.steps, args.steps + args.down_steps)
        log = synchronous(client, sync_run)
        rows.append(row("server", "down", "synchronous log_batch", time_calls(log, down)))
        logged = time_calls(lambda step: tracker.log_metrics(values(step), step), down)
        rows.append(row("server", "down", "tracker.log_metrics", logged))
        tracker._sender.stop()
    print(f"{len(KEYS)} values per step; `mlflow server` on 127.0.0.1 with a SQLite store, or")
    print("the SQLite file itself (a laptop run's default); ms the call held the training thread\n")
    print("| store | state | path | steps | median ms | max ms | total s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for store, seconds in drained.items():
        print(f"\ntracker, {store}: flush() after the {args.steps} steps took {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
