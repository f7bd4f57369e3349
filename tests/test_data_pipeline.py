"""The Ray Data pipeline: shards -> fixed-shape uint8 view batches, skipping broken clips."""

from __future__ import annotations

import json
import shutil
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from media import encode, numbered_frames

from data_prep.shards import SCHEMA_VERSION
from svt_ray import data
from svt_ray.config import load_config
from svt_ray.video import decode_all_frames
from svt_ray.views import ViewSampler, view_slots


def _shard_batch(dataset_dir, count: int = 3) -> dict[str, np.ndarray]:
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    table = pq.read_table(dataset_dir / manifest["shards"][0]["file"]).slice(0, count)
    return {
        name: np.asarray(table[name].to_pylist(), dtype=object)
        if name == "video"
        else table[name].to_numpy()
        for name in data.READ_COLUMNS
    }


def test_a_dataset_data_prep_did_not_finish_is_used_with_a_warning(tmp_path, caplog):
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "complete": False, "shards": [],
                    "counts": {"inputs": 10, "processed": 4}})
    )  # fmt: skip
    data.read_dataset_manifest(str(tmp_path))
    assert "data_prep did not finish (4 of 10 inputs processed)" in caplog.text
    assert "Run the same data_prep command again" in caplog.text


def test_a_shard_cut_short_or_lost_is_named_before_ray(tmp_path):
    """A shard cut short by a copy failed every Train worker max_failures + 1 times (2 minutes
    here) with Arrow's "Parquet magic bytes not found in footer", naming no file. The driver
    compares the files with manifest.json's sizes; a reader names the shard it cannot open."""
    import pyarrow as pa
    from pyarrow import fs as pafs

    from svt_ray.config import ConfigError

    shards = tmp_path / "shards"
    shards.mkdir()
    entries = []
    for index in range(4):
        path = shards / f"part-{index:05d}.parquet"
        pq.write_table(pa.table({"id": [f"clip{index}"]}), path)
        entries.append({"file": f"shards/{path.name}", "bytes": path.stat().st_size})
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                                        "shards": entries}))  # fmt: skip
    data.read_dataset_manifest(str(tmp_path))  # as written: no complaint
    whole = (shards / "part-00001.parquet").read_bytes()
    (shards / "part-00001.parquet").write_bytes(whole[: len(whole) // 2])
    (shards / "part-00003.parquet").unlink()
    with pytest.raises(ConfigError) as caught:
        data.read_dataset_manifest(str(tmp_path))
    assert str(caught.value) == (
        f"data.path: {tmp_path}: 2 of its 4 shards are not as data_prep wrote them "
        f"(shards/part-00001.parquet is {len(whole) // 2} bytes, manifest.json recorded "
        f"{len(whole)}; shards/part-00003.parquet is missing): cut short by a copy, lost or "
        "replaced. Run the same `svt-ray prep` command again to write them anew, or copy the "
        "dataset again from where it was made"
    )
    items = pa.table({"file": [str(shards / "part-00001.parquet")], "part": [0], "parts": [1],
                      "epoch": [0]})  # fmt: skip
    with pytest.raises(ValueError, match=r"^shard .*part-00001.parquet: not a readable Parquet"):
        list(data._read_shard_part(items, pafs.LocalFileSystem(), None))


def test_a_data_path_near_a_dataset_names_the_folder_to_pass(tmp_path, monkeypatch):
    """The shards folder, manifest.json or a typo was told to `svt-ray prep` videos into it."""
    from svt_ray.config import ConfigError

    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "part-00000.parquet").write_bytes(b"rows")
    (tmp_path / "out" / "manifest.json").write_text('{"schema_version": 1, "shards": []}')
    monkeypatch.chdir(tmp_path)
    for inside in ("out/shards/", "out/manifest.json", "out/shards/part-00000.parquet"):
        with pytest.raises(ConfigError) as caught:
            data.read_dataset_manifest(inside)
        assert str(caught.value) == (
            f"data.path: {inside} is inside the dataset out; pass the folder that holds "
            "manifest.json: --data out"
        )
    outside = str(tmp_path / "out" / "shards")
    with pytest.raises(ConfigError, match=f"--data {tmp_path / 'out'}$"):
        data.read_dataset_manifest(outside)
    with pytest.raises(ConfigError, match=r"^data.path: nosuch/ does not exist; check it for"):
        data.read_dataset_manifest("nosuch/")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link").symlink_to(tmp_path / "out" / "shards")
    with pytest.raises(ConfigError, match=r"is inside the dataset out; .*--data out$"):
        data.read_dataset_manifest("elsewhere/link")  # a link into a dataset counts as inside
    (tmp_path / "webapp" / "new").mkdir(parents=True)  # a project's own manifest.json
    (tmp_path / "webapp" / "manifest.json").write_text('{"name": "webapp"}')
    with pytest.raises(ConfigError, match="make one with `svt-ray prep VIDEOS webapp/new`"):
        data.read_dataset_manifest("webapp/new")


def test_manifest_helpers(synthetic_shards):
    manifest = data.read_dataset_manifest(str(synthetic_shards))
    assert data.split_count(manifest, None) == 20
    assert data.split_count(manifest, "train") + data.split_count(manifest, "val") == 20
    assert data.manifest_checksum(manifest) == data.manifest_checksum(
        data.read_dataset_manifest(synthetic_shards.as_uri())
    )


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_view_cutter_shapes_and_determinism_without_ray(synthetic_shards, preset):
    views = load_config(preset).views
    batch = _shard_batch(synthetic_shards)
    cutter = data.ViewCutter(views, seed=5, deterministic=True, report_failures=False)
    out = cutter(batch)
    for slot in view_slots(views):
        assert out[slot.name].shape == (3, *slot.shape) and out[slot.name].dtype == np.uint8
    assert out["label"].dtype == np.int64
    assert [data.clip_id_hex(key) for key in out["clip_id"]] == list(batch["id"])
    again = data.ViewCutter(views, seed=5, deterministic=True, report_failures=False)(batch)
    np.testing.assert_array_equal(out["l0"], again["l0"])
    fresh = data.ViewCutter(views, seed=5, report_failures=False)(batch)
    assert not np.array_equal(out["g0"], fresh["g0"])


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_view_cutter_cuts_each_view_from_the_planned_frames_of_its_own_clip(decoder):
    """Without Ray or shards: a clip's plan comes from numpy's generator seeded with (seed,
    crc32 of the clip id, epoch, 1); each view is its planned frames of a sequential PyAV
    decode, cropped to its box and resized (antialiased, uint8) to the slot's size; rows keep
    their labels and ids. decord is within its decode tolerance of PyAV (test_video)."""
    views = load_config("tiny").views
    videos = [encode(numbered_frames(40, 48, 64, seed=seed), gop=8) for seed in range(3)]
    batch = {
        "id": np.asarray(["00000000000000a1", "00000000000000b2", "00000000000000c3"]),
        "label": np.asarray([2, 0, 1]),
        "video": np.asarray(videos, dtype=object),
        "num_frames": np.asarray([40, 40, 40]),
        "height": np.asarray([48, 48, 48]),
        "width": np.asarray([64, 64, 64]),
        "epoch": np.asarray([0, 3, 1], dtype=np.int32),
    }
    out = data.ViewCutter(views, seed=9, decoder=decoder, report_failures=False)(batch)
    assert [data.clip_id_hex(key) for key in out["clip_id"]] == list(batch["id"])
    assert out["label"].tolist() == [2, 0, 1]
    sampler = ViewSampler(views)
    for row, (clip_id, video, epoch) in enumerate(
        zip(batch["id"], videos, batch["epoch"], strict=True)
    ):
        decoded = decode_all_frames(video)
        rng = np.random.default_rng([9, zlib.crc32(clip_id.encode()), int(epoch), 1])
        plan = sampler.plan(40, 48, 64, rng)
        for slot, indices, box in zip(sampler.slots, plan.frame_indices, plan.boxes, strict=True):
            crop = decoded[indices, box.top : box.top + box.height, box.left : box.left + box.width]
            crop = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2)
            resized = F.interpolate(
                crop, size=(slot.size, slot.size), mode=views.interpolation, antialias=True
            )
            expected = resized.permute(1, 0, 2, 3).numpy()  # (3, t, s, s)
            view = out[slot.name][row]
            if decoder == "pyav":
                np.testing.assert_array_equal(view, expected, err_msg=f"{clip_id} {slot.name}")
            else:
                error = np.abs(view.astype(np.int16) - expected).mean(axis=(0, 2, 3))
                assert error.max() < 1.0, (clip_id, slot.name, error)


