"""Ray Train: the per-worker SVT loop, checkpoint/resume, and the TorchTrainer driver.

The only module that calls `ray.train`. The Ray touchpoints are numbered as in Ray's
`torch_fashion_mnist_example.py`:

  [1] the driver builds a TorchTrainer: one worker per GPU (or CPU slot), DDP via Ray;
  [2] each worker restores the latest checkpoint, if any (`ray.train.get_checkpoint`);
  [3] the student is wrapped in DDP (`ray.train.torch.prepare_model`);
  [4] each worker streams its shard of the view dataset (`ray.train.get_dataset_shard`);
  [5] every step is reported; rank 0 attaches a checkpoint every N steps and at the end;
      a controller callback records each checkpoint Ray Train registers (progress.json).

Resume is exact up to the data pipeline's determinism: schedules are pure functions of the
step, the checkpoint holds student, teacher, optimiser, loss centre and step, and the dataset
factory starts the stream at the epoch of the latest checkpoint (the worker then skips the
batches of that epoch it already trained on). The same path serves a worker lost in the
middle of a run (`FailureConfig`) and `svt-ray pretrain --resume`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from pyarrow import fs as pafs
from ray.train.torch import TorchTrainer

from data_prep.inputs import resolve_filesystem
from data_prep.shards import write_file
from svt_ray import data
from svt_ray.config import ConfigError, ExperimentConfig, flatten_tree
from svt_ray.engine import (
    NonFiniteLossError,
    build_state,
    load_state_dict,
    state_dict,
    train_step,
    weights_finite,
)
from svt_ray.tracking import (
    METRICS_FILE,
    absolute_tracking_uri,
    check_tracking_uri,
    cluster_tracking_uri,
    git_commit,
    make_tracker,
    read_metrics_file,
)
from svt_ray.views import view_slots

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
PROGRESS_FILE = "progress.json"  # {storage}/{run}/: the latest checkpoint Ray Train registered
RUN_FILE = "run.json"  # {storage}/{run}/: the MLflow run id and the resolved config
DIVERGED_FILE = "diverged.json"  # {storage}/{run}/: written when the loss became non-finite
# Ray Train 2.60's DEFAULT_WORKER_GROUP_START_TIMEOUT_S: how long one worker-group start waits.
START_TIMEOUT_ENV, START_TIMEOUT_DEFAULT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0
# Environment of a local Ray instance that `ensure_ray` starts (its processes inherit it; a
# value the user set wins). Ray Train's controller polls its workers every 2 s by default and
# acts on a finished run or a registered checkpoint only at a poll: about 6 s of a 29 s test
# run on 2 cores. At 0.5 s the same run takes 21-24 s. Clusters keep Ray's default.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


class TrainingDivergedError(RuntimeError):
    """The loss became non-finite; the last good checkpoint is kept."""


class RunStoppedError(RuntimeError):
    """Ray Train gave up on the run (failures beyond `train.max_failures`, or no room for the
    workers within `train.wait_for_workers_s`); its checkpoints are kept for `--resume`."""


class RunInterruptedError(RunStoppedError):
    """The user stopped the run (Ctrl-C); its checkpoints are kept for `--resume`."""


# -- storage helpers (local folders and any pyarrow filesystem URI) -------------------------


def storage_root(storage_path: str) -> str:
    """A local storage path made absolute (Ray Train needs that); URIs pass unchanged."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def join_uri(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a filesystem URI. A URI's query string (pyarrow's
    options, e.g. `?endpoint_override=HOST:PORT&scheme=http` for an S3-compatible server) stays
    at the end, where pyarrow reads it."""
    path, mark, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([path.rstrip("/"), *parts]) + mark + query


def read_json(path: str) -> dict | None:
    filesystem, local = resolve_filesystem(path)
    if filesystem.get_file_info(local).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(local) as stream:
        return json.loads(stream.read())


def write_json(path: str, payload: dict) -> None:
    write_file(path, json.dumps(payload, indent=1).encode())


def run_directory(storage_path: str, run_name: str) -> str:
    """Where a run's checkpoints, run.json and progress.json live (a path or a URI)."""
    return join_uri(storage_root(storage_path), run_name)


def local_log_directory(config: ExperimentConfig, run_name: str) -> Path:
    """Where metrics.jsonl and plots go: the run directory when it is local, else a temporary
    folder named after the run's URI, so that runs of one name on two storages never share
    a metrics.jsonl (a resumed run finds its own again)."""
    run_dir = run_directory(config.train.storage_path, run_name)
    if "://" not in run_dir:
        return Path(run_dir)
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "svt_ray_runs" / f"{run_name}-{digest}"


def download_file(filesystem: pafs.FileSystem, path: str, destination: Path) -> None:
    """Stream one file of `filesystem` to a local file, 8 MiB at a time."""
    with filesystem.open_input_stream(path) as stream, open(destination, "wb") as file:
        while piece := stream.read(8 << 20):
            file.write(piece)


def mirror_metrics(log_dir: Path, run_dir: str) -> None:
    """[rank 0] Copy the run's metrics.jsonl into its run directory when that is remote
    storage (at every checkpoint): a restart on another node, the driver's curve plot and
    `svt-ray tracking sync` find it there once the node that trained is gone. A failed copy
    is only logged; the next checkpoint tries again."""
    source = log_dir / METRICS_FILE
    if "://" not in run_dir or not source.is_file():
        return  # a local run directory is the log directory itself
    try:
        write_file(join_uri(run_dir, METRICS_FILE), source)
    except OSError as error:
        logger.warning("%s not copied to %s: %s", source, run_dir, error)


