"""The SVT loss against written-out references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svt_ray.losses import SVTLoss, collapse_metrics, koleo, sinkhorn_knopp


def explicit_loss(student, teacher, center, student_temp, teacher_temp, w_cross, w_motion, g):
    """The reference code's DINOLoss as a double loop, with the per-kind weights."""
    total, count = 0.0, 0
    for i in range(g):
        q = F.softmax((teacher[i] - center) / teacher_temp, dim=-1)
        for v in range(student.shape[0]):
            if v == i:
                continue
            weight = w_motion if v < g else w_cross
            if weight == 0:
                continue
            term = torch.sum(-q * F.log_softmax(student[v] / student_temp, dim=-1), dim=-1).mean()
            total += weight * term
            count += 1
    return total / count


@pytest.mark.parametrize(("w_cross", "w_motion"), [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_loss_equals_the_double_loop(w_cross, w_motion):
    torch.manual_seed(0)
    g, num_local, b, k = 2, 8, 4, 32
    student, teacher = torch.randn(g + num_local, b, k), torch.randn(g, b, k)
    loss = SVTLoss(
        k, g, num_local, student_temp=0.1, cross_view_weight=w_cross, motion_weight=w_motion
    )
    loss.center.copy_(torch.randn(1, k) * 0.1)
    got = loss(student, teacher, teacher_temp=0.04)["loss"]
    want = explicit_loss(student, teacher, loss.center, 0.1, 0.04, w_cross, w_motion, g)
    torch.testing.assert_close(got, want)


def test_default_weights_are_the_reference_18_term_average():
    torch.manual_seed(1)
    student, teacher = torch.randn(10, 3, 16), torch.randn(2, 3, 16)
    loss = SVTLoss(16, 2, 8)
    assert loss.num_active_terms == 18
    out = loss(student, teacher, 0.04)
    torch.testing.assert_close(out["loss"], (2 * out["motion"] + 16 * out["cross_view"]) / 18)


def test_a_zero_weight_term_contributes_nothing():
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 3, 16), torch.randn(2, 3, 16)
    only_cross = SVTLoss(16, 2, 4, motion_weight=0.0)
    changed = student.clone()
    changed[1] += 5 * torch.randn(3, 16)  # the student's second global only enters motion terms
    a = only_cross(student, teacher, 0.04)["loss"]
    b = only_cross(changed, teacher, 0.04)["loss"]
    torch.testing.assert_close(a, b)


def test_gradient_flows_to_the_student_only():
    student = torch.randn(6, 3, 16, requires_grad=True)
    teacher = torch.randn(2, 3, 16, requires_grad=True)
    SVTLoss(16, 2, 4)(student, teacher, 0.04)["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_center_update_is_an_ema_of_the_batch_mean():
    torch.manual_seed(3)
    loss = SVTLoss(8, 2, 2, center_momentum=0.9)
    teacher = torch.randn(2, 5, 8)
    previous = torch.randn(1, 8)
    loss.center.copy_(previous)
    loss.update_center(teacher)
    expected = 0.9 * previous + 0.1 * teacher.reshape(-1, 8).mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, expected)


def written_out_sinkhorn(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """DINOv2's `sinkhorn_knopp_teacher` on one rank, in float64: (rows, k) -> (rows, k)."""
    q = np.exp(logits.astype(np.float64) / temperature).T  # (k, rows)
    k, rows = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)  # every prototype the same total mass...
        q /= k
        q /= q.sum(axis=0, keepdims=True)  # ...and every sample a distribution
        q /= rows
    return (q * rows).T


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_equals_the_written_out_dinov2_algorithm(iterations):
    """T = 0.5 on a 6 x 5 matrix, few iterations: far from the fixed point, so the temperature
    and the order of the normalisations show."""
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    got = sinkhorn_knopp(torch.from_numpy(logits), temperature=0.5, iterations=iterations)
    want = written_out_sinkhorn(logits, 0.5, iterations)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_sinkhorn_targets_balance_prototypes():
    torch.manual_seed(4)
    logits = torch.randn(64, 16)
    q = sinkhorn_knopp(logits, temperature=0.5, iterations=30)
    torch.testing.assert_close(
        q.sum(1), torch.ones(64), atol=1e-4, rtol=0
    )  # rows are distributions
    torch.testing.assert_close(q.sum(0), torch.full((16,), 4.0), atol=1e-3, rtol=0)  # equal shares


def explicit_cross_entropy(student, targets, student_temp, g):
    """Mean over the teacher x student pairs (v != i) of H(target_i, softmax(student_v / T))."""
    terms = [
        torch.sum(-targets[i] * F.log_softmax(student[v] / student_temp, dim=-1), dim=-1).mean()
        for i in range(g)
        for v in range(student.shape[0])
        if v != i
    ]
    return torch.stack(terms).mean()


def test_sinkhorn_centering_in_the_loss_needs_no_center_update():
    torch.manual_seed(7)
    loss = SVTLoss(16, 2, 2, centering="sinkhorn_knopp")
    teacher = torch.randn(2, 8, 16)
    targets = loss.teacher_targets(teacher, 0.05)
    assert targets.shape == teacher.shape
    # Both globals' rows are balanced together (2 x 8 = 16 rows), 3 iterations (the default).
    want = written_out_sinkhorn(teacher.reshape(16, 16).numpy(), 0.05, 3).reshape(2, 8, 16)
    np.testing.assert_allclose(targets.numpy(), want, rtol=1e-4, atol=1e-6)
    student = torch.randn(4, 8, 16)
    out = loss(student, teacher, 0.05)
    torch.testing.assert_close(out["targets"], targets)
    want_loss = explicit_cross_entropy(student, torch.from_numpy(want).float(), 0.1, g=2)
    torch.testing.assert_close(out["loss"], want_loss, rtol=1e-4, atol=1e-6)
    loss.update_center(teacher)
    assert torch.count_nonzero(loss.center) == 0


def test_koleo_against_brute_force():
    torch.manual_seed(5)
    x = torch.randn(10, 6)
    normed = F.normalize(x, dim=-1)
    distances = torch.cdist(normed, normed) + torch.eye(10) * 10
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(koleo(x), expected, atol=1e-5, rtol=1e-5)


def _koleo_on_rank(rank: int, world: int, store: str, x: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = x.shape[0] // world
        mine = x[rank * rows : (rank + 1) * rows].clone().requires_grad_(True)
        value = koleo(mine)
        value.backward()
        torch.save({"value": value.detach(), "grad": mine.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_koleo_over_ranks_is_koleo_of_the_global_batch(tmp_path):
    """Two gloo ranks holding halves of a batch: the mean of their KoLeo values is KoLeo of the
    whole batch in one process (neighbours are found across ranks), and each rank's gradient,
    once DDP averages it over the 2 ranks, is the one-process gradient. Per-half KoLeo would
    differ: the halves are built so that every row's nearest neighbour is on the other rank."""
    torch.manual_seed(6)
    centres = torch.randn(4, 6)
    x = torch.cat([centres + 0.01 * torch.randn(4, 6), centres + 0.01 * torch.randn(4, 6)])
    torch.multiprocessing.spawn(
        _koleo_on_rank, args=(2, str(tmp_path / "store"), x, str(tmp_path / "out")), nprocs=2
    )
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    whole = x.clone().requires_grad_(True)
    expected = koleo(whole)
    expected.backward()
    torch.testing.assert_close((results[0]["value"] + results[1]["value"]) / 2, expected.detach())
    per_half = (koleo(x[:4]) + koleo(x[4:])) / 2
    assert (per_half - expected).abs() > 1.0  # the halves alone see far-away neighbours
    for rank in range(2):
        own_rows = whole.grad[rank * 4 : (rank + 1) * 4]
        torch.testing.assert_close(results[rank]["grad"] / 2, own_rows)


def test_collapse_metrics_on_the_two_collapses():
    k = 64
    flat = torch.full((2, 8, k), 1.0 / k)
    one_hot = torch.zeros(2, 8, k)
    one_hot[..., 3] = 1.0
    diverse = torch.eye(k)[:16].reshape(2, 8, k)
    # Every target flat: entropy log k, the mean target uniform (KL 0).
    uniform = collapse_metrics(flat)
    assert uniform["teacher_entropy"] == pytest.approx(math.log(k))
    assert uniform["collapse_uniform"] == pytest.approx(1.0)
    assert uniform["teacher_kl_uniform"] == pytest.approx(0.0, abs=1e-6)
    assert uniform["collapse_dominant"] == pytest.approx(0.0, abs=1e-6)
    assert uniform["collapse"] == pytest.approx(1.0)  # the larger: the uniform one
    # One prototype takes everything: entropy 0, KL(mean || uniform) = log k.
    dominant = collapse_metrics(one_hot)
    assert dominant["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert dominant["teacher_kl_uniform"] == pytest.approx(math.log(k))
    assert dominant["collapse_uniform"] == pytest.approx(0.0, abs=1e-6)
    assert dominant["collapse_dominant"] == pytest.approx(1.0)
    assert dominant["collapse"] == pytest.approx(1.0)  # the larger: the dominant one
    # 16 different one-hot targets: entropy 0, the mean spread over 16 of the 64 prototypes.
    healthy = collapse_metrics(diverse)
    assert healthy["teacher_kl_uniform"] == pytest.approx(math.log(k) - math.log(16), abs=1e-5)
    assert healthy["collapse"] == pytest.approx(1 - math.log(16) / math.log(k), abs=1e-5)
    assert healthy["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="expected 6 student and 2 teacher views"):
        SVTLoss(16, 2, 4)(torch.randn(5, 3, 16), torch.randn(2, 3, 16), 0.04)
