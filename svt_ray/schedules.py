"""Learning rate, weight decay, teacher momentum and temperature as pure functions of the step.

Like nanoGPT's `get_lr` and MAE's `lr_sched.py`: nothing to replay on resume, the value at
step k is computed from k alone. The shapes follow DINO's `utils.cosine_scheduler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from svt_ray.config import ExperimentConfig


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (and after)."""
    if total_steps <= 0:
        return end
    progress = min(max(step, 0) / total_steps, 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(
    step: int, peak: float, final: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then a cosine down to `final`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up of the teacher temperature, then constant (DINO)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool


@dataclass(frozen=True)
class Schedule:
    """Every schedule of a resolved experiment; `at(step)` is all the training loop asks."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> Schedule:
        derived = config.derived
        if derived is None:
            raise ValueError(
                "the schedule needs a resolved config: call config.resolve(clips) first"
            )
        optim, loss = config.optim, config.loss
        return cls(
            peak_lr=derived.lr,
            min_lr=derived.min_lr,
            warmup_steps=derived.warmup_steps,
            total_steps=derived.total_steps,
            weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end,
            momentum=optim.momentum_teacher,
            momentum_end=optim.momentum_teacher_end,
            teacher_temp=loss.teacher_temp,
            warmup_teacher_temp=loss.warmup_teacher_temp,
            teacher_temp_warmup_steps=derived.teacher_temp_warmup_steps,
            freeze_last_layer_steps=derived.freeze_last_layer_steps,
        )

    def at(self, step: int) -> ScheduleValues:
        return ScheduleValues(
            lr=learning_rate(step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps),
            weight_decay=cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            momentum=cosine(step, self.total_steps, self.momentum, self.momentum_end),
            teacher_temp=teacher_temperature(
                step, self.teacher_temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp
            ),
            freeze_last_layer=step < self.freeze_last_layer_steps,
        )