def fetch_metrics(log_dir: Path, run_dir: str) -> Path:
    """The run's metrics.jsonl in `log_dir`, replaced by the run directory's copy
    (`mirror_metrics`) when that copy reaches a later step: rank 0 restarted on another node,
    or a driver or `tracking sync` on a machine other than the one that trained."""
    local = log_dir / METRICS_FILE
    if "://" not in run_dir:
        return local
    filesystem, path = resolve_filesystem(join_uri(run_dir, METRICS_FILE))
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return local
    log_dir.mkdir(parents=True, exist_ok=True)
    download = log_dir / f".{METRICS_FILE}.download"
    download_file(filesystem, path, download)

    def last_step(file: Path) -> int:
        return max((int(line["clips_seen"]) for line in read_metrics_file(file)), default=-1)

    if last_step(download) > last_step(local):
        os.replace(download, local)
    else:
        download.unlink()
    return local


def default_run_name(config: ExperimentConfig) -> str:
    return config.train.run_name or f"{config.preset}-seed{config.train.seed}"


# -- the dataset factory (called by the Train controller at every worker-group start) ------


def dataset_for_run(config_json: dict[str, Any], run_dir: str, progress_bars: bool | None):
    """[Ray Train's dataset manager] The training stream, starting at the epoch of the run's
    latest checkpoint; with Ray Data's progress bars as the driver's console wants them
    (`data.progress_bars_wanted`: this process has the default DataContext, not the driver's)."""
    data.set_progress_bars(progress_bars)
    config = ExperimentConfig.model_validate(config_json)
    progress = read_json(join_uri(run_dir, PROGRESS_FILE)) or {"step": 0}
    start_epoch = progress["step"] // config.derived.steps_per_epoch
    return data.training_dataset(config, start_epoch=start_epoch)


# -- the worker ------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Augmentation randomness as a function of (seed, step, rank): resume needs no replay."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def checkpoint_dir_name(step: int) -> str:
    """The folder of the checkpoint at `step` inside the run directory."""
    return f"checkpoint_{step:08d}"


def load_checkpoint(checkpoint: ray.train.Checkpoint, device: torch.device | str) -> dict:
    """The state a checkpoint holds, read by this process alone.

    Not `Checkpoint.as_directory`: on remote storage it downloads into one folder per
    checkpoint that the ranks of a node share, and a rank arriving after another's download
    downloads again over the file the other is reading (Ray 2.60). A resume on S3 failed so,
    with "PytorchStreamReader failed reading file data/N". Each rank here streams its own copy
    to a private temporary folder; a local checkpoint is read where it is."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return torch.load(path, map_location=device, weights_only=True)
    with tempfile.TemporaryDirectory(prefix="svt_checkpoint_") as directory:
        local = Path(directory) / CHECKPOINT_FILE
        download_file(checkpoint.filesystem, path, local)
        return torch.load(local, map_location=device, weights_only=True)


def _save_checkpoint(state, step: int, metrics: dict[str, float], rank: int) -> None:
    """[5] Report with a checkpoint (rank 0 writes it; every rank must call report)."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(state_dict(state, step), Path(directory) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step)
        )


