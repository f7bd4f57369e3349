"""View sampler (frame plans, crops, cutting) and the batched photometric augmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svt_ray.config import load_config
from svt_ray.views import ViewAugmenter, ViewSampler, gaussian_blur, sample_crop, view_slots


def paper_views(*overrides):
    return load_config("paper", overrides=list(overrides)).views


def test_slots_are_globals_then_locals_with_fixed_shapes():
    slots = view_slots(paper_views())
    assert [s.name for s in slots] == ["g0", "g1"] + [f"l{i}" for i in range(8)]
    assert slots[1].shape == (3, 16, 224, 224) and slots[-1].shape == (3, 16, 96, 96)


def test_plan_spans_and_frame_counts():
    """svt_spec §2.1-2.2: globals span a random ~90% of the clip window, locals a random 1/8,
    each view's start drawn on its own; the clip window itself starts at random in the video.
    The paper preset's window is 150 frames (10 s at 15 fps): globals 135, locals 19."""
    sampler = ViewSampler(paper_views())
    assert sampler.config.clip_frames == 150
    rng = np.random.default_rng(0)
    first_frames, global_offsets, local_offsets, distinct_local_starts = [], [], [], []
    for _ in range(50):
        plan = sampler.plan(num_frames=300, height=256, width=340, rng=rng)
        window_starts = []
        for slot, indices in zip(sampler.slots, plan.frame_indices, strict=True):
            assert len(indices) == slot.frames
            assert np.all(np.diff(indices) >= 0)  # in temporal order
            extent = indices[-1] - indices[0] + 1
            if slot.kind == "global":
                assert extent == 135  # 90% of the 150-frame window
            else:
                assert extent == 19  # 1/8 of the window
            window_starts.append(indices.min())
        union = plan.union
        assert union.min() >= 0 and union.max() < 300
        assert union.max() - union.min() < 150  # all views inside one clip window
        assert np.array_equal(union, np.unique(np.concatenate(plan.frame_indices)))
        # Offsets from the plan's earliest view: a global (135 of 150 frames) has 15 frames of
        # play, a local (19 frames) 131; the locals' starts are independent draws.
        starts = np.array(window_starts) - min(window_starts)
        assert np.all(starts[:2] <= 150 - 135) and np.all(starts[2:] <= 150 - 19)
        first_frames.append(min(window_starts))
        global_offsets.extend(starts[:2])
        local_offsets.extend(starts[2:])
        distinct_local_starts.append(len(set(window_starts[2:])))
    assert len(set(first_frames)) > 25  # the 150-frame window moves over the 300-frame video
    assert max(local_offsets) >= 100  # locals reach across the whole window...
    assert min(distinct_local_starts) >= 4  # ...each at its own start (8 draws from 132)
    assert len(set(global_offsets)) >= 8  # the globals' 90% windows move too (16 positions)


def test_plan_of_a_short_video_stays_in_bounds():
    sampler = ViewSampler(paper_views())
    plan = sampler.plan(num_frames=20, height=64, width=64, rng=np.random.default_rng(1))
    assert all(len(i) == s.frames for s, i in zip(sampler.slots, plan.frame_indices, strict=True))
    assert plan.union.max() < 20


def test_reference_global_windows():
    views = load_config("reference_code").views
    sampler = ViewSampler(views)
    plan = sampler.plan(num_frames=128, height=256, width=256, rng=np.random.default_rng(0))
    g0, g1 = plan.frame_indices[:2]
    assert np.array_equal(g0, np.linspace(0, 123, 8).astype(int))
    assert np.array_equal(g1, np.clip(np.linspace(5, 128, 8), 0, 127).astype(int))


