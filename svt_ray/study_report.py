"""A study's report, rebuilt from MLflow alone: its trials and their curves, the results table
(CSV and Markdown), the plots, and the verdicts, the answers computed from the data.

`collect_study` reads a study's parent run and its children (or any runs, for `svt-ray
compare --runs`); `studies.run_study` calls it after the sweep, and `svt-ray compare` calls it
at any later time, so the report a sweep prints and the one a later compare prints cannot
disagree. Nothing here imports Ray.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svt_ray.config import ConfigError
from svt_ray.tracking import hide_password

logger = logging.getLogger(__name__)

METRIC = "online_knn_top1"
TIME_ATTR = "clips_seen"


# -- the report, rebuilt from MLflow -------------------------------------------------------------


@dataclass
class TrialRecord:
    run_id: str
    trial_id: str
    status: str
    seed: int
    sweep: dict[str, Any]
    final: float | None
    best: float | None
    clips_seen: float | None
    hours: float | None
    "Training hours: its training loops' time, Ray Train's start-ups and pauses left out."
    curve: list[tuple[float, float]]
    "(clips seen, online kNN top-1) points."
    wall_curve: list[tuple[float, float]]
    "(training hours, online kNN top-1) points."
    error: str = ""
    clips_per_s: float | None = None
    "Clips trained per second, online kNN left out; a trial restarted after a stop: over all its"
    " training sessions (each one's logged rate counts from its own start)."


@dataclass
class StudyReport:
    study: str
    question: str
    parent_run_id: str
    tracking_uri: str
    swept: list[str]
    trials: list[TrialRecord]
    verdict: str = ""
    budget_clips: int | None = None
    x_label: str = ""
    "The plots' x axis (the study's `x_label`; default: the first swept path)."
    parent_status: str = ""
    "The parent run's MLflow status (KILLED after a Ctrl-C); '' for a comparison of runs."
    asha: bool | None = None
    "Whether the study ran with ASHA (its parent's `asha` param); None when not recorded."
    files: dict[str, Path] = field(default_factory=dict)
    "Where publish()/write() put the table and plots."

    def rows(self) -> list[dict[str, Any]]:
        """One row per trial."""
        rows = []
        for t in sorted(self.trials, key=lambda t: (_sort_key(t.sweep), t.seed)):
            rows.append(
                {
                    **{path: t.sweep.get(path) for path in self.swept},
                    "seed": t.seed,
                    "status": t.status,
                    "final_knn_top1": _round(t.final),
                    "best_knn_top1": _round(t.best),
                    "clips_seen": None if t.clips_seen is None else int(t.clips_seen),
                    "hours": _round(t.hours, 4),
                    "clips_per_s": _round(t.clips_per_s),
                    "error": t.error,
                }
            )
        return rows

    def aggregate(self) -> list[dict[str, Any]]:
        """One row per swept setting: mean and standard error of the final kNN over seeds."""
        groups: dict[str, list[TrialRecord]] = {}
        for t in self.trials:
            groups.setdefault(_setting_key(self, t.sweep), []).append(t)
        rows = []
        for key, trials in sorted(groups.items(), key=lambda kv: _sort_key(json.loads(kv[0]))):
            finals = [t.final for t in trials if t.status == "FINISHED" and _finite(t.final)]
            mean = statistics.fmean(finals) if finals else None
            sem = statistics.stdev(finals) / math.sqrt(len(finals)) if len(finals) > 1 else None
            rows.append(
                {
                    **dict(zip(self.swept, json.loads(key), strict=True)),
                    "trials": len(trials),
                    "scored": len(finals),
                    "knn_top1_mean": _round(mean),
                    "knn_top1_sem": _round(sem),
                }
            )
        return rows

    def unfinished(self) -> str:
        """'' for a study that ran to its end; else what is still open, e.g. "study unfinished
        (parent KILLED, 1 trial running)": its table and verdict read part of the grid, and a
        trial it stopped (KILLED) may have been stopped by the interruption, not by ASHA."""
        still_open = []
        if self.parent_status not in ("", "FINISHED"):
            still_open.append(f"parent {self.parent_status}")
        if running := sum(t.status == "RUNNING" for t in self.trials):
            what = "trial" if self.parent_run_id else "run"
            still_open.append(f"{running} {what}{'s' * (running != 1)} running")
        if not still_open:
            return ""
        kind = "study" if self.parent_run_id else "comparison"
        return f"{kind} unfinished ({', '.join(still_open)})"

    def best(self) -> dict[str, Any] | None:
        scored = [row for row in self.aggregate() if row["knn_top1_mean"] is not None]
        return max(scored, key=lambda row: row["knn_top1_mean"]) if scored else None

    def markdown(self) -> str:
        lines = [f"# Study `{self.study}`", "", self.question, ""]
        if self.budget_clips:
            lines += [
                f"Budget: {self.budget_clips} clips per trial (epochs x training clips; a batch "
                "that does not divide an epoch's clips sees fewer: a run takes epochs x (clips "
                "// batch) steps).",
                "",
            ]
        lines += ["## By setting (mean ± s.e. over seeds; scored: trials that finished with a "
                  "final kNN)", "",
                  _markdown_table(self.aggregate()), "", "## Trials", "",
                  "clips_per_s: clips trained per second, online kNN left out; for a trial "
                  "restarted after a stop, over all its training sessions.", "",
                  _markdown_table(self.rows()), ""]  # fmt: skip
        if "scaling.num_workers" in self.swept:
            lines += ["## Scaling", "", _markdown_table(scaling_table(self)), ""]
        if self.verdict:
            lines += ["## Verdict", "", self.verdict, ""]
        return "\n".join(lines)

    def csv(self) -> str:
        rows = self.rows()
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return buffer.getvalue()

    def summary(self) -> str:
        """The honest few lines a study prints at the end."""
        failed = sum(t.status == "FAILED" for t in self.trials)
        stopped = sum(t.status == "KILLED" for t in self.trials)
        running = sum(t.status == "RUNNING" for t in self.trials)
        lines = [f"study {self.study}: {self.question}"]
        # Without ASHA, a trial stopped before its end was stopped by an interruption.
        how = "stopped by an interruption, ASHA off" if self.asha is False else "stopped early"
        if unfinished := self.unfinished():
            lines.append(
                f"{unfinished}: what follows reads the trials so far, not the whole grid (the "
                "same study command continues an interrupted study)"
            )
        lines.append(
            f"swept {', '.join(self.swept) or 'no setting (the same recipe)'}; "
            f"{len(self.trials)} trial{'s' * (len(self.trials) != 1)} "
            f"({failed} failed, {stopped} {how}"
            + (f", {running} running)" if running else ")")
            + (f"; budget up to {self.budget_clips} clips each" if self.budget_clips else "")
        )
        best = self.best()
        tied = [
            row
            for row in self.aggregate()
            if best and row["knn_top1_mean"] == best["knn_top1_mean"]
        ]
        if len(tied) > 1:
            settings = "; ".join(", ".join(f"{p}={row[p]}" for p in self.swept) for row in tied)
            lines.append(f"best: a tie at online kNN top-1 {best['knn_top1_mean']} ({settings})")
        elif best is not None:
            setting = ", ".join(f"{p}={best[p]}" for p in self.swept)
            spread = f" ± {best['knn_top1_sem']}" if best["knn_top1_sem"] is not None else ""
            left_out = _left_out(self, best)
            lines.append(
                f"best: {setting}: online kNN top-1 {best['knn_top1_mean']}{spread} "
                f"({best['scored']} seed(s){f'; {left_out}' if left_out else ''})"
            )
        if self.trials and not any(t.curve for t in self.trials):
            lines.append(
                "note: no run logged online kNN (runs with eval.online_every_clips and "
                "eval.online_every at 0 log none, nor a trial that failed before its first), so "
                "the kNN columns and plots are empty; score checkpoints with `svt-ray eval`"
            )
        flat = [t for t in self.trials if _never_rose(t.curve)]
        if flat:
            measured = sum(len(t.curve) > 1 and t.curve[0][0] == 0 for t in self.trials)
            lines.append(
                f"note: {len(flat)} of the {measured} trials measured from 0 clips never rose "
                "above the untrained model's "
                "online kNN (at 0 clips): their best is their start; a larger budget "
                "(optim.epochs, more clips) tells the settings apart better"
            )
        if non_finite := _non_finite(self):
            lines.append(
                f"note: a non-finite online kNN in {non_finite}: such values are left out of "
                "the means and comparisons"
            )
        if self.verdict:
            lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def publish(self, folder: Path) -> dict[str, Path]:
        """Write the table and plots (`write`) and log them to the study's parent run."""
        from mlflow.tracking import MlflowClient

        files = self.write(folder)
        client = MlflowClient(self.tracking_uri)
        for path in files.values():
            client.log_artifact(self.parent_run_id, str(path))
        if self.verdict:
            client.set_tag(self.parent_run_id, "svt.verdict", self.verdict[:5000])
        return files

    def write(self, folder: Path) -> dict[str, Path]:
        """results.csv, results.md, curves.png and final.png in `folder`."""
        from data_prep.shards import write_file

        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "results.csv": folder / "results.csv",
            "results.md": folder / "results.md",
        }
        for name, text in (("results.csv", self.csv()), ("results.md", self.markdown())):
            write_file(str(files[name]), text.encode())
        x_label = self.x_label or (self.swept[0] if self.swept else "setting")
        files.update(plot_study(self, folder, x_label))
        return files