def test_training_views_are_a_function_of_seed_clip_and_epoch(synthetic_shards):
    """Not of the actor or the order: a run repeated with its seed sees the same views, and
    every epoch new ones."""
    views = load_config("tiny").views
    batch = _shard_batch(synthetic_shards)

    def cut(seed, epoch, order=slice(None)):
        rows = {key: value[order] for key, value in batch.items()}
        rows["epoch"] = np.full(len(rows["id"]), epoch, dtype=np.int32)
        out = data.ViewCutter(views, seed=seed, report_failures=False)(rows)
        return {key: out[name][i] for i, key in enumerate(out["clip_id"]) for name in ["g0"]}

    first = cut(5, epoch=0)
    again = cut(5, epoch=0, order=slice(None, None, -1))  # another actor, another order
    assert first.keys() == again.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    next_epoch, other_seed = cut(5, epoch=1), cut(6, epoch=0)
    assert all(not np.array_equal(first[k], next_epoch[k]) for k in first)
    assert all(not np.array_equal(first[k], other_seed[k]) for k in first)


def test_broken_clip_is_skipped_and_counted_without_ray(synthetic_shards):
    views = load_config("tiny").views
    batch = _shard_batch(synthetic_shards)
    batch["video"][1] = b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50
    cutter = data.ViewCutter(views, report_failures=False)
    out = cutter(batch)
    assert len(out["label"]) == 2 and cutter.failures.count == 1
    assert data.clip_key(batch["id"][1]) not in set(out["clip_id"])
    everything_broken = {**batch, "video": np.asarray([b"x"] * 3, dtype=object)}
    empty = cutter(everything_broken)
    assert empty["g1"].shape == (0, *view_slots(views)[1].shape)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_pipeline_yields_view_batches_on_local_ray(synthetic_shards, ray_session, preset):
    config = load_config(preset)
    dataset = data.build_view_dataset(
        str(synthetic_shards), config.views, seed=0, split="train", decode_actors=2
    )
    if preset == "paper":
        dataset = dataset.limit(4)  # 224 px views of 64 px clips: keep the test small
    batches = list(dataset.iter_torch_batches(batch_size=2, drop_last=True))
    assert batches
    slots = view_slots(config.views)
    for batch in batches:
        for slot in slots:
            assert batch[slot.name].dtype == torch.uint8
            assert tuple(batch[slot.name].shape) == (2, *slot.shape)
        assert batch["label"].dtype == torch.int64 and batch["clip_id"].dtype == torch.int64
    if preset == "tiny":
        manifest = data.read_dataset_manifest(str(synthetic_shards))
        seen = sum(len(batch["label"]) for batch in batches)
        assert seen == data.split_count(manifest, "train") // 2 * 2
        labels = torch.cat([batch["label"] for batch in batches])
        assert set(labels.tolist()) <= {0, 1, 2, 3}


