"""Ray Train: the per-worker SVT loop, checkpoint/resume, and the TorchTrainer driver.

The only module that calls `ray.train`. The Ray touchpoints are numbered as in Ray's
`torch_fashion_mnist_example.py`:

  [1] the driver builds a TorchTrainer: one worker per GPU (or CPU slot), DDP via Ray;
  [2] each worker restores the latest checkpoint, if any (`ray.train.get_checkpoint`, or
      one saved whole that Ray Train did not register before a stop: `runs.run_progress`);
  [3] the student is wrapped in DDP (`ray.train.torch.prepare_model`);
  [4] each worker streams its shard of the view dataset (`ray.train.get_dataset_shard`);
  [5] every step is reported; rank 0 attaches a checkpoint every N steps and at the end;
      a controller callback records each checkpoint Ray Train registers (progress.json).

Resume is exact up to the data pipeline's determinism: schedules are pure functions of the
step, the checkpoint holds student, teacher, optimiser, loss centre and step, and the dataset
factory starts the stream at the epoch of the latest checkpoint (the worker then skips the
batches of that epoch it already trained on). The same path serves a worker lost in the
middle of a run (`FailureConfig`) and `svt-ray pretrain --resume`.

Around it: `runs.py` (the run's folder, run.json and its MLflow run, what a resume may change),
`cluster.py` (joining a cluster or starting a local Ray sized for the run) and `progress.py`
(the console's progress lines).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from pyarrow import fs as pafs
from ray.train.torch import TorchTrainer

from data_prep.inputs import resolve_filesystem
from svt_ray import data
from svt_ray.cluster import (
    check_local_gpus,
    cpus_per_run,
    ensure_ray,
    joins_a_cluster,
    local_ray_cpus,
    warn_node_local_paths,
)
from svt_ray.config import ConfigError, ExperimentConfig
from svt_ray.engine import (
    NonFiniteLossError,
    build_state,
    load_state_dict,
    state_dict,
    train_step,
    weights_finite,
)
from svt_ray.model import check_init_from
from svt_ray.progress import ConsoleProgress, DataWait
from svt_ray.runs import (
    CHECKPOINT_FILE,
    DIVERGED_FILE,
    PROGRESS_FILE,
    RUN_FILE,
    absolute_path,
    check_remote_storage,
    check_resumed_data,
    check_resumed_recipe,
    check_resumed_tracking,
    check_writable,
    checkpoint_dir_name,
    checkpoint_step,
    default_run_name,
    download_file,
    end_mlflow_run,
    fetch_metrics,
    finish_mlflow_run,
    join_uri,
    local_log_directory,
    log_training_curves,
    mirror_metrics,
    prune_checkpoints,
    read_json,
    report_decode_failures,
    run_directory,
    run_progress,
    start_mlflow_run,
    storage_root,
    write_json,
)
from svt_ray.tracking import (
    absolute_tracking_uri,
    check_tracking_uri,
    cluster_tracking_uri,
    hide_password,
    make_tracker,
)
from svt_ray.views import view_slots

logger = logging.getLogger(__name__)

NO_CHECKPOINT = "no checkpoint yet"

# Ray Train 2.60's DEFAULT_WORKER_GROUP_START_TIMEOUT_S: how long one worker-group start waits.
START_TIMEOUT_ENV, START_TIMEOUT_DEFAULT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0


class TrainingDivergedError(RuntimeError):
    """The loss became non-finite; the last good checkpoint is kept."""


class RunStoppedError(RuntimeError):
    """Ray Train gave up on the run (failures beyond `train.max_failures`, or no room for the
    workers within `train.wait_for_workers_s`); its checkpoints are kept for `--resume`."""


class RunInterruptedError(RunStoppedError):
    """The user stopped the run (Ctrl-C); its checkpoints are kept for `--resume`."""


# -- the dataset factory (called by the Train controller at every worker-group start) ------


def dataset_for_run(config_json: dict[str, Any], run_dir: str, progress_bars: bool | None):
    """[Ray Train's dataset manager] The training stream, starting at the epoch of the run's
    latest checkpoint; with Ray Data's progress bars as the driver's console wants them
    (`data.progress_bars_wanted`: this process has the default DataContext, not the driver's)."""
    data.set_progress_bars(progress_bars)
    config = ExperimentConfig.model_validate(config_json)
    progress = read_json(join_uri(run_dir, PROGRESS_FILE)) or {"step": 0}
    start_epoch, _ = resume_position(config, progress["step"])
    return data.training_dataset(config, start_epoch=start_epoch, failure_key=run_dir)


def resume_position(config: ExperimentConfig, step: int) -> tuple[int, int]:
    """Where a run (re)started at `step` picks up its stream: the epoch the stream starts at
    and the batches of it to skip. With data.deterministic every pass is one epoch of
    steps_per_epoch steps. Otherwise the epochs run on in one stream, batches crossing their
    ends, so the uninterrupted run is at clip step x batch: the epoch holding that clip, and
    its batches before it, rounded down (up to a batch's clips seen twice, none never)."""
    derived = config.derived
    if config.data.deterministic:
        epoch = step // derived.steps_per_epoch
        return epoch, step - epoch * derived.steps_per_epoch
    clip = step * config.optim.batch_size
    epoch = clip // derived.clips_per_epoch
    return epoch, (clip - epoch * derived.clips_per_epoch) // config.optim.batch_size


# -- the worker ------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Augmentation randomness as a function of (seed, step, rank): resume needs no replay."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


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


def _quiet_read_only_batches() -> None:
    """Ray Data hands a single worker its batches on read-only Arrow memory, and torch warned
    in the run's log ("The given NumPy array is not writable ...") of writes that never come:
    the views are copied to float before anything is written (`views.ViewAugmenter`)."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, wrap in DDP, stream views, step, log, checkpoint."""
    _quiet_report_lines()
    _quiet_read_only_batches()
    config = ExperimentConfig.model_validate(loop_config["config"])
    derived = config.derived
    context = ray.train.get_context()
    rank = context.get_world_rank()
    run_dir = loop_config["run_dir"]
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))

    step, saved = 0, None
    checkpoint = ray.train.get_checkpoint()  # [2]
    resume_step = loop_config.get("resume_step") or 0
    if resume_step and (
        checkpoint is None or (checkpoint_step(checkpoint.path) or 0) < resume_step
    ):
        # saved whole by rank 0 but never registered with Ray Train (`runs.run_progress`)
        filesystem, path = resolve_filesystem(join_uri(run_dir, checkpoint_dir_name(resume_step)))
        checkpoint = ray.train.Checkpoint(path=path, filesystem=filesystem)
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
        # and the workers it runs on now (`--resume --workers N`: the run's params keep the
        # first start's, as MLflow never changes a param)
        tracker.set_tags({
            "svt.resumed_at_step": step, "svt.world_size": context.get_world_size(),
        })  # fmt: skip
    online_knn = _OnlineMetrics(config, state, rank, loop_config.get("online_knn_clips"))
    if online_knn.knn is not None:  # the clips it scores, as the data allowed: its resolution
        tracker.set_tags({
            "svt.online_knn_bank_clips": len(online_knn.knn.bank["label"]),
            "svt.online_knn_query_clips": len(online_knn.knn.query["label"]),
        })  # fmt: skip
    if online_knn.maybe_run(step, force=True):  # the curve starts at the (restored) weights
        tracker.log_metrics(online_knn.latest, step=step * config.optim.batch_size)
    slot_names = [slot.name for slot in view_slots(config.views)]
    to_skip = resume_position(config, step)[1]  # batches of the stream's first epoch trained
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
                if evaluated:  # as of logging, as the step's MLflow time is: the report's
                    # training hours tell a run's sessions apart by when each loop started
                    metrics["wall_time_s"] = time.perf_counter() - started
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