def _setting_key(report: StudyReport, values: dict[str, Any]) -> str:
    """One setting of the swept paths as text: a trial's `sweep`, or a row of `aggregate`."""
    return json.dumps([values.get(path) for path in report.swept])


def _stopped_settings(report: StudyReport) -> dict[str, tuple[float, float]]:
    """Settings that ASHA stopped in every trial: their trials' mean last online kNN and the
    clips seen at it (the furthest any of them got)."""
    finished = {_setting_key(report, t.sweep) for t in report.trials if t.status == "FINISHED"}
    lasts: dict[str, list[tuple[float, float]]] = {}
    for trial in report.trials:
        key = _setting_key(report, trial.sweep)
        measured = [(c, v) for c, v in trial.curve if math.isfinite(v)]
        if trial.status == "KILLED" and measured and key not in finished:
            lasts.setdefault(key, []).append(measured[-1])
    return {
        key: (statistics.fmean(v for _, v in points), max(c for c, _ in points))
        for key, points in lasts.items()
    }


def _left_out(report: StudyReport, row: dict[str, Any]) -> str:
    """Why a setting's mean (a row of `aggregate`) is of fewer seeds than it ran: '2 of 3 seeds
    finished' (those ASHA kept, the better ones), '1 finished without a finite kNN'; '' if none."""
    key = _setting_key(report, row)
    trials = [t for t in report.trials if _setting_key(report, t.sweep) == key]
    finished = sum(t.status == "FINISHED" for t in trials)
    reasons = []
    if finished < len(trials):
        reasons.append(f"{finished} of {len(trials)} seeds finished")
    if unscored := finished - row["scored"]:
        reasons.append(f"{unscored} finished without a finite kNN")
    return ", ".join(reasons)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _non_finite(report: StudyReport) -> str:
    """The trials that logged a non-finite online kNN, 'x=0, seed 1', for the notes that say
    they were left out; '' when none did."""
    return "; ".join(
        " ".join([*(f"{p}={t.sweep.get(p)}," for p in report.swept), f"seed {t.seed}"])
        for t in sorted(report.trials, key=lambda t: (_sort_key(t.sweep), t.seed))
        if any(not math.isfinite(v) for _, v in t.curve)
    )


def _failed_settings(report: StudyReport) -> dict[str, float | None]:
    """Settings with failed trials and none that finished with a kNN or was stopped with one:
    the failed trials' mean last online kNN, None when none measured one."""
    shown = set(_stopped_settings(report)) | {
        _setting_key(report, t.sweep)
        for t in report.trials
        if t.status == "FINISHED" and _finite(t.final)
    }
    lasts: dict[str, list[float]] = {}
    for trial in report.trials:
        key = _setting_key(report, trial.sweep)
        if trial.status == "FAILED" and key not in shown:
            lasts.setdefault(key, []).extend(v for _, v in trial.curve[-1:] if math.isfinite(v))
    return {key: statistics.fmean(values) if values else None for key, values in lasts.items()}