class RecordProgress(ray.train.UserCallback):
    """[controller] Write progress.json once Ray Train has registered a checkpoint.

    A checkpoint counts only when every rank's report has reached the controller; a worker
    that dies first (a lost node) takes the report with it and the restart resumes from the
    checkpoint before. Written here, progress.json always names the checkpoint a restart
    resumes from, so the dataset factory starts the stream at the right epoch.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is not None:
            write_json(join_uri(self.run_dir, PROGRESS_FILE), {"step": int(metrics[0]["step"])})


def _quiet_report_lines() -> None:
    """Ray Train V2 logs reports at INFO on the workers: "Reporting training result N:
    TrainingReport(checkpoint=..., metrics={...every metric...}) from rank R", about 600
    characters a line, 8 of a quick-tour log's 39; the progress lines and "Checkpoint
    successfully created" say what matters. Its logger is named after its file; its
    warnings still show."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: the lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, wrap in DDP, stream views, step, log, checkpoint."""
    _quiet_report_lines()
    config = ExperimentConfig.model_validate(loop_config["config"])
    derived = config.derived
    context = ray.train.get_context()
    rank = context.get_world_rank()
    run_dir = loop_config["run_dir"]
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))

    step, saved = 0, None
    checkpoint = ray.train.get_checkpoint()  # [2]
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, device)
        step = int(saved["step"])
    shard = ray.train.get_dataset_shard("train")  # [4]
    # Ray Data starts its read tasks and decode actors at the first batch asked for: ask now,
    # so that they start while this worker builds its model, tracker and online kNN bank.
    next_pass = _StartedPass(_one_pass(shard, config, step))

    state = build_state(config, device)
    if saved is not None:
        load_state_dict(state, saved)
        logger.info("rank %d resumed at step %d", rank, step)
    if context.get_world_size() > 1:
        state.student = ray.train.torch.prepare_model(state.student, move_to_device=False)  # [3]

    log_dir = Path(loop_config["log_dir"])
    if rank == 0:  # rank 0 may have moved to this node: the history so far comes along
        fetch_metrics(log_dir, run_dir)
    tracker = make_tracker(
        rank,
        tracking_uri=config.tracking.tracking_uri,
        experiment=config.tracking.experiment,
        run_name=loop_config["run_name"],
        local_dir=log_dir,
        run_id=loop_config["mlflow_run_id"],
        flush_timeout_s=config.tracking.flush_timeout_s,
    )
    if checkpoint is not None:  # the latest restart's starting point, for whoever reads the run
        tracker.set_tags({"svt.resumed_at_step": step})
    online_knn = _OnlineMetrics(config, state, rank)
    if online_knn.maybe_run(step, force=True):  # the curve starts at the (restored) weights
        tracker.log_metrics(online_knn.latest, step=step * config.optim.batch_size)
    slot_names = [slot.name for slot in view_slots(config.views)]
    start_epoch = step // derived.steps_per_epoch
    to_skip = step - start_epoch * derived.steps_per_epoch  # batches of this epoch already seen
    fail_at_step = loop_config.get("fail_at_step")
    started, clips_at_start = time.perf_counter(), step * config.optim.batch_size
    online_knn.seconds = 0.0  # clips/s counts training time only
    progress = ConsoleProgress(
        loop_config.get("label") or loop_config["run_name"], derived.total_steps, started,
        config.train.progress_every_s if rank == 0 else 0.0,
    )  # fmt: skip
    metrics: dict[str, float] = {}
    data_waits = DataWait()
    try:
        while step < derived.total_steps:
            # One pass holds every remaining epoch (`data.training_dataset`; one epoch with
            # `data.deterministic`); another pass starts only when that one ran out: the next
            # epoch, or clips that failed to decode left the stream short.
            waited_since = time.perf_counter()
            batches = next_pass if next_pass is not None else _one_pass(shard, config, step)
            next_pass = None
            seen_in_pass = 0
            for batch in batches:
                seen_in_pass += 1
                if to_skip:
                    to_skip -= 1
                    waited_since = time.perf_counter()
                    continue
                if (
                    fail_at_step is not None
                    and step == fail_at_step
                    and rank == loop_config["fail_rank"]
                ):
                    _inject_failure(run_dir, step, config.train.checkpoint_every)
                step_started = time.perf_counter()
                data_wait = step_started - waited_since
                views = [batch[name] for name in slot_names]
                metrics = train_step(
                    state, views, step, _step_generator(config.train.seed, step, rank)
                )
                step += 1
                now = time.perf_counter()
                clips_seen = step * config.optim.batch_size
                metrics.update(
                    step=float(step),
                    epoch=step / derived.steps_per_epoch,
                    clips_seen=float(clips_seen),
                    wall_time_s=now - started,
                    clips_per_s=(clips_seen - clips_at_start)
                    / max(now - started - online_knn.seconds, 1e-9),
                    data_wait_fraction=data_wait / max(now - waited_since, 1e-9),
                )
                data_waits.add(data_wait, now - waited_since)
                last = step == derived.total_steps
                evaluated = online_knn.maybe_run(step, force=last)
                # MLflow gets the online kNN at the steps it was measured; Ray (Tune's
                # schedulers) gets the latest value in every report.
                logged = {**metrics, **online_knn.latest} if evaluated else metrics
                reported = {**metrics, **online_knn.latest}
                progress.maybe_print(step, reported, now)
                checkpointing = step % config.train.checkpoint_every == 0 or last
                if checkpointing or evaluated or step % config.train.log_every == 0:
                    tracker.log_metrics(logged, step=clips_seen)
                if checkpointing:
                    if not weights_finite(state):  # never a checkpoint to resume into NaN
                        raise NonFiniteLossError(
                            f"step {step}: some weights are not finite (gradients overflowed "
                            "with a finite loss); this checkpoint was not written. Lower "
                            "optim.base_lr or optim.clip_grad, or raise optim.warmup_epochs."
                        )
                    _save_checkpoint(state, step, reported, rank)
                    if rank == 0:
                        mirror_metrics(log_dir, run_dir)
                elif evaluated or step % config.train.report_every == 0:
                    # [5] metrics only, for Tune's schedulers. A collective: the condition
                    # is the same on every rank.
                    ray.train.report(reported)
                waited_since = time.perf_counter()
                if step >= derived.total_steps:
                    break
            if seen_in_pass == 0:
                raise RuntimeError(
                    f"rank {rank} got no batch of {derived.per_worker_batch} clips at step "
                    f"{step}: the dataset is smaller than one global batch"
                )
    except NonFiniteLossError as error:
        if rank == 0:
            write_json(join_uri(run_dir, DIVERGED_FILE), {"step": step, "error": str(error)})
            tracker.set_tags({"svt.diverged_at_step": step})
            tracker.finish("FAILED")
        return  # every rank saw the same all-reduced verdict; the last checkpoint stays
    hint = data_waits.hint(config) if rank == 0 else None
    if hint:
        logger.warning("%s", hint)
    tracker.finish("FINISHED")


def _one_pass(shard, config: ExperimentConfig, step: int):
    """The worker's batches for one pass over its shard, from `step` on (per-epoch shuffle)."""
    derived = config.derived
    return shard.iter_torch_batches(
        batch_size=derived.per_worker_batch,
        drop_last=True,
        prefetch_batches=config.data.prefetch_batches,
        local_shuffle_buffer_size=config.data.shuffle_buffer or None,
        local_shuffle_seed=config.train.seed + step // derived.steps_per_epoch
        if config.data.shuffle_buffer
        else None,
    )


