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
