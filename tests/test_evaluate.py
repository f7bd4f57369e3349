"""kNN and linear probe: perfect on separable features, chance on random labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from svt_ray.evaluate import (
    FeatureExtractor,
    describe_evaluation,
    evaluate_features,
    format_table,
    knn_accuracy,
    knn_scores,
    linear_probe_accuracy,
    topk_accuracy,
)
from svt_ray.model import TimeSformer


def separable(n_per_class=30, classes=5, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 5
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    accuracy = topk_accuracy(scores, torch.tensor([1, 2, 0]))
    assert accuracy.top1 == pytest.approx(100 / 3)
    assert accuracy.top5 == pytest.approx(100.0)  # only 3 classes: top-5 covers all


def test_knn_votes_match_a_written_out_reference():
    train, labels = separable(4, 3, 8)
    test = torch.randn(5, 8)
    scores = knn_scores(train, labels, test, num_classes=3, k=3, temperature=0.1)
    normed_train = torch.nn.functional.normalize(train, dim=1)
    for i, query in enumerate(torch.nn.functional.normalize(test, dim=1)):
        similarity = normed_train @ query
        expected = torch.zeros(3)
        for j in similarity.argsort(descending=True)[:3]:
            expected[labels[j]] += torch.exp(similarity[j] / 0.1)
        torch.testing.assert_close(scores[i], expected)


def test_knn_scores_in_chunks_match_a_written_out_reference():
    """Queries scored a few at a time (a chunk that does not divide them) get DINO's votes:
    sum over the k most cosine-similar training features of exp(similarity / T), per class."""
    train, labels = separable(5, 4, 6, seed=2)
    test = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    scores = knn_scores(train, labels, test, num_classes=4, k=5, temperature=0.2, chunk=3)
    assert scores.shape == (7, 4)
    normed_train = train / train.norm(dim=1, keepdim=True)
    for i, query in enumerate(test / test.norm(dim=1, keepdim=True)):
        similarity = normed_train @ query
        expected = torch.zeros(4)
        for j in similarity.argsort(descending=True)[:5]:
            expected[labels[j]] += torch.exp(similarity[j] / 0.2)
        torch.testing.assert_close(scores[i], expected)


def test_linear_probe_standardises_test_features_with_the_training_statistics():
    """One feature: the training classes sit at 0..3 and 7..10, so the learnt boundary is
    near 5 in raw units. The test set is mostly far-right class-1 clips: standardised with
    its own mean (about 18) the clips at 8 would fall on the class-0 side; with the training
    statistics every test clip is on its side of 5."""
    train = torch.tensor([0.0, 1, 2, 3, 7, 8, 9, 10]).repeat(4)[:, None]
    train_labels = (train[:, 0] > 5).long()
    test = torch.tensor([2.0, 3, 8, 8, 8, 30, 30, 30, 30, 30])[:, None]
    test_labels = (test[:, 0] > 5).long()
    accuracy = linear_probe_accuracy(train, train_labels, test, test_labels, 2, epochs=20)
    assert accuracy.top1 == 100.0


def test_a_feature_constant_in_training_does_not_upset_the_linear_probe():
    """A dimension that is 0 on every training clip (a dead unit, a letterboxed pixel) and
    varies a little on the test clips: the probe scores as it does without it (divided by a
    clamped std, it was blown up 1e6-fold and the probe fell to chance)."""
    generator = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 4, generator=generator), torch.randn(200, 4, generator=generator)
    train_labels, test_labels = (train[:, 0] > 0).long(), (test[:, 0] > 0).long()
    without = linear_probe_accuracy(train, train_labels, test, test_labels, 2, epochs=20)
    train_dead = torch.cat([train, torch.zeros(200, 1)], 1)
    test_dead = torch.cat([test, 0.01 * torch.randn(200, 1, generator=generator)], 1)
    dead = linear_probe_accuracy(train_dead, train_labels, test_dead, test_labels, 2, epochs=20)
    assert without.top1 > 90 and abs(dead.top1 - without.top1) <= 1.0


def test_knn_and_linear_are_perfect_on_separable_features():
    train, train_labels = separable(seed=0)
    test, test_labels = separable(seed=0)
    test = test + 0.1 * torch.randn_like(test)
    assert knn_accuracy(train, train_labels, test, test_labels, 5).top1 == 100.0
    probe = linear_probe_accuracy(train, train_labels, test, test_labels, 5, epochs=30)
    assert probe.top1 == 100.0


def test_knn_and_linear_are_at_chance_on_random_labels():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(2000, 32, generator=generator)
    test = torch.randn(1000, 32, generator=generator)
    train_labels = torch.randint(0, 10, (2000,), generator=generator)
    test_labels = torch.randint(0, 10, (1000,), generator=generator)
    knn = knn_accuracy(train, train_labels, test, test_labels, 10)
    probe = linear_probe_accuracy(train, train_labels, test, test_labels, 10, epochs=10)
    for accuracy in (knn, probe):
        assert 5.0 <= accuracy.top1 <= 15.0  # chance is 10%
        assert 40.0 <= accuracy.top5 <= 60.0  # chance is 50%


def test_sparse_labels_are_scored_over_the_classes_they_hold():
    """Class folders named 3 and 1000 are labels 3 and 1000: scored with a column per label
    up to the largest, an evaluation said 1001 classes (chance 0.1%) and a top-5 of 87.5."""
    from svt_ray.evaluate import OnlineKNN, dense_labels

    (train, test), classes = dense_labels(torch.tensor([1000, 3, 3]), torch.tensor([3, 1000]))
    assert (train.tolist(), test.tolist(), classes) == ([1, 0, 0], [0, 1], 2)
    backbone = TimeSformer(
        patch_size=8, embed_dim=16, depth=1, num_heads=2, image_size=32, num_frames=2
    )
    generator = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (6, 3, 2, 32, 32), dtype=torch.uint8, generator=generator)
    knn = OnlineKNN(
        {"clip": bank, "label": torch.tensor([3, 1000, 7, 3, 1000, 7])},
        {"clip": bank[:3], "label": torch.tensor([3, 1000, 7])},
        mean=(0.5,) * 3, std=(0.25,) * 3, k=3,
    )  # fmt: skip
    assert knn.num_classes == 3 and knn.bank["label"].tolist() == [0, 2, 1, 0, 2, 1]
    bank_features, query_features = knn.features(backbone, bank), knn.features(backbone, bank[:3])
    dense = torch.tensor([0, 2, 1, 0, 2, 1])  # 3 -> 0, 7 -> 1, 1000 -> 2, written out
    assert knn(backbone) == knn_accuracy(bank_features, dense, query_features, dense[:3], 3, k=3)


def test_ray_datas_read_only_arrays_become_tensors_without_a_warning():
    import warnings

    from svt_ray.evaluate import read_only_tensor

    array = np.arange(6, dtype=np.uint8)
    array.flags.writeable = False  # as Ray Data's batches on Arrow memory are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_only_tensor(array).tolist() == list(range(6))


def test_each_backbones_rows_score_its_clip_then_the_mean_of_its_slow_and_fast_clips():
    """An evaluation's rows from its feature columns, against rows scored from columns written
    out here: the single (slow) clip, then the slow-fast mean (svt_spec §5), then the pixels.
    The slow clip's features are noise and the fast clip's separate the classes, so a row
    built from the wrong column scores visibly differently."""
    from svt_ray.config import load_config
    from svt_ray.evaluate import score_features

    settings = load_config("tiny").eval.model_copy(update={"linear_epochs": 5})
    generator = torch.Generator().manual_seed(3)
    fast, labels = separable(seed=0)
    columns = {}
    for split, moved in (("train", 0.0), ("test", 0.1)):
        slow = 2 * torch.randn(fast.shape, generator=generator)
        columns[split] = {
            "a/clip": slow.numpy(),
            "a/fast": (fast + moved * torch.randn(fast.shape, generator=generator)).numpy(),
            "pixels": (slow + 1).numpy(),
            "label": labels.numpy(),
        }
    rows = score_features(settings, ["a"], columns["train"], columns["test"], pixel_baseline=True)

    def expected(name, train_x, test_x):
        train, test = columns["train"], columns["test"]
        return evaluate_features(
            name, torch.from_numpy(train_x), torch.from_numpy(train["label"]),
            torch.from_numpy(test_x), torch.from_numpy(test["label"]), 5, settings.knn_k,
            settings.knn_temperature, settings.linear_epochs,
        )  # fmt: skip

    train, test = columns["train"], columns["test"]
    mean_train = (train["a/clip"] + train["a/fast"]) / 2
    mean_test = (test["a/clip"] + test["a/fast"]) / 2
    assert rows == [
        expected("a", train["a/clip"], test["a/clip"]),
        expected("a slow-fast", mean_train, mean_test),
        expected("frame pixels", train["pixels"], test["pixels"]),
    ]
    assert rows[1].knn.top1 > rows[0].knn.top1 + 30  # the fast clip's features count


def test_extracted_features_are_the_backbone_on_normalised_pixels():
    """uint8 (b, 3, t, h, w) clips go in as (clips / 255 - mean) / std, per channel, into the
    backbone's forward_features in eval mode (no drop path), as float32 on the CPU."""
    torch.manual_seed(0)
    backbone = TimeSformer(
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        image_size=32,
        num_frames=4,
        drop_path_rate=0.5,
    )
    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.6)
    extractor = FeatureExtractor(backbone.train(), mean=mean, std=std)
    clips = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    features = extractor.features(clips)
    pixels = clips.float() / 255
    channel = (3, 1, 1, 1)
    normalised = (pixels - torch.tensor(mean).view(channel)) / torch.tensor(std).view(channel)
    with torch.no_grad():
        expected = backbone.eval().forward_features(normalised)
        unnormalised = backbone.forward_features(pixels)
    assert features.dtype == torch.float32 and features.shape == (2, 16)
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, unnormalised, atol=1e-3)  # the normalisation shows


