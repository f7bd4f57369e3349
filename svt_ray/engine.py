"""One SVT training step, apart from all setup: no Ray, no logging, no I/O.

`build_state` makes the student, the teacher (a copy in eval mode, never given gradients), the
loss with its centre, AdamW and the schedule. `train_step` reads like the algorithm (MAE's
`engine_pretrain.py`, DINO's `train_one_epoch`):

    augment on the device -> student(all views), teacher(global views) -> loss -> backward
    -> clip -> freeze last layer early on -> AdamW step -> EMA of the teacher -> centre

and returns a dict of floats. Distribution is the caller's business: `train.py` may wrap
`state.student` in DDP; the step only unwraps it for the EMA.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from svt_ray import __version__
from svt_ray.config import ExperimentConfig
from svt_ray.losses import SVTLoss, collapse_metrics
from svt_ray.model import SVTModel, build_model
from svt_ray.schedules import Schedule, ScheduleValues
from svt_ray.views import ViewAugmenter


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the step was not applied."""


@dataclass
class TrainState:
    config: ExperimentConfig  # resolved
    student: nn.Module  # SVTModel, possibly wrapped in DDP
    teacher: SVTModel
    loss: SVTLoss
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    augmenter: ViewAugmenter
    device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def student_module(self) -> SVTModel:
        return getattr(self.student, "module", self.student)


