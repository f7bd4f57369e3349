"""A pretraining run's folder and record: where it lives, what run.json and progress.json say,
its MLflow run, and what `--resume` may change.

A run lives in `{storage_path}/{run_name}/`, a local folder or any pyarrow filesystem URI
(`s3://`, `gs://`): Ray Train's checkpoints, `run.json` (the MLflow run id, the resolved
config, the dataset checksum), `progress.json` (the latest checkpoint Ray Train registered),
`diverged.json` when the loss became non-finite, and a copy of rank 0's `metrics.jsonl` when
the folder is remote. Nothing here imports Ray: the Train driver (`train.py`), the CLI and
`svt-ray tracking sync` read the same record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from data_prep.inputs import InputError, resolve_filesystem
from data_prep.shards import parse_record, write_file
from svt_ray import __version__
from svt_ray.config import (
    RESUMABLE_SETTINGS,
    ConfigError,
    ExperimentConfig,
    flatten_tree,
    resumable_settings_text,
)
from svt_ray.tracking import (
    METRICS_FILE,
    TrackingUnavailableError,
    git_commit,
    hide_password,
    make_tracker,
    plot_training_curves,
    read_metrics_file,
)

logger = logging.getLogger(__name__)

# A run's start waits at least this long for the store to take its params and config.yaml
# (`tracking.flush_timeout_s` 0 gives up on the values an outage holds back at the end, and
# had refused every start).
START_FLUSH_FLOOR_S = 10.0

PROGRESS_FILE = "progress.json"  # {storage}/{run}/: the run's latest checkpoint (run_progress)


CHECKPOINT_FILE = "state.pt"  # {storage}/{run}/checkpoint_NNNNNNNN/: what rank 0 saved
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{8})")


RUN_FILE = "run.json"  # {storage}/{run}/: the MLflow run id and the resolved config


DIVERGED_FILE = "diverged.json"  # {storage}/{run}/: written when the loss became non-finite


# -- where a run lives (a local folder or any pyarrow filesystem URI) ---------------------


def storage_root(storage_path: str) -> str:
    """A local storage path made absolute (Ray Train needs that); URIs pass unchanged."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def join_uri(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a filesystem URI. A URI's query string (pyarrow's
    options, e.g. `?endpoint_override=HOST:PORT&scheme=http` for an S3-compatible server) stays
    at the end, where pyarrow reads it."""
    path, mark, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([path.rstrip("/"), *parts]) + mark + query


def absolute_path(path_or_uri: str) -> str:
    """A local path made absolute, `~` expanded (a URI as it is): Ray Train runs each worker
    in a working directory of its own, where a relative path names nothing."""
    if "://" in path_or_uri:
        return path_or_uri
    return os.path.abspath(os.path.expanduser(path_or_uri))


def check_writable(folder: Path, flag: str) -> None:
    """Before Ray starts: a folder we cannot write is the user's to fix, not a traceback."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # One name per call: the trials of a study check one storage together, and one
        # trial's unlink failed another's ("cannot write there").
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".svt_ray_write_probe_"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{flag} {folder}: cannot write there ({error.strerror or error}); pass a folder "
            "you can write"
        ) from None


def check_remote_storage(storage_path: str) -> None:
    """Before Ray and MLflow: a remote --storage answers (`resolve_filesystem` gives its first
    contact a deadline) and takes a file (a bucket that does not exist, read-only
    credentials), or an error that names the flag."""
    if "://" not in storage_path:
        return
    if storage_path.startswith("file://"):  # a local folder: made if need be, as run.json's
        check_writable(Path(resolve_filesystem(storage_path)[1]), "--storage")
        return
    try:
        filesystem, root = resolve_filesystem(storage_path)
        # One name per process: trials of a study start together on one storage.
        path = f"{root}/.svt_ray_write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with filesystem.open_output_stream(path) as stream:
            stream.write(b"")
        filesystem.delete_file(path)
    except InputError as error:
        raise ConfigError(f"--storage {error}") from None
    except OSError as error:
        raise ConfigError(
            f"--storage {storage_path}: cannot write there ({error}); check the bucket's name "
            "and that the credentials may write to it"
        ) from None


def read_json(path: str) -> dict | None:
    """A run's or a study's record, None if there is none. They are written atomically, so
    one that does not parse was cut short by a copy or edited by hand: a ConfigError naming it."""
    filesystem, local = resolve_filesystem(path)
    if filesystem.get_file_info(local).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(local) as stream:
        raw = stream.read()
    try:
        return parse_record(raw, path)
    except ValueError as error:
        raise ConfigError(
            f"{error}. Restore it from a copy, or move its folder aside to start anew"
        ) from None