def test_reference_local_windows():
    """The reference's locals: r = randint(0, L - L//8 - 1) (both ends included), then
    linspace(r, r + L//8, n), so L//8 + 1 source frames, truncated to indices."""
    views = load_config("reference_code").views
    sampler = ViewSampler(views)
    starts = set()
    for seed in range(200):
        plan = sampler.plan(num_frames=128, height=256, width=256, rng=np.random.default_rng(seed))
        for indices in plan.frame_indices[views.num_global :]:
            start = int(indices[0])
            starts.add(start)
            assert np.array_equal(indices, np.linspace(start, start + 16, 8).astype(int))
    assert min(starts) == 0 and max(starts) == 128 - 16 - 1
    # and their crops are cut from the whole frame (a name clash once made it 16 px wide)
    boxes = sampler.plan(128, 240, 320, np.random.default_rng(0)).boxes[views.num_global :]
    assert max(box.left + box.width for box in boxes) > 16


def test_plan_is_deterministic_given_the_generator():
    sampler = ViewSampler(paper_views())
    a = sampler.plan(200, 256, 256, np.random.default_rng(7))
    b = sampler.plan(200, 256, 256, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a.frame_indices, b.frame_indices, strict=True))
    assert a.boxes == b.boxes


def test_crop_boxes_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for scale in ((0.4, 1.0), (0.05, 0.4)):
        for _ in range(200):
            box = sample_crop(256, 320, scale, (3 / 4, 4 / 3), rng)
            assert box.top >= 0 and box.top + box.height <= 256
            assert box.left >= 0 and box.left + box.width <= 320
            area = box.height * box.width / (256 * 320)
            assert scale[0] * 0.9 <= area <= scale[1] * 1.1
            assert 3 / 4 * 0.9 <= box.width / box.height <= 4 / 3 * 1.1


def test_planned_boxes_take_each_kinds_own_crop_scale_and_the_configured_aspect_ratio():
    """Through `ViewSampler.plan`: globals cut 40-80% of the frame, locals 6-30%, both with an
    aspect ratio (width / height) in [0.5, 0.7]; none of them the defaults, and the two scale
    ranges apart, so a plan that swaps them or ignores the config cannot pass.

    The 480x288 frame (ratio 0.6) makes every try fit: a box of area fraction s and ratio r
    fits iff s <= 0.6 / r (width) and s <= r / 0.6 (height), both >= 0.83 for r in [0.5, 0.7],
    above either scale's top of 0.8; so sample_crop never falls back to its centred box. A box
    is the rounding of an exact (w0, h0) with area s * H * W and ratio r; each side moved by at
    most half a pixel, so the checks ask that some (w0, h0) within half a pixel of the box has
    an area and a ratio in range: tight, and exact for every rounding."""
    views = paper_views(
        "views.global_crop_scale=[0.4, 0.8]",
        "views.local_crop_scale=[0.06, 0.3]",
        "views.aspect_ratio=[0.5, 0.7]",
    )
    sampler = ViewSampler(views)
    height, width = 480, 288
    rng = np.random.default_rng(0)
    fractions = {"global": [], "local": []}
    ratios = []
    for _ in range(300):
        plan = sampler.plan(200, height, width, rng)
        for slot, box in zip(sampler.slots, plan.boxes, strict=True):
            where = (slot.name, box)
            assert box.top >= 0 and box.top + box.height <= height, where
            assert box.left >= 0 and box.left + box.width <= width, where
            scale = views.global_crop_scale if slot.kind == "global" else views.local_crop_scale
            h, w = box.height, box.width
            smallest, largest = (h - 0.5) * (w - 0.5), (h + 0.5) * (w + 0.5)
            assert smallest <= scale[1] * height * width, where
            assert largest >= scale[0] * height * width, where
            assert (w - 0.5) / (h + 0.5) <= 0.7 and (w + 0.5) / (h - 0.5) >= 0.5, where
            fractions[slot.kind].append(h * w / (height * width))
            ratios.append(w / h)
    assert len(fractions["global"]) == 600 and len(fractions["local"]) == 2400
    # Both ranges are used end to end (600 and 2400 uniform draws), so a narrower or shifted
    # range fails too, and the locals lie well below the smallest global.
    for kind, (low, high) in (("global", (0.4, 0.8)), ("local", (0.06, 0.3))):
        margin = 0.05 * (high - low)
        assert min(fractions[kind]) < low + margin and max(fractions[kind]) > high - margin, kind
    assert max(fractions["local"]) < min(fractions["global"])
    assert min(fractions["local"]) < 0.4 * min(fractions["global"])
    assert min(ratios) < 0.51 and max(ratios) > 0.69  # log-uniform over [0.5, 0.7]


