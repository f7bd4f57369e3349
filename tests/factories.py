"""Small, seeded building blocks shared by the core tests."""

from __future__ import annotations

import torch

from svt_ray.config import ExperimentConfig, load_config
from svt_ray.views import view_slots

# A model small enough for CPU tests in milliseconds; views stay those of the preset.
SMALL_MODEL = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.head_hidden_dim=64",
    "model.head_bottleneck_dim=32",
    "model.head_out_dim=256",
]

# A pretraining run short enough for a test on 2 CPUs: 2 epochs of `synthetic_shards`' training
# split in global batches of 4 (6 steps), a checkpoint every 2 steps.
SHORT_RUN = [
    *SMALL_MODEL,
    "optim.batch_size=4",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "data.shuffle_buffer=0",
    "data.decode_actors=1",
    "train.checkpoint_every=2",
    "eval.linear_epochs=5",
]


def small_config(preset: str = "tiny", *overrides: str) -> ExperimentConfig:
    return load_config(preset, overrides=[*SMALL_MODEL, *overrides])


def random_views(config: ExperimentConfig, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """One uint8 (b, 3, t, s, s) tensor per view slot."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (batch, *slot.shape), dtype=torch.uint8, generator=generator)
        for slot in view_slots(config.views)
    ]


def moving_square_views(config: ExperimentConfig, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Views with structure (a bright square at a per-sample position) rather than noise."""
    generator = torch.Generator().manual_seed(seed)
    views = []
    positions = torch.rand(batch, 2, generator=generator)
    for slot in view_slots(config.views):
        size = slot.size
        video = torch.full((batch, 3, slot.frames, size, size), 40, dtype=torch.uint8)
        for i in range(batch):
            for t in range(slot.frames):
                y = int((positions[i, 0] * 0.5 + 0.05 * t / slot.frames) * size)
                x = int(positions[i, 1] * 0.5 * size)
                video[i, :, t, y : y + size // 3, x : x + size // 3] = 220
        views.append(video)
    return views


class RayStarted(Exception):
    """Raised in place of starting Ray: a test of what is checked before it sees it."""


def no_ray(*args, **kwargs):
    """Stands for `ensure_ray` in tests of what happens before Ray starts."""
    raise RayStarted