def test_a_run_streams_its_remaining_epochs_in_one_pass(synthetic_shards, ray_session, monkeypatch):
    """Every clip of the split once per remaining epoch, in one execution (the passes are
    read in order, but Ray Data may interleave them where they meet); `data.deterministic`
    keeps one epoch per execution."""
    config = load_config(
        "tiny",
        overrides=[
            f"data.path={synthetic_shards}",
            "optim.epochs=3",
            "data.decode_actors=1",
            "optim.batch_size=4",
        ],  # the fixture's 14 training clips hold a batch
    ).resolve(data.split_count(data.read_dataset_manifest(str(synthetic_shards)), "train"))
    one_epoch = {
        row["id"] for row in data._read_shards(str(synthetic_shards), "train", None).iter_rows()
    }
    ids = [data.clip_id_hex(int(key)) for key in
           data.training_dataset(config, start_epoch=1).to_pandas()["clip_id"]]  # fmt: skip
    assert Counter(ids) == {clip: 2 for clip in one_epoch}
    monkeypatch.setattr(data, "READ_BLOCKS", 3)  # several read items per block
    ids = [data.clip_id_hex(int(key)) for key in
           data.training_dataset(config, start_epoch=0).to_pandas()["clip_id"]]  # fmt: skip
    assert Counter(ids) == {clip: 3 for clip in one_epoch}

    deterministic = config.model_copy(
        update={"data": config.data.model_copy(update={"deterministic": True})}
    )
    assert data.training_dataset(deterministic, start_epoch=1).count() == len(one_epoch)


