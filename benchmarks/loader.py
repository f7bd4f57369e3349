"""Loader benchmark: SVT paper views per second per CPU core, against a reference-style loader.

Run: `python benchmarks/loader.py` (about 5 minutes on 2 cores; `--quick` for a smoke run).

1. Makes real-codec shards: synthetic clips (10 s, 30 fps, 320x256) through data_prep twice,
   with the fps cap at 30 (none) and at 15 (our default).
2. Single core (1 process, 1 decoder thread, 1 torch thread), per clip, the paper view set
   (2 globals 224 px of 8 and 16 frames, 8 locals 96 px of 2,2,4,4,8,8,16,16 frames):
   - reference-style: PyAV decodes every frame of an 8.5 s window, each view is cut with a
     float bicubic resize and augmented (flip, colour jitter, grayscale) on the CPU, as the
     reference code's decoder + VideoDataAugmentationDINO do (RGB conversion on the calling
     thread, as ours; a second row keeps PyAV's default, which starts threads per frame);
   - ours: the view sampler plans every view, decord decodes the union once, views are cut as
     uint8 (augmentation runs later, batched on the training device);
   - decode-only time of both, and bytes per clip.
3. The Ray Data pipeline (`svt_ray.data.build_view_dataset`, 15 fps shards) with 1, 2, 4, ...
   N decode actors (N = `--max-actors`, default the CPU count), each streaming
   `--pipeline-clips` clips per actor: steady-state clips/s (between 10% and 90% of the
   clips, so start-up and tail are excluded) and the scaling efficiency against N x the
   one-actor rate and against N x the single-core rate of step 2 (the issue's target: 0.8).
Prints a Markdown table (the figures in docs/data.md come from it).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svt_ray.config import load_config  # noqa: E402
from svt_ray.synthetic import SynthConfig, generate_dataset  # noqa: E402
from svt_ray.video import open_video  # noqa: E402
from svt_ray.views import ViewSampler, sample_crop  # noqa: E402

PAPER_GLOBAL_FRAMES = (8, 16)
PAPER_LOCAL_FRAMES = (2, 2, 4, 4, 8, 8, 16, 16)


def make_shards(workdir: Path, clips: int, seconds: float) -> dict[int, Path]:
    import data_prep

    source = workdir / "videos"
    config = SynthConfig(
        num_clips=clips,
        num_classes=10,
        style="objects",  # the loader figures in docs/data.md were measured on this content
        num_frames=round(30 * seconds),
        height=256,
        width=320,
        fps=30.0,
        seed=11,
    )
    import ray

    # One Ray for the three jobs (each would start and stop its own), none left running after.
    ray.init(
        address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False
    )
    try:
        generate_dataset(str(source), config, workers=os.cpu_count() or 1)
        shards = {}
        for cap in (30, 15):
            out = workdir / f"shards_fps{cap}"
            shards[cap] = out
            if (out / "manifest.json").exists():  # kept from an earlier run with --workdir
                continue
            options = ["--max-fps", str(cap), "--val-fraction", "0", "--no-progress"]
            code = data_prep.main([str(source), str(out), *options])
            assert code == 0, f"data_prep failed for fps cap {cap}"
    finally:
        ray.shutdown()
    return shards


def shard_videos(dataset: Path) -> list[bytes]:
    import json

    import pyarrow.parquet as pq

    manifest = json.loads((dataset / "manifest.json").read_text())
    videos = []
    for shard in manifest["shards"]:
        videos += pq.read_table(dataset / shard["file"], columns=["video"])["video"].to_pylist()
    return videos


# -- reference-style loader ---------------------------------------------------------------------


def reference_decode_window(
    data: bytes, window: int, rng: np.random.Generator, convert_threads: int = 1
) -> np.ndarray:
    """PyAV, as the reference: seek before a random start, decode every frame of the window.

    The reference converts with PyAV's default, which (PyAV >= 14) starts swscale threads for
    every frame; `convert_threads=1` gives it the one-line fix our PyAV backend has, so the
    baseline measures the reference's design rather than a library default. `0` is that default.
    """
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        total = stream.frames
        start = int(rng.integers(0, max(1, total - window + 1)))
        start_pts = int(start / stream.average_rate / stream.time_base)
        container.seek(max(0, start_pts - 1024), stream=stream)  # the reference's pts margin
        frames = []
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts < start_pts:
                continue
            frames.append(frame.to_ndarray(format="rgb24", threads=convert_threads))
            if len(frames) == window:
                break
    return np.stack(frames)


def reference_augment(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Float (t, 3, s, s) in [0, 1]: flip, colour jitter (p 0.8), grayscale (p 0.2), normalise."""
    if rng.random() < 0.5:
        view = view.flip(-1)
    if rng.random() < 0.8:
        for op in rng.permutation(3):
            factor = rng.uniform(0.6, 1.4) if op < 2 else rng.uniform(0.8, 1.2)
            gray = (0.299 * view[:, 0] + 0.587 * view[:, 1] + 0.114 * view[:, 2])[:, None]
            anchor = (torch.zeros_like(view), gray.mean(dim=(1, 2, 3), keepdim=True), gray)[op]
            view = factor * view + (1 - factor) * anchor
    if rng.random() < 0.2:
        gray = (0.299 * view[:, 0] + 0.587 * view[:, 1] + 0.114 * view[:, 2])[:, None]
        view = gray.expand_as(view)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (view - mean) / std