class _StartedPass:
    """An iterable of batches whose first batch is fetched at once, in a background thread;
    iterating waits for it (and raises what fetching it raised), then continues in the caller."""

    def __init__(self, batches) -> None:
        self._iterator = iter(batches)
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._iterator))
        except StopIteration:
            pass
        except BaseException as error:  # re-raised in the training thread
            self._error = error

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._iterator


def online_knn_every(config: ExperimentConfig) -> int:
    """Steps between online kNN evaluations (0: off): `eval.online_every_clips` in steps of
    this batch size when set, else `eval.online_every`."""
    settings = config.eval
    if settings.online_every_clips:
        return max(1, round(settings.online_every_clips / config.optim.batch_size))
    return settings.online_every


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
        rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
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


class _OnlineMetrics:
    """Online kNN of the teacher on rank 0 every `eval.online_every` steps (off at 0).

    The latest accuracy rides along in every later report, so Tune schedulers (ASHA on
    `online_knn_top1`) always find the metric; a step with an evaluation is always logged.
    """

    def __init__(self, config: ExperimentConfig, state, rank: int) -> None:
        self.every = online_knn_every(config)
        self.state = state
        self.latest: dict[str, float] = {}
        self.seconds = 0.0
        self.knn = None
        if self.every and rank == 0:
            from svt_ray.evaluate import OnlineKNN

            self.knn = OnlineKNN.from_config(config)
            logger.info(
                "online kNN every %d steps: %d bank clips, %d query clips",
                self.every, len(self.knn.bank["label"]), len(self.knn.query["label"]),
            )  # fmt: skip

    def maybe_run(self, step: int, force: bool = False) -> bool:
        """Evaluate on rank 0 if `step` is due (or forced). Returns whether it was due, the
        same on every rank, since reporting it is a collective."""
        due = bool(self.every) and (force or step % self.every == 0)
        if self.knn is None or not due:
            return due
        started = time.perf_counter()
        accuracy = self.knn(self.state.teacher.backbone)
        self.seconds += time.perf_counter() - started
        self.latest = {"online_knn_top1": accuracy.top1, "online_knn_top5": accuracy.top5}
        return True


def _inject_failure(run_dir: str, step: int, checkpoint_every: int) -> None:
    """Test hook: kill this worker once at `step` (a marker file prevents a second time).

    It dies once the controller has registered the checkpoint before `step`, as a crash some
    time after it would; dying at once would lose that checkpoint's report (`RecordProgress`).
    """
    marker = join_uri(run_dir, f"injected_failure_{step}.json")
    if read_json(marker) is None:
        write_json(marker, {"step": step})
        checkpointed = step - step % checkpoint_every
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (read_json(join_uri(run_dir, PROGRESS_FILE)) or {"step": 0})["step"] >= checkpointed:
                break
            time.sleep(0.2)
        logger.warning("injected failure at step %d", step)
        os._exit(1)


# -- the driver ------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    run_name: str
    run_dir: str
    checkpoint_path: str | None
    mlflow_run_id: str
    metrics: dict[str, float]
    config: ExperimentConfig
    already_finished: bool = False  # resumed at its last step: Ray Train was not started


def _start_mlflow_run(
    config: ExperimentConfig,
    run_name: str,
    run_dir: str,
    manifest_checksum: str,
    parent_run_id: str | None,
    extra_tags: dict[str, str] | None,
    tracking_uri: str | None = None,
) -> str:
    """[driver] Create the run (params and tags logged once) or find the one to resume.

    `config` is what is recorded (params, config.yaml, run.json); `tracking_uri`, if given, is
    where to reach the store from here (the cluster address of a loopback URI, which run.json
    must not keep: a resume on a new cluster would look for the old head)."""
    state = read_json(join_uri(run_dir, RUN_FILE))
    if state is not None:
        changed = _recipe_changes(state["config"], config)
        if not changed or read_json(join_uri(run_dir, PROGRESS_FILE)) is not None:
            return state["mlflow_run_id"]
        # An attempt that ended before its first checkpoint recorded another recipe: nothing
        # of it can be resumed, and keeping its run.json would hand a later --resume the old
        # recipe. This run starts anew, in a new MLflow run.
        logger.warning(
            "run %s had no checkpoint yet and was started with another recipe (%s): it "
            "starts anew with this one", run_name, "; ".join(changed[:5]),
        )  # fmt: skip
        _end_mlflow_run(
            tracking_uri or config.tracking.tracking_uri, state["mlflow_run_id"], "KILLED"
        )
    log_dir = local_log_directory(config, run_name)
    stale = log_dir / METRICS_FILE
    if stale.exists():  # of an earlier run of this name whose run directory was deleted
        kept = stale.with_name(f"{METRICS_FILE}.{time.strftime('%Y%m%d-%H%M%S')}.old")
        stale.rename(kept)
        logger.warning(
            "run %s starts anew: the metrics.jsonl there before is now %s", run_name, kept
        )
    uri = tracking_uri or config.tracking.tracking_uri
    tracker = make_tracker(
        0,
        tracking_uri=uri,
        experiment=config.tracking.experiment,
        run_name=run_name,
        local_dir=log_dir,
        run_id=_unrecorded_trial_run(
            uri,
            config.tracking.experiment,
            parent_run_id,
            extra_tags,
            abandoned=state["mlflow_run_id"] if state else None,
        ),
        parent_run_id=parent_run_id,
        tags={
            "svt.preset": config.preset,
            "svt.git_commit": git_commit(),
            "svt.dataset_checksum": manifest_checksum,
            "svt.world_size": config.scaling.num_workers,
            "svt.run_dir": run_dir,
            **(extra_tags or {}),
        },
    )
    tracker.log_params(config.flat())
    tracker.log_text(config.dump(), "config.yaml")
    tracker.close()  # the run is resumable from here on: run.json names it
    write_json(
        join_uri(run_dir, RUN_FILE),
        {
            "mlflow_run_id": tracker.run_id,
            "config": config.model_dump(mode="json"),
            "dataset_checksum": manifest_checksum,
        },
    )
    return tracker.run_id


