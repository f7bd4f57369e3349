"""Shared fixtures: a session-wide local Ray, small synthetic video collections."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with more logical CPUs than this machine has cores.

    The dashboard stays on: without its State API, Train placement groups of finished Tune
    trials leak and the next trial hangs (ray_notes.md §6.2).
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
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
    """A folder-per-class collection of 20 small synthetic clips (4 classes, 40 frames, 64 px)."""
    from svt_ray.synthetic import SynthConfig, generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    config = SynthConfig(num_clips=20, num_classes=4, num_frames=40, height=64, width=80, seed=7)
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
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied file artifacts), stopped
    at the end of the session. Yields its http:// URI."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", (root / "artifacts").as_uri()],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115 (closed with the process)
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()}")
        time.sleep(1)
    yield uri
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