def reference_views(frames: np.ndarray, rng: np.random.Generator) -> list[torch.Tensor]:
    """The reference's temporal sampling (fixed global windows, random 1/8 local windows),
    a crop per view, float bicubic resize, augmentation."""
    length, height, width = frames.shape[:3]
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)  # (L, 3, h, w)
    plans = [
        (0, length - 5, n, 224, (0.4, 1.0)) if i == 0 else (5, length - 1, n, 224, (0.4, 1.0))
        for i, n in enumerate(PAPER_GLOBAL_FRAMES)
    ]
    for n in PAPER_LOCAL_FRAMES:
        start = int(rng.integers(0, length - length // 8))
        plans.append((start, start + length // 8, n, 96, (0.05, 0.4)))
    views = []
    for start, stop, count, size, scale in plans:
        indices = np.clip(np.linspace(start, stop, count), 0, length - 1).astype(np.int64)
        box = sample_crop(height, width, scale, (3 / 4, 4 / 3), rng)
        crop = video[indices, :, box.top : box.top + box.height, box.left : box.left + box.width]
        resized = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False)
        views.append(reference_augment(resized, rng).permute(1, 0, 2, 3))
    return views


# -- ours -----------------------------------------------------------------------------------


def our_views(data: bytes, sampler: ViewSampler, rng: np.random.Generator):
    reader = open_video(data, backend="decord", num_threads=1)
    plan = sampler.plan(reader.num_frames, reader.height, reader.width, rng)
    frames = reader.get_frames(plan.union)
    reader.close()
    return sampler.cut(frames, plan)


def time_per_clip(function, videos: list[bytes], min_seconds: float) -> tuple[float, float]:
    """(wall, CPU) seconds per clip, cycling through the videos for at least min_seconds.

    CPU time counts every thread of this process (decord decodes and converts on helper
    threads even with one decoder thread), so clips per CPU-second is the per-core figure.
    """
    rng = np.random.default_rng(0)
    function(videos[0], rng)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while count < len(videos) or time.perf_counter() - start < min_seconds:
        function(videos[count % len(videos)], rng)
        count += 1
    return (time.perf_counter() - start) / count, (time.process_time() - cpu_start) / count


def paper_views():
    """The paper's view set over the reference's 8.5 s window (128 frames at 15 fps), so both
    loaders decode the same span (the paper preset's window is 10 s)."""
    return load_config("paper", overrides=["views.clip_frames=128"]).views


def single_core_figures(shards: dict[int, Path], min_seconds: float) -> dict[str, float]:
    torch.set_num_threads(1)
    videos30, videos15 = shard_videos(shards[30]), shard_videos(shards[15])
    paper = paper_views()
    sampler15 = ViewSampler(paper)  # clip_frames 128 = 8.5 s at 15 fps
    sampler30 = ViewSampler(paper.model_copy(update={"clip_frames": 256}))  # 8.5 s at 30 fps
    window = 256  # 8.5 s at 30 fps, what the reference decodes

    def decode_union(sampler):
        def run(data, rng):
            reader = open_video(data, backend="decord", num_threads=1)
            plan = sampler.plan(reader.num_frames, reader.height, reader.width, rng)
            reader.get_frames(plan.union)
            reader.close()

        return run

    figures = {
        "bytes_per_clip_fps30": float(np.mean([len(v) for v in videos30])),
        "bytes_per_clip_fps15": float(np.mean([len(v) for v in videos15])),
        "reference_s": time_per_clip(
            lambda d, r: reference_views(reference_decode_window(d, window, r), r),
            videos30,
            min_seconds,
        ),
        "reference_pyav_default_s": time_per_clip(
            lambda d, r: reference_views(reference_decode_window(d, window, r, 0), r),
            videos30,
            min_seconds,
        ),
        "reference_pyav_default_decode_s": time_per_clip(
            lambda d, r: reference_decode_window(d, window, r, 0), videos30, min_seconds
        ),
        "reference_decode_s": time_per_clip(
            lambda d, r: reference_decode_window(d, window, r), videos30, min_seconds
        ),
        "ours_fps30_s": time_per_clip(
            lambda d, r: our_views(d, sampler30, r), videos30, min_seconds
        ),
        "ours_fps30_decode_s": time_per_clip(decode_union(sampler30), videos30, min_seconds),
        "ours_fps15_s": time_per_clip(
            lambda d, r: our_views(d, sampler15, r), videos15, min_seconds
        ),
        "ours_fps15_decode_s": time_per_clip(decode_union(sampler15), videos15, min_seconds),
    }
    return figures


# -- Ray Data scaling ---------------------------------------------------------------------


def replicate(dataset: Path, out: Path, copies: int) -> Path:
    """A dataset with every row repeated `copies` times (fresh ids): enough work for a steady
    state without generating more video."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(dataset, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        tables = []
        for copy in range(copies):
            ids = pa.array([f"{copy:04x}{i[4:]}" for i in table["id"].to_pylist()])
            tables.append(table.set_column(0, "id", ids))
        pq.write_table(pa.concat_tables(tables), out / shard["file"], row_group_size=8)
        shard["num_rows"] *= copies
        shard["splits"] = {k: v * copies for k, v in shard["splits"].items()}
    manifest["counts"]["splits"] = {k: v * copies for k, v in manifest["counts"]["splits"].items()}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def pipeline_rate(dataset_path: Path, actors: int, clips: int) -> float:
    """Steady-state clips/s of the Ray Data pipeline with `actors` decode actors, streaming
    `clips` clips: rows per second between the batches that reach 10% and 90% of them, so
    neither the actors' start nor the tail (fewer items left than actors) counts."""
    import ray

    from svt_ray import data

    ray.init(
        address="local",
        num_cpus=actors + 1,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        views = paper_views()
        dataset = data.build_view_dataset(
            str(dataset_path), views, seed=0, split=None, decode_actors=actors, batch_size=2
        ).limit(clips)
        arrivals = []  # (rows so far, time)
        rows = 0
        for batch in dataset.iter_batches(batch_size=2, batch_format="numpy"):
            rows += len(batch["label"])
            arrivals.append((rows, time.perf_counter()))
        (rows_a, time_a), (rows_b, time_b) = (
            next(a for a in arrivals if a[0] >= fraction * rows) for fraction in (0.1, 0.9)
        )
        return (rows_b - rows_a) / max(time_b - time_a, 1e-9)
    finally:
        ray.shutdown()


def actor_counts(max_actors: int) -> list[int]:
    """1, 2, 4, ... up to `max_actors`, and `max_actors` itself."""
    return sorted({1, max_actors} | {2**k for k in range(1, 8) if 2**k < max_actors})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--min-seconds", type=float, default=8.0, help="per single-core figure")
    parser.add_argument("--max-actors", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--pipeline-clips",
        type=int,
        default=320,
        help="clips streamed per decode actor in each pipeline measurement (rows are repeated; "
        "about 25 s at one actor's rate)",
    )
    parser.add_argument("--workdir", default=None, help="keep shards here (default: temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.seconds, args.min_seconds, args.max_actors = 2, 9, 1, 1
        args.pipeline_clips = 8
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        started = time.perf_counter()
        shards = make_shards(workdir, args.clips, args.seconds)
        print(
            f"shards ready in {time.perf_counter() - started:.0f}s "
            f"({args.clips} clips, {args.seconds:.0f}s, 30 fps, 320x256)",
            flush=True,
        )
        figures = single_core_figures(shards, args.min_seconds)
        counts = actor_counts(args.max_actors)
        copies = max(1, math.ceil(args.pipeline_clips * counts[-1] / args.clips))
        repeated = replicate(shards[15], workdir / "shards_fps15_repeated", copies)
        rates = {n: pipeline_rate(repeated, n, args.pipeline_clips * n) for n in counts}

    (reference, reference_cpu) = figures["reference_s"]
    print()
    print(
        "| paper view set, 1 process | wall s/clip | CPU s/clip | clips per CPU-s | vs reference "
        "(CPU) | decode wall s/clip |"
    )
    print("|---|---|---|---|---|---|")
    for name, key in [
        ("reference-style (PyAV 8.5 s window, float bicubic + augs)", "reference"),
        ("reference-style, PyAV's default RGB conversion threads", "reference_pyav_default"),
        ("ours, 30 fps shards", "ours_fps30"),
        ("ours, 15 fps shards (default cap)", "ours_fps15"),
    ]:
        wall, cpu = figures[f"{key}_s"]
        print(
            f"| {name} | {wall:.3f} | {cpu:.3f} | {1 / cpu:.2f} | {reference_cpu / cpu:.1f}x "
            f"| {figures[f'{key}_decode_s'][0]:.3f} |"
        )
    print()
    print(
        f"bytes per clip ({args.seconds:.0f} s, short side 256): "
        f"{figures['bytes_per_clip_fps30'] / 1e3:.0f} kB at 30 fps, "
        f"{figures['bytes_per_clip_fps15'] / 1e3:.0f} kB at 15 fps"
    )
    print()
    single_core = 1 / figures["ours_fps15_s"][1]  # clips per CPU-second, one process
    print(
        "| Ray Data pipeline, decode actors (N) | clips/s | vs N x 1 actor "
        f"| vs N x single-core rate ({single_core:.2f} clips/s) |"
    )
    print("|---|---|---|---|")
    for actors, rate in rates.items():
        print(
            f"| {actors} | {rate:.2f} | {rate / (actors * rates[1]):.2f} "
            f"| {rate / (actors * single_core):.2f} |"
        )
    print(
        f"\n(machine: {os.cpu_count()} logical CPUs; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})"
    )
    return 0 if math.isfinite(reference) else 1


if __name__ == "__main__":
    raise SystemExit(main())
