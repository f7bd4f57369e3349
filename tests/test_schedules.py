"""Schedules are pure functions of the step with closed forms."""

from __future__ import annotations

import math

import pytest

from svt_ray.config import load_config
from svt_ray.schedules import Schedule, cosine, learning_rate, teacher_temperature


def test_learning_rate_warmup_then_cosine():
    peak, final, warmup, total = 1e-3, 1e-6, 10, 110
    assert learning_rate(0, peak, final, warmup, total) == 0.0
    assert learning_rate(5, peak, final, warmup, total) == pytest.approx(peak / 2)
    assert learning_rate(10, peak, final, warmup, total) == pytest.approx(peak)
    assert learning_rate(60, peak, final, warmup, total) == pytest.approx((peak + final) / 2)
    assert learning_rate(110, peak, final, warmup, total) == pytest.approx(final)
    assert learning_rate(500, peak, final, warmup, total) == pytest.approx(final)
    k = 35
    closed = final + 0.5 * (peak - final) * (
        1 + math.cos(math.pi * (k - warmup) / (total - warmup))
    )
    assert learning_rate(k, peak, final, warmup, total) == pytest.approx(closed)


def test_teacher_momentum_is_the_dino_cosine():
    base, total = 0.996, 1000
    for k in (0, 1, 250, 500, 999, 1000):
        closed = 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        assert cosine(k, total, base, 1.0) == pytest.approx(closed)


def test_teacher_temperature_warmup():
    assert teacher_temperature(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(5, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_schedule_from_a_resolved_config():
    config = load_config("paper").resolve(clips_per_epoch=320)  # 10 steps per epoch
    schedule = Schedule.from_config(config)
    assert schedule.total_steps == 200 and schedule.warmup_steps == 100
    start, middle, end = schedule.at(0), schedule.at(100), schedule.at(200)
    assert start.lr == 0 and middle.lr == pytest.approx(6.25e-5) and end.lr == pytest.approx(1e-6)
    assert start.weight_decay == pytest.approx(0.04) and end.weight_decay == pytest.approx(0.4)
    assert start.momentum == pytest.approx(0.996) and end.momentum == pytest.approx(1.0)
    assert start.freeze_last_layer and not schedule.at(10).freeze_last_layer
    assert schedule.at(9).freeze_last_layer  # the epoch's last step is still frozen
    assert config.derived.freeze_last_layer_steps == 10  # 1 epoch (DINO)
    assert config.derived.teacher_temp_warmup_steps == 0  # svt_spec §3.3: no warm-up
    assert start.teacher_temp == end.teacher_temp == pytest.approx(0.04)  # constant
    # Step 73: 73% through the warm-up, 73/200 through both cosines.
    half_cosine = 0.5 * (1 + math.cos(math.pi * 73 / 200))
    values = schedule.at(73)
    assert values.lr == pytest.approx(6.25e-5 * 73 / 100)  # 4.5625e-5
    assert values.weight_decay == pytest.approx(0.4 + (0.04 - 0.4) * half_cosine)  # 0.14593
    assert values.weight_decay == pytest.approx(0.1459274, rel=1e-6)
    assert values.momentum == pytest.approx(1 - (1 - 0.996) * half_cosine)  # 0.99718
    assert values.momentum == pytest.approx(0.9971770, rel=1e-7)
    assert values.teacher_temp == pytest.approx(0.04)
    assert not values.freeze_last_layer


def test_schedule_warms_the_teacher_temperature_up_from_warmup_teacher_temp():
    """DINO's ViT-B recipe on the paper preset: 0.04 at step 0, linear to 0.07 over 3 epochs
    (30 steps), then 0.07."""
    overrides = ["loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=3"]
    config = load_config("paper", overrides=overrides).resolve(clips_per_epoch=320)
    assert config.loss.warmup_teacher_temp == 0.04  # the paper preset's value, kept
    assert config.derived.teacher_temp_warmup_steps == 30
    schedule = Schedule.from_config(config)
    assert schedule.at(0).teacher_temp == pytest.approx(0.04)
    assert schedule.at(10).teacher_temp == pytest.approx(0.04 + 0.03 * 10 / 30)  # 0.05
    assert schedule.at(15).teacher_temp == pytest.approx(0.055)  # halfway
    assert schedule.at(30).teacher_temp == pytest.approx(0.07)
    assert schedule.at(150).teacher_temp == pytest.approx(0.07)


def test_schedule_needs_a_resolved_config():
    with pytest.raises(ValueError, match="resolve"):
        Schedule.from_config(load_config("tiny"))