def test_cut_matches_a_manual_crop_and_resize():
    views = load_config("tiny").views
    sampler = ViewSampler(views)
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, size=(40, 64, 80, 3), dtype=np.uint8)
    plan = sampler.plan(40, 64, 80, rng)
    cut = sampler.cut(video[plan.union], plan)
    for slot, indices, box in zip(sampler.slots, plan.frame_indices, plan.boxes, strict=True):
        out = cut[slot.name]
        assert out.dtype == np.uint8 and out.shape == slot.shape
        crop = video[indices, box.top : box.top + box.height, box.left : box.left + box.width]
        crop = torch.from_numpy(crop).permute(0, 3, 1, 2).float()
        expected = F.interpolate(crop, size=(slot.size, slot.size), mode="bilinear", antialias=True)
        expected = expected.permute(1, 0, 2, 3).numpy()
        assert np.abs(out.astype(np.float32) - expected).max() <= 1.5  # uint8 rounding only


def test_cut_rejects_the_wrong_frames():
    sampler = ViewSampler(load_config("tiny").views)
    plan = sampler.plan(40, 64, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="decoded RGB frames"):
        sampler.cut(np.zeros((3, 64, 64, 3), np.uint8), plan)


def _uint8_views(views, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (batch, *slot.shape), dtype=torch.uint8, generator=generator)
        for slot in view_slots(views)
    ]


def test_augmenter_without_augmentation_only_normalises():
    """With ImageNet's statistics in RGB order, written out (not read from the config)."""
    views = load_config("tiny").views
    batch = _uint8_views(views)
    out = ViewAugmenter(views)(batch, torch.Generator(), augment=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    for raw, normalised in zip(batch, out, strict=True):
        torch.testing.assert_close(normalised, (raw.float() / 255 - mean) / std)


def test_augmenter_is_seeded_and_shape_preserving():
    views = load_config("tiny").views
    batch = _uint8_views(views)
    augmenter = ViewAugmenter(views)
    a = augmenter(batch, torch.Generator().manual_seed(5))
    b = augmenter(batch, torch.Generator().manual_seed(5))
    c = augmenter(batch, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert [x.shape for x in a] == [tuple(x.shape) for x in batch]
    assert all(x.dtype == torch.float32 for x in a)


def test_augmentation_is_shared_by_all_frames_of_a_view():
    views = load_config("tiny", overrides=["views.flip_p=0.5", "views.hue=0.1"]).views
    batch = _uint8_views(views, batch=8)
    batch = [v[:, :, :1].expand_as(v).contiguous() for v in batch]  # every frame identical
    out = ViewAugmenter(views)(batch, torch.Generator().manual_seed(0))
    for view in out:
        assert torch.allclose(view, view[:, :, :1].expand_as(view), atol=1e-6)


def test_flip_and_grayscale_and_solarize_when_certain():
    views = load_config(
        "tiny",
        overrides=[
            "views.flip_p=1",
            "views.color_jitter_p=0",
            "views.grayscale_p=1",
            "views.global_blur_p=[0]",
            "views.local_blur_p=0",
            "views.global_solarize_p=[1]",
            "views.local_solarize_p=1",
            "views.solarize_threshold=0.5",
        ],
    ).views
    batch = _uint8_views(views, batch=2)
    x = batch[0].float() / 255
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1, 1)).sum(1, keepdim=True)
    gray = gray.expand_as(x).flip(-1)
    expected = torch.where(gray >= 0.5, 1 - gray, gray)
    augmented = ViewAugmenter(views).augment(x, view_slots(views)[0], torch.Generator())
    torch.testing.assert_close(augmented, expected)


