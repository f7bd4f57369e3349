"""Config: presets, overrides, validation messages that name the field, resolve()."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from svt_ray.cli import app
from svt_ray.config import PRESETS, ConfigError, load_config
from svt_ray.views import ViewSampler


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_validate(preset):
    config = load_config(preset)
    assert config.preset == preset
    assert config.views.num_global == len(config.views.global_frame_counts())


def test_paper_preset_is_the_paper_recipe():
    config = load_config("paper")
    assert config.views.global_frame_counts() == [8, 16]
    assert config.views.local_frame_counts() == [2, 2, 4, 4, 8, 8, 16, 16]
    assert (config.views.global_size, config.views.local_size) == (224, 96)
    assert config.num_frames == 16 and config.image_size == 224
    assert (config.model.embed_dim, config.model.depth, config.model.num_heads) == (768, 12, 12)
    # The values of the spec (DINO's) that no other test holds to.
    views, loss = config.views, config.loss
    assert (views.global_crop_scale, views.local_crop_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (views.flip_p, views.color_jitter_p, views.grayscale_p) == (0.5, 0.8, 0.2)
    assert (views.brightness, views.contrast, views.saturation, views.hue) == (0.4, 0.4, 0.2, 0)
    assert (loss.student_temp, loss.teacher_temp, loss.center_momentum) == (0.1, 0.04, 0.9)
    assert config.model.drop_path_rate == 0.1


def test_reference_preset_uses_eight_frames_and_fixed_windows():
    config = load_config("reference_code")
    assert set(config.views.global_frame_counts() + config.views.local_frame_counts()) == {8}
    assert config.views.global_window == "reference"


def test_tiny_preset_keeps_every_code_path():
    views = load_config("tiny").views
    assert len(set(views.global_frame_counts())) == 2  # globals of different frame counts
    assert len(set(views.local_frame_counts())) >= 2  # locals of several frame counts
    assert views.local_size < views.global_size


def test_precedence_preset_file_overrides(tmp_path):
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump({"views": {"num_local": 2}, "optim": {"epochs": 3}}))
    config = load_config("paper", file, ["views.num_local=4"])
    assert config.views.num_local == 4  # --set beats the file
    assert config.optim.epochs == 3  # the file beats the preset
    assert config.views.local_frame_counts() == [2, 4, 8, 16]


def test_a_config_files_preset_line_is_its_base_and_a_mapping_override_merges(tmp_path):
    """`config show --preset tiny` writes `preset: tiny` first: a file with that line built
    the paper model (768 wide) and said tiny; `--set 'model={depth: 2}'` put paper defaults
    under the given key instead of merging as a file's section does; a run's config.yaml
    carried its old `derived` values into a new config."""
    result = CliRunner().invoke(app, ["config", "show", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    (tmp_path / "tiny.yaml").write_text(result.output)
    (tmp_path / "partial.yaml").write_text("preset: tiny\noptim:\n  epochs: 1\n")
    for name in ("tiny.yaml", "partial.yaml"):
        config = load_config(config_file=tmp_path / name)
        assert (config.preset, config.model.embed_dim) == ("tiny", 64), name
    assert load_config("tiny", tmp_path / "partial.yaml").optim.epochs == 1  # the same: fine
    with pytest.raises(ConfigError, match=r"--preset paper and config file .*partial.yaml "
                       r"\(preset: tiny\) disagree"):  # fmt: skip
        load_config("paper", tmp_path / "partial.yaml")
    (tmp_path / "typo.yaml").write_text("preset: tinyy\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: preset 'tinyy' is not one of"):
        load_config(config_file=tmp_path / "typo.yaml")
    assert load_config().preset == "paper"  # no preset anywhere: paper, as before

    merged = load_config("tiny", overrides=["model={depth: 2}"])
    assert (merged.model.depth, merged.model.embed_dim, merged.model.patch_size) == (2, 64, 8)

    run_config = load_config("tiny").resolve(64).model_dump(mode="json")  # as a run records it
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    again = load_config(config_file=tmp_path / "run.yaml", overrides=["optim.batch_size=8"])
    assert again.derived is None and again.resolve(64).derived.per_worker_batch == 8
    with pytest.raises(ConfigError, match=r"derived.\* is computed from the other settings"):
        load_config("tiny", overrides=["derived.lr=1"])


def test_a_value_error_names_the_file_it_is_in_and_numbers_and_run_names_read_as_meant(
    tmp_path,
):
    """A wrong type in a --config file did not name the file (an unknown key did); numbers
    and names read as meant; `--run-name bad/name` made nested folders."""
    (tmp_path / "bad_type.yaml").write_text("optim:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"^\S*bad_type.yaml: optim.batch_size: Input should"):
        load_config("tiny", tmp_path / "bad_type.yaml")
    with pytest.raises(ConfigError, match=r"^optim.batch_size: Input should"):  # the --set's
        load_config("tiny", tmp_path / "bad_type.yaml", ["optim.batch_size=nine"])
    assert load_config("tiny", overrides=["optim.base_lr=5e-4"]).optim.base_lr == 5e-4
    assert load_config("tiny", overrides=["train.run_name=2e5"]).train.run_name == "2e5"
    with pytest.raises(ConfigError, match=r"'preset=tiny': choose the preset with --preset"):
        load_config(overrides=["preset=tiny"])  # it built the paper model and said tiny
    for name in ("bad/name", "..", "a\\b"):
        with pytest.raises(ConfigError, match=r"train.run_name: .* without / or"):
            load_config("tiny", overrides=[f"train.run_name={name}"])
    assert load_config("tiny", overrides=["train.run_name=b8-s0.v2"]).train.run_name == "b8-s0.v2"


def test_overrides_parse_yaml_values():
    config = load_config("tiny", overrides=["views.global_frames=[8, 8]", "model.init_from=null"])
    assert config.views.global_frames == [8, 8]
    assert config.model.init_from is None


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["views.num_locals=4"], "views.num_locals: unknown key"),
        (["nonsense.field=1"], "nonsense: unknown key"),
        (["loss.student_temp=-1"], "loss.student_temp"),
        (["views.flip_p=1.5"], "views.flip_p"),
        (["views.local_frames=[32]"], "views.local_frames: a 32-frame view needs a span of >= 32"),
        (
            ["optim.batch_size=30", "scaling.num_workers=4"],
            "optim.batch_size=30 does not split over scaling.num_workers=4: use a multiple of 4, "
            "or a number of workers that divides it (1, 2, 3, 5, 6, 10, 15, 30)",
        ),
        (
            ["optim.batch_size=32", "scaling.num_workers=4", "optim.accumulation_steps=3"],
            "optim.batch_size=32 does not split into optim.accumulation_steps=3 pieces on each of "
            "scaling.num_workers=4: use a multiple of 12",
        ),
        (["views.global_size=320"], "views.global_size=320 is larger than"),
        (["views.local_size=100"], "views.local_size=100 must be a multiple of model.patch_size"),
        (["views.global_crop_scale=[0.9, 0.4]"], "views.global_crop_scale"),
        (["model.num_heads=5"], "model.embed_dim=768 must be divisible by model.num_heads=5"),
        (["views.num_local=0", "loss.motion_weight=0"], "no loss term has a pair"),
        (["views.num_global=1", "views.num_local=0"], "no loss term has a pair"),
        (["optim"], "must look like section.field=value"),
        (
            ["views.local_frames=[2,4"],  # PyYAML's own message is 7 lines with carets
            "the value is not valid YAML (expected ',' or ']', but got '<stream end>' at column 5 "
            "of '[2,4'); lists are written [2, 4]",
        ),
        (["optim.epochs=.inf"], "optim.epochs: Input should be a finite number"),  # YAML floats
        (["optim.base_lr=.nan"], "optim.base_lr: Input should be a finite number"),
        (["views.global_solarize_p=[]"], "views.global_solarize_p: List should have at least 1"),
        # YAML's yes/no/true/false for a number: pydantic took it as 1 or 0 (a batch of 1)
        (["optim.batch_size=yes"], "optim.batch_size: got a true/false value (YAML reads"),
        (["views.mean=[0.4, true, 0.4]"], "views.mean: got a true/false value"),
        (["views.std=[0.2, 0, 0.2]"], "views.std.1: Input should be greater than 0"),  # x / 0
        # an empty value reads as YAML's null: "Input should be a valid string" said nothing
        (["tracking.tracking_uri="], "tracking.tracking_uri: got an empty value (or YAML's null"),
        (["optim.epochs=~"], "optim.epochs: got an empty value"),
        # the view cutter's seeds (seed x 10007) must be non-negative: every clip was skipped
        (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
        (  # a kNN bank holding its own queries scores 100% whatever the features
            ["eval.test_split=train"],
            "eval.test_split='train' is also eval.train_split: every query would find itself",
        ),
    ],
)
def test_bad_configs_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load_config("paper", overrides=overrides)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_a_misspelt_key_names_the_close_fields_and_the_file_it_is_in(tmp_path):
    def error_of(overrides=(), config_file=None):
        with pytest.raises(ConfigError) as error:
            load_config("tiny", config_file, overrides)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert error_of(["optim.epoch=3"]).endswith(
        "(not a field of optim; did you mean optim.epochs?)"
    )
    assert "did you mean optim.base_lr, optim.lr_reference_batch or optim.min_lr?" in error_of(
        ["optim.lr=0.1"]
    )  # a word of the field's name, not a typo of it
    assert "its fields are tracking_uri, experiment, flush_timeout_s)" in error_of(["tracking.x=1"])
    assert "(not a field of optim; `svt-ray config show` lists them)" in error_of(["optim.zzz=1"])
    assert "optimm: unknown key (not a field of the top level; did you mean optim?)" in error_of(
        ["optimm.epochs=3"]
    )
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  epoch: 3\n")
    assert error_of(config_file=extra).startswith(f"{extra}: optim.epoch: unknown key")
    both = error_of(["optim.lr=1"], extra)  # a --set key is not the file's
    assert both.startswith(f"{extra}: optim.epoch: unknown key") and "; optim.lr: unknown" in both


def test_a_list_of_the_wrong_length_says_how_many_values(tmp_path):
    """pydantic names a short tuple's first missing item: `views.mean.2: Field required`."""
    for value, message in [
        ("views.mean=[0.5,0.5]", "views.mean: give 3 values, not 2"),
        ("views.mean=[0.5,0.5,0.5,0.5]", "views.mean: give 3 values, not 4"),
        ("views.global_crop_scale=[0.5]", "views.global_crop_scale: give 2 values, not 1"),
        ("views.mean=[]", "views.mean: give 3 values, not 0"),  # once, not once per value
    ]:
        with pytest.raises(ConfigError) as error:
            load_config("tiny", overrides=[value])
        assert str(error.value) == message
    config = tmp_path / "short.yaml"
    config.write_text("optim:\n  betas: [0.9]\n")
    with pytest.raises(ConfigError) as error:
        load_config("tiny", config)
    assert str(error.value) == f"{config}: optim.betas: give 2 values, not 1"


