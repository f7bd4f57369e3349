"""The dataset directory: shard schema, atomic writes, the shard plan and the manifest.

```
<output>/
  shards/part-00000.parquet ...   one row per accepted video (schema SHARD_SCHEMA)
  manifest.json                   schema version, counts, label map, durations, options, shards
  rejects.jsonl                   one line per rejected input: id, path, reason, detail
  _state/plan.json                which input ids go into which shard (fixed at the first run)
  _state/part-00000.json          written after its shard: done iff this exists and the shard
                                  has the size it records
```

Every file is written to a hidden temporary name and renamed into place (synced first on a
local disk), so a reader, a run killed with -9 or a power cut never sees a partial file. The
plan is fixed at the first run, and rows are sorted by id, so an interrupted and resumed run
produces the same rows, ids and columns as an uninterrupted one (a clip encoded again may
differ in its `video` bytes: libx264 now and then does, docs/data.md). New inputs found by a
later run go into new shards appended to the plan.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SHARD_DIR = "shards"
STATE_DIR = "_state"
# A .tmp-* file not written for this long is taken for a killed run's: a live run writes a
# shard in seconds to minutes (S3 lists an upload once complete, timed from its start).
TEMPORARY_AGE_S = 3600.0

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),  # -1: unlabelled
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("source_path", pa.string()),
        ("video", pa.large_binary()),  # H.264 mp4; large_binary avoids 2 GB offset overflow
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("duration_s", pa.float32()),
        ("codec", pa.string()),
        ("checksum", pa.string()),  # sha256 of `video`
        ("source_checksum", pa.string()),  # sha256 of the source file
        ("source_num_frames", pa.int32()),
        ("source_fps", pa.float32()),
        ("source_height", pa.int32()),
        ("source_width", pa.int32()),
        ("source_bytes", pa.int64()),
    ]
)
ROW_GROUP_SIZE = 32  # small row groups let a Ray read task split a 256 MB shard


def write_file(target: str, data: bytes | Path) -> None:
    """Write `data` (bytes, or a local file's contents) to `target`, a local path or any
    filesystem URI, atomically (see `Output.write_bytes`): readers see the old file or the new
    one, never a partial one."""
    from data_prep.inputs import resolve_filesystem

    filesystem, path = resolve_filesystem(target)
    folder, name = path.rsplit("/", 1)
    output = Output(filesystem, folder)
    output.write_bytes(data, name)
    # A write killed with no chance to clean up (kill -9, a lost node) left its temporary
    # file: a file written again and again (`svt-ray tracking backup --every`) would gather a
    # whole copy per kill. This file's own stale ones go, as data_prep's resume does its own;
    # best effort: the write itself succeeded.
    try:
        output.remove_temporaries(folders=("",), name=name)
    except OSError as error:
        logger.warning("%s is written; its stale temporary files stay: %s", target, error)


def _is_temporary(base_name: str, name: str | None = None) -> bool:
    """Whether a file is a temporary of `Output.write_bytes` (`.tmp-<12 hex>-<name>`), of the
    file `name` if given."""
    if not base_name.startswith(".tmp-"):
        return False
    if name is None:
        return True
    token, dash, rest = base_name[len(".tmp-") :].partition("-")
    hex_token = len(token) == 12 and all(c in "0123456789abcdef" for c in token)
    return bool(dash) and hex_token and rest == name


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def parse_record(raw: bytes, name: str):
    """A JSON record. Records are written atomically, so one that does not parse was cut short
    by a copy or edited by hand: a ValueError that names it (`name`)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: not valid JSON ({error}); it was cut short or edited") from None


def _sync(path: str) -> None:
    """fsync a local file or folder (a folder: its entries, so a rename outlives a power cut)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class Output:
    """A dataset directory on any pyarrow filesystem."""

    filesystem: pafs.FileSystem
    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.filesystem.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def write_bytes(self, data: bytes | Path, *parts: str) -> None:
        """Atomic write: a hidden temporary file in the same folder, then a rename; a write
        or rename that fails removes the temporary file. A local file (a Path) is streamed in
        8 MiB pieces, never held in memory whole. On a local disk the file is synced before the
        rename and the folder after it: else a power cut could leave a renamed, empty file (an
        object store lists an upload only once it is whole)."""
        final = self.path(*parts)
        folder, name = final.rsplit("/", 1)
        self.filesystem.create_dir(folder, recursive=True)
        temporary = f"{folder}/.tmp-{uuid.uuid4().hex[:12]}-{name}"
        local = isinstance(self.filesystem, pafs.LocalFileSystem)
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                if isinstance(data, Path):
                    with open(data, "rb") as source:
                        while piece := source.read(8 << 20):
                            stream.write(piece)
                else:
                    stream.write(data)
            if local:
                _sync(temporary)
            self.filesystem.move(temporary, final)
            if local:  # the file is whole; a filesystem that cannot sync a folder fails nothing
                with contextlib.suppress(OSError):
                    _sync(folder)
        except BaseException:
            # A loop that writes again (`svt-ray tracking backup --every`) would otherwise
            # leave a whole copy behind on every failed round.
            with contextlib.suppress(OSError):  # not written yet, or the store unreachable
                self.filesystem.delete_file(temporary)
            raise

    def read_json(self, *parts: str):
        """A JSON file of the output (`parse_record`)."""
        with self.filesystem.open_input_stream(self.path(*parts)) as stream:
            return parse_record(stream.read(), self.path(*parts))

    def write_json(self, value, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=1, sort_keys=True).encode(), *parts)

    def remove_temporaries(
        self,
        older_than_s: float = TEMPORARY_AGE_S,
        folders: tuple[str, ...] = (SHARD_DIR, STATE_DIR, ""),
        name: str | None = None,
    ) -> tuple[int, int]:
        """Delete leftovers of killed runs (.tmp-* files of `write_bytes`) in `folders` of the
        output ("" its root), those of the file `name` only if given, last written more than
        `older_than_s` ago; return (removed, kept). Younger ones may be another run's, writing
        into the same output now: deleting them failed its writes. A store that gives no time
        (mtime None) gets them all deleted."""
        removed = kept = 0
        now = datetime.datetime.now(datetime.timezone.utc)
        for folder in folders:
            path = self.path(folder) if folder else self.root
            if self.filesystem.get_file_info(path).type != pafs.FileType.Directory:
                continue
            for info in self.filesystem.get_file_info(pafs.FileSelector(path)):
                if info.type != pafs.FileType.File or not _is_temporary(info.base_name, name):
                    continue
                written = info.mtime
                if written is not None:
                    if written.tzinfo is None:  # a store's naive time: taken as UTC
                        written = written.replace(tzinfo=datetime.timezone.utc)
                    if (now - written).total_seconds() < older_than_s:
                        kept += 1
                        continue
                with contextlib.suppress(FileNotFoundError):  # its run just moved it
                    self.filesystem.delete_file(info.path)
                    removed += 1
        return removed, kept


def write_shard(output: Output, name: str, rows: list[dict]) -> int:
    """Write rows (sorted by id) as shards/<name>.parquet atomically; return bytes written."""
    rows = sorted(rows, key=lambda row: row["id"])
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_SIZE,
        # The video column is already compressed; the rest is small.
        compression={
            column: ("NONE" if column == "video" else "ZSTD") for column in table.column_names
        },
        use_dictionary=["label_name", "split", "codec"],
        write_statistics=["id", "label", "split", "num_frames"],
    )
    data = sink.getvalue().to_pybytes()
    output.write_bytes(data, SHARD_DIR, f"{name}.parquet")
    return len(data)


def shard_state(name: str, ids: list[str], rows: list[dict], rejects: list[dict], size: int):
    """Summary of a finished shard, the unit of resumption and of the manifest's counts."""
    return {
        "name": name,
        "ids": ids,
        "file": f"{SHARD_DIR}/{name}.parquet" if rows else None,
        "num_rows": len(rows),
        "bytes": size,
        "duration_s": sum(row["duration_s"] for row in rows),
        "num_frames": sum(row["num_frames"] for row in rows),
        "splits": dict(Counter(row["split"] for row in rows)),
        "labels": dict(Counter(str(row["label"]) for row in rows)),
        "rejects": sorted(rejects, key=lambda reject: reject["id"]),
    }


def load_states(output: Output, names: list[str]) -> dict[str, dict]:
    """States of the planned shards that are completely written: a shard file missing, or not
    of the size its state records (cut short by a copy), is written again, so that re-running
    the command repairs what training refuses (`svt_ray.data._check_shard_files`)."""
    states = {}
    for name in names:
        if not output.exists(STATE_DIR, f"{name}.json"):
            continue
        try:
            state = output.read_json(STATE_DIR, f"{name}.json")
        except ValueError as error:  # what the shard holds is unknown: written again
            logger.warning("%s; redoing shard %s", error, name)
            continue
        if state["file"]:
            found = output.filesystem.get_file_info(output.path(state["file"]))
            if found.type != pafs.FileType.File:
                logger.warning(
                    "%s is recorded as done but %s is missing; redoing it", name, state["file"]
                )
                continue
            written = state.get("bytes")  # a state without it: only the file's presence
            if written is not None and found.size != written:
                logger.warning(
                    "%s is recorded as done but %s is %d bytes, not the %d written; redoing it",
                    name, state["file"], found.size, written,
                )  # fmt: skip
                continue
        states[name] = state
    return states


def write_manifest(output: Output, plan: dict, states: dict[str, dict]) -> dict:
    """Consolidate finished shards into manifest.json and rejects.jsonl (both atomic)."""
    done = [states[entry["name"]] for entry in plan["shards"] if entry["name"] in states]
    rejects = [reject for state in done for reject in state["rejects"]]
    splits: Counter = Counter()
    labels: Counter = Counter()
    for state in done:
        splits.update(state["splits"])
        labels.update(state["labels"])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "complete": len(done) == len(plan["shards"]),
        "counts": {
            "inputs": sum(len(entry["ids"]) for entry in plan["shards"]),
            "processed": sum(len(state["ids"]) for state in done),
            "accepted": sum(state["num_rows"] for state in done),
            "rejected": len(rejects),
            "splits": dict(sorted(splits.items())),
            "labels": dict(sorted(labels.items(), key=lambda item: int(item[0]))),
            "reject_reasons": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        },
        "label_map": plan["label_map"],
        "total_duration_s": round(sum(state["duration_s"] for state in done), 3),
        "total_frames": sum(state["num_frames"] for state in done),
        "total_bytes": sum(state["bytes"] for state in done),
        "options": plan["options"],
        "source": plan["source"],
        "shards": [
            {
                "file": state["file"],
                "num_rows": state["num_rows"],
                "bytes": state["bytes"],
                "splits": state["splits"],
            }
            for state in done
            if state["file"]
        ],
    }
    output.write_bytes(
        "".join(json.dumps(reject, sort_keys=True) + "\n" for reject in rejects).encode(),
        "rejects.jsonl",
    )
    output.write_json(manifest, "manifest.json")
    return manifest


class ManifestVersionError(ValueError):
    """A manifest.json written by a data_prep of another schema version."""


def read_manifest(data_path: str) -> tuple[dict, pafs.FileSystem, str]:
    """The manifest of a prepared dataset and the filesystem/root it lives on."""
    from data_prep.inputs import resolve_filesystem

    filesystem, root = resolve_filesystem(data_path)
    output = Output(filesystem, root)
    if not output.exists("manifest.json"):
        raise FileNotFoundError(
            f"{data_path}: no manifest.json, so not a dataset made by data_prep"
        )
    manifest = output.read_json("manifest.json")
    if not isinstance(manifest, dict):  # valid JSON, but not what data_prep writes
        raise ValueError(
            f"{output.path('manifest.json')} holds a {type(manifest).__name__}, not a data_prep "
            "manifest; it was replaced or edited"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestVersionError(
            f"{data_path}/manifest.json: schema_version "
            f"{manifest.get('schema_version')} != {SCHEMA_VERSION}"
        )
    return manifest, filesystem, root
