"""MLflow on rank 0, a null tracker everywhere else (nanochat's DummyWandb, Ray's setup_mlflow).

- The store defaults to `sqlite:///mlflow.db` in the working directory (MLflow 3's default,
  so a bare `mlflow ui` finds it); any tracking URI works, an `mlflow server` included.
- `check_tracking_uri` runs before any compute is spent and fails with one clear line.
- Every metric also goes to `metrics.jsonl` in the run directory first (each line with its
  step as `clips_seen`, also where that was not logged: `CLIPS_SEEN_LOGGED`); MLflow gets it
  from a thread of the tracker's own (`_Sender`), so training never waits on the store. An
  outage in the middle of a run holds the values back and sends them, in order, when the
  store answers again; what it has not taken when the run ends stays in `metrics.jsonl`, and
  `svt-ray tracking sync` sends it later.
- No message shows the password of a tracking URI's user:password@ (`hide_password`).
- On resume the tracker continues the same MLflow run and skips steps it already logged
  (in MLflow or in `metrics.jsonl`), so a restart from a checkpoint never logs a step twice;
  the steps `metrics.jsonl` has and MLflow lacks (a crash while values were held back) are sent.
- The MLflow step of every metric is `clips_seen`, so curves of runs with different batch
  sizes line up; the optimisation step is logged as the metric `step`.
- On a cluster the SQLite store behind `mlflow server` lives on the head's disk;
  `backup_sqlite_store` / `restore_sqlite_store` (`svt-ray tracking backup|restore`) carry it
  through the bucket to the next cluster's head.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from svt_ray.config import ConfigError

logger = logging.getLogger(__name__)

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
METRICS_FILE = "metrics.jsonl"  # every logged metric of a run, in its local log directory
# A metrics.jsonl line's "clips_seen" is its MLflow step; this key, false, says it is only
# that and not a logged metric too (the online kNN at the start, a summary): never sent.
CLIPS_SEEN_LOGGED = "clips_seen_logged"
METRICS_PER_CALL = 1000  # MLflow's limit on the metrics of one log_batch
HELD_VALUES_LIMIT = 1_000_000  # metric values held back in an outage (about 100 MB)
# MLflow errors that retrying cannot cure: the store answered and refused the call.
# Any other error (connection refused, timeout, 5xx, a locked database) is the store not
# answering, and the call is retried.
REFUSALS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
    "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND",
})  # fmt: skip


SQLITE_HEADER = b"SQLite format 3\x00"  # a SQLite database's first 16 bytes


class TrackingUnavailableError(ConfigError):
    """The tracking store cannot be used; raised before training starts. A ConfigError: the
    commands print it as one line (it names --tracking-uri and what to do), not a traceback."""


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` is relative to the current folder; Ray workers run elsewhere, so
    the driver pins it to an absolute path before handing it to them."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def viewing_hint(uri: str) -> str:
    """How to look at the runs of a tracking URI: a server's own page, or `mlflow ui` over a
    store (which refuses an http:// backend)."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {hide_password(uri)} (the MLflow server's UI)"
    return f"mlflow ui --backend-store-uri {shlex.quote(hide_password(uri))}"


def hide_password(text: object, uri: str | None = None) -> str:
    """`text` (a URI, or a message or error that quotes `uri`) with the password of its
    user:password@ shown as ***: no message prints it."""
    text = str(text)
    userinfo = urlparse(text if uri is None else uri).netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    return text.replace(f"{userinfo}@", f"{user}:***@") if password else text


def artifact_location_for(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file, not into whatever folder
    the process happens to run in; servers keep their own artifact root (None)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix) :]).resolve().parent / "mlruns").as_uri()
    return None


def experiment_id(client, experiment: str, tracking_uri: str) -> str:
    """The id of `experiment`, created (artifacts beside a SQLite database) if missing."""
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":  # MLflow refuses runs in it
        raise TrackingUnavailableError(
            f"MLflow experiment {experiment!r} in {hide_password(tracking_uri)} "
            "is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {found.experiment_id}` with "
            "MLFLOW_TRACKING_URI set to that store) or name another"
        )
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location_for(tracking_uri))


