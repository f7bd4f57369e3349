"""The SVT loss: DINO cross-entropy between teacher targets of global views and student views.

Two kinds of pair (svt_spec §3.4):
- cross-view correspondence, teacher global g_i -> student local l_j (spatial and temporal
  extent differ);
- motion correspondence, teacher global g_i -> student global g_j, i != j (the globals differ
  in frame rate: slow vs fast).

    L = (w_motion * sum_motion + w_cross * sum_cross) / (number of terms of the active kinds)

With both weights 1 this is the reference code's equal average of all 2 x 9 = 18 terms; a
weight of 0 removes a kind of term and its count. Temperatures arrive per call (the loss
knows no schedule), and every collective is guarded by `dist.is_initialized()` as dinov2's
`dino_clstoken_loss.py` does, so the loss runs without a process group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's batch-balanced teacher targets: (rows, k) logits -> (rows, k) probabilities.

    Alternately normalises prototypes (columns) and samples (rows), over all ranks, so every
    prototype gets an equal share of the global batch; a fixed point cannot be a collapse.
    """
    scaled = logits.float() / temperature
    peak = _all_reduce(scaled.max().clone(), dist.ReduceOp.MAX if dist.is_available() else None)
    q = torch.exp(scaled - peak).t()  # (k, rows)
    num_prototypes, rows = q.shape[0], q.shape[1] * _world_size()
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= rows
    return (q * rows).t()


