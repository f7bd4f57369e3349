"""Ray Tune studies: sweeps of config paths, one Ray Train pretraining per trial, and a report.

A study is a grid over config paths (`views.num_local=0,2,4,8`) times seeds. Each Tune trial is
a function trainable that *is* a Train driver (Train V2 style, ray_notes.md §1): it calls
`train.run_pretraining` with the trial's overrides, and a `TuneReportCallback` forwards every
rank-0 report, so ASHA sees the online kNN (`eval.online_every`) against clips seen.

MLflow holds the study: one parent run (tag `svt.study`), one child run per trial
(`mlflow.parentRunId`, tags `svt.trial_id` and `svt.sweep.<path>`), a FAILED child with the
error for a trial that failed before or while training. The results table and the plots are
rebuilt from MLflow alone (`collect_study`), after the sweep and by `svt-ray compare`, so the
two cannot disagree (`study_report.py`).

Re-running a study with the same name and storage restores it (`Tuner.restore`): finished
trials are not run again; unfinished ones resume from their Train checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svt_ray import quiet_ray_logs
from svt_ray.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_override,
    unusable_folder_name,
)
from svt_ray.help_format import HelpFormatter
from svt_ray.study_report import (
    METRIC,
    TIME_ATTR,
    StudyReport,
    collect_study,
    qualified_verdict,
)

# Re-exported: study scripts written before the report moved out import the verdicts from here,
# and studies recorded before it name them `svt_ray.studies:...` (`svt.verdict_fn`).
from svt_ray.study_report import batch_size_verdict as batch_size_verdict
from svt_ray.study_report import best_vs_worst_verdict as best_vs_worst_verdict
from svt_ray.study_report import scaling_verdict as scaling_verdict
from svt_ray.tracking import hide_password, viewing_hint

logger = logging.getLogger(__name__)

# CPUs a trial's Tune function (the Ray Train driver) holds besides its Train run.
TRIAL_DRIVER_CPUS = 0.01
# A custom resource a cluster's on-demand head declares (ray_cluster.yaml) so that the trials'
# drivers run there: Ray Train pins each run's controller to its driver's node, and a spot
# node reclaimed under a driver would end its trial (ray_notes.md §4).
DRIVER_RESOURCE = "TRAIN_DRIVER"

STUDY_FILE = "study.json"

# Settings every shipped study shares on the embedded default (tiny preset, synthetic data):
# 8 passes over the training split for every trial (the demo's budget; on the embedded data
# the online kNN rises mostly between 1,500 and 5,000 clips seen): the same clips seen, up to
# the steps' rounding (a run trains epochs x (clips // batch) steps, batches running across
# epoch ends, so batch 64 sees 4,608 where the others see 4,864); online kNN every 400 clips
# seen, in whole steps (384 at batch 32 and 64), on 300 bank and 200 query clips. On real
# data pass a real budget with --set: optim.epochs, train.checkpoint_every, and a sparser,
# larger online kNN (400 clips is every step at batch 512, and 300 bank clips are under one a
# class of Kinetics-400); README, "Studies", gives values for Kinetics-400.
SMALL_BUDGET = [
    "optim.epochs=8",
    "eval.online_every_clips=400",
    "eval.online_bank_clips=300",
    "eval.online_query_clips=200",
    "train.checkpoint_every=50",
]
# The parent run's count of the trials that errored in Tune at the sweep's last end.
ERRORED_TRIALS_TAG = "svt.errored_trials"


# -- what a study is ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """One swept config path and its values.

    A value may also be a mapping of several config paths that move together (the loss-terms
    study sets two weights per setting); `path` is then just the sweep's name and `labels`
    names each setting in tables and plots.
    """

    path: str
    values: tuple[Any, ...]
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, (str, bytes, dict)) or not isinstance(
            self.values, (tuple, list)
        ):
            raise ConfigError(
                f"sweep {self.path}: values must be a tuple of the settings, e.g. (0.1, 0.3), "
                f"not {self.values!r}"
            )
        object.__setattr__(self, "values", tuple(self.values))  # a list: hashable as a tuple
        if not self.values:
            raise ConfigError(f"sweep {self.path}: give it one value or more")
        if any(isinstance(value, dict) and not value for value in self.values):
            raise ConfigError(f"sweep {self.path}: a setting of several paths names one or more")
        if self.labels is not None and (
            len(self.labels) != len(self.values) or len(set(self.labels)) != len(self.labels)
        ):
            raise ConfigError(
                f"sweep {self.path}: give one label per value, each once ({len(self.values)} "
                f"values, labels {list(self.labels)})"
            )

    def config_paths(self) -> list[str]:
        """The config paths its settings set: a mapping's keys, and its own path for a plain
        value."""
        paths = {path for v in self.values for path in (v if isinstance(v, dict) else [self.path])}
        return sorted(paths)

    def label(self, value: Any) -> Any:
        if self.labels is None:
            return value
        return self.labels[list(self.values).index(value)]

    def grid_values(self) -> list[Any]:
        """The values as Tune's grid holds them: a mapping's label where the sweep gives
        labels (`labelled_settings` maps it back). Tune's status table printed a mapping's
        tail (`...ion_weight': 0.0}`), and its trial folders spelt the mapping out."""
        return [self.label(v) if self._by_label(v) else v for v in self.values]

    def labelled_settings(self) -> dict[str, dict[str, Any]]:
        """{label: mapping} of the values Tune's grid holds by their label."""
        return {self.label(v): v for v in self.values if self._by_label(v)}

    def _by_label(self, value: Any) -> bool:
        return isinstance(value, dict) and self.labels is not None

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """`views.num_local=0,2,4,8` -> Sweep; each value parsed like a --set value."""
        path, sep, raw = text.partition("=")
        if not sep or not raw.strip():
            raise ConfigError(f"--grid {text!r} must look like section.field=v1,v2,...")
        items = [item.strip() for item in _split_values(raw)]
        if "" in items:
            raise ConfigError(f"--grid {text!r} has an empty value (a comma too many?)")
        values = tuple(parse_override(f"{path}={item}")[1] for item in items)
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"--grid {text!r} repeats a value")
        return cls(path.strip(), values)


def _split_values(raw: str) -> list[str]:
    """Split on commas outside brackets, so list values like [4,8] stay whole."""
    items, depth, current = [], 0, ""
    for char in raw:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current]


@dataclass
class StudySpec:
    """What a study sweeps, under which fixed settings, and how to read its answer."""

    name: str
    question: str
    "The claim under test, one sentence (printed and logged)."
    sweeps: list[Sweep]
    fixed: list[str] = field(default_factory=list)
    "Overrides every trial shares (the budget: epochs, batch, ...), before the user's --set."
    verdict: Callable[[StudyReport], str] | None = None
    "The study's report -> one line answering `question` from the data (it may say no)."
    x_label: str | None = None
    "Axis label of the final-metric plot (default: the first swept path)."
    asha: bool = True
    "Default for early stopping; curve-shape studies (batch size, scaling) run the full grid."
    asha_grace_clips: int | None = None
    "Clips seen at ASHA's first rung (default: a quarter of the budget): where curves separate."
    exclusive: bool = False
    "One trial at a time whatever the cluster holds (timing studies must not share it)."

    def __post_init__(self) -> None:
        self.check_sweeps()

    def check_sweeps(self) -> None:
        """Two sweeps of one name, or that set one config path: the later would overwrite
        the earlier in every trial (its values never ran, and a grid of fewer distinct trials
        than counted never counted as finished)."""
        names = [sweep.path for sweep in self.sweeps]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})[0]
            raise ConfigError(
                f"study {self.name}: two sweeps are named {twice}; give all its values in one Sweep"
            )
        setters: dict[str, str] = {}
        for sweep in self.sweeps:
            for path in sweep.config_paths():
                if path in setters:
                    raise ConfigError(
                        f"study {self.name}: sweeps {setters[path]} and {sweep.path} both set "
                        f"{path}; give all its values in one Sweep"
                    )
                setters[path] = sweep.path

    def settings(self) -> list[dict[str, Any]]:
        """Every point of the grid as {sweep path: value} (seeds not included)."""
        paths = [s.path for s in self.sweeps]
        return [
            dict(zip(paths, values, strict=True))
            for values in itertools.product(*(s.values for s in self.sweeps))
        ]


