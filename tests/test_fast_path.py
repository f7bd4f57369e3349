"""The fast training step computes what the naive (reference-style) step computes.

CPU, fp32, tight tolerances: the fast path (SDPA, views batched per frame size, fused loss,
foreach clipping and EMA) against the benchmark's naive step (explicit softmax, one backbone
call per view, log-softmax loss, per-parameter loops, for-loop AdamW), and each new option
against the plain one. The compiled and bf16 paths run on CPU here (compiling takes about a
minute) and against the fp16 naive step where a GPU exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from factories import random_views, small_config

from svt_ray.engine import build_state, train_step
from svt_ray.losses import SVTLoss
from svt_ray.model import DropPath, build_model, clips_to_frames, group_views
from svt_ray.views import view_slots

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks.step import (
    FAST_OPTIONS,
    build_naive,
    make_config,
    naive_step,
    with_options,
)

TIGHT = {"rtol": 1e-4, "atol": 1e-6}


def step_config(*overrides):
    config = small_config(
        "tiny",
        "optim.batch_size=4",
        "optim.warmup_epochs=0",
        "optim.freeze_last_layer_epochs=0",
        *overrides,
    )
    return config.resolve(4 * 100)


def test_fast_step_matches_the_naive_step():
    config = step_config("optim.clip_grad=0.05")  # most tensors get clipped
    fast = build_state(with_options(config, FAST_OPTIONS), "cpu")
    naive = build_naive(config, torch.device("cpu"))
    assert fast.student_module.view_batching == "resolution" and fast.loss.fused
    batch = random_views(config, 4)
    for step in range(2):
        fast_metrics = train_step(fast, batch, step, torch.Generator().manual_seed(step))
        naive_metrics = naive_step(naive, batch, step, torch.Generator().manual_seed(step))
        assert fast_metrics["loss"] == pytest.approx(naive_metrics["loss"], rel=1e-5)
        students = zip(
            fast.student.named_parameters(), naive.state.student.parameters(), strict=True
        )
        for (name, a), b in students:
            torch.testing.assert_close(a.grad, b.grad, **TIGHT, msg=f"grad {name}")
            torch.testing.assert_close(a, b, **TIGHT, msg=f"weight {name}")
        teachers = zip(
            fast.teacher.named_parameters(), naive.state.teacher.parameters(), strict=True
        )
        for (name, a), b in teachers:
            torch.testing.assert_close(a, b, **TIGHT, msg=f"teacher {name}")
        torch.testing.assert_close(fast.loss.center, naive.state.loss.center, **TIGHT)


def test_view_batching_settings_compute_the_same_function():
    config = small_config("tiny", "model.head_out_dim=64")
    torch.manual_seed(0)
    reference = build_model(with_options(config, {"model": {"view_batching": "view"}}))
    with torch.no_grad():  # wake the silent temporal branches so frame order matters
        for block in reference.backbone.blocks:
            torch.nn.init.normal_(block.temporal_fc.weight, std=0.05)
        torch.nn.init.normal_(reference.backbone.time_embed, std=0.05)
    views = [torch.randn(2, *slot.shape) for slot in view_slots(config.views)]
    outputs = {}
    for mode in ("view", "shape", "resolution"):
        model = build_model(with_options(config, {"model": {"view_batching": mode}}))
        model.load_state_dict(reference.state_dict())
        out = model(views)
        out.logits.logsumexp(-1).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        outputs[mode] = (out, grads)
    base_out, base_grads = outputs["view"]
    for mode in ("shape", "resolution"):
        out, grads = outputs[mode]
        torch.testing.assert_close(out.features, base_out.features, **TIGHT)
        torch.testing.assert_close(out.logits, base_out.logits, **TIGHT)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], **TIGHT, msg=f"{mode} {name}")


def test_resolution_batching_makes_one_call_per_frame_size():
    shapes = [(3, 8, 224, 224), (3, 16, 224, 224)] + [
        (3, t, 96, 96) for t in (2, 2, 4, 4, 8, 8, 16, 16)
    ]
    assert group_views(shapes, "resolution") == [[[0], [1]], [[2, 3], [4, 5], [6, 7], [8, 9]]]
    assert group_views(shapes, "shape") == [[[0]], [[1]], [[2, 3]], [[4, 5]], [[6, 7]], [[8, 9]]]
    assert len(group_views(shapes, "view")) == 10


def test_packed_backbone_rejects_mixed_frame_sizes():
    model = build_model(small_config("tiny"))
    with pytest.raises(ValueError, match="one frame size"):
        model.backbone.forward_features_packed(
            [torch.randn(1, 3, 2, 32, 32), torch.randn(1, 3, 2, 64, 64)]
        )


def test_drop_path_draws_where_the_reference_does():
    """svt_spec §1.2: the temporal branch is dropped on (B·H·W)×T×D, so per clip and spatial
    position, alike for the clip's frames; the spatial branch on (B·T)×(1+HW)×D, per frame;
    the MLP per clip, for the CLS and all the clip's frames together."""
    drop = DropPath(0.5).train()
    layout = ((3, 2), (2, 4))  # 3 clips of 2 frames, 2 clips of 4 frames
    frames, positions = 3 * 2 + 2 * 4, 9
    torch.manual_seed(0)
    per_clip, per_frame = drop.scales(torch.zeros(1), layout)
    assert per_clip.shape == (5, 1, 1) and per_frame.shape == (frames, 1, 1)
    assert set(per_clip.flatten().tolist()) <= {0.0, 2.0}
    expected = torch.cat(
        [per_clip[:3].repeat_interleave(2, 0), per_clip[3:].repeat_interleave(4, 0)]
    )
    torch.testing.assert_close(per_frame, expected)
    torch.testing.assert_close(clips_to_frames(per_clip, layout), expected)
    assert drop.eval().scales(torch.zeros(1), layout) == (None, None)

    drop.train()
    tokens = torch.zeros(frames, positions, 4)
    position = drop.per_position(tokens, layout)
    assert position.shape == (frames, positions, 1)
    by_clip = torch.cat(
        [position[:6].reshape(3, 2, positions), position[6:].reshape(2, 4, positions)[:, :2]]
    )
    assert (by_clip[:, 0] == by_clip[:, 1]).all()  # a clip's frames share the draw ...
    assert len(set(position[:, :, 0].flatten().tolist())) == 2  # ... positions do not
    assert not (position[:, :1] == position).all()  # at p = 0.5 over 45 draws, some differ
    frame = drop.per_frame(tokens)
    assert frame.shape == (frames, 1, 1) and len(set(frame.flatten().tolist())) == 2
    assert drop.eval().per_position(tokens, layout) is None and drop.per_frame(tokens) is None


