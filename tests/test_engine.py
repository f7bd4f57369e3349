"""The training step: gradients, teacher, EMA, clipping, freezing, failure, golden trace."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from factories import moving_square_views, random_views, small_config

from svt_ray.engine import (
    NonFiniteLossError,
    apply_schedule,
    build_state,
    clip_gradients,
    load_state_dict,
    parameter_groups,
    state_dict,
    train_step,
    update_teacher,
    weights_finite,
)

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss_trace.json"


def make_state(*overrides, clips=8 * 100):
    config = small_config("tiny", "optim.batch_size=8", *overrides).resolve(clips)
    return build_state(config)


def run(state, batch, steps, start=0):
    return [
        train_step(state, batch, step, torch.Generator().manual_seed(step))
        for step in range(start, start + steps)
    ]


def test_step_returns_floats_for_every_signal():
    """Every signal is a float. grad_norm = sqrt(sum of every student gradient's squared
    entries) before clipping (a clip_grad of 1e-3 then shrinks each tensor); *_feature_std =
    mean over dimensions of the std over the global views' (g x b) L2-normalised CLS features."""
    state = make_state("optim.clip_grad=1e-3")
    raw, features = [], {}
    for p in state.student_module.parameters():  # the gradient as backward delivers it
        p.register_hook(lambda grad: raw.append(grad.detach().clone()))

    def keep(name):
        def hook(_module, _inputs, out):
            features[name] = out.features[:2].detach()  # the step runs each model once

        return hook

    state.student.register_forward_hook(keep("student"))
    state.teacher.register_forward_hook(keep("teacher"))
    metrics = run(state, random_views(state.config, 8), 1)[0]
    expected = {
        "loss", "loss_motion", "loss_cross_view", "loss_koleo", "lr", "weight_decay", "momentum",
        "teacher_temp", "grad_norm", "teacher_entropy", "teacher_kl_uniform", "collapse",
        "collapse_uniform", "collapse_dominant", "student_feature_std", "teacher_feature_std",
    }  # fmt: skip
    assert expected <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())

    assert len(raw) == len(list(state.student_module.parameters()))
    by_hand = sum(g.double().square().sum() for g in raw).sqrt().item()
    assert metrics["grad_norm"] == pytest.approx(by_hand, rel=1e-5)
    assert by_hand > 1e-2  # the clipping below really shrank the gradients
    for p in state.student_module.parameters():
        assert p.grad.norm() <= 1e-3 * (1 + 1e-4)

    for name in ("student", "teacher"):
        rows = features[name].reshape(-1, features[name].shape[-1]).double()  # (2 x 8, d)
        assert rows.shape == (16, state.config.model.embed_dim)
        rows = rows / rows.square().sum(dim=1, keepdim=True).sqrt()
        mean = rows.sum(dim=0) / 16
        std = ((rows - mean).square().sum(dim=0) / (16 - 1)).sqrt()  # unbiased, per dimension
        assert metrics[f"{name}_feature_std"] == pytest.approx(std.mean().item(), rel=1e-5)


def test_only_biases_and_1d_parameters_escape_weight_decay():
    """DINO's get_params_groups (svt_spec §1.3, §4): Linear/conv weights, the head's prototypes
    and the 3-D pos_embed, cls_token and time_embed are decayed; biases and LayerNorm weights
    are not. After the schedule the first group has this step's decay, the second 0; a step
    with zero gradients shrinks exactly the decayed tensors by (1 - lr * wd)."""
    state = make_state()
    model = state.student_module
    name_of = {id(p): name for name, p in model.named_parameters()}
    decayed = {"head.last_layer.weight", "backbone.pos_embed", "backbone.cls_token"}
    decayed.add("backbone.time_embed")
    exempt = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            exempt |= {f"{prefix}.weight", f"{prefix}.bias"}
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            decayed.add(f"{prefix}.weight")
            exempt.add(f"{prefix}.bias")
    assert decayed | exempt == set(name_of.values())  # every parameter classified
    assert "backbone.blocks.0.temporal_norm1.weight" in exempt
    groups = parameter_groups(model)
    assert sorted(name_of[id(p)] for p in groups[0]["params"]) == sorted(decayed)
    assert sorted(name_of[id(p)] for p in groups[1]["params"]) == sorted(exempt)

    values = apply_schedule(state, 300)
    assert values.weight_decay > 0.05  # between 0.04 and 0.4, this step's value
    decay_group, exempt_group = state.optimizer.param_groups
    assert decay_group["weight_decay"] == values.weight_decay
    assert exempt_group["weight_decay"] == 0.0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    shrink = 1 - values.lr * values.weight_decay
    assert shrink < 1 - 1e-6
    for name, p in model.named_parameters():
        if name in exempt:
            assert torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p, before[name] * shrink, rtol=1e-6, atol=0, msg=name)


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    state = make_state()
    run(state, random_views(state.config, 8), 2)
    assert not state.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in state.teacher.parameters())
    assert state.student_module.training


