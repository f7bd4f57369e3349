"""Online kNN start-up: what rank 0 waits for at each start, before and after its clips are
decoded once into storage.

Run: `python benchmarks/online_knn.py` (about 4 minutes on 2 cores, most of it making the
clips; `--quick` for a smoke run).

1. Makes real-codec shards as the loader benchmark does (`loader.make_shards`: synthetic
   clips, 10 s, 30 fps, 320x256, through data_prep with its default 15 fps cap).
2. For the online kNN's clips of `--clips` videos at the paper's evaluation clip (8 frames,
   224 px, spread over the paper's 150-frame window; `--clip-size`), three ways:
   - baseline, what rank 0 did before at every start of a run (a restart too) and in every
     trial of a study: `data.load_eval_clips`, one clip after another in its own process;
   - the driver's decode, once per dataset and settings: `data.cache_eval_clips` as
     `svt-ray pretrain` calls it (the first parts in the driver, the rest on Ray Data once
     they would take over `EVAL_IN_PROCESS_S`), and with every part after the first on Ray
     Data;
   - what rank 0 does now at every start: `data.read_eval_clips`.
Prints a Markdown table of seconds, clips/s and speed-up against the baseline measured in the
same run, and checks that every way gives the baseline's clips.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.loader import make_shards  # noqa: E402
from svt_ray import data  # noqa: E402


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def same_clips(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], name: str) -> None:
    for key, value in expected.items():
        if not np.array_equal(got[key], value):
            raise SystemExit(f"{name}: column {key} differs from the sequential decode")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96, help="videos, each one kNN clip")
    parser.add_argument("--clip-frames", type=int, default=8)
    parser.add_argument("--clip-size", type=int, default=224)
    parser.add_argument("--window-frames", type=int, default=150, help="views.clip_frames")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs")
    parser.add_argument("--workdir", default=None, help="keep shards here (default: temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.clip_size = 8, 64
    import ray

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="svt-knn-bench-"))
    length = 2.0 if args.quick else 10.0
    shards = str(make_shards(workdir, args.clips, length)[15])
    clips = {"clip": (args.clip_frames, args.clip_size)}
    settings = data.eval_cache_settings(
        "train", clips, args.clips, window_frames=args.window_frames
    )
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        data.load_eval_clips(shards, **{**settings, "max_clips": 1})  # imports, first open
        seconds, expected = timed(data.load_eval_clips, shards, **settings)
        rows = [("rank 0 decodes them, one after another (before, at every start)", seconds)]
        count = len(expected["label"])
        for label, in_process_s in [
            ("the driver decodes them once (`svt-ray pretrain`'s rule)", data.EVAL_IN_PROCESS_S),
            (
                f"the driver decodes them once, parts after the first on Ray Data ({args.cpus} CPUs)",
                0.0,
            ),
        ]:
            folder = workdir / "online_knn_clips"
            shutil.rmtree(folder, ignore_errors=True)
            data.EVAL_IN_PROCESS_S = in_process_s
            seconds, _ = timed(data.cache_eval_clips, shards, {str(folder): settings})
            rows.append((label, seconds))
            same_clips(data.read_eval_clips(str(folder)), expected, label)
        seconds, got = timed(data.read_eval_clips, str(folder))
        same_clips(got, expected, "read")
        rows.append(("rank 0 reads them (now, at every start)", seconds))
    finally:
        ray.shutdown()
    megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(
        f"\nonline kNN clips: {count} clips of {args.clip_frames} x {args.clip_size} px from "
        f"{args.clips} videos ({length:g} s, 320x256, 15 fps shards), {megabytes:.0f} MB in "
        f"storage; "
        f"{os.cpu_count()} cores\n"
    )
    print("| how | seconds | clips/s | speed-up vs the sequential decode |")
    print("|---|---|---|---|")
    baseline = rows[0][1]
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {count / seconds:.1f} | {baseline / seconds:.2f}x |")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