def _never_rose(curve: list[tuple[float, float]]) -> bool:
    """Whether a kNN curve measured from 0 clips seen never went above its first point."""
    return len(curve) > 1 and curve[0][0] == 0 and max(v for _, v in curve[1:]) <= curve[0][1]


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


def _sort_key(values) -> list:
    """Numbers by value, lists of numbers by their values ([8] before [64]), the rest as text."""
    items = values.values() if isinstance(values, dict) else values

    def key(value):
        if isinstance(value, int | float):
            return (0, (value,), "")
        if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            return (1, tuple(value), "")
        return (2, (), json.dumps(value))

    return [key(value) for value in items]


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row[c] is None else str(row[c]).replace("|", "/") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect_study(
    tracking_uri: str,
    experiment: str,
    study: str,
    run_ids: Sequence[str] | None = None,
    recompute_verdict: bool = True,
    parent_run_id: str | None = None,
    sweep_ended: bool = False,
) -> StudyReport:
    """Everything the report needs, from MLflow alone: the parent, its children, their curves.

    The study is its parent run: `parent_run_id`, else the newest parent named `study` in
    `experiment` (a study run again under another --storage has a parent of its own). With
    `run_ids`, compares those runs instead, of any experiment (their differing params become
    the sweep; seeds are repeats, not a setting). The verdict is recomputed with the installed
    rules unless the caller, holding the study's spec, computes it itself
    (`recompute_verdict=False`). `sweep_ended`: the study's driver, reporting once its sweep
    ended; the parent run stays RUNNING until the report is logged, and is not a study still
    running then.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    store = hide_password(tracking_uri)  # as messages name it

    def get_run(run_id: str, what: str):
        try:
            return client.get_run(run_id)
        except MlflowException as error:
            raise ConfigError(f"no {what} {run_id!r} in {store}: {error.message}") from None

    def run_by_id_or_name(given: str):
        """A run by its MLflow id, or by its name (`svt-ray pretrain` names each run; the
        demo's is `demo`) where one run of the store has it."""
        try:
            return client.get_run(given)
        except MlflowException:
            pass
        experiments = [e.experiment_id for e in client.search_experiments()]
        named = client.search_runs(
            experiments, f"attributes.run_name = '{given}'", max_results=10
        ) if experiments and "'" not in given else []  # fmt: skip
        if len(named) == 1:
            return named[0]
        if named:
            raise ConfigError(
                f"{len(named)} MLflow runs of {store} are named {given!r} ("
                + ", ".join(run.info.run_id for run in named)
                + "); pass the id of the one to compare"
            )
        raise ConfigError(
            f"no MLflow run with id or name {given!r} in {store}; `svt-ray pretrain` "
            "prints each run's name and MLflow id, and `mlflow ui` lists them"
        )

    if run_ids:
        children = [run_by_id_or_name(run_id) for run_id in run_ids]
        parents = [run for run in children if run.data.tags.get("svt.study_role") == "parent"]
        if parents:
            parent = parents[0]
            study = parent.data.tags.get("svt.study", "NAME")
            flags = f"--study {shlex.quote(study)} --parent-run {parent.info.run_id}"
            held_in = client.get_experiment(parent.info.experiment_id).name
            if held_in != experiment:  # --study searches `experiment`
                flags += f" --experiment {shlex.quote(held_in)}"
            raise ConfigError(
                f"--runs {parent.info.run_name or parent.info.run_id}: the parent run of "
                f"study {study!r}, which holds its trials' runs, not a training run; compare "
                f"the study with {flags}, or name its trials' runs"
            )
        parent_id, question = "", f"comparison of runs {', '.join(run_ids)}"
        verdict, budget, verdict_fn, x_label, parent_status = "", None, None, "", ""
        asha = None
        swept = _differing_params(children)
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(
                f"no MLflow experiment {experiment!r} in {store}: no study has logged to "
                "this store under that name; run one (`python studies/NAME.py`), or point "
                "--tracking-uri (and --experiment) at the store a study used"
            )
        if parent_run_id is not None:
            parent = get_run(parent_run_id, "study parent run")
            if parent.data.tags.get("svt.study") != study:  # its report would be written as study's
                raise ConfigError(
                    f"--parent-run {parent_run_id} is the parent run of study "
                    f"{parent.data.tags.get('svt.study', '(none: not a study parent run)')!r}, "
                    f"not of {study!r}; pass that --study, or another --parent-run"
                )
        else:
            parents = client.search_runs(
                [found.experiment_id],
                filter_string=f"tags.`svt.study` = '{study}' and tags.`svt.study_role` = 'parent'",
                order_by=["attributes.start_time DESC"],
            )
            if not parents:
                names = sorted(
                    {
                        run.data.tags["svt.study"]
                        for run in client.search_runs(
                            [found.experiment_id],
                            filter_string="tags.`svt.study_role` = 'parent'",
                            max_results=200,
                        )
                    }
                )
                raise ConfigError(
                    f"no study {study!r} in MLflow experiment {experiment!r} of {store} "
                    f"(its studies: {', '.join(names) or 'none'}); pass the --tracking-uri (and "
                    "--experiment) the study ran with"
                )
            parent = parents[0]
            if len(parents) > 1:
                logger.warning(
                    "%d studies named %s in experiment %s; showing the newest, parent run %s "
                    "(others: %s; pick one with --parent-run)",
                    len(parents), study, experiment, parent.info.run_id,
                    ", ".join(p.info.run_id for p in parents[1:]),
                )  # fmt: skip
        parent_id, question = parent.info.run_id, parent.data.tags.get("svt.question", "")
        verdict = parent.data.tags.get("svt.verdict", "")
        verdict_fn = parent.data.tags.get("svt.verdict_fn")
        x_label = parent.data.tags.get("svt.x_label", "")
        parent_status = parent.info.status
        if parent_status == "RUNNING" and sweep_ended:  # the driver, reporting
            parent_status = "FINISHED"
        budget = parent.data.params.get("budget_clips")
        asha = {"True": True, "False": False}.get(parent.data.params.get("asha", ""))
        children = _one_run_per_trial(
            client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
            )
        )
        swept = sorted(
            key.removeprefix("sweep.") for key in parent.data.params if key.startswith("sweep.")
        )
    trials = [_trial_record(client, run, swept) for run in children]
    report = StudyReport(
        study, question, parent_id, tracking_uri, swept, trials, verdict,
        int(budget) if budget else None, x_label, parent_status, asha,
    )  # fmt: skip
    if verdict_fn and recompute_verdict:
        report.verdict = qualified_verdict(
            report, _recomputed_verdict(report, verdict_fn) or verdict
        )
    return report


