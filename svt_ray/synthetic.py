"""Procedurally generated action videos whose class is a motion, never an appearance.

The embedded default data of the demo, the tests and the studies, in two styles (`STYLES`):

- `scene` (the default, and what the demo and the studies train on): the whole frame is a
  smooth random grey texture that moves as one, by class: panning right, left, up or down,
  rotating clockwise or anticlockwise about a random centre, zooming in or out
  (`SCENE_CLASS_NAMES`). The texture is a cross-fade of independent random fields that each
  live 32 frames, so no texture is shared by all frames of a clip; palette, texture scale and
  speed are the same for every clip, so the motion is the only clip-level variable. The
  embedded default takes the first 4 classes (the four pans): docs/demo.md measures why
  (a tiny TimeSformer learns these from scratch in a few hundred self-supervised steps on a
  CPU; a palette per clip or more kinds of motion and it does not, within that budget).
- `objects`: one textured, asymmetric object doing one of ten motions (`CLASS_NAMES`):
  translation in four directions, clockwise / anticlockwise rotation, growing, shrinking,
  bouncing and shaking. Everything a single frame shows is random and, on purpose, *changes
  over time inside the clip*: the background is a blend of two random grating textures whose
  mix, phases and two colours drift and flicker frame to frame; the object's colours drift,
  its stripe texture is random, and its shape switches every few dozen frames; small
  distractor discs wander on random walks. Harder: at demo scale even supervised training
  stays near chance (docs/demo.md).

Why appearance must not be shared across a clip (svt_spec §2-3): SVT's views are cut from one
clip, so any appearance that every frame of a clip shares (a fixed background colour, say)
lets student and teacher agree without looking at motion. Classes are defined by direction,
so horizontal flip must stay off when training on this data.

Per-frame marginals are matched across classes (positions, sizes, angles and textures are
drawn so that a frame taken at a random time looks the same whatever the class); tests check
that a per-frame appearance classifier stays near chance while motion read from two frames
gives the class.

Clips are deterministic functions of (seed, index), encoded to H.264 mp4 with the same
`svt_ray.video.H264Encoder` data_prep uses, and written one folder per class
(`<root>/<NN>_<class>/<clip_id>.mp4`, `NN` keeping folder order = class order) so that
`python -m data_prep` ingests them like any labelled collection.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pyarrow import fs as pafs

from data_prep.inputs import resolve_filesystem
from data_prep.shards import Output
from svt_ray.config import ConfigError
from svt_ray.help_format import HelpFormatter
from svt_ray.video import EncoderSettings, encode_h264

logger = logging.getLogger(__name__)

CLASS_NAMES = (
    "move_right",
    "move_left",
    "move_up",
    "move_down",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
    "bounce",
    "shake",
)
"""The `objects` style's classes."""

SCENE_CLASS_NAMES = (
    "pan_right",
    "pan_left",
    "pan_up",
    "pan_down",
    "rotate_cw",
    "rotate_ccw",
    "zoom_in",
    "zoom_out",
)
"""The `scene` style's classes; the embedded default uses the first 4."""

STYLES = {"scene": SCENE_CLASS_NAMES, "objects": CLASS_NAMES}

