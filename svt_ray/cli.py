"""`svt-ray`: the command line of the project.

Every command that takes an experiment builds it the same way: --preset, then --config (a
YAML file), then --set section.field=value overrides, validated in one place. A bad value
prints one line naming the field and exits with status 2 (1 once a run has started and
stops: bad data found by the run, a diverged loss, a cluster without room), never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from svt_ray import quiet_ray_logs
from svt_ray.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    load_config,
    resumable_settings_text,
)

app = typer.Typer(
    name="svt-ray",
    help="Self-supervised Video Transformer (SVT) pretraining and scaling studies on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs wrap to the terminal, not as written
)
config_app = typer.Typer(help="Inspect and validate experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
tracking_app = typer.Typer(
    help="Send MLflow a run's metrics it lacks (sync), and back up / restore a SQLite MLflow "
    "store (the cluster head's, to the bucket).",
    no_args_is_help=True,
)
app.add_typer(tracking_app, name="tracking")

PresetOption = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help=f"Starting recipe: {', '.join(PRESETS)} (default: the --config file's preset "
        "line, else paper).",
        show_default=False,
    ),
]
# Where a recorded recipe applies (a resumed run, a checkpoint), --preset has no default, so
# that one given for another recipe is refused instead of dropped without a word.
RecipePresetOption = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help=f"Starting recipe: {', '.join(PRESETS)} (default: the --config file's preset "
        "line, else paper; a resumed run or a checkpoint keeps its own).",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file of overrides, applied after the preset."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Dotted override applied last, e.g. --set views.num_local=4 (repeatable; YAML values).",
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def build_config(
    preset: str | None, config: Path | None, overrides: list[str] | None
) -> ExperimentConfig:
    try:
        return load_config(preset, config, overrides or [])
    except ConfigError as error:
        raise fail(str(error)) from None


@config_app.command("show")
def config_show(
    preset: PresetOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    clips: Annotated[
        int | None,
        typer.Option(help="Training clips per epoch: also print the derived batch, lr and steps."),
    ] = None,
) -> None:
    """Print the validated config as YAML (with --clips, the resolved one)."""
    experiment = build_config(preset, config, overrides)
    if clips is not None:
        if clips < 1:  # resolve() would speak of "the dataset", not of the flag
            raise fail(f"--clips {clips}: give the training clips per epoch, 1 or more")
        try:
            experiment = experiment.resolve(clips)
        except ConfigError as error:
            raise fail(str(error)) from None
    typer.echo(experiment.dump(), nl=False)


PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("synth", context_settings=PASSTHROUGH, add_help_option=False)
def synth(ctx: typer.Context) -> None:
    """Generate labelled synthetic action videos (motion-defined classes); --help for options."""
    from svt_ray.synthetic import main as synth_cli

    raise typer.Exit(synth_cli(ctx.args, prog="svt-ray synth"))


@app.command("prep", context_settings=PASSTHROUGH, add_help_option=False)
def prep(ctx: typer.Context) -> None:
    """Shard a folder or manifest of videos into Parquet (same as `python -m data_prep`)."""
    from data_prep.cli import main as prep_cli

    raise typer.Exit(prep_cli(ctx.args, prog="svt-ray prep"))


DataOption = Annotated[
    str | None,
    typer.Option("--data", help="Dataset directory or URI made by `svt-ray prep` (data.path)."),
]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", help="Ray Train workers (scaling.num_workers).")
]
GpusOption = Annotated[
    float | None,
    typer.Option("--gpus-per-worker", help="GPUs per worker; 0 trains on CPU (gloo)."),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to join ('auto' on a cluster node); default: RAY_ADDRESS (set in a "
        "`ray job submit` job) or a new local Ray.",
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri", help="MLflow store; default sqlite:///mlflow.db in this folder."
    ),
]
RecordedTrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow store; default: the one the run was started with (its run.json), or "
        "sqlite:///mlflow.db in this folder for a new run.",
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage", help="Checkpoint root: folder, NFS or s3://... (train.storage_path)."
    ),
]


def _cli_overrides(
    data: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    run_name: str | None = None,
) -> list[str]:
    """Named flags become dotted overrides, so they are validated like --set."""
    pairs = {
        "data.path": data,
        "scaling.num_workers": workers,
        "scaling.gpus_per_worker": gpus_per_worker,
        "scaling.address": address,
        "tracking.tracking_uri": tracking_uri,
        "train.storage_path": storage,
        "train.run_name": run_name,
    }
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def _check_recorded_preset(preset: str | None, recorded: str | None, what: str) -> None:
    if preset is not None and recorded is not None and preset != recorded:
        raise fail(f"--preset {preset}: {what} was made with the {recorded} preset; drop --preset")


@app.command("pretrain")
def pretrain(
    preset: RecipePresetOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    data: DataOption = None,
    workers: WorkersOption = None,
    gpus_per_worker: GpusOption = None,
    address: AddressOption = None,
    tracking_uri: RecordedTrackingOption = None,
    storage: StorageOption = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run-name", help="Stable run id (default: PRESET-seedSEED, e.g. tiny-seed0)."
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue the named run from its latest checkpoint, with its recorded recipe. "
            "Where and how it runs may change: --workers, --gpus-per-worker, --address, "
            "--tracking-uri, --storage, --data, and --set of "
            f"{resumable_settings_text()}; nothing else.",
        ),
    ] = None,
) -> None:
    """Pretrain SVT with Ray Train; checkpoints to --storage, metrics to MLflow."""
    from svt_ray.runs import recorded_config

    flags = _cli_overrides(data, workers, gpus_per_worker, address, tracking_uri, storage, run_name)
    if resume is not None:
        if not resume.strip():  # `--resume "$RUN"` with RUN unset: not a new run
            raise fail("--resume: give the name of the run to continue (PRESET-seedSEED)")
        if config is not None:
            raise fail("--resume continues a run with its recorded config; drop --config")
        experiment = recorded_config(resume, storage or "svt_runs", [*(overrides or []), *flags])
        _check_recorded_preset(preset, experiment.preset, f"run {resume}")
    else:
        experiment = build_config(preset, config, [*(overrides or []), *flags])
    # torch and Ray only now (6-8 s on 2 cores): a mistyped --set is said at once
    from svt_ray.cluster import cpu_training_note
    from svt_ray.train import (
        RunInterruptedError,
        RunStoppedError,
        TrainingDivergedError,
        run_pretraining,
    )

    if note := cpu_training_note(experiment):
        typer.secho(f"note: {note}", err=True, fg=typer.colors.YELLOW)
    try:
        result = run_pretraining(experiment, resume=resume is not None)
    except RunInterruptedError as error:  # Ctrl-C: not a failure; 130 as a shell reports it
        typer.echo(str(error), err=True)
        raise typer.Exit(130) from None
    except ConfigError as error:  # bad input, found before training: 2, as for every command
        raise fail(str(error)) from None
    except (TrainingDivergedError, RunStoppedError) as error:
        raise fail(str(error), code=1) from None
    typer.echo(f"run {result.run_name}: checkpoint {result.checkpoint_path}")
    from svt_ray.tracking import viewing_hint

    hint = viewing_hint(result.config.tracking.tracking_uri)
    typer.echo(f"MLflow run {result.mlflow_run_id}: {hint}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            help="Checkpoint directory, its state.pt, or a file of `svt-ray export`; omit for "
            "random init.",
        ),
    ] = None,
    preset: RecipePresetOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    data: DataOption = None,
    address: AddressOption = None,
) -> None:
    """kNN and linear probe of the teacher backbone on labelled shards (single clip, slow-fast).

    With --checkpoint, the settings it was trained with (clips, probe, data loading) apply, as
    --config and --set change them; --preset applies to random init only."""
    flags = [*(overrides or []), *_cli_overrides(data, address=address)]
    if checkpoint is None:  # before torch and Ray are imported: a mistyped --set is said at once
        experiment = build_config(preset, config, flags)
    else:  # the checkpoint's own config: its architecture, clips and probe, unless --set says
        from svt_ray.evaluate import load_state

        try:
            saved = load_state(checkpoint)
        except (FileNotFoundError, ValueError) as error:
            raise fail(str(error)) from None
        if "config" not in saved:  # e.g. an image ViT's or the reference SVT's weights
            raise fail(
                f"--checkpoint: {checkpoint} is not an svt-ray checkpoint or export (it holds "
                f"{', '.join(map(str, list(saved)[:6]))}, no recorded config); pass a "
                "checkpoint_NNNNNNNN folder, its state.pt, or a file of `svt-ray export`"
            )
        recorded = saved["config"]
        _check_recorded_preset(preset, recorded.get("preset", "paper"), f"checkpoint {checkpoint}")
        experiment = config_for_checkpoint(recorded, config, flags, checkpoint, saved)
    if experiment.data.path is None:
        raise fail("data.path: pass --data with a labelled dataset made by `svt-ray prep`")
    from svt_ray.cluster import ensure_ray, local_ray_cpus
    from svt_ray.data import read_dataset_manifest
    from svt_ray.evaluate import (
        check_eval_data,
        cpus_per_evaluation,
        describe_evaluation,
        evaluate_backbones,
        format_table,
        initial_row_name,
    )

    try:  # a dataset it cannot score is said before Ray starts, not after
        manifest = read_dataset_manifest(experiment.data.path)
        check_eval_data(experiment.data.path, manifest, experiment.eval)
    except ConfigError as error:
        raise fail(str(error)) from None
    ensure_ray(experiment.scaling.address, num_cpus=local_ray_cpus(cpus_per_evaluation(experiment)))
    name = "checkpoint" if checkpoint else initial_row_name(experiment)
    results = evaluate_backbones(experiment, {name: checkpoint}, experiment.data.path)
    typer.echo(describe_evaluation(results, experiment.eval))
    typer.echo(format_table([result.row() for result in results]))


@app.command("export")
def export(
    checkpoint: Annotated[
        str, typer.Argument(help="Checkpoint directory, its state.pt, or a filesystem URI.")
    ],
    out: Annotated[
        str, typer.Argument(help="File or URI to write, e.g. svt_backbone.pt or s3://b/x.pt.")
    ],
    weights: Annotated[
        str, typer.Option("--weights", help="Which network: teacher (what SVT uses) or student.")
    ] = "teacher",
) -> None:
    """Write one backbone of a checkpoint, with its config, for fine-tuning or features
    (`svt_ray.export.load_backbone` reads it back)."""
    from svt_ray.export import WEIGHTS, export_backbone

    if weights not in WEIGHTS:
        raise fail(f"--weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    try:
        summary = export_backbone(checkpoint, out, weights)
    except (OSError, ValueError) as error:  # an OSError names the OUT it failed to write
        raise fail(str(error)) from None
    typer.echo(summary.line())


def config_for_checkpoint(
    recorded: dict,
    config: Path | None,
    overrides: list[str],
    checkpoint: str = "the checkpoint",
    saved: dict | None = None,
) -> ExperimentConfig:
    """The config a checkpoint was trained with (recorded in it), with this command's
    `--config` and `--set` on top, except for the model: a checkpoint is evaluated with the
    architecture it was trained with. `--preset` does not apply."""
    from svt_ray.config import validate_recorded

    dropped = [  # model.depth=5, or the whole section: model={depth: 5}
        item for item in overrides if item.split("=", 1)[0].strip().partition(".")[0] == "model"
    ]
    if dropped:
        typer.echo(
            f"note: {', '.join(dropped)} ignored: a checkpoint is evaluated with the "
            "architecture it was trained with",
            err=True,
        )
    kept = [item for item in overrides if item not in dropped]
    try:
        trained = validate_recorded(
            {key: value for key, value in recorded.items() if key != "derived"},  # recomputed
            f"--checkpoint {checkpoint}",
            "Evaluate it with the svt-ray version that trained it",
            (saved or {}).get("svt_ray_version"),
        ).model
        experiment = load_config(recorded.get("preset", "paper"), config, kept, base=recorded)
    except ConfigError as error:
        raise fail(str(error)) from None
    if experiment.model != trained:
        raise fail(
            f"{config}: its model section differs from the checkpoint's architecture; drop it "
            "to evaluate the checkpoint"
        )
    return experiment


@app.command("demo")
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where the synthetic data, shards and runs go.")
    ] = Path("svt_data"),
    clips: Annotated[
        int, typer.Option(help="Synthetic clips to generate (4 motion classes).")
    ] = 800,
    workers: Annotated[int, typer.Option(help="Ray Train workers (CPU, gloo).")] = 2,
    overrides: SetOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """The whole pipeline on a laptop, from synthetic videos to evaluated features.

    Synthetic videos, shards, SVT pretraining (tiny preset, local Ray, 2 workers), then kNN
    and linear probe of the learned teacher against random init and raw frames.
    """
    from svt_ray.demo import run_demo
    from svt_ray.train import RunInterruptedError, RunStoppedError, TrainingDivergedError

    try:
        run_demo(workdir, clips, workers, overrides or [], tracking_uri)
    except RunInterruptedError as error:
        typer.echo(f"{error} Running the same `svt-ray demo` again continues it too.", err=True)
        raise typer.Exit(130) from None
    except ConfigError as error:
        raise fail(str(error)) from None
    except (TrainingDivergedError, RunStoppedError) as error:
        raise fail(str(error), code=1) from None


@app.command("compare")
def compare(
    study: Annotated[
        str | None, typer.Option("--study", help="Study name (its MLflow parent run).")
    ] = None,
    runs: Annotated[
        str | None,
        typer.Option("--runs", help="Comma-separated MLflow run ids (or run names) to compare."),
    ] = None,
    parent_run: Annotated[
        str | None,
        typer.Option(
            "--parent-run",
            help="With --study: the study's parent run id, when several studies share the name "
            "(the same study run again under another --storage); default: the newest.",
        ),
    ] = None,
    tracking_uri: Annotated[
        str, typer.Option("--tracking-uri", help="MLflow tracking URI of the study.")
    ] = "sqlite:///mlflow.db",
    experiment: Annotated[
        str, typer.Option("--experiment", help="MLflow experiment searched for --study.")
    ] = "svt-ray-studies",
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            help="Folder; results.csv/.md and the PNG plots go to OUTPUT/STUDY (OUTPUT/runs "
            "with --runs).",
        ),
    ] = Path("compare"),
) -> None:
    """Rebuild a study's table and plots from MLflow alone (or compare any runs)."""
    from svt_ray.study_report import collect_study
    from svt_ray.tracking import absolute_tracking_uri, check_tracking_uri

    if (study is None) == (runs is None):
        raise fail("give exactly one of --study NAME or --runs ID,ID,...")
    run_ids = [r.strip() for r in runs.split(",") if r.strip()] if runs is not None else None
    if run_ids == []:  # `--runs ""` or `--runs ,`: not the study named "runs"
        raise fail("--runs: give at least one run id or name, separated by commas")
    tracking_uri = absolute_tracking_uri(tracking_uri)
    try:  # an unreachable server: MLflow would retry for minutes; a missing database: it
        check_tracking_uri(tracking_uri, must_exist=True)  # would leave an empty one behind
    except ConfigError as error:
        raise fail(str(error)) from None
    if parent_run is not None and study is None:
        raise fail("--parent-run picks among the studies named by --study")
    report = collect_study(
        tracking_uri, experiment, study or "runs", run_ids=run_ids, parent_run_id=parent_run
    )
    try:
        files = report.write(output / (study or "runs"))
    except OSError as error:
        raise fail(f"--output {output}: cannot write the report there ({error})") from None
    typer.echo(report.markdown())
    typer.echo(report.summary())
    typer.echo("written: " + ", ".join(str(path) for path in files.values()))