def _one_run_per_trial(runs: list) -> list:
    """One MLflow run per trial (`svt.trial_id`): an attempt abandoned without a checkpoint
    (KILLED) and the run made for the trial after it are one trial, not two seeds. The newest
    run counts, unless only an older one FINISHED; runs without the tag are all kept."""
    attempts: dict[str, list] = {}
    for run in runs:
        if "svt.trial_id" in run.data.tags:
            attempts.setdefault(run.data.tags["svt.trial_id"], []).append(run)
    dropped = set()
    for trial_id, trial_runs in attempts.items():
        trial_runs.sort(key=lambda run: run.info.start_time or 0)
        finished = [run for run in trial_runs if run.info.status == "FINISHED"]
        kept = (finished or trial_runs)[-1]
        if len(trial_runs) > 1:
            logger.info(
                "trial %s has %d MLflow runs; reporting %s (%s)",
                trial_id, len(trial_runs), kept.info.run_id, kept.info.status,
            )  # fmt: skip
        dropped.update(run.info.run_id for run in trial_runs if run is not kept)
    return [run for run in runs if run.info.run_id not in dropped]


def qualified_verdict(report: StudyReport, verdict: str) -> str:
    """`verdict`, said first to read part of the grid when the study is unfinished
    (interrupted, or still running: a verdict on part of the grid would mislead), and to be
    noise when no trial rose above the untrained model's online kNN."""
    unfinished = report.unfinished()
    if not verdict or (unfinished and verdict.startswith(unfinished)):  # qualified already
        return verdict
    verdict = _noise_qualified(report, verdict)
    return f"{unfinished}: {verdict}" if unfinished else verdict


def _noise_qualified(report: StudyReport, verdict: str) -> str:
    """`verdict`, said to be noise when no trial rose above the untrained model's online kNN
    (each measured from the start): it named a best setting and a gain where none learned."""
    curves = [t for t in report.trials if t.curve]
    if (
        not verdict
        or "scaling.num_workers" in report.swept  # its throughput holds whatever was learned
        or not curves
        or not all(_never_rose(t.curve) for t in curves)  # one not measured from 0 may have
    ):
        return verdict
    prefix = "none: no trial rose above the untrained model's online kNN, so nothing here tells "
    if verdict.startswith(prefix):  # a verdict recorded qualified already
        return verdict
    return (
        f"{prefix}the settings apart (raise optim.epochs or the clips); for the record: {verdict}"
    )


def _recomputed_verdict(report: StudyReport, name: str) -> str | None:
    """The verdict the named function (a `module:function` of this package) gives on
    `report` now: a study's stored verdict is as old as the code that ran it."""
    import importlib

    module, _, qualname = name.partition(":")
    if not module.startswith("svt_ray.") or not qualname.isidentifier():
        logger.info(  # a verdict from a user's script: keep the stored one
            "verdict: as the study's script (%s) stored it; only the package's verdicts are "
            "recomputed with the installed code", name,
        )  # fmt: skip
        return None
    try:
        return getattr(importlib.import_module(module), qualname)(report)
    except Exception as error:  # an older study the current rules cannot read
        logger.warning("verdict %s not recomputed (%s): the stored one is shown", name, error)
        return None


def _differing_params(runs) -> list[str]:
    keys = set().union(*(run.data.params for run in runs))
    from svt_ray.config import RESUMABLE_SETTINGS

    ignore = (
        "data.path", "train.storage_path", "train.run_name", "tracking.", "derived.",
        "train.seed",  # repeats of a setting, averaged over: not a setting
        "scaling.address",
        "data.decode_actors",  # a study caps it from each trial's share of the CPUs
        # how often a run reports, logs and checkpoints: not what it learns
        "train.checkpoint_every", "train.log_every", "train.report_every",
    )  # fmt: skip
    return sorted(
        key
        for key in keys
        if not key.startswith(ignore)
        and (key not in RESUMABLE_SETTINGS or key in ("scaling.num_workers", "model.init_from"))
        and len({run.data.params.get(key) for run in runs}) > 1
    )


def _trial_record(client, run, swept: list[str]) -> TrialRecord:
    tags, params = run.data.tags, run.data.params

    def swept_value(path: str):
        if f"svt.sweep.{path}" in tags:
            return json.loads(tags[f"svt.sweep.{path}"])
        value = params.get(path)  # MLflow keeps params as text: 8 must sort before 16
        try:
            return json.loads(value) if value is not None else None
        except ValueError:
            return value

    history = sorted(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.step)
    curve = [(float(m.step), float(m.value)) for m in history]
    end = run.info.end_time
    sessions = _training_sessions(client.get_metric_history(run.info.run_id, "wall_time_s"))
    if not sessions and run.info.status != "FAILED":  # no step logged (or not by svt-ray):
        start = run.info.start_time or (history[0].timestamp if history else 0)  # start to end
        sessions = [(start, end)] if start and end else []  # (a failed one trained no hours)

    def hours_at(timestamp: int) -> float:  # training time: start-ups and pauses left out
        return sum(max(0, min(timestamp, stop) - begin) for begin, stop in sessions) / 3.6e6

    wall_curve = [(hours_at(m.timestamp), float(m.value)) for m in history]
    clips_per_s = run.data.metrics.get("clips_per_s")
    if len(sessions) > 1:  # the logged rate restarts each session: the latest is the last's
        clips_per_s = _rate_over_sessions(
            client.get_metric_history(run.info.run_id, "clips_per_s"), sessions
        )
    status = run.info.status
    return TrialRecord(
        run_id=run.info.run_id,
        trial_id=tags.get("svt.trial_id", run.info.run_name or run.info.run_id),
        status=status,
        seed=int(tags.get("svt.seed", params.get("train.seed", 0))),
        sweep={path: swept_value(path) for path in swept},
        final=curve[-1][1] if curve else None,
        best=max((v for _, v in curve if math.isfinite(v)), default=None),
        clips_seen=run.data.metrics.get(TIME_ATTR),
        hours=hours_at(end) if end and sessions else None,
        curve=curve,
        wall_curve=wall_curve,
        error=tags.get("svt.error", ""),
        clips_per_s=clips_per_s,
    )


