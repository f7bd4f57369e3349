"""The SVT view sampler: which frames, which crops and which augmentations make the views of a clip.

Three stages, split by where they run (design.md "One decode per clip"):

1. `ViewSampler.plan` (CPU, before decoding): the frame indices of every view and one crop box
   per view, so the decoder fetches the union of the frames once.
2. `ViewSampler.cut` (CPU, after decoding): crop and resize each view from the decoded
   frames, emitting compact uint8 tensors `(3, t, s, s)` with a fixed shape per view slot.
3. `ViewAugmenter` (training device, batched): flip, colour jitter, grayscale, Gaussian blur,
   solarize and normalisation, with one set of parameters per view shared by all its frames.

Temporal sampling follows the paper (svt_spec §2.1): global views spread their frames over a
random ~90% span of the clip window, local views over a random 1/8 span; `global_window=
"reference"` reproduces the reference code's fixed windows [0, L-5] and [5, L] (§2.2).
All randomness comes from the generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from svt_ray.config import ViewsConfig, span_frames

# The reference code shifts its two fixed global windows by this many frames.
REFERENCE_GLOBAL_SHIFT = 5


@dataclass(frozen=True)
class ViewSlot:
    """One view position of every sample: its shape is fixed across the batch."""

    name: str  # column name: g0, g1, ..., l0, l1, ...
    kind: str  # "global" | "local"
    index: int  # position among the views of its kind
    frames: int
    size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of one view."""
        return (3, self.frames, self.size, self.size)


def view_slots(views: ViewsConfig) -> list[ViewSlot]:
    """Global slots first, then local ones: the order of the student's outputs."""
    slots = [
        ViewSlot(f"g{i}", "global", i, frames, views.global_size)
        for i, frames in enumerate(views.global_frame_counts())
    ]
    slots += [
        ViewSlot(f"l{i}", "local", i, frames, views.local_size)
        for i, frames in enumerate(views.local_frame_counts())
    ]
    return slots


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int


@dataclass
class ClipPlan:
    """Everything decided about one clip before decoding it."""

    frame_indices: list[np.ndarray]  # per slot, int64 indices into the source video
    boxes: list[CropBox]  # per slot, in source pixels

    @property
    def union(self) -> np.ndarray:
        """Sorted unique frame indices of all views: decode these once."""
        return np.unique(np.concatenate(self.frame_indices))


