"""How fast does a tiny TimeSformer learn whole-scene motion classes? (docs/demo.md)

The script behind the table "Learning motion from random initialisation". It runs
outside Ray, in one process, on clips held in memory, so a recipe can be judged in minutes:
the same config, model, view sampler, augmentations and training step as `svt-ray pretrain`,
and every `--every` steps the DINO kNN (k=20, T=0.07) of the teacher backbone on held-out
clips (8 frames spread over the clip, full 64 px frame).

Data: a smooth random texture (Gaussian-filtered noise) moving as a whole, by class: right,
left, up, down (translation), cw, ccw (rotation about a random centre), in, out (zoom). The
texture is a cross-fade of independent fields that each live `--lifetime` frames, and with
`--colour drift` every colour statistic wanders over the clip, so that no appearance is
shared by all views of a clip; only the motion is.
`--colour grey` (with one `--sigma` and one `--speed`) gives every clip the same palette,
texture scale and speed, so that the direction is the only thing that tells clips apart.
`--data scene` uses the demo's own clips (`svt_ray.synthetic`, scene style: the grey
setting above, 8 motions, the demo takes the first 4) and `--data objects` the earlier
demo's (an object moving over a drifting background, up to 10 classes).

The run's schedules (lr, weight decay, teacher momentum) span exactly `--steps` steps: the
tiny preset's `optim.epochs` is replaced by `steps / steps per epoch` unless `--set`
gives one. (Before this was so, every run longer than the preset's 5 epochs, 100 steps on
320 clips, spent the steps after 100 at lr 1e-6 with the teacher frozen at momentum 1.)

    python docs/experiments/motion_learnability.py --mode ssl --data scene --classes 4 \
        --steps 300 --set train.seed=1
    python docs/experiments/motion_learnability.py --mode supervised --classes 4 \
        --set model.frame_difference=false
    python docs/experiments/motion_learnability.py --mode ssl --classes 4 --colour grey \
        --sigma 5 5 --speed 0.75 0.75 --lifetime 32 --set model.difference_init_scale=1
    python docs/experiments/motion_learnability.py --mode ssl --data objects --classes 10 \
        --train-clips 600 --test-clips 200

The tiny preset's model has `model.frame_difference=true` (the patch embedding also sees
each frame's difference to the previous frame of the view, 6 input channels: a causal
temporal kernel of 2 inside the per-frame tokens; divided attention is unchanged) and
`model.difference_init_scale=4` (the difference filters start 4x larger than PyTorch's
default conv init, so the random network is more sensitive to motion from the start); turn
them off with `--set` to measure the paper's per-frame patches.
Not part of the package and not tested (the model option is); needs `pip install -e .`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from svt_ray import synthetic
from svt_ray.config import load_config
from svt_ray.engine import build_state, train_step
from svt_ray.evaluate import OnlineKNN
from svt_ray.synthetic import _hsv_to_rgb as hsv_to_rgb
from svt_ray.synthetic import _noise_field as noise_field
from svt_ray.synthetic import _sample_periodic as bilinear
from svt_ray.video import EncoderSettings, encode_h264, open_video
from svt_ray.views import ViewSampler

MOTIONS = ("right", "left", "up", "down", "cw", "ccw", "in", "out")


def render(motion: str, rng, args) -> np.ndarray:
    """uint8 (T, S, S, 3) frames of one clip."""
    frames, side = args.frames, args.size
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    cx, cy = rng.uniform(0.3, 0.7, 2) * side
    t = np.arange(frames, dtype=np.float64)
    half_life = args.lifetime / 2
    count = int(np.ceil(frames / half_life)) + 2
    offset = rng.uniform(0, half_life)
    fields = [noise_field(rng, 128, rng.uniform(*args.sigma)) for _ in range(count)]
    origins = rng.uniform(0, 128, (count, 2))
    speed = rng.uniform(*args.speed)  # pixels per frame (rotation, zoom: at 0.35 x side)
    rate = speed / (0.35 * side)
    grey = np.zeros((frames, side, side))
    for ti in t.astype(int):
        if motion in ("right", "left", "up", "down"):
            dx, dy = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[motion]
            sx, sy = xs - dx * speed * ti, ys - dy * speed * ti
        elif motion in ("cw", "ccw"):
            angle = -rate * ti * (1 if motion == "cw" else -1)
            rx, ry = xs - cx, ys - cy
            sx = cx + np.cos(angle) * rx - np.sin(angle) * ry
            sy = cy + np.sin(angle) * rx + np.cos(angle) * ry
        else:
            scale = np.exp(-rate * ti * (1 if motion == "in" else -1))
            sx, sy = cx + (xs - cx) * scale, cy + (ys - cy) * scale
        total, norm = np.zeros((side, side)), 0.0
        for k in range(count):  # sin^2 cross-fade: each field lives `lifetime` frames
            phase = (ti + offset - k * half_life + args.lifetime) / args.lifetime
            if 0 < phase < 1:
                weight = np.sin(np.pi * phase) ** 2
                total += weight * bilinear(fields[k], sx + origins[k, 0], sy + origins[k, 1])
                norm += weight**2
        grey[ti] = total / np.sqrt(max(norm, 1e-6))
    mix = 1 / (1 + np.exp(-1.5 * grey))[..., None]
    if args.colour == "drift":  # every colour statistic wanders: knots every 8 frames
        knots = np.arange(0, frames + 8, 8)

        def wander(low, high):
            return np.interp(t, knots, rng.uniform(low, high, knots.size))

        hue = np.interp(t, knots, rng.random() + np.cumsum(rng.uniform(-0.3, 0.3, knots.size)))
        bright = hsv_to_rgb(hue, wander(0.2, 1.0), wander(0.5, 1.0))
        dark = hsv_to_rgb(hue + wander(0.3, 0.7), wander(0.2, 1.0), wander(0.0, 0.45))
    elif args.colour == "grey":  # one palette for every clip: no colour is clip-specific
        bright, dark = np.full((frames, 3), 0.85), np.full((frames, 3), 0.15)
    else:  # hue drifts, saturation and brightness fixed per clip
        hue = rng.random() + rng.uniform(0.5, 1.5) * rng.choice((-1, 1)) * t / frames
        bright = hsv_to_rgb(
            hue, np.full(frames, rng.uniform(0.3, 1)), np.full(frames, rng.uniform(0.6, 1))
        )
        dark = hsv_to_rgb(
            hue + 0.5, np.full(frames, rng.uniform(0.3, 1)), np.full(frames, rng.uniform(0, 0.4))
        )
    rgb = dark[:, None, None] + mix * (bright - dark)[:, None, None]
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


def through_codec(frames: np.ndarray, args) -> np.ndarray:
    """H.264 encode + decode once per `--codec` CRF, as `svt-ray synth` (CRF 20) and then
    data_prep (CRF 23) do to the demo's clips before training sees them."""
    for crf in args.codec:
        encoded = encode_h264(frames, 15.0, EncoderSettings(gop=16, crf=crf))
        reader = open_video(encoded)
        frames = np.asarray(reader.get_frames(np.arange(len(frames))))
        reader.close()
    return frames


