"""Ray Data pipelines from data_prep shards to fixed-shape uint8 view batches.

The only module that touches `ray.data` (design.md §2). Two datasets:

- `build_view_dataset`: SVT pretraining views. Per clip, the view sampler (`svt_ray.views`)
  plans every view's frames and crop first, the decoder fetches the union of those frames once,
  and every view is cut from them (design.md "One decode per clip"). Columns: one per view slot
  (`g0`, `g1`, `l0`, ...: uint8 (3, t, s, s), fixed per slot), `label` (int64, -1 unlabelled)
  and `clip_id` (int64, see `clip_key`: numeric so `iter_torch_batches` converts every column).
- `build_eval_dataset`: labelled clips for kNN / linear probe / slow-fast evaluation: for each
  named clip spec (frames, size), frames spread evenly over a centred window, short side
  resized to `size`, centre crop. One column per spec, plus `label` and `clip_id`.

Plan: read items (slices of the shards' row groups, each pass over the split in its own
order; a training run's remaining epochs are one stream, so the actors do not restart at
every epoch) -> `map_batches` with a callable class on an actor pool, into which Ray fuses
the read (decoders are created inside the actors). Shuffling beyond that order (a local
buffer) and one stream per Train worker (`streaming_split`) come from Ray Train's
`get_dataset_shard(...).iter_torch_batches`.

A clip that fails to decode is skipped, logged, and counted: per actor, in the Ray metric
`svt_data_decode_failures`, and in a small named actor that `decode_failures()` reads (the
count and the clips' ids).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from svt_ray.config import ConfigError, ExperimentConfig, ViewsConfig
from svt_ray.video import VideoDecodeError, open_video
from svt_ray.views import ViewSampler, spread_indices, view_slots

logger = logging.getLogger(__name__)

READ_COLUMNS = ["id", "label", "split", "video", "num_frames", "height", "width"]
READ_ROWS = 64  # rows per read item (data_prep writes 32-row groups)
READ_BLOCKS = 2000  # most blocks of read items in one stream (see `_read_shards`)
STATS_ACTOR = "svt_data_decode_stats_v3"  # v2: distinct clips per key (a run's folder); v3: ids
STATS_NAMESPACE = "svt_ray"


# -- the dataset directory -------------------------------------------------------------------


def read_dataset_manifest(data_path: str) -> dict:
    """manifest.json of a data_prep output (local path or URI), with its location attached.

    A folder that is not one (no manifest, or one of another schema version) is a
    `ConfigError` on `data.path` that says how to make one, not a traceback; a path that does
    not exist, or one inside a dataset, says so instead.
    """
    from data_prep.inputs import InputError
    from data_prep.shards import SCHEMA_VERSION, ManifestVersionError, read_manifest

    try:
        manifest, filesystem, root = read_manifest(data_path)
    except FileNotFoundError as error:
        if _holds_videos(data_path):
            raise ConfigError(
                f"data.path: {error}; it holds videos: shard them with `svt-ray prep "
                f"{shlex.quote(data_path)} SHARDS` (or `python -m data_prep`) and pass --data "
                "SHARDS"
            ) from None
        near_miss = _near_miss(data_path)
        if near_miss:
            raise ConfigError(f"data.path: {near_miss}") from None
        raise ConfigError(
            f"data.path: {error}; make one with `svt-ray prep VIDEOS {shlex.quote(data_path)}` "
            "(or `python -m data_prep`), or pass --data with an existing one"
        ) from None
    except ManifestVersionError as error:
        raise ConfigError(
            f"data.path: {error}; shard the videos again with this version's data_prep "
            f"(schema {SCHEMA_VERSION}) into a new folder"
        ) from None
    except InputError as error:  # a store that cannot be opened or does not answer
        raise ConfigError(f"data.path: {error}") from None
    except ValueError as error:  # a manifest.json that does not parse
        raise ConfigError(
            f"data.path: {error}. Run the data_prep command that made it again, on the same "
            "output: it writes manifest.json anew from the shards' records"
        ) from None
    counts = manifest.get("counts", {})
    if counts.get("accepted") == 0 and manifest.get("complete") is not False:  # all rejected
        reasons = ", ".join(f"{r} {n}" for r, n in counts.get("reject_reasons", {}).items())
        raise ConfigError(
            f"data.path: {data_path} holds no clips: data_prep rejected all "
            f"{counts.get('rejected', 0)} of its inputs{f' ({reasons})' if reasons else ''}; "
            f"{data_path}/rejects.jsonl says why for each. Replace or re-encode those videos "
            "and prepare them again (`svt-ray prep --retry REASON` retries some reasons)"
        )
    _check_shard_files(data_path, manifest, filesystem, root)
    if manifest.get("complete") is False:  # a data_prep run that ended with shards unwritten
        logger.warning(
            "%s: data_prep did not finish (%s of %s inputs processed); this uses the shards "
            "written so far. Run the same data_prep command again to complete them.",
            data_path, counts.get("processed", "?"), counts.get("inputs", "?"),
        )  # fmt: skip
    return {**manifest, "data_path": data_path}


def _check_shard_files(data_path: str, manifest: dict, filesystem, root: str) -> None:
    """Each shard manifest.json lists is there, at the size data_prep wrote (one listing of the
    shards folder: one request on a bucket). A shard cut short by a copy, or lost, failed every
    worker `train.max_failures` + 1 times (minutes of tracebacks) with Arrow's "Parquet magic
    bytes not found", naming no file."""
    import posixpath

    from pyarrow import fs as pafs

    listed = {entry["file"]: entry.get("bytes") for entry in manifest.get("shards", [])}
    base = root.rstrip("/")
    sizes: dict[str, int | None] = {}
    for folder in sorted({posixpath.dirname(file) for file in listed}):
        where = f"{base}/{folder}" if folder else base
        try:
            found = filesystem.get_file_info(pafs.FileSelector(where, allow_not_found=True))
        except OSError as error:  # a store that does not answer: its reads will say so
            logger.warning("%s: shards not checked (%s)", data_path, error)
            return
        sizes.update({info.path[len(base) + 1 :]: info.size for info in found})
    problems = [
        f"{file} is missing" if file not in sizes else
        f"{file} is {sizes[file]} bytes, manifest.json recorded {size}"
        for file, size in listed.items()
        if file not in sizes or (size is not None and sizes[file] != size)
    ]  # fmt: skip
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise ConfigError(
            f"data.path: {data_path}: {len(problems)} of its {len(listed)} shards are not as "
            f"data_prep wrote them ({shown}): cut short by a copy, lost or replaced. Run the "
            "same `svt-ray prep` command again to write them anew, or copy the dataset again "
            "from where it was made"
        )