def spread_indices(start: float, stop: float, count: int, limit: int) -> np.ndarray:
    """`count` evenly spaced frames from `start` to `stop`, clamped to [0, limit-1] and truncated.

    The reference code's `temporal_sampling` (linspace, clamp, truncate to int).
    """
    positions = np.linspace(start, stop, count)
    return np.clip(positions, 0, limit - 1).astype(np.int64)


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> CropBox:
    """A RandomResizedCrop box: area fraction ~ U(scale), aspect ratio log-uniform in `ratio`.

    Falls back to the largest centred box of an allowed aspect ratio, as torchvision does.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return CropBox(top, left, crop_height, crop_width)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_height, crop_width = height, round(height * ratio[1])
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


class ViewSampler:
    """Plans and cuts the SVT views of one clip (CPU side)."""

    def __init__(self, views: ViewsConfig):
        self.config = views
        self.slots = view_slots(views)

    def plan(self, num_frames: int, height: int, width: int, rng: np.random.Generator) -> ClipPlan:
        """Decide the frames and crop box of every view of a clip of `num_frames` frames."""
        if num_frames < 1 or height < 1 or width < 1:
            raise ValueError(
                f"cannot cut views from a clip of {num_frames} frames of {height}x{width}"
            )
        cfg = self.config
        window = min(cfg.clip_frames, num_frames)
        window_start = int(rng.integers(0, num_frames - window + 1))
        indices, boxes = [], []
        for slot in self.slots:
            if slot.kind == "global" and cfg.global_window == "reference":
                shift = min(REFERENCE_GLOBAL_SHIFT, window - 1)
                start, stop = (0, window - shift) if slot.index % 2 == 0 else (shift, window)
                local = spread_indices(start, stop, slot.frames, window)
            elif cfg.global_window == "reference":  # its locals: linspace(r, r + L//8) for
                # r = randint(0, L - L//8 - 1), both ends included: L//8 + 1 frames
                span = int(cfg.local_span * window)
                start = int(rng.integers(0, max(window - span - 1, 0) + 1))
                local = spread_indices(start, start + span, slot.frames, window)
            else:
                fraction = cfg.global_span if slot.kind == "global" else cfg.local_span
                span = min(window, max(slot.frames, span_frames(fraction, window)))
                start = int(rng.integers(0, window - span + 1))
                local = spread_indices(start, start + span - 1, slot.frames, window)
            indices.append(local + window_start)
            scale = cfg.global_crop_scale if slot.kind == "global" else cfg.local_crop_scale
            boxes.append(sample_crop(height, width, scale, cfg.aspect_ratio, rng))
        return ClipPlan(indices, boxes)

    def cut(self, frames: np.ndarray, plan: ClipPlan) -> dict[str, np.ndarray]:
        """Crop and resize every view from the decoded union of frames.

        frames: uint8 (len(plan.union), H, W, 3), in `plan.union` order.
        Returns slot name -> uint8 (3, t, s, s).
        """
        union = plan.union
        if frames.shape[0] != len(union) or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"expected {len(union)} decoded RGB frames (n, h, w, 3), got shape {frames.shape}"
            )
        source = torch.from_numpy(np.ascontiguousarray(frames))
        views = {}
        for slot, frame_indices, box in zip(
            self.slots, plan.frame_indices, plan.boxes, strict=True
        ):
            rows = torch.from_numpy(np.searchsorted(union, frame_indices))
            crop = source[rows, box.top : box.top + box.height, box.left : box.left + box.width]
            crop = crop.permute(0, 3, 1, 2)  # (t, h, w, c) -> (t, c, h, w), channels-last in memory
            resized = F.interpolate(
                crop, size=(slot.size, slot.size), mode=self.config.interpolation, antialias=True
            )  # uint8 in, uint8 out: torch's vectorised uint8 resize path
            views[slot.name] = resized.permute(1, 0, 2, 3).contiguous().numpy()  # (c, t, s, s)
        return views


# -- photometric augmentation on the training device ------------------------------------------

# ITU-R 601 luma weights on RGB (the reference code swaps R and B; harmless, not copied).
_LUMA = (0.299, 0.587, 0.114)
_BRIGHTNESS, _CONTRAST, _SATURATION = 0, 1, 2


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(b, 3, t, h, w) -> (b, 1, t, h, w) grayscale."""
    weights = x.new_tensor(_LUMA).view(1, 3, 1, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) -> (b, 1, 1, 1, 1) on like's device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample of (b, c, t, h, w) with its own sigma (pixels); sigma 0 = identity."""
    b, c, t, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(device=x.device, dtype=x.dtype).clamp_min(1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)  # (b, k)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c * t, dim=0)  # one kernel per (sample, channel, frame)
    planes = x.reshape(1, b * c * t, h, w)
    mode = "reflect" if radius < min(h, w) else "replicate"
    planes = F.pad(planes, (radius, radius, 0, 0), mode=mode)
    planes = F.conv2d(planes, kernel.view(-1, 1, 1, 2 * radius + 1), groups=b * c * t)
    planes = F.pad(planes, (0, 0, radius, radius), mode=mode)
    planes = F.conv2d(planes, kernel.view(-1, 1, 2 * radius + 1, 1), groups=b * c * t)
    return planes.view(b, c, t, h, w)


