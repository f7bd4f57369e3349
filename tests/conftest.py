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