def _near_miss(data_path: str) -> str | None:
    """What is wrong with a local --data that is not a dataset folder but is close to one: a
    path that does not exist, or one inside a dataset (its manifest.json, its shards folder or
    a shard), so the error does not send the user to prepare videos into the wrong place."""
    from pathlib import Path

    if "://" in data_path:
        return _remote_near_miss(data_path)
    given = os.path.expanduser(data_path)
    if not os.path.exists(given):
        return (
            f"{data_path} does not exist; check it for typos, or pass the folder that "
            "`svt-ray prep` wrote (the one that holds manifest.json)"
        )
    path = Path(given).resolve()  # a link to a dataset's shards/ counts as inside it
    for folder in (path.parent, path.parent.parent):  # manifest.json, shards/ or a shard
        if _is_dataset_manifest(folder / "manifest.json"):
            shown = folder if os.path.isabs(given) else os.path.relpath(folder)
            return (
                f"{data_path} is inside the dataset {shown}; pass the folder that holds "
                f"manifest.json: --data {shown}"
            )
    return None


def _remote_near_miss(data_path: str) -> str | None:
    """A --data URI that names nothing: a bucket that does not exist, or a path in one."""
    from pyarrow import fs as pafs

    from data_prep.inputs import resolve_filesystem

    filesystem, path = resolve_filesystem(data_path)
    bucket = path.split("/", 1)[0]
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            return None
        if bucket != path and filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            return (
                f"{data_path}: there is no bucket {bucket!r} (or these credentials cannot see "
                "it); check the name"
            )
    except OSError:  # a store that refuses the question: the caller's message stands
        return None
    return (
        f"{data_path} does not exist; check it for typos, or pass the folder that "
        "`svt-ray prep` wrote (the one that holds manifest.json)"
    )


def _is_dataset_manifest(path) -> bool:
    """Whether a local file is a data_prep manifest (not any manifest.json of a project)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "shards" in manifest and "schema_version" in manifest


def _holds_videos(data_path: str, look_at: int = 2000) -> bool:
    """Whether a local folder has video files among its first `look_at` entries (a user who
    passed the raw videos as --data). Buckets are not listed: that can take long."""
    import itertools
    from pathlib import Path

    from data_prep.inputs import VIDEO_EXTENSIONS

    folder = Path(data_path)
    if "://" in data_path or not folder.is_dir():
        return False
    entries = itertools.islice(folder.rglob("*"), look_at)
    return any(entry.suffix.lower() in VIDEO_EXTENSIONS for entry in entries)


def split_count(manifest: Mapping, split: str | None) -> int:
    """Clips of one split (all clips for None) according to the manifest."""
    splits = manifest["counts"]["splits"]
    return sum(splits.values()) if split is None else int(splits.get(split, 0))


def training_clips(manifest: Mapping) -> int:
    """Clips of split 'train', which pretraining reads; none is a ConfigError that names the
    splits the dataset has (split lists named `training` made a dataset of none)."""
    clips = split_count(manifest, "train")
    if clips == 0:
        raise ConfigError(
            f"data.path: {manifest.get('data_path', 'the dataset')} has no clips of split "
            f"'train', which pretraining reads (it has {dict(manifest['counts']['splits'])}). "
            "Prepare it again into a new folder with its training videos in split train "
            "(--split-file train=LIST, a train/ folder, or a manifest's split column)"
        )
    return clips


def manifest_checksum(manifest: Mapping) -> str:
    """A short fingerprint of the dataset's contents (for run records), location excluded."""
    content = {key: value for key, value in manifest.items() if key != "data_path"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _read_shards(
    data_path: str,
    split: str | None,
    shuffle_seed: int | None,
    epochs: int = 1,
    labelled: bool = False,
    first_epoch: int = 0,
):
    """The rows of one split, with only the columns decoding needs: `epochs` passes over it
    in one stream, so the decode actors stay up between epochs instead of starting again
    (18-26 s per epoch on 2 cores, 2 workers).

    A pass is a list of items, each a slice of about READ_ROWS rows of one shard, in an order
    drawn per pass from `shuffle_seed` and the pass's epoch number, counted from `first_epoch`
    (a resumed run's stream is the rest of the uninterrupted one's; shard order without a
    seed); Ray fuses the read into the
    decode actors. Slices, not files: a block goes to one actor, and `read_parquet` makes one
    block of a shard under 128 MiB, so a dataset of few shards kept one actor busy however
    many the pool had (the demo's one shard; the loader benchmark's 2 actors ran at the rate
    of one). Short items also keep each actor task short, so the first batch waits for tens
    of clips, not a whole shard (622 clips: 18 s instead of 50 s).
    """
    import ray.data

    from data_prep.shards import read_manifest

    manifest, filesystem, root = read_manifest(data_path)
    shards = [s for s in manifest["shards"] if split is None or s["splits"].get(split)]
    if not shards:
        raise ValueError(f"{data_path}: no shard holds clips of split {split!r}")
    parts = [
        {"file": f"{root}/{shard['file']}", "part": part, "parts": count}
        for shard in shards
        for count in [max(1, math.ceil(shard["num_rows"] / READ_ROWS))]
        for part in range(count)
    ]
    items = pass_items(parts, shuffle_seed, epochs, first_epoch)
    # One block per item, up to READ_BLOCKS: from_items puts every block from the driver
    # (75,000 blocks took 4 min here, 2,000 took 4 s); beyond that a block holds a run of
    # consecutive items, whose views leave the actor in 128 MiB blocks as they are cut.
    blocks = min(len(items), READ_BLOCKS)
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _read_shard_part,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"filesystem": filesystem, "split": split, "labelled": labelled},
    )


