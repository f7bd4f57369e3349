"""Shared fixtures: a session-wide local Ray, small synthetic video collections."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# Credentials for the local S3 server (`s3_server`). Fake ones also keep the tests away from a
# developer's real account; no metadata-service lookups either (they stall off EC2).
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "svt-ray-test",
    "AWS_SECRET_ACCESS_KEY": "svt-ray-test",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(name: str, command: list[str], health_url: str, root, timeout_s: float, poll_s: float):
    """Run a server process until the block ends: wait until `health_url` answers 200 (its
    stderr goes to root/server.log, shown if it never does), then terminate it."""
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115 (closed with the process)
    )
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"{name} did not start: {(root / 'server.log').read_text()}")
        time.sleep(poll_s)
    try:
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with more logical CPUs than this machine has cores.

    The dashboard stays on: without its State API, Train placement groups of finished Tune
    trials leak and the next trial hangs (ray_notes.md §6.2). `FAKE_AWS_ENV`, and the
    `LOCAL_RAY_ENV` that `svt-ray` gives a local Ray it starts, are set before `ray.init`,
    because Ray's worker processes inherit the environment of the process that starts Ray,
    not later changes to it.
    """
    ray = pytest.importorskip("ray")
    from svt_ray.cluster import LOCAL_RAY_ENV

    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**FAKE_AWS_ENV, **LOCAL_RAY_ENV}.items():
            patch.setenv(name, value)
        if started:
            ray.init(
                address="local",  # not a cluster `ray start` left running here
                num_cpus=4,
                include_dashboard=True,
                object_store_memory=1_500_000_000,
                logging_level="WARNING",
            )
        yield ray
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory):
    """A folder-per-class collection of 20 small synthetic clips (4 classes, 40 frames, 64 px).

    The `objects` style: data_prep's ids hash the relative path, class folder included, so
    the split (3 steps of 4 clips per epoch, which `factories.SHORT_RUN` and the step counts
    of the tests rely on) depends on the style's class names. The demo's and studies' tests
    use the default `scene` style."""
    from svt_ray.synthetic import SynthConfig, generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    config = SynthConfig(
        num_clips=20, num_classes=4, num_frames=40, height=64, width=80, seed=7, style="objects"
    )
    generate_dataset(str(root), config)
    return root, config


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_videos, ray_session, tmp_path_factory):
    """`synthetic_videos` prepared by data_prep (short side 64, ~20% val), 4 clips per shard."""
    import data_prep

    root, _ = synthetic_videos
    out = tmp_path_factory.mktemp("shards")
    code = data_prep.main(
        [
            str(root),
            str(out),
            "--short-side",
            "64",
            "--val-fraction",
            "0.2",
            "--max-videos-per-shard",
            "4",
            "--min-frames",
            "8",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory):
    """An MLflow SQLite store with MLflow's tables and nothing else, made once a session:
    MLflow takes 2-3 s of a 2-core machine to create and migrate one, and about 30 tests
    need a store of their own (`mlflow_db`). The tests that run the commands as a user does
    (the demo, `svt-ray pretrain`) still have MLflow create theirs."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("empty_mlflow_store")
    with contextlib.chdir(folder):  # the Default experiment's artifact folder: in there
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_db(tmp_path, empty_mlflow_store):
    """`tmp_path / "mlflow.db"`: an empty MLflow store of this test's own (a copy)."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(empty_mlflow_store, path)
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied file artifacts), stopped
    at the end of the session. Yields its http:// URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", (root / "artifacts").as_uri(),
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    with serving("mlflow server", command, f"{uri}/health", root, timeout_s=120, poll_s=1):
        yield uri


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, ray_session):
    """A local S3-compatible server (moto's server mode) on 127.0.0.1, stopped at the end of the
    session. Yields the pyarrow URI query that points an `s3://` URI at it; the credentials
    are `FAKE_AWS_ENV`, which `ray_session` gives the driver and every Ray worker."""
    pytest.importorskip("moto.server", reason="moto[server] is in the [test] extra")
    root = tmp_path_factory.mktemp("s3_server")
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    health = f"http://127.0.0.1:{port}/moto-api/"
    with serving("moto server", command, health, root, timeout_s=60, poll_s=0.3):
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http"


@pytest.fixture
def private_ray_env():
    """Environment for a subprocess that starts a Ray instance of its own: none of this
    session's RAY_ settings, and a private temp dir (short: socket paths are limited)."""
    ray_tmp = tempfile.mkdtemp(prefix="svt-ray-", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """A test that needs the Ray session, even through a fixture (`synthetic_shards`,
    `s3_server`), is a `ray` test: `-m "not ray"` then starts no Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