class PairCrossEntropy(torch.autograd.Function):
    """(g, v) batch-mean H(target_g, softmax(student_v / temp)) without wide fp32 intermediates.

    H(t, softmax(s/T)) = sum_k t_k * (lse(s/T) - s_k/T), so per pair it takes one (g, b*k) x
    (b*k, v) product and the per-row log-sum-exp of the student; the log-softmax itself is
    never stored. Backward rebuilds softmax(s/T) from the saved logits (alive anyway as the
    head's output) and the (v, b) lse, so nothing 65536-wide is saved beyond what exists.
    Same value as the explicit einsum over log_softmax up to rounding.
    """

    @staticmethod
    def forward(ctx, targets: torch.Tensor, logits: torch.Tensor, temperature: float):
        # targets (g, b, k) fp32 probabilities; logits (v, b, k) in the head's dtype.
        batch = logits.shape[1]
        scaled = logits.to(targets.dtype) / temperature  # (v, b, k), freed when forward returns
        lse = torch.logsumexp(scaled, dim=-1)  # (v, b)
        mass = targets.sum(dim=-1)  # (g, b): 1 up to rounding
        cross = torch.einsum("gbk,vbk->gv", targets, scaled)
        ctx.save_for_backward(targets, logits, lse, mass)
        ctx.temperature = temperature
        return (mass @ lse.t() - cross) / batch

    @staticmethod
    def backward(ctx, grad_pairs: torch.Tensor):
        targets, logits, lse, mass = ctx.saved_tensors
        batch, temperature = logits.shape[1], ctx.temperature
        grad_pairs = grad_pairs.to(targets.dtype)
        # d pairs[g, v] / d s[v, b] = (mass[g, b] * softmax(s[v, b] / T) - t[g, b]) / (T * batch)
        weight = torch.einsum("gv,gb->vb", grad_pairs, mass)  # (v, b)
        probs = torch.exp((logits.to(targets.dtype) / temperature).sub_(lse[..., None]))
        grad = probs.mul_(weight[..., None]).sub_(torch.einsum("gv,gbk->vbk", grad_pairs, targets))
        return None, grad.div_(temperature * batch).to(logits.dtype), None


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order, with the gradient sent back to its owner:
    the backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.
    (all_gather + all_reduce: both work on gloo as well as nccl.)"""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.count = dist.get_rank(), rows.shape[0]
        gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, rows.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.count : (ctx.rank + 1) * ctx.count]


def koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: -mean log distance of each feature to its nearest neighbour.

    On several ranks the neighbour is searched in the global batch (rows gathered from every
    rank, gradients sent back), so with DDP's gradient averaging a step is the same as KoLeo of
    the whole batch in one process, however the batch is split over workers. Per-rank KoLeo (as
    DINOv2 does with its 64+ rows per GPU) on the tiny preset's 8 rows per worker finds
    neighbours of the same class and pushes them apart: with it the demo learned nothing
    (docs/demo.md). Ranks must hold equal batch sizes (training drops the last batch).
    """
    x = F.normalize(features.float(), dim=-1, eps=eps)
    rows, offset, everyone = x.shape[0], 0, x
    if _world_size() > 1:
        everyone, offset = _GatherRows.apply(x), dist.get_rank() * rows
    with torch.no_grad():
        similarity = x @ everyone.t()
        own = torch.arange(rows, device=x.device)
        similarity[own, offset + own] = -2.0
        nearest = similarity.argmax(dim=1)
    distances = (everyone[offset + own] - everyone[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


class SVTLoss(nn.Module):
    """Cross-view + motion correspondence with a centred, sharpened teacher."""

    def __init__(
        self,
        out_dim: int,
        num_global: int,
        num_local: int,
        *,
        student_temp: float = 0.1,
        cross_view_weight: float = 1.0,
        motion_weight: float = 1.0,
        centering: str = "ema",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        koleo_weight: float = 0.0,
        fused: bool = True,
    ):
        super().__init__()
        if centering not in ("ema", "sinkhorn_knopp"):
            raise ValueError(f"loss.centering must be 'ema' or 'sinkhorn_knopp', got {centering!r}")
        self.num_global, self.num_local = num_global, num_local
        self.student_temp = student_temp
        self.cross_view_weight, self.motion_weight = cross_view_weight, motion_weight
        self.centering = centering
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.koleo_weight = koleo_weight
        self.fused = fused
        self.num_motion_terms = num_global * (num_global - 1)
        self.num_cross_terms = num_global * num_local
        active = self.num_motion_terms * (motion_weight > 0) + self.num_cross_terms * (
            cross_view_weight > 0
        )
        if active == 0:
            raise ValueError("no active loss term: every weighted kind of pair is missing")
        self.num_active_terms = active
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(g, b, k) teacher logits -> (g, b, k) target probabilities (centred and sharpened)."""
        if self.centering == "sinkhorn_knopp":
            g, b, k = teacher_logits.shape
            flat = sinkhorn_knopp(
                teacher_logits.reshape(g * b, k), teacher_temp, self.sinkhorn_iterations
            )
            return flat.view(g, b, k)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def pair_cross_entropy(
        self, targets: torch.Tensor, student_logits: torch.Tensor
    ) -> torch.Tensor:
        """(g, b, k) targets and (v, b, k) student logits -> (g, v) batch-mean H(target, student).

        fused (the default) uses `PairCrossEntropy`; otherwise the explicit log-softmax and
        einsum, as written in the reference (kept for tests and the benchmark's baseline).
        """
        if self.fused:
            return PairCrossEntropy.apply(targets, student_logits, self.student_temp)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -torch.einsum("gbk,vbk->gv", targets, log_probs) / student_logits.shape[1]

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        student_global_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """student_logits (g + l, b, k), globals first; teacher_logits (g, b, k).

        Returns loss (to minimise), the mean of each kind of term, and the targets used.
        """
        g = self.num_global
        if student_logits.shape[0] != g + self.num_local or teacher_logits.shape[0] != g:
            raise ValueError(
                f"expected {g + self.num_local} student and {g} teacher views, got "
                f"{student_logits.shape[0]} and {teacher_logits.shape[0]}"
            )
        targets = self.teacher_targets(teacher_logits, teacher_temp)
        pairs = self.pair_cross_entropy(targets, student_logits)  # (g, g + l)
        off_diagonal = ~torch.eye(g, dtype=torch.bool, device=pairs.device)
        motion_sum = pairs[:, :g][off_diagonal].sum()
        cross_sum = pairs[:, g:].sum()
        loss = (self.motion_weight * motion_sum + self.cross_view_weight * cross_sum) / (
            self.num_active_terms
        )
        zero = pairs.new_zeros(())
        terms = {
            "motion": motion_sum / self.num_motion_terms if self.num_motion_terms else zero,
            "cross_view": cross_sum / self.num_cross_terms if self.num_cross_terms else zero,
            "koleo": zero,
        }
        if self.koleo_weight > 0 and student_global_features is not None:
            terms["koleo"] = torch.stack([koleo(f) for f in student_global_features]).mean()
            loss = loss + self.koleo_weight * terms["koleo"]
        return {"loss": loss, **terms, "targets": targets}

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher output over the global batch (all ranks)."""
        if self.centering != "ema":
            return
        k = teacher_logits.shape[-1]
        batch_sum = _all_reduce(teacher_logits.float().reshape(-1, k).sum(dim=0, keepdim=True))
        batch_center = batch_sum / (teacher_logits[..., 0].numel() * _world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@torch.no_grad()
def collapse_metrics(targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signals of the two DINO collapses, from teacher targets (..., k), each in [0, 1].

    - uniform: mean per-sample entropy / log k -> 1 when every target is flat;
    - dominant: KL(mean target || uniform) / log k -> 1 when one prototype takes everything.
    `collapse` is the larger of the two; a healthy run keeps both well below 1.
    """
    k = targets.shape[-1]
    flat = targets.reshape(-1, k).float()
    log_k = math.log(k)
    entropy = -(flat * torch.log(flat.clamp_min(1e-12))).sum(-1).mean()
    mean = flat.mean(0)
    mean_entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    uniform = entropy / log_k
    dominant = (log_k - mean_entropy) / log_k
    return {
        "teacher_entropy": entropy,
        "teacher_kl_uniform": log_k - mean_entropy,
        "collapse_uniform": uniform,
        "collapse_dominant": dominant,
        "collapse": torch.maximum(uniform, dominant),
    }