def _unrecorded_trial_run(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None,
    tags: dict | None,
    abandoned: str | None = None,
) -> str | None:
    """A study trial's child run that a driver created and never recorded in run.json (it
    died in between, or the trial failed before training): the trial's run goes on in it,
    instead of a second child run next to an empty one."""
    trial = (tags or {}).get("svt.trial_id")
    if not parent_run_id or trial is None:
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`svt.trial_id` = '{trial}'",
        order_by=["attributes.start_time DESC"],
    )
    unfinished = [
        run for run in runs if run.info.status != "FINISHED" and run.info.run_id != abandoned
    ]
    return unfinished[0].info.run_id if unfinished else None


def _check_resumed_data(config: ExperimentConfig, run_name: str, recorded: dict, checksum: str):
    """A resumed run trains on the data it started with (moved is fine): other data with
    another number of training clips would change its schedule mid-run (steps per epoch, hence
    the lr, warm-up and momentum curves), so it is refused; other data of the same size is
    only warned about."""
    before = recorded.get("config", {}).get("derived", {}).get("clips_per_epoch")
    now = config.derived.clips_per_epoch
    if before is not None and before != now:
        raise ConfigError(
            f"--resume {run_name}: {config.data.path} holds {now} training clips, the run "
            f"started with {before}; its schedule would change mid-run. Pass the data it "
            "started with (moved is fine), or start a new run on this data (the demo: another "
            "--workdir)"
        )
    if recorded.get("dataset_checksum") not in (None, checksum):
        logger.warning(
            "run %s resumes on other data than it started with (%s; checksum %s, was %s)",
            run_name, config.data.path, checksum, recorded["dataset_checksum"],
        )  # fmt: skip


def _check_resumed_recipe(config: ExperimentConfig, run_name: str, recorded: dict) -> None:
    """A run with checkpoints continues with the recipe it has: `pretrain --resume` takes it
    from run.json, but the demo (its fixed run name in a used --workdir) and code calling
    `run_pretraining` pass their own, which would otherwise be dropped without a word (a demo
    with another seed reported the earlier run's checkpoint against a new random init).
    Settings the record lacks (added by a later version) are not compared."""
    if "config" not in recorded:
        return
    changed = _recipe_changes(recorded["config"], config, recorded_keys_only=True)
    if changed:
        raise ConfigError(
            f"run {run_name!r} has checkpoints of another recipe ({'; '.join(changed[:5])}); "
            "continue it as it is (`svt-ray pretrain --resume`), or give this one another run "
            "name (the demo: another --workdir)"
        )


def _recipe_changes(
    recorded: dict[str, Any], config: ExperimentConfig, recorded_keys_only: bool = False
) -> list[str]:
    """`key: recorded -> now` for the settings of a run's recipe (not where and how it runs,
    `RESUMABLE_SETTINGS`) that differ between its run.json and `config`; with
    `recorded_keys_only`, the settings the record has (not those a later version added)."""
    before, now = flatten_tree(recorded), config.flat()
    keys = set(before) if recorded_keys_only else set(before) | set(now)
    return [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(keys)
        if key not in RESUMABLE_SETTINGS
        and not key.startswith("derived.")
        and before.get(key) != now.get(key)
    ]


def cpus_per_run(config: ExperimentConfig) -> float:
    """Logical CPUs one pretraining holds: its Train workers, its decode actor and one CPU for
    Ray Data's read tasks. A run whose Data cannot get a CPU waits forever (ray_notes.md §6.3)."""
    scaling = config.scaling
    return scaling.num_workers * scaling.cpus_per_worker + config.data.decode_cpus + 1


def local_ray_cpus(needed: float) -> int:
    """Logical CPUs for a local Ray instance: the machine's cores, or more when a run needs
    more (a laptop with 2 cores running 2 workers). Over-declaring is safe here: every Train
    worker and decode actor sets its own torch thread count."""
    return max(os.cpu_count() or 1, math.ceil(needed))


def joins_a_cluster(address: str | None) -> bool:
    """Whether Ray runs on a cluster rather than on a local instance this process starts: an
    address given, or RAY_ADDRESS (set in a `ray job submit` job), which `ray.init()` joins."""
    if address:
        return address != "local"
    return os.environ.get("RAY_ADDRESS", "local") not in ("", "local")


def ensure_ray(address: str | None, num_cpus: int | None = None, **options: Any) -> None:
    """Connect to `address` (or to RAY_ADDRESS, as in a `ray job submit` job), or start a local
    Ray instance with `num_cpus` logical CPUs (and `LOCAL_RAY_ENV`, unless the user set those
    variables). Ray refuses `num_cpus` when joining a cluster."""
    if not ray.is_initialized():
        options.setdefault("log_to_driver", True)
        cluster = joins_a_cluster(address)
        if not cluster:
            for name, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(name, value)
        try:
            ray.init(address=address, num_cpus=None if cluster else num_cpus, **options)
        except ConnectionError as error:
            where = address or os.environ.get("RAY_ADDRESS")
            raise ConfigError(
                f"scaling.address: no Ray cluster answers at {where} ({error}); start one "
                "(`ray start --head`, or `ray up ray_cluster.yaml`), or leave out --address for "
                "a local Ray instance"
            ) from None
    data.set_progress_bars(data.progress_bars_wanted())  # for datasets the driver runs itself