def test_format_table():
    table = format_table([{"features": "single", "knn_top1": 51.25}])
    assert table.splitlines() == ["| features | knn_top1 |", "|---|---|", "| single | 51.2 |"]


def test_an_evaluation_says_what_its_numbers_are_read_against():
    """`svt-ray eval` printed the table alone: 19.0 top-1 of 21 clips of 4 classes, below
    chance, and top-5 at 100 for every row, said nothing without the clip and class counts."""
    from svt_ray.config import load_config

    train, train_labels = separable(n_per_class=6, classes=4)
    test, test_labels = separable(n_per_class=3, classes=4, seed=1)
    result = evaluate_features("x", train, train_labels, test, test_labels, 4, k=5, linear_epochs=2)
    settings = load_config("tiny").eval
    assert describe_evaluation([result], settings) == (
        f"12 'val' clips, 4 classes (chance 25.0% top-1), scored by kNN (k={settings.knn_k}) and "
        f"a linear probe ({settings.linear_epochs} epochs) fitted on 24 'train' clips; top-5 is "
        "100 with 4 classes:"
    )
    few = evaluate_features("x", train[:6], train_labels[:6], test, test_labels, 4, k=20,
                            linear_epochs=1)  # fmt: skip
    assert "scored by kNN (k=6) " in describe_evaluation(
        [few], settings
    )  # the neighbours there are