@dataclass
class StudyOptions:
    """How and where a study runs (the scripts' command-line flags)."""

    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    asha: bool = True
    asha_grace_clips: int | None = None
    "Overrides the study's first ASHA rung (clips seen)."
    storage_path: str = "svt_runs"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "svt-ray-studies"
    address: str | None = None
    max_concurrent_trials: int | None = None
    data_path: str | None = None
    workdir: str = "."
    "Where the embedded synthetic dataset is made when no data path is given."
    num_clips: int = 800
    flags: dict[str, str] = field(default_factory=dict)
    "The command-line flag each override of `overrides` came from, where not --set."


class StudyInterruptedError(RuntimeError):
    """The user stopped the study (Ctrl-C) before every trial ended; Tune saved its state."""


# -- the trial: a Tune function trainable that drives one Ray Train run --------------------------


def trial_overrides(trial_config: dict[str, Any]) -> list[str]:
    """The --set items of a trial: the study's base items, then the trial's swept values."""
    swept = []
    by_label = trial_config.get("settings", {})  # a study saved before labels: none
    for path, value in trial_config["sweep"].items():
        if isinstance(value, str) and value in by_label.get(path, {}):
            value = by_label[path][value]
        items = value.items() if isinstance(value, dict) else [(path, value)]
        swept += [f"{key}={json.dumps(item)}" for key, item in items]
    return [*trial_config["base"], *swept, f"train.seed={trial_config['seed']}"]


def _swept_labels(trial_config: dict[str, Any]) -> dict[str, Any]:
    """{sweep path: the trial's value, or its label where the study gives labels}."""
    labels = trial_config.get("labels", {})
    return {
        path: labels.get(path, {}).get(json.dumps(value), value)
        for path, value in trial_config["sweep"].items()
    }


def trial_label(trial_config: dict[str, Any]) -> str:
    """How a trial's progress lines name it: the study, its swept values (labels where the
    study gives them), its seed; e.g. `view_count views.num_local=4 seed 1`."""
    swept = [f"{path}={label}" for path, label in _swept_labels(trial_config).items()]
    return " ".join([trial_config["study"], *swept, f"seed {trial_config['seed']}"])


def trial_config_for(
    trial_config: dict[str, Any],
    placement: dict[str, str],
    trial_id: str,
    cpus_per_trial: float | None = None,
) -> ExperimentConfig:
    """A trial's experiment config: what it studies, where things are, and, when trials share
    the CPUs (`cpus_per_trial`), a cap on its decode actors (`decode_actor_cap`)."""
    overrides = [
        *trial_overrides(trial_config),
        *(f"{path}={value}" for path, value in placement.items()),
        f"train.run_name={trial_config['study']}-{trial_id}",
    ]
    config = load_config(trial_config["preset"], overrides=overrides)
    cap = decode_actor_cap(config, cpus_per_trial)
    if cap is None:
        return config
    logger.info(
        "trial %s: %d decode actor(s), its share of the CPUs the study's trials share "
        "(%.3g each); set data.decode_actors to choose", trial_id, cap, cpus_per_trial,
    )  # fmt: skip
    return load_config(trial_config["preset"], overrides=[*overrides, f"data.decode_actors={cap}"])


def decode_actor_cap(config: ExperimentConfig, cpus_per_trial: float | None) -> int | None:
    """Decode actors for a trial that shares the CPUs with other trials: what its share holds
    after its Train workers, read tasks and Tune driver, and at least the one `cpus_per_run`
    counts. Uncapped, each trial's Ray Data pool grows into every free CPU (two slowly read
    streams on 8 CPUs held all 8 within 10 s), and a trial starting next waits for the CPUs its
    neighbour's decoders hold before its Train workers can start. None: no cap (a trial alone,
    or data.decode_actors set by the user or the grid)."""
    if cpus_per_trial is None or config.data.decode_actors is not None:
        return None
    decode_cpus = config.data.decode_cpus
    spare = cpus_per_trial - trials_per_cluster_cpus(config) + decode_cpus
    return max(1, int(spare / decode_cpus + 1e-9))


def _run_trial(
    trial_config: dict[str, Any], placement: dict[str, str], cpus_per_trial: float | None = None
) -> None:
    """[Tune trial] Build the trial's config and pretrain; record a failure in MLflow.

    `trial_config` says what the trial studies; Tune saves it, and a restored study hands every
    trial the saved one. `placement` says where things are (data, checkpoints, tracking server,
    cluster) and `cpus_per_trial` what share of the CPUs each trial may fill (see
    `trial_config_for`): both come from the study driver running now
    (`ray.tune.with_parameters`), so a study restored on a new cluster logs to the new head,
    not to the address of the old one.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from svt_ray import train

    trial_id = ray.tune.get_context().get_trial_id()
    study = trial_config["study"]
    tags = {
        "svt.study": study,
        "svt.trial_id": trial_id,
        "svt.seed": str(trial_config["seed"]),
        **{
            f"svt.sweep.{path}": json.dumps(label)
            for path, label in _swept_labels(trial_config).items()
        },
    }
    tracking_uri = placement["tracking.tracking_uri"]
    finished = _finished_child_run(tracking_uri, trial_config, trial_id)
    if finished is not None:  # restored study: this trial's run ended before the interruption
        logger.info("trial %s finished before (MLflow run %s): not re-run", trial_id, finished)
        ray.tune.report(dict(finished.data.metrics))
        return
    try:
        config = trial_config_for(trial_config, placement, trial_id, cpus_per_trial)
        result = train.run_pretraining(
            config,
            resume=True,  # a restored trial continues from its Train checkpoint
            parent_run_id=trial_config["parent_run_id"],
            extra_tags=tags,
            callbacks=[TuneReportCallback()],
            cluster_tracking=False,  # the study driver resolved placement's URI for every node
            label=trial_label(trial_config),
        )
        if result.already_finished:  # no Ray Train ran, so its callback reported nothing
            ray.tune.report(result.metrics)
        _clear_earlier_error(tracking_uri, result.mlflow_run_id)
    except Exception as error:
        if _stopped_from_outside(error):
            # Tune stopped the trial (ASHA) or the study driver went away; the driver marks
            # the run KILLED, and a restored study resumes it.
            logger.info("trial %s stopped from outside: %s", trial_id, type(error).__name__)
            return
        _record_failed_trial(tracking_uri, trial_config, trial_id, tags, error)
        raise


def _clear_earlier_error(tracking_uri: str, run_id: str) -> None:
    """A trial that failed before (a lost node) and finished now keeps no error in its run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        if "svt.error" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "svt.error")
    except MlflowException as error:
        logger.warning("run %s: earlier error tag not removed: %s", run_id, error)


def _stopped_from_outside(error: BaseException) -> bool:
    """Whether a trial's training died because Tune stopped the trial.

    Stopping a trial (ASHA, also at its last report: ASHA stops every trial that reaches
    `max_t`) removes its placement group and ends the trial's actor, which kills the Train
    controller started inside it; `run_pretraining` then raises ActorDiedError, saying either
    that the placement group was removed or that the controller's owner exited on purpose.
    Ray gives the reason only in the message. That is not a failure of the trial's settings,
    so it is not recorded as one.
    """
    import ray.exceptions

    if not isinstance(error, ray.exceptions.RayActorError):
        return False
    message = str(error)
    return "placement group was removed" in message or (
        "owner has died" in message and "INTENDED_SYSTEM_EXIT" in message
    )


