"""Which videos to prepare: discovery, labels, stable ids and train/val splits.

Inputs come from a folder (recursive; the first folder level under the root is the class, or,
Kinetics style, `train/`, `val/`, `test/` first and the class below) or from a CSV / JSONL
manifest with `path`, `label` and an optional `split`. Every input gets an id that is a hash of
its path relative to the input root, so ids, shard plans and splits are the same on every run
and on every machine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import subprocess
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pyarrow import fs as pafs

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".avi",
    ".mkv",
    ".webm",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
    ".3gp",
    ".ts",
    ".ogv",
)
# What svt-ray reads by default: pretraining 'train', evaluation 'train' (kNN bank, probe
# training) and 'val'. Other split names are kept, and said.
READ_SPLITS = ("train", "val")
SPLITS_READ = (
    "pretraining reads 'train', evaluation 'train' and 'val' (name others with --set "
    "eval.train_split=... / eval.test_split=...)"
)
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class InputError(ValueError):
    """The input collection cannot be read at all (as opposed to one bad video)."""


@dataclass(frozen=True)
class InputVideo:
    id: str
    path: str
    """Path inside `filesystem` (absolute for local files)."""
    relative_path: str
    """Path relative to the input root, with '/' separators: the basis of the id."""
    label_name: str | None
    split: str | None
    """Split given by the input itself (manifest column, split folder or split file)."""
    size: int
    """Source bytes, -1 when unknown (an unreadable entry)."""


STORE_TIMEOUT_ENV = "SVT_RAY_STORE_TIMEOUT_S"
_answered_stores: set[tuple[str, str, str]] = set()  # (scheme, bucket, query) that answered


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or any filesystem URI.

    The first use of a remote store in a process waits for its answer at most
    SVT_RAY_STORE_TIMEOUT_S seconds (60): without network or credentials pyarrow's GCS client
    retries for many minutes without a word, its S3 client waits ~100 s on an endpoint that
    does not answer, and the command would seem to hang.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    store = (parts.scheme, parts.netloc, parts.query)
    if parts.scheme != "file" and store not in _answered_stores:
        filesystem, path = _first_contact(uri)
        _answered_stores.add(store)
        return filesystem, path
    return _open(uri)


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"cannot open filesystem for {uri!r}: {error}") from error
    return filesystem, path.rstrip("/")


# A bucket's root is asked about an object under it: its own metadata needs a permission
# (GCS storage.buckets.get) that object roles lack, and svt-ray never uses it otherwise.
_STORE_CHECK = """
import sys
from pyarrow import fs
try:
    filesystem, path = fs.FileSystem.from_uri(sys.argv[1])
    path = path.rstrip("/")
    filesystem.get_file_info(path if "/" in path else path + "/.svt_ray_store_check")
except Exception as error:
    sys.exit(str(error))
"""


def _first_contact(uri: str) -> tuple[pafs.FileSystem, str]:
    """`_open(uri)` after one request to the store, made by a child process given a deadline:
    a request left waiting in this process would hold its exit as long (pyarrow finalises S3
    at exit). The store's error (a wrong endpoint, no bucket access) is an InputError with a
    hint; a path that does not exist is not an error here."""
    try:
        seconds = float(os.environ.get(STORE_TIMEOUT_ENV) or 60)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # 0 would time out at once, not mean "no limit"
        raise InputError(
            f"{STORE_TIMEOUT_ENV}={os.environ[STORE_TIMEOUT_ENV]!r}: give a number of seconds "
            "above 0"
        ) from None
    try:
        answer = subprocess.run(
            [sys.executable, "-c", _STORE_CHECK, uri],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=seconds,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        where = urlsplit(uri)
        raise InputError(
            f"{uri}: {where.scheme}://{where.netloc} did not answer in {seconds:g} s (pyarrow "
            "retries while the network or the credentials are missing); check that this "
            "machine reaches it and has credentials (README: 'Shards and checkpoints on object "
            f"storage'), or set {STORE_TIMEOUT_ENV} to wait longer"
        ) from None
    if answer.returncode != 0:
        lines = answer.stderr.strip().splitlines() or [f"exit status {answer.returncode}"]
        error = lines[-1] if lines[0].startswith("Traceback") else " ".join(lines)
        raise InputError(f"{uri}: {error}{_store_hint(uri, error)}")
    return _open(uri)


def _store_hint(uri: str, error: str) -> str:
    """What to check for a store's error, by its kind."""
    query = urlsplit(uri).query
    if "SSL" in error and "endpoint_override" in query and "scheme=" not in query:
        return (
            ". An endpoint that speaks plain HTTP needs scheme=http in the URI's query; quote "
            "the URI in the shell, where an unquoted & ends the command"
        )
    if any(word in error for word in ("ACCESS_DENIED", "AccessDenied", "Forbidden", "credential")):
        return (
            ". Check the credentials this machine, and every Ray node, has for it (README: "
            "'Shards and checkpoints on object storage')"
        )
    return ". Check the URI (quoted in the shell), the network and the credentials"