def test_blur_and_solarize_follow_dinos_asymmetric_probabilities_per_view():
    """DINO's (and the paper preset's) per-view probabilities, measured on 4000 clips per
    view: the first global view always blurred and never solarized, the second blurred 10%
    and solarized 20% of the time, every local view blurred half the time, never solarized."""
    views = paper_views(
        "views.flip_p=0", "views.color_jitter_p=0", "views.grayscale_p=0",
        "views.blur_sigma=[1.0, 2.0]",  # every blur visible on a checkerboard
    )  # fmt: skip
    augmenter = ViewAugmenter(views)
    generator = torch.Generator().manual_seed(0)
    bright = torch.full((4000, 3, 1, 4, 4), 0.8)  # solarized -> 0.2; a blur leaves it alone
    board = 0.4 * (torch.arange(4).view(4, 1) + torch.arange(4)).remainder(2).float()
    board = board.expand(4000, 3, 1, 4, 4)  # below the threshold: never solarized
    expected = {"g0": (1.0, 0.0), "g1": (0.1, 0.2), **{f"l{i}": (0.5, 0.0) for i in range(8)}}
    for slot in view_slots(views):
        solarized = (augmenter.augment(bright, slot, generator) < 0.5).flatten(1).all(1)
        blurred = (augmenter.augment(board, slot, generator) - board).abs().flatten(1).amax(1)
        blur_p, solarize_p = expected[slot.name]
        assert abs((blurred > 1e-3).float().mean().item() - blur_p) < 0.03, slot.name
        assert abs(solarized.float().mean().item() - solarize_p) < 0.03, slot.name


def test_gaussian_blur_matches_a_reference_and_zero_sigma_is_identity():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 2, 16, 16)
    sigma = torch.tensor([0.0, 1.0])
    out = gaussian_blur(x, sigma)
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * offsets**2)
    kernel = kernel / kernel.sum()
    planes = x[1].reshape(-1, 1, 16, 16)
    padded = F.pad(planes, (radius, radius, radius, radius), mode="reflect")
    ref = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    torch.testing.assert_close(out[1], ref.view(3, 2, 16, 16), atol=1e-5, rtol=1e-5)
    assert out[1].std() < x[1].std()


def _jitter_only(*overrides):
    """Views whose only augmentation is a colour jitter that always happens."""
    return load_config(
        "tiny",
        overrides=[
            "views.flip_p=0",
            "views.color_jitter_p=1",
            "views.grayscale_p=0",
            "views.global_blur_p=[0]",
            "views.local_blur_p=0",
            "views.global_solarize_p=[0]",
            "views.local_solarize_p=0",
            *overrides,
        ],
    ).views