def write_json(path: str, payload: dict) -> None:
    write_file(path, json.dumps(payload, indent=1).encode())


def run_directory(storage_path: str, run_name: str) -> str:
    """Where a run's checkpoints, run.json and progress.json live (a path or a URI)."""
    return join_uri(storage_root(storage_path), run_name)


def checkpoint_dir_name(step: int) -> str:
    """The folder of the checkpoint at `step` inside the run directory."""
    return f"checkpoint_{step:08d}"


def checkpoint_step(path: str) -> int | None:
    """The step of a checkpoint folder named by `checkpoint_dir_name` (None for another)."""
    match = _CHECKPOINT_DIR.fullmatch(path.partition("?")[0].rstrip("/").rsplit("/", 1)[-1])
    return int(match[1]) if match else None


def _saved_whole(filesystem: pafs.FileSystem, folder: str) -> bool:
    """Whether a checkpoint folder holds all of rank 0's state.pt. torch.save writes a zip
    archive, whose last 22 bytes are its end-of-central-directory record (no comment); a copy
    cut short ends elsewhere."""
    info = filesystem.get_file_info(f"{folder}/{CHECKPOINT_FILE}")
    if info.type != pafs.FileType.File or info.size < 22:
        return False
    with filesystem.open_input_file(info.path) as file:
        return file.read_at(4, info.size - 22) == b"PK\x05\x06"


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps of the run's checkpoint folders, in order (whole or not)."""
    return _listed_steps(*resolve_filesystem(run_dir))


def _listed_steps(filesystem: pafs.FileSystem, path: str) -> list[int]:
    listing = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    steps = (checkpoint_step(info.path) for info in listing if info.type == pafs.FileType.Directory)
    return sorted(step for step in steps if step is not None)


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Keep the latest `keep` checkpoint folders of a run (0: all)."""
    filesystem, path = resolve_filesystem(run_dir)
    for step in _listed_steps(filesystem, path)[:-keep] if keep else []:
        filesystem.delete_dir(f"{path}/{checkpoint_dir_name(step)}")


def run_progress(run_dir: str) -> dict | None:
    """The run's progress ({"step": its latest checkpoint}; None before its first).

    progress.json is written once Ray Train has registered a checkpoint, which it does after
    rank 0 saved it. A run stopped in between (Ctrl-C as a checkpoint was being saved, a
    driver killed) left a whole checkpoint that progress.json did not name, and its resume
    started over from step 0, overwriting it. A newer whole checkpoint is written into
    progress.json here, so that the dataset factory and the workers start from it.

    A progress.json that does not parse (a copy cut short, a crash of the machine before the
    file reached its disk) is rebuilt from the checkpoints, which it only names: the resume
    had stopped, telling the user to move the run's folder aside."""
    record = join_uri(run_dir, PROGRESS_FILE)
    try:
        progress = read_json(record)
    except ConfigError:
        logger.warning("%s does not parse; the run's latest whole checkpoint is read instead",
                       record)  # fmt: skip
        progress, damaged = None, True
    else:
        damaged = False
    registered = progress["step"] if progress else 0
    filesystem, path = resolve_filesystem(run_dir)
    for step in reversed(_listed_steps(filesystem, path)):
        if step <= registered:
            break
        if _saved_whole(filesystem, f"{path}/{checkpoint_dir_name(step)}"):
            if not damaged:
                logger.warning(
                    "%s: %s was saved whole, but the run stopped before Ray Train registered "
                    "it; it counts as the run's latest checkpoint", run_dir,
                    checkpoint_dir_name(step),
                )  # fmt: skip
            progress = {"step": step}
            write_json(record, progress)
            return progress
    if damaged:  # no whole checkpoint: the run starts over, as before its first
        filesystem.delete_file(f"{path}/{PROGRESS_FILE}")
    return progress


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


# -- the run's MLflow record ---------------------------------------------------------------


