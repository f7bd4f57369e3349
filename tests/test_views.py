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
    sampler = ViewSampler(paper_views())
    rng = np.random.default_rng(0)
    for _ in range(50):
        plan = sampler.plan(num_frames=300, height=256, width=340, rng=rng)
        window_starts = []
        for slot, indices in zip(sampler.slots, plan.frame_indices, strict=True):
            assert len(indices) == slot.frames
            assert np.all(np.diff(indices) >= 0)  # in temporal order
            extent = indices[-1] - indices[0] + 1
            if slot.kind == "global":
                assert 0.85 * 128 <= extent <= 0.9 * 128 + 1  # ~90% of the 128-frame window
            else:
                assert extent == 16  # 1/8 of the window
            window_starts.append(indices.min())
        union = plan.union
        assert union.min() >= 0 and union.max() < 300
        assert union.max() - union.min() < 128  # all views inside one clip window
        assert np.array_equal(union, np.unique(np.concatenate(plan.frame_indices)))


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
    views = load_config("tiny").views
    batch = _uint8_views(views)
    out = ViewAugmenter(views)(batch, torch.Generator(), augment=False)
    mean = torch.tensor(views.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(views.std).view(1, 3, 1, 1, 1)
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