def _training_sessions(wall_times) -> list[tuple[float, float]]:
    """(start, last logged step) in ms of each training session of a run, from its
    `wall_time_s` points (seconds since its session's training loop started, logged with the
    step's time): a run stopped (Ctrl-C on a study, a lost node) and resumed has one per start.
    A point whose session began after the point before it was logged starts a new one; so does
    one whose wall time falls back. Ray Train's start-up before each loop and the pauses between
    sessions are outside every session; steps trained again after a restart are inside."""
    sessions: list[list[float]] = []
    previous = None
    for point in sorted(wall_times, key=lambda m: m.timestamp):
        began = point.timestamp - point.value * 1000
        if previous is None or began > previous.timestamp or point.value < previous.value:
            sessions.append([began, point.timestamp])
        sessions[-1][1] = point.timestamp
        previous = point
    return [(begin, stop) for begin, stop in sessions]


def _rate_over_sessions(rates, sessions: list[tuple[float, float]]) -> float | None:
    """Clips/s of a run over all its training sessions, from its `clips_per_s` points: each
    session's last one (the clips trained since that session started, per second of training,
    online kNN left out), weighted by the session's length (its online kNN included: an
    approximation of clips over training seconds, close where evaluation is short)."""
    weighted = total = 0.0
    for begin, stop in sessions:
        inside = [m for m in rates if begin <= m.timestamp <= stop and math.isfinite(m.value)]
        if inside:
            weighted += max(inside, key=lambda m: m.timestamp).value * (stop - begin)
            total += stop - begin
    return weighted / total if total else None


def plot_study(report: StudyReport, folder: Path, x_label: str) -> dict[str, Path]:
    """Online kNN against clips seen and against hours (one curve per trial), and the final
    kNN against the swept setting with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    figure, (per_clip, per_hour) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab10")
    settings = sorted({_setting_key(report, t.sweep) for t in report.trials})
    for trial in report.trials:
        if not trial.curve:
            continue
        key = _setting_key(report, trial.sweep)
        colour = colours(settings.index(key) % 10)
        label = ", ".join(f"{p.split('.')[-1]}={trial.sweep.get(p)}" for p in report.swept)
        failed = trial.status == "FAILED"
        label = f"{label} (seed {trial.seed}{', failed' if failed else ''})"
        style = {"KILLED": "--", "FAILED": ":"}.get(trial.status, "-")
        per_clip.plot(*zip(*trial.curve, strict=True), style, color=colour, marker=".", label=label)
        per_hour.plot(*zip(*trial.wall_curve, strict=True), style, color=colour, marker=".")
    per_clip.set(xlabel="clips seen", ylabel="online kNN top-1 (%)", title=report.study)
    per_hour.set(xlabel="training hours", ylabel="online kNN top-1 (%)", title="against time")
    for axes in (per_clip, per_hour):
        axes.grid(alpha=0.3)
    if any(trial.curve for trial in report.trials):  # matplotlib warns of an empty legend
        per_clip.legend(fontsize=7)
    else:
        per_clip.text(0.5, 0.5, "no online kNN logged", ha="center", transform=per_clip.transAxes)
    figure.tight_layout()
    files["curves.png"] = folder / "curves.png"
    figure.savefig(files["curves.png"], dpi=110)
    plt.close(figure)

    # Every measured setting: finished ones with their mean and error bar (and how many seeds
    # it is of, when some did not finish), those ASHA stopped (no finished trial) at their
    # trials' last value, hollow, and those whose every trial failed, marked as such.
    stopped_at, failed_at = _stopped_settings(report), _failed_settings(report)
    rows = [
        row
        for row in report.aggregate()
        if row["knn_top1_mean"] is not None or _setting_key(report, row) in stopped_at | failed_at
    ]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    labels = [", ".join(str(row[p]) for p in report.swept) for row in rows]
    done = [(x, row) for x, row in enumerate(rows) if row["knn_top1_mean"] is not None]
    if done:
        axes.errorbar([x for x, _ in done], [row["knn_top1_mean"] for _, row in done],
                      yerr=[row["knn_top1_sem"] or 0.0 for _, row in done], fmt="o-",
                      capsize=4, label="finished")  # fmt: skip
        for x, row in done:
            if left_out := _left_out(report, row):
                axes.annotate(left_out, (x, row["knn_top1_mean"]), textcoords="offset points",
                              xytext=(0, -12), ha="center", fontsize=7)  # fmt: skip
    stopped = [(x, stopped_at[_setting_key(report, row)]) for x, row in enumerate(rows)
               if _setting_key(report, row) in stopped_at]  # fmt: skip
    if stopped:
        axes.plot([x for x, _ in stopped], [value for _, (value, _) in stopped], "v",
                  fillstyle="none", color="grey",
                  label="stopped before the end: ASHA, Ctrl-C or a lost actor (last value)")  # fmt: skip
        for x, (value, clips) in stopped:
            axes.annotate(f"{clips:.0f} clips", (x, value), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7, color="grey")  # fmt: skip
    failed = [(x, failed_at[_setting_key(report, row)]) for x, row in enumerate(rows)
              if _setting_key(report, row) in failed_at]  # fmt: skip
    for x, _ in failed:  # at the foot of the axes: one that failed may have no value
        axes.annotate("failed", (x, 0.02), xycoords=("data", "axes fraction"),
                      ha="center", fontsize=7, color="red")  # fmt: skip
    if measured := [(x, value) for x, value in failed if value is not None]:
        axes.plot([x for x, _ in measured], [value for _, value in measured], "x", color="red",
                  label="failed (last value before the error)")  # fmt: skip
    if failed:  # a mark with no value sets no limit: keep the first and last ticks' marks in
        axes.set_xlim(-0.5, len(rows) - 0.5)
    if stopped or failed:
        axes.legend(fontsize=7)
    axes.set_xticks(range(len(rows)), labels)
    axes.set(xlabel=x_label, ylabel="final online kNN top-1 (%)", title=report.study)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    files["final.png"] = folder / "final.png"
    figure.savefig(files["final.png"], dpi=110)
    plt.close(figure)
    return files


# -- verdicts: answers computed from the data --------------------------------------------------


def curve_auc(curve: Sequence[tuple[float, float]], budget: float) -> float | None:
    """Mean accuracy over [0, budget] clips seen (trapezoids; the last value held to the end).
    Higher = learned faster per clip seen."""
    if not curve or budget <= 0:
        return None
    points = [(x, y) for x, y in curve if x <= budget]
    if not points:
        return None
    if points[-1][0] < budget:
        points.append((budget, points[-1][1]))
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))
    return area / (points[-1][0] - points[0][0]) if points[-1][0] > points[0][0] else points[0][1]


def _mean_sem(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, standard error or None for one value, number of values)."""
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, sem, len(values)