def start_mlflow_run(
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
        changed = recipe_changes(state["config"], config)
        if not changed or read_json(join_uri(run_dir, PROGRESS_FILE)) is not None:
            return state["mlflow_run_id"]
        # An attempt that ended before its first checkpoint recorded another recipe: nothing
        # of it can be resumed, and keeping its run.json would hand a later --resume the old
        # recipe. This run starts anew, in a new MLflow run.
        logger.warning(
            "run %s had no checkpoint yet and was started with another recipe (%s): it "
            "starts anew with this one", run_name, "; ".join(changed[:5]),
        )  # fmt: skip
        end_mlflow_run(
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
    wait_s = max(config.tracking.flush_timeout_s, START_FLUSH_FLOOR_S)
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
        flush_timeout_s=wait_s,
        tags={
            "svt.preset": config.preset,
            "svt.git_commit": git_commit(),
            "svt.version": __version__,
            "svt.dataset_checksum": manifest_checksum,
            "svt.world_size": config.scaling.num_workers,
            "svt.run_dir": run_dir,
            **(extra_tags or {}),
        },
    )
    # Whoever reads the MLflow store sees no password of the tracking URI (run.json, in the
    # run's own storage, keeps the URI whole for a resume)
    recorded = config.tracking.tracking_uri
    params = {**config.flat(), "train.run_name": run_name}  # the default's too
    params["tracking.tracking_uri"] = hide_password(recorded)
    tracker.log_params(params)
    tracker.log_text(hide_password(config.dump(), recorded), "config.yaml")
    try:
        # A run whose store did not take its recipe would train unlabelled in every comparison,
        # and run.json would keep it so (a resume logs nothing again): nothing trained yet.
        if not tracker.close():
            raise TrackingUnavailableError(
                f"MLflow at {hide_password(uri)} did not take the params and config.yaml of "
                f"run {run_name} within {wait_s:g} s (tracking.flush_timeout_s); nothing was "
                "trained: run the command again once it answers"
            )
        # The run is resumable from here on: run.json names it.
        write_json(
            join_uri(run_dir, RUN_FILE),
            {
                "mlflow_run_id": tracker.run_id,
                "config": config.model_dump(mode="json"),
                "dataset_checksum": manifest_checksum,
                "svt_ray_version": __version__,
            },
        )
    except BaseException as error:  # no run.json names it: nothing would ever close it
        # (a Ctrl-C in close()'s wait for an unanswering store too)
        stopped = isinstance(error, KeyboardInterrupt)  # Ctrl-C: KILLED, as everywhere
        end_mlflow_run(uri, tracker.run_id, "KILLED" if stopped else "FAILED")
        raise
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


def end_mlflow_run(tracking_uri: str, run_id: str, status: str) -> None:
    """[driver] Close a run its rank 0 could not close; MLflow being down is only logged."""
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status)
    except Exception as error:
        logger.warning(
            "MLflow run %s not marked %s: %s",
            run_id,
            status,
            hide_password(error, tracking_uri),
        )


def finish_mlflow_run(tracking_uri: str, run_id: str, run_name: str, storage_path: str) -> None:
    """[driver] After training ended well: FINISHED, if rank 0's own last calls did not reach
    the store in time (`tracking.flush_timeout_s`) and left the run RUNNING, where a study
    would mark it KILLED as if it had been stopped."""
    sync = shlex.join(["svt-ray", "tracking", "sync", run_name, "--storage", storage_path])
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_terminated(run_id, "FINISHED")
    except Exception as error:
        logger.warning(
            "MLflow run %s not marked FINISHED (%s); once the store answers, `%s` marks it and "
            "sends what it lacks", run_id, hide_password(error, tracking_uri), sync,
        )  # fmt: skip
        return
    logger.warning(
        "run %s: its last MLflow calls from training did not reach %s in time; MLflow run %s "
        "is marked FINISHED now, and `%s` sends any metrics it lacks",
        run_name, hide_password(tracking_uri), run_id, sync,
    )  # fmt: skip


def report_decode_failures(
    tracking_uri: str,
    run_id: str,
    run_name: str,
    skipped: int,
    clips: Sequence[str] = (),
    sources: Mapping[str, str] | None = None,
) -> None:
    """[driver] Clips the run's decode actors skipped (each warned as it happened, in lines
    easy to miss among a run's): said once at the end, naming the first `clips` (by the
    source file data_prep made them from, where `sources` has it, and their id), and kept as
    the MLflow run's tag `svt.decode_failures`, so a run that trained without part of its
    data says so."""
    if not skipped:
        return
    sources = sources or {}
    named = [f"{sources[c]} (clip {c})" if sources.get(c) else f"clip {c}" for c in clips]
    if named and skipped > len(named):
        named.append(f"{skipped - len(named)} more")
    logger.warning(
        "run %s: %d clip%s failed to decode and %s skipped%s; the run trained without them. "
        "The 'skipping clip' warnings (above, or in the Ray workers' logs where this console "
        "does not show them) say why. Check those videos, or prepare the data again with "
        "`svt-ray prep`",
        run_name, skipped, "s" * (skipped != 1), "were" if skipped != 1 else "was",
        f": {', '.join(named)}" if named else "",
    )  # fmt: skip
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri).set_tag(run_id, "svt.decode_failures", str(skipped))
    except Exception as error:  # MLflow down: the warning above stays
        logger.warning(
            "run %s: svt.decode_failures not tagged in MLflow (%s)",
            run_name, hide_password(error, tracking_uri),
        )  # fmt: skip