def test_ema_with_momentum_one_keeps_and_zero_copies():
    state = make_state()
    student, teacher = state.student_module, state.teacher
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = copy.deepcopy(teacher.state_dict())
    update_teacher(student, teacher, momentum=1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    update_teacher(student, teacher, momentum=0.0)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters(), strict=True):
        assert torch.equal(t, s), name
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    copied = [t.clone() for t in teacher.parameters()]
    update_teacher(student, teacher, momentum=0.5)
    for (name, t), before_t, s in zip(
        teacher.named_parameters(), copied, student.parameters(), strict=True
    ):
        torch.testing.assert_close(t, (before_t + s) / 2, msg=name)  # the midpoint


def test_ema_mixes_with_the_momentum():
    state = make_state()
    student, teacher = state.student_module, state.teacher
    t0 = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_teacher(student, teacher, momentum=0.9)
    for before, after, s in zip(t0, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * s)


def test_per_parameter_and_global_clipping():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0, 0.0, 0.0])
    total = clip_gradients([a, b], 1.0, "per_parameter")
    assert total == pytest.approx((25 + 0.01) ** 0.5)
    assert a.grad.norm() == pytest.approx(1.0, rel=1e-5)  # clipped on its own
    assert torch.allclose(b.grad, torch.tensor([0.1, 0.0, 0.0, 0.0]))  # left alone
    # Global: one scale for both, from the norm of all of them (sqrt(25 + 25)); per tensor,
    # each would be clipped to 2.5 on its own (a to [1.5, 2, 0], b to [0, 0, 0, 2.5]).
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 5.0])
    total = clip_gradients([a, b], 2.5, "global")
    assert total == pytest.approx(50**0.5)
    scale = 2.5 / 50**0.5
    assert torch.allclose(a.grad, scale * torch.tensor([3.0, 4.0, 0.0]), atol=1e-5)
    assert torch.allclose(b.grad, scale * torch.tensor([0.0, 0.0, 0.0, 5.0]), atol=1e-5)
    a.grad, b.grad = torch.tensor([0.3, 0.4, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.5])
    clip_gradients([a, b], 2.5, "global")  # under the limit: left alone
    assert torch.equal(b.grad, torch.tensor([0.0, 0.0, 0.0, 0.5]))


def test_last_layer_is_frozen_during_the_first_epoch():
    state = make_state("optim.freeze_last_layer_epochs=1", clips=8 * 4)  # 4 steps per epoch
    batch = random_views(state.config, 8)
    last = state.student_module.head.last_layer.weight
    first_mlp = state.student_module.head.mlp[0].weight
    frozen, other = last.clone(), first_mlp.clone()
    run(state, batch, 3, start=1)  # steps 1-3: lr > 0 but inside the frozen epoch
    assert torch.equal(last, frozen)
    assert not torch.equal(first_mlp, other)
    run(state, batch, 1, start=4)
    assert not torch.equal(last, frozen)


