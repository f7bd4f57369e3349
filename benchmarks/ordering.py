"""What `data.preserve_order` costs when decode times vary: many emulated decode actors.

Run: `python benchmarks/ordering.py` (about 8 minutes; `--quick` for a smoke run).

`data.preserve_order` (default on) makes Ray Data hand the stream over in the order of its
seeded shuffles, whichever decode actor finishes first, so a run repeated with its seed
repeats. The price: a clip that takes long to decode (a long or high-resolution video, a
slow read from the bucket) holds back the clips after it, which wait finished in the object
store. With 2 decode actors that cost nothing measurable; a cluster runs dozens.

This machine has 2 cores, so the decode actors are emulated: each row takes a time drawn
from a seeded heavy-tailed distribution (lognormal around `--decode-s`, and `--slow-fraction`
of the rows `--slow-factor` times slower) and is slept, not computed, and every row carries
`--row-mb` of views (the paper view set's uint8 views are 5.3 MB a clip). The pipeline has
the shape of `svt_ray.data.build_view_dataset`: a fixed pool of actors, a few clips per
call. Both settings get the same rows and the same times, so only the order differs.

For each actor count and both settings, an emulated training loop reads batches of `--batch`
clips, `--prefetch` of them ahead (2, as the Train workers do), and spends a step on each, at
`--load` of the actors' ideal pace (so the pipeline has headroom, as a tuned run's does).
With `--workers K` it is K loops fed by one stream split K ways (Ray Train's
`streaming_split`) that step together, as DDP's all-reduce makes them. Printed: the share of its time the loop waited for
data between 10% and 90% of the rows (`data_wait_fraction` of a real run), the longest single
wait, and whether each worker's stream came in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class EmulatedDecoder:
    """A decode actor that sleeps each row's drawn decode time and returns its views."""

    def __init__(self, times: np.ndarray, row_bytes: int):
        self.times = times
        self.row_bytes = row_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"]
        time.sleep(float(self.times[ids].sum()))
        views = np.zeros((len(ids), self.row_bytes), dtype=np.uint8)
        views[:, 0] = ids % 251  # touched, so the block is real memory
        return {"id": ids, "views": views}


def decode_times(rows: int, median_s: float, slow_fraction: float, slow_factor: float):
    """Per-row decode seconds: lognormal (sigma 0.3) around `median_s`; a seeded
    `slow_fraction` of the rows take `slow_factor` times as long."""
    rng = np.random.default_rng(0)
    times = median_s * rng.lognormal(0.0, 0.3, rows)
    slow = rng.random(rows) < slow_fraction
    times[slow] *= slow_factor
    return times


