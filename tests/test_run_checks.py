"""What `svt-ray pretrain` (and `eval`, `demo`) checks and records on the driver, before or
after Ray: bad data found before Ray starts, run records that do not parse, the MLflow run's
status at the end. No Ray is started here."""

from __future__ import annotations

import json
import os

import pytest
from factories import RayStarted, no_ray

from svt_ray import train as train_module
from svt_ray.config import ConfigError, load_config
from svt_ray.train import run_pretraining


def test_a_run_that_trained_to_the_end_is_finished_even_if_rank_0_could_not_say_so(
    tmp_path, mlflow_db, caplog
):
    """Rank 0 gives the store `tracking.flush_timeout_s` for its last calls; a slow store left
    the run RUNNING, and a study then marked it KILLED as if ASHA had stopped it. The driver,
    once training ended well, finishes it (and says how to send what it lacks); a run rank 0
    did end keeps its status."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import finish_mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("x")
    lost, killed = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(killed, "KILLED")
    with caplog.at_level("WARNING", logger="svt_ray.runs"):
        finish_mlflow_run(uri, lost, "tiny-seed0", "s3://b/runs?scheme=http&x=1")
        finish_mlflow_run(uri, killed, "other", "svt_runs")
    assert client.get_run(lost).info.status == "FINISHED"
    assert client.get_run(killed).info.status == "KILLED"
    assert "svt-ray tracking sync tiny-seed0 --storage 's3://b/runs?scheme=http&x=1'" in caplog.text
    assert "other" not in caplog.text
    finish_mlflow_run("sqlite:///" + str(tmp_path / "no" / "such.db"), lost, "r", "s")  # logged


def test_clips_skipped_in_training_are_said_at_the_end_and_tagged(tmp_path, mlflow_db, caplog):
    """Each skipped clip is a warning from a decode actor, easy to miss among a run's lines:
    the driver sums them up once and tags the MLflow run; a run that skipped none says
    nothing."""
    from mlflow.tracking import MlflowClient

    from svt_ray.runs import report_decode_failures

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    skipped, clean = (client.create_run(client.create_experiment(n)).info.run_id for n in "ab")
    with caplog.at_level("WARNING", logger="svt_ray.runs"):
        report_decode_failures(
            uri, skipped, "tiny-seed0", 3, ["0a1b", "ffee"], {"0a1b": "videos/jump/3.mp4"}
        )
        report_decode_failures(uri, clean, "other", 0)
    assert (
        "run tiny-seed0: 3 clips failed to decode and were skipped: videos/jump/3.mp4 (clip "
        "0a1b), clip ffee, 1 more; the run trained without them" in caplog.text
    )
    assert "other" not in caplog.text
    assert client.get_run(skipped).data.tags["svt.decode_failures"] == "3"
    assert "svt.decode_failures" not in client.get_run(clean).data.tags
    report_decode_failures("sqlite:///" + str(tmp_path / "no" / "such.db"), skipped, "r", 1)
    assert "svt.decode_failures not tagged in MLflow" in caplog.text


def test_a_runs_stream_counts_its_skipped_clips_under_the_runs_folder(tmp_path, monkeypatch):
    """The count the end of a run reports is the one its stream keeps: a wrong key would
    report 0 skipped clips for every run."""
    from svt_ray import data

    seen = {}

    def stream(config, start_epoch=0, failure_key=None):
        seen.update(start_epoch=start_epoch, failure_key=failure_key)

    monkeypatch.setattr(data, "training_dataset", stream)
    config = load_config("tiny", overrides=[f"data.path={tmp_path}"]).resolve(608)
    run_dir = str(tmp_path / "runs" / "tiny-seed0")
    train_module.dataset_for_run(config.model_dump(mode="json"), run_dir, None)
    assert seen == {"start_epoch": 0, "failure_key": run_dir}


def test_a_resumed_stream_is_the_rest_of_the_uninterrupted_one(tmp_path, monkeypatch):
    """A run resumed at step 7 of 3 steps per epoch streams from epoch 2, and that stream's
    slice orders (and the epoch numbers its views are drawn with) are those the uninterrupted
    run had there, so the batches the workers skip are the ones it trained on. (A resumed
    stream once drew a new order from a new seed: resumed halfway through an epoch, it trained
    some clips of that epoch twice and others not at all.)"""
    from svt_ray import data
    from svt_ray.runs import write_json

    seen = {}
    monkeypatch.setattr(data, "training_dataset", lambda config, **kw: seen.update(kw))
    config = load_config(
        "tiny", overrides=[f"data.path={tmp_path}", "optim.batch_size=16"]
    ).resolve(48)
    assert config.derived.steps_per_epoch == 3
    run_dir = str(tmp_path / "tiny-seed0")
    write_json(f"{run_dir}/{train_module.PROGRESS_FILE}", {"step": 7})
    train_module.dataset_for_run(config.model_dump(mode="json"), run_dir, None)
    assert seen["start_epoch"] == 2
    # The epochs run on in one stream, batches crossing their ends: with 50 clips per epoch
    # the uninterrupted run is at clip 9 x 16 = 144 after step 9, in epoch 2 (100..149), two
    # whole batches past its start; with data.deterministic each pass is 3 steps of an epoch.
    odd = config.model_copy(deep=True).resolve(50)
    assert train_module.resume_position(odd, 9) == (2, 2)
    assert train_module.resume_position(odd, 7) == (2, 0)  # clip 112: 12 of epoch 2's seen
    steady = load_config(
        "tiny",
        overrides=[f"data.path={tmp_path}", "optim.batch_size=16", "data.deterministic=true"],
    ).resolve(50)
    assert train_module.resume_position(steady, 9) == (3, 0)

    import ray.data

    from data_prep.shards import SCHEMA_VERSION

    class Stream:  # what Ray Data would be given, without Ray
        def __init__(self, items, **options):
            self.items, self.udfs = items, []

        def map_batches(self, udf, **options):
            self.udfs.append(options.get("fn_constructor_kwargs"))
            return self

    monkeypatch.undo()  # training_dataset itself this time, with the stream captured
    monkeypatch.setattr(ray.data, "from_items", Stream)
    shard = {"file": "shards/part-00000.parquet", "num_rows": 48 * 16, "splits": {"train": 48}}
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "shards": [shard]})
    )
    whole, resumed = (data.training_dataset(config, start_epoch=e) for e in (0, 2))
    slices = len(whole.items) // 8  # 8 epochs in one stream
    assert resumed.items == whole.items[2 * slices :]
    assert {item["epoch"] for item in resumed.items[:slices]} == {2}
    assert resumed.udfs[-1]["seed"] == whole.udfs[-1]["seed"]  # the views' seed


def test_online_knn_on_data_it_cannot_score_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """Found only in the workers, this failed each of them max_failures + 1 times, and the
    message then advised a --resume that refuses the changed eval settings."""
    from data_prep.shards import SCHEMA_VERSION

    monkeypatch.setattr(train_module, "ensure_ray", no_ray)

    def dataset(name: str, splits: dict, labels: dict) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({
            "schema_version": SCHEMA_VERSION, "shards": [],
            "counts": {"splits": splits, "labels": labels},
        }))  # fmt: skip
        return str(tmp_path / name)

    knn = ["eval.online_every=3", f"train.storage_path={tmp_path / 'runs'}"]
    no_val = dataset("no_val", {"train": 40, "test": 10}, {"0": 25, "1": 25})
    with pytest.raises(ConfigError, match=r"no clips of split 'val' .* eval.online_every=0"):
        run_pretraining(load_config("tiny", overrides=[*knn, f"data.path={no_val}"]))
    loose = dataset("loose", {"train": 40, "val": 10}, {"-1": 50})
    with pytest.raises(ConfigError, match=r"loose: none of its clips has a class label"):
        run_pretraining(load_config("tiny", overrides=[*knn, f"data.path={loose}"]))
    with pytest.raises(RayStarted):  # without online kNN, unlabelled clips are what SSL takes
        run_pretraining(load_config("tiny", overrides=[knn[1], f"data.path={loose}"]))
    # A dataset without split train (split lists named `training` made one) names its splits.
    no_train = dataset("no_train", {"training": 40, "val": 10}, {"0": 50})
    with pytest.raises(ConfigError, match=r"no clips of split 'train'.*\{'training': 40, 'val'"):
        run_pretraining(load_config("tiny", overrides=[knn[1], f"data.path={no_train}"]))


def test_eval_on_data_it_cannot_score_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """`svt-ray eval` started Ray, and only then found the dataset had no val split."""
    from typer.testing import CliRunner

    from data_prep.shards import SCHEMA_VERSION
    from svt_ray import cluster
    from svt_ray.cli import app

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    (tmp_path / "no_val").mkdir()
    (tmp_path / "no_val" / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "shards": [],
        "counts": {"splits": {"train": 40}, "labels": {"0": 40}},
    }))  # fmt: skip
    result = CliRunner().invoke(
        app, ["eval", "--preset", "tiny", "--data", str(tmp_path / "no_val")]
    )
    assert result.exit_code == 2, result.exception
    assert result.stderr.startswith(f"error: {tmp_path / 'no_val'} has no clips of split 'val'")


def test_a_run_record_cut_short_is_named(tmp_path):
    """run.json, progress.json and study.json are written atomically; one that does not parse
    was cut short by a copy or edited by hand, and gets an error naming it, not a traceback."""
    from svt_ray.runs import read_json

    (tmp_path / "run.json").write_text('{"config": {"preset": "ti')
    with pytest.raises(ConfigError, match=r"run.json: not valid JSON .* Restore it"):
        read_json(str(tmp_path / "run.json"))
    assert read_json(str(tmp_path / "missing.json")) is None


def test_a_data_path_is_made_absolute_as_the_workers_find_it(tmp_path, monkeypatch):
    """Ray Train runs each worker in a working directory of its own; `~` is not expanded by
    the shell in --data=~/x or a YAML config."""
    from svt_ray.runs import absolute_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert absolute_path("shards") == str(tmp_path / "shards")
    assert absolute_path("~/shards") == str(tmp_path / "home" / "shards")
    assert absolute_path("s3://bucket/k400?region=x") == "s3://bucket/k400?region=x"


def test_bad_demo_options_are_refused_before_the_workdir_is_made_or_ray_started(
    tmp_path, monkeypatch
):
    """`svt-ray demo --workers 0` left an empty svt_data/ behind; `--clips 0` started Ray and
    ended in a traceback."""
    from typer.testing import CliRunner

    from svt_ray import cluster
    from svt_ray.cli import app

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    workdir = tmp_path / "svt_data"
    for flags, said in [
        (["--workers", "0"], "error: scaling.num_workers: Input should be greater than 0"),
        (["--clips", "0"], "error: --clips 0: give a positive number of synthetic clips"),
        (
            ["--clips", "1"],
            "error: --clips 1: too few to train on. The demo holds out about a "
            "quarter of its clips for its evaluation and trains in global "
            "batches of 16 clips (optim.batch_size): give --clips 22 or more (a few more",
        ),
        (["--clips", "4", "--set", "optim.batch_size=4"], "error: --clips 4: too few"),
        (["--set", "optim.epoch=1"], "error: optim.epoch: unknown key"),
    ]:
        result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *flags])
        assert result.exit_code == 2 and result.stderr.startswith(said), result.output
        assert not workdir.exists()
    # Enough for a batch of 4 after a quarter is held out: on to Ray.
    flags = ["--clips", "6", "--set", "optim.batch_size=4"]
    result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *flags])
    assert isinstance(result.exception, RayStarted), result.output


def test_a_demo_whose_split_left_too_few_training_clips_says_how_many_to_ask_for(
    tmp_path, monkeypatch
):
    """data_prep draws the held-out split clip by clip: 30 clips (made by an earlier demo that
    asked for more than this one's 22) may leave 15 for training, less than a batch of 16.
    Said with the number of clips to ask for, not as the dataset's optim.batch_size error
    ("prepare more clips"), before training starts."""
    from svt_ray import cluster, data, demo, train

    monkeypatch.setattr(cluster, "ensure_ray", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "prepare_synthetic_data", lambda workdir, *args, **kwargs: workdir)
    counts = {"counts": {"splits": {"train": 15, "val": 15}}}
    monkeypatch.setattr(data, "read_dataset_manifest", lambda path: counts)
    monkeypatch.setattr(train, "run_pretraining", no_ray)
    with pytest.raises(ConfigError) as refused:
        demo.run_demo(tmp_path, num_clips=22, workers=1, overrides=[])
    assert str(refused.value) == (
        "--clips 22: too few to train on. The demo holds out 15 of the 30 clips in its shards "
        "for its evaluation and trains in global batches of 16 clips (optim.batch_size): give "
        "--clips 32 or more (a few more to be safe: the held-out clips are drawn clip by clip)"
    )


def _saved_checkpoint(run_dir, step: int, whole: bool = True) -> None:
    import io

    import torch

    from svt_ray.runs import CHECKPOINT_FILE, checkpoint_dir_name

    buffer = io.BytesIO()
    torch.save({"step": step, "student": {"w": torch.zeros(64)}}, buffer)
    data = buffer.getvalue()
    folder = run_dir / checkpoint_dir_name(step)
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_FILE).write_bytes(data if whole else data[: len(data) // 2])


@pytest.mark.parametrize("as_uri", [False, True])
def test_a_checkpoint_saved_but_never_registered_is_the_runs_latest(tmp_path, caplog, as_uri):
    """Ctrl-C as rank 0 saved a checkpoint, before Ray Train registered it: the command said
    the run kept no checkpoint, and `--resume` started over from step 0 and wrote over it.
    A whole state.pt counts (progress.json is brought up to it); one cut short does not."""
    from svt_ray.runs import PROGRESS_FILE, read_json, run_progress

    run_dir = tmp_path / "runs" / "r"
    where = run_dir.as_uri() if as_uri else str(run_dir)  # a remote run directory: a URI
    assert run_progress(where) is None  # no folder yet
    _saved_checkpoint(run_dir, 2)
    _saved_checkpoint(run_dir, 4, whole=False)  # the copy to storage was cut short
    (run_dir / "checkpoint_notes").mkdir()
    assert run_progress(where) == {"step": 2}
    assert read_json(str(run_dir / PROGRESS_FILE)) == {"step": 2}
    assert "checkpoint_00000002 was saved whole, but the run stopped before" in caplog.text
    caplog.clear()
    assert run_progress(where) == {"step": 2} and not caplog.text  # taken once
    _saved_checkpoint(run_dir, 6)  # registered up to 2, saved up to 6
    assert run_progress(where) == {"step": 6}
    (run_dir / PROGRESS_FILE).write_text('{"step": 8}')  # registered, then pruned by hand
    assert run_progress(where) == {"step": 8}
    # A progress.json that a crash of the machine left empty, or a copy cut short: rebuilt from
    # the checkpoints (the resume had stopped, saying to move the run's folder aside).
    caplog.clear()
    for damaged in ("", '{"step": 6'):
        (run_dir / PROGRESS_FILE).write_text(damaged)
        assert run_progress(where) == {"step": 6}
        assert read_json(str(run_dir / PROGRESS_FILE)) == {"step": 6}
        assert "progress.json does not parse; the run's latest whole checkpoint" in caplog.text
    for folder in run_dir.glob("checkpoint_0*"):  # none whole: the run starts over
        (folder / "state.pt").write_bytes(b"cut")
    (run_dir / PROGRESS_FILE).write_text("{")
    assert run_progress(where) is None and not (run_dir / PROGRESS_FILE).exists()


def _manifest_only_dataset(folder, train: int, val: int = 10) -> None:
    """A data_prep output of a manifest only: what runs check before Ray starts reads."""
    from data_prep.shards import SCHEMA_VERSION

    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "shards": [],
        "counts": {"splits": {"train": train, "val": val}, "labels": {"0": train + val}},
    }))  # fmt: skip


def test_a_new_run_is_refused_where_a_stopped_one_left_an_unregistered_checkpoint(
    tmp_path, monkeypatch
):

    monkeypatch.setattr(train_module, "ensure_ray", no_ray)
    _manifest_only_dataset(tmp_path / "data", train=40)
    _saved_checkpoint(tmp_path / "runs" / "r", 10)
    overrides = [f"data.path={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                 "train.run_name=r", "eval.online_every=0", "eval.online_every_clips=0"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"already has checkpoints up to step 10 .* `--resume r`"):
        run_pretraining(load_config("tiny", overrides=overrides))


def test_more_workers_than_cores_on_a_local_ray_is_said(tmp_path, monkeypatch, caplog):
    """`--workers 4` on a 2-core laptop started without a word; only Ray's own warning about
    worker processes hinted that 4 workers now shared 2 cores."""
    import ray

    monkeypatch.setattr(train_module, "ensure_ray", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a new `svt-ray pretrain`
    _manifest_only_dataset(tmp_path / "data", train=400)
    cores = os.cpu_count() or 1
    for workers, said in ((cores, False), (4 * cores, True)):
        caplog.clear()
        overrides = [f"data.path={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                     f"scaling.num_workers={workers}", f"optim.batch_size={8 * workers}",
                     "eval.online_every=0", "eval.online_every_clips=0"]  # fmt: skip
        with pytest.raises(RayStarted):
            run_pretraining(load_config("tiny", overrides=overrides))
        assert (f"{workers} workers x 1 CPU on this {cores}-core machine" in caplog.text) == said


def test_storage_that_cannot_hold_runs_and_a_resume_into_another_store_are_refused_before_ray(
    tmp_path, monkeypatch, mlflow_db, empty_mlflow_store
):
    """`--storage` naming a file ended in NotADirectoryError after Ray's start-up. A resume
    with a --tracking-uri whose store lacks the run's MLflow run was found out mid-run ('not
    reachable'), left the run KILLED in its own store and pointed `mlflow ui` at the new one;
    a SQLite file that did not exist was created empty."""
    import shutil

    from mlflow.tracking import MlflowClient

    from svt_ray.runs import RUN_FILE

    monkeypatch.setattr(train_module, "ensure_ray", no_ray)
    _manifest_only_dataset(tmp_path / "data", train=40)
    (tmp_path / "afile").write_text("")

    def overrides(storage, uri):
        return [f"data.path={tmp_path / 'data'}", f"train.storage_path={storage}",
                "train.run_name=r", "eval.online_every=0", "eval.online_every_clips=0",
                f"tracking.tracking_uri={uri}"]  # fmt: skip

    recorded_uri = f"sqlite:///{mlflow_db}"
    with pytest.raises(ConfigError, match=r"--storage .*afile: cannot write there"):
        run_pretraining(load_config("tiny", overrides=overrides(tmp_path / "afile", recorded_uri)))

    runs = tmp_path / "runs"
    _saved_checkpoint(runs / "r", 10)
    client = MlflowClient(recorded_uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    config = load_config("tiny", overrides=overrides(runs, recorded_uri)).resolve(40)
    (runs / "r" / RUN_FILE).write_text(
        json.dumps({"config": config.model_dump(mode="json"), "mlflow_run_id": run_id})
    )
    other = tmp_path / "other.db"
    for store in ("missing", "empty"):
        if store == "empty":
            shutil.copyfile(empty_mlflow_store, other)  # a store without the run
        with pytest.raises(ConfigError, match=rf"is MLflow run {run_id} of {recorded_uri}, "
                           r"which this store does not hold; resume it with --tracking-uri"):  # fmt: skip
            run_pretraining(
                load_config("tiny", overrides=overrides(runs, f"sqlite:///{other}")), resume=True
            )
        assert other.exists() == (store == "empty")  # not created by the check
    shutil.copyfile(mlflow_db, tmp_path / "moved.db")  # the same store moved: it goes on
    with pytest.raises(RayStarted):
        run_pretraining(
            load_config("tiny", overrides=overrides(runs, f"sqlite:///{tmp_path / 'moved.db'}")),
            resume=True,
        )


def test_ray_lines_nobody_can_act_on_are_left_out_and_others_kept(monkeypatch):
    """The entry points (`svt-ray`, `python -m data_prep`, a study script) give Ray's log
    forwarding a skip pattern before Ray is imported, and importing svt_ray alone does not:
    the lines Ray's own actors print on every run (seen in a 1-epoch `svt-ray pretrain`) are
    left out; a user's own value wins, and real errors, decode warnings and progress lines
    stay."""
    import subprocess
    import sys

    import svt_ray
    from data_prep.cli import main as prep_main
    from svt_ray.cli import main as cli_main
    from svt_ray.studies import StudySpec, Sweep, study_main

    probe = "import {}, ray._private.ray_logging as r; print(getattr(r.stdout_deduplicator.skip_re, 'pattern', None))"
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_SKIP_REGEX"}

    def pattern(statement: str, **extra: str) -> str:
        code = probe.format(statement)
        done = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip()

    assert pattern("svt_ray") == "None"  # no import-time side effect
    quiet = "svt_ray; svt_ray.quiet_ray_logs(); import svt_ray"
    assert pattern(quiet) == svt_ray.RAY_NOISE_REGEX
    assert pattern(quiet, RAY_DEDUP_LOGS_SKIP_REGEX="x") == "x"
    spec = StudySpec("s", "?", [Sweep("optim.batch_size", (8, 16))])
    monkeypatch.setattr(sys, "argv", ["svt-ray", "--help"])
    for entry_point in (cli_main, lambda: prep_main(["--help"]), lambda: study_main(spec, ["-h"])):
        monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
        with pytest.raises(SystemExit):
            entry_point()
        assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == svt_ray.RAY_NOISE_REGEX

    import re

    noise = re.compile(svt_ray.RAY_NOISE_REGEX)
    seen = [
        "[2026-11-30 21:36:40,069 E 16399 16426] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: '30d8' has constructor arguments in the object store and "
        "max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
        "the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for "
        "more details.",
        "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: "
        "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be "
        "removed after January 2027. Use `ExecutionOptions.label_selector` to constrain Ray "
        "Data work to labeled nodes.",
        "  self.exclude_resources = exclude_resources",
        "Progress bars disabled. To enable, set "
        "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    ]
    kept = [
        "tiny-seed0 step 1/2 (50%) | epoch 0.50 | loss 3.512 | 2.1 clips/s | data wait 68% | 8s",
        "skipping clip 018b6cb5d762b1f7: decord cannot open the clip: Error reading 4791 bytes",
        "RuntimeError: CUDA out of memory.",
        "Traceback (most recent call last):",
        "    exclude_resources=exclude_resources,",
    ]
    assert all(noise.search(line) for line in seen)
    assert not any(noise.search(line) for line in kept)


@pytest.mark.parametrize(
    "argv",
    [
        ["svt-ray", "pretrain", "--preset", "tiny", "--set", "optim.epoch=1"],
        ["svt-ray", "pretrain", "--resume", "no-such-run"],
        ["svt-ray", "eval", "--preset", "tiny", "--set", "optim.epoch=1"],
        ["studies/view_count.py", "--set", "optim.epoch=1"],
    ],
    ids=["pretrain", "resume", "eval", "study"],
)
def test_a_mistyped_setting_is_refused_before_torch_and_ray_are_imported(tmp_path, argv):
    """Importing torch and Ray takes 6-8 s on 2 cores: a typo in --set (the commonest slip)
    is said in about a second, by a process that never imported them."""
    import subprocess
    import sys
    from pathlib import Path

    entry = (
        "from svt_ray.cli import main"
        if argv[0] == "svt-ray"
        else f"from svt_ray.studies import study_main; from studies.{Path(argv[0]).stem} "
        "import SPEC; main = lambda: sys.exit(study_main(SPEC))"
    )
    probe = (
        f"import sys; sys.argv = {argv!r}; {entry}\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('EXIT', code, sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "EXIT 2 []", done.stdout + done.stderr
    said = "no run.json" if "--resume" in argv else "optim.epoch: unknown key"
    assert said in done.stderr


def test_a_warmup_longer_than_the_run_is_said_before_ray(tmp_path, monkeypatch, caplog):
    """`--set optim.epochs=1` on a recipe warmed up over 10 epochs: the lr never reaches its
    peak, and nothing said so."""
    from data_prep.shards import SCHEMA_VERSION
    from svt_ray import cluster

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    monkeypatch.setattr(train_module, "ensure_ray", no_ray)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "shards": [], "counts": {"splits": {"train": 64}},
    }))  # fmt: skip
    where = [f"data.path={tmp_path / 'd'}", f"train.storage_path={tmp_path / 'runs'}"]
    for epochs, said in ((1, True), (8, False)):  # tiny: 16 clips a batch, 4 steps an epoch
        caplog.clear()
        overrides = [*where, f"optim.epochs={epochs}", "optim.warmup_epochs=2"]
        with pytest.raises(RayStarted):
            run_pretraining(load_config("tiny", overrides=overrides))
        expected = (
            "optim.warmup_epochs=2 is longer than the run (optim.epochs=1): the lr climbs all "
            "run long, its last step at 38% of its peak 0.00025"  # steps 0-3 of 8: 3/8
        )
        assert (expected in caplog.text) is said


def test_trials_checking_one_storage_together_do_not_fail_each_other(tmp_path):
    """Tune starts a study's trials together, each checking the study's runs folder: with one
    probe name, one trial's unlink made another fail ("cannot write there")."""
    from concurrent.futures import ThreadPoolExecutor

    from svt_ray.runs import check_writable

    def check(_):
        for _ in range(300):
            check_writable(tmp_path, "--storage")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(check, range(4)))
    assert list(tmp_path.iterdir()) == []