@tracking_app.command("backup")
def tracking_backup(
    database: Annotated[str, typer.Argument(help="The SQLite store: a path or sqlite:///PATH.")],
    destination: Annotated[
        str, typer.Argument(help="Where the copy goes: a path or URI, e.g. s3://b/mlflow.db.")
    ],
    every: Annotated[
        float,
        typer.Option(
            "--every",
            help="Keep running and back up again every this many seconds when the store "
            "changed (0: once).",
        ),
    ] = 0.0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace DESTINATION even when it is a store none of whose runs DATABASE has.",
        ),
    ] = False,
) -> None:
    """Copy a SQLite MLflow store, safely while the server writes, to a path or bucket. A
    DESTINATION none of whose runs the store has is not replaced without --force (checked on
    the first backup: later ones replace this command's own)."""
    import math
    import sqlite3
    import time

    from svt_ray.tracking import (
        SQLITE_HEADER,
        BackupRefused,
        backup_sqlite_store,
        sqlite_file,
        store_state,
    )

    if every < 0 or not math.isfinite(every):
        raise fail(f"--every: {every}; give seconds between backups, or 0 for once")
    source = sqlite_file(database)
    if not source.is_file():
        raise fail(f"DATABASE: no SQLite store at {source}")
    try:
        with open(source, "rb") as file:  # empty: a store a server is creating, backed up as is
            header = file.read(16)
    except OSError as error:
        raise fail(f"DATABASE: cannot read {source} ({error.strerror or error})") from None
    if header and header != SQLITE_HEADER:
        raise fail(f"DATABASE: {source} is not a SQLite database; name the MLflow store's file")
    # A new file renamed over the open one: a server writing to it fails from then on. Local
    # paths only: a bucket is first asked inside the loop, which retries one not answering yet.
    if "://" not in destination or destination.startswith("file://"):
        local = Path(destination.removeprefix("file://")).expanduser()
        if local.resolve() == source.resolve():
            raise fail(
                f"DESTINATION {destination} is the store itself; give another path or bucket"
            )
    copied = None  # store_state (its file's and -wal's) at the last backup that succeeded
    retried = (OSError, ValueError, sqlite3.Error)
    while True:
        state = store_state(source)
        if state != copied:
            try:
                size = backup_sqlite_store(source, destination, force or copied is not None)
            except BackupRefused as error:  # a head that started empty: not retried
                raise fail(f"{error}; pass --force to replace it", 1) from None
            except retried as error:  # a bucket hiccup, a long lock: try again next round
                if not every:
                    raise fail(f"backup of {source} to {destination} failed: {error}", 1) from None
                typer.secho(f"warning: backup to {destination} failed: {error}", err=True)
            else:
                copied = state
                typer.echo(f"backed up {source} to {destination} ({size / 2**20:.1f} MiB)")
        if not every:
            return
        time.sleep(every)