@pytest.mark.parametrize("parts", [1, 3, 5])
def test_shard_parts_cover_its_rows_of_a_split_once(tmp_path, parts):
    """The multi-epoch stream reads a shard in `parts` slices of its row groups (4 here)."""
    from pyarrow import fs

    rows = 100
    table = pa.table(
        {
            "id": [f"clip{i:03d}" for i in range(rows)],
            "label": list(range(rows)),
            "split": ["val" if i % 5 == 0 else "train" for i in range(rows)],
            "video": [b"v"] * rows,
            "num_frames": [8] * rows,
            "height": [4] * rows,
            "width": [4] * rows,
        }
    )
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=32)
    items = pa.table(
        {
            "file": [str(tmp_path / "part.parquet")] * parts,
            "part": list(range(parts)),
            "parts": [parts] * parts,
            "epoch": [7] * parts,
        }
    )
    read = [
        t for part in range(parts)
        for t in data._read_shard_part(items.slice(part, 1), fs.LocalFileSystem(), "train")
    ]  # fmt: skip
    ids = [i for t in read for i in t["id"].to_pylist()]
    assert ids == [f"clip{i:03d}" for i in range(rows) if i % 5]
    assert read[0].column_names == [*data.READ_COLUMNS, "epoch"]  # the pass: views per epoch
    assert {e for t in read for e in t["epoch"].to_pylist()} == {7}
    # Evaluation reads labelled clips only: kNN on an unlabelled one (-1) raised IndexError.
    unlabelled = table.set_column(1, "label", pa.array([-1 if i % 2 else i for i in range(rows)]))
    pq.write_table(unlabelled, tmp_path / "part.parquet", row_group_size=32)
    labelled = [
        i for part in range(parts)
        for t in data._read_shard_part(items.slice(part, 1), fs.LocalFileSystem(), "train", True)
        for i in t["id"].to_pylist()
    ]  # fmt: skip
    assert labelled == [f"clip{i:03d}" for i in range(rows) if i % 5 and not i % 2]
    # A shard without a column the pipeline reads: the file and the column, not ArrowInvalid.
    pq.write_table(table.drop_columns(["num_frames"]), tmp_path / "part.parquet")
    with pytest.raises(ValueError, match=r"part\.parquet: no column num_frames; every shard"):
        list(data._read_shard_part(items.slice(0, 1), fs.LocalFileSystem(), "train"))
    # ...and where the online kNN reads its clips in a Train worker (`load_eval_clips`).
    pq.write_table(table.drop_columns(["label", "split"]), tmp_path / "part.parquet")
    with pytest.raises(ValueError, match=r"part\.parquet: no columns label, split; every"):
        data._read_table(str(tmp_path / "part.parquet"), fs.LocalFileSystem(), columns=["label"])