class _OnlineMetrics:
    """Online kNN of the teacher on rank 0 every `eval.online_every` steps (off at 0).

    The latest accuracy rides along in every later report, so Tune schedulers (ASHA on
    `online_knn_top1`) always find the metric; a step with an evaluation is always logged.
    """

    def __init__(
        self, config: ExperimentConfig, state, rank: int, folders: dict[str, str] | None = None
    ) -> None:
        self.every = online_knn_every(config)
        self.state = state
        self.latest: dict[str, float] = {}
        self.seconds = 0.0
        self.knn = None
        if self.every and rank == 0:
            from svt_ray.evaluate import OnlineKNN

            self.knn = OnlineKNN.from_config(config, folders)
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
    clips = data.training_clips(manifest)
    resolved = config.resolve(clips)
    resolved.data.path = absolute_path(resolved.data.path)  # as the workers find it
    if online_knn_every(resolved):  # each worker would fail on its own, max_failures times
        from svt_ray.evaluate import check_eval_data

        check_eval_data(
            resolved.data.path, manifest, resolved.eval,
            also="; or train without online kNN: --set eval.online_every=0 --set "
            "eval.online_every_clips=0",
        )  # fmt: skip
    resolved.tracking.tracking_uri = absolute_tracking_uri(resolved.tracking.tracking_uri)
    check_tracking_uri(resolved.tracking.tracking_uri)  # before any compute is spent
    check_init_from(resolved)  # absolute, and there: each worker loads it
    run_name = default_run_name(resolved)
    if "://" not in resolved.train.storage_path:  # a file or /proc: a traceback after Ray
        check_writable(Path(resolved.train.storage_path), "--storage")
    check_remote_storage(resolved.train.storage_path)
    run_dir = run_directory(resolved.train.storage_path, run_name)
    progress = run_progress(run_dir)
    if progress is not None and not resume:
        raise ConfigError(
            f"run {run_name!r} already has checkpoints up to step {progress['step']} in {run_dir}; "
            f"continue it with `--resume {run_name}`, or name a new one with --run-name NAME"
        )
    if resume and progress is None:
        logger.info("no checkpoint of run %s yet: starting it", run_name)
    if resume and progress is not None:
        recorded_run = read_json(join_uri(run_dir, RUN_FILE)) or {}  # read once for both
        check_resumed_data(resolved, run_name, recorded_run, data.manifest_checksum(manifest))
        check_resumed_recipe(resolved, run_name, recorded_run)
        check_resumed_tracking(resolved, run_name, recorded_run)
    if read_json(join_uri(run_dir, DIVERGED_FILE)) is not None:
        raise TrainingDivergedError(
            f"run {run_name!r} diverged before ({run_dir}/{DIVERGED_FILE}); change the recipe "
            "and use a new train.run_name"
        )
    if progress is not None and progress["step"] >= resolved.derived.total_steps:
        finished = _finished_run(resolved, run_name, run_dir, progress["step"])
        if finished is not None:
            return finished
    derived = resolved.derived
    if derived.warmup_steps > derived.total_steps:  # e.g. --set optim.epochs=1 on the paper's
        logger.warning(
            "optim.warmup_epochs=%g is longer than the run (optim.epochs=%g): the lr climbs all "
            "run long, its last step at %.0f%% of its peak %.3g; lower optim.warmup_epochs for "
            "a short run",
            resolved.optim.warmup_epochs, resolved.optim.epochs,
            100 * (derived.total_steps - 1) / derived.warmup_steps, derived.lr,
        )  # fmt: skip
    scaling = resolved.scaling
    cores, training_cpus = os.cpu_count() or 1, scaling.num_workers * scaling.cpus_per_worker
    if not joins_a_cluster(scaling.address) and not ray.is_initialized() and training_cpus > cores:
        logger.warning(
            "%d workers x %g CPU on this %d-core machine: they share its cores (the local Ray "
            "is given more logical CPUs than it has), so each step takes longer than with %d "
            "workers; a run's recipe does not depend on the worker count",
            scaling.num_workers, scaling.cpus_per_worker, cores, max(1, int(cores // scaling.cpus_per_worker)),
        )  # fmt: skip
    ensure_ray(scaling.address, num_cpus=local_ray_cpus(cpus_per_run(resolved)))
    check_local_gpus(resolved)  # before the MLflow run: a run that cannot start leaves none
    knn_clips = None
    if online_knn_every(resolved):  # decoded on Ray Data, not by rank 0 while the others wait
        from svt_ray.evaluate import OnlineKNN

        (knn_clips,) = OnlineKNN.prepare(resolved)
    recorded = resolved.model_copy(deep=True)  # run.json keeps the URI as the user gave it
    if cluster_tracking and joins_a_cluster(scaling.address):  # rank 0 logs from its node
        resolved.tracking.tracking_uri = cluster_tracking_uri(
            resolved.tracking.tracking_uri, ray.util.get_node_ip_address()
        )
        warn_node_local_paths(
            {"--data": resolved.data.path, "--storage": resolved.train.storage_path}
        )
    mlflow_run_id = start_mlflow_run(
        recorded, run_name, run_dir, data.manifest_checksum(manifest), parent_run_id, extra_tags,
        tracking_uri=resolved.tracking.tracking_uri,
    )  # fmt: skip
    log_dir = local_log_directory(resolved, run_name)
    pieces = resolved.optim.accumulation_steps
    every, total = resolved.train.checkpoint_every, resolved.derived.total_steps
    logger.info(
        "run %s: %d clips/epoch, global batch %d = %d worker%s x %d%s, peak lr %.3g, %d steps; "
        "checkpoints %s in %s; MLflow run %s",
        run_name, clips, resolved.optim.batch_size, resolved.scaling.num_workers,
        "s" * (resolved.scaling.num_workers != 1),
        resolved.derived.per_worker_batch,
        f" (in {pieces} pieces of {resolved.derived.per_worker_batch // pieces})" if pieces > 1
        else "",
        resolved.derived.lr, total,
        f"every {every} steps and at the end" if every < total
        else f"at the end only (train.checkpoint_every={every}: stopped before, it starts over)",
        run_dir, mlflow_run_id,
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
            "resume_step": progress["step"] if progress else 0,
            "online_knn_clips": knn_clips,
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
            checkpoint_config=checkpoint_config(resolved),
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
        end_mlflow_run(resolved.tracking.tracking_uri, mlflow_run_id, "FAILED")
        raise RunStoppedError(
            _stopped_message(resolved, run_name, run_dir, error, _dead_nodes() - dead_before)
        ) from error
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's SIGINT handler aborts the Train controller, and the driver's
        # wait for it ends in SystemExit (KeyboardInterrupt before the handler is in place).
        end_mlflow_run(resolved.tracking.tracking_uri, mlflow_run_id, "KILLED")
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
    finish_mlflow_run(
        resolved.tracking.tracking_uri, mlflow_run_id, run_name, resolved.train.storage_path
    )
    skipped, clips = data.decode_failures(run_dir)
    report_decode_failures(
        resolved.tracking.tracking_uri, mlflow_run_id, run_name, skipped, clips,
        data.clip_sources(resolved.data.path, clips),
    )  # fmt: skip
    # Ray Train prunes the checkpoints it registered; one it never did (`run_progress`) too
    prune_checkpoints(run_dir, resolved.train.keep_checkpoints)
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
        if run.info.status in ("RUNNING", "KILLED"):  # stopped after the last checkpoint
            client.set_terminated(run_id, "FINISHED")
    except Exception as error:  # another --tracking-uri than the run's: the checkpoint still counts
        uri = config.tracking.tracking_uri
        logger.warning("run %s: its MLflow run %s is not in %s (%s)", run_name, run_id,
                       hide_password(uri), hide_password(error, uri))  # fmt: skip
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


def checkpoint_config(config: ExperimentConfig):
    """Ray Train keeps the run's latest `train.keep_checkpoints` checkpoints (0: all)."""
    return ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints or None)


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
    if kept == NO_CHECKPOINT:  # --resume would keep the settings that may have caused this
        return (
            f"run {run_name!r} stopped: {reason}. It keeps {kept} in {run_dir}, so nothing is "
            f"lost; {when}, run your svt-ray pretrain command again, with other settings if "
            f"they caused this (`{command}` runs it again with the recorded ones)."
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
    progress = run_progress(run_dir)
    kept = f"checkpoints up to step {progress['step']}" if progress else NO_CHECKPOINT
    resume = ["svt-ray", "pretrain", "--resume", run_name, "--storage", config.train.storage_path]
    if config.scaling.address:
        resume += ["--address", config.scaling.address]
    return kept, shlex.join(resume)


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
    """[driver] The loss-curve PNG of a finished run, as an MLflow artifact. The run keeps
    the status rank 0 gave it: continuing it (a tracker) would set it RUNNING until this
    ends, and a driver killed in between (a study stopped as a trial finished) left a
    finished run RUNNING for good."""
    metrics_file = fetch_metrics(log_dir, run_dir)
    log_training_curves(config.tracking.tracking_uri, run_id, run_name, metrics_file, log_dir)