@tracking_app.command("restore")
def tracking_restore(
    source: Annotated[str, typer.Argument(help="A backup: a path or URI.")],
    database: Annotated[
        str, typer.Argument(help="The SQLite store to create: a path or sqlite:///PATH.")
    ],
) -> None:
    """Create a SQLite MLflow store from its backup; does nothing if the store exists or no
    backup does (so a new cluster's head can run it on every start)."""
    from svt_ray.tracking import restore_sqlite_store, sqlite_file

    if sqlite_file(database).is_dir():  # "exists: kept" would say a store is there
        raise fail(f"DATABASE {database} is a folder; name the store's file, e.g. mlflow.db")
    try:
        restored = restore_sqlite_store(source, database)
    except ValueError as error:
        raise fail(str(error), 1) from None
    except OSError as error:  # its folder cannot be made (a file of that name), not writable
        raise fail(f"DATABASE {database}: cannot create it ({error})", 1) from None
    typer.echo(f"restored {database} from {source}" if restored else f"{database}: unchanged")


@tracking_app.command("sync")
def tracking_sync(
    run_name: Annotated[str, typer.Argument(help="The run, as `pretrain --resume` names it.")],
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="The checkpoint root the run was started with: folder, NFS or s3://...; "
            "default svt_runs.",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow store to send the metrics to; default: the one the run was started "
            "with (its run.json).",
        ),
    ] = None,
) -> None:
    """Send MLflow the metrics of a run that it lacks, from the run's metrics.jsonl (after an
    outage that outlasted the run): the one of this machine, or the run directory's copy on
    remote storage when that goes further. A run whose training finished is marked FINISHED
    and gets its training_curves.png, if the outage kept them from MLflow. With a local run
    directory, run it where the run's rank 0 ran."""
    from svt_ray.runs import (
        PROGRESS_FILE,
        RUN_FILE,
        config_from_record,
        fetch_metrics,
        join_uri,
        local_log_directory,
        read_json,
        run_directory,
    )
    from svt_ray.tracking import (
        absolute_tracking_uri,
        check_tracking_uri,
        hide_password,
        sync_metrics,
    )

    storage = storage or "svt_runs"
    run_dir = run_directory(storage, run_name)
    recorded = read_json(join_uri(run_dir, RUN_FILE))
    if recorded is None:
        raise fail(f"run {run_name}: no run.json in {run_dir}; check --storage and the run name")
    total_steps = (recorded["config"].get("derived") or {}).get("total_steps")
    # --storage where the run is now (moved, mounted elsewhere): its metrics are read there
    config = config_from_record(
        recorded, run_name, _cli_overrides(tracking_uri=tracking_uri, storage=storage)
    )
    metrics_file = fetch_metrics(local_log_directory(config, run_name), run_dir)
    if not metrics_file.is_file():
        raise fail(
            f"run {run_name}: no {metrics_file} on this machine; run `svt-ray tracking sync` "
            "on the node where the run's rank 0 trained",
            1,
        )
    uri = absolute_tracking_uri(config.tracking.tracking_uri)
    check_tracking_uri(uri, must_exist=True)
    run_id = recorded["mlflow_run_id"]
    steps = sync_metrics(uri, run_id, metrics_file)
    shown = hide_password(uri)
    if not steps:
        typer.echo(f"run {run_name}: MLflow ({shown}) has every metric of {metrics_file}")
    else:
        typer.echo(
            f"run {run_name}: sent MLflow ({shown}) the values of {len(steps)} step(s) it lacked, "
            f"clips seen {steps[0]}..{steps[-1]}"
        )
    step = (read_json(join_uri(run_dir, PROGRESS_FILE)) or {}).get("step", 0)
    _finish_synced_run(uri, run_id, run_name, metrics_file, step, total_steps)