def _search_runs(tracking_uri: str, experiment: str, filter_string: str):
    """(client, runs of `experiment` matching `filter_string`); the experiment must exist."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client, client.search_runs([experiment_id], filter_string=filter_string)


def _finished_child_run(tracking_uri: str, trial_config: dict, trial_id: str):
    """This trial's FINISHED child run, if a previous study driver completed it."""
    _, runs = _search_runs(
        tracking_uri,
        trial_config["experiment"],
        f"tags.`svt.study` = '{trial_config['study']}' and "
        f"tags.`svt.trial_id` = '{trial_id}' and attributes.status = 'FINISHED'",
    )
    return runs[0] if runs else None


def _record_failed_trial(
    tracking_uri: str, trial_config: dict, trial_id: str, tags: dict, error: Exception
) -> None:
    """A trial that failed before (or while) training keeps a FAILED child run with its error."""
    client, existing = _search_runs(
        tracking_uri,
        trial_config["experiment"],
        f"tags.`svt.trial_id` = '{trial_id}'",
    )
    message = f"{type(error).__name__}: {error}"[:4000]
    if existing and existing[0].info.status == "FINISHED":
        # The run completed before the error (a teardown race): its results stand.
        logger.warning("trial %s: finished run, error after it not recorded: %s", trial_id, message)
        return
    if existing:
        run_id = existing[0].info.run_id
    else:
        run = client.create_run(
            client.get_experiment_by_name(trial_config["experiment"]).experiment_id,
            run_name=f"{trial_config['study']}-{trial_id}",
            tags={**tags, "mlflow.parentRunId": trial_config["parent_run_id"]},
        )
        run_id = run.info.run_id
    client.set_tag(run_id, "svt.error", message)
    client.set_terminated(run_id, "FAILED")


# -- the driver --------------------------------------------------------------------------------


