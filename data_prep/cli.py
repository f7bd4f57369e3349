"""`python -m data_prep INPUT OUTPUT` (also `svt-ray prep`): videos -> Parquet shards on Ray.

The driver discovers the inputs, fixes (or extends) the shard plan, then runs one Ray task per
video (probe, decode, re-encode) and one Ray task per shard (write the Parquet file, then its
state file). Encoded videos travel through the object store from the video tasks to the shard
writer, never through the driver, so the same command shards a large collection on a cluster
(`--address auto`). Bad videos end up in rejects.jsonl; a video task that crashes its worker
(a decoder segfault) is rejected too. Exit codes: 0 when the dataset has at least one video,
1 when nothing could be sharded, 2 for unusable arguments or inputs, 3 when a shard could not be
written (re-run to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import posixpath
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

from pyarrow import fs as pafs

from data_prep.inputs import (
    VIDEO_EXTENSIONS,
    InputError,
    InputVideo,
    assign_split,
    build_label_map,
    discover,
    read_split_files,
    resolve_filesystem,
    with_file_names,
)
from data_prep.shards import (
    SCHEMA_VERSION,
    SHARD_DIR,
    STATE_DIR,
    Output,
    load_states,
    shard_name,
    shard_state,
    write_manifest,
    write_shard,
)
from data_prep.transcode import PrepOptions, Rejected, prepare_video
from svt_ray import quiet_ray_logs
from svt_ray.help_format import HelpFormatter
from svt_ray.video import X264_PRESETS

logger = logging.getLogger("data_prep")


# --------------------------------------------------------------------------------------------
# Work done in Ray tasks (plain functions, wrapped with ray.remote in `run`)


def process_video(
    video: InputVideo, split: str, label: int, filesystem, options: PrepOptions
) -> tuple[dict, dict | None]:
    """(status, row): the status is small and goes to the driver, the row to the shard writer."""
    start = time.perf_counter()
    status = {
        "id": video.id,
        "path": video.relative_path,
        "ok": False,
        "reason": None,
        "detail": None,
        "source_bytes": max(video.size, 0),
        "output_bytes": 0,
    }
    try:
        try:
            video.relative_path.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(
                "unreadable", "the file name is not UTF-8, which Parquet needs: rename it"
            ) from None
        try:
            with filesystem.open_input_stream(video.path) as stream:
                data = stream.read()
        except (OSError, ValueError) as error:
            raise Rejected("unreadable", f"{type(error).__name__}: {error}") from error
        columns = prepare_video(data, options)
    except Rejected as rejected:
        status.update(reason=rejected.reason, detail=rejected.detail)
        return status, None
    except Exception as error:  # one unexpected failure must not stop the collection
        logger.exception("unexpected error preparing %s", video.relative_path)
        status.update(reason="error", detail=f"{type(error).__name__}: {error}"[:500])
        return status, None
    row = {
        "id": video.id,
        "label": label,
        "label_name": video.label_name or "",
        "split": split,
        "source_path": video.relative_path,
        **columns,
    }
    status.update(
        ok=True,
        source_bytes=len(data),
        output_bytes=len(columns["video"]),
        seconds=time.perf_counter() - start,
    )
    return status, row


def process_video_task(
    video: InputVideo, split: str, label: int, filesystem, options: PrepOptions
) -> Iterator[dict | None]:
    """[Ray task, a generator] `None` as soon as it runs, then the status, then the row. The
    first item tells the driver when the task started: `--file-timeout` counts from there, so
    a video that waited for a CPU behind others is not taken for a hung one."""
    yield None
    status, row = process_video(video, split, label, filesystem, options)
    yield status
    yield row


def write_shard_task(output: Output, name: str, ids: list[str], *results) -> dict:
    """Write one shard from its videos' (status, row) results, then mark it done."""
    statuses, rows = results[: len(ids)], [row for row in results[len(ids) :] if row is not None]
    rejects = [
        {
            "id": status["id"],
            "path": status["path"],
            "reason": status["reason"],
            "detail": status["detail"],
        }
        for status in statuses
        if not status["ok"]
    ]
    size = write_shard(output, name, rows) if rows else 0
    state = shard_state(name, ids, rows, rejects, size)
    output.write_json(state, STATE_DIR, f"{name}.json")
    return state