def video_id(relative_path: str) -> str:
    """A stable id of a relative path; a file name that is not UTF-8 (its bytes kept by Python
    as surrogates) gets one too, and is rejected by name later (`unreadable`)."""
    encoded = relative_path.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(encoded, digest_size=8).hexdigest()


def hash_split(video_id_: str, val_fraction: float, seed: int = 0) -> str:
    """'val' for a stable pseudo-random `val_fraction` of ids, 'train' for the rest."""
    digest = hashlib.blake2b(f"{seed}:{video_id_}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def discover(
    source: str, extensions: Sequence[str] = VIDEO_EXTENSIONS
) -> tuple[list[InputVideo], pafs.FileSystem]:
    """List the inputs of a folder or a .csv, .jsonl or .json manifest, sorted by id."""
    filesystem, path = resolve_filesystem(source)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        videos = _discover_folder(filesystem, path, extensions)
    elif path.lower().endswith((".csv", ".jsonl", ".json")):
        videos = _discover_manifest(filesystem, path)
    else:
        raise InputError(f"input {source!r} is neither a folder nor a .csv/.jsonl/.json manifest")
    if not videos:  # nothing to shard is a wrong input, not a run that failed
        if info.type == pafs.FileType.Directory:
            raise InputError(
                f"no video files ({', '.join(extensions)}) under {source}; give the folder that "
                "holds the videos, or their endings with --extensions"
            )
        raise InputError(
            f"{source} lists no videos: a manifest needs a row per video, with its 'path'"
        )
    unique: dict[str, InputVideo] = {}
    for video in videos:
        if video.id in unique:
            first = unique[video.id]
            differs = [
                f"{what} {a!r} then {b!r}"
                for what, a, b in (
                    ("label", first.label_name, video.label_name),
                    ("split", first.split, video.split),
                )
                if a != b
            ]
            logger.warning(
                "input listed twice%s, keeping the first: %s",
                f" with another {' and '.join(differs)}" if differs else "",
                video.relative_path,
            )
            continue
        unique[video.id] = video
    return sorted(unique.values(), key=lambda video: video.id), filesystem


def _discover_folder(
    filesystem: pafs.FileSystem, root: str, extensions: Sequence[str]
) -> list[InputVideo]:
    suffixes = tuple(extension.lower() for extension in extensions)
    entries: list[tuple[str, int]] = []
    if isinstance(filesystem, pafs.LocalFileSystem):
        # os.walk also yields dangling symlinks, which must be reported as unreadable, not skipped.
        # Linked folders (a class folder kept elsewhere) are followed, each real folder once.
        visited: set[str] = set()
        for directory, folders, files in os.walk(root, followlinks=True):
            real = os.path.realpath(directory)
            if real in visited:  # a link back up the tree, or a second link to one folder
                logger.warning("%s: already listed through another path, skipped", directory)
                folders[:] = []
                continue
            visited.add(real)
            for name in files:
                full = os.path.join(directory, name)
                if name.lower().endswith(suffixes) and not name.startswith("."):
                    entries.append((full, os.path.getsize(full) if os.path.exists(full) else -1))
    else:
        selector = pafs.FileSelector(root, recursive=True)
        for info in filesystem.get_file_info(selector):
            name = info.base_name  # hidden ones skipped as locally: macOS's ._x.mp4 is no video
            video = name.lower().endswith(suffixes) and not name.startswith(".")
            if info.type == pafs.FileType.File and video:
                entries.append((info.path, info.size if info.size is not None else -1))
    relatives = [
        posixpath.relpath(full.replace(os.sep, "/"), root.replace(os.sep, "/"))
        for full, _ in entries
    ]
    top_levels = {relative.split("/")[0] for relative in relatives if "/" in relative}
    split_layout = any(name.lower() in SPLIT_FOLDERS for name in top_levels)
    others = sorted(name for name in top_levels if name.lower() not in SPLIT_FOLDERS)
    if split_layout and others:
        raise InputError(
            f"{root}: split folders ({', '.join(sorted(set(top_levels) - set(others)))}) next to "
            f"other folders ({', '.join(others)}), whose names would become labels; move those "
            "into a split folder or out of the input, or list the videos in a CSV manifest (also "
            "the way when a class is named like a split)"
        )
    videos = []
    for (full, size), relative in zip(entries, relatives, strict=True):
        parts = relative.split("/")
        split = None
        if split_layout and len(parts) > 1:
            split, parts = SPLIT_FOLDERS[parts[0].lower()], parts[1:]
        label = _label_name(parts[0]) if len(parts) > 1 else None
        videos.append(InputVideo(video_id(relative), full, relative, label, split, size))
    return videos


