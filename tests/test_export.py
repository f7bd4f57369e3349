"""`svt-ray export`: one backbone of a checkpoint, rebuilt by `load_backbone` to the same features."""

from __future__ import annotations

import re

import pytest
import torch
from factories import random_views, small_config
from typer.testing import CliRunner

from svt_ray import __version__
from svt_ray.cli import app
from svt_ray.engine import build_state, state_dict, train_step
from svt_ray.evaluate import FeatureExtractor
from svt_ray.export import FORMAT, export_backbone, load_backbone
from svt_ray.model import build_backbone


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint after two steps, so teacher (EMA) and student differ."""
    config = small_config("tiny", "optim.batch_size=4", "optim.warmup_epochs=0").resolve(400)
    state = build_state(config)
    batch = random_views(config, 4)
    for step in range(2):
        train_step(state, batch, step, torch.Generator().manual_seed(step))
    folder = tmp_path_factory.mktemp("run") / "checkpoint_00000002"
    folder.mkdir()
    torch.save(state_dict(state, 2), folder / "state.pt")
    return folder


def clips(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 3, 8, 64, 64), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("weights", ["teacher", "student"])
def test_exported_backbone_gives_the_checkpoints_features(checkpoint, tmp_path, weights):
    summary = export_backbone(str(checkpoint), tmp_path / "out" / "backbone.pt", weights)
    saved = torch.load(checkpoint / "state.pt", weights_only=True)
    payload = torch.load(summary.path, weights_only=True)  # tensors and plain containers only
    assert payload["format"] == FORMAT
    assert payload["source"] == {"checkpoint": str(checkpoint), "step": 2, "weights": weights}
    expected = {k[len("backbone.") :]: v for k, v in saved[weights].items() if "backbone." in k}
    assert payload["backbone"].keys() == expected.keys()  # the backbone, no head
    assert {"cls_token", "pos_embed", "time_embed", "blocks.0.temporal_attn.qkv.weight"} <= set(
        expected
    )  # the reference VisionTransformer's key names
    assert summary.step == 2 and summary.tensors == len(expected)

    backbone, config = load_backbone(summary.path)
    assert not backbone.training
    reference = build_backbone(config)  # written out: the checkpoint's weights, loaded by hand
    reference.load_state_dict(expected)
    mean, std = config.views.mean, config.views.std
    got = FeatureExtractor(backbone, mean, std).features(clips())
    want = FeatureExtractor(reference, mean, std).features(clips())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("weights", ["teacher", "student"])
def test_the_reference_svt_loaders_read_the_exported_file(checkpoint, tmp_path, weights):
    """The reference loaders, their steps written out (load_state_dict(strict=False) loads
    nothing, silently, from a dict without the keys they filter on):
    - SVT's eval_knn.py: ckpt["teacher"] (fixed in its code), the keys that start with
      `backbone.`, that prefix cut;
    - SVT's latest eval_linear.py: the same over the file's top-level keys;
    - DINO's load_pretrained_weights: ckpt[checkpoint_key], `module.` and `backbone.` stripped."""
    out = tmp_path / "backbone.pt"
    export_backbone(str(checkpoint), out, weights)
    ckpt = torch.load(out, map_location="cpu")
    backbone, config = load_backbone(out)

    def loads_every_weight(state_dict):
        model = build_backbone(config)
        message = model.load_state_dict(state_dict, strict=False)
        assert message.missing_keys == [] and message.unexpected_keys == []
        for name, value in backbone.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name

    def svt_filter(state_dict):
        return {
            key[len("backbone.") :]: value
            for key, value in state_dict.items()
            if key.startswith("backbone.")
        }

    if weights == "teacher":
        loads_every_weight(svt_filter(ckpt["teacher"]))  # eval_knn.py
    else:  # eval_knn.py would read the teacher: there is none, a KeyError, not random weights
        assert "teacher" not in ckpt
    loads_every_weight(svt_filter(ckpt))  # eval_linear.py
    dino = {k.replace("module.", ""): v for k, v in ckpt[weights].items()}
    loads_every_weight({k.replace("backbone.", ""): v for k, v in dino.items()})

    tensor_bytes = sum(v.numel() * v.element_size() for v in ckpt["backbone"].values())
    assert out.stat().st_size < 1.5 * tensor_bytes  # the weights once, not four times