def check_tracking_uri(uri: str, timeout_s: float = 10.0, must_exist: bool = False) -> None:
    """Fail fast, with a message that says what to do, if `uri` cannot take a run (or, with
    `must_exist`, holds no database to read: MLflow would create an empty one)."""
    if not uri.strip():
        raise TrackingUnavailableError(
            "the tracking URI is empty; give sqlite:///mlflow.db or an http:// tracking server"
        )
    parsed = urlparse(uri)
    shown = hide_password(uri)
    if parsed.scheme == "sqlite":
        if not uri.startswith("sqlite:///"):  # sqlite://mlflow.db: SQLAlchemy refuses it late
            raise TrackingUnavailableError(
                f"tracking URI {uri}: a SQLite store is sqlite:/// and its path "
                "(sqlite:///mlflow.db, or sqlite:////abs/path/mlflow.db)"
            )
        _check_sqlite_file(uri, Path(uri.removeprefix("sqlite:///")), must_exist)
        return
    if parsed.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        # urllib takes user:password@ for part of the host name; MLflow (requests) sends it
        # as basic auth, and so does this check.
        host = parsed.netloc.rpartition("@")[2]
        request = urllib.request.Request(
            f"{parsed._replace(netloc=host).geturl().rstrip('/')}/health"
        )
        if parsed.username is not None:
            credentials = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
            request.add_header(
                "Authorization", "Basic " + base64.b64encode(credentials.encode()).decode()
            )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                if reply.status != 200:
                    raise TrackingUnavailableError(
                        f"tracking server {shown} answered {reply.status} on /health"
                    )
        except urllib.error.HTTPError as error:
            raise TrackingUnavailableError(
                f"tracking server {shown} answered {error.code} ({error.reason}) on /health; "
                "check the user and password in --tracking-uri, or pass another"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = hide_password(getattr(error, "reason", error), uri)
            raise TrackingUnavailableError(
                f"tracking server {shown} is unreachable ({reason}); start it with `mlflow "
                "server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000` "
                "or pass another --tracking-uri"
            ) from None
        return
    if parsed.scheme in ("", "file"):
        raise TrackingUnavailableError(
            f"tracking URI {uri!r}: MLflow 3 no longer writes file stores; use "
            "sqlite:///mlflow.db or an http:// tracking server"
        )
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2: MLflow's store is by dialect
    if scheme not in _tracking_schemes():  # htp://...: MLflow would fail on first use
        raise TrackingUnavailableError(
            f"tracking URI {shown}: MLflow has no store for scheme {parsed.scheme!r} (it has "
            f"{', '.join(sorted(s for s in _tracking_schemes() if s))})"
        )


def _check_sqlite_file(uri: str, path: Path, must_exist: bool) -> None:
    """A SQLite store's file: there when it must be, a SQLite database if it is there, and
    writable (or its folder, for a new one): MLflow retries a store it cannot write for a
    minute before it fails, and opens any other file as a database."""
    if must_exist and not path.is_file():
        raise TrackingUnavailableError(
            f"--tracking-uri {uri}: no MLflow database at {path}; pass the --tracking-uri "
            "the study or runs were recorded in"
        )
    if not path.parent.is_dir():
        raise TrackingUnavailableError(
            f"tracking URI {uri}: folder {path.parent} does not exist; create it or pass "
            "--tracking-uri sqlite:///mlflow.db"
        )
    if path.exists():
        try:
            with open(path, "rb") as file:
                header = file.read(16)
        except OSError as error:
            raise TrackingUnavailableError(
                f"tracking URI {uri}: cannot read {path} ({error.strerror or error})"
            ) from None
        if header and header != SQLITE_HEADER:
            raise TrackingUnavailableError(
                f"tracking URI {uri}: {path} is not a SQLite database; name another file"
            )
        tables = _sqlite_tables(path) if header else set()
        if tables and "experiments" not in tables:  # MLflow would add its 60 tables to it
            listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise TrackingUnavailableError(
                f"tracking URI {uri}: {path} is a SQLite database of something else (tables "
                f"{listed}), not an MLflow store; name another file"
            )
        if must_exist and not tables:  # MLflow would make an empty store of it
            raise TrackingUnavailableError(
                f"--tracking-uri {uri}: {path} holds no MLflow data (an empty file); pass the "
                "--tracking-uri the study or runs were recorded in"
            )
    writable = path if path.exists() else path.parent
    if not must_exist and not os.access(writable, os.W_OK):
        raise TrackingUnavailableError(
            f"tracking URI {uri}: {writable} is not writable; pass a --tracking-uri in a "
            "folder you can write"
        )


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of a SQLite database, opened read-only (nothing is created or changed)."""
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as store:
            rows = store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {name for (name,) in rows}
    except sqlite3.Error as error:
        raise TrackingUnavailableError(
            f"cannot read the SQLite database {path} ({error})"
        ) from None


def _tracking_schemes() -> set[str]:
    """The URI schemes MLflow has a tracking store for (plugins included)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):  # another MLflow: its own error will have to do
        return {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql",
                "databricks", "databricks-uc", "uc"}  # fmt: skip


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def cluster_tracking_uri(uri: str, node_ip: str, timeout_s: float = 5.0) -> str:
    """[driver] The tracking URI as the cluster's other nodes must use it.

    Train workers and Tune trials log from their own nodes, where `http://127.0.0.1:5000`
    names nothing. Given as loopback, the URI means the server on the driver's node (the head),
    which the other nodes reach at `node_ip` if the server listens there (`mlflow server --host
    0.0.0.0` in ray_cluster.yaml; the security group keeps it inside the cluster). If it does
    not answer there, the URI stays as given and a warning says that workers on other nodes
    keep their metrics in metrics.jsonl only; a SQLite URI gets the same warning.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        logger.warning(
            "tracking URI %s on a cluster: Train workers on other nodes cannot write to this "
            "node's SQLite file, so their metrics stay in metrics.jsonl on their node; run "
            "`mlflow server --host 0.0.0.0` on the head and pass --tracking-uri "
            "http://127.0.0.1:5000 (README, On a cluster)",
            uri,
        )
        return uri
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOOPBACK_HOSTS:
        return uri
    host = f"[{node_ip}]" if ":" in node_ip else node_ip
    userinfo = parsed.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + host
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    rewritten = parsed._replace(netloc=netloc).geturl()
    try:
        check_tracking_uri(rewritten, timeout_s)
    except TrackingUnavailableError:
        logger.warning(
            "the tracking server %s does not answer at this node's address (%s): Train workers "
            "on other nodes cannot reach it and keep their metrics in metrics.jsonl only; start "
            "it with `mlflow server --host 0.0.0.0` (the security group keeps it inside the "
            "cluster)",
            hide_password(uri),
            hide_password(rewritten, uri),
        )
        return uri
    logger.info(
        "tracking URI %s -> %s, which every node of the cluster reaches",
        hide_password(uri),
        hide_password(rewritten, uri),
    )
    return rewritten


def sqlite_file(database: str | Path) -> Path:
    """The file of a SQLite store given as a path or as `sqlite:///PATH`."""
    text = str(database)
    return Path(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text)


def store_state(database: Path) -> tuple[tuple[int, int], ...]:
    """(mtime, size) of a SQLite store's file and of its -wal file if there is one: a store in
    WAL mode (`mlflow migrate-filestore` makes one) commits to DATABASE-wal, and its file
    changes only when the log is checkpointed into it. A backup loop copies when this
    changed."""
    stat = database.stat()
    state = [(stat.st_mtime_ns, stat.st_size)]
    with contextlib.suppress(FileNotFoundError):  # none: not in WAL mode, or no connection
        wal = database.with_name(f"{database.name}-wal").stat()
        state.append((wal.st_mtime_ns, wal.st_size))
    return tuple(state)


class BackupRefused(ValueError):
    """A backup would replace a copy none of whose runs the store it is taken from has."""


def run_ids(database: Path, active_only: bool = False) -> set[str] | None:
    """The run ids of an MLflow SQLite store (only those not deleted, with `active_only`);
    None when the file cannot be read as one."""
    import sqlite3
    from contextlib import closing

    query = "SELECT run_uuid FROM runs" + (
        " WHERE lifecycle_stage = 'active'" if active_only else ""
    )
    try:
        with closing(sqlite3.connect(database)) as connection:
            return {row[0] for row in connection.execute(query)}
    except sqlite3.Error:
        return None


def backup_sqlite_store(database: str | Path, destination: str, force: bool = False) -> int:
    """Copy a SQLite tracking store, while a server may be writing to it, to `destination`
    (a path or any filesystem URI, e.g. s3://bucket/mlflow/mlflow.db); return its bytes.

    SQLite's online backup API gives a consistent snapshot (a plain file copy during a write
    can catch half a transaction); the snapshot is written to a hidden temporary file beside
    `destination` and renamed, so an interrupted backup leaves the previous one whole.

    Unless `force`, a `destination` that is a store with live runs of which this one has none
    is not replaced (BackupRefused): a head that started empty, its restore pointed elsewhere,
    would otherwise overwrite the real backup. Runs deleted and purged (`mlflow gc`) since the
    last backup leave the others shared, so they pass. The destination is fetched to compare
    them (once, for a bucket).
    """
    import sqlite3
    import tempfile

    import pyarrow.fs as pafs

    from data_prep.inputs import resolve_filesystem
    from data_prep.shards import write_file

    source = sqlite_file(database)
    if not source.is_file():
        raise FileNotFoundError(f"no SQLite tracking store at {source}")
    with tempfile.TemporaryDirectory(prefix="svt_tracking_backup_") as folder:
        snapshot = Path(folder) / source.name
        reader = sqlite3.connect(source, timeout=60)  # waits out a writer's lock
        writer = sqlite3.connect(snapshot)
        try:
            reader.backup(writer)
        finally:
            writer.close()
            reader.close()
        filesystem, path = resolve_filesystem(destination)
        if not force and filesystem.get_file_info(path).type == pafs.FileType.File:
            existing = Path(folder) / f"destination-{source.name}"  # a copy: never opened there
            with filesystem.open_input_stream(path) as stream, open(existing, "wb") as copy:
                while piece := stream.read(8 << 20):
                    copy.write(piece)
            kept = run_ids(existing, active_only=True) or set()
            if kept and not kept & (run_ids(snapshot) or set()):
                raise BackupRefused(
                    f"{destination} holds {len(kept)} run(s), none of which {source} has: not "
                    "replaced (was the store restored from it?)"
                )
        write_file(destination, snapshot)  # streamed: the store is never in memory whole
        return snapshot.stat().st_size


def restore_sqlite_store(source: str, database: str | Path) -> bool:
    """Copy a backup made by `backup_sqlite_store` to `database` if there is a backup and no
    database yet (a new head node); never overwrite a database. Return whether it copied."""
    import sqlite3
    from contextlib import closing

    import pyarrow.fs as pafs

    from data_prep.inputs import resolve_filesystem

    target = sqlite_file(database)
    if target.exists():
        logger.info("tracking store %s exists: kept, backup %s not restored", target, source)
        return False
    filesystem, path = resolve_filesystem(source)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        logger.info("no tracking store backup at %s yet: %s starts empty", source, target)
        return False
    with filesystem.open_input_stream(path) as stream:
        data = stream.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.restoring")
    partial.write_bytes(data)
    try:
        with closing(sqlite3.connect(partial)) as check:
            verdict = check.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as error:
        verdict = str(error)
    if verdict != "ok":
        partial.unlink()
        raise ValueError(f"{source} is not a sound SQLite database ({verdict}); not restored")
    partial.replace(target)
    logger.info("restored tracking store %s from %s (%d bytes)", target, source, len(data))
    return True


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class NullTracker:
    """What every rank but 0 gets: accepts everything, does nothing."""

    run_id: str | None = None
    last_logged: int = -1

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_summary(self, metrics: dict[str, float]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def close(self) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass


def plot_training_curves(metrics_file: str | Path, output: str | Path) -> Path | None:
    """Loss terms and collapse signals against clips seen, from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics_file(metrics_file)
    if not rows:
        return None
    rows.sort(key=lambda row: row["clips_seen"])
    clips = [row["clips_seen"] for row in rows]
    evaluated = [row for row in rows if "online_knn_top1" in row]
    panels = 3 if evaluated else 2
    figure, axes_row = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    losses, collapse = axes_row[:2]
    for name in ("loss", "loss_cross_view", "loss_motion"):
        losses.plot(clips, [row.get(name, float("nan")) for row in rows], label=name)
    losses.set(xlabel="clips seen", ylabel="cross-entropy", title="SVT loss")
    for name in ("collapse_uniform", "collapse_dominant", "teacher_feature_std"):
        collapse.plot(clips, [row.get(name, float("nan")) for row in rows], label=name)
    collapse.set(xlabel="clips seen", ylim=(0, 1.05), title="collapse signals (1 = collapsed)")
    if evaluated:
        knn = axes_row[2]
        for name in ("online_knn_top1", "online_knn_top5"):
            knn.plot([row["clips_seen"] for row in evaluated], [row[name] for row in evaluated],
                     marker="o", label=name.removeprefix("online_"))  # fmt: skip
        knn.set(xlabel="clips seen", ylabel="accuracy (%)", ylim=(0, 100),
                title="online kNN of the teacher")  # fmt: skip
    for axes in axes_row:
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return Path(output)