def trials_per_cluster(config: ExperimentConfig, resources: dict[str, float]) -> int:
    """Trials that fit at once, each holding what one pretraining holds (`cpus_per_run`) and
    its Tune driver's sliver."""
    scaling = config.scaling
    fits = int(resources.get("CPU", 1) // trials_per_cluster_cpus(config))
    if scaling.gpus_per_worker:
        fits = min(
            fits, int(resources.get("GPU", 0) // (scaling.num_workers * scaling.gpus_per_worker))
        )
    return max(1, fits)


def trials_at_once(
    spec: StudySpec,
    options: StudyOptions,
    largest: ExperimentConfig,
    resources: dict[str, float],
    on_cluster: bool,
) -> int:
    """`max_concurrent_trials`: 1 for a timing study, --max-concurrent, or what the cluster
    holds now. On a cluster that is said when it limits the grid: an autoscaling cluster
    (ray_cluster.yaml's workers start at 0) holds little until it is given work, and Tune
    starts no more trials than this, so the study would stay this narrow."""
    if spec.exclusive:
        return 1
    if options.max_concurrent_trials:
        return options.max_concurrent_trials
    fits = trials_per_cluster(largest, resources)
    trials = grid_size(spec, options.seeds)
    if on_cluster and fits < trials:
        scaling = largest.scaling
        gpus = scaling.num_workers * scaling.gpus_per_worker
        logger.warning(
            "study %s: %d of %d trials at a time, sized from what the cluster has now (%g CPUs, "
            "%g GPUs; a trial holds %g CPUs%s). An autoscaling cluster starts nodes only for "
            "work it is given: pass --max-concurrent N to run N trials at once",
            spec.name, fits, trials, resources.get("CPU", 0), resources.get("GPU", 0),
            trials_per_cluster_cpus(largest), f" and {gpus:g} GPUs" if gpus else "",
        )  # fmt: skip
    return min(fits, trials)


def trials_running(recorded: dict | None, restoring: bool, concurrent: int) -> int:
    """The trials at once a study runs with: Tune restores the number a study started with
    (`_note_restored_concurrency`), which its study.json keeps; the trials' CPU shares follow
    it, not the number this cluster would suit."""
    if restoring and recorded and recorded.get("max_concurrent_trials"):
        return int(recorded["max_concurrent_trials"])
    return concurrent


def cpus_per_trial(
    options: StudyOptions, resources: dict[str, float], concurrent: int, on_cluster: bool
) -> float | None:
    """The CPUs each of `concurrent` trials may fill (`decode_actor_cap`): the cluster's now,
    shared. None for a trial alone, and where --max-concurrent runs trials on a cluster, whose
    autoscaler adds nodes for what they ask."""
    if concurrent < 2 or (on_cluster and options.max_concurrent_trials):
        return None
    return resources.get("CPU", 1) / concurrent


def trials_per_cluster_cpus(config: ExperimentConfig) -> float:
    """CPUs one trial holds: its pretraining's and its Tune driver's."""
    from svt_ray.cluster import cpus_per_run

    return cpus_per_run(config) + TRIAL_DRIVER_CPUS


def trial_driver_resources(resources: dict[str, float]) -> dict[str, float]:
    """What a trial's Tune function asks for: a sliver of a CPU, and of the head's
    `DRIVER_RESOURCE` where the cluster declares one (ray_cluster.yaml), which keeps the drivers
    off spot nodes."""
    return {
        "CPU": TRIAL_DRIVER_CPUS,
        **({DRIVER_RESOURCE: TRIAL_DRIVER_CPUS} if resources.get(DRIVER_RESOURCE) else {}),
    }


def setting_configs(
    spec: StudySpec, preset: str, overrides: Sequence[str]
) -> dict[str, ExperimentConfig | ConfigError]:
    """Each setting of the grid (as JSON) -> its trials' config, or why the config rejects it."""
    configs: dict[str, ExperimentConfig | ConfigError] = {}
    for sweep in spec.settings():
        trial = {"base": list(overrides), "sweep": sweep, "seed": 0}
        try:
            configs[json.dumps(sweep)] = load_config(preset, overrides=trial_overrides(trial))
        except ConfigError as error:
            configs[json.dumps(sweep)] = error
    return configs


def check_grid(
    spec: StudySpec, preset: str, overrides: Sequence[str]
) -> dict[str, ExperimentConfig | ConfigError]:
    """Before Ray: a grid whose every setting the config rejects (a misspelt path, values of
    the wrong kind) is refused with the first reason; a grid with some invalid settings runs,
    and those fail alone, so it is said which. Returns `setting_configs`."""
    configs = setting_configs(spec, preset, overrides)
    errors = {key: str(v) for key, v in configs.items() if isinstance(v, ConfigError)}
    if errors and len(errors) == len(configs):
        raise ConfigError(
            f"no setting of study {spec.name}'s grid is valid: {next(iter(errors.values()))}"
        )
    for setting, error in errors.items():
        logger.warning("study %s: setting %s will fail: %s", spec.name, setting, error)
    return configs


def largest_trial(
    spec: StudySpec,
    preset: str,
    overrides: Sequence[str],
    configs: dict[str, ExperimentConfig | ConfigError] | None = None,
) -> ExperimentConfig:
    """The config of the grid's trial that holds the most CPUs (`cpus_per_run`); a value the
    config rejects makes a trial that fails alone and holds nothing. `configs`: the grid's
    `setting_configs`, when they are at hand."""
    from svt_ray.cluster import cpus_per_run

    largest = load_config(preset, overrides=overrides)
    if configs is None:
        configs = setting_configs(spec, preset, overrides)
    for config in configs.values():
        if isinstance(config, ExperimentConfig) and cpus_per_run(config) > cpus_per_run(largest):
            largest = config
    return largest


def _study_recipe(
    options: StudyOptions, spec: StudySpec, base: list[str], budget: int, grace: int
) -> dict[str, Any]:
    """What a study studies (its grid, seeds, shared settings, early stopping), without where
    it runs: a restore must not change it, since Tune restores the recorded trials."""
    recipe = {
        "preset": options.preset,
        "seeds": list(options.seeds),
        "asha": options.asha,
        "asha_grace_clips": grace if options.asha else None,
        "budget_clips": budget,
        "overrides": list(base),
        "sweeps": {s.path: [s.label(v) for v in s.values] for s in spec.sweeps},
    }
    return json.loads(json.dumps(recipe))  # as study.json gives it back (tuples are lists)


def _study_recipe_changes(
    recorded: dict, recipe: dict[str, Any], params: dict[str, str]
) -> list[str]:
    """`setting: recorded -> now` for each part of the recipe that differs. A study.json from
    before recipes were recorded is compared on the parent run's params it holds."""
    if "recipe" in recorded:
        before, now = recorded["recipe"], recipe
    else:
        keys = ["preset", "seeds", "asha", "budget_clips", *(k for k in params if "." in k)]
        before = {key: recorded.get("params", {}).get(key) for key in keys}
        now = {key: params[key] for key in keys}
    changes = []
    for key in now:
        if key == "overrides" and isinstance(before.get(key), list):
            changes += _override_changes(before[key], now[key])
        elif before.get(key) != now[key]:
            changes.append(f"{key}: {json.dumps(before.get(key))} -> {json.dumps(now[key])}")
    return changes


def _override_changes(before: list[str], now: list[str]) -> list[str]:
    """The --set settings that differ, by key: the order they were given in is no change
    (a key given twice: its last value counts, as when the config is built)."""

    def settings(items: list[str]) -> dict[str, str]:
        pairs = (item.partition("=") for item in items)
        return {key.strip(): value.strip() for key, _, value in pairs}

    old, new = settings(before), settings(now)
    return [
        f"--set {key}: {old.get(key, '(not set)')} -> {new.get(key, '(not set)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _refuse_changes(spec: StudySpec, study_dir: str, changes: list[str]) -> None:
    if changes:
        raise ConfigError(
            f"study {spec.name} in {study_dir} was started with other settings ("
            + "; ".join(changes)
            + "). Run it with its own settings to continue it, or give the new one "
            "another --name (or --storage) to start a separate study"
        )


def _refuse_changed_flags(
    options: StudyOptions, spec: StudySpec, study_dir: str, recorded: dict | None
) -> None:
    """Before the data is read and Ray starts: the parts of a recorded recipe that need no
    data (preset, seeds, ASHA, --set, grid) compared at once; the budget, which counts the
    data's clips, is compared by `_parent_run`."""
    if not recorded or "recipe" not in recorded:
        return
    now = _study_recipe(options, spec, _study_base(options, spec), 0, 0)
    keys = ["preset", "seeds", "asha", "overrides", "sweeps"]
    before = {key: recorded["recipe"].get(key) for key in keys}
    _refuse_changes(
        spec, study_dir, _study_recipe_changes({"recipe": before}, {k: now[k] for k in keys}, {})
    )


def _refuse_changed_budget_flags(
    options: StudyOptions, spec: StudySpec, study_dir: str, recorded: dict
) -> None:
    """For a finished study run again (its report comes from MLflow, no data is read): the
    flags `_parent_run` would compare through the budget. --asha-grace is compared on the
    recorded budget; more --num-clips than the synthetic folder holds would change the
    budget. Both used to print the old report as if it answered the new flags."""
    recipe = recorded["recipe"]
    changes = []
    grace = asha_grace(spec, options, recipe["budget_clips"]) if options.asha else None
    if grace != recipe.get("asha_grace_clips"):
        changes.append(f"asha_grace_clips: {recipe.get('asha_grace_clips')} -> {grace}")
    if options.data_path is None:
        from svt_ray.demo import SYNTHETIC_VIDEOS
        from svt_ray.synthetic import clips_held

        held = clips_held(str(Path(options.workdir) / SYNTHETIC_VIDEOS))
        if held is not None and options.num_clips > held:
            changes.append(f"--num-clips: {held} synthetic clips -> {options.num_clips}")
    _refuse_changes(spec, study_dir, changes)


def _study_base(options: StudyOptions, spec: StudySpec) -> list[str]:
    """The overrides every trial of the study shares, before where things are."""
    return [*spec.fixed, *options.overrides, f"tracking.experiment={options.experiment}"]


def _parent_params(
    options: StudyOptions, spec: StudySpec, shared: list[str], recipe: dict[str, Any]
) -> dict[str, str]:
    """The parent run's MLflow params (`svt-ray compare` reads the budget and the sweeps)."""
    return {
        "preset": options.preset,
        "seeds": ",".join(map(str, options.seeds)),
        "asha": str(options.asha),
        "asha_grace_clips": str(recipe["asha_grace_clips"]),
        "budget_clips": str(recipe["budget_clips"]),
        "base_overrides": hide_password(" ".join(shared), options.tracking_uri)[:6000],
        **{
            f"sweep.{s.path}": ",".join(json.dumps(s.label(v)) for v in s.values)
            for s in spec.sweeps
        },
    }


def _parent_run(
    options: StudyOptions,
    spec: StudySpec,
    study_dir: str,
    shared: list[str],
    recipe: dict[str, Any],
    recorded: dict[str, Any] | None,
    concurrent: int | None = None,
) -> str:
    """The study's parent MLflow run: created once, found again on restore (`recorded`,
    the study's study.json, None for a new study). A new study's study.json also keeps its
    trials at once (`concurrent`), which Tune keeps when it is continued.

    A restore with another recipe (seeds, grid, --set, ASHA) is refused: Tune would restore
    the recorded trials and drop the new flags without a word."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import join_uri, write_json
    from svt_ray.tracking import experiment_id

    params = _parent_params(options, spec, shared, recipe)
    client = MlflowClient(options.tracking_uri)
    if recorded is not None:
        _refuse_changes(spec, study_dir, _study_recipe_changes(recorded, recipe, params))
        _set_parent_status(options, recorded["parent_run_id"], "RUNNING")
        _log_missing_params(client, recorded["parent_run_id"], params)
        return recorded["parent_run_id"]
    run = client.create_run(
        experiment_id(client, options.experiment, options.tracking_uri),
        run_name=spec.name,
        tags={
            "svt.study": spec.name,
            "svt.study_role": "parent",
            "svt.question": spec.question,
            # what `svt-ray compare` needs to recompute the verdict and label the plots
            **({"svt.verdict_fn": _qualified_name(spec.verdict)} if spec.verdict else {}),
            **({"svt.x_label": spec.x_label} if spec.x_label else {}),
        },
    )
    run_id = run.info.run_id
    try:
        # Before study.json, in one call: logged after it, a first start stopped in between
        # left a parent without its sweeps for good (a restore found study.json and went on),
        # and `svt-ray compare` put every trial in one row.
        client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
        try:
            write_json(
                join_uri(study_dir, STUDY_FILE),
                {
                    "parent_run_id": run_id,
                    "params": params,
                    "recipe": recipe,
                    "max_concurrent_trials": concurrent,
                },
            )
        except OSError as error:
            raise ConfigError(
                f"--storage {options.storage_path}: cannot write {study_dir} ({error}); pass "
                "storage you can write"
            ) from None
    except BaseException:  # no study to find again: its parent run must not stay behind
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
        raise
    return run_id


def _log_missing_params(client, parent_run_id: str, params: dict[str, str]) -> None:
    """The params a restored study's parent run lacks (one a version before this one did
    not log, or a first start stopped before it logged them)."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_run(parent_run_id).data.params
        missing = [Param(key, value) for key, value in params.items() if key not in held]
        if missing:
            client.log_batch(parent_run_id, params=missing)
    except MlflowException as error:  # the store lost it: the study still runs
        logger.warning("study parent run %s: params not logged: %s", parent_run_id, error)


def _note_restored_concurrency(spec: StudySpec, tuner, concurrent: int) -> None:
    """Tune restores a study's `max_concurrent_trials` (its grid's generator is restored with
    it) and cannot be given another: say so when this cluster would size it otherwise."""
    recorded = getattr(
        getattr(tuner._local_tuner, "_tune_config", None), "max_concurrent_trials", None
    )
    if recorded and recorded != concurrent:
        logger.warning(
            "study %s continues with %d trials at a time, as it was started (Tune restores that "
            "number; --max-concurrent cannot change it); %d would suit this cluster%s",
            spec.name, recorded, concurrent,
            ". Trials that find no room wait for it, up to train.wait_for_workers_s, and fail "
            "after that; the same command runs them again" if recorded > concurrent else "",
        )  # fmt: skip


def _set_parent_status(
    options: StudyOptions, parent_run_id: str, status: str, tags: dict[str, str] | None = None
) -> None:
    """RUNNING while the sweep runs (again), FINISHED once reported, KILLED on Ctrl-C;
    `tags` set first (the count of trials Tune saw error, with FINISHED)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(options.tracking_uri)
    try:
        for key, value in (tags or {}).items():
            client.set_tag(parent_run_id, key, value)
        if status == "RUNNING":
            client.update_run(parent_run_id, status)
        else:
            client.set_terminated(parent_run_id, status)
    except MlflowException as error:  # the store lost it: the report still comes
        logger.warning("study parent run %s not marked %s: %s", parent_run_id, status, error)


def asha_grace(spec: StudySpec, options: StudyOptions, budget: int) -> int:
    """Clips seen at ASHA's first rung: the flag's, the study's, or a quarter of the budget."""
    if options.asha_grace_clips is not None:
        return options.asha_grace_clips
    return spec.asha_grace_clips or max(1, budget // 4)


def decode_online_knn_clips(configs: Mapping[str, ExperimentConfig | ConfigError]) -> None:
    """Before the trials: the online kNN clips of every valid setting, decoded once into the
    study's storage (`OnlineKNN.prepare`), where each trial reads them; else every trial
    decoded its own at its start. A dataset without the kNN's splits is refused here."""
    from svt_ray import data
    from svt_ray.evaluate import OnlineKNN, check_eval_data
    from svt_ray.train import online_knn_every

    valid = [c for c in configs.values() if isinstance(c, ExperimentConfig) and online_knn_every(c)]
    manifests: dict[str, dict] = {}
    for config in valid:
        path = config.data.path
        if path not in manifests:
            manifests[path] = data.read_dataset_manifest(path)
        check_eval_data(path, manifests[path], config.eval)
    if valid:
        OnlineKNN.prepare(valid)


def check_grace_after_first_knn(
    grace: int, configs: dict[str, ExperimentConfig | ConfigError], refuse: bool = True
) -> None:
    """Refuse (or, with `refuse` False, warn of) a first ASHA rung before some trial's first
    online kNN after its start: every report carries the latest kNN, so that rung would stop
    trials on the kNN of their initial weights (a real-data budget's sparse
    `eval.online_every_clips` under a study's grace). A grace given by the flag or the study
    is refused; the default one, a quarter of the budget, is only warned of, so that a study
    recorded with it goes on as it started."""
    from svt_ray.train import online_knn_every

    first = max(
        (
            online_knn_every(config) * config.optim.batch_size
            for config in configs.values()
            if isinstance(config, ExperimentConfig)
        ),
        default=0,
    )
    if grace < first:
        message = (
            f"--asha-grace: ASHA's first rung at {grace} clips seen comes before a trial's "
            f"first online kNN of its training (at {first} clips seen: "
            "eval.online_every_clips), so it would stop trials on the kNN of their initial "
            f"weights; pass --asha-grace {2 * first} (two evaluations) or more, a lower "
            "eval.online_every_clips, or --no-asha"
        )
        if refuse:
            raise ConfigError(message)
        logger.warning("%s", message)


def asha_scheduler(budget: int, grace: int):
    """ASHA with rungs at grace, 2 x grace, ... below the budget. A trial that reaches the
    budget ends by itself: stopped there (Ray's default), it was killed while its run was
    finishing (last metrics, curves, run status). And a rung at the budget itself, where
    max_t=budget put one whenever grace x 2^k is the budget (a quarter of it, the default),
    judged a trial's last report (`stop_last_trials` does not keep that rung), so a trial
    that trained to the end could be stopped there and reported as stopped early. (A trial
    whose batch leaves it short of the budget can still have its last report be its first
    past a rung, when a rung lies between its last two reports.)"""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=budget - 1,
        grace_period=grace,
        reduction_factor=2,
        stop_last_trials=False,
    )


def _qualified_name(function: Callable) -> str:
    return f"{function.__module__}:{function.__qualname__}"


def run_study(spec: StudySpec, options: StudyOptions) -> StudyReport:
    """Run (or restore) the study, then report it from MLflow."""
    import ray
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler

    from svt_ray.cluster import (
        check_local_gpus,
        cpu_training_note,
        cpus_per_run,
        ensure_ray,
        joins_a_cluster,
        local_ray_cpus,
        warn_node_local_paths,
    )
    from svt_ray.model import check_init_from
    from svt_ray.runs import (
        absolute_path,
        check_remote_storage,
        check_writable,
        join_uri,
        read_json,
        storage_root,
    )
    from svt_ray.tracking import absolute_tracking_uri, check_tracking_uri, cluster_tracking_uri
    from svt_ray.train import online_knn_every

    # flags wrong on their own, before a recorded study is compared with them
    if options.asha_grace_clips is not None and not options.asha:
        logger.warning("study %s: --asha-grace is ignored without ASHA (--no-asha)", spec.name)
    if options.asha and options.asha_grace_clips is not None and options.asha_grace_clips < 1:
        raise ConfigError(f"--asha-grace {options.asha_grace_clips}: give clips seen, 1 or more")
    options.tracking_uri = absolute_tracking_uri(options.tracking_uri)
    check_tracking_uri(options.tracking_uri)
    storage = storage_root(absolute_path(options.storage_path))
    check_remote_storage(storage)
    study_dir = join_uri(storage, spec.name)
    recorded = read_json(join_uri(study_dir, STUDY_FILE))  # None: a new study
    recorded_overrides = ((recorded or {}).get("recipe") or {}).get("overrides", [])
    _refuse_swept_overrides(spec, options.overrides, recorded_overrides, options.flags)
    _refuse_changed_flags(options, spec, study_dir, recorded)
    if recorded is not None and _ended_without_failures(options, spec, recorded):
        _refuse_changed_budget_flags(options, spec, study_dir, recorded)
        logger.info(
            "study %s finished before, every trial with it (%s): its report is rebuilt from "
            "MLflow, nothing runs. To run it again, give it another --name (or --storage)",
            spec.name, study_dir,
        )  # fmt: skip
        return _final_report(spec, options, recorded["parent_run_id"], study_dir, publish=False)
    if options.data_path is not None:  # a wrong --data fails here, before Ray starts
        from svt_ray import data

        data.read_dataset_manifest(options.data_path)
    probe = load_config(options.preset, overrides=options.overrides)
    shared_recipe = [*spec.fixed, *options.overrides]
    configs = check_grid(spec, options.preset, shared_recipe)
    if online_knn_every(load_config(options.preset, overrides=shared_recipe)) == 0:
        raise ConfigError(
            "eval.online_every_clips: studies compare online kNN curves; set it (or "
            "eval.online_every) above 0: the shipped scripts get it from fixed=SMALL_BUDGET "
            "(svt_ray.studies); a --set eval.online_every_clips=0, or a script without that "
            "budget, turns it off"
        )
    if options.data_path is None:  # the synthetic clips go there: a folder we can write
        check_writable(Path(options.workdir), "--workdir")
    # Locally, room for the largest trial (the scaling study's 2 workers) plus its driver's
    # sliver: without the sliver, 4 CPUs left Ray Data's read tasks 0.99 of the 1 CPU they
    # ask for, and a 2-worker trial waited forever.
    largest = largest_trial(spec, options.preset, shared_recipe, configs)
    ensure_ray(
        options.address,
        num_cpus=local_ray_cpus(cpus_per_run(largest) + TRIAL_DRIVER_CPUS),
    )
    if note := cpu_training_note(largest):  # the trials' drivers see no GPU: said here
        logger.warning("study %s: %s", spec.name, note)
    if not joins_a_cluster(options.address):  # trials asking for GPUs it lacks would wait
        check_local_gpus(largest)
    else:  # trials and their Train workers log from other nodes
        options.tracking_uri = cluster_tracking_uri(
            options.tracking_uri, ray.util.get_node_ip_address()
        )
        warn_node_local_paths({
            "--data": options.data_path,
            "--workdir": None if options.data_path else options.workdir,  # the synthetic data
            "--storage": storage,
        })  # fmt: skip
    data_path = options.data_path
    if data_path is None:  # the embedded default: synthetic videos, made once
        from svt_ray.demo import prepare_synthetic_data
        from svt_ray.train import RunInterruptedError

        try:
            data_path = str(
                prepare_synthetic_data(Path(options.workdir).resolve(), probe, options.num_clips)
            )
        except RunInterruptedError as error:  # Ctrl-C while its data was made
            raise StudyInterruptedError(
                f"study {spec.name} interrupted before its first trial: {error} Run the same "
                "command again to continue it."
            ) from None
    base = _study_base(options, spec)
    check_init_from(probe)  # before any trial: each would fail on its own
    placement = {  # where things are: this driver's, also for the trials of a restored study
        "data.path": absolute_path(data_path),
        **({"model.init_from": probe.model.init_from} if probe.model.init_from else {}),
        "train.storage_path": join_uri(study_dir, "runs"),
        "tracking.tracking_uri": options.tracking_uri,
        **({"scaling.address": options.address} if options.address else {}),
    }
    shared = [*base, *(f"{path}={value}" for path, value in placement.items())]
    probe = load_config(options.preset, overrides=shared)  # the study's shared settings are valid
    budget = _budget_clips(probe)
    grace = asha_grace(spec, options, budget)
    if options.asha and not 0 < grace < budget:
        raise ConfigError(
            f"--asha-grace: ASHA's first rung at {grace} clips seen must lie inside the "
            f"budget of {budget} clips per trial; pass a lower --asha-grace, --no-asha, or "
            "raise optim.epochs"
        )
    if options.asha:
        explicit = options.asha_grace_clips is not None or spec.asha_grace_clips is not None
        check_grace_after_first_knn(grace, configs, refuse=explicit)
    decode_online_knn_clips(setting_configs(spec, options.preset, shared))
    recipe = _study_recipe(options, spec, base, budget, grace)
    resources = dict(ray.cluster_resources())
    on_cluster = joins_a_cluster(options.address)
    if not on_cluster:  # local Ray was given extra logical CPUs: count real cores
        resources["CPU"] = min(resources.get("CPU", 1), os.cpu_count() or 1)
    concurrent = trials_at_once(spec, options, largest, resources, on_cluster)
    parent_run_id = _parent_run(options, spec, study_dir, shared, recipe, recorded, concurrent)
    restoring = ray.tune.Tuner.can_restore(study_dir)
    running = trials_running(recorded, restoring, concurrent)

    param_space = {
        "study": spec.name,
        "preset": options.preset,
        "base": base,
        "parent_run_id": parent_run_id,
        "experiment": options.experiment,
        "seed": ray.tune.grid_search(list(options.seeds)),
        "sweep": {s.path: ray.tune.grid_search(s.grid_values()) for s in spec.sweeps},
        "settings": {s.path: s.labelled_settings() for s in spec.sweeps if s.labelled_settings()},
        "labels": {
            s.path: {json.dumps(v): s.label(v) for v in s.values} for s in spec.sweeps if s.labels
        },
    }
    scheduler = asha_scheduler(budget, grace) if options.asha else FIFOScheduler()
    logger.info(
        "study %s: %d trials (%d settings x %d seeds), %d clips seen each%s, %d at a time",
        spec.name, grid_size(spec, options.seeds), len(spec.settings()), len(options.seeds),
        budget, f" (ASHA from {grace} on may stop them earlier)" if options.asha else "",
        concurrent,
    )  # fmt: skip
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            _run_trial,
            placement=placement,
            cpus_per_trial=cpus_per_trial(options, resources, running, on_cluster),
        ),
        trial_driver_resources(resources),
    )
    run_config = ray.tune.RunConfig(
        name=spec.name,
        storage_path=storage,
        failure_config=ray.tune.FailureConfig(max_failures=0),
        callbacks=[_run_closer(options, parent_run_id)],
    )
    started = time.perf_counter()
    if restoring:
        logger.info("restoring study %s from %s (finished trials are kept)", spec.name, study_dir)
        # A trial that errored runs again: a lost node or a full disk passes, and one whose
        # settings are invalid fails again at once (its FAILED child run is reused).
        tuner = ray.tune.Tuner.restore(
            study_dir, trainable, resume_unfinished=True, resume_errored=True,
            restart_errored=False,
        )  # fmt: skip
        # Tune unpickles the old driver's callbacks, whose tracking URI may name the old head.
        if getattr(tuner, "_local_tuner", None) is not None:  # None under Ray Client
            tuner._local_tuner.get_run_config().callbacks = run_config.callbacks
            _note_restored_concurrency(spec, tuner, concurrent)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode="max", scheduler=scheduler, max_concurrent_trials=concurrent
            ),
            run_config=run_config,
        )
    results, interrupted = _fit_noting_interruption(tuner)
    _close_stopped_runs(options, parent_run_id)
    if interrupted:  # Tune stopped its trials and saved its state
        _set_parent_status(options, parent_run_id, "KILLED")
        _, finished = _search_runs(
            options.tracking_uri, options.experiment,
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        )  # fmt: skip
        raise StudyInterruptedError(
            f"study {spec.name} interrupted: {len(finished)} of "
            f"{grid_size(spec, options.seeds)} trials finished. Run the same command again to "
            "continue it: finished trials are kept, the others resume from their latest "
            "checkpoints (a trial stopped before its first starts over)."
        )
    errors = len(results.errors)
    logger.info("study %s: %d trials, %d failed, %.1f min", spec.name, len(results), errors,
                (time.perf_counter() - started) / 60)  # fmt: skip
    report = _final_report(spec, options, parent_run_id, study_dir, publish=True)
    _set_parent_status(options, parent_run_id, "FINISHED", {ERRORED_TRIALS_TAG: str(errors)})
    return report