def test_drop_path_trains_in_packed_mode():
    config = small_config("tiny", "model.drop_path_rate=0.5", "model.head_out_dim=64")
    model = build_model(config).train()
    views = [torch.randn(2, *slot.shape) for slot in view_slots(config.views)]
    model(views).logits.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_matches_the_explicit_log_softmax(centering, dtype):
    torch.manual_seed(0)
    student = (3 * torch.randn(2 + 4, 5, 300)).to(dtype).requires_grad_()
    teacher = torch.randn(2, 5, 300).tanh()  # cosine logits, as the head gives
    results = []
    for fused in (True, False):
        loss = SVTLoss(300, 2, 4, centering=centering, motion_weight=0.5, fused=fused)
        loss.center.normal_(generator=torch.Generator().manual_seed(1))
        terms = loss(student, teacher, teacher_temp=0.05)
        (grad,) = torch.autograd.grad(terms["loss"], student)
        results.append((terms, grad))
    (fused_terms, fused_grad), (plain_terms, plain_grad) = results
    for key in ("loss", "motion", "cross_view"):
        torch.testing.assert_close(fused_terms[key], plain_terms[key], rtol=1e-5, atol=1e-6)
    tolerance = TIGHT if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(fused_grad.float(), plain_grad.float(), **tolerance)
    assert fused_grad.dtype == dtype