def _frames_of_different_levels(batch=3, frames=4, size=6, seed=0):
    """Float clips in [0.15, 0.85] whose frames differ in mean brightness (so a per-frame
    contrast anchor differs from the whole view's) and whose channels differ (so saturation
    and hue have something to act on)."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.15 + 0.5 * torch.rand(batch, 3, frames, size, size, generator=generator)
    levels = torch.linspace(0.0, 0.2, frames).view(1, 1, frames, 1, 1)
    return (x + levels).double()


def _yiq_rotation_reference(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Hue rotation written out: NTSC RGB -> YIQ, rotate (I, Q) by 2*pi*shift, back, clamp."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    y, i, q = np.einsum("ij,jthw->ithw", to_yiq, rgb)
    angle = 2 * np.pi * shift
    i, q = i * np.cos(angle) - q * np.sin(angle), i * np.sin(angle) + q * np.cos(angle)
    back = np.einsum("ij,jthw->ithw", np.linalg.inv(to_yiq), np.stack([y, i, q]))
    return np.clip(back, 0.0, 1.0)


def test_brightness_contrast_saturation_blend_with_their_anchors_in_the_drawn_order():
    """With jitter certain, each view gets f * x + (1 - f) * anchor per op, in a random order
    per view: black for brightness, the view's mean luma over all its frames and pixels for
    contrast, the pixel's luma for saturation; clamped to [0, 1] after every op. The factors
    and the order are recomputed from the generator's draws (flip, jitter, the three factors,
    the order keys)."""
    views = _jitter_only("views.brightness=0.4", "views.contrast=0.6", "views.saturation=0.5")
    x = _frames_of_different_levels()
    batch = x.shape[0]
    augmented = ViewAugmenter(views).augment(
        x.float(), view_slots(views)[0], torch.Generator().manual_seed(11)
    )

    draws = torch.Generator().manual_seed(11)
    torch.rand(batch, generator=draws)  # flip
    torch.rand(batch, generator=draws)  # jitter (certain)
    strengths = torch.tensor([0.4, 0.6, 0.5])
    factors = 1 + (2 * torch.rand(batch, 3, generator=draws) - 1) * strengths
    order = torch.argsort(torch.rand(batch, 3, generator=draws), dim=1)
    luma = np.array([0.299, 0.587, 0.114]).reshape(3, 1, 1, 1)
    seen_orders = set()
    for b in range(batch):
        view = x[b].numpy()
        seen_orders.add(tuple(order[b].tolist()))
        for op in order[b].tolist():
            f = float(factors[b, op])
            gray = (view * luma).sum(axis=0, keepdims=True)
            anchor = [np.zeros_like(view), gray.mean(), gray][op]  # brightness, contrast, sat.
            view = np.clip(f * view + (1 - f) * anchor, 0.0, 1.0)
        np.testing.assert_allclose(augmented[b].numpy(), view, atol=1e-5, rtol=0)
    assert len(seen_orders) > 1  # the draws exercise more than one order
    assert (factors - 1).abs().min() > 0.02  # every op changes every view
    assert (factors[:, 1] - 1).abs().max() > 0.3  # one strong contrast: its anchor matters


def test_hue_jitter_rotates_i_and_q_in_yiq_space():
    """hue > 0 rotates each view's chroma (I, Q) by 2*pi*shift turns, shift ~ U(-hue, hue)
    drawn after the order keys; luma is kept (before clamping)."""
    views = _jitter_only(
        "views.brightness=0", "views.contrast=0", "views.saturation=0", "views.hue=0.4"
    )
    x = _frames_of_different_levels(seed=1)
    batch = x.shape[0]
    augmented = ViewAugmenter(views).augment(
        x.float(), view_slots(views)[0], torch.Generator().manual_seed(3)
    )

    draws = torch.Generator().manual_seed(3)
    torch.rand(batch, generator=draws)  # flip
    torch.rand(batch, generator=draws)  # jitter (certain)
    torch.rand(batch, 3, generator=draws)  # factors (all 1: strengths 0)
    torch.rand(batch, 3, generator=draws)  # order keys
    shifts = (2 * torch.rand(batch, generator=draws) - 1) * 0.4
    assert shifts.abs().min() > 0.02  # every view is rotated visibly
    for b in range(batch):
        expected = _yiq_rotation_reference(x[b].numpy(), float(shifts[b]))
        np.testing.assert_allclose(augmented[b].numpy(), expected, atol=1e-5, rtol=0)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1, 1)
    unclamped = ((augmented > 0) & (augmented < 1)).all(dim=1, keepdim=True)
    kept = ((augmented * luma).sum(1, keepdim=True) - (x.float() * luma).sum(1, keepdim=True)).abs()
    assert kept[unclamped].max() < 1e-5 and unclamped.float().mean() > 0.5


def test_sample_crop_falls_back_to_the_largest_centred_box_of_an_allowed_ratio():
    """When no attempt fits (the areas asked for exceed the frame), the box is centred: the
    full height of a frame wider than the widest ratio, the full width of one narrower than
    the narrowest, and the whole frame when its own ratio is allowed."""
    ratio = (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    wide = sample_crop(10, 100, (0.9, 1.0), ratio, rng)  # every try is taller than 10 px
    assert (wide.top, wide.left, wide.height, wide.width) == (0, (100 - 13) // 2, 10, 13)
    tall = sample_crop(100, 10, (0.9, 1.0), ratio, rng)
    assert (tall.top, tall.left, tall.height, tall.width) == ((100 - 13) // 2, 0, 13, 10)
    square = sample_crop(30, 30, (2.0, 3.0), ratio, rng)  # twice the frame: never fits
    assert (square.top, square.left, square.height, square.width) == (0, 0, 30, 30)