def test_a_pass_over_one_shard_is_several_blocks_for_the_decode_actors(
    synthetic_shards, ray_session, tmp_path, monkeypatch
):
    """A block goes to one decode actor, so a pass over a dataset of one shard must be read in
    slices: as one block (`read_parquet` of a shard under 128 MiB), one actor decoded it all."""
    merged = tmp_path / "one_shard"
    merged.mkdir()
    manifest = json.loads((synthetic_shards / "manifest.json").read_text())
    tables = [pq.read_table(synthetic_shards / shard["file"]) for shard in manifest["shards"]]
    table = pa.concat_tables(tables)
    pq.write_table(table, merged / "part-00000.parquet", row_group_size=4)
    manifest["shards"] = [
        {
            **manifest["shards"][0],
            "file": "part-00000.parquet",
            "num_rows": table.num_rows,
            "splits": dict(Counter(table["split"].to_pylist())),
        }
    ]
    (merged / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(data, "READ_ROWS", 8)  # 20 rows in 5 row groups: 3 slices of them
    read = data._read_shards(str(merged), None, shuffle_seed=None).materialize()
    blocks = [len(block["id"]) for block in read.iter_batches(batch_size=None)]
    assert sorted(blocks) == [4, 8, 8]
    assert sorted(read.to_pandas()["id"]) == sorted(table["id"].to_pylist())


def test_pipeline_skips_and_counts_undecodable_clips(synthetic_shards, ray_session, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    shard = broken / manifest["shards"][0]["file"]
    table = pq.read_table(shard)
    videos = table["video"].to_pylist()
    videos[0] = videos[0][: len(videos[0]) // 3]  # truncated after data_prep accepted it
    column = pa.array(videos, type=table.schema.field("video").type)
    table = table.set_column(table.schema.get_field_index("video"), "video", column)
    pq.write_table(table, shard)
    before = data.decode_failures()[0]
    key = str(tmp_path / "runs" / "a-run")  # what a training run counts under: its folder
    dataset = data.build_view_dataset(
        str(broken), load_config("tiny").views, split=None, decode_actors=1, failure_key=key
    )
    assert dataset.count() == 19
    assert data.decode_failures()[0] - before == 1
    assert data.decode_failures(key)[0] == 1  # the run's own count, which its end reports
    broken_id = table["id"][0].as_py()
    assert data.decode_failures(key) == (1, [broken_id])  # and the clip, by the end's warning
    assert data.clip_sources(str(broken), [broken_id, "not-a-clip"]) == {
        broken_id: table["source_path"][0].as_py()
    }
    assert data.decode_failures(str(tmp_path / "runs" / "another"))[0] == 0
    twice = str(tmp_path / "runs" / "two-epochs")  # skipped in every epoch: one clip still
    dataset = data.build_view_dataset(
        str(broken), load_config("tiny").views, split=None, decode_actors=1, epochs=2,
        failure_key=twice,
    )  # fmt: skip
    assert dataset.count() == 38 and data.decode_failures(twice)[0] == 1


def test_eval_dataset_single_and_slow_fast_clips(synthetic_shards, ray_session):
    clips = {"clip": (8, 48), **data.slow_fast_clips(slow=(4, 56), fast=(16, 32))}
    dataset = data.build_eval_dataset(
        str(synthetic_shards), clips, split=None, window_frames=32, decode_actors=2
    )
    rows = dataset.take_all()
    assert len(rows) == 20
    first = rows[0]
    assert first["clip"].shape == (3, 8, 48, 48) and first["clip"].dtype == np.uint8
    assert first["slow"].shape == (3, 4, 56, 56) and first["fast"].shape == (3, 16, 32, 32)
    # Deterministic (centred window, centre crop): the actors agree with a local cutter.
    batch = _shard_batch(synthetic_shards)
    local = data.EvalClipCutter(clips, window_frames=32, report_failures=False)(batch)
    by_key = {row["clip_id"]: row for row in rows}
    for index, key in enumerate(local["clip_id"]):
        np.testing.assert_array_equal(by_key[key]["fast"], local["fast"][index])
        assert by_key[key]["label"] == local["label"][index]


def test_each_epoch_reads_the_shard_slices_in_an_order_of_its_own():
    """The slice order of a pass is drawn from the seed and the epoch's number: epochs differ
    from each other, a run resumed at epoch 2 draws epoch 2's order again, another seed draws
    others, and no seed keeps the stored order."""
    parts = [{"path": f"part-{i:05d}.parquet", "part": 0, "parts": 1} for i in range(12)]

    def orders(seed, epochs, first=0):
        items = data.pass_items(parts, seed, epochs, first)
        assert [item["epoch"] for item in items] == [e for e in range(first, first + epochs)
                                                      for _ in parts]  # fmt: skip
        return [[item["path"] for item in items[i : i + 12]] for i in range(0, len(items), 12)]

    three = orders(7, 3)
    assert len({tuple(order) for order in three}) == 3
    assert all(sorted(order) == [part["path"] for part in parts] for order in three)
    assert orders(7, 1, first=2) == three[2:]
    assert orders(8, 3) != three
    assert orders(None, 2) == [[part["path"] for part in parts]] * 2


def test_slow_fast_eval_clips_are_their_frames_of_a_sequential_decode():
    """Two clip specs of one video decode the union of their frames once; each must get its
    own frames back out of that union (a 4-frame slow clip is not the union's first 4)."""
    video = encode(numbered_frames(40, 48, 64, seed=1), gop=8)
    batch = {
        "id": np.asarray(["00000000000000a1"]), "label": np.asarray([2]),
        "video": np.asarray([video], dtype=object), "num_frames": np.asarray([40]),
        "height": np.asarray([48]), "width": np.asarray([64]),
    }  # fmt: skip
    clips = {"slow": (4, 32), "fast": (16, 16)}
    cutter = data.EvalClipCutter(clips, window_frames=32, decoder="pyav", report_failures=False)
    out = cutter(batch)
    decoded = decode_all_frames(video)  # every frame, in order
    indices = cutter.frame_indices(40)
    union = np.unique(np.concatenate(list(indices.values())))
    assert not np.array_equal(union[:4], indices["slow"])  # the lookup matters here
    for name, picked in indices.items():
        expected = data.centre_crop_resized(decoded[picked], clips[name][1])
        np.testing.assert_array_equal(out[name][0], expected, err_msg=name)


def test_evaluation_subsets_leave_out_unlabelled_clips(tmp_path):
    """A shard may hold unlabelled clips (label -1, for pretraining only): the online kNN's
    in-process subset takes the labelled ones, not -1 as a class of its own."""
    video = encode(numbered_frames(16, 32, 32, seed=2), gop=8)
    ids = [f"{i:016x}" for i in range(6)]
    table = pa.table({
        "id": ids, "label": [0, -1, 1, -1, 0, 1], "split": ["train"] * 6, "video": [video] * 6,
        "num_frames": [16] * 6, "height": [32] * 6, "width": [32] * 6,
    })  # fmt: skip
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "part-00000.parquet")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "shards": [{"file": "shards/part-00000.parquet", "splits": {"train": 6}}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    got = data.load_eval_clips(str(tmp_path), "train", {"clip": (2, 16)}, 10, decoder="pyav")
    assert sorted(got["label"].tolist()) == [0, 0, 1, 1]


def test_in_process_eval_subset_matches_the_ray_data_clips(synthetic_shards, ray_session):
    """`load_eval_clips` (online kNN, no Ray Data): a fixed subset of one split, with the same
    frames as the Ray Data evaluation dataset gives for those clips."""
    clips = {"clip": (4, 32)}
    subset = data.load_eval_clips(str(synthetic_shards), "train", clips, 5, window_frames=32)
    assert subset["clip"].shape == (5, 3, 4, 32, 32) and len(set(subset["clip_id"])) == 5
    again = data.load_eval_clips(str(synthetic_shards), "train", clips, 5, window_frames=32)
    np.testing.assert_array_equal(again["clip_id"], subset["clip_id"])
    everything = data.load_eval_clips(str(synthetic_shards), "train", clips, 1000, window_frames=32)
    manifest = data.read_dataset_manifest(str(synthetic_shards))
    assert len(everything["label"]) == data.split_count(manifest, "train")
    assert set(subset["clip_id"]) <= set(everything["clip_id"])
    rows = data.build_eval_dataset(
        str(synthetic_shards), clips, split="train", window_frames=32, decode_actors=1
    ).take_all()
    by_key = {row["clip_id"]: row for row in rows}
    assert set(by_key) == set(everything["clip_id"])
    for key, clip, label in zip(subset["clip_id"], subset["clip"], subset["label"], strict=True):
        np.testing.assert_array_equal(by_key[key]["clip"], clip)
        assert by_key[key]["label"] == label
    with pytest.raises(ValueError, match="no shard holds clips of split 'test'"):
        data.load_eval_clips(str(synthetic_shards), "test", clips, 5)


def test_eval_clips_decoded_on_ray_data_are_those_of_the_sequential_decode(
    synthetic_shards, ray_session, tmp_path, monkeypatch
):
    """`cache_eval_clips` (the online kNN's clips, decoded once on Ray Data into storage) and
    `read_eval_clips`: the clips, labels and order of `load_eval_clips`, which decodes them one
    after another in its own process. Two sets; parts of 2 clips, the first decoded in this
    process, the others by Ray Data tasks (as when they would take long here)."""
    monkeypatch.setattr(data, "EVAL_PART_CLIPS", 2)
    monkeypatch.setattr(data, "EVAL_IN_PROCESS_S", 0.0)
    import ray.data

    jobs, from_items = [], ray.data.from_items

    def counted(items, **kwargs):
        jobs.append(items)
        return from_items(items, **kwargs)

    monkeypatch.setattr(ray.data, "from_items", counted)
    bank = data.eval_cache_settings("train", {"clip": (4, 32)}, 7, window_frames=32)
    query = data.eval_cache_settings("val", {"clip": (2, 16)}, 3, interpolation="bicubic")
    folders = {str(tmp_path / "bank"): bank, str(tmp_path / "query"): query}
    expected = {f: data.load_eval_clips(str(synthetic_shards), **s) for f, s in folders.items()}
    assert [len(e["label"]) for e in expected.values()] == [7, 3]
    for folder in folders:
        assert data.read_eval_clips(folder) is None and data.read_eval_clips_record(folder) is None
    records = data.cache_eval_clips(str(synthetic_shards), folders)
    assert [(r["num_clips"], r["failed"]) for r in records.values()] == [(7, 0), (3, 0)]
    parts = sum(len(r["parts"]) for r in records.values())
    assert len(jobs) == 1 and len(jobs[0]) == parts - 1  # one job, after one part here
    record = records[str(tmp_path / "bank")]
    _, parts = data.eval_subset(str(synthetic_shards), "train", 7, 2)
    assert len(record["parts"]) == len(parts) >= 4  # 4 clips per shard: parts of 2 and 1
    for folder in folders:
        got = data.read_eval_clips(folder)
        assert set(got) == {"clip", "label", "clip_id"} and got["clip"].dtype == np.uint8
        for key in got:
            np.testing.assert_array_equal(got[key], expected[folder][key], err_msg=key)
    assert got["clip"].shape == (3, 3, 2, 16, 16)

    # Decoded once: a second call finds the records and decodes nothing.
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(data, "eval_subset", no_decode)
        assert data.cache_eval_clips(str(synthetic_shards), folders) == records
        with pytest.raises(ValueError, match="holds evaluation clips of other settings"):
            data.cache_eval_clips(str(synthetic_shards), {str(tmp_path / "bank"): query})

    # A decode cut short (no record, a part missing) resumes: the parts written are kept,
    # those written with other settings are not.
    cache = tmp_path / "bank"
    (cache / data.EVAL_CACHE_RECORD).unlink()
    kept = {name: (cache / name).stat().st_mtime_ns for name in record["parts"]}
    lost, other = cache / record["parts"][1], cache / record["parts"][2]
    lost.unlink()
    table = pq.read_table(other)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata,
                                                  b"svt_settings": b"{}"}), other)  # fmt: skip
    del kept[lost.name], kept[other.name]
    monkeypatch.setattr(data, "EVAL_IN_PROCESS_S", 60.0)  # all in this process: quick
    again = data.cache_eval_clips(str(synthetic_shards), {str(cache): bank})
    assert again == {str(cache): record} and lost.is_file() and len(jobs) == 1
    for name, written in kept.items():
        assert (cache / name).stat().st_mtime_ns == written, name
    assert pq.read_schema(other).metadata[b"svt_settings"] != b"{}"  # decoded again
    for key, value in data.read_eval_clips(str(cache)).items():
        np.testing.assert_array_equal(value, expected[str(cache)][key], err_msg=key)