def check_local_gpus(config: ExperimentConfig) -> None:
    """[driver] A local Ray instance has the GPUs of this machine and no more: a run that asks
    for more would wait for them (`train.wait_for_workers_s`, 20 minutes by default) and then
    fail. On a cluster (`scaling.address`, or RAY_ADDRESS as in a `ray job submit` job, which
    `ray.init()` joins) the autoscaler may still add GPUs, so it is not checked there."""
    scaling = config.scaling
    needed = scaling.num_workers * scaling.gpus_per_worker
    if joins_a_cluster(scaling.address) or not needed:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < needed:
        raise ConfigError(
            f"scaling.gpus_per_worker: {scaling.num_workers} worker(s) x "
            f"{scaling.gpus_per_worker:g} GPU need {needed:g} GPU(s), and the local Ray instance "
            f"has {have:g}; pass --gpus-per-worker 0 to train on CPU, fewer --workers, or the "
            "--address of a cluster with GPUs"
        )


def run_pretraining(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    fail_at_step: int | None = None,
    fail_rank: int = 0,
    cluster_tracking: bool = True,
    label: str | None = None,
) -> PretrainResult:
    """Pretrain SVT with Ray Train; returns where the run and its checkpoint are.

    `cluster_tracking=False`: the tracking URI is already the one every node uses (a study's
    driver resolved it with `cluster_tracking_uri` and warned about it once for all trials).
    `label`: how the progress lines name the run (default: its run name; a study's trial
    gives its swept values, which its run name does not show).
    """
    if config.data.path is None:
        raise ConfigError("data.path: no dataset given; pass --data or run `svt-ray demo`")
    manifest = data.read_dataset_manifest(config.data.path)
    clips = data.split_count(manifest, "train")
    resolved = config.resolve(clips)
    resolved.tracking.tracking_uri = absolute_tracking_uri(resolved.tracking.tracking_uri)
    check_tracking_uri(resolved.tracking.tracking_uri)  # before any compute is spent
    run_name = default_run_name(resolved)
    run_dir = run_directory(resolved.train.storage_path, run_name)
    progress = read_json(join_uri(run_dir, PROGRESS_FILE))
    if progress is not None and not resume:
        raise ConfigError(
            f"run {run_name!r} already has checkpoints up to step {progress['step']} in {run_dir}; "
            f"continue it with `--resume {run_name}`, or name a new one with --run-name NAME"
        )
    if resume and progress is None:
        logger.info("no checkpoint of run %s yet: starting it", run_name)
    if resume and progress is not None:
        recorded_run = read_json(join_uri(run_dir, RUN_FILE)) or {}  # read once for both
        _check_resumed_data(resolved, run_name, recorded_run, data.manifest_checksum(manifest))
        _check_resumed_recipe(resolved, run_name, recorded_run)
    if read_json(join_uri(run_dir, DIVERGED_FILE)) is not None:
        raise TrainingDivergedError(
            f"run {run_name!r} diverged before ({run_dir}/{DIVERGED_FILE}); change the recipe "
            "and use a new train.run_name"
        )
    if progress is not None and progress["step"] >= resolved.derived.total_steps:
        finished = _finished_run(resolved, run_name, run_dir, progress["step"])
        if finished is not None:
            return finished
    scaling = resolved.scaling
    ensure_ray(scaling.address, num_cpus=local_ray_cpus(cpus_per_run(resolved)))
    check_local_gpus(resolved)  # before the MLflow run: a run that cannot start leaves none
    recorded = resolved.model_copy(deep=True)  # run.json keeps the URI as the user gave it
    if cluster_tracking and joins_a_cluster(scaling.address):  # rank 0 logs from its node
        resolved.tracking.tracking_uri = cluster_tracking_uri(
            resolved.tracking.tracking_uri, ray.util.get_node_ip_address()
        )
    mlflow_run_id = _start_mlflow_run(
        recorded, run_name, run_dir, data.manifest_checksum(manifest), parent_run_id, extra_tags,
        tracking_uri=resolved.tracking.tracking_uri,
    )  # fmt: skip
    log_dir = local_log_directory(resolved, run_name)
    pieces = resolved.optim.accumulation_steps
    logger.info(
        "run %s: %d clips/epoch, global batch %d = %d workers x %d%s, peak lr %.3g, %d steps; "
        "checkpoints in %s; MLflow run %s",
        run_name, clips, resolved.optim.batch_size, resolved.scaling.num_workers,
        resolved.derived.per_worker_batch,
        f" (in {pieces} pieces of {resolved.derived.per_worker_batch // pieces})" if pieces > 1
        else "",
        resolved.derived.lr, resolved.derived.total_steps, run_dir, mlflow_run_id,
    )  # fmt: skip

    data.set_preserve_order(resolved.data.deterministic or resolved.data.preserve_order)
    use_gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(  # [1]
        train_loop_per_worker,
        train_loop_config={
            "config": resolved.model_dump(mode="json"),
            "run_dir": run_dir,
            "run_name": run_name,
            "label": label,
            "log_dir": str(log_dir),
            "mlflow_run_id": mlflow_run_id,
            "fail_at_step": fail_at_step,
            "fail_rank": fail_rank,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_root(resolved.train.storage_path),
            failure_config=ray.train.FailureConfig(
                max_failures=resolved.train.max_failures,
                controller_failure_limit=_start_timeouts_allowed(resolved.train.wait_for_workers_s),
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[RecordProgress(run_dir), *(callbacks or [])],
        ),
        datasets={
            "train": functools.partial(
                dataset_for_run,
                resolved.model_dump(mode="json"),
                run_dir,
                data.progress_bars_wanted(),
            )
        },
    )
    dead_before = _dead_nodes()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        _end_mlflow_run(resolved.tracking.tracking_uri, mlflow_run_id, "FAILED")
        raise RunStoppedError(
            _stopped_message(resolved, run_name, run_dir, error, _dead_nodes() - dead_before)
        ) from error
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's SIGINT handler aborts the Train controller, and the driver's
        # wait for it ends in SystemExit (KeyboardInterrupt before the handler is in place).
        _end_mlflow_run(resolved.tracking.tracking_uri, mlflow_run_id, "KILLED")
        kept, command = _resume_hint(resolved, run_name, run_dir)
        raise RunInterruptedError(
            f"run {run_name!r} interrupted. It keeps {kept} in {run_dir}; continue it with "
            f"`{command}`."
        ) from None
    diverged = read_json(join_uri(run_dir, DIVERGED_FILE))
    checkpoint_path = _checkpoint_location(result.checkpoint, run_dir)
    if diverged is not None:
        raise TrainingDivergedError(
            f"{diverged['error']} The last good checkpoint is {checkpoint_path or 'none (before the first)'}."
        )
    if result.error is not None:
        raise result.error
    _log_curves(resolved, run_name, mlflow_run_id, run_dir, log_dir)
    return PretrainResult(
        run_name=run_name,
        run_dir=run_dir,
        checkpoint_path=checkpoint_path,
        mlflow_run_id=mlflow_run_id,
        metrics=dict(result.metrics or {}),
        config=resolved,
    )


def _finished_run(
    config: ExperimentConfig, run_name: str, run_dir: str, step: int
) -> PretrainResult | None:
    """[driver] The result of a run whose latest checkpoint is its last step, without starting
    Ray Train (which would build the workers and the data stream to train nothing); None when
    that checkpoint or the run's record is missing, so the caller lets Ray Train sort it out."""
    recorded = read_json(join_uri(run_dir, RUN_FILE))
    checkpoint = join_uri(run_dir, checkpoint_dir_name(step))
    filesystem, where = resolve_filesystem(join_uri(checkpoint, CHECKPOINT_FILE))
    if recorded is None or filesystem.get_file_info(where).type != pafs.FileType.File:
        return None
    run_id = recorded["mlflow_run_id"]
    try:
        import mlflow

        client = mlflow.MlflowClient(config.tracking.tracking_uri)
        run = client.get_run(run_id)
        metrics = dict(run.data.metrics)
        if run.info.status == "RUNNING":  # the driver died after the last checkpoint
            client.set_terminated(run_id, "FINISHED")
    except Exception as error:  # another --tracking-uri than the run's: the checkpoint still counts
        logger.warning("run %s: its MLflow run %s is not in %s (%s)", run_name, run_id,
                       config.tracking.tracking_uri, error)  # fmt: skip
        metrics = {}
    logger.info("run %s finished before (step %d of %d): nothing to train", run_name, step,
                config.derived.total_steps)  # fmt: skip
    return PretrainResult(
        run_name=run_name,
        run_dir=run_dir,
        checkpoint_path=checkpoint,
        mlflow_run_id=run_id,
        metrics=metrics,
        config=config,
        already_finished=True,
    )


def _start_timeouts_allowed(wait_for_workers_s: float | None) -> int:
    """`FailureConfig.controller_failure_limit` for a total wait: Ray Train retries a worker
    group that found no room within its start timeout as a controller failure, and by default
    forever, so a run that lost a node on a fixed-size cluster would never end."""
    if wait_for_workers_s is None:
        return -1
    start_timeout_s = float(os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_DEFAULT_S))
    return max(0, math.ceil(wait_for_workers_s / start_timeout_s) - 1)


