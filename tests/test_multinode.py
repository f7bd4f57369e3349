"""What happens to a run when Ray cannot place its workers, or loses a node mid-run.

The guarantee: a lost node counts as one worker failure (`train.max_failures`); Ray Train then
restarts the whole worker group from the latest checkpoint as soon as the cluster has room
for all workers again, on the nodes left or on a replacement. It waits for that room at most
`train.wait_for_workers_s` (in all); then `run_pretraining` stops with a `RunStoppedError`
that names the lost nodes and the `--resume` command, instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import SHORT_RUN

from svt_ray.config import load_config
from svt_ray.train import (
    RunStoppedError,
    _start_timeouts_allowed,
    _stopped_message,
    run_pretraining,
)

HERE = Path(__file__).parent
STARTING = "Attempting to start training worker group"  # Ray Train controller's log lines
STARTED = "Started training worker group"


def test_the_wait_for_workers_becomes_a_number_of_start_timeouts(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    assert _start_timeouts_allowed(None) == -1  # Ray's default: retry forever
    assert _start_timeouts_allowed(1200) == 19  # 20 starts of 60 s
    assert _start_timeouts_allowed(30) == 0  # one start, which already waits 60 s
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "4")
    assert _start_timeouts_allowed(10) == 2


def test_the_stop_message_names_the_lost_nodes_and_the_resume_command(tmp_path):
    import ray.train

    runs = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    config = load_config(
        "tiny", overrides=[f"train.storage_path={runs}", "scaling.num_workers=2",
                           "train.max_failures=1", "scaling.address=127.0.0.1:6379"]
    )  # fmt: skip
    error = ray.train.WorkerGroupError("rank 1 died", {1: RuntimeError("gone\ntraceback")})
    lost = {("a" * 56, "127.0.0.2")}
    message = _stopped_message(config, "run-a", str(tmp_path), error, lost)
    assert "its workers failed more than train.max_failures=1 times" in message
    assert "the last time, rank 1: RuntimeError: gone;" in message
    assert "once the cluster has room for 2 workers" in message  # a node was lost
    # The same error each time, no node lost: a bug or a bad setting; more room will not help.
    alone = _stopped_message(config, "run-a", str(tmp_path), error, set())
    assert "room" not in alone and "once the cause is fixed" in alone
    assert f"Ray nodes lost during the run: 127.0.0.2 (node {'a' * 12})" in message
    assert "no checkpoint yet" in message
    resume = f"svt-ray pretrain --resume run-a --storage '{runs}' --address 127.0.0.1:6379"
    assert f"`{resume}`" in message  # quoted for the shell: the URI holds '&'
    # Nothing to keep: --resume would keep the settings that may have caused this.
    assert "run your svt-ray pretrain command again, with other settings if they" in message
    (tmp_path / "progress.json").write_text('{"step": 4}')
    kept = _stopped_message(config, "run-a", str(tmp_path), error, lost)
    assert "checkpoints up to step 4" in kept and "your svt-ray pretrain command" not in kept


@pytest.mark.ray
def test_a_run_without_room_for_its_workers_stops_instead_of_waiting_forever(
    tmp_path, synthetic_shards, ray_session, monkeypatch
):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3")  # reaches the controller
    config = load_config(
        "tiny",
        overrides=[
            *SHORT_RUN,
            f"data.path={synthetic_shards}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.run_name=no-room",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=3",  # 6 CPUs on a 4-CPU Ray: never placed
            "train.wait_for_workers_s=5",
        ],
    )
    started = time.monotonic()
    with pytest.raises(RunStoppedError) as stopped:
        run_pretraining(config)
    assert time.monotonic() - started < 120
    message = str(stopped.value)
    assert "no room for 2 workers of 3 CPU within train.wait_for_workers_s=5" in message
    assert "no checkpoint yet" in message
    assert f"svt-ray pretrain --resume no-room --storage {tmp_path / 'runs'}" in message


# -- a node lost mid-run, on a real 2-node cluster --------------------------------------------


class LocalCluster:
    """`tests/local_cluster.py` in its own process group: head + one worker node."""

    def __init__(self, env: dict[str, str], cpus: int, log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "local_cluster.py"), "--cpus", str(cpus)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 (closed with the process)
            text=True,
            env=env,
            start_new_session=True,
        )
        self.address = self.answer(timeout=120)["address"]

    def answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"local cluster did not answer within {timeout}s")
        return json.loads(line)

    def command(self, name: str, timeout: float = 60) -> dict:
        self.process.stdin.write(f"{name}\n")
        self.process.stdin.flush()
        return self.answer(timeout)

    def stop(self) -> None:
        try:
            self.process.stdin.close()  # end of input: the helper shuts the cluster down
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)  # the nodes share its fate
            self.process.wait(timeout=30)


def wait_for(condition, timeout: float, what: str, driver: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout}s:\n{tail(log)}")
        time.sleep(1)


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.extended  # 3 minutes; run it when the failure handling or Ray changes
@pytest.mark.slow
@pytest.mark.ray
def test_a_run_that_loses_a_node_restarts_from_its_checkpoint_when_a_node_is_back(
    tmp_path, synthetic_shards, private_ray_env, mlflow_server
):
    """Tracked as on a cluster: an `mlflow server` that rank 0 reaches over HTTP from its node,
    before and after the restart."""
    # A cluster of its own, with a private auth token.
    env = {**private_ray_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    runs, log = tmp_path / "runs", tmp_path / "driver.log"
    progress = runs / "lost-node" / "progress.json"
    cluster = driver = None
    try:
        # 3 CPUs per node and 2 per worker: one worker per node, one CPU each for Ray Data.
        cluster = LocalCluster(env, cpus=3, log=tmp_path / "cluster.log")
        settings = [*SHORT_RUN, "scaling.cpus_per_worker=2", "train.max_failures=1",
                    "train.wait_for_workers_s=600"]  # fmt: skip
        driver = subprocess.Popen(
            [str(Path(sys.executable).parent / "svt-ray"), "pretrain", "--preset", "tiny",
             "--address", cluster.address, "--workers", "2", "--data", str(synthetic_shards),
             "--storage", str(runs), "--run-name", "lost-node",
             "--tracking-uri", mlflow_server,
             *[flag for setting in settings for flag in ("--set", setting)]],
            stdout=open(log, "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        wait_for(progress.exists, 300, "first checkpoint", driver, log)
        cluster.command("remove")  # the worker node dies with its Train worker
        # Ray Train counts one failure and starts a new worker group, which needs 2 x 2 CPUs
        # while 3 are left: it waits for room.
        wait_for(lambda: log.read_text(errors="replace").count(STARTING) >= 2, 120,
                 "restart after the failure", driver, log)  # fmt: skip
        time.sleep(3)
        waited = log.read_text(errors="replace")
        cluster.command("add")  # the autoscaler's replacement node
        driver.wait(timeout=300)
        output = log.read_text(errors="replace")
        assert driver.returncode == 0, tail(log)
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        if cluster is not None:
            cluster.stop()

    assert "[FailurePolicy] RETRY" in output and "Error count: 1 (max allowed: 1)" in output
    assert waited.count(STARTED) == 1 and output.count(STARTED) == 2  # only with the new node
    assert json.loads(progress.read_text()) == {"step": 6}
    assert (runs / "lost-node" / "checkpoint_00000006" / "state.pt").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)  # shared by the session: find this run
    experiment_id = client.get_experiment_by_name("svt-ray").experiment_id
    (run,) = client.search_runs([experiment_id], "attributes.run_name = 'lost-node'")
    assert run.info.status == "FINISHED"
    assert 2 <= int(run.data.tags["svt.resumed_at_step"]) < 6  # from a checkpoint, not step 0
    logged = [metric.step for metric in client.get_metric_history(run.info.run_id, "loss")]
    assert logged == [4 * (i + 1) for i in range(6)]