class ViewAugmenter:
    """Photometric augmentation and normalisation of uint8 view batches, on any device.

    One draw of parameters per view of each sample, shared by all frames of that view
    (temporally consistent, like the reference). Runs batched: no Python loop over samples.
    """

    def __init__(self, views: ViewsConfig):
        self.config = views
        self.slots = view_slots(views)

    def _probabilities(self, slot: ViewSlot) -> tuple[float, float]:
        cfg = self.config
        if slot.kind == "global":
            blur = cfg.global_blur_p[slot.index % len(cfg.global_blur_p)]
            solarize = cfg.global_solarize_p[slot.index % len(cfg.global_solarize_p)]
            return blur, solarize
        return cfg.local_blur_p, cfg.local_solarize_p

    def __call__(
        self, views: list[torch.Tensor], generator: torch.Generator, augment: bool = True
    ) -> list[torch.Tensor]:
        """uint8 (b, 3, t, s, s) per slot -> normalised float32 views, augmented if asked."""
        if len(views) != len(self.slots):
            raise ValueError(f"expected {len(self.slots)} views, got {len(views)}")
        mean = torch.tensor(self.config.mean).view(1, 3, 1, 1, 1)
        std = torch.tensor(self.config.std).view(1, 3, 1, 1, 1)
        out = []
        for slot, view in zip(self.slots, views, strict=True):
            x = view.float().div_(255.0)
            if augment:
                x = self.augment(x, slot, generator)
            out.append((x - mean.to(x.device)) / std.to(x.device))
        return out

    def augment(self, x: torch.Tensor, slot: ViewSlot, generator: torch.Generator) -> torch.Tensor:
        """Augment one slot's float batch in [0, 1]; parameters drawn on the CPU generator."""
        cfg, batch = self.config, x.shape[0]

        def draw(n: int = batch) -> torch.Tensor:
            return torch.rand(n, generator=generator)

        blur_p, solarize_p = self._probabilities(slot)
        flip = draw() < cfg.flip_p
        jitter = draw() < cfg.color_jitter_p
        # Each op's factor ~ U(1 - v, 1 + v); a factor of 1 leaves the view unchanged.
        strengths = torch.tensor([cfg.brightness, cfg.contrast, cfg.saturation])
        factors = 1 + (2 * torch.rand(batch, 3, generator=generator) - 1) * strengths
        factors = torch.where(jitter[:, None], factors, torch.ones_like(factors))
        order = torch.argsort(torch.rand(batch, 3, generator=generator), dim=1)
        hue_shift = (2 * draw() - 1) * cfg.hue * jitter
        gray = draw() < cfg.grayscale_p
        sigma = cfg.blur_sigma[0] + draw() * (cfg.blur_sigma[1] - cfg.blur_sigma[0])
        sigma = torch.where(draw() < blur_p, sigma, torch.zeros_like(sigma))
        solarize = draw() < solarize_p

        if flip.any():
            x = torch.where(_per_sample(flip, x).bool(), x.flip(-1), x)
        if jitter.any():
            for position in range(3):  # the three ops in a random order per sample
                for op in (_BRIGHTNESS, _CONTRAST, _SATURATION):
                    chosen = order[:, position] == op
                    factor = torch.where(chosen, factors[:, op], torch.ones_like(factors[:, op]))
                    if bool((factor != 1).any()):
                        x = _colour_op(x, op, _per_sample(factor, x))
            if cfg.hue > 0:
                x = _rotate_hue(x, _per_sample(hue_shift, x))
        if gray.any():
            x = torch.where(_per_sample(gray, x).bool(), _luma(x).expand_as(x), x)
        if bool((sigma > 0).any()):
            x = torch.where(_per_sample(sigma > 0, x).bool(), gaussian_blur(x, sigma), x)
        if solarize.any():
            inverted = torch.where(x >= cfg.solarize_threshold, 1.0 - x, x)
            x = torch.where(_per_sample(solarize, x).bool(), inverted, x)
        return x


def _colour_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black (brightness), the view's mean gray (contrast) or its gray (saturation)."""
    if op == _BRIGHTNESS:
        anchor = torch.zeros_like(x)
    elif op == _CONTRAST:
        anchor = _luma(x).mean(dim=(2, 3, 4), keepdim=True)
    else:
        anchor = _luma(x)
    return (factor * x + (1 - factor) * anchor).clamp_(0.0, 1.0)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` turns in YIQ space (a cheap, batched stand-in for HSV hue jitter)."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,bjthw->bithw", to_yiq, x)
    angle = 2 * math.pi * shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], i * cos - q * sin, i * sin + q * cos], dim=1)
    return torch.einsum("ij,bjthw->bithw", torch.linalg.inv(to_yiq), yiq).clamp_(0.0, 1.0)