# --------------------------------------------------------------------------------------------
# Planning


def plan_shards(
    previous: dict | None,
    videos: list[InputVideo],
    label_map: dict[str, int],
    options: dict,
    source: str,
    shard_bytes: int,
    max_videos: int,
) -> dict:
    """Keep the shards of an earlier plan; pack inputs it does not know into new shards."""
    plan = previous or {"schema_version": SCHEMA_VERSION, "shards": []}
    plan.update(label_map=label_map, options=options, source=source)
    known = {video_id for entry in plan["shards"] for video_id in entry["ids"]}
    current: list[str] = []
    current_bytes = 0
    new_entries = []
    for video in videos:  # sorted by id
        if video.id in known:
            continue
        size = max(video.size, 0)
        if current and (current_bytes + size > shard_bytes or len(current) >= max_videos):
            new_entries.append(current)
            current, current_bytes = [], 0
        current.append(video.id)
        current_bytes += size
    if current:
        new_entries.append(current)
    for ids in new_entries:
        plan["shards"].append({"name": shard_name(len(plan["shards"])), "ids": ids})
    return plan


REJECT_REASONS = (
    "empty", "not_video", "no_video_stream", "single_frame", "too_short", "resolution",
    "timestamps", "truncated", "unreadable", "decode_error", "crash", "timeout", "error",
)  # fmt: skip


def _check_same_input(args: argparse.Namespace, previous: dict, videos: list[InputVideo]) -> None:
    """An output continues the input it was made from (ids are paths relative to the input,
    so a moved folder still matches). Another input would be merged into it without a word;
    inputs gone since the earlier run stay in the dataset, which is said."""
    planned = {video_id for entry in previous["shards"] for video_id in entry["ids"]}
    listed = {video.id for video in videos}
    if planned and not planned & listed:
        raise InputError(
            f"{args.output} holds shards of {previous.get('source', 'another input')} "
            f"({len(planned)} inputs), none of which is listed under {args.input}: preparing "
            "it there would merge two datasets. Use a new output directory for it"
        )
    gone = planned - listed
    if gone:
        print(
            f"data_prep: {len(gone)} of the {len(planned)} inputs already planned into "
            f"{args.output} are no longer listed under {args.input}; the ones already written "
            "stay in the dataset (prepare into a new output directory to leave them out)",
            file=sys.stderr,
        )


def _release_for_retry(output: Output, plan: dict, reasons: set[str], write: bool) -> set[str]:
    """Take videos out of finished shards so that this run processes them again, in new
    shards: those rejected for one of `reasons` (`--retry`: a decoder crash on a node short of
    memory, a timeout on a busy one), and any an earlier run stopped here left in its shard's
    plan entry but not in its state. Each shard's state is rewritten before the plan (the
    caller's), so a run stopped in between leaves the second kind, which the next run
    takes. Returns the ids released; `write=False` (a dry run) changes nothing on disk."""
    states = load_states(output, [entry["name"] for entry in plan["shards"]])
    released: set[str] = set()
    for entry in plan["shards"]:
        state = states.get(entry["name"])
        if state is None:
            continue
        retried = {reject["id"] for reject in state["rejects"] if reject["reason"] in reasons}
        if retried:
            state = {
                **state,
                "ids": [video_id for video_id in state["ids"] if video_id not in retried],
                "rejects": [r for r in state["rejects"] if r["id"] not in retried],
            }
            if write:
                output.write_json(state, STATE_DIR, f"{entry['name']}.json")
        left_out = set(entry["ids"]) - set(state["ids"])
        if left_out:
            entry["ids"] = [video_id for video_id in entry["ids"] if video_id not in left_out]
            released |= left_out
    return released