def _label_name(name: str) -> str:
    """A class name in Unicode's composed form (NFC): `café` copied from a Mac is spelt with a
    combining accent (NFD) and was another class than the same word typed here."""
    return unicodedata.normalize("NFC", name)


def _discover_manifest(filesystem: pafs.FileSystem, path: str) -> list[InputVideo]:
    text = _read_text(filesystem, path, "manifest")
    base = posixpath.dirname(path)
    where: list[str] = []  # each row's place in the file, for messages
    if path.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        rows = []
        for row in reader:
            rows.append(row)
            where.append(f"line {reader.line_num}")
        if rows and "path" not in rows[0]:
            raise InputError(
                f"{path}: a CSV manifest needs a header with a 'path' column "
                f"(and optional 'label', 'split'); got {list(rows[0])}"
            )
    elif text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: invalid JSON: {error}") from error
        where = [f"entry {number}" for number in range(1, len(rows) + 1)]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: invalid JSON: {error}") from error
                where.append(f"line {number}")
    _warn_unread_columns(path, rows)
    videos, unknown_splits = [], set()
    sizes = _sizes(filesystem, [_manifest_path(base, row) for row in rows if isinstance(row, dict)])
    # One file under two spellings (`cat/a.mp4`, `./cat/a.mp4`, its absolute path) would get
    # two ids, and could land in two splits: the first row is kept. The same spelling twice
    # is one id, which discover() keeps once.
    first_rows: dict[str, tuple[str, str]] = {}  # normalised file -> (spelling, place)
    respelt: list[str] = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(
                f"{path}: entry {number} is {type(row).__name__}, not an object with 'path' "
                "(and optional 'label', 'split')"
            )
        if not row.get("path"):
            raise InputError(f"{path}: row {number} has no 'path'")
        relative = str(row["path"]).replace(os.sep, "/")
        full = _manifest_path(base, row)
        spelling, place = first_rows.setdefault(
            posixpath.normpath(full), (relative, where[number - 1])
        )
        if spelling != relative:
            respelt.append(f"{where[number - 1]} {relative!r} is the file of {place} {spelling!r}")
            continue
        label = row.get("label")
        split = row.get("split") or None
        if split is not None:  # "validation" is "val", as a folder name would be
            split = SPLIT_FOLDERS.get(str(split).lower(), str(split))
            if split not in READ_SPLITS:
                unknown_splits.add(split)
        size = sizes.get(full, -1)
        videos.append(
            InputVideo(
                video_id(relative),
                full,
                relative,
                None if label in (None, "") else _label_name(str(label)),
                split,
                size,
            )
        )
    if respelt:
        logger.warning(
            "%s: %d row(s) name a file an earlier row names another way, left out (one file, "
            "one id, one split): %s%s",
            path, len(respelt), "; ".join(respelt[:5]), "; ..." if len(respelt) > 5 else "",
        )  # fmt: skip
    if unknown_splits:
        logger.warning(
            "%s: split(s) %s are kept as they are; %s", path, ", ".join(sorted(unknown_splits)),
            SPLITS_READ,
        )  # fmt: skip
    return videos


MANIFEST_COLUMNS = ("path", "label", "split")


def _warn_unread_columns(path: str, rows: list) -> None:
    """A manifest's columns other than path, label and split are not read: said, and, where
    no column is `label`, that its clips get no class (a `class` column was ignored silently)."""
    columns = {key for row in rows if isinstance(row, dict) for key in row if key is not None}
    unread = sorted(str(column) for column in columns - set(MANIFEST_COLUMNS))
    if not unread:
        return
    if "label" not in columns:
        logger.warning(
            "%s: no 'label' column, so no clip gets a class; column(s) %s are not read (a "
            "manifest reads %s): name the class column 'label'",
            path, ", ".join(unread), ", ".join(MANIFEST_COLUMNS),
        )  # fmt: skip
    else:
        logger.warning(
            "%s: column(s) %s are not read (a manifest reads %s)",
            path, ", ".join(unread), ", ".join(MANIFEST_COLUMNS),
        )  # fmt: skip