def stream(actors: int, preserve_order: bool, times: np.ndarray, args) -> dict[str, float]:
    """One pass of the emulated pipeline into an emulated training loop that spends
    `step_s` on each batch; what it waited for data, between 10% and 90% of the rows."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.issue_detectors_config.detectors = []  # its memory hints are about the emulation
    context.execution_options.preserve_order = preserve_order
    row_bytes = int(args.row_mb * 1e6)
    # Views leave an actor in blocks of Ray Data's target size: 128 MiB, 24 clips of the
    # paper's 5.3 MB. Smaller emulated clips keep 24 clips a block, so that the order is held
    # back in pieces of the same number of clips.
    context.target_max_block_size = 24 * row_bytes
    rows = len(times)
    # One read block per task of `--clips-per-task` clips (READ_ROWS in svt_ray.data): an
    # actor cuts a whole block, as the real pipeline's actors cut a read item.
    dataset = ray.data.range(rows, override_num_blocks=max(1, rows // args.clips_per_task))
    dataset = dataset.map_batches(
        EmulatedDecoder,
        fn_constructor_args=(times, row_bytes),
        batch_size=args.clips_per_call,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0.01,  # sleeping actors: dozens fit on 2 cores
    )
    workers = args.workers
    step_s = args.batch * workers / (args.load * actors / times.mean())
    # As Ray Train feeds its workers: one stream, split.
    streams = [dataset] if workers == 1 else dataset.streaming_split(workers, equal=True)
    # The workers step together (DDP's all-reduce): a step starts when every worker has its
    # batch. Worker 0 records how long it waited for that, from the end of the last step.
    together = threading.Barrier(workers)
    waits, orders = [], [[] for _ in range(workers)]
    share = len(times) / workers

    def train(index: int) -> None:
        seen, asked = 0, time.perf_counter()
        batches = streams[index].iter_batches(
            batch_size=args.batch,
            batch_format="numpy",
            prefetch_batches=args.prefetch,
            drop_last=True,
        )
        try:
            for batch in batches:
                together.wait()
                if index == 0 and 0.1 * share <= seen < 0.9 * share:
                    waits.append(time.perf_counter() - asked)
                seen += len(batch["id"])
                orders[index].append(int(batch["id"][0]))
                time.sleep(step_s)  # the training step
                asked = time.perf_counter()
        except threading.BrokenBarrierError:
            return  # another worker ran out first (or failed)
        except BaseException as error:  # re-raised below; the others must not wait for it
            errors.append(error)
        together.abort()

    errors: list[BaseException] = []
    threads = [threading.Thread(target=train, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {
        "wait_fraction": sum(waits) / (sum(waits) + len(waits) * step_s),
        "wait_max_s": max(waits, default=0.0),
        "step_s": step_s,
        "in_order": all(order == sorted(order) for order in orders),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", default="4,16,32", help="comma-separated actor counts")
    parser.add_argument("--decode-s", type=float, default=0.25, help="median decode s per clip")
    parser.add_argument("--slow-fraction", type=float, default=0.02)
    parser.add_argument("--slow-factor", type=float, default=10.0)
    parser.add_argument("--row-mb", type=float, default=1.0, help="views per clip, MB (emulated)")
    parser.add_argument(
        "--load", type=float, default=0.8,
        help="the training loop's pace, as a fraction of the actors' ideal clips/s",
    )  # fmt: skip
    parser.add_argument("--clips-per-call", type=int, default=4, help="as build_view_dataset")
    parser.add_argument("--clips-per-task", type=int, default=64, help="READ_ROWS of svt_ray.data")
    parser.add_argument("--tasks-per-actor", type=float, default=3.0, help="stream length")
    parser.add_argument("--batch", type=int, default=32, help="clips per batch, per worker")
    parser.add_argument("--prefetch", type=int, default=2, help="batches, as _one_pass")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="training workers fed by one stream split (Ray Train's streaming_split), in step",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.actors.split(",")]
    if args.quick:
        counts, args.row_mb, args.decode_s, args.batch, args.clips_per_task = [2], 0.01, 0.02, 4, 8

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)  # fmt: skip
    results = []
    try:
        for actors in counts:
            rows = round(actors * args.tasks_per_actor) * args.clips_per_task
            times = decode_times(rows, args.decode_s, args.slow_fraction, args.slow_factor)
            for preserve_order in (False, True):
                figures = stream(actors, preserve_order, times, args)
                results.append((actors, preserve_order, figures))
                print(
                    f"{actors} actors, preserve_order={preserve_order}: waited for data "
                    f"{100 * figures['wait_fraction']:.1f}% of the time",
                    flush=True,
                )
    finally:
        ray.shutdown()

    print(
        f"\nemulated decode: median {args.decode_s} s/clip (lognormal, sigma 0.3), "
        f"{100 * args.slow_fraction:g}% of clips {args.slow_factor:g}x slower; "
        f"{args.clips_per_task} clips per actor task, {args.clips_per_call} per call; training "
        f"at {100 * args.load:.0f}% of the actors' pace, {args.workers} worker(s) in step, "
        f"batches of {args.batch} per worker, {args.prefetch} prefetched\n"
    )
    print("| decode actors | preserve_order | step s | time waiting for data "
          "| longest wait s | stream in order |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for actors, preserve_order, figures in results:
        print(
            f"| {actors} | {'on' if preserve_order else 'off'} | {figures['step_s']:.2f} "
            f"| {100 * figures['wait_fraction']:.1f}% | {figures['wait_max_s']:.2f} "
            f"| {'yes' if figures['in_order'] else 'no'} |"
        )
    print(
        f"\n(machine: {os.cpu_count()} logical CPUs; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})"
    )
    return 0 if all(f["in_order"] for _, p, f in results if p) else 1


if __name__ == "__main__":
    raise SystemExit(main())