def test_a_lost_part_of_the_decoded_eval_clips_reads_as_none(tmp_path, caplog):
    """A record whose part is gone (deleted by hand, a sync that copied half) is not a
    dataset: `read_eval_clips` says so and gives None, and its caller decodes again."""
    folder = tmp_path / "cache"
    folder.mkdir()
    record = {"version": data.EVAL_CACHE_VERSION, "parts": ["part-00000.parquet"],
              "shapes": {"clip": [3, 2, 4, 4]}}  # fmt: skip
    (folder / data.EVAL_CACHE_RECORD).write_text(json.dumps(record))
    assert data.read_eval_clips(str(folder)) is None
    assert "cannot read the decoded clips" in caplog.text
    (folder / data.EVAL_CACHE_RECORD).write_text(json.dumps({**record, "version": 0}))
    assert data.read_eval_clips_record(str(folder)) is None  # another cache version


def test_eval_cache_keys_change_with_every_setting_and_the_data():
    manifest = {"schema_version": 1, "shards": [{"file": "a.parquet", "num_rows": 4}]}
    base = {"split": "train", "clips": {"clip": (8, 224)}, "max_clips": 100,
            "window_frames": 150, "decoder": "decord", "interpolation": "bilinear"}  # fmt: skip
    key = data.eval_cache_key(manifest, data.eval_cache_settings(**base))
    assert key == data.eval_cache_key(
        {**manifest, "data_path": "/elsewhere"}, data.eval_cache_settings(**base)
    )  # the same contents elsewhere
    changed = {"split": "val", "clips": {"clip": (8, 112)}, "max_clips": 99,
               "window_frames": 75, "decoder": "pyav", "interpolation": "bicubic"}  # fmt: skip
    keys = {key}
    for name, value in changed.items():
        keys.add(data.eval_cache_key(manifest, data.eval_cache_settings(**{**base, name: value})))
    keys.add(data.eval_cache_key({**manifest, "shards": []}, data.eval_cache_settings(**base)))
    assert len(keys) == len(changed) + 2