def test_the_starting_point_row_is_the_runs_own_initialisation_with_init_from(tmp_path):
    """The baseline row (backbone None) is the network the run started from: its seed's
    random weights, and with `model.init_from` the image ViT's spatial weights on top, not
    a random network that the run never was."""
    from factories import small_config

    from svt_ray.engine import build_state
    from svt_ray.evaluate import FeatureUDF, initial_row_name
    from svt_ray.model import build_backbone

    config = small_config("tiny")
    assert initial_row_name(config) == "random init"
    image_vit = {
        key: torch.randn_like(value)
        for key, value in build_backbone(config).state_dict().items()
        if "temporal" not in key and key != "time_embed"
    }
    torch.save({"model": image_vit}, tmp_path / "vit_small.pth")
    config = small_config("tiny", f"model.init_from={tmp_path / 'vit_small.pth'}").resolve(64)
    assert initial_row_name(config) == "start (vit_small.pth)"
    udf = FeatureUDF(config.model_dump(mode="json"), {"start": None}, ["clip"], device="cpu")
    started = udf.extractors["start"].backbone.state_dict()
    teacher = build_state(config).teacher.backbone.state_dict()  # the run at step 0
    assert started.keys() == teacher.keys()
    for key, value in teacher.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0, msg=key)
    loaded = image_vit["blocks.0.attn.qkv.weight"]
    assert torch.equal(started["blocks.0.attn.qkv.weight"], loaded)