def _options_record(args: argparse.Namespace, options: PrepOptions) -> dict:
    """Everything that changes shard contents; a resumed run must use the same."""
    return {
        **options.to_dict(),
        "val_fraction": args.val_fraction,
        "split_seed": args.split_seed,
        "split_files": sorted(args.split_file or []),
        "extensions": sorted(args.extensions),
    }


# --------------------------------------------------------------------------------------------
# The command


def _reasons(text: str) -> list[str]:
    reasons = [reason.strip() for reason in text.split(",") if reason.strip()]
    unknown = sorted(set(reasons) - set(REJECT_REASONS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown reject reason(s) {', '.join(unknown)}; choose from {', '.join(REJECT_REASONS)}"
        )
    return reasons


def build_parser(prog: str = "python -m data_prep") -> argparse.ArgumentParser:
    defaults = PrepOptions()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Shard a video collection into Parquet for svt-ray (see docs/data.md).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "input",
        help="folder (class sub-folders give labels), or a .csv/.jsonl manifest (or a .json "
        "array of objects) with path,label[,split]; local path or URI",
    )
    parser.add_argument(
        "output",
        help="dataset directory: local path or pyarrow filesystem URI (s3://..., gs://...)",
    )
    parser.add_argument(
        "--short-side",
        type=int,
        default=defaults.short_side,
        help="short side of the re-encoded videos in pixels (even; smaller sources are not "
        "upscaled)",
    )
    parser.add_argument(
        "--max-fps",
        type=float,
        default=defaults.max_fps,
        help="frame-rate cap in frames per second (0: keep the source rate)",
    )
    parser.add_argument(
        "--gop", type=int, default=defaults.gop, help="H.264 keyframe interval in frames"
    )
    parser.add_argument(
        "--crf", type=int, default=defaults.crf, help="H.264 quality (0-51, lower is better)"
    )
    parser.add_argument(
        "--preset",
        default=defaults.preset,
        choices=X264_PRESETS,
        metavar="X264_PRESET",
        help=f"x264 encoder speed preset ({', '.join(X264_PRESETS)}); not an svt-ray recipe",
    )
    parser.add_argument(
        "--min-frames",
        type=int,
        default=defaults.min_frames,
        help="reject videos with fewer frames (after the frame-rate cap)",
    )
    parser.add_argument(
        "--min-duration",
        type=float,
        default=defaults.min_duration_s,
        help="reject videos shorter than this many seconds",
    )
    parser.add_argument(
        "--min-side", type=int, default=defaults.min_side, help="reject smaller videos (pixels)"
    )
    parser.add_argument(
        "--max-side", type=int, default=defaults.max_side, help="reject larger videos (pixels)"
    )
    parser.add_argument(
        "--max-aspect",
        type=float,
        default=defaults.max_aspect,
        help="reject videos whose long side is more than this times the short side",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of ids hashed into 'val' when no split is given",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the hashed train/val split"
    )
    parser.add_argument(
        "--split-file",
        action="append",
        metavar="SPLIT=PATH",
        help="UCF-101 style list of relative paths for SPLIT (repeatable)",
    )
    parser.add_argument(
        "--extensions",
        nargs="+",
        default=list(VIDEO_EXTENSIONS),
        help="file endings that count as videos when a folder is listed",
    )
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=256.0,
        help="pack up to this many MB of source video per shard",
    )
    parser.add_argument(
        "--max-videos-per-shard", type=int, default=1024, help="at most this many videos a shard"
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS or a new local Ray)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="videos submitted at once (default: 4 x cluster CPUs, >= 1 shard)",
    )
    parser.add_argument(
        "--file-timeout",
        type=float,
        default=1800.0,
        help="seconds from the start of a video's task (time spent waiting for a CPU not "
        "counted) after which the task is killed and the video rejected as 'timeout' "
        "(0: no limit)",
    )
    parser.add_argument(
        "--retry",
        type=_reasons,
        default=[],
        metavar="REASON[,REASON]",
        help="process again the videos an earlier run rejected for these reasons (e.g. "
        "crash,timeout after giving the workers more memory or time); they go to new shards",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m data_prep") -> int:
    """Entry point of `python -m data_prep` and `svt-ray prep`; returns the exit code."""
    quiet_ray_logs()
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
    try:
        options = PrepOptions(
            short_side=args.short_side,
            max_fps=args.max_fps,
            gop=args.gop,
            crf=args.crf,
            preset=args.preset,
            min_frames=args.min_frames,
            min_duration_s=args.min_duration,
            min_side=args.min_side,
            max_side=args.max_side,
            max_aspect=args.max_aspect,
        )
        if not 0 <= args.val_fraction < 1:
            raise ValueError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
        _check_counts(args)
        split_assignments = []
        for item in args.split_file or []:
            split, _, path = item.partition("=")
            if not split or not path:
                raise ValueError(f"--split-file expects SPLIT=PATH, got {item!r}")
            split_assignments.append((split, path))
        return run(args, options, split_assignments)
    except (ValueError, InputError) as error:
        print(f"data_prep: error: {error}", file=sys.stderr)
        return 2


def _check_counts(args: argparse.Namespace) -> None:
    """Sizes, counts and limits that only make sense positive (0 CPUs waited for a CPU
    forever; a negative --file-timeout rejected every video as a timeout)."""
    for flag, value, least in (
        ("--num-cpus", args.num_cpus, 1),
        ("--max-in-flight", args.max_in_flight, 1),
        ("--max-videos-per-shard", args.max_videos_per_shard, 1),
    ):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: give {least} or more")
    if not args.shard_size_mb > 0:
        raise ValueError(f"--shard-size-mb {args.shard_size_mb:g}: give a size above 0")
    if args.file_timeout < 0:
        raise ValueError(f"--file-timeout {args.file_timeout:g}: give seconds, or 0 for no limit")


def run(args: argparse.Namespace, options: PrepOptions, split_assignments) -> int:
    """Discover, plan, shard on Ray, write the manifest; Ctrl-C keeps the shards written
    and says how to go on (exit 130)."""
    try:
        return _run(args, options, split_assignments)
    except PrepInterrupted as stopped:
        print(
            f"data_prep: interrupted; {stopped.written} shard(s) written now are kept. Run the "
            "same command again to finish: it resumes from them",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:  # before Ray started, or a second Ctrl-C
        print(
            "data_prep: interrupted; shards written so far are kept. Run the same command "
            "again to finish",
            file=sys.stderr,
        )
        return 130


class PrepInterrupted(Exception):
    """Ctrl-C while the videos were processed: the shards written stay, no manifest."""

    def __init__(self, written: int) -> None:
        super().__init__(written)
        self.written = written


def _run(args: argparse.Namespace, options: PrepOptions, split_assignments) -> int:
    started = time.perf_counter()
    output = _checked_output(args)
    videos, input_fs = discover(args.input, args.extensions)
    if args.verbose:  # inside the demo or a study, the root logs INFO too
        logger.info("%d videos under %s", len(videos), args.input)
    split_files = with_file_names(read_split_files(split_assignments), videos)
    previous = (
        output.read_json(STATE_DIR, "plan.json") if output.exists(STATE_DIR, "plan.json") else None
    )
    options_record = _options_record(args, options)
    if previous and not any(load_states(output, [e["name"]]) for e in previous["shards"]):
        # Stopped before its first shard: nothing made with its options or input to stay
        # true to (the same ones plan the same shards again). Read up to the first shard
        # written, not all: a finished prep holds thousands.
        if previous["options"] != options_record or previous.get("source") != args.input:
            print(f"data_prep: the earlier run into {args.output} wrote no shard; starting anew")
        previous = None
    if previous:
        _check_same_input(args, previous, videos)
    if previous and previous["options"] != options_record:
        changed = [
            f"{key}: {json.dumps(previous['options'].get(key))} -> {json.dumps(value)}"
            for key, value in sorted(options_record.items())
            if previous["options"].get(key) != value
        ]
        raise ValueError(
            f"{args.output} was prepared with other options ({'; '.join(changed)}); "
            "use the same options to resume, or a new output directory"
        )
    released = (
        _release_for_retry(output, previous, set(args.retry), write=not args.dry_run)
        if previous
        else set()
    )
    if released:
        print(f"data_prep: {len(released)} video(s) taken out of finished shards to process again")
    label_map = build_label_map(videos, previous["label_map"] if previous else None)
    plan = plan_shards(
        previous,
        videos,
        label_map,
        options_record,
        args.input,
        int(args.shard_size_mb * 1e6),
        args.max_videos_per_shard,
    )
    states = load_states(output, [entry["name"] for entry in plan["shards"]])
    todo = [entry for entry in plan["shards"] if entry["name"] not in states]
    if args.verbose:
        logger.info(
            "plan: %d shard(s), %d written before, %d to write (%d videos); %d label(s)",
            len(plan["shards"]), len(states), len(todo), sum(len(e["ids"]) for e in todo),
            len(label_map),
        )  # fmt: skip
    by_id = {video.id: video for video in videos}
    splits = {
        video.id: assign_split(video, split_files, args.val_fraction, args.split_seed)
        for video in videos
    }
    missing = {video_id for entry in todo for video_id in entry["ids"] if video_id not in by_id}
    if missing:
        raise InputError(
            f"{len(missing)} planned inputs are no longer listed under "
            f"{args.input}; restore them or use a new output directory"
        )

    if args.dry_run:
        _print_dry_run(args, videos, plan, states, todo, splits, label_map)
        return 0

    try:  # the first writes: what `_checked_output` cannot see (a store's permissions)
        _, kept = output.remove_temporaries()
        output.write_json(plan, STATE_DIR, "plan.json")
    except OSError as error:
        raise InputError(
            f"OUTPUT {args.output}: cannot write there ({type(error).__name__}: {error}); give "
            "a folder you can write to"
        ) from error
    if kept:
        print(
            f"data_prep: left {kept} temporary file(s) (.tmp-*) written within the hour in "
            f"{args.output}: another run may be writing them; a later run removes them"
        )
    earlier = sum(len(entry["ids"]) for entry in plan["shards"] if entry["name"] in states)
    failed = 0
    if todo:
        failed = _run_on_ray(args, output, input_fs, options, todo, by_id, splits, label_map)
        states = load_states(output, [entry["name"] for entry in plan["shards"]])
    manifest = write_manifest(output, plan, states)
    _print_summary(args, manifest, time.perf_counter() - started, earlier)
    if failed:
        print(
            f"data_prep: {failed} shard(s) could not be written; re-run to resume", file=sys.stderr
        )
        return 3
    if manifest["counts"]["accepted"] == 0:
        print(
            f"data_prep: nothing was sharded: all {manifest['counts']['rejected']} inputs were "
            f"rejected (see {args.output}/rejects.jsonl)",
            file=sys.stderr,
        )
        return 1
    return 0


def _checked_output(args: argparse.Namespace) -> Output:
    """The output, checked before any work (a dry run too): apart from the input, and
    somewhere this run can write (an output under a file, or in a read-only folder, was a
    traceback after the videos were listed)."""
    filesystem, root = resolve_filesystem(args.output)
    _check_apart(args, filesystem, root)

    def refuse(why: str):
        raise InputError(
            f"OUTPUT {args.output}: cannot write there ({why}); give a folder you can write to"
        )

    # A bucket's root is never a file, and asking about it needs a bucket-level permission
    # an object-only role lacks (GCS: storage.buckets.get): asked only below a bucket.
    if isinstance(filesystem, pafs.LocalFileSystem) or "/" in root.strip("/"):
        try:
            if filesystem.get_file_info(root).type == pafs.FileType.File:
                refuse("it is a file")
        except OSError as error:
            refuse(f"{type(error).__name__}: {error}")
    if isinstance(filesystem, pafs.LocalFileSystem):  # a store's rights show at the first write
        existing = root
        while not os.path.lexists(existing):  # the folder it would be created in
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            refuse(f"{existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            refuse(f"no permission to write in {existing}")
    return Output(filesystem, root)


def _check_apart(args: argparse.Namespace, output_fs, output_root: str) -> None:
    """A folder input and the output may not be one folder, nor the output inside the input:
    the output's files (shards/, _state/, manifest.json, rejects.jsonl) would land among the
    videos, over any of those names, and the dataset would be listed with its sources. An input
    inside the output is fine (`prep data/raw data`: the output writes beside it) unless it is
    in the output's own shards/ or _state/. A manifest input is only refused where the output
    writes over it (`prep DIR/manifest.json DIR`): its rows name the videos, no folder is
    walked."""
    input_fs, input_path = resolve_filesystem(args.input)
    if input_fs.type_name != output_fs.type_name:
        return
    if isinstance(input_fs, pafs.LocalFileSystem):
        given, out = os.path.realpath(input_path), os.path.realpath(output_root)
    else:
        stores = {(urlsplit(uri).scheme, urlsplit(uri).query) for uri in (args.input, args.output)}
        if len(stores) > 1:  # another endpoint: the same path is another place
            return
        given, out = posixpath.normpath(input_path), posixpath.normpath(output_root)
    kind = input_fs.get_file_info(input_path).type
    where = f"INPUT {args.input} and OUTPUT {args.output}"
    own = [f"{out}/{folder}" for folder in (SHARD_DIR, STATE_DIR)]
    if kind == pafs.FileType.Directory:
        if given == out:
            why = " are one folder"
        elif _inside(out, given):
            why = ": the output is inside the input folder"
        elif any(given == folder or _inside(given, folder) for folder in own):
            why = f": the input folder is in the output's own {SHARD_DIR}/ or {STATE_DIR}/"
        else:
            return
        raise InputError(
            f"{where}{why}. The dataset's files (shards/, _state/, manifest.json, "
            "rejects.jsonl) would be written among the videos, over any of those names, and "
            "the dataset would be listed with its sources; give an output folder apart from "
            "the input"
        )
    written = given in (f"{out}/manifest.json", f"{out}/rejects.jsonl") or any(
        _inside(given, folder) for folder in own
    )
    if kind == pafs.FileType.File and written:
        raise InputError(
            f"{where}: the output writes a file of its own at {given}, over the input manifest; "
            "give another output folder, or move the manifest out of it"
        )


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _run_on_ray(args, output, input_fs, options, todo, by_id, splits, label_map) -> int:
    """Process the unfinished shards; return how many shard writes failed."""
    import ray

    from svt_ray.cluster import init_address, joins_a_cluster, warn_node_local_paths

    cluster = joins_a_cluster(args.address)
    if cluster and args.num_cpus is not None:  # Ray refuses it when joining
        logger.warning("--num-cpus %d: ignored, this prep joins a Ray cluster", args.num_cpus)
    if cluster:  # the video tasks and shard writers on other nodes read and write there
        warn_node_local_paths({"INPUT": args.input, "OUTPUT": args.output})
    with _ctrl_c_stops_at_the_next_wait() as stop:  # not inside Ray's calls (a segfault)
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(
                address=init_address(args.address),
                num_cpus=None if cluster else args.num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        try:
            return _process(args, output, input_fs, options, todo, by_id, splits, label_map, stop)
        finally:
            if started_ray:
                ray.shutdown()


@contextlib.contextmanager
def _ctrl_c_stops_at_the_next_wait() -> Iterator[threading.Event]:
    """A first Ctrl-C sets the event the processing loop checks between its waits, so Ray is
    never interrupted inside one of its calls (one in `ray.init` left a traceback, one at the
    wrong time a segfault); a second Ctrl-C stops at once. Off the main thread, where no
    handler can be installed, Ctrl-C stops as Python does."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    before = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum, frame):
        if stop.is_set():
            signal.signal(signal.SIGINT, before)
            raise KeyboardInterrupt
        stop.set()
        print(
            "data_prep: stopping once the shards being written are done (Ctrl-C again to stop "
            "at once)",
            file=sys.stderr,
        )

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, before)


def _process(args, output, input_fs, options, todo, by_id, splits, label_map, stop) -> int:
    """[Ray started] Run the video tasks and shard writers; return the failed shard writes.
    When `stop` is set: no new task, running video tasks cancelled, the shard writes under way
    finished (each is atomic), then `PrepInterrupted`."""
    import ray
    from tqdm import tqdm

    process = ray.remote(num_cpus=1, max_retries=1)(process_video_task)
    writer = ray.remote(num_cpus=0.25, max_retries=3)(write_shard_task)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    largest = max(len(entry["ids"]) for entry in todo)
    window = args.max_in_flight or max(4 * cpus, largest)
    queue = deque(todo)
    # a video task's generator -> [shard name, position, when it started running or None]
    pending: dict = {}
    slots: dict[str, dict] = {}
    writers: dict = {}
    failed = written = 0
    timed_out: set = set()
    rejected: Counter = Counter()
    source_bytes = 0
    start = time.perf_counter()
    total = sum(len(entry["ids"]) for entry in todo)
    progress = tqdm(
        total=total,
        unit="video",
        disable=_progress_disabled(args),
        desc="data_prep",
        dynamic_ncols=True,
    )

    def show() -> None:
        progress.set_postfix(
            rejects=sum(rejected.values()),
            MBps=f"{source_bytes / 1e6 / (time.perf_counter() - start):.1f}",
            shards=f"{written}/{len(todo)}",
        )

    dropped = False  # videos Ctrl-C left unprocessed: then no manifest
    while queue or pending or writers:
        if stop.is_set() and (queue or pending):
            dropped = True
            queue.clear()
            for task in pending:
                ray.cancel(task, force=True)
            pending.clear()
        if stop.is_set() and not writers:
            break
        while queue and (not pending or len(pending) + len(queue[0]["ids"]) <= window):
            entry = queue.popleft()
            slots[entry["name"]] = {
                "ids": entry["ids"],
                "statuses": [None] * len(entry["ids"]),
                "rows": [None] * len(entry["ids"]),
                "remaining": len(entry["ids"]),
            }
            for position, video_id in enumerate(entry["ids"]):
                video = by_id[video_id]
                label = label_map[video.label_name] if video.label_name is not None else -1
                task = process.remote(video, splits[video_id], label, input_fs, options)
                pending[task] = [entry["name"], position, None]
        if args.file_timeout:
            now = time.monotonic()
            for task, (*_, started) in pending.items():
                running_s = now - started if started is not None else 0.0
                if running_s > args.file_timeout and task not in timed_out:
                    timed_out.add(task)
                    ray.cancel(task, force=True)  # a hung decoder: kill its worker
        ready, _ = ray.wait([*pending, *writers], num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in writers:
                name = writers.pop(ref)
                try:
                    ray.get(ref)
                    written += 1
                except ray.exceptions.RayError as error:
                    failed += 1
                    logger.error("shard %s could not be written: %s", name, error)
                else:
                    if args.verbose:  # inside the demo or a study, the root logs INFO too
                        logger.info("shard %s written", name)
                show()
                continue
            name, position, started = pending[ref]
            slot = slots[name]
            try:
                if started is None:  # it runs now: its timeout counts from here
                    ray.get(next(ref))
                    pending[ref][2] = time.monotonic()
                    continue
                status = ray.get(next(ref))
                row = next(ref) if status["ok"] else None  # stays in the object store
            except ray.exceptions.RayError as error:  # the worker died (decoder crash)
                video = by_id[slot["ids"][position]]
                status = {
                    "id": video.id,
                    "path": video.relative_path,
                    "ok": False,
                    "reason": "timeout" if ref in timed_out else "crash",
                    "detail": (
                        f"not done {args.file_timeout}s after it started"
                        if ref in timed_out
                        else f"decoding crashed the worker: {type(error).__name__}"
                    ),
                    "source_bytes": max(video.size, 0),
                    "output_bytes": 0,
                }
                row = None
            del pending[ref]
            timed_out.discard(ref)
            slot["statuses"][position], slot["rows"][position] = status, row
            slot["remaining"] -= 1
            source_bytes += status["source_bytes"]
            if not status["ok"]:
                rejected[status["reason"]] += 1
            progress.update(1)
            show()
            if slot["remaining"] == 0:
                slot = slots.pop(name)
                writers[
                    writer.remote(output, name, slot["ids"], *slot["statuses"], *slot["rows"])
                ] = name
    progress.close()
    if dropped:  # a Ctrl-C after the last video was processed: the run is complete
        raise PrepInterrupted(written)
    return failed


def _progress_disabled(args) -> bool | None:
    if args.progress is None:
        return None  # tqdm: on when attached to a terminal
    return not args.progress


def _print_dry_run(args, videos, plan, states, todo, splits, label_map) -> None:
    todo_ids = {video_id for entry in todo for video_id in entry["ids"]}
    split_counts = Counter(splits[video.id] for video in videos if video.id in todo_ids)
    source_mb = sum(max(video.size, 0) for video in videos if video.id in todo_ids) / 1e6
    print(f"dry run: {len(videos)} videos under {args.input}")
    print(
        f"  shards: {len(plan['shards'])} planned, {len(states)} already written, "
        f"{len(todo)} to write -> {args.output}"
    )
    print(f"  to process: {len(todo_ids)} videos, {source_mb:.1f} MB of source")
    print(f"  splits of those: {dict(sorted(split_counts.items()))}")
    names = sorted(label_map, key=label_map.get)
    shown = ", ".join(f"{label_map[name]}={name}" for name in names[:20])
    print(f"  labels: {len(label_map)} ({shown}{', ...' if len(names) > 20 else ''})")


def _print_summary(args, manifest: dict, seconds: float, earlier: int = 0) -> None:
    """The run's one-line summary; then what an earlier run into the same output had done,
    and a note when no clip has a class label."""
    counts = manifest["counts"]
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts["reject_reasons"].items())
    shards = len(manifest["shards"])
    splits = ", ".join(f"{split} {n}" for split, n in counts["splits"].items()) or "none"
    labels = counts.get("labels", {})
    classes = sum(label != "-1" for label in labels)
    print(
        f"data_prep: {counts['accepted']} video{'s' * (counts['accepted'] != 1)} in {shards} "
        f"shard{'s' * (shards != 1)}, "
        f"{counts['rejected']} rejected{f' ({reasons})' if reasons else ''}; "
        f"{manifest['total_duration_s'] / 3600:.2f} h of video, "
        f"{manifest['total_bytes'] / 1e6:.1f} MB, split {splits}, "
        f"{classes} class{'es' * (classes != 1)}; {seconds:.1f}s -> {args.output}"
    )
    if earlier:
        print(
            f"data_prep: {earlier} of the {counts['inputs']} inputs were sharded by an earlier "
            f"run into {args.output}; {counts['inputs'] - earlier} added now"
        )
    unlabelled = labels.get("-1", 0)
    if classes and unlabelled:
        print(
            f"data_prep: {unlabelled} of the {counts['accepted']} clips have no class label "
            "(files directly under the input folder, or manifest rows without one): pretraining "
            "uses them, evaluation and online kNN leave them out"
        )
    if labels and not classes:
        print(
            "data_prep: no clip has a class label (the videos are not in one sub-folder per "
            "class, and no manifest gave labels): fine for pretraining; `svt-ray eval` and "
            "online kNN need labelled clips"
        )


if __name__ == "__main__":
    raise SystemExit(main())