def parameter_groups(model: nn.Module) -> list[dict]:
    """Biases and 1-D parameters (norms) get no weight decay; everything else does, the
    position tables and the prototype gain (out, 1) included, as in DINO."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


def compile_enabled(config: ExperimentConfig, device: torch.device) -> bool:
    """train.compile, with None meaning on for CUDA and off elsewhere."""
    if config.train.compile is None:
        return device.type == "cuda"
    return config.train.compile


# Graphs per block (all blocks share them): one per packed layout (call) and grad mode, and for
# the student one more per layout for the first block, whose stochastic-depth p of 0 dynamo
# specialises. Measured on CPU for the paper's view set with view_batching=resolution: 5 in
# training (student 2 layouts x 2, teacher 1) and 3 more for the online kNN's batch sizes.
# More with view_batching=shape; dynamo's default limit of 8 would silently fall back to eager.
_RECOMPILE_LIMIT = 32


def compile_blocks(model: SVTModel) -> None:
    """torch.compile every backbone block on its own (regional compilation).

    Blocks share one compiled graph per input layout: `dynamic=False` specialises each graph to
    its (clips, frames) layout and token counts, which are fixed per view slot, so after the
    first step nothing recompiles. Compiling blocks rather than the whole model keeps the
    Python-level view grouping, activation checkpointing and DDP outside the graphs.
    """
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
    for block in model.backbone.blocks:
        block.compile(dynamic=False)


def autocast_dtype_for(config: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def build_state(config: ExperimentConfig, device: torch.device | str = "cpu") -> TrainState:
    """Everything a training step needs, on `device`, from a resolved config."""
    if config.derived is None:
        raise ValueError("build_state needs a resolved config: call config.resolve(clips) first")
    device = torch.device(device)
    torch.manual_seed(config.train.seed)
    student = build_model(config).to(device)
    teacher = copy.deepcopy(student)
    teacher.eval()  # deliberate fix of the reference: no drop path in the teacher
    teacher.requires_grad_(False)
    if compile_enabled(config, device):
        compile_blocks(student)
        compile_blocks(teacher)
    views, loss_cfg = config.views, config.loss
    loss = SVTLoss(
        config.model.head_out_dim,
        views.num_global,
        views.num_local,
        student_temp=loss_cfg.student_temp,
        cross_view_weight=loss_cfg.cross_view_weight,
        motion_weight=loss_cfg.motion_weight,
        centering=loss_cfg.centering,
        center_momentum=loss_cfg.center_momentum,
        sinkhorn_iterations=loss_cfg.sinkhorn_iterations,
        koleo_weight=loss_cfg.koleo_weight,
    ).to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(student),
        lr=config.derived.lr,
        betas=config.optim.betas,
        fused=device.type == "cuda",
    )
    return TrainState(
        config=config,
        student=student,
        teacher=teacher,
        loss=loss,
        optimizer=optimizer,
        schedule=Schedule.from_config(config),
        augmenter=ViewAugmenter(views),
        device=device,
        autocast_dtype=autocast_dtype_for(config, device),
    )


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, mode: str) -> torch.Tensor:
    """Clip in place; returns the total gradient norm before clipping.

    per_parameter: each tensor's norm is clipped to max_norm on its own (DINO's clip_gradients);
    global: the norm of all gradients together is clipped.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm <= 0:
        return total
    if mode == "global":
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale)
    else:  # one kernel for all scales, not a few per parameter
        scales = (max_norm / (torch.stack(norms) + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(scales.unbind()))
    return total


@torch.no_grad()
def update_teacher(student: SVTModel, teacher: SVTModel, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over all parameters in a few foreach kernels."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of L2-normalised features (0 = all samples equal)."""
    normed = torch.nn.functional.normalize(features.float().reshape(-1, features.shape[-1]), dim=-1)
    return normed.std(dim=0).mean() if normed.shape[0] > 1 else normed.new_zeros(())


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: all ranks then take the same branch, so
    none is left waiting in DDP's gradient all-reduce for a rank that stopped."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def weights_finite(state: TrainState) -> bool:
    """True when every weight of student and teacher is finite on every rank (a collective).
    The loss check of `train_step` stops a run before a non-finite loss touches a weight, but
    gradients can overflow with a finite loss: checked before each checkpoint, so the last one
    a diverged run keeps is always usable."""
    finite = all(
        bool(torch.isfinite(parameter).all())
        for model in (state.student_module, state.teacher)
        for parameter in model.parameters()
    )
    return all_ranks_finite(torch.tensor(1.0 if finite else float("nan"), device=state.device))


def to_device_views(batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [view.to(device, non_blocking=True) for view in batch]


def apply_schedule(state: TrainState, step: int) -> ScheduleValues:
    """Set this step's lr and weight decay on the optimiser; returns all schedule values."""
    values = state.schedule.at(step)
    for group in state.optimizer.param_groups:
        group["lr"] = values.lr
        if group["apply_weight_decay"]:
            group["weight_decay"] = values.weight_decay
    return values


def train_step(
    state: TrainState,
    batch: list[torch.Tensor],
    step: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """One optimisation step on `batch` (one uint8 (b, 3, t, s, s) tensor per view slot).

    With `optim.accumulation_steps` = n the augmented batch is cut into n pieces along b, each
    through forward and backward on its own (DDP all-reduces after the last), and the step's
    loss, centre update and signals cover all of them: the gradients of the whole batch up to
    float reassociation, except KoLeo and Sinkhorn-Knopp centring, which see one piece.

    Raises NonFiniteLossError before touching any weight if the loss is not finite.

    Stochastic depth draws from torch's global generator: seeded here from `generator`'s seed
    (a function of the run's seed, the step and the rank), so a resumed or restarted worker
    draws the masks an uninterrupted one draws; the checkpoint holds no generator state.
    """
    values = apply_schedule(state, step)
    # (a stream of its own: seed + 1 would be the next rank's augmentation seed)
    torch.manual_seed(
        int(np.random.SeedSequence([generator.initial_seed(), 1]).generate_state(1)[0])
    )

    views = state.augmenter(to_device_views(batch, state.device), generator)
    num_global = state.config.views.num_global
    pieces = state.config.optim.accumulation_steps
    autocast = (
        torch.autocast(state.device.type, dtype=state.autocast_dtype)
        if state.autocast_dtype is not None
        else nullcontext()
    )
    state.student.train()
    state.optimizer.zero_grad(set_to_none=True)
    kept: dict[str, list[torch.Tensor]] = {
        key: [] for key in ("loss", "motion", "cross_view", "koleo", "targets", "teacher_logits",
                            "student_features", "teacher_features")
    }  # fmt: skip
    piece_views = zip(*(view.chunk(pieces) for view in views), strict=True)
    for index, piece in enumerate(piece_views):
        last = index == pieces - 1
        no_sync = getattr(state.student, "no_sync", None)  # DDP: all-reduce after the last
        with nullcontext() if last or no_sync is None else no_sync():
            with autocast:
                student_out = state.student(list(piece))
                with torch.no_grad():
                    teacher_out = state.teacher(list(piece[:num_global]))
            terms = state.loss(
                student_out.logits,
                teacher_out.logits,
                values.teacher_temp,
                student_out.features[:num_global],
            )
            if not all_ranks_finite(terms["loss"]):
                state.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"step {step}: the loss is {terms['loss'].item()} (lr={values.lr:.3g}); no "
                    "weight was updated. Lower optim.base_lr, raise optim.warmup_epochs or "
                    "check the input clips."
                )
            (terms["loss"] / pieces).backward()
        for key in ("loss", "motion", "cross_view", "koleo", "targets"):
            kept[key].append(terms[key].detach())
        kept["teacher_logits"].append(teacher_out.logits)
        kept["student_features"].append(student_out.features[:num_global].detach())
        kept["teacher_features"].append(teacher_out.features)
        del student_out, terms  # this piece's activations go before the next piece's come

    student = state.student_module
    parameters = [p for p in student.parameters() if p.requires_grad]
    grad_norm = clip_gradients(
        parameters, state.config.optim.clip_grad, state.config.optim.clip_mode
    )
    if values.freeze_last_layer:
        for parameter in student.head.last_layer.parameters():
            parameter.grad = None
    state.optimizer.step()
    update_teacher(student, state.teacher, values.momentum)
    state.loss.update_center(torch.cat(kept["teacher_logits"], dim=1))  # (g, b, k) of all pieces

    def mean(key: str) -> torch.Tensor:
        return torch.stack(kept[key]).mean()

    collapse = collapse_metrics(torch.cat(kept["targets"], dim=1))
    tensors = {
        "loss": mean("loss"),
        "loss_motion": mean("motion"),
        "loss_cross_view": mean("cross_view"),
        "loss_koleo": mean("koleo"),
        "grad_norm": grad_norm,
        "student_feature_std": feature_std(torch.cat(kept["student_features"], dim=1)),
        "teacher_feature_std": feature_std(torch.cat(kept["teacher_features"], dim=1)),
        **collapse,
    }
    floats = torch.stack(
        [t.float().to(state.device) for t in tensors.values()]
    ).tolist()  # one sync
    metrics = dict(zip(tensors, floats, strict=True))
    metrics.update(
        lr=values.lr,
        weight_decay=values.weight_decay,
        momentum=values.momentum,
        teacher_temp=values.teacher_temp,
    )
    return metrics


def state_dict(state: TrainState, step: int) -> dict:
    """Everything needed to resume exactly at `step` (the schedules need nothing more)."""
    return {
        "step": step,
        "student": state.student_module.state_dict(),
        "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "loss": state.loss.state_dict(),
        "config": state.config.model_dump(mode="json"),
        "svt_ray_version": __version__,
    }


def load_state_dict(state: TrainState, checkpoint: dict) -> int:
    """Restore a `state_dict` checkpoint; returns the step to continue from."""
    state.student_module.load_state_dict(checkpoint["student"])
    state.teacher.load_state_dict(checkpoint["teacher"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.loss.load_state_dict(checkpoint["loss"])
    return int(checkpoint["step"])