def make_set(count: int, seed: int, args) -> tuple[np.ndarray, np.ndarray]:
    if args.data in synthetic.STYLES:  # the package's clips (labels round-robin)
        spec = synthetic.SynthConfig(
            num_clips=count,
            num_classes=args.classes,
            num_frames=args.frames,
            height=args.size,
            width=args.size,
            seed=seed,
            style=args.data,
        )
        clips = [through_codec(synthetic.render_clip(spec, i), args) for i in range(count)]
        return np.stack(clips), np.array([synthetic.clip_label(spec, i) for i in range(count)])
    labels = np.arange(count) % args.classes
    clips = [
        through_codec(render(MOTIONS[label], np.random.default_rng([seed, i]), args), args)
        for i, label in enumerate(labels)
    ]
    return np.stack(clips), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ssl", "supervised"), default="ssl")
    parser.add_argument("--data", choices=("texture", "scene", "objects"), default="texture")
    parser.add_argument("--classes", type=int, default=8, help="texture, scene: 2-8; objects: 2-10")
    parser.add_argument("--train-clips", type=int, default=320)
    parser.add_argument("--test-clips", type=int, default=160)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--lifetime", type=float, default=16.0, help="frames a texture field lives")
    parser.add_argument("--colour", choices=("drift", "fixed", "grey"), default="drift")
    parser.add_argument("--speed", type=float, nargs=2, default=(0.3, 0.6), help="px/frame range")
    parser.add_argument("--sigma", type=float, nargs=2, default=(4.0, 6.0), help="texture blur, px")
    parser.add_argument(
        "--codec", type=int, nargs="*", default=[], help="H.264 round trips at these CRFs"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3, help="supervised mode's AdamW lr")
    parser.add_argument("--set", action="append", default=[], help="config override (ssl mode)")
    args = parser.parse_args()
    most = len(MOTIONS) if args.data == "texture" else len(synthetic.STYLES[args.data])
    if not 2 <= args.classes <= most:
        parser.error(f"--classes must lie in [2, {most}] with --data {args.data}")

    started = time.perf_counter()
    train_x, train_y = make_set(args.train_clips, 1, args)
    test_x, test_y = make_set(args.test_clips, 2, args)
    print(f"{len(train_x)} + {len(test_x)} clips in {time.perf_counter() - started:.0f}s")

    config = load_config("tiny", overrides=args.set).resolve(args.train_clips)
    if not any(item.startswith("optim.epochs=") for item in args.set):  # end at --steps
        epochs = args.steps / config.derived.steps_per_epoch
        overrides = [*args.set, f"optim.epochs={epochs}"]
        config = load_config("tiny", overrides=overrides).resolve(args.train_clips)
    state = build_state(config)
    sampler = ViewSampler(config.views)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    frames = np.linspace(0, args.frames - 1, config.eval.clip_frames).round().astype(int)

    def clips(videos: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        chosen = np.ascontiguousarray(videos[:, frames].transpose(0, 4, 1, 2, 3))
        return {"clip": torch.from_numpy(chosen), "label": torch.from_numpy(labels)}

    knn = OnlineKNN(
        clips(train_x, train_y), clips(test_x, test_y), config.views.mean, config.views.std
    )

    def knn_top1() -> float:
        return knn(state.teacher.backbone).top1

    if args.mode == "supervised":  # a linear classifier on the CLS of the 8-frame global view
        classifier = torch.nn.Linear(config.model.embed_dim, args.classes)
        parameters = [*state.student.backbone.parameters(), *classifier.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    print(f"step 0: kNN top-1 {knn_top1():.1f}")
    step_started = time.perf_counter()
    for step in range(args.steps):
        chosen = rng.choice(args.train_clips, config.optim.batch_size, replace=False)
        cut = []
        for index in chosen:
            plan = sampler.plan(args.frames, args.size, args.size, rng)
            cut.append(sampler.cut(train_x[index][plan.union], plan))
        batch = [
            torch.from_numpy(np.stack([views[s.name] for views in cut])) for s in sampler.slots
        ]
        if args.mode == "ssl":
            metrics = train_step(state, batch, step, generator)
        else:
            views = state.augmenter(batch, generator)
            logits = classifier(state.student.backbone.forward_features(views[1]))
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(train_y[chosen]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.teacher.load_state_dict(state.student.state_dict())
            metrics = {"loss": loss.item()}
        if (step + 1) % args.every == 0:
            shown = ("loss", "collapse_uniform", "collapse_dominant", "teacher_feature_std")
            extra = " ".join(f"{k} {metrics[k]:.3f}" for k in shown if k in metrics)
            per_step = (time.perf_counter() - step_started) / (step + 1)
            print(f"step {step + 1}: kNN top-1 {knn_top1():.1f} | {extra} | {per_step:.2f} s/step")


if __name__ == "__main__":
    main()