def _finish_synced_run(
    uri: str, run_id: str, run_name: str, metrics_file: Path, step: int, total_steps: int | None
) -> None:
    """What the end of a run did not get to MLflow in an outage: FINISHED, and the curves.
    `step`: its latest checkpoint's; training finished when that is `total_steps`."""
    import mlflow

    from svt_ray.runs import log_training_curves

    client = mlflow.MlflowClient(uri)
    status = client.get_run(run_id).info.status
    if total_steps is None or step < total_steps:
        if status == "RUNNING" and total_steps is not None:
            typer.echo(
                f"run {run_name}: MLflow says RUNNING; its last checkpoint is step "
                f"{step} of {total_steps}: while it trains that is so, and "
                "if it stopped, `svt-ray pretrain --resume` continues it"
            )
        return
    if status == "RUNNING":
        client.set_terminated(run_id, "FINISHED")
        typer.echo(f"run {run_name}: its training finished; MLflow run {run_id} marked FINISHED")
    if not any(item.path == "training_curves.png" for item in client.list_artifacts(run_id)):
        png = log_training_curves(uri, run_id, run_name, metrics_file, metrics_file.parent)
        if png is not None:
            typer.echo(f"run {run_name}: logged {png.name} to MLflow")


def main() -> None:
    quiet_ray_logs()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_prep.inputs import InputError

    try:
        app()
    except (ConfigError, InputError) as error:  # raised deeper than the option parsing
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