def pass_items(
    parts: list[dict], shuffle_seed: int | None, epochs: int, first_epoch: int = 0
) -> list[dict]:
    """The read items of `epochs` passes over `parts` (shard slices), numbered from
    `first_epoch`, each pass in an order drawn from the seed and its number."""
    items = []
    for epoch in range(first_epoch, first_epoch + epochs):
        order = list(range(len(parts)))
        if shuffle_seed is not None:
            np.random.default_rng([shuffle_seed, epoch]).shuffle(order)
        items += [{**parts[index], "epoch": epoch} for index in order]
    return items


def _read_shard_part(items, filesystem, split: str | None, labelled: bool = False):
    """Ray Data UDF: one item -> the rows of `split` (with a label, if `labelled`) in its slice
    of the shard's row groups (slice `part` of `parts` equal slices)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for item in items.to_pylist():
        with filesystem.open_input_file(item["file"]) as handle:
            try:
                shard = pq.ParquetFile(handle)
            except pa.ArrowInvalid as error:  # changed since the driver checked its size
                raise ValueError(
                    f"shard {item['file']}: not a readable Parquet file ({error})"
                ) from None
            _check_columns(shard.schema_arrow, item["file"])  # pyarrow would read without one
            groups = shard.metadata.num_row_groups
            first = groups * item["part"] // item["parts"]
            last = groups * (item["part"] + 1) // item["parts"]
            if first == last:
                continue
            table = shard.read_row_groups(range(first, last), columns=READ_COLUMNS)
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        if labelled:  # videos loose at the input root have none (label -1)
            table = table.filter(pc.greater_equal(table["label"], 0))
        if table.num_rows:  # the pass each row belongs to: its views are drawn per epoch
            yield table.append_column(
                "epoch", pa.array([item["epoch"]] * table.num_rows, pa.int32())
            )


def _check_columns(schema, path: str) -> None:
    """A shard without a column the pipeline reads is a ValueError that names the file and the
    columns (pyarrow's errors name neither, or it reads on without the column)."""
    missing = [name for name in READ_COLUMNS if name not in schema.names]
    if missing:
        raise ValueError(
            f"{path}: no column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; every "
            f"shard needs {', '.join(READ_COLUMNS)}. Is it a data_prep shard? Shard the videos "
            "again with `svt-ray prep` into a new folder"
        )


def _read_table(path: str, filesystem, **kwargs):
    """`pq.read_table` of one shard; a missing column names the file (`_check_columns`), not
    just the field ("No match for FieldRef.Name(label)")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, filesystem=filesystem, **kwargs)
    except pa.ArrowInvalid:
        _check_columns(pq.read_schema(path, filesystem=filesystem), path)
        raise


def _actor_pool(decode_actors: int | None):
    """Autoscale from one actor; with a cap, start all of them at once."""
    import ray.data

    return ray.data.ActorPoolStrategy(
        min_size=1, max_size=decode_actors, initial_size=decode_actors or 1
    )


# -- failure accounting ------------------------------------------------------------------------


def _stats_actor():
    import ray

    @ray.remote(num_cpus=0)
    class DecodeStats:
        def __init__(self) -> None:
            self.failed: dict[str | None, set[str]] = {}  # a clip skipped again counts once

        def add(self, key: str | None, clip_id: str) -> None:
            self.failed.setdefault(key, set()).add(clip_id)

        def summary(self, key: str | None, limit: int) -> tuple[int, list[str]]:
            """(distinct clips, the first `limit` ids in order); key None: every key's."""
            if key is None:
                total = sum(len(clips) for clips in self.failed.values())
                first = sorted(set().union(*self.failed.values()))[:limit]
                return total, first
            clips = self.failed.get(key, set())
            return len(clips), sorted(clips)[:limit]

    # Detached, so it outlives the decode actor that starts it, in a namespace of its own: one
    # per Ray cluster, not one more process left behind by every job (each job has a namespace).
    return DecodeStats.options(
        name=STATS_ACTOR, namespace=STATS_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def decode_failures(key: str | None = None, limit: int = 5) -> tuple[int, list[str]]:
    """Distinct clips skipped because they failed to decode since this Ray instance or
    cluster started (one skipped in every epoch counts once; a local Ray starts at 0 with every
    command, a resumed run's included), and the first `limit` of their ids: those of the
    pipelines built with `failure_key=key` (a run's folder: every worker-group start of the
    run, concurrent study trials apart), or without a key the sum over keys (a clip two runs
    skipped counts twice). (0, []), with a warning, when the counter cannot be asked (its node
    lost): counting never fails a run."""
    import ray

    try:
        actor = ray.get_actor(STATS_ACTOR, namespace=STATS_NAMESPACE)
    except ValueError:
        return 0, []
    try:
        total, first = ray.get(actor.summary.remote(key, limit), timeout=60)
    except Exception as error:
        logger.warning("decode failures not counted (%s)", error)
        return 0, []
    return int(total), list(first)


def clip_sources(data_path: str, clip_ids: list[str]) -> dict[str, str]:
    """{clip id: the source file data_prep made it from} for `clip_ids`, read from the
    shards' `id` and `source_path` columns; ids not found, or shards that cannot be read,
    are left out (a run's end names what it can, and never fails for it)."""
    from data_prep.shards import read_manifest

    if not clip_ids:
        return {}
    sources: dict[str, str] = {}
    try:
        manifest, filesystem, root = read_manifest(data_path)
        for shard in manifest["shards"]:
            table = _read_table(
                f"{root}/{shard['file']}", filesystem, columns=["id", "source_path"],
                filters=[("id", "in", list(clip_ids))],
            )  # fmt: skip
            sources.update(
                zip(table["id"].to_pylist(), table["source_path"].to_pylist(), strict=True)
            )
            if len(sources) == len(set(clip_ids)):
                break
    except Exception as error:
        logger.warning("%s: source files of the skipped clips not read (%s)", data_path, error)
    return sources


class _FailureCounter:
    """Counts skipped clips locally and reports them to the Ray metric and the stats actor."""

    def __init__(self, report: bool, key: str | None = None) -> None:
        self.count = 0
        self._report = report
        self._key = key
        self._metric = None
        self._actor = None
        if report:
            from ray.util.metrics import Counter

            self._metric = Counter(
                "svt_data_decode_failures", description="Clips skipped: failed to decode."
            )

    def add(self, clip_id: str, error: Exception) -> None:
        self.count += 1
        logger.warning("skipping clip %s: %s", clip_id, error)
        if self._report:
            import ray

            self._metric.inc()
            if self._actor is None:
                self._actor = _stats_actor()
            # Waited for (failures are rare): Ray Data kills this actor when its dataset ends,
            # and a call still queued here (the stats actor starting) would be lost with it.
            try:
                ray.get(self._actor.add.remote(self._key, clip_id), timeout=60)
            except Exception as counting:  # the count is bookkeeping: never fail the data
                logger.warning("skipped clip %s not counted (%s)", clip_id, counting)


# -- the UDFs (callable classes: one decoder setup per actor) -------------------------------


def _clip_hash(clip_id: str) -> int:
    return zlib.crc32(clip_id.encode())


def clip_key(clip_id: str) -> int:
    """The int64 `clip_id` column value of a data_prep id (16 hex digits, read as two's
    complement); other strings are hashed to 64 bits. `clip_id_hex` inverts it for data_prep ids."""
    try:
        value = int(clip_id, 16) if len(clip_id) == 16 else None
    except ValueError:
        value = None
    if value is None:
        value = int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


def clip_id_hex(key: int) -> str:
    """The data_prep id of a `clip_id` column value."""
    return f"{int(key) & ((1 << 64) - 1):016x}"


@dataclass(frozen=True)
class _Row:
    clip_id: str
    label: int
    video: bytes
    num_frames: int
    height: int
    width: int
    epoch: int = 0
    "The pass over the split this row belongs to (multi-epoch streams; else 0)."


def _rows(batch: Mapping[str, np.ndarray]):
    epochs = batch["epoch"] if "epoch" in batch else np.zeros(len(batch["id"]), dtype=np.int32)
    for clip_id, label, video, num_frames, height, width, epoch in zip(
        batch["id"],
        batch["label"],
        batch["video"],
        batch["num_frames"],
        batch["height"],
        batch["width"],
        epochs,
        strict=True,
    ):
        yield _Row(
            str(clip_id), int(label), bytes(video), int(num_frames), int(height), int(width),
            int(epoch),
        )  # fmt: skip


class ViewCutter:
    """Ray Data UDF: a batch of shard rows -> a batch of SVT views (uint8, fixed shape per slot).

    A clip's views are a function of (seed, clip id, epoch): every epoch sees new views, and
    the same seed gives the same views whichever actor cuts the clip, so a run repeated with
    its seed sees the same views (and the same stream when one decode actor feeds it; with
    several, the order clips arrive in may differ). `deterministic=True` drops the epoch and
    fixes the order (tests, exact resume: every epoch sees the same views).
    """

    def __init__(
        self,
        views: ViewsConfig | dict,
        seed: int = 0,
        decoder: str = "decord",
        decode_threads: int = 1,
        deterministic: bool = False,
        report_failures: bool = True,
        failure_key: str | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(1)  # one actor = one core: parallelism comes from more actors
        self.views = ViewsConfig.model_validate(views)
        self.sampler = ViewSampler(self.views)
        self.slots = view_slots(self.views)
        self.seed = seed
        self.decoder = decoder
        self.decode_threads = decode_threads
        self.deterministic = deterministic
        self.failures = _FailureCounter(report_failures, failure_key)

    def _rng(self, row: _Row) -> np.random.Generator:
        if self.deterministic:
            return np.random.default_rng([self.seed, _clip_hash(row.clip_id)])
        # The trailing 1: numpy's seed sequences ignore trailing zeros, so epoch 0 would
        # otherwise repeat the deterministic views.
        return np.random.default_rng([self.seed, _clip_hash(row.clip_id), row.epoch, 1])

    def cut_clip(self, row: _Row) -> dict[str, np.ndarray]:
        reader = open_video(row.video, backend=self.decoder, num_threads=self.decode_threads)
        try:
            plan = self.sampler.plan(reader.num_frames, row.height, row.width, self._rng(row))
            frames = reader.get_frames(plan.union)
        finally:
            reader.close()
        return self.sampler.cut(frames, plan)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {slot.name: slot.shape for slot in self.slots}
        return _cut_rows(batch, self.cut_clip, shapes, self.failures)


@dataclass(frozen=True)
class ClipSpec:
    """One evaluation clip per video: `frames` frames of `size` x `size` pixels."""

    frames: int
    size: int


def centre_crop_resized(
    frames: np.ndarray, size: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """uint8 (t, h, w, 3) -> uint8 (3, t, size, size): short side to `size` (antialiased
    `interpolation`, the training views' `views.interpolation`), then centre crop."""
    import torch
    import torch.nn.functional as F

    height, width = frames.shape[1:3]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (t, 3, h, w)
    clip = F.interpolate(clip, size=(new_height, new_width), mode=interpolation, antialias=True)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    clip = clip[:, :, top : top + size, left : left + size]
    return clip.permute(1, 0, 2, 3).contiguous().numpy()  # (3, t, size, size)


class EvalClipCutter:
    """Ray Data UDF: shard rows -> fixed evaluation clips (deterministic, centred)."""

    def __init__(
        self,
        clips: dict[str, tuple[int, int]],
        window_frames: int | None = None,
        decoder: str = "decord",
        decode_threads: int = 1,
        report_failures: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        import torch

        torch.set_num_threads(1)
        self.clips = {name: ClipSpec(*spec) for name, spec in clips.items()}
        self.window_frames = window_frames
        self.interpolation = interpolation
        self.decoder = decoder
        self.decode_threads = decode_threads
        self.failures = _FailureCounter(report_failures)

    def frame_indices(self, num_frames: int) -> dict[str, np.ndarray]:
        """Per clip spec, frames spread evenly over the centred window of the video."""
        window = min(self.window_frames or num_frames, num_frames)
        start = (num_frames - window) // 2
        return {
            name: spread_indices(start, start + window - 1, spec.frames, num_frames)
            for name, spec in self.clips.items()
        }

    def cut_clip(self, row: _Row) -> dict[str, np.ndarray]:
        reader = open_video(row.video, backend=self.decoder, num_threads=self.decode_threads)
        try:
            indices = self.frame_indices(reader.num_frames)
            union = np.unique(np.concatenate(list(indices.values())))
            frames = reader.get_frames(union)
        finally:
            reader.close()
        return {
            name: centre_crop_resized(
                frames[np.searchsorted(union, picked)], self.clips[name].size, self.interpolation
            )
            for name, picked in indices.items()
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {name: (3, spec.frames, spec.size, spec.size) for name, spec in self.clips.items()}
        return _cut_rows(batch, self.cut_clip, shapes, self.failures)


def _cut_rows(
    batch, cut_clip, shapes: dict[str, tuple[int, ...]], failures
) -> dict[str, np.ndarray]:
    """Run `cut_clip` on every row; a row that fails to decode is skipped and counted.

    Returns one uint8 column per name in `shapes` (fixed shape), plus `label` and `clip_id`.
    """
    columns: dict[str, list[np.ndarray]] = {name: [] for name in shapes}
    labels, clip_ids = [], []
    for row in _rows(batch):
        try:
            cut = cut_clip(row)
        except (VideoDecodeError, ValueError, IndexError, RuntimeError) as error:
            failures.add(row.clip_id, error)
            continue
        for name, array in cut.items():
            columns[name].append(array)
        labels.append(row.label)
        clip_ids.append(row.clip_id)
    out = {name: _stack(columns[name], shape) for name, shape in shapes.items()}
    out["label"] = np.asarray(labels, dtype=np.int64)
    out["clip_id"] = np.asarray([clip_key(clip_id) for clip_id in clip_ids], dtype=np.int64)
    return out


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    if not arrays:
        return np.empty((0, *shape), dtype=np.uint8)
    return np.stack(arrays)


# -- dataset builders ----------------------------------------------------------------------


def build_view_dataset(
    data_path: str,
    views: ViewsConfig,
    seed: int = 0,
    *,
    split: str | None = "train",
    decoder: str = "decord",
    decode_threads: int = 1,
    decode_cpus: float = 1.0,
    decode_actors: int | None = None,
    batch_size: int = 4,
    shuffle: bool = True,
    deterministic: bool = False,
    epochs: int = 1,
    failure_key: str | None = None,
    first_epoch: int = 0,
):
    """The SVT pretraining stream: one row per clip, one uint8 column per view slot.

    `epochs` passes over the split in one stream (see `_read_shards`), numbered from
    `first_epoch`: each pass's order and views are drawn from the seed and its number, so
    the stream from epoch e on is the same whether it starts there or at 0. With 1 pass,
    every execution is one epoch.

    `decode_actors` caps the actor pool (None: as many as free CPUs allow); on a node shared
    with Train workers keep CPUs free for Data (ray_notes.md §6.3). `batch_size` is the number
    of clips per UDF call: small, because decoded views are ~10x the encoded bytes. Clips that
    fail to decode are skipped and counted under `failure_key` (`decode_failures`).
    """
    dataset = _read_shards(
        data_path, split, seed if shuffle else None, epochs, first_epoch=first_epoch
    )
    return dataset.map_batches(
        ViewCutter,
        fn_constructor_kwargs={
            "views": views.model_dump(),
            "seed": seed,
            "decoder": decoder,
            "decode_threads": decode_threads,
            "deterministic": deterministic,
            "failure_key": failure_key,
        },
        batch_size=batch_size,
        compute=_actor_pool(decode_actors),
        num_cpus=decode_cpus,
    )


def build_eval_dataset(
    data_path: str,
    clips: Mapping[str, tuple[int, int]] | None = None,
    *,
    split: str | None = "val",
    window_frames: int | None = None,
    decoder: str = "decord",
    decode_threads: int = 1,
    decode_cpus: float = 1.0,
    decode_actors: int | None = None,
    batch_size: int = 4,
    interpolation: str = "bilinear",
):
    """Labelled evaluation clips, deterministic: for each name, (frames, size) clips.

    Defaults to one clip `{"clip": (8, 224)}`; slow-fast evaluation passes
    `slow_fast_clips()`. Frames are spread over the centred `window_frames` of each video
    (whole video if None), short side resized to the clip size (with `interpolation`: pass
    the training's `views.interpolation`), centre-cropped.
    """
    clips = dict(clips or {"clip": (8, 224)})
    dataset = _read_shards(data_path, split, shuffle_seed=None, labelled=True)
    return dataset.map_batches(
        EvalClipCutter,
        fn_constructor_kwargs={
            "clips": clips,
            "window_frames": window_frames,
            "decoder": decoder,
            "decode_threads": decode_threads,
            "interpolation": interpolation,
        },
        batch_size=batch_size,
        compute=_actor_pool(decode_actors),
        num_cpus=decode_cpus,
    )


def load_eval_clips(
    data_path: str,
    split: str,
    clips: Mapping[str, tuple[int, int]],
    max_clips: int,
    *,
    window_frames: int | None = None,
    decoder: str = "decord",
    interpolation: str = "bilinear",
) -> dict[str, np.ndarray]:
    """A fixed labelled subset of one split, decoded in this process (no Ray Data).

    The subset is the `max_clips` clips with the smallest id hash (`eval_subset`): the same
    clips every time, spread over classes like the split. Returns `build_eval_dataset`'s
    columns for those clips, in `clip_id` order. `cache_eval_clips` decodes the same clips on
    Ray Data, once, into storage.
    """
    filesystem, parts = eval_subset(data_path, split, max_clips)
    cutter = EvalClipCutter(
        clips, window_frames, decoder, report_failures=False, interpolation=interpolation
    )
    batches = [cutter(_read_clips(path, ids, filesystem)) for path, ids in parts]
    if not batches:
        raise ValueError(f"{data_path}: split {split!r} has no labelled clip")
    return _in_key_order({key: np.concatenate([b[key] for b in batches]) for key in batches[0]})


def eval_subset(
    data_path: str, split: str, max_clips: int, part_clips: int | None = None
) -> tuple[object, list[tuple[str, list[str]]]]:
    """The `max_clips` labelled clips of `split` with the smallest id hash, as (shard file,
    ids) parts, each of one file and of at most `part_clips` clips (one per file if None),
    and the shards' filesystem. Reads the id, label and split columns only."""
    import pyarrow.compute as pc

    from data_prep.shards import read_manifest

    manifest, filesystem, root = read_manifest(data_path)
    files = [f"{root}/{s['file']}" for s in manifest["shards"] if s["splits"].get(split)]
    if not files:
        raise ValueError(f"{data_path}: no shard holds clips of split {split!r}")
    index = []  # (hash, file, id) of every labelled clip of the split
    for path in files:
        table = _read_table(path, filesystem, columns=["id", "label", "split"])
        labelled = pc.and_(pc.equal(table["split"], split), pc.greater_equal(table["label"], 0))
        table = table.filter(labelled)
        index += [(_clip_hash(i), path, i) for i in table["id"].to_pylist()]
    by_file: dict[str, list[str]] = {}
    for _, path, clip_id in sorted(index)[:max_clips]:
        by_file.setdefault(path, []).append(clip_id)
    parts = []
    for path, ids in sorted(by_file.items()):
        step = part_clips or len(ids)
        parts += [(path, ids[i : i + step]) for i in range(0, len(ids), step)]
    return filesystem, parts


def _read_clips(path: str, ids: list[str], filesystem) -> dict:
    """The decoding columns of the rows `ids` of one shard."""
    return _read_table(
        path, filesystem, columns=READ_COLUMNS, filters=[("id", "in", ids)]
    ).to_pydict()


def _in_key_order(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(columns["clip_id"], kind="stable")
    return {key: value[order] for key, value in columns.items()}


# -- evaluation clips decoded once, kept in storage --------------------------------------------

EVAL_CACHE_VERSION = 1
EVAL_CACHE_RECORD = "clips.json"  # written last: a folder without it is an unfinished decode
EVAL_PART_CLIPS = 16  # clips per decode task and part file (about 19 MB at 8 x 224)
EVAL_IN_PROCESS_S = 10.0  # decode in the caller's process if it would take no longer than this


def eval_cache_key(manifest: Mapping, settings: Mapping) -> str:
    """The name of a cache folder: the dataset's contents and every setting that changes the
    clips (`eval_cache_settings`)."""
    content = {"dataset": manifest_checksum(manifest), "version": EVAL_CACHE_VERSION, **settings}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def eval_cache_settings(
    split: str,
    clips: Mapping[str, tuple[int, int]],
    max_clips: int,
    *,
    window_frames: int | None = None,
    decoder: str = "decord",
    interpolation: str = "bilinear",
) -> dict:
    """The settings of a set of evaluation clips, as `cache_eval_clips` takes and records them
    (`load_eval_clips`' arguments)."""
    return {
        "split": split,
        "clips": {name: [int(value) for value in spec] for name, spec in clips.items()},
        "max_clips": max_clips,
        "window_frames": window_frames,
        "decoder": decoder,
        "interpolation": interpolation,
    }


def cache_eval_clips(
    data_path: str, sets: Mapping[str, Mapping], *, decode_cpus: float = 1.0
) -> dict[str, dict]:
    """Decode sets of `load_eval_clips`' clips (folder -> `eval_cache_settings`), each into
    its folder (a path or a filesystem URI), unless it holds them already; returns each
    folder's record.

    The work comes in parts of EVAL_PART_CLIPS clips of one shard, each written as a Parquet
    file atomically; a folder's record (EVAL_CACHE_RECORD), which names its parts, comes last.
    The first parts are decoded here; once the rest would take more than EVAL_IN_PROCESS_S
    at their pace, it goes to Ray Data, one task per part, all sets in one job (a job takes
    seconds to start: the embedded default's few hundred small clips take 2 s here, 7 s on
    Ray Data on 2 cores; thousands of Kinetics clips take minutes one after another). A decode
    cut short is resumed: the parts it wrote are kept. `read_eval_clips` reads a folder back.
    A folder is for one set of settings: name it with `eval_cache_key`.
    """
    import ray.data

    from data_prep.inputs import resolve_filesystem
    from data_prep.shards import Output

    records, items = {}, []
    for folder, settings in sets.items():
        record = read_eval_clips_record(folder)
        if record is not None:
            if {key: record.get(key) for key in settings} != dict(settings):
                raise ValueError(
                    f"{folder} holds evaluation clips of other settings ({record}); name the "
                    "folder with eval_cache_key"
                )
            records[folder] = record
            continue
        split = settings["split"]
        _, parts = eval_subset(data_path, split, settings["max_clips"], EVAL_PART_CLIPS)
        if not parts:
            raise ValueError(f"{data_path}: split {split!r} has no labelled clip")
        stamp = json.dumps(dict(settings), sort_keys=True)
        items += [
            {
                "folder": folder,
                "settings": stamp,
                "name": f"part-{i:05d}.parquet",
                "file": path,
                "ids": ids,
            }
            for i, (path, ids) in enumerate(parts)
        ]
    written = []  # the first parts here, while they look quick: Ray Data starts in seconds
    started = time.perf_counter()
    while items:
        item = items.pop(0)
        written.append({**item, **_write_eval_part(**item)})
        seconds_per_part = (time.perf_counter() - started) / len(written)
        if seconds_per_part * len(items) > EVAL_IN_PROCESS_S:
            break
    if items:
        logger.info(
            "decoding the other %d parts of %d clips on Ray Data", len(items), EVAL_PART_CLIPS
        )
        written += (
            ray.data.from_items(items, override_num_blocks=min(len(items), READ_BLOCKS))
            .map_batches(_decode_eval_parts, batch_size=1, num_cpus=decode_cpus)
            .take_all()
        )
    for folder, settings in sets.items():
        if folder in records:
            continue
        done = sorted((p for p in written if p["folder"] == folder), key=lambda p: p["name"])
        records[folder] = record = {
            "version": EVAL_CACHE_VERSION,
            "data_path": data_path,
            **settings,
            "shapes": {name: [3, t, size, size] for name, (t, size) in settings["clips"].items()},
            "parts": [str(part["name"]) for part in done],
            "num_clips": int(sum(part["clips"] for part in done)),
            "failed": int(sum(part["failed"] for part in done)),
        }
        filesystem, root = resolve_filesystem(folder)
        Output(filesystem, root).write_json(record, EVAL_CACHE_RECORD)
    return records


def _decode_eval_parts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data UDF: `_write_eval_part` of each row; returns their folders, names, clips, and
    clips that failed to decode."""
    out: dict[str, list] = {"folder": [], "name": [], "clips": [], "failed": []}
    columns = [batch[key] for key in ("folder", "settings", "name", "file", "ids")]
    for folder, settings, name, path, ids in zip(*columns, strict=True):
        counts = _write_eval_part(str(folder), str(settings), str(name), str(path), list(ids))
        for key, value in {"folder": str(folder), "name": str(name), **counts}.items():
            out[key].append(value)
    return {key: np.asarray(values) for key, values in out.items()}


def _write_eval_part(folder: str, settings: str, name: str, file: str, ids: list) -> dict:
    """Decode the clips `ids` of the shard `file` with `settings` (JSON) into the Parquet part
    `name` of `folder`, unless a decode of the same settings cut short wrote it; returns its
    clips, and the clips that failed to decode."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.inputs import resolve_filesystem
    from data_prep.shards import Output

    filesystem, root = resolve_filesystem(folder)
    output = Output(filesystem, root)
    if output.exists(name):
        written = pq.read_metadata(output.path(name), filesystem=filesystem)
        if (written.metadata or {}).get(b"svt_settings") == settings.encode():
            return {"clips": written.num_rows, "failed": int(written.metadata[b"svt_failed"])}
    spec = json.loads(settings)
    clips = {column: tuple(value) for column, value in spec["clips"].items()}
    cutter = EvalClipCutter(
        clips,
        spec["window_frames"],
        spec["decoder"],
        report_failures=False,
        interpolation=spec["interpolation"],
    )
    shards, _ = resolve_filesystem(file)
    ids = [str(clip_id) for clip_id in ids]
    cut = cutter(_read_clips(file, ids, shards))
    count, failed = len(cut["label"]), len(ids) - len(cut["label"])
    columns = {"clip_id": pa.array(cut["clip_id"]), "label": pa.array(cut["label"])}
    for column in clips:
        width = int(np.prod(cut[column].shape[1:]))
        columns[column] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), count, [None, pa.py_buffer(cut[column].tobytes())]
        )
    table = pa.table(columns).replace_schema_metadata(
        {"svt_failed": str(failed), "svt_settings": settings}
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    output.write_bytes(sink.getvalue(), name)
    return {"clips": count, "failed": failed}


def read_eval_clips(folder: str) -> dict[str, np.ndarray] | None:
    """The clips `cache_eval_clips` wrote into `folder`, as `load_eval_clips` returns them;
    None when it has no finished record (or a part it names is gone: with a warning)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.inputs import resolve_filesystem
    from data_prep.shards import Output

    record = read_eval_clips_record(folder)
    if record is None:
        return None
    filesystem, root = resolve_filesystem(folder)
    output = Output(filesystem, root)
    paths = [output.path(name) for name in record["parts"]]
    try:
        index = pa.concat_tables(
            [
                pq.read_table(path, columns=["clip_id", "label"], filesystem=filesystem)
                for path in paths
            ]
        )
        keys = index["clip_id"].to_numpy()
        order = np.argsort(keys, kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        columns = {"clip_id": keys[order], "label": index["label"].to_numpy()[order]}
        # Filled part by part, in clip_id order: a bank of 8 x 224 clips takes GBs, held once
        for name, shape in record["shapes"].items():
            columns[name] = np.empty((len(keys), *shape), dtype=np.uint8)
        row = 0
        for path in paths:
            part = pq.read_table(path, columns=list(record["shapes"]), filesystem=filesystem)
            for name, shape in record["shapes"].items():
                rows = position[row : row + part.num_rows]
                for chunk in part[name].chunks:
                    values = _fixed_binary_bytes(chunk).reshape(-1, *shape)
                    columns[name][rows[: len(chunk)]] = values
                    rows = rows[len(chunk) :]
            row += part.num_rows
    except (OSError, pa.ArrowInvalid) as error:
        logger.warning("%s: cannot read the decoded clips (%s); decoding them again", folder, error)
        return None
    return columns


def read_eval_clips_record(folder: str) -> dict | None:
    """The record of a finished `cache_eval_clips` in `folder`, None if there is none (or one
    of another cache version)."""
    from data_prep.inputs import resolve_filesystem
    from data_prep.shards import Output

    filesystem, root = resolve_filesystem(folder)
    output = Output(filesystem, root)
    if not output.exists(EVAL_CACHE_RECORD):
        return None
    record = output.read_json(EVAL_CACHE_RECORD)
    return record if record.get("version") == EVAL_CACHE_VERSION else None


def _fixed_binary_bytes(chunk) -> np.ndarray:
    """The values of a fixed-size binary array as one uint8 array, without a copy per row."""
    width = chunk.type.byte_width
    data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
    return data[chunk.offset * width : (chunk.offset + len(chunk)) * width]


def slow_fast_clips(slow: tuple[int, int] = (8, 224), fast: tuple[int, int] = (64, 96)):
    """The paper's slow-fast evaluation inputs (svt_spec §5): 8 x 224 and 64 x 96."""
    return {"slow": slow, "fast": fast}


def training_dataset(
    config: ExperimentConfig, start_epoch: int = 0, failure_key: str | None = None
):
    """The pretraining stream of an experiment config (what `train.py` hands to Ray Train):
    every epoch from `start_epoch` to the end of the run, in one stream; clips that fail to
    decode are counted under `failure_key` (the run's folder).

    With `data.deterministic` every execution is one epoch instead: a pass then holds exactly
    the steps of one epoch (the remainder of the split is dropped at its end), which is what
    lets a run resumed mid-run see exactly the batches of an uninterrupted one (without it:
    the same clips, to within a batch, `train.resume_position`).
    """
    if config.data.path is None:
        raise ValueError("data.path: no dataset given")
    derived = config.derived
    epochs = 1
    if not config.data.deterministic:
        epochs = max(1, math.ceil(derived.total_steps / derived.steps_per_epoch) - start_epoch)
    return build_view_dataset(
        config.data.path,
        config.views,
        # A resumed run's stream is the rest of the uninterrupted run's, from the epoch of its
        # checkpoint (orders and views drawn per epoch number), so the batches its workers
        # skip are the ones trained on; with data.deterministic every pass is the same epoch.
        seed=config.train.seed * 10_007,
        split="train",
        decoder=config.data.decoder,
        decode_threads=config.data.decode_threads,
        decode_cpus=config.data.decode_cpus,
        decode_actors=config.data.decode_actors,
        shuffle=not config.data.deterministic,
        deterministic=config.data.deterministic,
        epochs=epochs,
        failure_key=failure_key,
        first_epoch=0 if config.data.deterministic else start_epoch,
    )


def run_batch_inference(
    dataset,
    udf,
    constructor_kwargs: Mapping,
    *,
    batch_size: int = 16,
    actors: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
) -> dict[str, np.ndarray]:
    """Ray Data batch inference: `udf` (a callable class holding a model) over `dataset` on an
    actor pool, collected into one array per output column."""
    import ray.data

    outputs = dataset.map_batches(
        udf,
        fn_constructor_kwargs=dict(constructor_kwargs),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    batches = [batch for batch in outputs.iter_batches(batch_size=None) if len(batch["label"])]
    if not batches:
        raise ValueError(
            "batch inference produced no rows: the split is empty or every clip failed"
        )
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def progress_bars_wanted(stream=None) -> bool | None:
    """[driver] Whether Ray Data should draw its progress bars: only if `stream` (stderr) is a
    terminal. Written to a file or to `ray job logs`, every redraw of a bar is a new line (79
    of the 107 lines of a 24-second 2-worker run), burying the training's progress lines.
    None: the user set RAY_DATA_DISABLE_PROGRESS_BARS, and Ray Data follows it."""
    if "RAY_DATA_DISABLE_PROGRESS_BARS" in os.environ:
        return None
    return (sys.stderr if stream is None else stream).isatty()


def set_progress_bars(wanted: bool | None) -> None:
    """Apply `progress_bars_wanted()` to this process's Ray Data context (None: leave it)."""
    import ray.data

    if wanted is not None:
        ray.data.DataContext.get_current().enable_progress_bars = wanted
    if wanted is False:  # Ray Data would then warn, once, how to turn them back on: we chose
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # its key for that warning


def set_preserve_order(wanted: bool) -> None:
    """Keep the stream in the order of its seeded shuffles, whichever decode actor finishes
    first (`data.preserve_order`: reproducible runs), or not. Call before building the
    trainer: Ray Train hands the driver's DataContext to the executors that feed its workers."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = wanted