def test_fused_loss_gradient_is_exact_in_double():
    from svt_ray.losses import PairCrossEntropy

    targets = torch.softmax(torch.randn(2, 2, 8, dtype=torch.double), dim=-1)
    logits = torch.randn(3, 2, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: PairCrossEntropy.apply(targets, s, 0.1), (logits,), eps=1e-6
    )


@pytest.mark.parametrize("view_set", ["paper", "reference"])
def test_benchmark_view_sets_are_valid_configs(view_set):
    config = make_config("paper", view_set, batch=8)
    frames = config.views.global_frame_counts() + config.views.local_frame_counts()
    expected = [8, 16, 2, 2, 4, 4, 8, 8, 16, 16] if view_set == "paper" else [8] * 10
    assert frames == expected and config.optim.batch_size == 8


def test_bf16_autocast_step_tracks_the_fp32_step_on_cpu():
    """The GPU's precision path (bf16 autocast, the head's prototypes and the loss in fp32) run
    on CPU, where CI can check it: three steps within 2% of fp32 (0.2% measured)."""
    fp32 = build_state(small_config("tiny", "optim.batch_size=8").resolve(800))
    bf16 = build_state(
        small_config("tiny", "optim.batch_size=8", "train.precision=bf16").resolve(800)
    )
    assert bf16.autocast_dtype == torch.bfloat16 and fp32.autocast_dtype is None
    dtypes = {}  # (state, where) -> the dtypes its outputs had in the steps

    def record(name):
        def hook(_module, _inputs, out):
            dtypes.setdefault(name, set()).add(out.dtype)

        return hook

    for label, state in (("fp32", fp32), ("bf16", bf16)):
        for model in ("student", "teacher"):
            module = getattr(state, "student_module" if model == "student" else model)
            module.backbone.blocks[0].mlp.fc1.register_forward_hook(record((label, model, "mlp")))
            module.head.last_layer.register_forward_hook(record((label, model, "prototypes")))
    batch = random_views(fp32.config, 8)
    for step in range(3):
        losses = [
            train_step(state, batch, step, torch.Generator().manual_seed(step))["loss"]
            for state in (fp32, bf16)
        ]
        assert losses[1] == pytest.approx(losses[0], rel=2e-2)
        assert losses[1] != losses[0]  # not the fp32 step under another name
    for model in ("student", "teacher"):
        assert dtypes["bf16", model, "mlp"] == {torch.bfloat16}
        assert dtypes["fp32", model, "mlp"] == {torch.float32}
        for label in ("fp32", "bf16"):
            assert dtypes[label, model, "prototypes"] == {torch.float32}


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_compile_each_layout_once_on_cpu():
    """torch.compile per block (the GPU default), checked on CPU (about a minute to compile):
    the same losses as eager; one graph per view layout and grad mode (the tiny preset: its
    two student resolutions and the teacher's globals); the online kNN's batch sizes compile
    once; after that neither training nor evaluation recompiles."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from svt_ray.evaluate import FeatureExtractor

    def state(compile_: bool):
        overrides = ("optim.batch_size=8", f"train.compile={str(compile_).lower()}")
        return build_state(small_config("tiny", *overrides).resolve(800))

    eager, compiled = state(False), state(True)
    config, batch = eager.config, random_views(eager.config, 8)
    before = counters["stats"]["unique_graphs"]

    def step(index: int) -> None:
        losses = [
            train_step(s, batch, index, torch.Generator().manual_seed(index))["loss"]
            for s in (eager, compiled)
        ]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)

    step(0)
    assert counters["stats"]["unique_graphs"] - before == 3
    extractor = FeatureExtractor(compiled.teacher.backbone, config.views.mean, config.views.std)
    size, frames = config.eval.clip_size, config.eval.clip_frames
    clips = torch.randint(0, 256, (40, 3, frames, size, size), dtype=torch.uint8)

    def evaluate() -> None:  # OnlineKNN's batches: 32, then the 8 left
        for start in range(0, len(clips), 32):
            extractor.features(clips[start : start + 32])

    evaluate()
    assert counters["stats"]["unique_graphs"] - before == 5
    torch._dynamo.config.error_on_recompile = True
    try:
        step(1)
        evaluate()
        step(2)
    finally:
        torch._dynamo.config.error_on_recompile = False

    # With stochastic depth the blocks' p differ (0 in the first): in eval mode (the teacher,
    # the evaluation) they still share one graph per layout.
    from svt_ray.engine import compile_blocks

    deep = build_model(small_config("tiny", "model.drop_path_rate=0.2")).eval()
    compile_blocks(deep)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for count in (4, 2):
            deep.backbone.forward_features(torch.randn(count, 3, frames, size, size))
    assert counters["stats"]["unique_graphs"] - before == 2


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_gpu
def test_gpu_bf16_fast_step_tracks_the_fp16_naive_step():
    """bf16 vs fp16 autocast: losses agree to 2% over three steps (stated bf16 tolerance)."""
    config = step_config("train.compile=false")
    device = torch.device("cuda")
    fast = build_state(with_options(config, FAST_OPTIONS), device)
    naive = build_naive(config, device)
    batch = random_views(config, 4)
    for step in range(3):
        fast_loss = train_step(fast, batch, step, torch.Generator().manual_seed(step))["loss"]
        naive_loss = naive_step(naive, batch, step, torch.Generator().manual_seed(step))["loss"]
        assert fast_loss == pytest.approx(naive_loss, rel=2e-2)


@requires_gpu
def test_gpu_compiled_blocks_match_eager_and_never_recompile():
    import torch._dynamo

    config = step_config("train.precision=fp32")
    device = torch.device("cuda")
    eager = build_state(with_options(config, {"train": {"compile": False}}), device)
    compiled = build_state(with_options(config, {"train": {"compile": True}}), device)
    batch = random_views(config, 4)
    losses = []
    for step in range(3):
        if step == 1:  # every layout was seen in step 0: from here on nothing may recompile
            torch._dynamo.config.error_on_recompile = True
        try:
            losses.append(
                (
                    train_step(eager, batch, step, torch.Generator().manual_seed(step))["loss"],
                    train_step(compiled, batch, step, torch.Generator().manual_seed(step))["loss"],
                )
            )
        finally:
            torch._dynamo.config.error_on_recompile = False
    for eager_loss, compiled_loss in losses:
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)


def test_the_heads_prototypes_run_in_fp32_under_bf16_autocast():
    """The last layer's cosines are divided by temperatures down to 0.04 in the loss: in
    bf16 their rounding (~4e-3 near 1) would shift the softmax's exponents by ~0.1. They are
    computed in fp32 from the (autocast) bottleneck."""
    import torch.nn.functional as F

    from svt_ray.model import DINOHead

    torch.manual_seed(0)
    head = DINOHead(32, out_dim=512, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        bottleneck = F.normalize(head.mlp(x), dim=-1)
    assert bottleneck.dtype == torch.bfloat16 and logits.dtype == torch.float32
    prototypes = F.normalize(head.last_layer.weight, dim=1)
    expected = bottleneck.float() @ prototypes.T  # written out, in fp32
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    rounded = (bottleneck @ prototypes.to(torch.bfloat16).T).float()
    assert (rounded - expected).abs().max() > 1e-3  # what bf16 prototypes would have given
    double = head.double()  # a head kept in another precision computes in it
    assert double(x.double()).dtype == torch.float64


def test_every_block_gets_the_cls_in_one_layout_so_a_compiled_block_has_one_graph():
    """A compiled block specialises on input strides: the CLS expanded from the learned token
    (stride 0 along clips) made block 0 compile a second graph per view layout, next to the
    one for the contiguous CLS the other blocks get (seen with TORCH_LOGS=recompiles: 6 graphs
    for the tiny preset's training, 3 after)."""
    config = small_config("tiny")
    model = build_model(config)
    strides = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda _m, args: strides.append(args[0].stride()))
    model([view.float() / 255 for view in random_views(config, 2)])
    per_call = len(model.backbone.blocks)
    for call in range(0, len(strides), per_call):
        assert len(set(strides[call : call + per_call])) == 1, strides[call : call + per_call]
