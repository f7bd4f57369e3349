"""`svt-ray demo`: every stage of the project on the embedded default, in minutes on a CPU.

1. synthetic motion-defined action videos (`svt_ray.synthetic`), if not there yet;
2. Parquet shards with a held-out split (`data_prep`), if not there yet;
3. SVT pretraining of the `tiny` preset on local Ray with 2 CPU workers (`svt_ray.train`),
   resumed if a previous demo was interrupted, skipped if it finished;
4. kNN and linear probe of the learned teacher against the same network at random
   initialisation and against raw pixels of one frame (`svt_ray.evaluate`), printed and
   logged to the MLflow run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from pathlib import Path

from svt_ray.config import ConfigError, load_config
from svt_ray.evaluate import (
    describe_evaluation,
    evaluate_backbones,
    format_table,
    initial_row_name,
)
from svt_ray.tracking import METRICS_FILE, viewing_hint

logger = logging.getLogger(__name__)

DEMO_RUN = "demo"
TRAIN_FRACTION = 0.75  # of the clips; data_prep holds the others out for the evaluation
SYNTHETIC_VIDEOS = "synthetic_videos"  # under --workdir: the clips synth makes, then shards


def _stage(number: int, text: str) -> None:
    print(f"\n[{number}/4] {text}", flush=True)


# Settings the demo makes itself, and what to use instead of a --set of them.
DEMO_SETS = {
    "preset": "the demo trains the tiny preset; `svt-ray pretrain --preset` trains another",
    "data.path": "the demo trains and evaluates on the synthetic clips it makes; "
    "`svt-ray pretrain --data` and `svt-ray eval` take yours",
    "train.run_name": f"the demo's run is named {DEMO_RUN!r}, which its re-run resumes; give "
    "another --workdir for another demo",
    "scaling.num_workers": "use --workers",
    "scaling.address": "the demo runs on a local Ray instance; `svt-ray pretrain --address` "
    "joins a cluster",
}


def run_demo(
    workdir: Path,
    num_clips: int,
    workers: int,
    overrides: list[str],
    tracking_uri: str | None = None,
) -> dict:
    from svt_ray import data, train
    from svt_ray.cluster import cpus_per_run, ensure_ray, local_ray_cpus
    from svt_ray.model import check_init_from
    from svt_ray.progress import progress_from_metrics
    from svt_ray.runs import check_writable, local_log_directory, run_directory, run_progress
    from svt_ray.tracking import absolute_tracking_uri, check_tracking_uri

    started = time.perf_counter()
    if num_clips < 1:
        raise ConfigError(f"--clips {num_clips}: give a positive number of synthetic clips to make")
    workdir = workdir.resolve()
    videos, shards = workdir / SYNTHETIC_VIDEOS, workdir / "synthetic_shards"
    flags = [
        f"data.path={shards}",
        f"scaling.num_workers={workers}",
        f"train.storage_path={workdir / 'runs'}",
        f"train.run_name={DEMO_RUN}",
    ]
    if tracking_uri:
        flags.append(f"tracking.tracking_uri={tracking_uri}")
    for item in overrides:  # what the demo sets itself: changed, it would train one thing and
        # evaluate or resume another
        key = item.partition("=")[0].strip()
        if key in DEMO_SETS:
            raise ConfigError(f"--set {key}: {DEMO_SETS[key]}")
    config = load_config("tiny", overrides=[*flags, *overrides])
    batch = config.optim.batch_size
    if num_clips < math.ceil(batch / TRAIN_FRACTION):  # before any clip is made or Ray starts
        raise ConfigError(_too_few_clips(num_clips, batch))
    run_dir = run_directory(config.train.storage_path, DEMO_RUN)
    progress = run_progress(run_dir)
    if progress is not None and (shards / "manifest.json").exists():
        made = json.loads((shards / "manifest.json").read_text())["counts"]["inputs"]
        if made < num_clips:  # said before any clip is made: the run would refuse the data
            raise ConfigError(
                f"{workdir} holds a demo trained on {made} clips; for --clips {num_clips} use "
                "another --workdir (or remove this one)"
            )
    # What `svt-ray pretrain` checks before Ray, checked before the demo makes its data too;
    # a SQLite store once the workdir is made (its database may go there)
    store = absolute_tracking_uri(config.tracking.tracking_uri)
    if not store.startswith("sqlite:"):
        check_tracking_uri(store)
    check_init_from(config.model_copy(deep=True))
    check_writable(workdir, "--workdir")  # after the checks above: a refused demo makes no folder
    if store.startswith("sqlite:"):
        check_tracking_uri(store)

    # Decode actors need CPUs that the Train workers do not hold (ray_notes.md §6.3): on a
    # small machine Ray gets more logical CPUs than cores, so Data is never starved.
    ensure_ray(
        None,
        num_cpus=local_ray_cpus(cpus_per_run(config)),
        include_dashboard=False,
        log_to_driver=False,
    )

    _stage(1, f"synthetic videos -> {videos}")
    stage_2 = functools.partial(_stage, 2, f"Parquet shards -> {shards}")
    prepare_synthetic_data(workdir, config, num_clips, between=stage_2)

    _stage(3, f"SVT pretraining: tiny preset, {workers} Ray Train workers on CPU")
    manifest = data.read_dataset_manifest(str(shards))
    clips = data.training_clips(manifest)
    if clips < batch:  # the held-out split is drawn per clip: it may take more than a quarter
        sharded = (data.split_count(manifest, None), clips)
        raise ConfigError(_too_few_clips(num_clips, batch, sharded))
    metrics_file = local_log_directory(config, DEMO_RUN) / METRICS_FILE
    with progress_from_metrics(  # the workers do not log here: a quiet demo
        metrics_file, DEMO_RUN, config.resolve(clips).derived.total_steps,
        config.train.progress_every_s,
    ):  # fmt: skip
        result = train.run_pretraining(config, resume=progress is not None)

    _stage(4, "evaluation on held-out clips: kNN (k=20) and linear probe")
    start = initial_row_name(result.config)  # random init, or model.init_from's weights
    backbones = {"SVT (learned)": result.checkpoint_path, start: None}
    results = evaluate_backbones(result.config, backbones, str(shards), pixel_baseline=True)
    table = format_table([r.row() for r in results])
    print(describe_evaluation(results, result.config.eval))
    print(table)
    learned = next(r for r in results if r.name == "SVT (learned)")
    baseline = next(r for r in results if r.name == start)
    summary = {
        "knn_top1_learned": learned.knn.top1,
        "knn_top1_random_init": baseline.knn.top1,
        "knn_gain_points": learned.knn.top1 - baseline.knn.top1,
        "minutes": (time.perf_counter() - started) / 60,
    }
    _log_to_run(result, results, table, summary)
    init_from = result.config.model.init_from
    baseline_words = f"their starting point ({init_from})" if init_from else "random initialisation"
    print(
        f"\nSVT features beat {baseline_words} by {summary['knn_gain_points']:+.1f} kNN "
        f"top-1 points ({summary['minutes']:.1f} min in all).\n"
        f"Checkpoint: {result.checkpoint_path}\n"
        f"MLflow run {result.mlflow_run_id}: {viewing_hint(result.config.tracking.tracking_uri)}"
    )
    return summary


def _too_few_clips(num_clips: int, batch: int, sharded: tuple[int, int] | None = None) -> str:
    """The demo's words for a dataset without one global batch of training clips. `sharded`:
    (clips in the shards, of them for training), once data_prep drew the held-out split."""
    if sharded is None:
        held_out, enough = "about a quarter of its clips", math.ceil(batch / TRAIN_FRACTION)
    else:
        total, training = sharded
        held_out = f"{total - training} of the {total} clips in its shards"
        enough = math.ceil(total * batch / training)
    return (
        f"--clips {num_clips}: too few to train on. The demo holds out {held_out} for its "
        f"evaluation and trains in global batches of {batch} clips (optim.batch_size): give "
        f"--clips {enough} or more (a few more to be safe: the held-out clips are drawn clip by "
        "clip)"
    )


def prepare_synthetic_data(workdir: Path, config, num_clips: int, between=None) -> Path:
    """The embedded default dataset under `workdir`: synthetic videos sized for `config`,
    sharded by data_prep with a 25% held-out split. Both steps resume: clips already made and
    shards already written stay, more `num_clips` than before adds clips and shards."""
    from data_prep.cli import main as prep_main
    from svt_ray.synthetic import synth_main

    videos, shards = workdir / SYNTHETIC_VIDEOS, workdir / "synthetic_shards"
    synth_main(
        str(videos),
        num_clips=num_clips,
        num_frames=config.views.clip_frames,
        height=config.data.short_side,
        width=config.data.short_side,
        workers=2,
    )
    if between is not None:
        between()
    code = prep_main(
        [str(videos), str(shards), "--short-side", str(config.data.short_side),
         "--val-fraction", f"{1 - TRAIN_FRACTION:g}", "--min-frames", "8", "--min-side", "16"]
    )  # fmt: skip
    if code == 130:  # Ctrl-C: its shards stay, and the same command goes on from them
        from svt_ray.train import RunInterruptedError

        raise RunInterruptedError(f"Sharding {videos} was interrupted; the shards written stay.")
    if code != 0:  # its own message is above; a traceback would bury it
        raise ConfigError(
            f"data_prep failed (exit code {code}, its message is above) sharding {videos} into "
            f"{shards}"
        )
    inputs = json.loads((shards / "manifest.json").read_text())["counts"]["inputs"]
    if inputs > num_clips:
        print(
            f"{shards} holds {inputs} clips, made by an earlier run for more than the {num_clips} "
            f"asked for; it is used as it is (remove {videos} and {shards} for fewer)"
        )
    return shards


def _log_to_run(result, results, table: str, summary: dict) -> None:
    """The evaluation, added to the finished pretraining run; its status stays FINISHED."""
    from svt_ray.tracking import MLflowTracker

    tracker = MLflowTracker(
        result.config.tracking.tracking_uri,
        result.config.tracking.experiment,
        result.run_name,
        local_dir=Path(result.run_dir),
        run_id=result.mlflow_run_id,
        reopen=False,
    )
    tracker.log_text(table + "\n", "evaluation.md")
    tracker.log_summary(
        {
            f"eval/{re.sub(r'[^A-Za-z0-9_.-]+', '_', row.name).strip('_')}/{metric}": value
            for row in results
            for metric, value in row.row().items()
            if metric != "features"
        }
    )
    tracker.set_tags({f"svt.demo.{k}": f"{v:.2f}" for k, v in summary.items()})
    tracker.close()