def _difference_phrase(
    a: tuple[float, float | None, int], b: tuple[float, float | None, int]
) -> str:
    """'D points (noise N: significant | within noise)' or a single-seed caveat; `a` and `b`
    are (mean, s.e., seeds) of the two settings."""
    difference = a[0] - b[0]
    if a[1] is None and b[1] is None:
        return f"{difference:+.1f} points (one seed per setting: no error bars, indicative only)"
    if a[1] is None or b[1] is None:
        return (
            f"{difference:+.1f} points ({a[2]} against {b[2]} seed(s): one side has a single "
            "seed, so no error bar, indicative only)"
        )
    noise = 2 * math.hypot(a[1], b[1])
    judged = "beyond" if abs(difference) > noise else "within"
    return f"{difference:+.1f} points, {judged} the noise (2 s.e. = {noise:.1f})"


def best_vs_worst_verdict(report: StudyReport) -> str:
    """Which setting is best on final online kNN, and whether it beats the worst beyond noise.
    A compared setting some of whose seeds did not finish is not judged against the noise: its
    mean is of the seeds ASHA let finish, the better ones; the comparison at the clips every
    setting reached, of every seed ASHA stopped too, answers then."""
    rows = [row for row in report.aggregate() if row["knn_top1_mean"] is not None]
    if len(rows) < 2:
        return _with_non_finite(report, _common_rung_verdict(report))

    def name(row):
        return ", ".join(f"{p}={row[p]}" for p in report.swept)

    def stats(row):
        return row["knn_top1_mean"], row["knn_top1_sem"], row["scored"]

    def left_out(compared):
        return "; ".join(
            f"{name(row)}: {why}" for row in compared if (why := _left_out(report, row))
        )

    top = max(row["knn_top1_mean"] for row in rows)
    bottom = min(row["knn_top1_mean"] for row in rows)
    if top == bottom:
        answer = f"the finished settings tie at {top} (" + "; ".join(map(name, rows)) + ")"
        if short := left_out(rows):
            answer += f" ({short})"
    else:
        best = [row for row in rows if row["knn_top1_mean"] == top]
        worst = [row for row in rows if row["knn_top1_mean"] == bottom]
        short = left_out(best + worst)
        answer = (
            f"best {_named([name(row) for row in best], str(top))}; over worst "
            f"{_named([name(row) for row in worst], str(bottom), alone=False)}: "
            + (
                f"{top - bottom:+.1f} points, not judged against the noise ({short})"
                if short
                else _difference_phrase(
                    _least_sure([stats(row) for row in best]),
                    _least_sure([stats(row) for row in worst]),
                )
            )
        )
    if any(t.status == "KILLED" for t in report.trials):
        # the settings ASHA stopped are compared where every setting was measured
        answer = f"finished: {answer}; {_common_rung_verdict(report)}"
    return _with_non_finite(report, answer)


def _with_non_finite(report: StudyReport, verdict: str) -> str:
    """`verdict`, saying which trials logged a non-finite online kNN (left out of it)."""
    non_finite = _non_finite(report)
    if not non_finite:
        return verdict
    return f"{verdict}; a non-finite online kNN (left out wherever compared) in {non_finite}"


def _stopped_before(report: StudyReport, what: str) -> str:
    """'before ASHA stopped it' ('one': `what`), or 'before it was stopped' in a study run
    without ASHA, where what stopped a trial was an interruption. An older study did not
    record whether it ran with ASHA."""
    if report.asha is False:
        return f"before {what} was stopped"
    return f"before ASHA stopped {what}"


def _named(names: list[str], value: str, alone: bool = True) -> str:
    """'x=1 (50.0)' ('x=1' unless `alone`), or every setting of a tie: 'x=0 and x=4 (tied
    at 50.0)'."""
    if len(names) > 1:
        return f"{' and '.join(names)} (tied at {value})"
    return f"{names[0]} ({value})" if alone else names[0]


def _least_sure(
    tied: list[tuple[float, float | None, int]],
) -> tuple[float, float | None, int]:
    """Of settings tied on the mean, (mean, s.e., seeds) of the one a difference is least
    sure for (a single seed, else the widest error bar): a tie is judged by its weakest."""
    return max(tied, key=lambda stats: math.inf if stats[1] is None else stats[1])


def _last_up_to(curve: list[tuple[float, float]], clips: float) -> float:
    """A curve's last measurement at or before `clips` seen: where a trial stood at a rung."""
    return [v for x, v in curve if x <= clips][-1]