# Asymmetric shapes (so rotation is visible), each a union of convex polygons, counter-clockwise,
# in unit coordinates centred on the origin.
SHAPES: tuple[tuple[np.ndarray, ...], ...] = tuple(
    tuple(np.asarray(part, dtype=np.float64) for part in shape)
    for shape in (
        [[(-0.9, -0.6), (0.9, 0.0), (-0.9, 0.6)]],  # arrowhead triangle
        [
            [(-0.8, -0.8), (-0.3, -0.8), (-0.3, 0.8), (-0.8, 0.8)],  # L
            [(-0.3, -0.8), (0.8, -0.8), (0.8, -0.3), (-0.3, -0.3)],
        ],
        [
            [(-0.9, -0.25), (0.2, -0.25), (0.2, 0.25), (-0.9, 0.25)],  # arrow
            [(0.2, -0.7), (0.9, 0.0), (0.2, 0.7)],
        ],
        [
            [(-0.8, 0.4), (0.8, 0.4), (0.8, 0.85), (-0.8, 0.85)],  # T
            [(-0.25, -0.85), (0.25, -0.85), (0.25, 0.4), (-0.25, 0.4)],
        ],
        [[(-0.7, -0.9), (0.9, -0.5), (0.5, 0.9), (-0.9, 0.3)]],  # skewed quadrilateral
    )
)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Defaults make a small set that encodes in seconds."""

    num_clips: int = 200
    """Clips in total; labels are assigned round-robin, so classes are balanced."""
    num_classes: int = 4
    """The first `num_classes` of the style's class names."""
    style: str = "scene"
    """`scene` (whole-frame texture motion) or `objects` (an object over a drifting scene)."""
    num_frames: int = 64
    height: int = 96
    width: int = 96
    fps: float = 15.0
    seed: int = 0
    num_distractors: int = 3
    gop: int = 16
    crf: int = 20

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {sorted(STYLES)}, got {self.style!r}")
        most = len(STYLES[self.style])
        if not 1 <= self.num_classes <= most:
            raise ValueError(
                f"num_classes must lie in [1, {most}] for style {self.style!r}, "
                f"got {self.num_classes}"
            )
        if self.num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {self.num_clips}")
        if self.seed < 0:  # numpy refuses it only when the first clip is drawn
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise ValueError(
                f"height and width must be even and >= 16, got {self.height}x{self.width}"
            )
        # Checked here, before synthetic.json records them: a folder made with a bad value
        # would refuse the corrected command as "other settings".
        need = render_memory(self)
        if need > RENDER_MEMORY_LIMIT:
            raise ValueError(
                f"height x width x num_frames {self.height}x{self.width}x{self.num_frames} "
                f"needs about {need / 2**30:.0f} GiB to render one {self.style} clip, more than "
                f"the {RENDER_MEMORY_LIMIT >> 30} GiB allowed: use a smaller height, width or "
                "num_frames"
            )
        if not 0 < self.fps < 1000:
            raise ValueError(f"fps must lie in (0, 1000), got {self.fps}")
        if self.gop < 1 or not 0 <= self.crf <= 51 or self.num_distractors < 0:
            raise ValueError(
                f"gop must be >= 1, crf in [0, 51] and num_distractors >= 0, got gop "
                f"{self.gop}, crf {self.crf}, num_distractors {self.num_distractors}"
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return STYLES[self.style][: self.num_classes]


RENDER_MEMORY_LIMIT = 8 << 30
"""Most bytes one clip's rendering may need (`render_memory`). A fixed cap, not the free
memory, so a command is accepted or refused alike on every machine and Ray node. The largest
clips the project makes (benchmarks/loader.py: 300 frames of 320x256, objects style) need
about 2 GiB; each of `--workers` renders one clip at a time."""


def render_memory(config: SynthConfig) -> int:
    """About the peak bytes of the work arrays `render_clip` makes, a little above tracemalloc's
    peaks (e.g. 46 MB measured, 51 estimated at 64 x 128 x 160; 538 and 850 at 8 x 720 x 1280):
    the scene style holds a float64 (T, H, W) texture plus the samples of the fields live at
    once (a field lives 32 frames) and a periodic field of twice the longer side; the objects
    style some float32 (T, H, W) arrays."""
    frames, pixels = config.num_frames, config.height * config.width
    if config.style == "scene":
        field = 2 * max(64, config.height, config.width)
        return (12 * frames + 44 * min(frames, SCENE_LIFETIME)) * pixels + 64 * field**2
    return 80 * (frames + 4) * pixels


def clip_label(config: SynthConfig, index: int) -> int:
    return index % config.num_classes


def clip_id(config: SynthConfig, index: int) -> str:
    return f"synth-s{config.seed}-{index:06d}"


def class_folder(config: SynthConfig, label: int) -> str:
    return f"{label:02d}_{config.class_names[label]}"


# --------------------------------------------------------------------------------------------
# Rendering


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all inputs broadcastable, output (..., 3) in [0, 1]."""
    hue = np.mod(hue, 1.0)
    k = np.mod(np.stack([5.0, 3.0, 1.0]) + hue[..., None] * 6.0, 6.0)  # (..., 3)
    channel = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] * (1.0 - saturation[..., None] * channel)


def _drifting_colour(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """(T, 3) colour whose hue drifts and flickers and whose brightness wobbles."""
    drift = rng.uniform(0.5, 1.5) * rng.choice((-1.0, 1.0))  # hue cycles per clip
    hue = rng.random() + drift * t + 0.04 * rng.standard_normal(t.shape)
    saturation = np.clip(
        rng.uniform(0.4, 1.0) + 0.1 * np.sin(2 * np.pi * (t * rng.uniform(1, 3))), 0, 1
    )
    value = np.clip(rng.uniform(0.45, 1.0) + 0.08 * rng.standard_normal(t.shape), 0.1, 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _grating_texture(rng: np.random.Generator, t: np.ndarray, ys: np.ndarray, xs: np.ndarray):
    """(T, H, W) float32 texture in [0, 1]: a few gratings whose phases random-walk over time."""
    texture = np.zeros((t.size, ys.size, xs.size), dtype=np.float32)
    for _ in range(3):
        angle = rng.uniform(0, np.pi)
        frequency = rng.uniform(1.0, 5.0)  # cycles per frame short side
        phase = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, t.size))
        projection = (
            2 * np.pi * frequency * (np.cos(angle) * xs[None, :] + np.sin(angle) * ys[:, None])
        )
        # sin(p + phase_t) = sin(p) cos(phase_t) + cos(p) sin(phase_t): no per-frame sin.
        texture += (
            np.sin(projection).astype(np.float32)[None]
            * np.cos(phase).astype(np.float32)[:, None, None]
        )
        texture += (
            np.cos(projection).astype(np.float32)[None]
            * np.sin(phase).astype(np.float32)[:, None, None]
        )
    return 0.5 + texture / 6.0


def _trajectory(label_name: str, rng: np.random.Generator, t: np.ndarray, aspect: float):
    """Centre (T, 2) in units of the frame's short side, angle (T,) and scale (T,) of the object.

    Ranges are chosen so that, at a random frame, position, angle and scale are distributed
    alike for every class: the class lives in how they change, not in what they are.
    """
    phase = t - 0.5  # in [-0.5, 0.5] over the clip
    scale = np.full(t.shape, np.exp(rng.uniform(np.log(0.09), np.log(0.2))))
    angle = np.full(t.shape, rng.uniform(0, 2 * np.pi))
    extent = np.array([aspect, 1.0])  # frame size in short-side units (x, y)
    centre = rng.uniform(0.25, 0.75, size=2) * extent
    offset = np.zeros((t.size, 2))
    distance = rng.uniform(0.3, 0.5)
    if label_name.startswith("move_"):
        direction = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[
            label_name[5:]
        ]
        offset = np.outer(phase * distance, direction)
    elif label_name.startswith("rotate_"):
        turn = rng.uniform(1.0, 2.0) * np.pi * (1 if label_name == "rotate_cw" else -1)
        # Image y points down, so a positive angle step turns clockwise on screen.
        angle = angle + turn * phase
    elif label_name in ("grow", "shrink"):
        ratio = np.log(rng.uniform(2.0, 3.0)) * (1 if label_name == "grow" else -1)
        scale = scale * np.exp(ratio * phase)
    elif label_name == "bounce":
        bounces = rng.integers(2, 4)
        height = distance * 0.8
        offset[:, 1] = -height * (np.abs(np.sin(np.pi * bounces * t + rng.uniform(0, np.pi))) - 0.5)
    elif label_name == "shake":
        periods = rng.uniform(3.0, 5.0)
        offset[:, 0] = 0.5 * distance * np.sin(2 * np.pi * periods * t + rng.uniform(0, 2 * np.pi))
    else:
        raise ValueError(f"unknown class {label_name!r}")
    # Small wobble on every class, so no class is perfectly still in any channel.
    angle = angle + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6.3))
    return centre + offset, angle, scale


def _polygon_coverage(u: np.ndarray, v: np.ndarray, polygon: np.ndarray, pixel: np.ndarray):
    """Anti-aliased coverage of a convex CCW polygon at local coords (u, v): min edge distance."""
    distance = np.full(u.shape, np.inf, dtype=u.dtype)
    for k in range(len(polygon)):
        (x0, y0), (x1, y1) = polygon[k], polygon[(k + 1) % len(polygon)]
        length = np.hypot(x1 - x0, y1 - y0)
        ex, ey = np.float32((x1 - x0) / length), np.float32((y1 - y0) / length)
        # Signed distance to the edge line, positive inside for a CCW polygon (y up).
        signed = ex * (v - np.float32(y0)) - ey * (u - np.float32(x0))
        np.minimum(distance, signed, out=distance)
    return np.clip(distance / pixel + 0.5, 0.0, 1.0)


def render_clip(config: SynthConfig, index: int) -> np.ndarray:
    """The frames of clip `index`: uint8 (T, H, W, 3). Deterministic in (config.seed, index)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, index]))
    label_name = config.class_names[clip_label(config, index)]
    if config.style == "scene":
        return _render_scene(config, label_name, rng)
    num_frames, height, width = config.num_frames, config.height, config.width
    short = min(height, width)
    t = np.linspace(0.0, 1.0, num_frames)
    ys = ((np.arange(height) + 0.5) / short).astype(np.float32)  # pixel centres, short-side units
    xs = ((np.arange(width) + 0.5) / short).astype(np.float32)

    # Background: two drifting textures, mixed with a time-varying weight, two drifting colours.
    texture_a = _grating_texture(rng, t, ys, xs)
    texture_b = _grating_texture(rng, t, ys, xs)
    mix = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 2 * np.pi))
    texture = texture_b + mix.astype(np.float32)[:, None, None] * (texture_a - texture_b)
    colour_a = _drifting_colour(rng, t).astype(np.float32)[:, None, None, :]
    colour_b = _drifting_colour(rng, t).astype(np.float32)[:, None, None, :]
    frames = colour_b + texture[..., None] * (colour_a - colour_b)  # (T, H, W, 3)

    # Distractors: discs on random walks with their own drifting colours.
    for _ in range(config.num_distractors):
        radius = rng.uniform(0.03, 0.07)
        steps = rng.normal(0.0, 0.02, size=(num_frames, 2))
        path = rng.uniform(0, 1, size=2) * (width / short, height / short) + np.cumsum(
            steps, axis=0
        )
        path = np.abs(np.mod(path + 1.0, 2.0) - 1.0)  # reflect into [0, 1]
        path *= (width / short, height / short)
        colour = _drifting_colour(rng, t).astype(np.float32)
        _blend_disc(frames, path * short, radius * short, colour)

    # The object: pixel coords -> object coords (rotate by -angle, divide by scale).
    centre, angle, scale = (
        a.astype(np.float32) for a in _trajectory(label_name, rng, t, width / short)
    )
    dx = xs[None, None, :] - centre[:, 0, None, None]  # (T, 1, W)
    dy = ys[None, :, None] - centre[:, 1, None, None]  # (T, H, 1)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    s = scale[:, None, None]
    u = (cos * dx + sin * dy) / s  # (T, H, W)
    v = -(-sin * dx + cos * dy) / s  # flip to y-up so polygons are CCW
    pixel = np.float32(1.0) / (short * s)
    # The shape changes every 16-40 frames, so shape is not a clip-wide constant either.
    shape_of_frame = np.empty(num_frames, dtype=np.int64)
    start = 0
    while start < num_frames:
        length = int(rng.integers(16, 41))
        shape_of_frame[start : start + length] = rng.integers(len(SHAPES))
        start += length
    coverage = np.zeros((num_frames, height, width), dtype=np.float32)
    for shape_index in np.unique(shape_of_frame):
        frames_with = shape_of_frame == shape_index
        for part in SHAPES[shape_index]:
            part_coverage = _polygon_coverage(
                u[frames_with], v[frames_with], part, pixel[frames_with]
            )
            coverage[frames_with] = np.maximum(coverage[frames_with], part_coverage)
    stripe_frequency = np.float32(2 * np.pi * rng.uniform(1.5, 3.0))
    stripes = 0.5 + 0.5 * np.sin(stripe_frequency * (u + np.float32(rng.uniform(0, 1))))
    stripe_a = _drifting_colour(rng, t).astype(np.float32)[:, None, None, :]
    stripe_b = _drifting_colour(rng, t).astype(np.float32)[:, None, None, :]
    object_colour = stripe_b + stripes.astype(np.float32)[..., None] * (stripe_a - stripe_b)
    frames += coverage[..., None] * (object_colour - frames)

    # Global flicker per frame.
    gain = 255.0 * (1.0 + 0.06 * rng.standard_normal(num_frames, dtype=np.float32))
    frames *= gain[:, None, None, None]
    np.clip(frames, 0.0, 255.0, out=frames)
    return frames.astype(np.uint8)