def test_init_from_is_made_absolute_and_checked_on_the_driver(tmp_path, monkeypatch):
    """Ray workers resolve a relative path in their own working directory, and a missing file
    failed every worker (and its restarts): the driver checks it and hands on the absolute
    path, for training (`run_pretraining`, the studies) and the evaluation's start row."""
    from factories import small_config

    from svt_ray.config import ConfigError
    from svt_ray.evaluate import evaluate_backbones
    from svt_ray.model import check_init_from

    monkeypatch.chdir(tmp_path)
    (tmp_path / "vit.pth").write_bytes(b"")
    config = small_config("tiny", "model.init_from=vit.pth")
    check_init_from(config)
    assert config.model.init_from == str(tmp_path / "vit.pth")
    for path, message in (("gone.pth", f"no checkpoint at {tmp_path / 'gone.pth'}"),
                          ("s3://b/vit.pth", "a local file is read, not a URI")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            check_init_from(small_config("tiny", f"model.init_from={path}"))
    missing = small_config("tiny", "model.init_from=gone.pth")
    with pytest.raises(ConfigError, match="no checkpoint at"):  # before any data is read
        evaluate_backbones(missing, {"start": None}, str(tmp_path / "no_dataset"))


def test_load_state_from_a_folder_a_file_and_a_uri(tmp_path):
    from svt_ray.evaluate import load_state

    torch.save({"step": 7}, tmp_path / "state.pt")
    assert load_state(str(tmp_path))["step"] == 7
    assert load_state(str(tmp_path / "state.pt"))["step"] == 7
    assert load_state(tmp_path.as_uri())["step"] == 7
    with pytest.raises(FileNotFoundError, match="no SVT checkpoint"):
        load_state(str(tmp_path / "missing"))
    torch.save({"step": 8}, tmp_path / "backbone.pth")  # any file name, over a URI too
    assert load_state((tmp_path / "backbone.pth").as_uri())["step"] == 8
    with pytest.raises(FileNotFoundError, match="no SVT checkpoint"):
        load_state((tmp_path / "missing.pt").as_uri())
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk" * 10)
    with pytest.raises(ValueError, match=r"junk\.pt: not a checkpoint torch can load safely"):
        load_state(str(tmp_path / "junk.pt"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_load_state_maps_a_local_checkpoint_instead_of_reading_it(tmp_path):
    """`svt-ray eval --checkpoint` reads only the config of a checkpoint that holds both
    networks and the optimiser: mapped, the tensors cost no memory until they are used. Their
    data lies in a mapping of the file (/proc/self/maps), not in memory read from it."""
    from svt_ray.evaluate import load_state

    torch.save({"config": {"preset": "tiny"}, "weights": torch.ones(1024)}, tmp_path / "state.pt")
    state = load_state(str(tmp_path))
    assert state["config"] == {"preset": "tiny"}
    address = state["weights"].data_ptr()
    mapped = [
        line.split()[0].split("-")
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str(tmp_path / "state.pt"))
    ]
    assert any(int(start, 16) <= address < int(end, 16) for start, end in mapped)
    assert float(state["weights"][-1]) == 1.0


def test_evaluation_without_a_held_out_split_says_so_before_decoding(tmp_path):
    import json

    from data_prep.shards import SCHEMA_VERSION
    from svt_ray.config import ConfigError, load_config
    from svt_ray.evaluate import evaluate_backbones

    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "shards": [],
                    "counts": {"splits": {"train": 40}}})
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"no clips of split 'val' .* --val-fraction 0.1"):
        evaluate_backbones(load_config("tiny"), {"random": None}, str(tmp_path))
    # Videos loose at the input's root have no class: nothing to score (was a bare ValueError
    # from the inference after every clip had been decoded).
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "shards": [],
                    "counts": {"splits": {"train": 40, "val": 10}, "labels": {"-1": 50}}})
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"none of its clips has a class label .*class folders"):
        evaluate_backbones(load_config("tiny"), {"random": None}, str(tmp_path))
    # A flat folder of two videos: no label, and no clip drawn into 'val' (the default 0.1).
    # The labels come first (the split advice repeated the default), then the split.
    flat = {"splits": {"train": 2}, "labels": {"-1": 2}}
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "shards": [], "counts": flat,
                    "options": {"val_fraction": 0.1}})
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"none of its clips has a class label"):
        evaluate_backbones(load_config("tiny"), {"random": None}, str(tmp_path))
    flat["labels"] = {"0": 2}
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "shards": [], "counts": flat,
                    "options": {"val_fraction": 0.1}})
    )  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"its 2 clips drew split 'val' with --val-fraction 0.1 and none did: prepare more",
    ):
        evaluate_backbones(load_config("tiny"), {"random": None}, str(tmp_path))


class _Payload:
    """Stands for any pickled object: unpickling it would run its class's code."""