def test_the_timesformer_loader_reads_the_exported_file(tmp_path):
    """facebookresearch/TimeSformer's load_pretrained(pretrained_model=FILE), its steps
    written out: ckpt["model"], the patch-weight filter (3 channels), the classifier dropped
    for another class count, the divided space-time copy of attn/norm1 to the temporal ones
    where missing, then load_state_dict(strict=False)."""
    config = small_config("tiny", "model.frame_difference=false").resolve(400)
    folder = tmp_path / "checkpoint_00000000"
    folder.mkdir()
    torch.save(state_dict(build_state(config), 0), folder / "state.pt")
    out = tmp_path / "backbone.pt"
    export_backbone(str(folder), out)

    checkpoint = torch.load(out, map_location="cpu")
    assert not {"state_dict", "model_state"} & checkpoint.keys()  # so it is taken as it is
    state = dict(checkpoint["model"])
    patch = state["patch_embed.proj.weight"]
    size = patch.shape[-1]
    state["patch_embed.proj.weight"] = patch.reshape(patch.shape[0], 3, size, size)
    num_classes = 101  # UCF-101
    if num_classes != state["head.weight"].size(0):
        del state["head.weight"], state["head.bias"]
    copied = dict(state)
    for key in state:
        for name, temporal in (("attn", "temporal_attn"), ("norm1", "temporal_norm1")):
            if "blocks" in key and name in key and key.replace(name, temporal) not in state:
                copied[key.replace(name, temporal)] = state[key]
    model = build_backbone(config)
    message = model.load_state_dict(copied, strict=False)
    assert message.missing_keys == []
    backbone, _ = load_backbone(out)
    for name, value in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_teacher_and_student_exports_differ(checkpoint, tmp_path):
    teacher = export_backbone(str(checkpoint), tmp_path / "t.pt", "teacher")
    student = export_backbone(str(checkpoint), tmp_path / "s.pt", "student")
    a = torch.load(teacher.path, weights_only=True)["backbone"]
    b = torch.load(student.path, weights_only=True)["backbone"]
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_failed_write_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    """The disk fills up halfway through the file: no half-written backbone is left (under
    its name or as a temporary file) for a later load to trip on."""
    from pyarrow import fs as pafs

    import data_prep.inputs

    class FullDisk:  # this machine's disk, full after half of what is written
        def __init__(self):
            self.local = pafs.LocalFileSystem()

        def __getattr__(self, name):
            return getattr(self.local, name)

        def open_output_stream(self, path):
            stream = self.local.open_output_stream(path)

            class HalfWritten:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    stream.close()

                def write(self, data):
                    stream.write(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")

            return HalfWritten()

    monkeypatch.setattr(
        data_prep.inputs, "resolve_filesystem", lambda target: (FullDisk(), str(target))
    )
    with pytest.raises(OSError, match="No space left"):
        export_backbone(str(checkpoint), tmp_path / "backbone.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_backbone_names_a_training_checkpoint_for_what_it_is(checkpoint):
    with pytest.raises(
        ValueError, match=r"state\.pt: not an svt-ray backbone file.*svt-ray export"
    ):
        load_backbone(checkpoint / "state.pt")


def test_load_backbone_says_what_is_wrong_with_a_file_it_cannot_build(checkpoint, tmp_path):
    """From a user's own code: each failure names the file and what it found (were: "not an
    svt-ray backbone file", a raw pydantic ValidationError, a 661-character RuntimeError,
    "no SVT checkpoint at ... (expected state.pt)")."""
    good = torch.load(export_backbone(str(checkpoint), tmp_path / "good.pt").path)

    def saved(name, **changes):
        torch.save({**good, **changes}, tmp_path / name)
        return tmp_path / name

    newer = saved("v2.pt", format="svt-ray backbone v2")
    with pytest.raises(
        ValueError,
        match=r"v2\.pt: an svt-ray backbone of format 'svt-ray backbone v2'; this version reads "
        r"'svt-ray backbone v1'",
    ):
        load_backbone(newer)

    config = {**good["config"], "model": {**good["config"]["model"], "mixture": 4}}
    other_version = saved("fields.pt", config=config)
    with pytest.raises(
        ValueError,
        match=r"fields\.pt: its recorded config was written by another build of svt-ray "
        rf"{re.escape(__version__)} and does not fit this one .*: model\.mixture: unknown key"
        r".*Load it with that version, or export the checkpoint again",
    ):
        load_backbone(other_version)

    weights = dict(good["backbone"])
    del weights["norm.bias"]
    weights["cls_token"] = torch.zeros(1, 1, 7)
    weights["blocks.0.extra"] = torch.zeros(1)
    changed = saved("weights.pt", backbone=weights)
    with pytest.raises(ValueError) as error:
        load_backbone(changed)
    assert str(error.value) == (
        f"{changed}: its weights do not fit the architecture of its config (missing norm.bias; "
        "unexpected blocks.0.extra; cls_token is (1, 1, 7), the model's (1, 1, 32))"
    )

    with pytest.raises(FileNotFoundError, match=r"^no file at nope\.pt$"):
        load_backbone("nope.pt")


def test_cli_export_and_its_errors(checkpoint, tmp_path):
    out = tmp_path / "svt_backbone.pt"
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(out)])
    assert result.exit_code == 0, result.output
    assert "teacher backbone of step 2" in result.stdout and out.is_file()

    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: no SVT checkpoint at {tmp_path / 'missing'}: it does")
    pruned = checkpoint.parent / "checkpoint_00000001"  # another of its run: not kept
    result = CliRunner().invoke(app, ["export", str(pruned), str(out)])
    assert result.exit_code == 2
    assert f"it does not exist; its run's latest is {checkpoint}" in result.stderr.replace("\n", "")
    result = CliRunner().invoke(app, ["export", str(checkpoint.parent), str(out)])  # the run
    assert (
        result.exit_code == 2 and "is a run's folder, not one of its checkpoints" in result.stderr
    )
    assert f"its latest: {checkpoint}" in result.stderr.replace("\n", "")
    result = CliRunner().invoke(app, ["export", str(tmp_path), str(out)])  # a folder
    assert "a checkpoint folder holds state.pt, and this one does not" in result.stderr
    result = CliRunner().invoke(app, ["export", str(checkpoint), str(out), "--weights", "ema"])
    assert result.exit_code == 2 and "error: --weights: 'ema'" in result.stderr
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", str(out), str(tmp_path / "again.pt")])
    assert result.exit_code == 2 and "is already an exported backbone" in result.stderr
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "other.pt"), str(out)])
    assert result.exit_code == 2 and "is not an svt-ray training checkpoint" in result.stderr