def test_thirty_steps_lower_the_loss():
    # Sinkhorn-Knopp targets are fixed by the batch; with EMA centring the loss first rises
    # while the centre (which starts at 0) catches up, which would hide the optimisation.
    state = make_state(
        "optim.warmup_epochs=0", "optim.base_lr=0.01", "loss.centering=sinkhorn_knopp"
    )
    losses = [m["loss"] for m in run(state, moving_square_views(state.config, 8), 30)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def test_non_finite_loss_raises_and_touches_no_weight():
    state = make_state("optim.warmup_epochs=0")
    batch = random_views(state.config, 8)
    with torch.no_grad():
        state.student_module.head.mlp[0].bias.fill_(float("nan"))
    student = copy.deepcopy(state.student_module.state_dict())
    teacher = copy.deepcopy(state.teacher.state_dict())
    with pytest.raises(NonFiniteLossError, match="step 3: the loss is nan"):
        train_step(state, batch, 3, torch.Generator().manual_seed(0))
    for key, value in state.student_module.state_dict().items():
        assert torch.equal(value, student[key]) or torch.isnan(value).all(), key
    assert all(torch.equal(v, teacher[k]) for k, v in state.teacher.state_dict().items())
    assert not state.optimizer.state  # the optimiser never stepped


def test_weights_that_overflowed_are_caught_before_a_checkpoint():
    """Gradients can overflow with a finite loss: the weights are checked before each
    checkpoint, so a diverged run's last checkpoint is one it can resume from."""
    state = make_state()
    assert weights_finite(state)
    with torch.no_grad():
        next(state.teacher.parameters()).view(-1)[0] = float("inf")
    assert not weights_finite(state)


def test_state_dict_round_trip_resumes_exactly():
    """Bit for bit, with every source of randomness a step has: augmentation (the step's
    generator) and stochastic depth (torch's global generator, which no checkpoint holds)."""
    settings = ("optim.warmup_epochs=0", "model.drop_path_rate=0.3")
    batch = random_views(make_state().config, 8)
    uninterrupted = make_state(*settings)
    full = [m["loss"] for m in run(uninterrupted, batch, 4)]
    first = make_state(*settings)
    run(first, batch, 2)
    checkpoint = copy.deepcopy(state_dict(first, step=2))
    resumed = make_state(*settings, "train.seed=123")  # other init and global seed: overwritten
    assert load_state_dict(resumed, checkpoint) == 2
    rest = [m["loss"] for m in run(resumed, batch, 2, start=2)]
    assert rest == full[2:]
    for a, b in zip(uninterrupted.teacher.parameters(), resumed.teacher.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_first_steps_loss_is_the_double_loop_over_the_models_own_outputs():
    """An independent check of step 0, where the golden trace only guards against drift: the
    student sees every augmented view, the teacher (the same weights at step 0) only the
    globals, and the loss is the reference's double loop over them at the scheduled teacher
    temperature with a zero centre. KoLeo off, so the loss is the SVT loss alone."""
    from test_losses import explicit_loss

    state = make_state("loss.koleo_weight=0", "loss.motion_weight=0.5")
    config, g = state.config, state.config.views.num_global
    student, teacher = copy.deepcopy(state.student_module), copy.deepcopy(state.teacher)
    augmented = []
    augment = state.augmenter

    def keep_views(views, generator):
        augmented.extend(augment(views, generator))
        return augmented

    state.augmenter = keep_views
    metrics = run(state, random_views(config, 8), 1)[0]
    with torch.no_grad():
        student_logits = student(augmented).logits  # (v, b, k), views in slot order
        teacher_logits = teacher(augmented[:g]).logits
    expected = explicit_loss(
        student_logits,
        teacher_logits,
        torch.zeros(1, config.model.head_out_dim),
        config.loss.student_temp,
        apply_schedule(copy.deepcopy(state), 0).teacher_temp,
        config.loss.cross_view_weight,
        config.loss.motion_weight,
        g,
    )
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)


def _koleo_by_hand(features: torch.Tensor) -> torch.Tensor:
    """-mean over rows of log(distance to the nearest other row), on L2-normalised rows."""
    rows = features.double() / features.double().norm(dim=1, keepdim=True)
    logs = []
    for i in range(len(rows)):
        nearest = min((rows[i] - rows[j]).norm() for j in range(len(rows)) if j != i)
        logs.append(torch.log(nearest + 1e-8))
    return -torch.stack(logs).mean()


def test_a_step_mid_run_with_every_setting_off_its_default_is_the_written_out_step():
    """Step 50 of 800 with settings none of which the tiny preset's defaults share, each
    written out here rather than read from the schedule: the teacher temperature halfway
    through its warm-up, the teacher momentum on its cosine, the student temperature, KoLeo
    on each global view, global-norm clipping and the centre's momentum."""
    from test_losses import explicit_loss

    state = make_state(
        "loss.student_temp=0.2",
        "loss.warmup_teacher_temp=0.04",
        "loss.teacher_temp=0.07",
        "loss.warmup_teacher_temp_epochs=1",  # 100 steps
        "loss.center_momentum=0.8",
        "loss.koleo_weight=0.25",
        "loss.motion_weight=0.5",
        "optim.momentum_teacher=0.9",
        "optim.clip_mode=global",
        "optim.clip_grad=0.01",
    )
    config, g, step = state.config, state.config.views.num_global, 50
    assert config.derived.total_steps == 800
    teacher_temp = 0.04 + (0.07 - 0.04) * 50 / 100
    momentum = 1.0 - (1.0 - 0.9) * 0.5 * (1 + math.cos(math.pi * 50 / 800))
    k = config.model.head_out_dim
    centre_before = 0.1 * torch.randn(1, k, generator=torch.Generator().manual_seed(4))
    state.loss.center.copy_(centre_before)  # a centre that the targets must subtract
    student, teacher = copy.deepcopy(state.student_module), copy.deepcopy(state.teacher)
    augmented, raw = [], {}
    augment = state.augmenter

    def keep_views(views, generator):
        augmented.extend(augment(views, generator))
        return augmented

    state.augmenter = keep_views
    parameters = list(state.student_module.parameters())
    for i, p in enumerate(parameters):  # the gradients as backward delivers them
        p.register_hook(lambda grad, i=i: raw.__setitem__(i, grad.detach().clone()))
    metrics = train_step(state, random_views(config, 8), step, torch.Generator().manual_seed(3))

    with torch.no_grad():
        student_out = student(augmented)
        teacher_logits = teacher(augmented[:g]).logits
    svt = explicit_loss(
        student_out.logits, teacher_logits, centre_before, 0.2, teacher_temp, 1.0, 0.5, g
    )
    koleo = sum(_koleo_by_hand(student_out.features[i]) for i in range(g)) / g
    assert metrics["teacher_temp"] == pytest.approx(teacher_temp, rel=1e-12)
    assert metrics["momentum"] == pytest.approx(momentum, rel=1e-12)
    assert metrics["loss_koleo"] == pytest.approx(koleo.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(svt.item() + 0.25 * koleo.item(), rel=1e-5)

    # global-norm clipping: every gradient scaled by one factor, to a total norm of 0.01
    assert len(raw) == len(parameters)
    total = torch.sqrt(sum(grad.double().square().sum() for grad in raw.values()))
    assert total > 0.1  # well above 0.01: the clip shrinks the gradients
    assert metrics["grad_norm"] == pytest.approx(total.item(), rel=1e-5)
    for i, p in enumerate(parameters):
        expected = raw[i].double() * 0.01 / total.item()
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-4, atol=1e-9)

    # the centre: an EMA with momentum 0.8 of the teacher's mean logits over (g x b)
    centre = 0.8 * centre_before[0].double() + 0.2 * teacher_logits.reshape(-1, k).double().mean(0)
    torch.testing.assert_close(state.loss.center[0].double(), centre, rtol=1e-5, atol=1e-7)

    # the teacher: m * itself + (1 - m) * the updated student, m off the cosine
    for before, after, new_student in zip(
        teacher.parameters(), state.teacher.parameters(), state.student_module.parameters(),
        strict=True,
    ):  # fmt: skip
        expected = momentum * before.double() + (1 - momentum) * new_student.double()
        torch.testing.assert_close(after.double(), expected, rtol=1e-6, atol=1e-7)


def test_seeded_five_step_trace_matches_the_golden_file():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order, whatever the machine
    try:
        state = make_state("optim.warmup_epochs=0")
        trace = [round(m["loss"], 6) for m in run(state, random_views(state.config, 8), 5)]
    finally:
        torch.set_num_threads(threads)
    if os.environ.get("SVT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": trace}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert trace == pytest.approx(golden, rel=2e-4)


# -- data parallel: a 2-rank step is the 1-rank step on the same global batch -----------------

NO_AUGMENTATION = [  # the augmentations draw per rank; without them both runs see equal views
    "views.color_jitter_p=0",
    "views.grayscale_p=0",
    "views.global_blur_p=[0,0]",
    "views.local_blur_p=0",
    "views.global_solarize_p=[0,0]",
    "views.local_solarize_p=0",
    "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0",
]


def _data_parallel_steps(rank: int, world: int, store: str, overrides, batches, out: str):
    """`len(batches)` train steps on this rank's rows of each global batch, DDP over gloo."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    threads = torch.get_num_threads()  # put back after: rank 0 may run in the test process
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        state = make_state(*overrides, f"scaling.num_workers={world}", clips=8 * 4)
        if world > 1:
            state.student = DistributedDataParallel(state.student)
        rows = len(batches[0][0]) // world
        losses, gradients = [], []
        for step, batch in enumerate(batches):
            mine = [view[rank * rows : (rank + 1) * rows] for view in batch]
            metrics = train_step(state, mine, step, torch.Generator().manual_seed(step))
            losses.append(metrics["loss"])
            gradients.append(
                {
                    name: parameter.grad.clone()
                    for name, parameter in state.student_module.named_parameters()
                    if parameter.grad is not None
                }
            )
        torch.save(
            {
                "losses": losses,
                "gradients": gradients,
                "student": state.student_module.state_dict(),
                "teacher": state.teacher.state_dict(),
                "loss": state.loss.state_dict(),
            },
            f"{out}.{world}.{rank}",
        )
    finally:
        torch.set_num_threads(threads)
        if world > 1:
            dist.destroy_process_group()


def _without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The keys' part of a qkv bias gets no gradient in exact arithmetic (softmax ignores a
    shift), and AdamW scales its float noise up to a full step whose sign the summation order
    decides: compare the query and value parts only."""
    if not name.endswith("attn.qkv.bias"):
        return tensor
    width = tensor.shape[0] // 3
    return torch.cat([tensor[:width], tensor[2 * width :]])


def _on_two_ranks(tmp_path, overrides, batches, out: str) -> None:
    """`_data_parallel_steps` on 2 gloo processes; their results land in `{out}.2.{rank}`."""
    torch.multiprocessing.spawn(
        _data_parallel_steps,
        args=(2, str(tmp_path / "store"), overrides, batches, out),
        nprocs=2,
    )


def _assert_trains_like(run: dict, one: dict, label: str) -> None:
    """`run`'s gradients at every step and its final student, teacher and centre equal those
    of `one` (outputs of `_data_parallel_steps`), up to float reassociation."""
    for step, expected_step in enumerate(one["gradients"]):
        assert set(run["gradients"][step]) == set(expected_step), label
        for name, expected in expected_step.items():
            torch.testing.assert_close(
                run["gradients"][step][name], expected, rtol=0,
                atol=1e-4 * expected.abs().max().item() + 1e-9,
                msg=f"{label}, step {step}: {name}",
            )  # fmt: skip
    for part in ("student", "teacher", "loss"):
        for name, expected in one[part].items():
            torch.testing.assert_close(
                _without_key_bias(name, run[part][name]),
                _without_key_bias(name, expected),
                rtol=1e-4, atol=1e-6, msg=f"{label}: {part}.{name}",
            )  # fmt: skip


def test_accumulated_pieces_train_like_the_whole_batch(tmp_path):
    """optim.accumulation_steps=2: 3 steps on 2 pieces of the batch of 8 (one rank, and 2
    DDP ranks of 2 pieces each) end with the student, teacher and centre of 3 whole-batch
    steps, with the same losses and gradients. KoLeo is off: it sees one piece at a time."""
    overrides = [*NO_AUGMENTATION, "loss.koleo_weight=0"]
    config = make_state(*overrides).config
    batches = [moving_square_views(config, 8, seed=step) for step in range(3)]
    whole, pieces = str(tmp_path / "whole"), str(tmp_path / "pieces")
    _data_parallel_steps(0, 1, "", overrides, batches, whole)
    accumulated = [*overrides, "optim.accumulation_steps=2"]
    _data_parallel_steps(0, 1, "", accumulated, batches, pieces)
    _on_two_ranks(tmp_path, accumulated, batches, pieces)
    one = torch.load(f"{whole}.1.0", weights_only=False)
    runs = {
        "1 rank x 2 pieces": torch.load(f"{pieces}.1.0", weights_only=False),
        **{
            f"rank {rank} of 2 x 2 pieces": torch.load(f"{pieces}.2.{rank}", weights_only=False)
            for rank in range(2)
        },
    }
    assert runs["1 rank x 2 pieces"]["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for label, run in runs.items():
        _assert_trains_like(run, one, label)


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_two_ranks_train_like_one_rank_on_the_global_batch(tmp_path, centering):
    """Three steps with the global batch of 8 split over 2 gloo ranks (DDP, as Ray Train wraps
    the student) end with the student, teacher and centre of 3 steps on one rank: gradients
    are averaged, the teacher's centre or Sinkhorn-Knopp normalisation and KoLeo see the
    whole batch, and the mean of the ranks' losses is the whole batch's loss."""
    overrides = [*NO_AUGMENTATION, f"loss.centering={centering}", "loss.koleo_weight=0.3"]
    config = make_state(*overrides).config
    batches = [moving_square_views(config, 8, seed=step) for step in range(3)]
    out = str(tmp_path / "out")
    _data_parallel_steps(0, 1, "", overrides, batches, out)
    _on_two_ranks(tmp_path, overrides, batches, out)
    one = torch.load(f"{out}.1.0", weights_only=False)
    two = [torch.load(f"{out}.2.{rank}", weights_only=False) for rank in range(2)]
    mean_losses = [(a + b) / 2 for a, b in zip(two[0]["losses"], two[1]["losses"], strict=True)]
    assert mean_losses == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    for rank in range(2):
        _assert_trains_like(two[rank], one, f"rank {rank} of 2")
    moved = any(
        not torch.equal(one["student"][name], value)
        for name, value in make_state(*overrides).student.state_dict().items()
    )
    assert moved  # the steps changed the weights: equal end states are not the start twice