def test_clip_keys_round_trip():
    for clip_id in ("0123456789abcdef", "ffffffffffffffff", "8000000000000000"):
        key = data.clip_key(clip_id)
        assert -(2**63) <= key < 2**63 and data.clip_id_hex(key) == clip_id
    assert data.clip_key("synth-s0-000001") != data.clip_key("synth-s0-000002")


@pytest.mark.parametrize(
    ("height", "width", "mode"), [(30, 52, "bilinear"), (50, 28, "bilinear"), (30, 52, "bicubic")]
)
def test_centre_crop_resized_scales_the_short_side_then_takes_the_centre(height, width, mode):
    """The short side goes to `size` (the long one in proportion, rounded), with the resize
    the eval clips use (the training's views.interpolation, antialiased, on uint8), then the
    centred size x size square."""
    frames = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    size = 20
    scale = size / min(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    resized = F.interpolate(clip, size=(new_height, new_width), mode=mode, antialias=True)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    assert max(top, left) >= 4  # a corner crop would be visibly off
    expected = resized[:, :, top : top + size, left : left + size].permute(1, 0, 2, 3).numpy()
    expected = expected.clip(0, 255)  # bicubic overshoots; uint8 saturates
    cutter = data.EvalClipCutter({"clip": (3, size)}, report_failures=False, interpolation=mode)
    out = data.centre_crop_resized(frames, size, cutter.interpolation)
    assert out.dtype == np.uint8 and out.shape == (3, 3, size, size)
    error = np.abs(out.astype(np.float32) - expected)
    if mode == "bilinear":
        assert error.max() <= 1.01  # uint8 rounding (+ float noise)
    else:  # torch's uint8 bicubic rounds and saturates between its two passes
        assert error.mean() <= 0.6 and error.max() <= 8
        other = data.centre_crop_resized(frames, size)  # bilinear: what the mode changes
        assert np.abs(out.astype(np.float32) - other).mean() > 2


def test_eval_indices_are_centred_and_spread():
    cutter = data.EvalClipCutter(
        {"slow": (4, 32), "fast": (8, 16)}, window_frames=20, report_failures=False
    )
    indices = cutter.frame_indices(40)
    assert indices["slow"].tolist() == [10, 16, 22, 29]
    assert indices["fast"][0] == 10 and indices["fast"][-1] == 29
    whole = data.EvalClipCutter({"clip": (4, 8)}, report_failures=False).frame_indices(10)
    assert whole["clip"].tolist() == [0, 3, 6, 9]