def test_load_state_refuses_a_checkpoint_that_pickles_objects(tmp_path):
    from svt_ray.evaluate import load_state

    torch.save({"step": 7, "payload": _Payload()}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"holds Python objects besides tensors, so it is not"):
        load_state(str(tmp_path))
    # A file torch did not write (a config given to `export`): said, not torch's advice to
    # load it unrestricted.
    (tmp_path / "tiny.yaml").write_text("preset: tiny\n")
    with pytest.raises(ValueError, match=r"tiny.yaml: not a file torch.save wrote; pass a"):
        load_state(str(tmp_path / "tiny.yaml"))
    # A checkpoint cut short by a copy is one, and its own error says what is wrong with it.
    torch.save({"step": 7}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.pt: not a checkpoint torch can load safely"):
        load_state(str(tmp_path / "cut.pt"))


@pytest.mark.parametrize(
    ("cluster_gpus", "address", "trained_on_gpus", "expected"),
    [
        (0, None, 0, 0.0),  # a laptop
        (0, None, 1, 0.0),  # a laptop evaluating a GPU-trained checkpoint: no GPU to wait for
        (2, None, 0, 1.0),  # a local GPU machine
        (0, "auto", 1, 1.0),  # a cluster whose GPU nodes are scaled down: the autoscaler adds one
        (0, "auto", 0, 0.0),  # a CPU cluster
        (8, "auto", 0, 1.0),
    ],
)
def test_feature_extraction_asks_ray_for_a_gpu_not_the_drivers_torch(
    monkeypatch, cluster_gpus, address, trained_on_gpus, expected
):
    import ray

    from svt_ray.config import load_config
    from svt_ray.evaluate import inference_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": float(cluster_gpus)})
    overrides = [f"scaling.gpus_per_worker={trained_on_gpus}"]
    if address:
        overrides.append(f"scaling.address={address}")
    assert inference_gpus(load_config("tiny", overrides=overrides)) == expected


def test_the_online_knn_reads_the_clips_its_driver_decoded_once_for_all_runs(
    synthetic_shards, ray_session, tmp_path, monkeypatch, caplog
):
    """`OnlineKNN.prepare` (the driver, before training) decodes the bank and the queries into
    the storage, one folder per dataset and settings, shared by runs and by a study's trials;
    `from_config` (rank 0, at every start) reads them instead of decoding, the same clips as
    a decode in its own process; where they are gone it decodes them itself, with a warning."""
    from svt_ray import data
    from svt_ray.config import load_config
    from svt_ray.evaluate import OnlineKNN

    def config(*overrides):
        return load_config("tiny", overrides=[
            f"data.path={synthetic_shards}", f"train.storage_path={tmp_path / 'runs'}",
            "eval.online_bank_clips=9", "eval.online_query_clips=4", "eval.clip_size=32",
            "views.clip_frames=32", "views.interpolation=bicubic", *overrides,
        ])  # fmt: skip

    trials = [
        config("optim.batch_size=4"),
        config("optim.batch_size=8"),
        config("eval.clip_frames=4"),
    ]
    folders = OnlineKNN.prepare(trials)
    assert folders[0] == folders[1] == OnlineKNN.cache_folders(trials[0])  # same clips, shared
    assert folders[2]["bank"] != folders[0]["bank"] and folders[2]["query"] != folders[0]["query"]
    root = tmp_path / "runs" / OnlineKNN.CACHE_FOLDER
    assert sorted(p.name for p in root.iterdir()) == sorted(
        Path(f).name for where in (folders[0], folders[2]) for f in where.values()
    )

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded in the worker")

    reference = {}
    with monkeypatch.context() as patch:
        patch.setattr(data, "load_eval_clips", no_decode)
        patch.setattr(data, "cache_eval_clips", no_decode)
        assert OnlineKNN.prepare(trials[0]) == [folders[0]]  # decoded already: nothing to do
        knn = OnlineKNN.from_config(trials[0], folders[0])
    assert knn.bank["clip"].shape == (9, 3, 8, 32, 32) and len(knn.query["label"]) == 4
    for name, held, split, count in (
        ("bank", knn.bank, "train", 9),
        ("query", knn.query, "val", 4),
    ):
        reference[name] = data.load_eval_clips(
            str(synthetic_shards), split, {"clip": (8, 32)}, count, window_frames=32,
            decoder="decord", interpolation="bicubic",
        )  # fmt: skip
        np.testing.assert_array_equal(held["clip"].numpy(), reference[name]["clip"])
        np.testing.assert_array_equal(held["label"].numpy(), reference[name]["label"])
    # Where the decoded clips are gone, rank 0 decodes them, saying so.
    for folder in folders[0].values():
        (Path(folder) / data.EVAL_CACHE_RECORD).unlink()
    knn = OnlineKNN.from_config(trials[0])
    assert "no decoded bank clips" in caplog.text and "decoding 9 in this process" in caplog.text
    np.testing.assert_array_equal(knn.bank["clip"].numpy(), reference["bank"]["clip"])
    np.testing.assert_array_equal(knn.query["label"].numpy(), reference["query"]["label"])
