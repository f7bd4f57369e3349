"""What the console shows of a training run: a progress line every `train.progress_every_s`
(`ConsoleProgress`, printed by rank 0 or, for a driver whose workers do not log to its console,
read back from metrics.jsonl by `progress_from_metrics`), and how much of its step time the run
waits for data (`DataWait`), with what to try when that is much.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from svt_ray.config import ExperimentConfig
from svt_ray.tracking import metrics_rows

DATA_WAIT_WARNING = 0.10  # share of its step time a run waits for data before it says so


@dataclass
class DataWait:
    """[rank 0] The share of a session's step time spent waiting for data (its first step,
    which waits for the pipeline to start, left out), and what to try when that is much."""

    waited_s: float = 0.0
    total_s: float = 0.0
    steps: int = 0

    def add(self, waited_s: float, total_s: float) -> None:
        self.steps += 1
        if self.steps > 1:
            self.waited_s += waited_s
            self.total_s += total_s

    @property
    def share(self) -> float:
        return self.waited_s / self.total_s if self.total_s > 0 else 0.0

    def hint(self, config: ExperimentConfig) -> str | None:
        if self.share < DATA_WAIT_WARNING:
            return None
        text = (
            f"training waited for data {100 * self.share:.0f}% of its step time "
            "(data_wait_fraction): more decode CPUs help (data.decode_actors, CPU worker nodes "
            "on a cluster)"
        )
        if config.data.preserve_order and not config.data.deterministic:
            text += (
                "; with more than about 16 decode actors per training worker, a slow clip holds "
                "back the ones after it: raise data.prefetch_batches, or data.preserve_order=false "
                "lets finished clips overtake it (docs/data.md)"
            )
        return text


@dataclass
class ConsoleProgress:
    """[rank 0] What the console shows of a run: one line at the first step, then one every
    `every_s` seconds and one at the last step, e.g.

        tiny-seed0 step 120/304 (39%) | epoch 1.97 | loss 7.932 | kNN 41.2 | 61.3 clips/s |
        data wait 4% | 1m58s, ETA 3m01s

    Ray forwards it from the worker to the driver's console (prefixed with the worker's pid),
    and to `ray job logs` on a cluster. The ETA extrapolates the steps per second since the
    first line (online kNN included; the first batch's wait for the pipeline left out).
    """

    run_name: str
    total_steps: int
    started: float  # time.perf_counter() when this session's loop started
    every_s: float  # 0: never
    first: tuple[int, float] | None = None  # (step, time) of the first line
    last_printed: float | None = None

    def maybe_print(self, step: int, metrics: dict[str, float], now: float) -> bool:
        if self.every_s <= 0:
            return False
        due = (
            self.last_printed is None
            or step >= self.total_steps
            or now - self.last_printed >= self.every_s
        )
        if due:  # not print(): Ray Train's patched print would log it a second time
            sys.stdout.write(self.line(step, metrics, now) + "\n")
            sys.stdout.flush()
            self.last_printed = now
            self.first = self.first or (step, now)
        return due

    def line(self, step: int, metrics: dict[str, float], now: float) -> str:
        parts = [
            f"{self.run_name} step {step}/{self.total_steps} "
            f"({100 * step / self.total_steps:.0f}%)",
            f"epoch {metrics['epoch']:.2f}",
            f"loss {metrics['loss']:.3f}",
        ]
        if "online_knn_top1" in metrics:
            parts.append(f"kNN {metrics['online_knn_top1']:.1f}")
        timing = _duration(now - self.started)
        if self.first is not None and step > self.first[0] and step < self.total_steps:
            rate = (step - self.first[0]) / max(now - self.first[1], 1e-9)  # steps per second
            timing += f", ETA {_duration((self.total_steps - step) / rate)}"
        parts += [
            f"{metrics['clips_per_s']:.1f} clips/s",
            f"data wait {100 * metrics['data_wait_fraction']:.0f}%",
            timing,
        ]
        return " | ".join(parts)


@contextlib.contextmanager
def progress_from_metrics(
    metrics_file: Path, run_name: str, total_steps: int, every_s: float, poll_s: float = 1.0
):
    """[driver] Print a local run's progress lines (`ConsoleProgress`) from the metrics.jsonl
    its rank 0 appends to, while the body runs: for a driver whose Ray workers do not log to
    its console (the demo starts Ray with log_to_driver=False). Rows already in the file (a
    resumed run's) are skipped; the last rows are read once more when the body ends."""
    progress = ConsoleProgress(run_name, total_steps, time.perf_counter(), every_s)
    offset = metrics_file.stat().st_size if metrics_file.exists() else 0
    latest: dict[str, float] = {}
    stop = threading.Event()

    def read_new_rows() -> None:
        nonlocal offset
        if not metrics_file.exists():
            return
        with open(metrics_file, "rb") as file:
            file.seek(offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a row being written waits for next time
        offset += len(complete)
        rows = metrics_rows(complete.splitlines())
        for row in rows:
            latest.update(row)  # the online kNN stays from the row that had it
        if rows and "loss" in latest:  # the first row may hold only the step-0 online kNN
            progress.maybe_print(int(latest["step"]), latest, time.perf_counter())

    def follow() -> None:
        while not stop.wait(poll_s):
            read_new_rows()

    thread = threading.Thread(target=follow, name="progress-from-metrics", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
        read_new_rows()


def _duration(seconds: float) -> str:
    """3h05m, 4m07s, 12s."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