def _final_report(
    spec: StudySpec, options: StudyOptions, parent_run_id: str, study_dir: str, publish: bool
) -> StudyReport:
    """The study's report from MLflow, with the verdict of the spec at hand, written to
    `STORAGE/NAME/report/` (a bucket's study: `WORKDIR/report/`) and, with `publish`, logged
    to the parent run."""
    report = collect_study(
        options.tracking_uri,
        options.experiment,
        spec.name,
        parent_run_id=parent_run_id,
        recompute_verdict=False,
        sweep_ended=True,
    )
    report.verdict = qualified_verdict(report, spec.verdict(report)) if spec.verdict else ""
    report.x_label = spec.x_label or report.x_label
    folder = Path(study_dir if "://" not in study_dir else options.workdir) / "report"
    report.files = report.publish(folder) if publish else report.write(folder)
    return report


def _ended_without_failures(options: StudyOptions, spec: StudySpec, recorded: dict) -> bool:
    """Whether the recorded study ended (its parent run FINISHED) with a run for every trial,
    each FINISHED or stopped by ASHA (KILLED). Run again, it would start Ray and Tune only to
    restore trials that all ended; one that failed is tried again (a lost node passes), so a
    study with a failed trial is restored."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    parent_run_id = recorded.get("parent_run_id")
    if not parent_run_id or "recipe" not in recorded:  # an older study.json: compared later
        return False
    client = MlflowClient(options.tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
        # Tune's count of errored trials: a driver stopped before its error callback marked a
        # trial whose actor died (out of memory, a lost node) FAILED left it RUNNING.
        if parent.info.status != "FINISHED" or parent.data.tags.get(ERRORED_TRIALS_TAG) != "0":
            return False
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
        )
    except MlflowException:  # another store, or the run was deleted: the study runs as before
        return False
    trials = {run.data.tags.get("svt.trial_id") for run in children}
    return len(trials) == grid_size(spec, options.seeds) and all(
        run.info.status in ("FINISHED", "KILLED") for run in children
    )


def _fit_noting_interruption(tuner) -> tuple[Any, bool]:
    """`tuner.fit()`, and whether Tune stopped on Ctrl-C (SIGINT, or SIGUSR1).

    Tune says so only in a log line, and its results look like those of a finished sweep
    (the stopped trials end TERMINATED). But `fit()`, in the main thread, installs a SIGINT
    handler that puts the previous one back when it fires, and leaves itself installed
    otherwise: the handler in place after `fit()` tells, and the previous one is put back.
    """
    import signal
    import threading

    watched = threading.current_thread() is threading.main_thread() and os.environ.get(
        "TUNE_DISABLE_SIGINT_HANDLER", "0"
    ) in ("", "0")
    before = signal.getsignal(signal.SIGINT)
    tune_log = logging.getLogger("ray.tune.tune")
    hint = _WithoutRestoreHint()
    tune_log.addFilter(hint)
    try:
        results = tuner.fit()
    finally:
        tune_log.removeFilter(hint)
    if not watched:
        return results, False
    interrupted = signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, before)  # a later Ctrl-C interrupts this process again
    return results, interrupted


class _WithoutRestoreHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(path=..., trainable=...)" after a
    Ctrl-C: the study says which command continues it (`StudyInterruptedError`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def _close_stopped_runs(
    options: StudyOptions,
    parent_run_id: str,
    trial_id: str | None = None,
    error: str | None = None,
) -> None:
    """A child run still RUNNING after its trial ended (of one trial, or after the sweep of
    all) was a trial that Tune stopped (ASHA) and killed mid-run: mark it KILLED, ending when
    it last logged a step (not now), so its wall time in the report is its own. With `error`
    (Tune saw the trial error: its process died, out of memory or with its node) it is FAILED
    with that error, not taken for a trial ASHA stopped."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    if trial_id is not None:
        query += f" and tags.`svt.trial_id` = '{trial_id}'"
    client, runs = _search_runs(options.tracking_uri, options.experiment, query)
    for run in runs:
        logged = client.get_metric_history(run.info.run_id, "loss")
        last = max((metric.timestamp for metric in logged), default=None)
        if error is not None:
            client.set_tag(run.info.run_id, "svt.error", error[:4000])
        client.set_terminated(run.info.run_id, "KILLED" if error is None else "FAILED", last)