def _dead_nodes() -> set[tuple[str, str]]:
    """(node id, address) of the cluster's dead nodes (the GCS keeps them listed)."""
    return {
        (node["NodeID"], node["NodeManagerAddress"]) for node in ray.nodes() if not node["Alive"]
    }


def _stopped_message(
    config: ExperimentConfig,
    run_name: str,
    run_dir: str,
    error: Exception,
    lost_nodes: set[tuple[str, str]],
) -> str:
    """Why Ray Train gave up, which nodes were lost meanwhile, and how to continue."""
    settings, scaling = config.train, config.scaling
    workers = f"{scaling.num_workers} workers of {scaling.cpus_per_worker:g} CPU"
    if scaling.gpus_per_worker:
        workers += f" + {scaling.gpus_per_worker:g} GPU"
    cause = getattr(error, "controller_failure", None)
    no_room = type(cause).__name__ == "WorkerGroupStartupTimeoutError"
    if no_room:
        reason = (
            f"the cluster had no room for {workers} within train.wait_for_workers_s="
            f"{settings.wait_for_workers_s:g}"
        )
    elif isinstance(error, ray.train.WorkerGroupError):
        reason = f"its workers failed more than train.max_failures={settings.max_failures} times"
        failures = sorted(error.worker_failures.items())
        if failures:  # the same error on every try is a bug or a bad setting, not bad luck
            rank, failure = failures[0]
            reason += f"; the last time, rank {rank}: {_one_line(failure)}"
    else:
        reason = f"Ray Train failed ({_one_line(cause or error)})"
    if lost_nodes:
        listed = ", ".join(
            f"{address} (node {node_id[:12]})" for node_id, address in sorted(lost_nodes)
        )
        reason += f"; Ray nodes lost during the run: {listed}"
    kept, command = _resume_hint(config, run_name, run_dir)
    when = (
        f"once the cluster has room for {workers}"
        if no_room or lost_nodes
        else "once the cause is fixed (the workers' log above has the traceback)"
    )
    return (
        f"run {run_name!r} stopped: {reason}. It keeps {kept} in {run_dir}; {when}, continue "
        f"it with `{command}`."
    )


