"""data_prep: shards round-trip, every bad input is rejected with its reason, runs resume."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from media import (
    REENCODE_TOLERANCE,
    audio_only_mp4,
    encode,
    encode_to_file,
    encode_vfr,
    frame_errors,
    mux,
    numbered_frames,
    png_bytes,
    zero_timestamps,
)

import data_prep
from data_prep.inputs import (
    assign_split,
    discover,
    hash_split,
    read_split_files,
    with_file_names,
)
from data_prep.transcode import (
    PrepOptions,
    Rejected,
    kept_frames,
    output_size,
    prepare_video,
    probe,
)
from svt_ray.video import VideoDecodeError, decode_all_frames, open_video

REPO = Path(__file__).resolve().parents[1]


def _rows(dataset: Path) -> list[dict]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(dataset / shard["file"]).to_pylist()
    return rows


def _rejects(dataset: Path) -> dict[str, dict]:
    lines = (dataset / "rejects.jsonl").read_text().splitlines()
    return {Path(reject["path"]).name: reject for reject in map(json.loads, lines)}


# -- unit level: no Ray -------------------------------------------------------------------------


def test_prepare_video_round_trip_and_frame_rate_cap():
    source = numbered_frames(60, height=48, width=64)
    row = prepare_video(encode(source, fps=30), PrepOptions(max_fps=15, min_frames=8))
    assert (row["num_frames"], row["fps"], row["width"], row["height"]) == (30, 15.0, 64, 48)
    assert row["duration_s"] == pytest.approx(2.0)
    decoded = decode_all_frames(row["video"])
    # Frames kept under the cap are the even source frames, within two lossy encodes: each is
    # far closer to its own source frame than to the skipped odd one next to it.
    error = np.abs(decoded.astype(np.int16) - source[::2].astype(np.int16)).mean(axis=(1, 2, 3))
    other = np.abs(decoded.astype(np.int16) - source[1::2].astype(np.int16)).mean(axis=(1, 2, 3))
    assert error.max() < 10 and other.min() > 2 * error.max()
    # The output is random-access friendly: keyframes every `gop` frames, exact seeks.
    import io

    import av

    with av.open(io.BytesIO(row["video"])) as container:
        packets = sorted(
            (p for p in container.demux(video=0) if p.size), key=lambda p: p.pts
        )  # display order
        keyframes = [i for i, packet in enumerate(packets) if packet.is_keyframe]
    assert PrepOptions().gop == 16 and len(packets) == 30 and keyframes == [0, 16]
    reader = open_video(row["video"])
    np.testing.assert_array_equal(reader.get_frames([29, 3, 16]), decoded[[29, 3, 16]])


def test_output_size_and_kept_frames():
    assert output_size(1920, 1080, 256) == (456, 256)
    assert output_size(100, 60, 256) == (100, 60)  # never upscale
    assert output_size(101, 61, 256) == (100, 60)  # even for yuv420p
    indices, fps = kept_frames(90, 30.0, 15.0)
    assert fps == 15.0 and indices.tolist() == list(range(0, 90, 2))
    indices, fps = kept_frames(90, 25.0, 30.0)
    assert fps == 25.0 and len(indices) == 90
    indices, fps = kept_frames(100, 29.97, 0)
    assert len(indices) == 100


def test_splits_are_deterministic_by_id_hash_and_from_split_files(tmp_path, caplog):
    ids = [f"{i:016x}" for i in range(2000)]
    splits = [hash_split(i, 0.1) for i in ids]
    assert splits == [hash_split(i, 0.1) for i in ids]
    assert 0.07 < splits.count("val") / len(splits) < 0.13
    assert splits != [hash_split(i, 0.1, seed=1) for i in ids]
    for name in ("ApplyEyeMakeup/v_a.avi", "ApplyEyeMakeup/v_b.avi", "Archery/v_c.avi"):
        (tmp_path / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / name).write_bytes(b"x")
    (tmp_path / "trainlist01.txt").write_text("ApplyEyeMakeup/v_a.avi 1\nArchery/v_c.avi 2\n")
    (tmp_path / "testlist01.txt").write_text("ApplyEyeMakeup/v_b.avi\n")
    videos, _ = discover(str(tmp_path / "videos"))
    lists = read_split_files(
        [
            ("train", f"file://{tmp_path / 'trainlist01.txt'}"),
            ("val", str(tmp_path / "testlist01.txt")),
        ]
    )  # a URI or a path
    got = {v.relative_path: assign_split(v, lists, 0.5, 0) for v in videos}
    assert got == {
        "ApplyEyeMakeup/v_a.avi": "train",
        "ApplyEyeMakeup/v_b.avi": "val",
        "Archery/v_c.avi": "train",
    }
    assert {v.label_name for v in videos} == {"ApplyEyeMakeup", "Archery"}
    # Split lists named as folders may be (training, Validation) are train and val; a name
    # training would never read is kept, with a warning.
    named = [("Training", str(tmp_path / "trainlist01.txt")),
             ("validation", str(tmp_path / "testlist01.txt"))]  # fmt: skip
    assert read_split_files(named) == lists
    with caplog.at_level("WARNING", logger="data_prep.inputs"):
        assert set(read_split_files([("holdout", str(tmp_path / "testlist01.txt"))]).values()) == {
            "holdout"
        }
    assert "split 'holdout' is kept as it is" in caplog.text
    caplog.clear()  # UCF-101's testlist: evaluation reads 'val' unless told otherwise
    with caplog.at_level("WARNING", logger="data_prep.inputs"):
        read_split_files([("test", str(tmp_path / "testlist01.txt"))])
    assert "split 'test' is kept as it is" in caplog.text and "eval.test_split" in caplog.text


def _splits_from_lists(root: Path, files: list[str], lists: dict[str, str]) -> dict[str, str]:
    """Split of each of `files` (written under root/videos) given split name -> list text."""
    for name in files:
        (root / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / name).write_bytes(b"x")
    for split, text in lists.items():
        (root / f"{split}list.txt").write_text(text)
    videos, _ = discover(str(root / "videos"))
    mapping = read_split_files([(split, str(root / f"{split}list.txt")) for split in lists])
    mapping = with_file_names(mapping, videos)
    return {video.relative_path: assign_split(video, mapping, 0.5, 0) for video in videos}


def test_a_split_file_line_with_a_folder_names_that_file_only(tmp_path):
    """Every listed path also gave its bare file name a split, so an unlisted `C/x.avi` took
    the split of a listed `A/x.avi`: videos held out of every list went into train. A line
    without a folder (HMDB-51's lists) still names that file in any folder."""
    got = _splits_from_lists(
        tmp_path,
        ["A/x.avi", "C/x.avi", "B/y.avi", "D/z.avi"],
        {"train": "A/x.avi 1\n", "val": "B/y.avi\nz.avi\n"},
    )
    assert got == {"A/x.avi": "train", "C/x.avi": "unassigned", "B/y.avi": "val", "D/z.avi": "val"}


def test_a_list_written_for_class_folders_matches_videos_kept_in_one_folder(tmp_path):
    """UCF-101's lists name CLASS/file.avi; videos kept flat still match by file name, as no
    input sits at the listed path."""
    got = _splits_from_lists(
        tmp_path,
        ["v_a.avi", "v_b.avi", "v_c.avi"],
        {"train": "A/v_a.avi 1\n", "val": "B/v_b.avi\n"},
    )
    assert got == {"v_a.avi": "train", "v_b.avi": "val", "v_c.avi": "unassigned"}


def test_split_file_paths_may_hold_spaces(tmp_path):
    """A line was cut at its first space (`A/my clip.avi 1` read as `A/my`), so no path with a
    space matched. Now the whole line is the path, or the line less a trailing class number."""
    got = _splits_from_lists(
        tmp_path,
        ["A/my clip.avi", "A/take 2.avi", "B/a b.avi", "B/c.avi"],
        {"train": "A/my clip.avi 1\nA/take 2.avi\nB/a b.avi\t7\n", "val": "B/c.avi 5\n"},
    )
    assert got == {
        "A/my clip.avi": "train",
        "A/take 2.avi": "train",
        "B/a b.avi": "train",
        "B/c.avi": "val",
    }


def test_a_source_decord_fails_on_is_decoded_again_with_pyav(monkeypatch):
    """decord raising part-way (DECORDLimitReachedError, not a DECORDError, escaped as an
    'error' reject with a traceback) no longer rejects a clip FFmpeg decodes."""
    from decord._ffi.base import DECORDLimitReachedError

    from svt_ray.video import DecordReader

    source = numbered_frames(40, height=48, width=64, seed=3)
    reference = prepare_video(encode(source), PrepOptions(min_frames=8))

    opened = DecordReader.__init__

    def failing_at_the_fourth_frame(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        reader, calls = self._reader, iter(range(10**6))

        class Failing:
            def __getattr__(self, name):
                return getattr(reader, name)

            def next(self):
                if next(calls) == 3:
                    raise DECORDLimitReachedError("more than 15 duplicate frames are corrupted")
                return reader.next()

        self._reader = Failing()

    monkeypatch.setattr(DecordReader, "__init__", failing_at_the_fourth_frame)
    row = prepare_video(encode(source), PrepOptions(min_frames=8))
    assert row["num_frames"] == reference["num_frames"] == 40
    assert frame_errors(row["video"], reference["video"]).max() < REENCODE_TOLERANCE


def test_mpeg_ts_with_b_frames_is_decoded_by_ffmpeg_not_decord():
    """decord gives other pictures (60+ levels off) for H.264 with B-frames in MPEG-TS, and
    says nothing unless its fault tolerance is on: such sources go to PyAV."""
    source = numbered_frames(40, height=48, width=64, seed=5)
    options = PrepOptions(min_frames=8, fault_tolerance=0)  # decord would not complain
    reference = prepare_video(mux(source, "matroska", "libx264", fps=15, bf=3), options)
    row = prepare_video(mux(source, "mpegts", "libx264", fps=15, bf=3), options)
    assert frame_errors(row["video"], reference["video"]).max() < REENCODE_TOLERANCE


def test_discovery_follows_linked_folders_and_refuses_ambiguous_layouts(tmp_path):
    from data_prep.inputs import InputError, InputVideo, build_label_map

    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (root / "dog").mkdir(parents=True)
    (elsewhere / "cat").mkdir(parents=True)
    (root / "dog" / "b.mp4").write_bytes(b"x")
    (elsewhere / "cat" / "a.mp4").write_bytes(b"x")
    (root / "cat").symlink_to(elsewhere / "cat")  # a class folder kept on another disk
    (root / "dog" / "loop").symlink_to(root)  # a link back up: listed once, no endless walk
    videos, _ = discover(str(root))
    assert sorted((v.relative_path, v.label_name) for v in videos) == [
        ("cat/a.mp4", "cat"), ("dog/b.mp4", "dog")
    ]  # fmt: skip

    # Kinetics with an extra top folder: its name would have become a label, and the split
    # folders' names labels too.
    kinetics = tmp_path / "k400"
    for top in ("Train", "val", "replacement"):
        (kinetics / top / "cat").mkdir(parents=True)
        (kinetics / top / "cat" / "x.mp4").write_bytes(b"x")
    with pytest.raises(
        InputError, match=r"split folders \(Train, val\) next to other .*replacement"
    ):
        discover(str(kinetics))
    (kinetics / "replacement" / "cat" / "x.mp4").unlink()
    (kinetics / "replacement" / "cat").rmdir()
    (kinetics / "replacement").rmdir()
    videos, _ = discover(str(kinetics))
    assert sorted((v.split, v.label_name) for v in videos) == [("train", "cat"), ("val", "cat")]

    # Integer class names keep their value on a re-run that adds one; "01" and "1" collide.
    def video(label):
        return InputVideo(label, "p", "p", label, None, 1)

    first = build_label_map([video("0"), video("2")])
    assert first == {"0": 0, "2": 2}  # integer names keep their value, gaps and all
    assert build_label_map([video("0"), video("1"), video("2")], first) == {"0": 0, "1": 1, "2": 2}
    # Names numbered in sorted order by an earlier run (not their values) keep that order.
    assert build_label_map([video("2"), video("7")], {"2": 0, "5": 1}) == {"2": 0, "5": 1, "7": 2}
    with pytest.raises(InputError, match="labels '01' and '1' are the same number"):
        build_label_map([video("01"), video("1")])

    # A class folder name in Unicode's two forms (typed here; copied from a Mac) is one class;
    # an earlier run's map that kept the decomposed form gives the composed one its index.
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    accents = tmp_path / "accents"
    for name in (composed, decomposed):
        (accents / name).mkdir(parents=True)
        (accents / name / f"{len(name)}.mp4").write_bytes(b"x")
    videos, _ = discover(str(accents))
    assert {v.label_name for v in videos} == {composed} and len(videos) == 2
    assert build_label_map(videos) == {composed: 0}
    assert build_label_map(videos, {"bike": 0, decomposed: 1})[composed] == 1


def test_manifests_of_objects_only_and_names_that_are_not_utf8(tmp_path, ray_session, caplog):
    from data_prep.inputs import InputError

    (tmp_path / "list.json").write_text('[{"path": "a.mp4", "label": "x"}]')
    (tmp_path / "a.mp4").write_bytes(b"x")
    ((videos, _),) = [discover(str(tmp_path / "list.json"))]
    assert [(v.relative_path, v.label_name) for v in videos] == [("a.mp4", "x")]
    # Columns a manifest does not read are said; a class column not named 'label' was
    # ignored without a word, and every clip went unlabelled.
    (tmp_path / "classes.csv").write_text("path,class\na.mp4,x\n")
    (tmp_path / "notes.csv").write_text("path,label,notes\na.mp4,x,good\n")
    with caplog.at_level("WARNING", logger="data_prep.inputs"):
        ((videos, _),) = [discover(str(tmp_path / "classes.csv"))]
        assert videos[0].label_name is None
        assert "classes.csv: no 'label' column, so no clip gets a class; column(s) class" in (
            caplog.text
        )
        caplog.clear()
        discover(str(tmp_path / "notes.csv"))
        assert "notes.csv: column(s) notes are not read" in caplog.text
        caplog.clear()  # one clip given two classes: the first kept, both named
        (tmp_path / "twice.csv").write_text("path,label\na.mp4,x\na.mp4,y\n")
        ((videos, _),) = [discover(str(tmp_path / "twice.csv"))]
        assert [v.label_name for v in videos] == ["x"]
        assert "listed twice with another label 'x' then 'y', keeping the first: a.mp4" in (
            caplog.text
        )
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n"b.mp4"\n')
    with pytest.raises(InputError, match=r"bad.jsonl: entry 2 is str, not an object"):
        discover(str(tmp_path / "bad.jsonl"))

    # A Latin-1 file name next to a good video: that one is rejected by name, the run goes on.
    source = tmp_path / "in" / "dog"
    source.mkdir(parents=True)
    encode_to_file(source / "good.mp4", numbered_frames(20, height=32, width=32))
    os.rename(source / "good.mp4", os.fsencode(source) + b"/caf\xe9.mp4")
    encode_to_file(source / "good.mp4", numbered_frames(20, height=32, width=32))
    assert data_prep.main([str(tmp_path / "in"), str(tmp_path / "out"), "--min-frames", "8"]) == 0
    (reject,) = (json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").open())
    assert reject["reason"] == "unreadable" and "not UTF-8" in reject["detail"]
    assert [row["source_path"] for row in _rows(tmp_path / "out")] == ["dog/good.mp4"]


def test_manifest_splits_read_like_folder_names_and_uri_listings_skip_hidden_files(
    tmp_path, caplog
):
    (tmp_path / "list.csv").write_text(
        "path,label,split\na.mp4,x,Validation\nb.mp4,x,train\nc.mp4,x,holdout\n"
    )
    videos, _ = discover(str(tmp_path / "list.csv"))
    assert sorted(v.split for v in videos) == ["holdout", "train", "val"]
    assert "split(s) holdout are kept as they are" in caplog.text

    (tmp_path / "in" / "dog").mkdir(parents=True)
    for name in ("a.mp4", "._a.mp4"):  # macOS's AppleDouble file next to the video
        (tmp_path / "in" / "dog" / name).write_bytes(b"x")
    for source in (str(tmp_path / "in"), f"file://{tmp_path / 'in'}"):
        videos, _ = discover(source)
        assert [v.relative_path for v in videos] == ["dog/a.mp4"], source


def test_one_file_under_several_manifest_paths_is_one_input(tmp_path, caplog):
    """`cat/a.mp4`, `./cat/a.mp4` and its absolute path were three ids for one file, each
    hashed to a split of its own (one video in train and in val). The first row is kept, with
    the id it always had; the others are named with their lines."""
    (tmp_path / "cat").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "cat" / name).write_bytes(b"x")
    absolute = f"{tmp_path}/cat/a.mp4"
    (tmp_path / "list.csv").write_text(
        f"path,label\ncat/a.mp4,cat\n./cat/a.mp4,cat\ncat/b.mp4,cat\n{absolute},cat\n"
    )
    (tmp_path / "list.jsonl").write_text('{"path": "cat/a.mp4"}\n\n{"path": "cat//a.mp4"}\n')
    with caplog.at_level("WARNING", logger="data_prep.inputs"):
        videos, _ = discover(str(tmp_path / "list.csv"))
        assert [(v.id, v.relative_path) for v in videos] == [
            ("43ac1a66fcbd7af4", "cat/b.mp4"),
            ("937c69ed537bce96", "cat/a.mp4"),
        ]
        assert (
            "list.csv: 2 row(s) name a file an earlier row names another way, left out (one "
            "file, one id, one split): line 3 './cat/a.mp4' is the file of line 2 'cat/a.mp4'; "
            f"line 5 '{absolute}' is the file of line 2 'cat/a.mp4'"
        ) in caplog.text
        caplog.clear()
        videos, _ = discover(str(tmp_path / "list.jsonl"))
        assert [v.relative_path for v in videos] == ["cat/a.mp4"]
        assert "line 3 'cat//a.mp4' is the file of line 1 'cat/a.mp4'" in caplog.text


def test_a_variable_frame_rate_source_keeps_its_timing():
    """60 frames 1/60 s apart, then 20 frames 0.1 s apart: output frame k (15 fps) shows the
    source frame nearest k / 15 s. Picked by index, the output's second 1.0 showed the
    source's 0.43 s, and the slow part played 2.2x too fast."""
    gaps = [1 / 60] * 59 + [0.1] * 21  # gap i follows frame i
    times = np.concatenate([[0.0], np.cumsum(gaps[:79])])
    indices, fps = kept_frames(80, 79 / times[-1], 15.0, tuple(times))
    assert fps == 15.0 and len(indices) == 45  # floor(80 frames x 15 / 26.5 fps)
    for k, index in enumerate(indices):  # the nearest frame in time, ties to the earlier
        assert abs(times[index] - k / 15) <= np.abs(times - k / 15).min() + 1e-9
    assert indices[15] == 59 and indices[30] == 69  # 1.0 s and 2.0 s
    assert np.diff(indices).min() == 0  # frames shown 0.1 s are repeated at 15 fps

    # Through data_prep: the container keeps times to the millisecond, which moves a tie or
    # two; each output frame is the source frame data_prep's own probe says it should be.
    source = numbered_frames(80, height=48, width=64, seed=4)
    video = encode_vfr(source, gaps)
    info = probe(video)
    expected, _ = kept_frames(info.num_frames, info.fps, 15.0, info.times)
    assert np.abs(expected - indices).max() <= 1
    row = prepare_video(video, PrepOptions(max_fps=15, min_frames=8))
    decoded = decode_all_frames(row["video"]).astype(np.int16)
    assert (row["num_frames"], row["fps"]) == (len(expected), 15.0)
    shown = [
        int(np.argmin(np.abs(frame - source.astype(np.int16)).mean(axis=(1, 2, 3))))
        for frame in decoded
    ]
    assert shown == expected.tolist()


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_rotated_phone_video_is_sharded_as_it_is_shown(degrees, decoder, monkeypatch):
    """A portrait phone video is stored landscape with a display rotation: the shards hold
    what a player shows, at its shape (decord turns the frames, and squeezed them into the
    stored shape; the PyAV fallback turns them itself)."""
    import io
    from fractions import Fraction

    import av

    if decoder == "pyav":
        _decord_fails(monkeypatch)

    source = numbered_frames(20, height=48, width=64, seed=6)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(15))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(degrees)
        for frame in source:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    row = prepare_video(buffer.getvalue(), PrepOptions(min_frames=8))
    shown = np.rot90(source, degrees // 90, axes=(1, 2))
    decoded = decode_all_frames(row["video"]).astype(np.int16)
    assert decoded.shape == shown.shape and (row["width"], row["height"]) == shown.shape[2:0:-1]
    errors = np.abs(decoded - shown.astype(np.int16)).mean(axis=(1, 2, 3))
    # two lossy encodes (the test's at crf 23, data_prep's); turned the wrong way is 40+ off
    assert errors.max() < 2 * REENCODE_TOLERANCE
    wrong = np.rot90(shown, 2, axes=(1, 2)).astype(np.int16)
    assert np.abs(decoded - wrong).mean() > 4 * errors.mean()


def _decord_fails(monkeypatch) -> None:
    """data_prep's decord decode fails, so its PyAV fallback decodes the source."""
    from data_prep import transcode

    def decord_fails(*args):
        raise VideoDecodeError("decord failed")

    monkeypatch.setattr(transcode, "_decord_frames", decord_fails)


def _nearest_source_frames(video: bytes, source: np.ndarray) -> list[int]:
    """For each decoded frame of `video`, the index of the source frame it is nearest to."""
    decoded = decode_all_frames(video).astype(np.int16)
    return [
        int(np.argmin(np.abs(frame - source.astype(np.int16)).mean(axis=(1, 2, 3))))
        for frame in decoded
    ]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_a_trimmed_mp4_keeps_the_frames_a_player_shows(decoder, monkeypatch):
    """`ffmpeg -ss 1.4 -i in.mp4 -c copy` (or a phone's trim without re-encoding) starts at the
    keyframe before the cut and lists the frames up to the cut, never shown, in an edit list.
    Those five were counted as frames, which neither decoder returns: the clip was rejected
    as decode_error ("decoded 43 of 48 frames")."""
    import io

    import av

    if decoder == "pyav":
        _decord_fails(monkeypatch)

    source = numbered_frames(64, height=48, width=64, seed=2)
    buffer = io.BytesIO()
    whole = av.open(io.BytesIO(encode(source, fps=15, gop=16)))
    with whole, av.open(buffer, mode="w", format="mp4") as cut:
        stream = cut.add_stream_from_template(whole.streams.video[0])
        for packet in whole.demux(whole.streams.video[0]):
            if packet.pts is None or round(packet.pts * packet.time_base * 15) < 16:
                continue  # the demuxer's last, empty packet; the GOPs before the cut's
            shift = round(21 / 15 / packet.time_base)  # frame 21 is shown at 0 s
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
            cut.mux(packet)
    info = probe(buffer.getvalue())
    assert (info.num_frames, info.times[0], info.fps) == (43, 0.0, pytest.approx(15.0))
    row = prepare_video(buffer.getvalue(), PrepOptions(min_frames=8))
    assert row["num_frames"] == 43
    assert _nearest_source_frames(row["video"], source) == list(range(21, 64))


def test_an_avi_with_an_empty_chunk_for_a_dropped_frame_is_not_truncated():
    """Capture tools write an empty chunk for a frame they dropped; the AVI header counts it,
    FFmpeg skips it. The clip was rejected as truncated ("39 of the 40 frames the header
    declares"); the count is only checked against an mp4's header, which counts exactly."""
    import io
    from fractions import Fraction

    import av

    source = numbered_frames(40, height=48, width=64, seed=7)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(15))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index, pixels in enumerate(source):
            if index == 20:  # dropped: an empty chunk in its place
                empty = av.Packet(0)
                empty.pts = empty.dts = index
                empty.stream, empty.time_base = stream, Fraction(1, 15)
                container.mux(empty)
                continue
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(io.BytesIO(buffer.getvalue())) as container:
        assert container.streams.video[0].frames == 40  # what the header declares
    row = prepare_video(buffer.getvalue(), PrepOptions(min_frames=8))
    assert row["num_frames"] == 39
    assert _nearest_source_frames(row["video"], source) == [*range(20), *range(21, 40)]


def test_rejections_at_the_probe():
    with pytest.raises(Rejected) as info:
        prepare_video(b"", PrepOptions())
    assert info.value.reason == "empty"
    with pytest.raises(Rejected) as info:
        prepare_video(encode(numbered_frames(5)), PrepOptions())
    assert info.value.reason == "too_short"
    # Long enough at its own rate, too short once capped: 30 frames at 60 fps keep 7 at 15.
    with pytest.raises(Rejected) as info:
        prepare_video(encode(numbered_frames(30), fps=60), PrepOptions(max_fps=15))
    assert info.value.reason == "too_short" and "7 frames at 15 fps" in info.value.detail


# -- the command on Ray ---------------------------------------------------------------------------


def _bad_and_good_inputs(root: Path) -> dict[str, str | None]:
    """Write the bad-input matrix next to good files; return file name -> expected reason."""
    a, b = root / "class_a", root / "class_b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    frames = numbered_frames(40, height=48, width=64, seed=9)
    expected: dict[str, str | None] = {}

    def put(folder: Path, name: str, data: bytes, reason: str | None) -> None:
        (folder / name).write_bytes(data)
        expected[name] = reason

    put(a, "good_h264.mp4", encode(frames), None)
    put(a, "good_mkv_bframes.mkv", mux(frames, "matroska", "libx264", fps=15, bf=3), None)
    # decord decodes H.264 with B-frames in MPEG-TS to other pictures (60+ levels off), silently
    put(a, "good_ts_bframes.ts", mux(frames, "mpegts", "libx264", fps=15, bf=3), None)
    put(b, "good_mpeg4_bframes.avi", mux(frames, "avi", "mpeg4", fps=15, g=30, bf=2), None)
    put(
        b,
        "good_vp9.webm",
        mux(frames, "webm", "libvpx-vp9", fps=15, deadline="realtime", cpu_used=8),
        None,
    )
    put(b, "good_vfr.mp4", encode_vfr(frames, [1 / 30, 1 / 10, 1 / 15]), None)
    put(a, "zero_byte.mp4", b"", "empty")
    put(b, "text.mp4", b"this is not a video\n" * 50, "not_video")
    put(b, "image.mp4", png_bytes(), "not_video")
    put(b, "audio_only.mp4", audio_only_mp4(), "no_video_stream")
    put(a, "single_frame.mp4", encode(frames[:1]), "single_frame")
    put(a, "too_short.mp4", encode(frames[:6]), "too_short")
    put(a, "tiny_resolution.mp4", encode(numbered_frames(40, height=16, width=16)), "resolution")
    put(a, "extreme_aspect.mp4", encode(numbered_frames(20, height=32, width=1024)), "resolution")
    put(b, "broken_timestamps.mp4", zero_timestamps(encode(frames)), "timestamps")
    whole = encode(frames)
    put(a, "truncated_no_index.mp4", whole[: len(whole) // 2], "truncated")
    encode_to_file(a / "faststart.mp4", frames, faststart=True)
    data = (a / "faststart.mp4").read_bytes()
    (a / "faststart.mp4").unlink()
    put(a, "truncated_mid_stream.mp4", data[: len(data) // 2], "truncated")
    if os.geteuid() != 0:
        put(b, "no_permission.mp4", encode(frames), "unreadable")
        (b / "no_permission.mp4").chmod(0)
    else:  # root reads any file; a dangling link is the unreadable entry we can make
        (b / "dangling_link.mp4").symlink_to(root / "does_not_exist.mp4")
        expected["dangling_link.mp4"] = "unreadable"
    (root / "notes.txt").write_text("ignored: not a video extension")
    return expected


def test_bad_input_matrix_rejects_each_with_its_reason(tmp_path, ray_session, capsys):
    expected = _bad_and_good_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = data_prep.main(
        [
            str(tmp_path / "in"),
            str(out),
            "--min-frames",
            "8",
            "--max-videos-per-shard",
            "4",
            "--val-fraction",
            "0.3",
        ]
    )
    assert code == 0
    assert "data_prep: 6 videos" in capsys.readouterr().out
    rejects = _rejects(out)
    assert {name: reject["reason"] for name, reject in rejects.items()} == {
        name: reason for name, reason in expected.items() if reason
    }
    assert all(reject["detail"] for reject in rejects.values())
    rows = _rows(out)
    assert sorted(Path(row["source_path"]).name for row in rows) == sorted(
        name for name, reason in expected.items() if reason is None
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["inputs"] == len(expected)
    assert manifest["counts"]["accepted"] == len(rows) == 6
    assert manifest["counts"]["rejected"] == len(rejects)
    assert sum(manifest["counts"]["splits"].values()) == 6
    assert manifest["label_map"] == {"class_a": 0, "class_b": 1}
    assert manifest["total_frames"] == sum(row["num_frames"] for row in rows)
    for row in rows:  # shards round-trip: frame i of the shard is frame i of the source
        assert row["label"] == (0 if row["source_path"].startswith("class_a") else 1)
        source = decode_all_frames((tmp_path / "in" / row["source_path"]).read_bytes())
        decoded = decode_all_frames(row["video"]).astype(np.int16)
        assert decoded.shape == (40, 48, 64, 3) and row["num_frames"] == 40
        error = np.abs(decoded - source.astype(np.int16)).mean(axis=(1, 2, 3))
        shifted = np.abs(decoded[1:] - source[:-1].astype(np.int16)).mean(axis=(1, 2, 3))
        assert error.max() < 6 and shifted.min() > 2 * error.max(), row["source_path"]

    # idempotent: a re-run writes nothing. Equal bytes would not show it: a run that encoded
    # every shard again writes the same bytes (almost always), so the files must be untouched.
    def shard_files() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").iterdir()}

    before = shard_files()
    capsys.readouterr()
    assert (
        data_prep.main(
            [
                str(tmp_path / "in"),
                str(out),
                "--min-frames",
                "8",
                "--max-videos-per-shard",
                "4",
                "--val-fraction",
                "0.3",
            ]
        )
        == 0
    )
    assert shard_files() == before
    inputs = len(expected)
    assert (
        f"data_prep: {inputs} of the {inputs} inputs were sharded by an earlier run into {out}; "
        "0 added now"
    ) in capsys.readouterr().out


def test_the_quick_tours_synth_defaults_shard_and_decode(tmp_path, ray_session, capsys):
    """README's quick tour with the generator's own frame size (96 x 96, a width decord2 3.4
    pads and mis-shapes): every clip is sharded and its frames decode as RGB."""
    from svt_ray import synthetic
    from svt_ray.video import open_video

    assert synthetic.main([str(tmp_path / "videos"), "--num-clips", "6"]) == 0
    assert data_prep.main([str(tmp_path / "videos"), str(tmp_path / "shards")]) == 0
    printed = capsys.readouterr().out
    assert "6 videos in 1 shard, 0 rejected" in printed and "4 classes;" in printed
    assert "earlier run" not in printed and "no clip has a class label" not in printed
    rows = _rows(tmp_path / "shards")
    assert len(rows) == 6 and not (tmp_path / "shards" / "rejects.jsonl").read_text()
    frames = open_video(rows[0]["video"]).get_frames([0, 3, 1])
    assert frames.shape == (3, 96, 96, 3)

    # More clips made into the same folder, the same command again: it says what it added.
    assert synthetic.main([str(tmp_path / "videos"), "--num-clips", "8"]) == 0
    assert data_prep.main([str(tmp_path / "videos"), str(tmp_path / "shards")]) == 0
    printed = capsys.readouterr().out
    assert "8 videos in 2 shards" in printed
    assert "6 of the 8 inputs were sharded by an earlier run into" in printed
    assert printed.rstrip().endswith("; 2 added now")


def test_videos_outside_class_folders_are_sharded_unlabelled_and_it_says_so(
    tmp_path, ray_session, capsys
):
    """A flat folder of videos gave every clip label -1 without a word; `svt-ray eval` then
    found no labels, and its advice was about the held-out split."""
    (tmp_path / "flat").mkdir()
    encode_to_file(tmp_path / "flat" / "a.mp4", numbered_frames(20, height=32, width=32))
    assert data_prep.main([str(tmp_path / "flat"), str(tmp_path / "out"), "--min-frames", "8"]) == 0
    printed = capsys.readouterr().out
    assert "1 video in 1 shard" in printed and ", 0 classes;" in printed
    assert "no clip has a class label (the videos are not in one sub-folder per class" in printed
    # One video loose beside class folders: sharded unlabelled, and counted.
    (tmp_path / "mixed" / "dog").mkdir(parents=True)
    encode_to_file(tmp_path / "mixed" / "dog" / "b.mp4", numbered_frames(20, height=32, width=32))
    encode_to_file(tmp_path / "mixed" / "stray.mp4", numbered_frames(20, height=32, width=32))
    assert (
        data_prep.main([str(tmp_path / "mixed"), str(tmp_path / "out2"), "--min-frames", "8"]) == 0
    )
    printed = capsys.readouterr().out
    assert ", 1 class;" in printed
    assert "data_prep: 1 of the 2 clips have no class label (files directly under" in printed


def test_nothing_sharded_exits_non_zero(tmp_path, ray_session, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    (tmp_path / "in" / "text.mp4").write_bytes(b"hello")
    assert data_prep.main([str(tmp_path / "in"), str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "nothing was sharded" in captured.err and ", split none, 0 classes;" in captured.out
    # Pretraining, evaluation and the studies name the cause, not a missing split.
    from svt_ray.config import ConfigError
    from svt_ray.data import read_dataset_manifest

    with pytest.raises(
        ConfigError,
        match=r"holds no clips: data_prep rejected all 2 of its inputs \(empty 1, not_video 1\);"
        r" .*rejects.jsonl says why",
    ):
        read_dataset_manifest(str(tmp_path / "out"))
    assert data_prep.main([str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    (tmp_path / "no_videos").mkdir()
    assert data_prep.main([str(tmp_path / "no_videos"), str(tmp_path / "out3")]) == 2


def test_hung_reads_time_out_and_the_videos_queued_behind_them_do_not(tmp_path, ray_session):
    """`--file-timeout` counts from when a video's task starts: videos that wait for a CPU
    behind hung ones are sharded once the hung tasks are killed, not rejected with them."""
    from data_prep.inputs import video_id

    source = tmp_path / "in"
    source.mkdir()
    cpus = int(ray_session.cluster_resources()["CPU"])
    hung = [f"hangs_{i}.mp4" for i in range(cpus)]  # one per CPU: the good ones must queue
    # Tasks are submitted in id order; the good videos' ids come after every hung one's.
    last_hung = max(video_id(name) for name in hung)
    good = [name for name in (f"good_{i}.mp4" for i in range(100)) if video_id(name) > last_hung]
    good = good[:2]
    for name in hung:
        os.mkfifo(source / name)  # opening it blocks forever, like a stuck network mount
    for name in good:
        encode_to_file(source / name, numbered_frames(20, height=32, width=32))
    started = time.monotonic()
    # 10 s: a good clip on a cold worker of a loaded 2-core machine is done well within it
    code = data_prep.main([str(source), str(tmp_path / "out"), "--file-timeout", "10"])
    assert code == 0, "the run ends instead of hanging"
    rejects = _rejects(tmp_path / "out")
    assert {name: r["reason"] for name, r in rejects.items()} == dict.fromkeys(hung, "timeout")
    assert all("after it started" in r["detail"] for r in rejects.values())
    assert sorted(Path(row["source_path"]).name for row in _rows(tmp_path / "out")) == sorted(good)
    assert time.monotonic() - started > 10  # they did wait behind the hung ones


@pytest.mark.parametrize("stopped_between_writes", [False, True])
def test_retry_processes_again_what_a_run_rejected_for_the_reasons_named(
    tmp_path, ray_session, stopped_between_writes
):
    """A video rejected as `timeout` (or `crash`) stayed rejected: its shard was done. With
    `--retry timeout`, a re-run takes it out of its shard and processes it again in a new
    one; the counts hold it once. A retry stopped after rewriting the shard's state and
    before the plan leaves the video in neither: the next run takes it all the same."""
    source, out = tmp_path / "in" / "dog", tmp_path / "out"
    source.mkdir(parents=True)
    encode_to_file(source / "good.mp4", numbered_frames(20, height=32, width=32))
    os.mkfifo(source / "stuck.mp4")  # a network mount that hung this time
    argv = [str(tmp_path / "in"), str(out), "--file-timeout", "10", "--min-frames", "8"]
    assert data_prep.main(argv) == 0
    assert {name: r["reason"] for name, r in _rejects(out).items()} == {"stuck.mp4": "timeout"}
    (source / "stuck.mp4").unlink()
    encode_to_file(source / "stuck.mp4", numbered_frames(20, height=32, width=32, seed=1))
    assert data_prep.main(argv) == 0  # without --retry: the shard is done, nothing changes
    assert "stuck.mp4" in _rejects(out)

    if stopped_between_writes:  # what --retry writes first, and nothing after it
        (state_file,) = (out / "_state").glob("part-*.json")
        state = json.loads(state_file.read_text())
        stuck = _rejects(out)["stuck.mp4"]["id"]
        state["ids"].remove(stuck)
        state["rejects"] = []
        state_file.write_text(json.dumps(state))
        assert data_prep.main(argv) == 0
    else:
        assert data_prep.main([*argv, "--retry", "timeout,crash"]) == 0
    assert not _rejects(out)
    assert sorted(Path(r["source_path"]).name for r in _rows(out)) == ["good.mp4", "stuck.mp4"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["inputs"] == 2
    assert (manifest["counts"]["accepted"], manifest["counts"]["rejected"]) == (2, 0)
    assert data_prep.main([*argv, "--retry", "timeout"]) == 0  # nothing left to retry
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]
    with pytest.raises(SystemExit) as typo:  # argparse names it, with the reasons there are
        data_prep.main([*argv, "--retry", "timout"])
    assert typo.value.code == 2


def test_csv_manifest_input_uri_output_dry_run_and_option_guard(
    tmp_path, synthetic_videos, ray_session, capsys
):
    root, _ = synthetic_videos
    clips = sorted(root.rglob("*.mp4"))[:6]
    lines = ["path,label,split"] + [
        f"{clip.relative_to(root)},{clip.parent.name},{'val' if i % 3 == 0 else 'train'}"
        for i, clip in enumerate(clips)
    ]
    (root / "subset.csv").write_text("\n".join(lines) + "\n")
    out_uri = (tmp_path / "out").as_uri()  # file:///... through pyarrow's filesystem layer
    args = [str(root / "subset.csv"), out_uri, "--short-side", "48"]
    assert data_prep.main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "6 videos" in printed and "'val': 2" in printed
    assert not (tmp_path / "out").exists()
    assert data_prep.main(args) == 0
    rows = _rows(tmp_path / "out")
    assert sorted(row["split"] for row in rows) == ["train"] * 4 + ["val"] * 2
    assert {(row["height"], row["width"]) for row in rows} == {(48, 60)}  # 64x80 -> short 48
    assert all(row["label_name"].startswith("0") for row in rows)
    code = data_prep.main([*args[:2], "--short-side", "64"])
    assert code == 2 and "other options (short_side: 48 -> 64)" in capsys.readouterr().err
    # A run stopped before its first shard leaves a plan and nothing made with its options:
    # other options start it anew.
    fresh = tmp_path / "fresh"
    shutil.copytree(
        tmp_path / "out" / "_state", fresh / "_state", ignore=shutil.ignore_patterns("part-*")
    )
    assert data_prep.main([args[0], str(fresh), "--short-side", "64"]) == 0
    assert "the earlier run into" in capsys.readouterr().out
    assert {(row["height"], row["width"]) for row in _rows(fresh)} == {(64, 80)}
    # Another input into the same output would merge two datasets: refused. The same input
    # with videos gone since: said, as their shards stay.
    others = sorted(root.rglob("*.mp4"))[6:9]
    (root / "others.csv").write_text("path\n" + "".join(f"{c.relative_to(root)}\n" for c in others))
    assert data_prep.main([str(root / "others.csv"), out_uri, "--short-side", "48"]) == 2
    assert "none of which is listed under" in capsys.readouterr().err
    (root / "fewer.csv").write_text("\n".join(lines[:5]) + "\n")
    assert data_prep.main([str(root / "fewer.csv"), *args[1:], "--dry-run"]) == 0
    assert "2 of the 6 inputs already planned" in capsys.readouterr().err


# data_prep whose shard writes from part-00004 on wait a minute, so that a kill -9 lands mid-run
# however fast the machine is (without it, all ten tiny shards were sometimes written between
# two polls). The wrapper lives in __main__, so Ray ships it to its workers by value.
_HELD_BACK_DATA_PREP = """
import json, sys, time
import data_prep.cli as cli
write_shard_task = cli.write_shard_task
def held_back(output, name, *rest):
    if int(name.rsplit("-", 1)[1]) >= 4:
        time.sleep(60)
    return write_shard_task(output, name, *rest)
cli.write_shard_task = held_back
sys.exit(cli.main(json.loads(sys.argv[1])))
"""


def _kill_ray_session_of(driver_pid: int) -> None:
    """SIGKILL every process of the local Ray session a killed driver started. Ray names the
    session after its driver's pid, and its task workers live outside the driver's process
    group: one survived the group kill for minutes and could wake from the held-back sleep and
    write its shard while the resumed run is compared. (The CI failures first blamed on it
    were the encoder's: docs/data.md.)"""
    marker = f"_{driver_pid}/".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"session_" in command and marker in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def _assert_same_shard(name: str, got, want, log: Path) -> None:
    """The same rows in the same order, every column equal but the encoded video's bytes.

    libx264 is not bit-reproducible on these machines: the same frames, encoder settings and
    process occasionally (here 1 to 29 in 5,000 encodes, in bursts; threads=1 throughout)
    come out with other rate-control decisions. So a clip that the resumed run encoded may
    differ in its bytes; it must still be a faithful encode of the same clip: its checksum
    matches its bytes, and it decodes to the reference's frame count, size and content within
    codec tolerance (a wrong clip differs by tens of levels)."""
    assert got.column_names == want.column_names
    exact = [c for c in want.column_names if c not in ("video", "checksum")]
    if not got.select(exact).equals(want.select(exact)):
        columns = [c for c in exact if not got[c].equals(want[c])]
        pytest.fail(
            f"{name}: columns {columns} differ; ids resumed {got['id'].to_pylist()} vs "
            f"reference {want['id'].to_pylist()}; killed run's log tail: " + log.read_text()[-800:]
        )
    for row, (video, reference_video) in enumerate(
        zip(got["video"].to_pylist(), want["video"].to_pylist(), strict=True)
    ):
        assert hashlib.sha256(video).hexdigest() == got["checksum"][row].as_py()
        if video != reference_video:
            error = frame_errors(video, reference_video)
            assert error.max() < REENCODE_TOLERANCE, (
                f"{name} row {row}: frame errors {error.round(1).tolist()}"
            )


def test_killed_run_resumes_to_the_same_shards(tmp_path, synthetic_videos, ray_session):
    root, config = synthetic_videos
    common = ["--max-videos-per-shard", "2", "--short-side", "48"]
    reference = tmp_path / "reference"
    assert data_prep.main([str(root), str(reference), *common]) == 0

    resumed = tmp_path / "resumed"
    log = tmp_path / "killed_run.log"
    argv = [str(root), str(resumed), *common, "--num-cpus", "1", "--address", "local"]
    process = subprocess.Popen(
        [sys.executable, "-c", _HELD_BACK_DATA_PREP, json.dumps(argv)],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    state = resumed / "_state"
    deadline = time.monotonic() + 300  # a fresh Ray on a loaded 2-core machine
    while time.monotonic() < deadline and len(list(state.glob("part-*.json"))) < 2:
        assert process.poll() is None, (
            f"data_prep ended (exit {process.returncode}) before it could be killed:\n"
            + log.read_text()[-3000:]
        )
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    _kill_ray_session_of(process.pid)
    done_before = len(list(state.glob("part-*.json")))
    assert 2 <= done_before <= 4, "the kill should land mid-run"
    assert not (resumed / "manifest.json").exists()
    leftover = resumed / "shards" / ".tmp-deadbeef-part-00007.parquet"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))  # the killed run's: old

    assert data_prep.main([str(root), str(resumed), *common]) == 0
    assert not leftover.exists()
    # Any temporary the killed run left mid-write is younger than an hour: kept, and no shard.
    names = sorted(p.name for p in (resumed / "shards").iterdir() if p.name[0] != ".")
    assert names == sorted(p.name for p in (reference / "shards").iterdir())
    assert len(names) == config.num_clips // 2
    for name in names:
        got, want = (pq.read_table(folder / "shards" / name) for folder in (resumed, reference))
        _assert_same_shard(name, got, want, log)
    ids = [row["id"] for row in _rows(resumed)]
    assert len(ids) == len(set(ids)) == config.num_clips
    assert (
        json.loads((resumed / "manifest.json").read_text())["counts"]
        == json.loads((reference / "manifest.json").read_text())["counts"]
    )


def test_ctrl_c_keeps_the_shards_written_and_says_how_to_finish(
    tmp_path, synthetic_videos, ray_session
):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) stops at the
    next wait, not inside a Ray call: exit 130, one line saying the written shards are kept
    and the same command finishes, no traceback and no manifest; the same command then does.
    Before, the exit was 1, 130 or a segfault (139) by when it landed, some with a traceback."""
    root, config = synthetic_videos
    out = tmp_path / "out"
    common = ["--max-videos-per-shard", "2", "--short-side", "48", "--max-in-flight", "2"]
    argv = [
        str(root),
        str(out),
        *common,
        "--address",
        ray_session.get_runtime_context().gcs_address,
    ]
    log = tmp_path / "interrupted.log"
    process = subprocess.Popen(
        [sys.executable, "-c", _HELD_BACK_DATA_PREP, json.dumps(argv)],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((out / "_state").glob("part-*.json"))) < 2:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    err = log.read_text()
    written = len(list((out / "_state").glob("part-*.json")))
    assert f"interrupted; {written} shard(s) written now are kept" in err, err[-3000:]
    assert "Run the same command again to finish" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists() and written < config.num_clips // 2

    assert data_prep.main([str(root), str(out), *common]) == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["inputs"] == counts["accepted"] == config.num_clips
    ids = [row["id"] for row in _rows(out)]
    assert len(ids) == len(set(ids)) == config.num_clips


def test_sizes_counts_and_limits_must_be_positive(tmp_path, capsys):
    """`--num-cpus 0` waited for a CPU forever; `--file-timeout -5` rejected every video as
    a timeout; `--shard-size-mb 0` or `--max-videos-per-shard 0` planned a shard per video."""
    for flag, value, said in (
        ("--num-cpus", "0", "--num-cpus 0: give 1 or more"),
        ("--max-in-flight", "0", "--max-in-flight 0: give 1 or more"),
        ("--max-videos-per-shard", "-3", "--max-videos-per-shard -3: give 1 or more"),
        ("--shard-size-mb", "0", "--shard-size-mb 0: give a size above 0"),
        ("--file-timeout", "-5", "--file-timeout -5: give seconds, or 0 for no limit"),
    ):
        assert data_prep.main([str(tmp_path), str(tmp_path / "out"), flag, value]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_removes_old_temporaries_and_leaves_those_another_run_may_be_writing(tmp_path):
    """Two data_prep runs into one output: the second deleted the first's temporary files
    as a killed run's leftovers, and the first one's writes failed."""
    from pyarrow import fs as pafs

    from data_prep.shards import STATE_DIR, TEMPORARY_AGE_S, Output

    output = Output(pafs.LocalFileSystem(), str(tmp_path))
    for folder in ("shards", STATE_DIR):
        (tmp_path / folder).mkdir()
    old, young = tmp_path / "shards" / ".tmp-0-part-00001.parquet", tmp_path / ".tmp-1-x.json"
    also_old = tmp_path / STATE_DIR / ".tmp-2-part-00001.json"
    for path in (old, young, also_old):
        path.write_bytes(b"partial")
    long_ago = time.time() - TEMPORARY_AGE_S - 60
    for path in (old, also_old):
        os.utime(path, (long_ago, long_ago))
    kept = tmp_path / "shards" / "part-00001.parquet"  # not a temporary, however old
    kept.write_bytes(b"shard")
    os.utime(kept, (long_ago, long_ago))
    assert output.remove_temporaries() == (2, 1)
    assert not old.exists() and not also_old.exists() and young.exists() and kept.exists()
    assert output.remove_temporaries(older_than_s=0) == (1, 0) and not young.exists()


def test_write_file_streams_a_local_file_in_pieces_atomically(tmp_path, monkeypatch):
    """A Path is copied in 8 MiB pieces (the MLflow store backup), through a temporary file
    in the same folder that is then moved over the target: what the filesystem was asked to
    do is recorded, not only the result (a whole read, written in place, gave the same file)."""
    import data_prep.inputs
    from data_prep.shards import write_file

    calls, resolve = [], data_prep.inputs.resolve_filesystem

    class Stream:  # an output stream whose writes are recorded
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.stream.__exit__(*exc)

        def write(self, piece):
            calls.append(("write", len(piece)))
            return self.stream.write(piece)

    class Recorded:  # the filesystem write_file resolves, with its writes and moves recorded
        def __init__(self, filesystem):
            self.filesystem = filesystem

        def __getattr__(self, name):
            return getattr(self.filesystem, name)

        def open_output_stream(self, path):
            calls.append(("open", path))
            return Stream(self.filesystem.open_output_stream(path))

        def move(self, source, destination):
            calls.append(("move", source, destination))
            return self.filesystem.move(source, destination)

    def recording_resolve(target):
        filesystem, path = resolve(target)
        return Recorded(filesystem), path

    monkeypatch.setattr(data_prep.inputs, "resolve_filesystem", recording_resolve)
    source = tmp_path / "big.bin"
    data = np.random.default_rng(0).integers(0, 256, size=(17 << 20) + 5, dtype=np.uint8)
    source.write_bytes(data.tobytes())  # pieces of 8, 8 and 1 MiB + 5 bytes
    target = tmp_path / "bucket" / "copy.bin"
    write_file(target.as_uri(), source)
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]  # no temporary left
    (_, temporary), *writes, move = calls
    assert temporary.startswith(f"{target.parent}/.tmp-") and temporary.endswith("-copy.bin")
    assert writes == [("write", 8 << 20), ("write", 8 << 20), ("write", (1 << 20) + 5)]
    assert move == ("move", temporary, str(target))


def test_a_write_whose_clean_up_fails_is_still_a_write(tmp_path, monkeypatch, caplog):
    """Removing a file's stale temporaries after writing it is best effort: a listing or a
    delete that fails (an object store's hiccup, another user's file) is a warning, not a
    failed write (a backup said failed, a Train callback raising after a checkpoint)."""
    from data_prep.shards import Output, write_file

    def fails(*args, **kwargs):
        raise PermissionError("not yours")

    monkeypatch.setattr(Output, "remove_temporaries", fails)
    target = tmp_path / "progress.json"
    write_file(str(target), b"{}")
    assert target.read_bytes() == b"{}"
    assert "progress.json is written; its stale temporary files stay: not yours" in caplog.text


def test_a_failed_write_file_leaves_no_temporary(tmp_path):
    """`svt-ray tracking backup DB DEST --every 300` left a whole copy of the store as a
    .tmp-* file on every failed round (DEST a folder): a failed move or write removes it."""
    from data_prep.shards import write_file

    source = tmp_path / "in" / "mlflow.db"
    source.parent.mkdir()
    source.write_bytes(b"a store")
    (tmp_path / "out" / "mlflow.db").mkdir(parents=True)  # the destination is a folder
    for _ in range(2):
        with pytest.raises(IsADirectoryError):
            write_file(str(tmp_path / "out" / "mlflow.db"), source)
    with pytest.raises(FileNotFoundError):  # the source gone: the write itself fails
        write_file((tmp_path / "out" / "copy.db").as_uri(), tmp_path / "in" / "gone.db")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mlflow.db"]
    assert list((tmp_path / "out" / "mlflow.db").iterdir()) == []


def test_a_local_write_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """The rename made a write atomic but not durable: after a power cut a first-time state,
    manifest or shard could come back renamed and empty. On a local disk the file is synced
    before the rename and its folder after; an object store lists an upload only once whole."""
    from pyarrow import fs as pafs

    from data_prep.shards import STATE_DIR, Output

    target = tmp_path / STATE_DIR / "part-00000.json"
    synced, fsync = [], os.fsync

    def recorded_fsync(descriptor):  # what was synced (a rename keeps the inode), and when
        synced.append((os.fstat(descriptor).st_ino, target.exists()))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    Output(pafs.LocalFileSystem(), str(tmp_path)).write_json({"name": "part-00000"}, STATE_DIR,
                                                             "part-00000.json")  # fmt: skip
    assert synced == [(target.stat().st_ino, False), (target.parent.stat().st_ino, True)]
    fsspec = pytest.importorskip("fsspec")
    store = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    Output(store, "/bucket").write_json({"name": "part-00000"}, STATE_DIR, "part-00000.json")
    assert len(synced) == 2


def test_a_shard_cut_short_is_written_again_by_the_same_command(tmp_path, monkeypatch):
    """A shard cut short after its state was written (`truncate -s 100`) was taken as done: the
    re-run wrote a manifest and exited 0, and training then refused the dataset. The size its
    state records is now checked, so the same command writes that shard, and only it, again.
    The shards are written in this process, as the Ray tasks would, to keep Ray out."""
    import data_prep.cli as cli
    from svt_ray.config import ConfigError
    from svt_ray.data import read_dataset_manifest
    from svt_ray.synthetic import SynthConfig, generate_dataset

    written = []

    def in_process(args, output, input_fs, options, todo, by_id, splits, label_map):
        for entry in todo:
            written.append(entry["name"])
            videos = [by_id[video_id] for video_id in entry["ids"]]
            results = [
                cli.process_video(v, splits[v.id], label_map[v.label_name], input_fs, options)
                for v in videos
            ]
            statuses, rows = zip(*results, strict=True)
            cli.write_shard_task(output, entry["name"], entry["ids"], *statuses, *rows)
        return 0

    monkeypatch.setattr(cli, "_run_on_ray", in_process)
    videos, out = tmp_path / "videos", tmp_path / "out"
    small = SynthConfig(num_clips=6, num_classes=2, num_frames=8, height=32, width=32)
    generate_dataset(str(videos), small)
    command = [str(videos), str(out), "--min-frames", "8", "--min-side", "16",
               "--short-side", "32", "--max-videos-per-shard", "2"]  # fmt: skip
    assert data_prep.main(command) == 0
    assert written == ["part-00000", "part-00001", "part-00002"]
    ids = [row["id"] for row in _rows(out)]
    os.truncate(out / "shards" / "part-00001.parquet", 100)
    with pytest.raises(ConfigError, match=r"Run the same `svt-ray prep` command again to write"):
        read_dataset_manifest(str(out))
    written.clear()
    assert data_prep.main(command) == 0
    assert written == ["part-00001"]
    read_dataset_manifest(str(out))  # the sizes match again
    assert [row["id"] for row in _rows(out)] == ids and len(ids) == 6


def test_every_prep_option_reaches_the_work_and_the_split_seed_moves_the_splits(
    tmp_path, monkeypatch
):
    """Each option given off its default is in what `main` hands the shard dispatcher (an
    option dropped on the way would be the default there, and the manifest would record the
    default too), and another --split-seed assigns other splits. The dispatcher
    (`_run_on_ray`) is replaced by a capture of its inputs."""
    import data_prep.cli as cli
    from data_prep.transcode import PrepOptions
    from svt_ray.synthetic import SynthConfig, generate_dataset

    seen = []

    def capture(args, output, input_fs, options, todo, by_id, splits, label_map):
        seen.append((options, dict(splits), [entry["ids"] for entry in todo]))
        return len(todo)  # every write "failed": nothing more to check after this

    monkeypatch.setattr(cli, "_run_on_ray", capture)
    videos = tmp_path / "videos"
    generate_dataset(
        str(videos), SynthConfig(num_clips=12, num_classes=2, num_frames=8, height=32, width=32)
    )
    options = [
        "--short-side", "24", "--max-fps", "5", "--gop", "4", "--crf", "30",
        "--preset", "ultrafast", "--min-frames", "3", "--min-duration", "0.1",
        "--min-side", "10", "--max-side", "999", "--max-aspect", "3.5",
        "--val-fraction", "0.5", "--max-videos-per-shard", "5",
    ]  # fmt: skip
    for seed in ("1", "2"):
        data_prep.main([str(videos), str(tmp_path / f"out{seed}"), *options, "--split-seed", seed])
    (first, splits_1, shards), (second, splits_2, _) = seen
    expected = PrepOptions(
        short_side=24, max_fps=5.0, gop=4, crf=30, preset="ultrafast", min_frames=3,
        min_duration_s=0.1, min_side=10, max_side=999, max_aspect=3.5,
    )  # fmt: skip
    assert first == expected and second == expected
    given = ("short_side", "max_fps", "gop", "crf", "preset", "min_frames", "min_duration_s",
             "min_side", "max_side", "max_aspect")  # fmt: skip
    defaults = PrepOptions()
    assert all(getattr(expected, name) != getattr(defaults, name) for name in given)
    assert sorted(splits_1) == sorted(splits_2) and splits_1 != splits_2
    assert {"train", "val"} <= set(splits_1.values())
    assert [len(ids) for ids in shards] == [5, 5, 2]


def test_an_svt_ray_recipe_given_as_the_encoder_preset_is_refused_before_any_work(tmp_path, capsys):
    """`--preset` of data_prep is x264's: `--preset tiny` used to encode nothing and reject
    every video as `error` after a full pass. It is now a usage error naming the choices."""
    with pytest.raises(SystemExit) as exit_info:
        data_prep.cli.main([str(tmp_path / "videos"), str(tmp_path / "out"), "--preset", "tiny"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tiny'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not an x264 preset"):
        PrepOptions(preset="tiny")


def test_a_record_cut_short_is_named_and_a_shards_record_is_redone(tmp_path, caplog):
    """The records are written atomically, so a broken one was cut short by a copy or edited
    by hand. A shard's record broken: the shard is written again. The plan or the manifest
    broken: an error that names the file (was a bare JSONDecodeError, no file named)."""
    from pyarrow import fs as pafs

    from data_prep.shards import STATE_DIR, Output, load_states
    from svt_ray.config import ConfigError
    from svt_ray.data import read_dataset_manifest

    output = Output(pafs.LocalFileSystem(), str(tmp_path))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-00000.parquet").write_bytes(b"rows")
    output.write_json({"file": "shards/part-00000.parquet"}, STATE_DIR, "part-00000.json")
    output.write_json({"file": "shards/part-00001.parquet"}, STATE_DIR, "part-00001.json")
    whole = (tmp_path / STATE_DIR / "part-00001.json").read_text()
    (tmp_path / STATE_DIR / "part-00001.json").write_text(whole[: len(whole) // 2])
    with caplog.at_level("WARNING", logger="data_prep.shards"):
        states = load_states(output, ["part-00000", "part-00001"])
    assert list(states) == ["part-00000"]
    assert "part-00001.json: not valid JSON" in caplog.text and "redoing shard" in caplog.text

    (tmp_path / STATE_DIR / "plan.json").write_text('{"shards": [')
    with pytest.raises(ValueError, match=r"_state/plan.json: not valid JSON .* cut short"):
        output.read_json(STATE_DIR, "plan.json")
    (tmp_path / "manifest.json").write_text('{"schema_version": ')
    with pytest.raises(ConfigError, match=r"data.path: .*manifest.json: not valid JSON.*again"):
        read_dataset_manifest(str(tmp_path))


def test_a_manifest_json_that_is_not_an_object_is_named(tmp_path):
    """A manifest.json of valid JSON but no object (`[1, 2]`) gave `AttributeError: 'list'
    object has no attribute 'get'` in `svt-ray pretrain/eval --data`: now named like one
    that does not parse, with the way to write it anew."""
    from data_prep.shards import read_manifest
    from svt_ray.config import ConfigError
    from svt_ray.data import read_dataset_manifest

    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest.json holds a list, not a data_prep manifest"):
        read_manifest(str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.path: .*holds a list, .*again"):
        read_dataset_manifest(str(tmp_path))


def _one_video_folder(root: Path) -> Path:
    """A folder with one .mp4 (not a real video): enough for what is checked before Ray."""
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.mp4").write_bytes(b"not decoded before Ray")
    return root


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """An OUTPUT that is a file, lies under one, or is a folder without write permission was a
    traceback (NotADirectoryError, PermissionError, exit 1) once the plan was written, and a
    dry run planned into it. Each is exit 2 before any work, the dry run too; nothing is left."""
    import data_prep.cli
    from data_prep.shards import Output

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a run that reached Ray fails at once
    videos = _one_video_folder(tmp_path / "videos")
    (tmp_path / "file").write_text("not a folder")
    for output, why in (
        (tmp_path / "file", "it is a file"),
        (tmp_path / "file" / "out", f"{tmp_path / 'file'} is not a folder"),
    ):
        for dry_run in ([], ["--dry-run"]):
            assert data_prep.main([str(videos), str(output), *dry_run]) == 2
            said = capsys.readouterr()
            assert f"error: OUTPUT {output}: cannot write there ({why}); give a folder" in said.err
            assert "dry run" not in said.out
    # Root may write anywhere: the permission check is told no.
    monkeypatch.setattr(data_prep.cli.os, "access", lambda path, mode: False)
    assert data_prep.main([str(videos), str(tmp_path / "ro" / "out"), "--dry-run"]) == 2
    assert f"(no permission to write in {tmp_path}); give" in capsys.readouterr().err
    monkeypatch.undo()
    # What only the first write shows (a store's permissions): the same error, nothing left.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")

    def refused(self, value, *parts):
        raise PermissionError(13, "Permission denied", self.path(*parts))

    monkeypatch.setattr(Output, "write_json", refused)
    assert data_prep.main([str(videos), str(tmp_path / "out")]) == 2
    assert "OUTPUT" in (err := capsys.readouterr().err) and "(PermissionError: " in err
    assert not list((tmp_path / "out").rglob("*"))


def test_a_manifest_or_split_file_not_in_utf8_is_named(tmp_path, capsys):
    """A manifest saved as Latin-1 (Excel on Windows) printed only "'utf-8' codec can't
    decode byte 0xff in position 0": the file is named and the fix said, exit 2."""
    videos = _one_video_folder(tmp_path / "videos")
    (videos / "list.csv").write_bytes("path,label\ncat/a.mp4,café\n".encode("latin-1"))
    assert data_prep.main([str(videos / "list.csv"), str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    said = f"{videos / 'list.csv'}: not UTF-8 text (byte 0xe9 at position 24); save the manifest"
    assert f"{said} as UTF-8" in err
    (tmp_path / "train.txt").write_bytes(b"\xffcat/a.mp4\n")
    argv = [str(videos), str(tmp_path / "out"), "--split-file", f"train={tmp_path / 'train.txt'}"]
    assert data_prep.main([*argv, "--dry-run"]) == 2
    assert "train.txt: not UTF-8 text (byte 0xff at position 0); save the split file as UTF-8" in (
        capsys.readouterr().err
    )


def test_an_input_with_no_videos_is_bad_input(tmp_path, capsys):
    """A manifest with no rows said "no video files (.mp4, ...) under m_empty.csv", and it
    and a folder of other files exited 1, as if videos had failed: now exit 2, a manifest
    said to list none, a folder named with the endings looked for."""
    (tmp_path / "m_empty.csv").write_text("path,label\n")
    (tmp_path / "m_empty.jsonl").write_text("")
    for manifest in ("m_empty.csv", "m_empty.jsonl"):
        assert data_prep.main([str(tmp_path / manifest), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / manifest} lists no videos: a manifest needs a row per video" in err
        assert "(.mp4" not in err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no video")
    assert data_prep.main([str(tmp_path / "notes"), str(tmp_path / "out")]) == 2
    assert "no video files (.mp4, .m4v, .mov, " in (err := capsys.readouterr().err)
    assert f"under {tmp_path / 'notes'}; give the folder that holds the videos" in err
    assert not (tmp_path / "out").exists()


def test_the_output_is_kept_apart_from_a_folder_input(tmp_path, capsys):
    """`prep VIDEOS VIDEOS` (or an output inside the input) was accepted: the dataset's files
    went among the videos, over any of the same names. Refused, exit 2; an input inside the
    output is fine (`prep data/raw data`) unless it is in the output's shards/ or _state/. A
    manifest is refused only where the output would write over it; one kept among the videos,
    with the output next to it, is fine (no folder is walked)."""
    videos = _one_video_folder(tmp_path / "videos")
    for output, why in (
        (videos, " are one folder."),
        (tmp_path / "videos" / "." / "cat" / "..", " are one folder."),
        (videos / "shards", ": the output is inside the input folder."),
    ):
        assert data_prep.main([str(videos), str(output), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"INPUT {videos} and OUTPUT {output}{why}" in err and "give an output folder" in err
    assert data_prep.main([str(videos), str(tmp_path), "--dry-run"]) == 0  # beside it: fine
    assert "dry run: 1 videos" in capsys.readouterr().out
    inner = _one_video_folder(tmp_path / "data" / "shards" / "raw")
    assert data_prep.main([str(inner), str(tmp_path / "data"), "--dry-run"]) == 2
    assert "the input folder is in the output's own shards/ or _state/" in (capsys.readouterr().err)
    (videos / "manifest.json").write_text('[{"path": "cat/a.mp4"}]')
    assert data_prep.main([str(videos / "manifest.json"), str(videos), "--dry-run"]) == 2
    assert "over the input manifest" in capsys.readouterr().err
    (videos / "list.csv").write_text("path\ncat/a.mp4\n")
    for output in (videos, videos / "shards"):
        assert data_prep.main([str(videos / "list.csv"), str(output), "--dry-run"]) == 0
        assert "dry run: 1 videos" in capsys.readouterr().out