def _trial_error(trial) -> str:
    """One line of why Tune saw a trial error: the last line of the error file Tune has just
    written beside the driver (`get_error()` reads the storage's copy, synced later: none yet,
    or the error before)."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(errors="replace")
        else:
            text = str(trial.get_error() or "")
    except Exception:  # the storage lost it: the reason stays general
        pass
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the trial's process ended with an error"


def _run_closer(options: StudyOptions, parent_run_id: str):
    """A Tune callback that closes a stopped trial's child run as soon as Tune ends the
    trial, so that MLflow shows only the trials really running while the study goes on."""
    import ray.tune

    class CloseStoppedRun(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, _trial_error(trial))

        def _close(self, trial, error: str | None) -> None:
            try:
                _close_stopped_runs(options, parent_run_id, trial.trial_id, error)
            except Exception as error:  # the sweep's end closes it anyway
                logger.warning("trial %s: child run not closed: %s", trial.trial_id, error)

    return CloseStoppedRun()


def _budget_clips(config: ExperimentConfig) -> int:
    """Clips seen by one trial: epochs x training clips (equal for every batch size)."""
    from svt_ray import data

    manifest = data.read_dataset_manifest(config.data.path)
    return int(config.optim.epochs * data.training_clips(manifest))


# -- the scripts' shared command line ------------------------------------------------------------


class StudyHelp(HelpFormatter):
    """The study's own settings (the epilog) keep their lines, as `study_help_epilog` wrapped
    them."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:  # the question: wrapped as argparse does
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