def _one_line(error: BaseException) -> str:
    """`Type: first line of the message` of an error, of the user's code where Ray wraps it."""
    error = getattr(error, "cause", None) or error  # RayTaskError wraps the worker's own
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _resume_hint(config: ExperimentConfig, run_name: str, run_dir: str) -> tuple[str, str]:
    """(what a stopped run keeps, the command that continues it)."""
    progress = read_json(join_uri(run_dir, PROGRESS_FILE))
    kept = f"checkpoints up to step {progress['step']}" if progress else "no checkpoint yet"
    resume = ["svt-ray", "pretrain", "--resume", run_name, "--storage", config.train.storage_path]
    if config.scaling.address:
        resume += ["--address", config.scaling.address]
    return kept, shlex.join(resume)


def _end_mlflow_run(tracking_uri: str, run_id: str, status: str) -> None:
    """[driver] Close a run its rank 0 could not close; MLflow being down is only logged."""
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status)
    except Exception as error:
        logger.warning("MLflow run %s not marked %s: %s", run_id, status, error)


def _checkpoint_location(checkpoint: ray.train.Checkpoint | None, run_dir: str) -> str | None:
    """Where a checkpoint is, as `load_state` and `svt-ray eval` take it. Ray gives a path
    inside its filesystem (`bucket/runs/...`: no scheme, no query), so a remote one is named
    from the run's URI instead."""
    if checkpoint is None:
        return None
    if "://" not in run_dir:
        return checkpoint.path
    return join_uri(run_dir, checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


def _log_curves(
    config: ExperimentConfig, run_name: str, run_id: str, run_dir: str, log_dir: Path
) -> None:
    """[driver] The loss-curve PNG of a finished run, as an MLflow artifact."""
    from svt_ray.tracking import MLflowTracker, plot_training_curves

    metrics_file = fetch_metrics(log_dir, run_dir)
    png = plot_training_curves(metrics_file, log_dir / "training_curves.png")
    if png is None:  # no metrics.jsonl here: a local run directory on another node
        return
    tracker = MLflowTracker(
        config.tracking.tracking_uri, config.tracking.experiment, run_name, log_dir, run_id=run_id
    )
    tracker.log_artifact(png)
    tracker.finish()


# Where and how a run runs, not what it learns: `pretrain --resume` may change these.
RESUMABLE_SETTINGS = frozenset({
    "scaling.num_workers", "scaling.address", "scaling.gpus_per_worker",
    "scaling.cpus_per_worker", "tracking.tracking_uri", "tracking.flush_timeout_s",
    "train.storage_path", "train.run_name", "train.max_failures", "train.wait_for_workers_s",
    "train.progress_every_s", "data.path", "data.decode_actors", "data.decode_cpus",
    "data.decode_threads", "data.prefetch_batches", "data.preserve_order",
})  # fmt: skip


def recorded_config(run_name: str, storage_path: str, flags: list[str]) -> ExperimentConfig:
    """The config a run was started with (from its run.json), for `pretrain --resume`.

    Only where and how it runs may change (workers, address, tracking URI, storage); the
    recipe is the recorded one, so a resumed run stays one experiment.
    """
    from svt_ray.config import parse_override

    for item in flags:  # where the run is may be given as --set too; its name may not change
        keys, value = parse_override(item)
        if keys == ["train", "storage_path"]:
            storage_path = str(value)
        elif keys == ["train", "run_name"] and value != run_name:
            raise ConfigError(
                f"--resume {run_name}: a resumed run keeps its name; drop --run-name {value}"
            )
    run_dir = run_directory(storage_path, run_name)
    recorded = read_json(join_uri(run_dir, RUN_FILE))
    if recorded is None:
        raise ConfigError(
            f"--resume {run_name}: no run.json in {run_dir}; check --storage and the run name"
        )
    return config_from_record(recorded, run_name, flags)


def config_from_record(recorded: dict, run_name: str, flags: list[str]) -> ExperimentConfig:
    """A run.json's config with `flags` (`KEY=VALUE`, `RESUMABLE_SETTINGS` only) applied."""
    from svt_ray.config import parse_override, validate_config

    tree = recorded["config"]
    tree.pop("derived", None)
    for item in flags:
        keys, value = parse_override(item)
        key = ".".join(keys)
        if key not in RESUMABLE_SETTINGS:
            raise ConfigError(
                f"--resume keeps the recorded recipe; {key} cannot change (what may: "
                f"{', '.join(sorted(RESUMABLE_SETTINGS))})"
            )
        tree.setdefault(keys[0], {})[keys[1]] = value
    tree["train"]["run_name"] = run_name
    return validate_config(tree)