def read_metrics_file(metrics_file: str | Path) -> list[dict[str, float]]:
    """The lines of a metrics.jsonl; a line cut short by a crash is skipped."""
    path = Path(metrics_file)
    return metrics_rows(path.read_text().splitlines()) if path.is_file() else []


def metrics_rows(lines) -> list[dict[str, float]]:
    """The rows of metrics.jsonl lines (str or bytes); a blank line, or one cut short by a
    crash (and ended by the restart, `_end_cut_line`), is skipped."""
    rows = []
    for text in lines:
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return rows


def _end_cut_line(metrics_file: Path) -> None:
    """End a last line that a crash cut short, so that the next line appended stays whole
    (`read_metrics_file` skips the cut one)."""
    if not metrics_file.is_file() or metrics_file.stat().st_size == 0:
        return
    with open(metrics_file, "rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) != b"\n":
            file.write(b"\n")


def missing_metrics(client, run_id: str, lines: list[dict[str, float]], after: int | None):
    """MLflow Metrics for the values of `lines` (metrics.jsonl) that run `run_id` lacks.

    With `after`, the values of the lines past that step (a restart: MLflow's history ends
    there, so everything after it is missing, and no history is read). Without it, each key's
    history is read and compared (`svt-ray tracking sync`: holes anywhere).
    """
    from mlflow.entities import Metric

    if after is not None:
        lines = [line for line in lines if line["clips_seen"] > after]
        have: dict[str, set[int]] = collections.defaultdict(set)
    else:
        keys = {key for line in lines for key in logged_values(line)}
        have = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    found = []
    for line in lines:
        step, stamp = int(line["clips_seen"]), int(line["time"] * 1000)
        for key, value in logged_values(line).items():
            if step not in have[key]:
                found.append(Metric(key, float(value), stamp, step))
                have[key].add(step)
    return found


def logged_values(line: dict[str, Any]) -> dict[str, float]:
    """The metrics a metrics.jsonl line logged: not its time, nor its clips_seen where that is
    only the line's step (`CLIPS_SEEN_LOGGED`; training logs clips_seen as a metric, which
    the reports read). A line written before that key tells by type: the step was written as
    an int, training's clips_seen as a float."""
    marker_only = line.get(CLIPS_SEEN_LOGGED) is False or (
        CLIPS_SEEN_LOGGED not in line and isinstance(line.get("clips_seen"), int)
    )
    skipped = {"time", CLIPS_SEEN_LOGGED} | ({"clips_seen"} if marker_only else set())
    return {key: value for key, value in line.items() if key not in skipped}


def sync_metrics(tracking_uri: str, run_id: str, metrics_file: str | Path) -> list[int]:
    """Send run `run_id` the values of `metrics_file` that MLflow lacks (an outage that
    outlasted the run, values dropped while too many were held back); returns the steps
    (clips seen) it sent values of. Raises what MLflow raises if the store does not answer."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    missing = missing_metrics(client, run_id, read_metrics_file(metrics_file), after=None)
    for start in range(0, len(missing), METRICS_PER_CALL):
        client.log_batch(run_id, metrics=missing[start : start + METRICS_PER_CALL])
    return sorted({metric.step for metric in missing})


class _Sender:
    """The MLflow calls of one run, made in order on a thread of their own.

    Training only queues: a slow or absent store never holds up a step. A call the store
    does not answer (connection refused, timeout, a 5xx, a locked database) stays at the
    head of the queue and is retried after 2, 4, ... up to 60 s; the calls behind it wait,
    so the run's record in MLflow stays in order. A call the store refuses (an invalid value,
    a deleted run: `REFUSALS`) is dropped with a warning. Consecutive metric calls go to
    MLflow as one log_batch of up to 1000 values.
    """

    def __init__(self, uri: str, metrics_file: Path, retry_s: tuple[float, float] = (2.0, 60.0)):
        self.uri, self.metrics_file = uri, metrics_file
        self.retry_s = retry_s
        self._calls: collections.deque = collections.deque()  # (what, fn, args, kwargs, values)
        self._condition = threading.Condition()
        self._held_values = 0
        self._flushing = False  # someone waits in flush(): retry at the shortest delay
        self._stopped = False
        self._wake = threading.Event()  # cuts a retry delay short
        self._warned_full = False
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    def _shown(self, text: Any) -> str:
        """`text` (the URI, or an MLflow error, which quotes it) with no password in it."""
        return hide_password(text, self.uri)

    def put(self, what: str, function: Callable, *args, values: int = 0, **kwargs) -> None:
        """Queue `function(*args, **kwargs)`; `values` > 0 marks a log_batch of that many
        metrics (merged with its neighbours, counted against HELD_VALUES_LIMIT)."""
        with self._condition:
            if values and self._held_values + values > HELD_VALUES_LIMIT:
                if not self._warned_full:
                    logger.warning(
                        "MLflow at %s has not answered for so long that %d metric values are "
                        "held back; newer ones go to %s only until it answers (then "
                        "`svt-ray tracking sync` sends them)",
                        self._shown(self.uri), self._held_values, self.metrics_file,
                    )  # fmt: skip
                    self._warned_full = True
                return
            self._held_values += values
            self._calls.append((what, function, args, kwargs, values))
            self._condition.notify_all()

    def flush(self, timeout_s: float) -> int:
        """Wait until the store has taken every queued call, or `timeout_s` passed (retrying
        at the shortest delay meanwhile); returns the calls still queued."""
        with self._condition:
            self._flushing = True
            self._wake.set()
            try:
                self._condition.wait_for(lambda: not self._calls, timeout=timeout_s)
                return len(self._calls)
            finally:
                self._flushing = False

    def stop(self) -> None:
        """End the thread once its current call returns; what is still queued is dropped
        (it is in metrics.jsonl)."""
        with self._condition:
            self._stopped = True
            self._wake.set()
            self._condition.notify_all()

    def _next(self) -> tuple[str, Callable, tuple, dict, int, int] | None:
        """The head call (or the metric calls at the head, merged into one log_batch) and how
        many queued calls it covers; None once stopped. The calls stay queued until _done."""
        with self._condition:
            self._condition.wait_for(lambda: self._calls or self._stopped)
            if self._stopped:
                return None
            what, function, args, kwargs, values = self._calls[0]
            if not values:
                return what, function, args, kwargs, values, 1
            metrics, taken = [], 0
            for call in self._calls:
                if not call[4] or (metrics and len(metrics) + call[4] > METRICS_PER_CALL):
                    break
                metrics += call[3]["metrics"]
                taken += 1
            return what, function, args, {"metrics": metrics}, len(metrics), taken

    def _done(self, taken: int, values: int) -> None:
        with self._condition:
            for _ in range(taken):
                self._calls.popleft()
            self._held_values -= values
            self._condition.notify_all()

    def _run(self) -> None:
        delay, since = self.retry_s[0], None  # since: when the store stopped answering
        refused: set[str] = set()
        while (call := self._next()) is not None:
            what, function, args, kwargs, values, taken = call
            try:
                function(*args, **kwargs)
            except Exception as error:
                if getattr(error, "error_code", None) in REFUSALS:
                    if what not in refused:  # once per kind: a deleted run refuses them all
                        logger.warning(
                            "MLflow refused %s (%s); dropped it", what, self._shown(error)
                        )
                        refused.add(what)
                    self._done(taken, values)
                    continue
                if since is None:
                    since = time.monotonic()
                    logger.warning(
                        "MLflow %s at %s failed (%s); training goes on, and what MLflow has "
                        "not taken is held back and sent again every <= %.0f s (every metric "
                        "is also in %s)",
                        what, self._shown(self.uri), self._shown(error), self.retry_s[1],
                        self.metrics_file,
                    )  # fmt: skip
                self._wake.wait(self.retry_s[0] if self._flushing else delay)
                self._wake.clear()
                delay = min(2 * delay, self.retry_s[1])
                continue
            if since is not None:  # said before the call counts as done: a flush sees it
                logger.warning(
                    "MLflow at %s answers again after %.0f s; the values held back are sent",
                    self._shown(self.uri), time.monotonic() - since,
                )  # fmt: skip
                delay, since, self._warned_full = self.retry_s[0], None, False
            self._done(taken, values)


class MLflowTracker:
    """One MLflow run, addressed by id through MlflowClient (no global fluent state).

    Every call after the constructor goes through a `_Sender`: it returns at once, and
    `flush` / `finish` wait for the store (at most `flush_timeout_s`).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        local_dir: str | Path,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, Any] | None = None,
        flush_timeout_s: float = 60.0,
        reopen: bool = True,
    ):
        """`run_id` continues that run: RUNNING again until `finish`, or, with
        `reopen=False`, with its status untouched (results added to an ended run, which a
        process killed meanwhile must not leave RUNNING; end with `close`)."""
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.local_dir / METRICS_FILE
        _end_cut_line(self.metrics_file)
        self.flush_timeout_s = flush_timeout_s
        self.offline = False  # the store did not answer at the start: metrics.jsonl only
        lines = read_metrics_file(self.metrics_file)
        # The last step metrics.jsonl has, and the last one MLflow has or is sent: each gets
        # a step once. They differ after a restart on a node whose file ends earlier.
        self.last_written = max((int(line["clips_seen"]) for line in lines), default=-1)
        self.last_logged = -1
        self._sender: _Sender | None = None
        if run_id is None:
            experiment_id_ = experiment_id(self.client, experiment, tracking_uri)
            all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id_, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
            self._sender = _Sender(tracking_uri, self.metrics_file)
            return
        # A Train worker (or the driver after it): continue the run, never log a step twice.
        self.run_id = run_id
        try:
            if reopen:
                self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "loss")
        except Exception as error:  # e.g. a loopback URI on another node of a cluster
            self.offline = True
            logger.warning(
                "MLflow at %s is not reachable from this node (%s); training goes on and "
                "metrics stay in %s",
                hide_password(tracking_uri),
                hide_password(error, tracking_uri),
                self.metrics_file,
            )
            return
        self._sender = _Sender(tracking_uri, self.metrics_file)
        in_mlflow = max((m.step for m in history), default=-1)
        self.last_logged = max(in_mlflow, self.last_written)
        if self.last_logged > in_mlflow:  # held back when the last attempt ended
            caught_up = missing_metrics(self.client, run_id, lines, after=in_mlflow)
            self._send_metrics("log_metrics (catching up)", caught_up)

    def _safely(self, what: str, call, *args, **kwargs) -> None:
        if self._sender is not None:  # None: offline, every call would wait out retries
            self._sender.put(what, call, *args, **kwargs)

    def _send_metrics(self, what: str, metrics: list) -> None:
        """Queue `metrics` (MLflow Metrics) in log_batch-sized calls."""
        if self._sender is None:
            return
        for start in range(0, len(metrics), METRICS_PER_CALL):
            chunk = metrics[start : start + METRICS_PER_CALL]
            self._sender.put(
                what, self.client.log_batch, self.run_id, metrics=chunk, values=len(chunk)
            )

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._safely(
                "log_params", self.client.log_batch, self.run_id, params=items[start : start + 100]
            )

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._safely(
            "set_tags",
            self.client.log_batch,
            self.run_id,
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log at MLflow step `step` (clips seen), to metrics.jsonl and to MLflow, each unless
        it already has that step (a restarted worker redoes the steps after its checkpoint)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if step > self.last_written:
            self._write_line(step, now, metrics)
            self.last_written = step
        if step > self.last_logged:
            self._send_metrics(
                "log_metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()]
            )
            self.last_logged = step

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final values (evaluation results): logged once, at the run's last step, to
        metrics.jsonl too (a line of their own), so `svt-ray tracking sync` sends them if
        MLflow did not take them."""
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), max(self.last_logged, self.last_written, 0)
        self._write_line(step, now, metrics)
        self._send_metrics(
            "log_summary", [Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def _write_line(self, step: int, now_ms: int, metrics: dict[str, float]) -> None:
        """Append `metrics` to metrics.jsonl as a line of step `step` (its clips_seen)."""
        line = {"clips_seen": step, "time": now_ms / 1000, **metrics}
        if "clips_seen" in metrics:  # a float, as MLflow keeps it (`logged_values`)
            line["clips_seen"] = float(metrics["clips_seen"])
        else:  # the step, not a value logged: never sent to MLflow
            line[CLIPS_SEEN_LOGGED] = False
        with open(self.metrics_file, "a") as file:
            file.write(json.dumps(line) + "\n")

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._safely("log_artifact", self.client.log_artifact, self.run_id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        self._safely("log_text", self.client.log_text, self.run_id, text, name)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until MLflow has taken every call so far (at most `timeout_s`, default
        `flush_timeout_s`); False, with a warning that says what to do, if it has not."""
        if self._sender is None:
            return False
        left = self._sender.flush(self.flush_timeout_s if timeout_s is None else timeout_s)
        if left:
            logger.warning(
                "MLflow at %s has not taken %d call(s) of run %s; the metrics are in %s, and "
                "`svt-ray tracking sync` sends them once it answers",
                hide_password(self.tracking_uri), left, self.run_id,
                self.metrics_file,
            )  # fmt: skip
        return not left

    def close(self) -> bool:
        """flush(), then end the sending thread: nothing more is logged to this run here."""
        taken = self.flush()
        if self._sender is not None:
            self._sender.stop()
        return taken

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended (`status`), after everything logged before it, and close."""
        self._safely("finish", self.client.set_terminated, self.run_id, status)
        self.close()


def make_tracker(rank: int, **kwargs) -> MLflowTracker | NullTracker:
    """MLflow on rank 0, a NullTracker elsewhere: callers never test the rank themselves."""
    if rank != 0:
        return NullTracker()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # the _Sender retries too
    return MLflowTracker(**kwargs)