def _read_text(filesystem: pafs.FileSystem, path: str, what: str, shown: str | None = None) -> str:
    """A text input (a manifest, a split file) as UTF-8, with or without a BOM: a file saved
    in another encoding (Excel's CSV on Windows) is named, not a bare codec error."""
    shown = shown or path
    try:
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
    except OSError as error:
        raise InputError(f"cannot read {what} {shown!r}: {error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{shown}: not UTF-8 text (byte {data[error.start]:#04x} at position "
            f"{error.start}); save the {what} as UTF-8"
        ) from None


def _manifest_path(base: str, row: dict) -> str:
    """A manifest row's file: its path as given if absolute, else under the manifest's folder."""
    relative = str(row.get("path") or "").replace(os.sep, "/")
    return relative if posixpath.isabs(relative) else posixpath.join(base, relative)


def _sizes(filesystem: pafs.FileSystem, paths: list[str]) -> dict[str, int]:
    """Bytes of each path that is a file, in one listing call (pyarrow asks an object store
    for many at once; one call per row took a HEAD request after another)."""
    infos = filesystem.get_file_info(paths) if paths else []
    return {
        path: info.size
        for path, info in zip(paths, infos, strict=True)
        if info.type == pafs.FileType.File and info.size is not None
    }


def read_split_files(assignments: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Map path -> split from UCF-101 / HMDB-51 style list files.

    A line is a path relative to the input root, which may hold spaces, optionally followed by
    an integer (UCF-101's class number: `ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1`). A
    line without a folder (`v_a.avi`) names that file in any folder; a line with one names
    that path only, so an unlisted `C/x.avi` does not take the split of a listed `A/x.avi`.
    """
    mapping: dict[str, str] = {}
    for given, list_path in assignments:
        # `training=trainlist01.txt` is split train, as a folder or a manifest's split would be
        split = SPLIT_FOLDERS.get(given.lower(), given)
        if split not in READ_SPLITS:
            logger.warning(
                "--split-file %s=%s: split %r is kept as it is; %s", given, list_path, split,
                SPLITS_READ,
            )  # fmt: skip
        list_fs, resolved = resolve_filesystem(list_path)  # a local path or any URI
        lines = _read_text(list_fs, resolved, "split file", list_path).splitlines()
        for line in lines:
            relative = line.strip().replace("\\", "/")
            if not relative:
                continue
            mapping[relative] = split  # the whole line: a file name may end in " 1"
            words = relative.rsplit(None, 1)
            if len(words) == 2 and words[1].isdigit():  # a path and its class number
                mapping[words[0]] = split
    return mapping


def with_file_names(mapping: dict[str, str], videos: Iterable[InputVideo]) -> dict[str, str]:
    """`read_split_files`' mapping plus the bare file name of each listed path that is not
    itself an input: lists written for another layout (UCF-101's CLASS/file.avi, the videos
    kept in one folder) still match by file name, while a listed `A/x.avi` that is an input
    does not lend its split to an unlisted `C/x.avi`."""
    present = set()
    for video in videos:
        present.update((video.relative_path, video.relative_path.split("/", 1)[-1]))
    extended = dict(mapping)
    for path, split in mapping.items():
        if "/" in path and path not in present:
            extended.setdefault(posixpath.basename(path), split)
    return extended


def assign_split(
    video: InputVideo, split_files: dict[str, str], val_fraction: float, seed: int
) -> str:
    """Manifest/folder split first, then split files, then the id hash."""
    if video.split:
        return video.split
    if split_files:
        relative = video.relative_path
        without_split_folder = relative.split("/", 1)[-1]
        for key in (relative, without_split_folder, posixpath.basename(relative)):
            if key in split_files:
                return split_files[key]
        return "unassigned"
    return hash_split(video.id, val_fraction, seed)


def build_label_map(videos: Iterable[InputVideo], previous: dict[str, int] | None = None):
    """Label name -> index. Integer names keep their value; others are numbered in sorted order.

    Labels known from an earlier run keep their index; new ones are appended.
    """
    names = sorted({video.label_name for video in videos if video.label_name is not None})
    label_map = dict(previous or {})
    numeric = [*names, *label_map]
    as_numbers = all(name.isdigit() for name in numeric) and all(
        label_map[name] == int(name)
        for name in label_map  # as an earlier run numbered them
    )
    if numeric and as_numbers:
        values: dict[int, str] = {}
        for name in numeric:
            if values.setdefault(int(name), name) != name:
                raise InputError(
                    f"labels {values[int(name)]!r} and {name!r} are the same number; rename one"
                )
        return {name: int(name) for name in sorted(set(numeric), key=int)}
    composed = {_label_name(name): index for name, index in label_map.items()}
    for name in names:
        if name not in label_map:  # a name an earlier run kept in another Unicode form: its index
            label_map[name] = composed.get(name, max(label_map.values(), default=-1) + 1)
    return label_map
