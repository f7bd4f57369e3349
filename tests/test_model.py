"""TimeSformer, position tables, DINO head and the multi-view forward."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import small_config

from svt_ray.config import PRESETS, load_config
from svt_ray.model import DINOHead, TimeSformer, build_model, load_image_vit
from svt_ray.views import view_slots


def tiny_backbone(**overrides) -> TimeSformer:
    settings = dict(
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        image_size=224,
        num_frames=16,
        drop_path_rate=0.0,
    )
    settings.update(overrides)
    return TimeSformer(**settings)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_view_shape_of_every_preset_goes_through(preset):
    config = small_config(preset, "model.depth=1")
    model = build_model(config).eval()
    slots = view_slots(config.views)
    views = [torch.randn(1, *slot.shape) for slot in slots]
    with torch.no_grad():
        out = model(views)
    assert out.logits.shape == (len(slots), 1, config.model.head_out_dim)
    assert out.features.shape == (len(slots), 1, config.model.embed_dim)
    assert torch.isfinite(out.logits).all()


def test_paper_preset_builds_timesformer_b16():
    with torch.device("meta"):
        model = build_model(load_config("paper"))
    backbone = sum(p.numel() for p in model.backbone.parameters())
    # ViT-B/16 (86M) + per block a temporal qkv, proj, temporal_fc and LayerNorm; 16-frame table.
    assert backbone == 121_264_896
    head = sum(p.numel() for p in model.head.parameters())
    assert head == 768 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 256 * 65536


def test_position_tables_are_identity_at_native_size():
    backbone = tiny_backbone()
    assert backbone.spatial_pos_embed(14, 14) is backbone.pos_embed
    assert backbone.temporal_pos_embed(16) is backbone.time_embed


def test_spatial_table_for_96px_views():
    backbone = tiny_backbone()
    table = backbone.spatial_pos_embed(6, 6)
    assert table.shape == (1, 1 + 36, 32)
    assert torch.equal(table[:, 0], backbone.pos_embed[:, 0])  # the CLS position is kept
    grid = backbone.pos_embed[0, 1:].reshape(14, 14, 32)
    rows = torch.floor(torch.arange(6) * 14 / 6).long()  # nearest, as the reference code
    expected = grid[rows][:, rows].reshape(36, 32)
    assert torch.equal(table[0, 1:], expected)


def test_temporal_table_for_2_and_16_frames():
    backbone = tiny_backbone(num_frames=8)
    with torch.no_grad():
        backbone.time_embed.copy_(torch.arange(8.0).view(1, 8, 1).expand(1, 8, 32))
    two = backbone.temporal_pos_embed(2)[0, :, 0]
    sixteen = backbone.temporal_pos_embed(16)[0, :, 0]
    assert two.tolist() == [0.0, 4.0]  # svt_spec §1.3: T=2 takes 0 and 4
    assert sixteen.tolist() == [i // 2 for i in range(16)]  # each embedding twice
    stored16 = tiny_backbone(num_frames=16)
    assert stored16.temporal_pos_embed(4).shape == (1, 4, 32)


def test_non_square_views_of_any_multiple_of_the_patch():
    backbone = tiny_backbone().eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 3, 32, 80))
    assert out.shape == (2, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.randn(1, 3, 2, 40, 40))


def test_sdpa_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    fast = tiny_backbone(attention="sdpa").eval()
    naive = tiny_backbone(attention="naive").eval()
    naive.load_state_dict(fast.state_dict())
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(video), naive(video), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny_backbone()
    checkpointed = tiny_backbone(activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    video = torch.randn(2, 3, 2, 32, 32)
    plain(video).square().sum().backward()
    checkpointed(video).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_activation_checkpointing_replays_the_stochastic_depth_draws():
    """At drop_path 0.5 the recompute in the backward pass must draw the same masks as the
    forward did (checkpoint's preserve_rng_state): with the same weights and the same seed
    before each forward, the gradients are the plain model's; another seed gives others, so
    the draws matter. Depth 3: rates 0, 0.25, 0.5, two blocks that drop."""
    torch.manual_seed(0)
    plain = tiny_backbone(depth=3, drop_path_rate=0.5)
    checkpointed = tiny_backbone(depth=3, drop_path_rate=0.5, activation_checkpointing=True)
    _randomise(plain, seed=1)  # temporal_fc and the time table too: every branch counts
    checkpointed.load_state_dict(plain.state_dict())
    video = torch.randn(4, 3, 2, 32, 32, generator=torch.Generator().manual_seed(2))

    def gradients(model, seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        model(video).square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    want = gradients(plain, seed=3)
    got = gradients(checkpointed, seed=3)
    for name, grad in want.items():  # bitwise equal on CPU today; fp32 roundoff allowed
        torch.testing.assert_close(got[name], grad, msg=name)
    other = gradients(plain, seed=4)
    moved = [n for n in want if not torch.allclose(other[n], want[n], rtol=1e-3, atol=1e-5)]
    assert len(moved) > len(want) // 2  # another seed's draws move most gradients


def test_temporal_branch_starts_silent():
    """temporal_fc is zero at init in every block (svt_spec §1.4): whatever the temporal
    attention computes is not added, so the model starts as a per-frame image ViT
    (TimeSformer). (Frame order alone cannot show it: the time table starts at zero too, and
    frames were an unordered set whatever temporal_fc held.)"""
    backbone = tiny_backbone().eval()
    assert all(
        block.temporal_fc.weight.count_nonzero() == 0
        and block.temporal_fc.bias.count_nonzero() == 0
        for block in backbone.blocks
    )
    video = torch.randn(1, 3, 4, 32, 32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = backbone(video)
        for block in backbone.blocks:  # other temporal attention: the same model at init
            for parameter in block.temporal_attn.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        torch.testing.assert_close(backbone(video), before, rtol=0, atol=0)


def test_every_student_parameter_gets_a_gradient():
    config = small_config("tiny", "model.head_out_dim=64")
    model = build_model(config)
    with torch.no_grad():  # give the silent temporal branches and time table a signal
        for block in model.backbone.blocks:
            torch.nn.init.normal_(block.temporal_fc.weight, std=0.02)
        torch.nn.init.normal_(model.backbone.time_embed, std=0.02)
    views = [torch.randn(2, *slot.shape) for slot in view_slots(config.views)]
    model(views).logits.logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_multiview_forward_equals_per_view_forward():
    config = small_config("tiny")
    model = build_model(config).eval()
    views = [torch.randn(2, *slot.shape) for slot in view_slots(config.views)]
    with torch.no_grad():
        out = model(views)
        for index, view in enumerate(views):
            features = model.backbone(view)
            torch.testing.assert_close(out.features[index], features, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                out.logits[index], model.head(features), rtol=1e-5, atol=1e-5
            )


def test_dino_head_prototypes_are_unit_norm_and_frozen_gain():
    head = DINOHead(32, out_dim=50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
    assert head.last_layer.gain is None
    logits = head(torch.randn(4, 32))
    assert logits.shape == (4, 50)
    assert logits.abs().max() <= 1.0 + 1e-5  # cosine between unit bottleneck and unit prototypes
    learnable = DINOHead(32, out_dim=50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    assert learnable.last_layer.gain.requires_grad


def _written_out_head_mlp(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """DINO's 3-layer head MLP (svt_spec §3.2) on the head's own parameters: Linear -> GELU
    (exact, erf) -> Linear -> GELU -> Linear to the bottleneck, no activation after the last
    and no BatchNorm. The layers' shapes are checked, so a missing or extra one fails here."""
    linears = [module for module in head.mlp if isinstance(module, torch.nn.Linear)]
    in_dim, hidden, bottleneck = x.shape[-1], linears[0].out_features, linears[-1].out_features
    shapes = [tuple(linear.weight.shape) for linear in linears]
    assert shapes == [(hidden, in_dim), (hidden, hidden), (bottleneck, hidden)]
    first, second, third = linears
    h = F.gelu(F.linear(x, first.weight, first.bias))
    h = F.gelu(F.linear(h, second.weight, second.bias))
    return F.linear(h, third.weight, third.bias)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_is_cosine_to_row_normalised_prototypes(norm_last_layer):
    """logits = normalize(mlp(x)) @ (g * v / ||v|| per output row)^T, the MLP written out;
    with the frozen gain of norm_last_layer each of the 50 prototypes (rows of the 50x8
    weight) has norm 1."""
    torch.manual_seed(0)
    head = DINOHead(
        32, out_dim=50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=norm_last_layer
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # pre-activations of order 1 and non-zero biases: every part counts
        for linear in (m for m in head.mlp if isinstance(m, torch.nn.Linear)):
            weight = torch.randn(linear.weight.shape, generator=generator)
            linear.weight.copy_(weight / linear.in_features**0.5)
            linear.bias.copy_(0.5 * torch.randn(linear.bias.shape, generator=generator))
    gain = torch.ones(50, 1)
    if not norm_last_layer:
        with torch.no_grad():
            head.last_layer.gain.uniform_(0.5, 2.0)
        gain = head.last_layer.gain.detach()
    x = torch.randn(4, 32)
    v = head.last_layer.weight.detach()
    prototypes = gain * v / v.square().sum(dim=1, keepdim=True).sqrt()  # (50, 8)
    bottleneck = _written_out_head_mlp(head, x)
    bottleneck = bottleneck / bottleneck.square().sum(dim=1, keepdim=True).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(head(x), bottleneck @ prototypes.T)
        effective = head.last_layer(torch.eye(8)).T  # (50, 8): the layer's own prototype rows
    torch.testing.assert_close(effective, prototypes)
    if norm_last_layer:
        torch.testing.assert_close(effective.norm(dim=1), torch.ones(50))


def test_spatial_table_for_a_non_square_2x5_grid():
    """Rows resize 14 -> 2 and columns 14 -> 5 with nearest (source floor(i * 14 / out)),
    flattened row-major after the CLS position."""
    backbone = tiny_backbone()
    table = backbone.spatial_pos_embed(2, 5)
    assert table.shape == (1, 1 + 10, 32)
    assert torch.equal(table[:, 0], backbone.pos_embed[:, 0])
    grid = backbone.pos_embed[0, 1:].reshape(14, 14, 32)
    rows, columns = [0, 7], [0, 2, 5, 8, 11]  # floor(14/2 * i), floor(14/5 * j)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            assert torch.equal(table[0, 1 + 5 * i + j], grid[row, column]), (i, j)


def _fake_image_vit_checkpoint(backbone: TimeSformer, grid: int) -> dict:
    """A timm-layout ViT state dict (spatial names, a classifier head, a 14x14 pos table)."""
    state = {
        key: torch.randn_like(value)
        for key, value in backbone.state_dict().items()
        if "temporal" not in key and key != "time_embed"
    }
    state["pos_embed"] = torch.randn(1, 1 + grid * grid, backbone.embed_dim)
    state["head.weight"] = torch.randn(1000, backbone.embed_dim)
    return {"model": {f"module.{k}": v for k, v in state.items()}}


def test_init_from_loads_spatial_weights_and_reports(tmp_path):
    backbone = tiny_backbone(image_size=112)  # 7x7 grid; the checkpoint has 14x14
    checkpoint = _fake_image_vit_checkpoint(backbone, grid=14)
    path = tmp_path / "vit.pth"
    torch.save(checkpoint, path)
    temporal_before = backbone.blocks[0].temporal_attn.qkv.weight.clone()
    report = load_image_vit(backbone, path)
    weights = checkpoint["model"]
    assert torch.equal(
        backbone.blocks[1].attn.qkv.weight, weights["module.blocks.1.attn.qkv.weight"]
    )
    assert torch.equal(backbone.patch_embed.proj.weight, weights["module.patch_embed.proj.weight"])
    assert backbone.pos_embed.shape == (1, 1 + 49, 32)
    assert report.resized == ["pos_embed"]
    table = weights["module.pos_embed"]
    assert torch.equal(backbone.pos_embed[0, 0], table[0, 0])  # the CLS position as it was
    assert not torch.equal(backbone.pos_embed[0, 1:], torch.zeros(49, 32))
    assert "head.weight" in report.skipped
    assert "time_embed" in report.new and "blocks.0.temporal_attn.qkv.weight" in report.new
    assert torch.equal(backbone.blocks[0].temporal_attn.qkv.weight, temporal_before)
    summary = report.summary()
    assert "loaded" in summary and "skipped 1" in summary and "temporal_attn" in summary


def test_init_from_resizes_the_position_table_over_its_grid(tmp_path):
    """14x14 -> 7x7, rows and columns kept apart: a table that rises with the column in
    channel 0 and with the row in channel 1 rises the same way after (cubic interpolation
    keeps a linear ramp: away from the border, 7x7 position i samples 14x14 position 2i + 0.5)."""
    backbone = tiny_backbone(image_size=112)
    checkpoint = _fake_image_vit_checkpoint(backbone, grid=14)
    rows, columns = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    table = checkpoint["model"]["module.pos_embed"]
    table[0, 1:, 0], table[0, 1:, 1] = columns.flatten(), rows.flatten()  # row-major, as ViT
    torch.save(checkpoint, tmp_path / "vit.pth")
    load_image_vit(backbone, tmp_path / "vit.pth")
    grid = backbone.pos_embed[0, 1:].detach().reshape(7, 7, 32)
    ramp = 2 * torch.arange(7.0) + 0.5
    inner = slice(1, 6)  # cubic taps reach past the border there
    torch.testing.assert_close(grid[inner, inner, 0], ramp[inner].expand(5, 5))
    torch.testing.assert_close(grid[inner, inner, 1], ramp[inner, None].expand(5, 5))


def test_init_from_missing_file_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_image_vit(tiny_backbone(), tmp_path / "dino_vitbase16_pretrain.pth")


def test_init_from_unrelated_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.randn(8, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="holds no tensor that matches"):
        load_image_vit(tiny_backbone(), path)


def test_model_import_pulls_in_neither_ray_nor_mlflow():
    code = (
        "import sys, svt_ray.model, svt_ray.engine, svt_ray.views, svt_ray.losses, svt_ray.export; "
        "bad = [m for m in ('ray', 'mlflow', 'typer') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_runs_record_and_a_studys_report_load_without_ray():
    """`svt-ray compare` and `tracking sync` read MLflow and run.json: no Ray start-up cost."""
    code = (
        "import sys, svt_ray.runs, svt_ray.progress, svt_ray.study_report; "
        "assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_code_passes_ruff_lint_and_format():
    """`ruff check .` and `ruff format --check .`, as the README's Development section asks,
    so that CI (which runs pytest only) catches what a contributor forgot."""
    root = Path(__file__).resolve().parents[1]
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        result = subprocess.run(command, cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, " ".join(command) + "\n" + result.stdout + result.stderr


def test_import_contracts_hold():
    """import-linter: the core modules never import Ray, MLflow or Typer, even indirectly; a
    run's record, the console progress and a study's report never import Ray."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["lint-imports"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- frame difference (model.frame_difference: on in the tiny preset only) ---------------------


def test_frame_difference_feeds_each_frame_and_its_difference_to_the_previous_one():
    torch.manual_seed(0)
    backbone = tiny_backbone(image_size=32, num_frames=4, frame_difference=True).eval()
    assert backbone.patch_embed.proj.in_channels == 6
    video = torch.randn(2, 3, 4, 32, 32)
    written_out = torch.zeros(2, 6, 4, 32, 32)
    for t in range(4):  # channels 0-2: frame t; 3-5: frame t - frame t-1 (zero for t = 0)
        written_out[:, :3, t] = video[:, :, t]
        if t > 0:
            written_out[:, 3:, t] = video[:, :, t] - video[:, :, t - 1]
    plain = tiny_backbone(image_size=32, num_frames=4).eval()
    plain.patch_embed = backbone.patch_embed  # the same 6-channel embedding, fed by hand
    plain.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        assert torch.allclose(
            backbone.forward_features(video), plain.forward_features(written_out), atol=1e-6
        )


def test_frame_difference_stays_inside_each_packed_view():
    torch.manual_seed(0)
    backbone = tiny_backbone(image_size=32, num_frames=8, frame_difference=True).eval()
    short, long = torch.randn(2, 3, 2, 32, 32), torch.randn(3, 3, 8, 32, 32)
    with torch.no_grad():
        packed = backbone.forward_features_packed([short, long])
        alone = [backbone.forward_features(short), backbone.forward_features(long)]
    for got, expected in zip(packed, alone, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


def test_init_from_fills_the_rgb_filters_of_a_frame_difference_embedding(tmp_path):
    backbone = tiny_backbone(frame_difference=True)
    checkpoint = _fake_image_vit_checkpoint(backbone, grid=14)
    rgb = torch.randn(32, 3, 16, 16)
    checkpoint["model"]["module.patch_embed.proj.weight"] = rgb
    path = tmp_path / "vit.pth"
    torch.save(checkpoint, path)
    difference_before = backbone.patch_embed.proj.weight[:, 3:].clone()
    report = load_image_vit(backbone, path)
    assert torch.equal(backbone.patch_embed.proj.weight[:, :3], rgb)
    assert torch.equal(backbone.patch_embed.proj.weight[:, 3:], difference_before)
    assert "patch_embed.proj.weight" in report.resized


def test_difference_init_scale_scales_only_the_difference_filters_of_the_default_init():
    torch.manual_seed(3)
    plain = tiny_backbone(frame_difference=True)
    torch.manual_seed(3)
    scaled = tiny_backbone(frame_difference=True, difference_init_scale=4.0)
    weight, reference = scaled.patch_embed.proj.weight, plain.patch_embed.proj.weight
    assert torch.equal(weight[:, :3], reference[:, :3])
    assert torch.allclose(weight[:, 3:], 4.0 * reference[:, 3:])
    # PyTorch's conv default (kaiming-uniform, a=sqrt(5)): bound 1/sqrt(fan_in).
    bound = 1 / math.sqrt(6 * 16 * 16)
    assert reference.abs().max() <= bound and reference.abs().max() > 0.9 * bound
    scaled.reset_parameters()  # idempotent: the scale is applied to a fresh init, not compounded
    assert weight[:, 3:].abs().max() <= 4 * bound and weight[:, 3:].abs().max() > 3.6 * bound


# -- the divided block, written out (svt_spec §1.2) --------------------------------------------


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias


def _attend(tokens: torch.Tensor, attention) -> torch.Tensor:
    """Multi-head softmax attention over the rows of `tokens` (n, d), head by head."""
    n, d = tokens.shape
    heads = attention.num_heads
    q, k, v = _linear(tokens, attention.qkv).split(d, dim=-1)
    out = torch.empty(n, d, dtype=tokens.dtype)
    for head in range(heads):
        part = slice(head * d // heads, (head + 1) * d // heads)
        scores = q[:, part] @ k[:, part].T / math.sqrt(d // heads)
        out[:, part] = torch.softmax(scores, dim=-1) @ v[:, part]
    return _linear(out, attention.proj)


def _mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    hidden = _linear(x, mlp.fc1)
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return _linear(hidden, mlp.fc2)


def written_out_block(block, cls: torch.Tensor, patches: torch.Tensor, drops=None):
    """One clip through a divided block: cls (d,), patches (t, n, d) -> the same shapes.
    `drops`: stochastic depth's factors for this clip, (per position (n,), per frame (t,),
    the clip's one), where the reference applies them (svt_spec §1.2); None: eval mode."""
    frames, positions, _ = patches.shape
    by_position, by_frame, by_clip = drops or (torch.ones(positions), torch.ones(frames), 1.0)
    # 1. Temporal attention: each spatial position attends over the clip's frames, no CLS;
    #    stochastic depth drops a position's branch for all frames, before temporal_fc.
    normed = _layer_norm(patches, block.temporal_norm1)
    temporal = torch.empty_like(patches)
    for p in range(positions):
        temporal[:, p] = _attend(normed[:, p], block.temporal_attn) * by_position[p]
    x_t = patches + _linear(temporal, block.temporal_fc)
    # 2. Spatial attention per frame over [CLS copy, that frame's positions], dropped per
    #    frame; the frames' CLS outputs are averaged; the residual adds to x_t.
    cls_outputs, spatial = [], torch.empty_like(patches)
    for t in range(frames):
        tokens = torch.cat([cls[None], x_t[t]])
        out = _attend(_layer_norm(tokens, block.norm1), block.attn) * by_frame[t]
        cls_outputs.append(out[0])
        spatial[t] = x_t[t] + out[1:]
    cls = cls + torch.stack(cls_outputs).mean(0)
    # 3. MLP on every token, the clip's tokens dropped together.
    cls = cls + by_clip * _mlp(_layer_norm(cls, block.norm2), block.mlp)
    spatial = spatial + by_clip * _mlp(_layer_norm(spatial, block.norm2), block.mlp)
    return cls, spatial


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (temporal_fc, norms and tables included: nothing silent)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def test_divided_block_equals_the_written_out_block():
    """Packed clips of 3 and 2 frames: temporal attention over each clip's frames per position,
    temporal_fc, spatial attention per frame with the CLS copy, averaged CLS, then the MLP."""
    torch.manual_seed(0)
    block = tiny_backbone(depth=1).blocks[0].double().eval()
    _randomise(block, seed=1)
    layout = ((2, 3), (1, 2))  # 2 clips of 3 frames, then 1 clip of 2 frames
    cls, patches = torch.randn(3, 1, 32).double(), torch.randn(2 * 3 + 2, 5, 32).double()
    with torch.no_grad():
        got_cls, got_patches = block(cls, patches, layout)
    clip_frames = [(0, 0, 3), (1, 3, 3), (2, 6, 2)]  # (clip, first frame row, frames)
    for clip, first, frames in clip_frames:
        rows = slice(first, first + frames)
        want_cls, want_patches = written_out_block(block, cls[clip, 0], patches[rows])
        torch.testing.assert_close(got_cls[clip, 0], want_cls, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_patches[rows], want_patches, rtol=1e-10, atol=1e-10)


def test_stochastic_depth_drops_the_branches_where_the_reference_does():
    """Training mode at drop_path 0.5: the block's own draws (recorded) applied by hand to the
    temporal branch per clip and position, the spatial branch per frame and the MLP per clip
    give its output; DropPath's draws alone are tested in test_fast_path.py, not where the
    block applies them (a block that ignored them passed every test)."""
    block = tiny_backbone(depth=1).blocks[0].double().train()
    block.drop_path.p = 0.5  # (a backbone's first block has rate 0: rates rise with depth)
    _randomise(block, seed=1)
    layout = ((2, 3), (1, 2))
    cls = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(4)).double()
    patches = torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(5)).double()
    drawn = {}

    def recorded(name):
        method = getattr(block.drop_path, name)

        def draw(*args):
            drawn[name] = method(*args)
            return drawn[name]

        return draw

    for name in ("per_position", "per_frame", "scales"):
        setattr(block.drop_path, name, recorded(name))
    torch.manual_seed(2)
    with torch.no_grad():
        got_cls, got_patches = block(cls, patches, layout)
    by_position, by_frame, by_clip = drawn["per_position"], drawn["per_frame"], drawn["scales"][0]
    for draw in (by_position, by_frame, by_clip):  # this seed drops and keeps in each
        assert set(draw.flatten().tolist()) == {0.0, 2.0}
    for clip, first, frames in [(0, 0, 3), (1, 3, 3), (2, 6, 2)]:
        rows = slice(first, first + frames)
        drops = (by_position[first, :, 0], by_frame[rows, 0, 0], by_clip[clip, 0, 0])
        want_cls, want_patches = written_out_block(block, cls[clip, 0], patches[rows], drops)
        torch.testing.assert_close(got_cls[clip, 0], want_cls, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_patches[rows], want_patches, rtol=1e-10, atol=1e-10)


def test_backbone_equals_the_written_out_timesformer():
    """Patch embedding, spatial table per frame (CLS position included), time table on the
    patches only, two divided blocks, final LayerNorm on the CLS; every table non-zero."""
    backbone = tiny_backbone(image_size=32, num_frames=4).double().eval()
    _randomise(backbone, seed=2)
    video = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        got = backbone(video)
    conv = backbone.patch_embed.proj
    filters = conv.weight.reshape(32, -1)  # (d, c * 16 * 16)
    for b in range(2):
        patches = torch.empty(4, 4, 32, dtype=torch.float64)  # (t, 2x2 positions row-major, d)
        for t in range(4):
            for gy in range(2):
                for gx in range(2):
                    pixels = video[b, :, t, 16 * gy : 16 * gy + 16, 16 * gx : 16 * gx + 16]
                    patch = filters @ pixels.reshape(-1) + conv.bias
                    patches[t, 2 * gy + gx] = (
                        patch + backbone.pos_embed[0, 1 + 2 * gy + gx] + backbone.time_embed[0, t]
                    )
        cls = backbone.cls_token[0, 0] + backbone.pos_embed[0, 0]
        for block in backbone.blocks:
            cls, patches = written_out_block(block, cls, patches)
        want = _layer_norm(cls, backbone.norm)
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-10)


def _first_block_patches(backbone: TimeSformer, video: torch.Tensor) -> torch.Tensor:
    """The patch tokens (b*t, n, d) that the first block outputs."""
    seen = []
    handle = backbone.blocks[0].register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            backbone(video)
    finally:
        handle.remove()
    return seen[0]


def test_time_flows_along_a_spatial_position_and_only_through_the_temporal_branch():
    """Depth 1, 2x2 patches, 2 frames; frame 1 changes at patch 3. With the spatial attention's
    output zeroed, frame 0 changes at patch 3 only (temporal attention runs per position);
    with the temporal branch silent, frame 0 does not change at all (space keeps frames apart)."""
    torch.manual_seed(0)
    backbone = tiny_backbone(depth=1, image_size=32, num_frames=2).eval()
    _randomise(backbone, seed=4)
    video = torch.randn(1, 3, 2, 32, 32)
    changed = video.clone()
    changed[0, :, 1, 16:, 16:] += 1.0  # frame 1, patch (1, 1) = position 3
    block = backbone.blocks[0]
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
    before, after = _first_block_patches(backbone, video), _first_block_patches(backbone, changed)
    moved = (after[0] - before[0]).abs().amax(dim=-1)  # frame 0, per position
    assert moved[3] > 1e-3
    assert torch.equal(moved[:3], torch.zeros(3))

    _randomise(backbone, seed=4)  # spatial attention back; temporal branch silent
    with torch.no_grad():
        block.temporal_fc.weight.zero_()
        block.temporal_fc.bias.zero_()
    before, after = _first_block_patches(backbone, video), _first_block_patches(backbone, changed)
    assert torch.equal(after[0], before[0])  # frame 0 untouched
    assert not torch.equal(after[1], before[1])  # frame 1 itself did change