def study_help_epilog(spec: StudySpec) -> str:
    """What the study runs by default, for --grid and --set: its grid, fixed settings and ASHA."""
    import textwrap

    lines = ["the study's grid (--grid PATH=V1,V2, repeatable, replaces all of it):"]
    for sweep in spec.sweeps:

        def shown(value: Any, sweep: Sweep = sweep) -> str:
            if not isinstance(value, dict):
                return json.dumps(value)
            settings = ", ".join(f"{path}={json.dumps(v)}" for path, v in value.items())
            return f"{sweep.label(value)} ({settings})"

        values = " | ".join(shown(value) for value in sweep.values)
        lines += textwrap.wrap(f"{sweep.path}: {values}", 78, initial_indent="  ",
                               subsequent_indent="    ")  # fmt: skip
    lines.append(
        "fixed settings of every trial (a --set of the key wins; of a swept path, refused):"
    )
    fixed = {item.partition("=")[0]: item for item in spec.fixed}  # the last of a key counts
    lines += textwrap.wrap(" ".join(fixed.values()) or "none", 78, initial_indent="  ",
                           subsequent_indent="  ")  # fmt: skip
    grace = (
        f"first rung at {spec.asha_grace_clips} clips seen"
        if spec.asha_grace_clips
        else "first rung at a quarter of the budget"
    )
    asha = f"on, {grace} (--asha-grace, --no-asha)" if spec.asha else "off (--asha turns it on)"
    lines.append(f"early stopping (ASHA): {asha}")
    return "\n".join(lines) + "\n"