# -- scene style: a grey texture moving as a whole --------------------------------------------

SCENE_SIGMA = 5 / 64
"""Blur of the texture, in units of the frame's short side (5 px at 64 px)."""
SCENE_SPEED = 0.75 / 64
"""Pan speed per frame in short-side units (0.75 px at 64 px); rotation and zoom move a point
at 0.35 short sides from the centre this fast."""
SCENE_LIFETIME = 32
"""Frames each random texture field is visible for (sin^2 cross-fade with the next)."""


def _noise_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A periodic (size, size) Gaussian-filtered white-noise field, zero mean, unit std."""
    k = np.fft.fftfreq(size)
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * gain))
    return (field - field.mean()) / (field.std() + 1e-8)


def _sample_periodic(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of a periodic field at float pixel coordinates."""
    size_y, size_x = field.shape
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(np.int64) % size_x, y0.astype(np.int64) % size_y
    x1, y1 = (x0 + 1) % size_x, (y0 + 1) % size_y
    top = field[y0, x0] * (1 - fx) + field[y0, x1] * fx
    bottom = field[y1, x0] * (1 - fx) + field[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _scene_sources(label_name: str, t: np.ndarray, xs, ys, centre, speed):
    """Where each pixel of frame t samples the texture: x and y in pixels, broadcastable to
    (T, H, W). Content at a source point appears where the motion has carried it."""
    t = t[:, None, None]
    if label_name.startswith("pan_"):
        dx, dy = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[label_name[4:]]
        return xs - dx * speed * t, ys - dy * speed * t  # (T, 1, W), (T, H, 1)
    short = min(xs.shape[-1], ys.shape[-2])
    rate = speed / (0.35 * short)  # radians (or log-scale) per frame
    rx, ry = xs - centre[0], ys - centre[1]
    if label_name.startswith("rotate_"):
        # Image y points down, so sampling at -angle turns the texture clockwise on screen.
        angle = -rate * t * (1 if label_name == "rotate_cw" else -1)
        cos, sin = np.cos(angle), np.sin(angle)
        return centre[0] + cos * rx - sin * ry, centre[1] + sin * rx + cos * ry
    if label_name.startswith("zoom_"):
        scale = np.exp(-rate * t * (1 if label_name == "zoom_in" else -1))
        return centre[0] + rx * scale, centre[1] + ry * scale
    raise ValueError(f"unknown scene class {label_name!r}")


def _render_scene(config: SynthConfig, label_name: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one scene-style clip (grey: the three channels are equal)."""
    num_frames, height, width = config.num_frames, config.height, config.width
    short = min(height, width)
    field_size = 2 * max(64, height, width)  # periodic; wider than a frame, so no visible repeat
    t = np.arange(num_frames, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    centre = rng.uniform(0.3, 0.7, 2) * (width, height)
    speed = SCENE_SPEED * short
    # A zoom counts each field's time from that field's own peak: scaled from frame 0, its
    # texture grew (or shrank) 2.8x over 32 frames, and one frame's edge strength told zoom_in
    # from zoom_out. Pans and rotations look the same whenever their time starts.
    zoom = label_name.startswith("zoom_")
    source_x, source_y = (
        (None, None) if zoom else _scene_sources(label_name, t, xs, ys, centre, speed)
    )

    # Fields k = 0, 1, ... peak at frames (k - 1) * L/2 - offset and live L frames each, so
    # every frame sees two of them; the first frame's mix is random, not aligned to the clip.
    half = SCENE_LIFETIME / 2
    offset = rng.uniform(0, half)
    count = int(np.ceil(num_frames / half)) + 2
    texture = np.zeros((num_frames, height, width))
    norm = np.zeros(num_frames)
    for k in range(count):
        field = _noise_field(rng, field_size, SCENE_SIGMA * short)
        origin = rng.uniform(0, field_size, 2)
        phase = (t + offset - k * half + SCENE_LIFETIME) / SCENE_LIFETIME
        live = (phase > 0) & (phase < 1)
        if not live.any():
            continue
        weight = np.sin(np.pi * phase[live]) ** 2
        if zoom:
            peak = (k - 1) * half - offset
            x, y = _scene_sources(label_name, t[live] - peak, xs, ys, centre, speed)
        else:
            x, y = source_x[live], source_y[live]
        sampled = _sample_periodic(field, x + origin[0], y + origin[1])
        texture[live] += weight[:, None, None] * sampled
        norm[live] += weight**2
    texture /= np.sqrt(np.maximum(norm, 1e-6))[:, None, None]  # unit variance at every frame
    grey = 0.15 + 0.7 / (1 + np.exp(-1.5 * texture))  # one palette for every clip
    return np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _blend_disc(frames: np.ndarray, centres: np.ndarray, radius: float, colour: np.ndarray) -> None:
    """Paint an anti-aliased disc per frame (centres (T, 2) in pixels) into frames, in place."""
    height, width = frames.shape[1:3]
    reach = int(np.ceil(radius)) + 2
    for frame, (cx, cy), rgb in zip(frames, centres, colour, strict=True):
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, width)
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1) + 0.5 - cx
        ys = np.arange(y0, y1) + 0.5 - cy
        coverage = np.clip(radius - np.hypot(xs[None, :], ys[:, None]) + 0.5, 0.0, 1.0)[..., None]
        patch = frame[y0:y1, x0:x1]
        patch += coverage.astype(np.float32) * (rgb - patch)


def encode_clip(config: SynthConfig, index: int) -> bytes:
    settings = EncoderSettings(gop=config.gop, crf=config.crf)
    return encode_h264(render_clip(config, index), config.fps, settings)


# --------------------------------------------------------------------------------------------
# Writing a labelled folder-per-class collection


@dataclass(frozen=True)
class SynthSummary:
    root: str
    num_clips: int
    written: int
    skipped: int
    total_bytes: int
    seconds: float


def _write_one(args: tuple[SynthConfig, int, str]) -> tuple[int, int]:
    """Encode and write clip `index`; return (bytes written, 1 if skipped)."""
    config, index, root = args
    fs, base = resolve_filesystem(root)
    path = f"{base}/{class_folder(config, clip_label(config, index))}/{clip_id(config, index)}.mp4"
    if fs.get_file_info(
        path
    ).size:  # already there from an earlier run: generation is deterministic
        return 0, 1
    data = encode_clip(config, index)
    folder, name = path.rsplit("/", 1)
    Output(fs, folder).write_bytes(data, name)  # hidden temporary file, then a rename
    return len(data), 0


def _write_chunk(jobs: list[tuple[SynthConfig, int, str]]) -> list[tuple[int, int]]:
    return [_write_one(job) for job in jobs]


def _recorded_config(fs, base: str) -> dict:
    """The config synthetic.json records (`num_clips`: the clips the folder holds). It is
    written atomically, so one that does not parse was cut short by a copy or edited: the
    settings its clips were made with are unknown, and a run without it refuses the folder."""
    record = f"{base}/synthetic.json"
    with fs.open_input_stream(record) as stream:
        raw = stream.read()
    try:
        return dict(json.loads(raw).get("config", {}))
    except (ValueError, AttributeError, TypeError) as error:  # JSONDecodeError: a ValueError
        raise ConfigError(
            f"{record} is not a record svt-ray synth wrote ({error}); it was cut short or "
            "edited. Remove its folder and run again to make the clips anew, or give another "
            "folder"
        ) from None


def clips_held(root: str) -> int | None:
    """The clips `root` holds by its synthetic.json; None where it has none (or not one synth
    wrote)."""
    fs, base = resolve_filesystem(root)
    try:
        return int(_recorded_config(fs, base)["num_clips"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_earlier_config(fs, base: str, root: str, config: SynthConfig) -> int:
    """Clips found in `root` are kept only if they were made with this config (all but the
    clip count): a clip's file name says its seed, index and class, not its size, length or
    frame rate, so a run with other settings would keep the old clips as they are. A folder
    that holds anything else is refused: the generated classes would mix with its videos.
    Returns the clips an earlier run made there (0 for none)."""
    if fs.get_file_info(f"{base}/synthetic.json").type != pafs.FileType.File:
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(base, recursive=False))
            if entries:
                shown = ", ".join(sorted(entry.base_name for entry in entries)[:3])
                raise ConfigError(
                    f"{root} is not empty ({shown}{', ...' if len(entries) > 3 else ''}) and "
                    "was not made by svt-ray synth: its classes would mix with the generated "
                    "ones. Give a new or empty folder"
                )
        return 0
    earlier = _recorded_config(fs, base)
    now = asdict(config)
    changed = [
        f"{key} {earlier.get(key)} -> {value}"
        for key, value in now.items()
        if key != "num_clips"
        and earlier.get(key) != (list(value) if isinstance(value, tuple) else value)
    ]
    if changed:
        if _holds_files(fs, base):
            raise ConfigError(
                f"{root} holds clips made with other settings ({', '.join(changed)}); use "
                "another folder, or remove this one to make them again"
            )
        # A run that stopped before its first clip (refused, out of memory, Ctrl-C) leaves
        # only the record and empty class folders: the new settings replace them.
        _remove_empty_folders(
            fs, base, keep={class_folder(config, k) for k in range(config.num_classes)}
        )
        return 0
    return int(earlier.get("num_clips", 0))


def _holds_files(fs, base: str) -> bool:
    """Whether `base` holds a file besides synthetic.json; hidden ones (a write's temporary,
    which data_prep skips too) do not count."""
    record = f"{base}/synthetic.json"
    return any(
        info.type == pafs.FileType.File
        and not info.base_name.startswith(".")
        and info.path != record
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True))
    )


def _remove_empty_folders(fs, base: str, keep: set[str]) -> None:
    """Remove the empty folders directly under `base` not named in `keep` (the class folders
    of settings that made no clip)."""
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=False)):
        if (
            info.type == pafs.FileType.Directory
            and info.base_name not in keep
            and not fs.get_file_info(pafs.FileSelector(info.path, recursive=False))
        ):
            fs.delete_dir(info.path)


def _write_meta(fs, base: str, config: SynthConfig, num_clips: int) -> None:
    """synthetic.json: the config the folder's clips were made with and how many it holds."""
    meta = {
        "config": asdict(config) | {"num_clips": num_clips},
        "class_names": list(config.class_names),
    }
    # Atomic, as the clips are: a run stopped while rewriting it (Ctrl-C, a full disk) left it
    # empty, and every later run into the folder failed on it.
    Output(fs, base).write_bytes(json.dumps(meta, indent=2).encode(), "synthetic.json")


def generate_dataset(root: str, config: SynthConfig, workers: int = 1) -> SynthSummary:
    """Write `config.num_clips` clips under `root` (local path or pyarrow filesystem URI).

    Re-running with the same config skips clips already written, so an interrupted run resumes.
    """
    start = time.perf_counter()
    if workers < 1:  # else a bad count ran in this process unnoticed
        raise ValueError(f"workers must be >= 1 (1: in this process), got {workers}")
    fs, base = resolve_filesystem(root)
    earlier = _check_earlier_config(fs, base, root, config)
    if earlier > config.num_clips:  # its clips stay, and data_prep shards every one
        logger.warning(
            "%s holds the %d clips an earlier run made, more than the %d asked: all %d stay "
            "(data_prep shards every video there); give another folder for fewer",
            root, earlier, config.num_clips, earlier,
        )  # fmt: skip
    fs.create_dir(base, recursive=True)
    _write_meta(fs, base, config, earlier)  # first: the folder is ours; the clips it holds now
    for label in range(config.num_classes):
        fs.create_dir(f"{base}/{class_folder(config, label)}", recursive=True)
    jobs = [(config, index, root) for index in range(config.num_clips)]
    if workers > 1:  # Ray is the distributed engine: one task per chunk of clips
        import ray

        from svt_ray.cluster import init_address, joins_a_cluster

        started_ray = not ray.is_initialized()
        if started_ray:  # a cluster (RAY_ADDRESS in a Ray job) refuses num_cpus
            ray.init(
                address=init_address(None, to_join="set RAY_ADDRESS=auto"),
                num_cpus=None if joins_a_cluster(None) else workers,
                include_dashboard=False,
                log_to_driver=False,
            )
        try:
            write_chunk = ray.remote(num_cpus=1)(_write_chunk)
            chunks = [jobs[i : i + 8] for i in range(0, len(jobs), 8)]
            results = [r for c in ray.get([write_chunk.remote(c) for c in chunks]) for r in c]
        finally:
            if started_ray:  # leave the process as we found it (a caller may ray.init next)
                ray.shutdown()
    else:
        results = [_write_one(job) for job in jobs]
    _write_meta(fs, base, config, max(config.num_clips, earlier))  # all written
    summary = SynthSummary(
        root=root,
        num_clips=config.num_clips,
        written=config.num_clips - sum(skipped for _, skipped in results),
        skipped=sum(skipped for _, skipped in results),
        total_bytes=sum(size for size, _ in results),
        seconds=time.perf_counter() - start,
    )
    logger.debug("synthetic data: %s", summary)  # the commands print it for people
    return summary


def synth_main(
    output: str,
    num_clips: int = SynthConfig.num_clips,
    num_classes: int = SynthConfig.num_classes,
    num_frames: int = SynthConfig.num_frames,
    height: int = SynthConfig.height,
    width: int = SynthConfig.width,
    fps: float = SynthConfig.fps,
    seed: int = SynthConfig.seed,
    style: str = SynthConfig.style,
    workers: int = 1,
) -> int:
    """`svt-ray synth`: generate the collection and print a one-line summary. Returns 0."""
    config = SynthConfig(
        num_clips=num_clips,
        num_classes=num_classes,
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        seed=seed,
        style=style,
    )
    summary = generate_dataset(output, config, workers=workers)
    print(
        f"synthetic: {summary.written} clips written, {summary.skipped} already present, "
        f"{config.num_classes} {config.style} classes, {summary.total_bytes / 1e6:.1f} MB in {summary.seconds:.1f}s "
        f"-> {output}"
    )
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m svt_ray.synthetic") -> int:
    """`python -m svt_ray.synthetic OUTPUT [options]`; `prog` is how the user ran it (usage
    and errors name it): `svt-ray synth` passes its own."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("output", help="output folder or pyarrow filesystem URI")
    parser.add_argument("--num-clips", type=int, default=SynthConfig.num_clips, help="clips made")
    parser.add_argument(
        "--style",
        choices=sorted(STYLES),
        default=SynthConfig.style,
        help=f"scene: the whole frame's texture moves (up to {len(STYLES['scene'])} classes); "
        f"objects: an object moves over a drifting background (up to "
        f"{len(STYLES['objects'])} classes)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=SynthConfig.num_classes,
        help="the first N classes of the style",
    )
    parser.add_argument(
        "--num-frames", type=int, default=SynthConfig.num_frames, help="frames per clip"
    )
    parser.add_argument("--height", type=int, default=SynthConfig.height, help="pixels (even)")
    parser.add_argument("--width", type=int, default=SynthConfig.width, help="pixels (even)")
    parser.add_argument(
        "--fps", type=float, default=SynthConfig.fps, help="frame rate written to the videos"
    )
    parser.add_argument(
        "--seed", type=int, default=SynthConfig.seed, help="the same seed makes the same clips"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray tasks encoding in parallel (1: in this process; on a cluster, set by "
        "RAY_ADDRESS, Ray spreads the tasks and this does not cap them)",
    )
    args = parser.parse_args(argv)
    try:
        return synth_main(**vars(args))
    except ValueError as error:  # a value or the folder: the message says which, no usage
        print(f"{prog}: error: {error}", file=sys.stderr)
    except OSError as error:  # a root that cannot be written
        print(f"{prog}: error: {args.output}: cannot write there ({error})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