def _common_rung_verdict(report: StudyReport) -> str:
    """With ASHA, usually only the best setting runs to the end: compare every setting at the
    largest clip count all of them reached (each trial's last measurement up to it)."""
    curves = [t for t in report.trials if t.curve and t.status in ("FINISHED", "KILLED")]
    if len({_setting_key(report, t.sweep) for t in curves}) < 2:
        return "fewer than two settings were measured: no comparison"
    rung = min(t.curve[-1][0] for t in curves)
    scores: dict[str, list[float]] = {}
    for trial in sorted(curves, key=lambda t: _sort_key(t.sweep)):  # ties named in order
        value = _last_up_to(trial.curve, rung)
        name = ", ".join(f"{p}={trial.sweep.get(p)}" for p in report.swept)
        if math.isfinite(value):  # said by `_with_non_finite`
            scores.setdefault(name, []).append(value)
    if len(scores) < 2:
        return "fewer than two settings were measured: no comparison"
    stats = {name: _mean_sem(values) for name, values in scores.items()}
    # In an interrupted or running study, a KILLED trial may be Ctrl-C's, not ASHA's.
    reached = "so far" if report.unfinished() else _stopped_before(report, "it")
    at = f"at {rung:.0f} clips seen (the furthest every setting got {reached}): "
    top = max(mean for mean, _, _ in stats.values())
    bottom = min(mean for mean, _, _ in stats.values())
    if top == bottom:
        return at + f"every setting at {top:.1f} (a tie)"
    best = [name for name in stats if stats[name][0] == top]
    worst = [name for name in stats if stats[name][0] == bottom]
    return (
        at + f"best {_named(best, f'{top:.1f}')}; over worst "
        f"{_named(worst, f'{bottom:.1f}', alone=False)}: "
        + _difference_phrase(
            _least_sure([stats[name] for name in best]),
            _least_sure([stats[name] for name in worst]),
        )
    )


# The frame-rate study's question: the paper's views (8- and 16-frame globals, 2- to 16-frame
# locals) against the reference code's (8 frames in every view).
PAPER_FRAME_RATES = {"views.global_frames": [8, 16], "views.local_frames": [2, 4, 8, 16]}
REFERENCE_FRAME_RATES = {"views.global_frames": [8, 8], "views.local_frames": [8]}


def frame_rate_verdict(report: StudyReport) -> str:
    """The paper's frame rates against the reference code's, which is what the frame-rate
    study asks (best against worst need not be either), then the whole grid's best against
    worst. A grid without both settings (another --grid) gets best against worst alone."""
    pair = _two_settings_verdict(
        report,
        ("the paper's views", PAPER_FRAME_RATES),
        ("the reference code's", REFERENCE_FRAME_RATES),
    )
    whole = best_vs_worst_verdict(report)
    return f"{pair}. Whole grid: {whole}" if pair else whole


def _two_settings_verdict(
    report: StudyReport, a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]]
) -> str | None:
    """Setting `a` against setting `b` (each (name, {path: value})): on final online kNN when
    every trial of both finished, else at the furthest clips seen both got to (ASHA stops the
    slower one early); a side none of whose trials was measured (all failed) is said so. Not
    judged against the noise when a side's failed seeds (or non-finite kNN) are left out: the
    seeds left are the ones that did not fail. None when the grid lacks either setting."""

    def trials_of(setting: dict[str, Any]) -> list[TrialRecord]:
        return [
            t for t in report.trials
            if all(t.sweep.get(path) == value for path, value in setting.items())
        ]  # fmt: skip

    def named(side: tuple[str, dict[str, Any]]) -> str:
        return f"{side[0]} ({', '.join(f'{p}={v}' for p, v in side[1].items())})"

    sides = [(side, trials_of(side[1])) for side in (a, b)]
    if not all(trials for _, trials in sides):
        return None
    measured = [
        [t for t in trials if t.curve and t.status in ("FINISHED", "KILLED")] for _, trials in sides
    ]
    both = measured[0] + measured[1]
    if all(t.status == "FINISHED" for t in both):
        at, values = "final online kNN", [[t.final for t in m] for m in measured]
    else:
        rung = min(t.curve[-1][0] for t in both) if both else 0
        reached = "so far" if report.unfinished() else _stopped_before(report, "one")
        at = f"online kNN at {rung:.0f} clips seen (the furthest both got {reached})"
        values = [[_last_up_to(t.curve, rung) for t in m] for m in measured]
    values = [[v for v in side_values if _finite(v)] for side_values in values]
    unmeasured = [
        f"{named(side)}: {_why_unmeasured(trials)}"
        for (side, trials), side_values in zip(sides, values, strict=True)
        if not side_values
    ]
    if unmeasured:
        return "; ".join(unmeasured) + ": no comparison"
    stats_a, stats_b = (_mean_sem(side_values) for side_values in values)
    left_out = "; ".join(
        f"{side[0]}: {len(side_values)} of {len(trials)} seeds measured"
        for (side, trials), side_values in zip(sides, values, strict=True)
        if len(side_values) < len(trials)
    )
    phrase = (
        f"{stats_a[0] - stats_b[0]:+.1f} points, not judged against the noise ({left_out})"
        if left_out
        else _difference_phrase(stats_a, stats_b)
    )
    return f"{named(a)} {stats_a[0]:.1f} against {named(b)} {stats_b[0]:.1f}, {at}: {phrase}"


def _why_unmeasured(trials: list[TrialRecord]) -> str:
    """Why a setting's trials give no online kNN to compare: their errors when all failed."""
    if all(t.status == "FAILED" for t in trials):
        errors = dict.fromkeys(t.error.splitlines()[0][:200] for t in trials if t.error)
        return f"every trial failed ({'; '.join(errors) or 'no error recorded'})"
    if any(t.status == "RUNNING" for t in trials):
        return "not measured yet"
    return "no finite online kNN measured"