def study_main(spec: StudySpec, argv: Sequence[str] | None = None, **defaults: Any) -> int:
    """`python studies/<name>.py [flags]`: parse, run, print the summary. Exit 0 if any trial
    finished, 1 if none did, 2 on a bad flag, 130 if interrupted (Ctrl-C)."""
    import argparse

    quiet_ray_logs()

    from data_prep.inputs import InputError

    # --grid and --name change this run's copy, not the script's
    spec = dataclasses.replace(spec, sweeps=list(spec.sweeps), fixed=list(spec.fixed))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=spec.question, epilog=study_help_epilog(spec), formatter_class=StudyHelp
    )
    parser.add_argument("--preset", default=defaults.get("preset", "tiny"),
                        help="starting recipe of every trial (tiny, paper, reference_code)")  # fmt: skip
    parser.add_argument("--data", help="data_prep output (local path or URI); default: synthetic "
                        "clips made once in --workdir")  # fmt: skip
    swept = {path for sweep in spec.sweeps for path in sweep.config_paths()}

    def unless_swept(path: str, text: str) -> str:  # a flag of a swept path is refused
        return (
            f"this study sweeps {path}: refused (--grid changes the sweep)"
            if path in swept
            else text
        )

    parser.add_argument(
        "--workers", type=int,
        help=unless_swept("scaling.num_workers", "Train workers per trial (default: the preset's)"),
    )  # fmt: skip
    parser.add_argument(
        "--gpus-per-worker", type=float,
        help=unless_swept("scaling.gpus_per_worker", "GPUs per Train worker (default: 0)"),
    )  # fmt: skip
    parser.add_argument("--address", help="Ray cluster address ('auto' on a cluster node); "
                        "default: RAY_ADDRESS or a new local Ray")  # fmt: skip
    parser.add_argument("--grid", action="append", default=[],
                        help="replace the study's grid: section.field=v1,v2 (repeatable: one "
                        "per swept path; the paths not given are no longer swept)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra section.field=value for every trial (not a swept one)")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (repeats)")
    parser.add_argument("--asha", action=argparse.BooleanOptionalAction, default=spec.asha,
                        help="ASHA early stopping on online kNN (--no-asha: the full grid)")  # fmt: skip
    parser.add_argument("--asha-grace", type=int, metavar="CLIPS",
                        help="clips seen at ASHA's first rung (default: the study's, or a "
                             "quarter of the budget)")  # fmt: skip
    parser.add_argument("--storage", default="svt_runs", help="Tune/Train storage path or URI")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store")
    parser.add_argument("--experiment", default="svt-ray-studies",
                        help="MLflow experiment of the parent and child runs")  # fmt: skip
    parser.add_argument("--name", default=spec.name, help="study name (restore key)")
    parser.add_argument("--max-concurrent", type=int,
                        help="trials at once (default: as many as the cluster holds when the "
                        "study starts; kept when it is continued"
                        + ("; this study runs one at a time whatever is given)" if spec.exclusive
                           else ")"))  # fmt: skip
    parser.add_argument("--num-clips", type=int, default=800, help="synthetic clips when no --data")
    parser.add_argument("--workdir", default=".", help="where the synthetic clips are made "
                        "when no --data (synthetic_videos/, synthetic_shards/)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            raise ConfigError(
                f"--seeds {args.seeds}: comma-separated integers, e.g. 0,1,2"
            ) from None
        if not seeds:
            raise ConfigError("--seeds: give at least one seed, e.g. 0 or 0,1,2")
        if any(seed < 0 for seed in seeds):  # train.seed refuses it in every trial
            raise ConfigError(f"--seeds {args.seeds}: seeds are 0 or more")
        if len(set(seeds)) != len(seeds):  # a repeat would count as another seed in the s.e.
            raise ConfigError(f"--seeds {args.seeds} repeats a seed")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent {args.max_concurrent}: give 1 or more")
        if args.num_clips < 1:
            raise ConfigError(f"--num-clips {args.num_clips}: give 1 or more")
        if args.grid:
            shipped = [sweep.path for sweep in spec.sweeps]
            grid = [Sweep.parse(item) for item in args.grid]
            _refuse_grid_of_named_settings(spec, grid)
            spec.sweeps = grid
            if [sweep.path for sweep in spec.sweeps] != shipped:  # its label fits its own axes
                spec.x_label = None
            spec.question += f" (this run's grid: {'; '.join(args.grid)})"  # not the shipped
            paths = [sweep.path for sweep in spec.sweeps]
            if len(set(paths)) != len(paths):  # the second would replace the first
                raise ConfigError(
                    f"--grid names {sorted({p for p in paths if paths.count(p) > 1})[0]} twice; "
                    "give all its values in one --grid PATH=V1,V2,..."
                )
        if unusable_folder_name(args.name):  # a folder's name, and its trials' runs' too
            raise ConfigError(f"--name {args.name!r}: a study's folder name, without / or \\")
        spec.name = args.name
        overrides = list(args.overrides)
        flags = {}
        for flag, path, value in (
            ("--workers", "scaling.num_workers", args.workers),
            ("--gpus-per-worker", "scaling.gpus_per_worker", args.gpus_per_worker),
        ):
            if value is not None:
                overrides.append(f"{path}={value}")
                flags[overrides[-1]] = f"{flag} {value:g}"  # as typed: 1, not 1.0
        options = StudyOptions(
            preset=args.preset,
            overrides=overrides,
            seeds=seeds,
            asha=args.asha,
            asha_grace_clips=args.asha_grace,
            storage_path=args.storage,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            address=args.address,
            max_concurrent_trials=args.max_concurrent,
            flags=flags,
            data_path=args.data,
            num_clips=args.num_clips,
            workdir=args.workdir,
        )
        # before torch, Ray and MLflow are imported (6-8 s on 2 cores): a mistyped --set
        load_config(options.preset, overrides=[*spec.fixed, *options.overrides])
        report = run_study(spec, options)
    except (ConfigError, InputError) as error:  # InputError: a path or URI that cannot be read
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StudyInterruptedError as error:  # no report: its verdict would read a partial grid
        print(error, file=sys.stderr)
        return 130
    print(report.markdown())
    print(report.summary())
    print("report: " + ", ".join(str(Path(path).resolve()) for path in report.files.values())
          + " (and the parent MLflow run's artifacts)")  # fmt: skip
    print(f"MLflow: {viewing_hint(options.tracking_uri)}  (parent run "
          f"{report.parent_run_id}, experiment {options.experiment})")  # fmt: skip
    return 0 if any(t.status in ("FINISHED", "KILLED") for t in report.trials) else 1


def _refuse_grid_of_named_settings(spec: StudySpec, grid: Sequence[Sweep]) -> None:
    """`--grid loss_terms=...`: the name of a sweep whose settings set several config paths
    is no config path (its error came only after Ray's start, as an unknown key)."""
    named = {
        sweep.path: sweep.config_paths()
        for sweep in spec.sweeps
        if any(isinstance(value, dict) for value in sweep.values)
    }
    for sweep in grid:
        if sweep.path in named and sweep.path not in named[sweep.path]:
            paths = named[sweep.path]
            raise ConfigError(
                f"--grid {sweep.path}: the study's name for settings of several config paths "
                f"({', '.join(paths)}), not a path itself; --grid takes config paths, e.g. "
                f"--grid {paths[0]}=V1,V2 (each --grid path is crossed with the others)"
            )


def _refuse_swept_overrides(
    spec: StudySpec,
    overrides: Sequence[str],
    recorded: Sequence[str] = (),
    flags: Mapping[str, str] | None = None,
) -> None:
    """A flag or --set for a path the study sweeps would be overridden by every trial's own
    value (`scaling.py --workers 4` still ran 1 and 2 workers): refused, naming the sweep and
    the flag given (`flags`: override -> flag), unless the study recorded it before this check
    (it continues as it was started)."""
    swept = {path: sweep for sweep in spec.sweeps for path in sweep.config_paths()}
    for item in overrides:
        path = ".".join(parse_override(item)[0])
        if path in swept and item not in recorded:
            values = ",".join(json.dumps(v) for v in swept[path].values)
            given = (flags or {}).get(item, f"--set {item}")
            raise ConfigError(
                f"{given}: study {spec.name} sweeps {path} itself ({swept[path].path}={values}); "
                f"drop it, or sweep other values with --grid {path}=V1,V2 (it replaces the "
                "study's grid)"
            )


def grid_size(spec: StudySpec, seeds: Sequence[int]) -> int:
    """Trials of a study: its settings times its seeds."""
    return len(spec.settings()) * len(seeds)