def log_training_curves(
    tracking_uri: str, run_id: str, run_name: str, metrics_file: Path, out_dir: Path
) -> Path | None:
    """[driver] `training_curves.png` of `metrics_file`, drawn in `out_dir` and logged to the
    MLflow run; None when there is no metrics file here (a local run directory on another
    node) or MLflow did not take it (said; the plot stays in `out_dir`)."""
    import mlflow

    png = plot_training_curves(metrics_file, out_dir / "training_curves.png")
    if png is None:
        return None
    try:
        mlflow.MlflowClient(tracking_uri).log_artifact(run_id, str(png))
    except Exception as error:  # MLflow down: the plot stays in the log directory
        logger.warning(
            "run %s: %s not logged to MLflow (%s)",
            run_name, png, hide_password(error, tracking_uri),
        )  # fmt: skip
        return None
    return png


# -- resuming: the recorded recipe, and where a run may move ------------------------------


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
                f"--resume {run_name}: a resumed run keeps its name; drop --run-name / "
                f"--set train.run_name={value}"
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
    from svt_ray.config import parse_override, validate_config, validate_recorded

    tree = recorded["config"]
    tree.pop("derived", None)
    # The record alone first: a config this version cannot read is the version's doing; a bad
    # value among `flags` (say --workers that do not split the batch) is the user's.
    validate_recorded(
        tree,
        f"--resume {run_name}",
        "Resume it with the svt-ray version that started it, or start a new run",
        recorded.get("svt_ray_version"),
    )
    for item in flags:
        keys, value = parse_override(item)
        key = ".".join(keys)
        if key not in RESUMABLE_SETTINGS:
            raise ConfigError(
                f"--resume keeps the recorded recipe; {key} cannot change (what may: "
                f"{resumable_settings_text()})"
            )
        tree.setdefault(keys[0], {})[keys[1]] = value
    tree["train"]["run_name"] = run_name
    return validate_config(tree)


def check_resumed_data(config: ExperimentConfig, run_name: str, recorded: dict, checksum: str):
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


def check_resumed_recipe(config: ExperimentConfig, run_name: str, recorded: dict) -> None:
    """A run with checkpoints continues with the recipe it has: `pretrain --resume` takes it
    from run.json, but the demo (its fixed run name in a used --workdir) and code calling
    `run_pretraining` pass their own, which would otherwise be dropped without a word (a demo
    with another seed reported the earlier run's checkpoint against a new random init).
    Settings the record lacks (added by a later version) are not compared."""
    if "config" not in recorded:
        return
    changed = recipe_changes(recorded["config"], config, recorded_keys_only=True)
    if changed:
        raise ConfigError(
            f"run {run_name!r} has checkpoints of another recipe ({'; '.join(changed[:5])}); "
            "continue it as it is (`svt-ray pretrain --resume`), or give this one another run "
            "name (the demo: another --workdir)"
        )


def check_resumed_tracking(config: ExperimentConfig, run_name: str, recorded: dict) -> None:
    """A resumed run goes on in its MLflow run, so a --tracking-uri other than the recorded
    one must be that store moved (a server that restored it), holding the run: another store
    was only found lacking it mid-run (\"not reachable\"), left the run KILLED in its own
    store and pointed `mlflow ui` at the new one. Refused before Ray starts; a SQLite file
    that does not exist is refused without creating it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from svt_ray.tracking import absolute_tracking_uri, sqlite_file

    run_id = recorded.get("mlflow_run_id")
    before = ((recorded.get("config") or {}).get("tracking") or {}).get("tracking_uri")
    now = config.tracking.tracking_uri
    if not run_id or not before or absolute_tracking_uri(before) == now:
        return
    missing = now.startswith("sqlite:///") and not sqlite_file(now).exists()
    if not missing:
        try:
            MlflowClient(now).get_run(run_id)
        except MlflowException:
            missing = True
    if missing:
        now, before = hide_password(now), hide_password(before)
        raise ConfigError(
            f"--tracking-uri {now}: run {run_name!r} is MLflow run {run_id} of {before}, which "
            f"this store does not hold; resume it with --tracking-uri {before} (or leave it "
            "out), or move that store there first"
        )


def recipe_changes(
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