def test_range_message_says_what_is_allowed():
    """The span the check allows is the one the sampler cuts: 0.125 x 150 = 18.75, rounded."""
    with pytest.raises(ConfigError, match=r"raise views.clip_frames to >= 256 or use <= 19 frames"):
        load_config("paper", overrides=["views.local_frames=[32]"])
    views = load_config("paper", overrides=["views.local_frames=[19]"]).views
    plan = ViewSampler(views).plan(150, 256, 256, np.random.default_rng(0))
    local = plan.frame_indices[views.num_global]
    assert local[-1] - local[0] + 1 == 19  # one view frame per source frame of its span


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder: name a YAML file"):
        load_config("tiny", tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("optim:\n  epochs: 2 # \xe9poques\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset"):
        load_config("tiny", tmp_path / "latin1.yaml")


def test_yes_and_no_stay_what_they_are_where_a_field_takes_them():
    config = load_config("tiny", overrides=["model.qkv_bias=no", "train.compile=yes"])
    assert config.model.qkv_bias is False and config.train.compile is True


def test_resolve_derives_batch_lr_and_steps():
    config = load_config("paper", overrides=["scaling.num_workers=4"]).resolve(clips_per_epoch=3200)
    derived = config.derived
    assert derived.per_worker_batch == 8
    assert derived.lr == pytest.approx(5e-4 * 32 / 256)  # 6.25e-5, the author's figure
    assert derived.steps_per_epoch == 100
    assert derived.total_steps == 2000 and derived.warmup_steps == 1000
    assert config.model.num_frames == 16 and config.model.image_size == 224
    assert yaml.safe_load(config.dump())["derived"]["per_worker_batch"] == 8
    assert config.flat()["derived.lr"] == pytest.approx(6.25e-5)


def test_resolve_rejects_an_empty_dataset_and_one_smaller_than_a_batch():
    with pytest.raises(ConfigError, match="0 training clips"):
        load_config("tiny").resolve(0)
    # Every worker would fail to get a batch, max_failures + 1 times, before the run stopped.
    batch = load_config("tiny").optim.batch_size
    with pytest.raises(ConfigError, match=rf"global batch of {batch} clips .* has {batch - 1};"):
        load_config("tiny").resolve(batch - 1)
    assert load_config("tiny").resolve(batch).derived.steps_per_epoch == 1
    # A cosine "down" to a floor above its peak raises the lr all run long.
    with pytest.raises(ConfigError, match=r"optim.min_lr: 1 is above the peak lr 0.00025 "):
        load_config("tiny", overrides=["optim.min_lr=1"]).resolve(64)


def test_cli_config_show_prints_the_config():
    result = CliRunner().invoke(
        app, ["config", "show", "--preset", "tiny", "--set", "views.num_local=2"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["views"]["num_local"] == 2 and shown["preset"] == "tiny"


def test_cli_bad_value_prints_one_line_and_exits_2():
    result = CliRunner().invoke(app, ["config", "show", "--set", "views.num_local=-1"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: views.num_local")
    assert "Traceback" not in result.output


def test_a_folder_that_is_not_a_dataset_is_one_line_that_says_what_to_do(
    tmp_path, monkeypatch, capsys
):
    """pretrain, eval and the study scripts check --data before they start Ray or train."""
    import json

    from svt_ray import cluster, studies, train
    from svt_ray.studies import StudySpec, Sweep, study_main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a folder that is not a dataset")

    monkeypatch.setattr(train, "ensure_ray", no_ray)  # pretrain
    monkeypatch.setattr(cluster, "ensure_ray", no_ray)  # eval and the studies
    monkeypatch.setattr(studies, "largest_trial", lambda *args: load_config("tiny"))
    empty = tmp_path / "videos"
    empty.mkdir()
    hint = f"`svt-ray prep VIDEOS {empty}`"
    for command in (["pretrain"], ["eval"]):
        result = CliRunner().invoke(app, [*command, "--preset", "tiny", "--data", str(empty)])
        assert result.exit_code == 2 and "Traceback" not in result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: data.path: {empty}: no manifest")
        assert hint in lines[0]
    spec = StudySpec(name="t", question="?", sweeps=[Sweep("optim.batch_size", [8])])
    flags = ["--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    code = study_main(spec, ["--data", str(empty), *flags])
    printed = capsys.readouterr()
    assert code == 2 and printed.err.startswith(f"error: data.path: {empty}: no manifest")
    assert hint in printed.err and "error" not in printed.out

    (empty / "manifest.json").write_text(json.dumps({"schema_version": 0}))
    result = CliRunner().invoke(app, ["pretrain", "--preset", "tiny", "--data", str(empty)])
    assert "schema_version 0 != 1" in result.stderr and "shard the videos again" in result.stderr


def test_pretraining_the_paper_model_on_cpu_by_default_says_what_it_costs(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path)])
    assert result.stderr.startswith("note: the paper preset's model (~120M parameters) trains on")


def test_a_folder_of_videos_as_data_is_told_to_shard_them(tmp_path):
    videos = tmp_path / "raw"
    (videos / "class_a").mkdir(parents=True)
    (videos / "class_a" / "clip.MP4").write_bytes(b"")
    result = CliRunner().invoke(app, ["pretrain", "--preset", "tiny", "--data", str(videos)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"it holds videos: shard them with `svt-ray prep {videos} SHARDS`" in result.stderr


def test_an_unusable_tracking_uri_is_one_line_and_compare_creates_no_database(
    tmp_path, synthetic_shards
):
    unreachable = "http://127.0.0.1:9"  # the discard port: nothing listens
    data = ["--data", str(synthetic_shards), "--storage", str(tmp_path / "runs")]
    small = ["--set", "optim.batch_size=4"]  # the fixture's 14 training clips hold a batch
    result = CliRunner().invoke(
        app, ["pretrain", "--preset", "tiny", *data, *small, "--tracking-uri", unreachable]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tracking server http://127.0.0.1:9 is unreachable" in lines[0]

    result = CliRunner().invoke(app, ["compare", "--study", "s", "--tracking-uri", unreachable])
    assert result.exit_code == 2 and "is unreachable" in result.stderr
    result = CliRunner().invoke(app, ["compare", "--study", "s", "--tracking-uri", ""])
    assert result.exit_code == 2 and "the tracking URI is empty; give" in result.stderr
    database = tmp_path / "mlflow.db"
    result = CliRunner().invoke(
        app, ["compare", "--study", "s", "--tracking-uri", f"sqlite:///{database}"]
    )
    assert result.exit_code == 2 and f"no MLflow database at {database}" in result.stderr
    assert not database.exists()
    # A SQLite file of something else, or an empty one: compare only reads, and MLflow would
    # have added its tables to it (an 8 KB file became 958 KB).
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(database)) as other:
        other.execute("CREATE TABLE notes (text)")
        other.commit()
    before = database.read_bytes()
    for command in (["compare", "--runs", "abc"], ["pretrain", "--preset", "tiny", *data, *small]):
        result = CliRunner().invoke(app, [*command, "--tracking-uri", f"sqlite:///{database}"])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"{database} is a SQLite database of something else (tables notes)" in (
            result.stderr.replace("\n", " ")
        )
        assert database.read_bytes() == before
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    result = CliRunner().invoke(app, ["compare", "--runs", "abc", "--tracking-uri",
                                      f"sqlite:///{empty}"])  # fmt: skip
    assert result.exit_code == 2 and f"{empty} holds no MLflow data" in result.stderr
    assert empty.read_bytes() == b""


def test_demo_workdir_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["demo", "--workdir", str(blocker / "demo")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: --workdir {blocker / 'demo'}: cannot write there")


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        # `--resume "$RUN"` with RUN unset started a new run
        (["pretrain", "--resume", ""], 2, "--resume: give the name of the run to continue"),
        # compared the study named "runs"
        (["compare", "--runs", ","], 2, "--runs: give at least one run id or name"),
        # trained on one dataset and evaluated on another
        (["demo", "--set", "data.path=/x"], 2, "--set data.path: the demo trains and evaluates"),
        # found after Ray started and the data were made (about a minute)
        (["demo", "--tracking-uri", "http://127.0.0.1:1"], 2, "is unreachable"),
        (["demo", "--set", "model.init_from=/no/such.pt"], 2, "model.init_from: no checkpoint"),
        # a traceback
        (["tracking", "restore", "{db}", "{file}/x.db"], 1, "DATABASE {file}/x.db: cannot create"),
        # "the dataset has -5 training clips"
        (["config", "show", "--clips", "-5"], 2, "--clips -5: give the training clips per epoch"),
    ],
)
def test_commands_refuse_what_they_cannot_do_before_any_work(
    tmp_path, empty_mlflow_store, args, exit_code, message
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    names = {"db": str(empty_mlflow_store), "file": str(blocker)}
    args = [arg.format(**names) for arg in args]
    if args[0] == "demo":
        args += ["--workdir", str(tmp_path / "demo")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == exit_code and "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and message.format(**names) in result.stderr
    assert not (tmp_path / "demo").exists()  # a refused demo makes no folder


def test_a_checkpoint_is_evaluated_with_its_own_settings_not_the_default_presets(tmp_path, capsys):
    """`svt-ray eval --checkpoint` without --preset took the paper preset's clips (8 x 224)
    and probe for a tiny checkpoint; now the checkpoint's record, with --config/--set on top,
    and never another architecture."""
    import typer

    from svt_ray.cli import config_for_checkpoint

    recorded = load_config("tiny").resolve(64).model_dump(mode="json")
    flags = ["eval.linear_epochs=7", "model.depth=2", "data.path=/shards"]
    experiment = config_for_checkpoint(recorded, None, flags)
    tiny = load_config("tiny")
    assert experiment.eval.clip_size == tiny.eval.clip_size != load_config("paper").eval.clip_size
    assert experiment.eval.linear_epochs == 7 and experiment.data.path == "/shards"
    assert experiment.model.depth == tiny.model.depth  # the architecture it was trained with
    assert "model.depth=2 ignored" in capsys.readouterr().err
    # The whole section as one --set: "None: its model section differs" named no culprit.
    experiment = config_for_checkpoint(recorded, None, ["model={depth: 5}"])
    assert experiment.model.depth == tiny.model.depth
    assert "model={depth: 5} ignored" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  depth: 2\n")
    with pytest.raises(typer.Exit):
        config_for_checkpoint(recorded, other, [])
    assert "differs from the checkpoint's architecture" in capsys.readouterr().err


def test_a_preset_other_than_the_recorded_one_is_refused_not_dropped(tmp_path, monkeypatch):
    """`pretrain --resume` and `eval --checkpoint` keep the recorded recipe: `--preset paper`
    on a tiny run was dropped without a word (it had a default, so its use went unseen). The
    recorded preset itself is accepted."""
    import torch

    from svt_ray import cli
    from svt_ray.runs import RUN_FILE, write_json

    recorded = load_config("tiny", overrides=["data.path=/gone"]).resolve(64)
    write_json(
        str(tmp_path / "runs" / "r" / RUN_FILE),
        {"mlflow_run_id": "x", "config": recorded.model_dump(mode="json")},
    )
    resume = ["pretrain", "--resume", "r", "--storage", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, [*resume, "--preset", "paper"])
    assert result.exit_code == 2
    assert "--preset paper: run r was made with the tiny preset; drop --preset" in result.stderr
    result = CliRunner().invoke(app, [*resume, "--preset", "tiny"])
    assert "preset" not in result.stderr and "/gone" in result.stderr  # went on to the data

    checkpoint = tmp_path / "state.pt"
    torch.save({"config": recorded.model_dump(mode="json")}, checkpoint)
    monkeypatch.setattr(cli, "config_for_checkpoint", lambda *args: load_config("tiny"))
    evaluate = ["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")]
    result = CliRunner().invoke(app, [*evaluate, "--preset", "paper"])
    assert result.exit_code == 2
    assert f"checkpoint {checkpoint} was made with the tiny preset" in result.stderr
    result = CliRunner().invoke(app, [*evaluate, "--preset", "tiny"])
    assert "preset" not in result.stderr


def test_eval_of_weights_that_are_not_an_svt_ray_checkpoint_says_what_to_pass(tmp_path):
    """An image ViT's state dict printed `error: 'config'`; a file of one tensor, a traceback."""
    import torch

    foreign = tmp_path / "vit.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, foreign)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    for path, said in ((foreign, "it holds blocks.0.attn.qkv.weight"), (tensor, "holds a Tensor")):
        result = CliRunner().invoke(app, ["eval", "--checkpoint", str(path), "--data", "x"])
        assert result.exit_code == 2, result.output
        assert said in result.stderr and "not an svt-ray checkpoint" in result.stderr


def test_every_config_field_is_documented():
    """The string under each field is its description (pydantic's attribute docstrings): a
    field without one, or a docstring split over several string statements (only the first
    would count), fails here."""
    from pydantic import BaseModel

    from svt_ray.config import ExperimentConfig

    undocumented, sections = [], [ExperimentConfig]
    while sections:
        section = sections.pop()
        for name, field in section.model_fields.items():
            if not (field.description or "").strip():
                undocumented.append(f"{section.__name__}.{name}")
            for kind in getattr(field.annotation, "__args__", (field.annotation,)):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    sections.append(kind)
    assert not undocumented
    prefetch = ExperimentConfig.model_fields["data"].annotation.model_fields["prefetch_batches"]
    assert prefetch.description.endswith("(paper views: 5.3 MB a clip).")  # all of its lines