def batch_size_verdict(report: StudyReport) -> str:
    """'Smaller batches converge faster per clip seen': compare the area under the online-kNN
    curve over the clips every finished trial saw, smallest against largest batch, and the
    rank order. A batch that does not divide the training clips sees fewer in its epochs (608
    clips in batches of 64: 9 steps an epoch, 4,608 clips in 8 epochs where the others see
    4,864): the area ends where the shortest curve ends, not at the budget with that curve's
    last value held."""
    path = "optim.batch_size"
    budget = report.budget_clips or max((t.clips_seen or 0 for t in report.trials), default=0)
    ends = [t.curve[-1][0] for t in report.trials if t.status == "FINISHED" and t.curve]
    budget = min([budget, *ends]) if ends else budget
    scores: dict[int, list[float]] = {}
    for trial in report.trials:
        auc = curve_auc(trial.curve, budget) if trial.status == "FINISHED" else None
        if _finite(auc) and path in trial.sweep:  # a non-finite kNN: said by _with_non_finite
            scores.setdefault(int(trial.sweep[path]), []).append(auc)
    if len(scores) < 2:
        return "fewer than two batch sizes finished: no answer"
    sizes = sorted(scores)
    means = [statistics.fmean(scores[b]) for b in sizes]
    monotone_down = all(means[i] >= means[i + 1] for i in range(len(means) - 1))
    monotone_up = all(means[i] <= means[i + 1] for i in range(len(means) - 1))
    best = [str(b) for b, m in zip(sizes, means, strict=True) if m == max(means)]
    # The order over more than two sizes ("step" read as a training step: say batch).
    strictly = len(set(means)) == len(means)
    if len(sizes) == 2:
        shape = ""
    elif monotone_down:
        shape = f"; the mean {'rises' if strictly else 'never falls'} with each smaller batch"
    elif monotone_up:
        shape = f"; the mean {'rises' if strictly else 'never falls'} with each larger batch"
    else:
        shape = f"; not monotone, best batch {_named(best, f'{max(means):.1f}', alone=False)}"
    small, large = _mean_sem(scores[sizes[0]]), _mean_sem(scores[sizes[-1]])
    phrase = _difference_phrase(small, large)
    order = ", ".join(f"{b}: {m:.1f}" for b, m in zip(sizes, means, strict=True))
    if small[1] is None or large[1] is None:  # one seed: a direction, not an answer
        answer = (
            "a tie" if small[0] == large[0] else "leans yes" if small[0] > large[0] else "leans no"
        )
    elif "within" in phrase:
        answer = "inconclusive"
    elif small[0] > large[0]:
        answer = "yes" if monotone_down else "partly (not monotone)"
    else:
        answer = "no"
    return _with_non_finite(
        report,
        f"{answer}: mean online kNN over the budget (per batch size: {order}{shape}); batch "
        f"{sizes[0]} vs {sizes[-1]}: {phrase}",
    )


def scaling_table(report: StudyReport, threshold: float | None = None) -> list[dict[str, Any]]:
    """Clips/s (the mean of the trials that logged it), scaling efficiency against the smallest
    worker count (none without both clips/s), and hours to reach
    `threshold` online kNN (default: 90% of the way from the accuracy at initialisation to the
    lowest final accuracy among finished runs; none when some run ended no better than it
    started, since any noise would then count as reaching it)."""
    path = "scaling.num_workers"
    finished = [t for t in report.trials if t.status == "FINISHED" and path in t.sweep]
    if not finished:
        return []
    finals = [t.final for t in finished if _finite(t.final)]
    starts = [t.curve[0][1] for t in finished if t.curve and math.isfinite(t.curve[0][1])]
    if threshold is None and finals and starts:
        start = statistics.fmean(starts)
        if min(finals) > start:
            threshold = start + 0.9 * (min(finals) - start)
    by_workers: dict[int, list[TrialRecord]] = {}
    for trial in finished:
        by_workers.setdefault(int(trial.sweep[path]), []).append(trial)
    base_workers = min(by_workers)
    speeds = {}
    for workers, trials in by_workers.items():  # a trial that logged none is no 0 clips/s
        logged = [t.clips_per_s for t in trials if _finite(t.clips_per_s)]
        speeds[workers] = statistics.fmean(logged) if logged else None
    rows = []
    for workers in sorted(by_workers):
        reach = [
            next((h for h, v in t.wall_curve if v >= threshold), None)
            for t in by_workers[workers]
            if threshold is not None
        ]
        reached = [h for h in reach if h is not None]
        speed, base = speeds[workers], speeds[base_workers]
        efficiency = speed / (base * workers / base_workers) if speed is not None and base else None
        rows.append(
            {
                "workers": workers,
                "clips_per_s": _round(speed),
                "efficiency": _round(efficiency),
                "hours_to_threshold": round(statistics.fmean(reached), 4) if reached else None,
                "threshold_knn_top1": None if threshold is None else round(threshold, 1),
            }
        )
    return rows


def scaling_verdict(report: StudyReport) -> str:
    rows = scaling_table(report)
    if len(rows) < 2:
        return "fewer than two worker counts finished: no scaling figure"
    first, last = rows[0], rows[-1]
    if last["efficiency"] is None:  # no finished trial of one of them logged clips/s
        silent = " or ".join(str(r["workers"]) for r in (first, last) if r["clips_per_s"] is None)
        verdict = (
            f"{last['workers']} workers: no scaling efficiency against {first['workers']} "
            f"worker(s) (no clips/s logged with {silent}); "
        )
    else:
        verdict = (
            f"{last['workers']} workers: {last['clips_per_s']} clips/s, scaling efficiency "
            f"{last['efficiency']:.2f} against {first['workers']} worker(s) "
            f"({'at or above' if last['efficiency'] >= 0.8 else 'below'} the 0.8 mark); "
        )
    verdict += "; ".join(
        f"{r['workers']}: {'none' if r['efficiency'] is None else format(r['efficiency'], '.2f')}"
        for r in rows
    )
    # The question's other half: time to accuracy, where every worker count reached it.
    if first["threshold_knn_top1"] is None:
        return verdict + "; time to accuracy: no threshold (a run ended no better than it began)"
    missing = ", ".join(str(r["workers"]) for r in rows if r["hours_to_threshold"] is None)
    if missing:
        return verdict + (
            f"; time to {first['threshold_knn_top1']} kNN: not reached with {missing} worker(s)"
        )
    hours = "; ".join(f"{r['workers']}: {r['hours_to_threshold']:.3g} h" for r in rows)
    if not last["hours_to_threshold"] or not first["hours_to_threshold"]:  # at the first point
        return verdict + f"; time to {first['threshold_knn_top1']} kNN: {hours}"
    speedup = first["hours_to_threshold"] / last["hours_to_threshold"]
    return verdict + (
        f"; time to {first['threshold_knn_top1']} kNN {speedup:.2f}x shorter with "
        f"{last['workers']} than {first['workers']} ({hours})"
    )