def test_cli_export_refuses_to_write_over_the_checkpoint_it_reads(tmp_path):
    """`svt-ray export run/checkpoint_N run/checkpoint_N/state.pt` replaced the training state
    (both networks, optimiser, centre) with the export: refused, however the file is named."""
    config = small_config("tiny").resolve(400)
    folder = tmp_path / "run" / "checkpoint_00000001"
    folder.mkdir(parents=True)
    torch.save(state_dict(build_state(config), 1), folder / "state.pt")
    before = (folder / "state.pt").read_bytes()
    for source, out in [
        (folder, folder / "state.pt"),
        (folder / "state.pt", folder / "state.pt"),
        (folder, tmp_path / "run" / ".." / "run" / folder.name / "state.pt"),
        (folder.as_uri(), folder / "state.pt"),
        (folder, (folder / "state.pt").as_uri()),
    ]:
        result = CliRunner().invoke(app, ["export", str(source), str(out)])
        assert result.exit_code == 2, result.output
        assert f"error: {out} is the checkpoint's own file" in result.stderr
        assert "Traceback" not in result.output
    assert (folder / "state.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["state.pt"]


def test_cli_export_names_an_out_it_cannot_write(checkpoint, tmp_path, monkeypatch):
    """OUT a folder, empty, or under a file: one line naming OUT (was an OSError traceback)."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)
    cases = {
        str(tmp_path): f"{tmp_path} is a folder: name a file inside it, e.g. "
        f"{tmp_path}/svt_backbone.pt",
        "": "OUT is empty: name the file to write, e.g. svt_backbone.pt",
        str(tmp_path / "a_file" / "x.pt"): f"cannot write {tmp_path / 'a_file' / 'x.pt'}: "
        f"{tmp_path / 'a_file'} is a file, not a folder",
        (tmp_path / "a_file" / "x.pt").as_uri(): "cannot write file://",
    }
    for out, message in cases.items():
        result = CliRunner().invoke(app, ["export", str(checkpoint), out])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("data_prep.shards.write_file", full_disk)
    result = CliRunner().invoke(app, ["export", str(checkpoint), "svt_backbone.pt"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot write svt_backbone.pt: [Errno 28] No space")


def test_evaluation_takes_an_exported_file_as_it_takes_the_checkpoint(checkpoint, tmp_path):
    """`svt-ray eval --checkpoint svt_backbone.pt`: the Ray Data feature UDF, run in-process."""
    from svt_ray.evaluate import FeatureUDF

    exported = export_backbone(str(checkpoint), tmp_path / "backbone.pt").path
    config = torch.load(exported, weights_only=True)["config"]
    udf = FeatureUDF(config, {"ckpt": str(checkpoint), "file": str(exported)}, ["clip"])
    batch = {
        "label": torch.arange(3).numpy(),
        "clip_id": torch.arange(3).numpy(),
        "clip": clips().numpy(),
    }
    out = udf(batch)
    assert (out["ckpt/clip"] == out["file/clip"]).all()


def test_export_to_and_load_from_a_filesystem_uri(checkpoint, tmp_path):
    """`svt-ray export CKPT s3://bucket/x.pt`: any pyarrow filesystem URI (file:// here)."""
    uri = (tmp_path / "bucket" / "deep" / "backbone.pt").as_uri()
    result = CliRunner().invoke(app, ["export", checkpoint.as_uri(), uri])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith(uri)  # named as given, not as a mangled local path
    backbone, _ = load_backbone(uri)
    local = export_backbone(str(checkpoint), tmp_path / "local.pt").path
    expected = torch.load(local, weights_only=True)["backbone"]
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_a_checkpoint_of_another_version_says_so_in_export_and_eval(checkpoint, tmp_path):
    """A checkpoint whose recorded config this version's schema rejects (a field renamed or
    removed since) names the version that wrote it, not only a pydantic report."""
    saved = torch.load(checkpoint / "state.pt", weights_only=True)
    assert saved["svt_ray_version"] == __version__ and __version__ != "unknown"
    config = {**saved["config"], "model": {**saved["config"]["model"], "old_knob": 3}}
    old = tmp_path / "old.pt"
    torch.save({**saved, "config": config, "svt_ray_version": "0.0.9"}, old)

    result = CliRunner().invoke(app, ["export", str(old), str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        f"error: {old}: its recorded config was written by svt-ray 0.0.9 and does not fit this "
        f"one ({__version__}): model.old_knob: unknown key"
    ) in result.stderr
    assert "Export it with the svt-ray version that trained it" in result.stderr
    assert not (tmp_path / "out.pt").exists()

    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(old), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--checkpoint {old}: its recorded config was written by svt-ray 0.0.9" in result.stderr
    assert "Evaluate it with the svt-ray version that trained it" in result.stderr

    exported = torch.load(export_backbone(str(checkpoint), tmp_path / "bb.pt").path)
    assert exported["svt_ray_version"] == __version__
