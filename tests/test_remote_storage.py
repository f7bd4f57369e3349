"""Shards and checkpoints on object storage: data_prep, training, an interruption and its
resume against a local S3-compatible server (moto), addressed by pyarrow URIs alone."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time

import pytest
import ray.train
import torch
from factories import SHORT_RUN
from pyarrow import fs as pafs

import data_prep
from data_prep.inputs import STORE_TIMEOUT_ENV, InputError, resolve_filesystem
from svt_ray.config import ConfigError, load_config
from svt_ray.data import read_dataset_manifest
from svt_ray.evaluate import load_state
from svt_ray.runs import (
    PROGRESS_FILE,
    RUN_FILE,
    check_remote_storage,
    fetch_metrics,
    join_uri,
    read_json,
    recorded_config,
)
from svt_ray.tracking import read_metrics_file
from svt_ray.train import RunStoppedError, load_checkpoint, run_pretraining


def listing(filesystem: pafs.FileSystem, folder: str) -> set[str]:
    selector = pafs.FileSelector(folder, recursive=True)
    return {info.path.removeprefix(f"{folder}/") for info in filesystem.get_file_info(selector)}


def test_paths_in_a_uri_go_before_its_query():
    endpoint = "s3://svt/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(endpoint, "run", "progress.json") == (
        "s3://svt/runs/run/progress.json?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert join_uri("gs://svt/runs/", "run") == "gs://svt/runs/run"
    assert join_uri("/data/odd?name/", "run") == "/data/odd?name/run"  # local: no query


@pytest.fixture
def silent_endpoint():
    """host:port of a server that accepts connections and never answers (a firewall that
    drops, a wrong port on a busy host): pyarrow's S3 client waits ~100 s on it."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        with contextlib.suppress(OSError):  # the server closed at the end
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in held:
        connection.close()


def test_a_store_that_does_not_answer_is_an_error_in_seconds(silent_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv(STORE_TIMEOUT_ENV, "1")
    storage = f"s3://svt/runs?endpoint_override={silent_endpoint}&scheme=http&region=us-east-1"
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        check_remote_storage(storage)
    assert time.monotonic() - start < 10
    assert str(error.value) == (
        f"--storage {storage}: s3://svt did not answer in 1 s (pyarrow retries while the network "
        "or the credentials are missing); check that this machine reaches it and has credentials "
        "(README: 'Shards and checkpoints on object storage'), or set SVT_RAY_STORE_TIMEOUT_S "
        "to wait longer"
    )
    with pytest.raises(InputError, match="did not answer in 1 s"):  # asked again: not cached
        resolve_filesystem(join_uri(storage, "run", "progress.json"))
    for wrong in ("soon", "0", "-5", "inf"):  # 0 is no "no limit": it timed out at once
        monkeypatch.setenv(STORE_TIMEOUT_ENV, wrong)
        with pytest.raises(InputError, match=f"SVT_RAY_STORE_TIMEOUT_S='{wrong}': give a num"):
            resolve_filesystem(storage)


def test_s3_storage_and_data_that_cannot_be_used_are_named_before_ray(s3_server, tmp_path):
    """A bucket that does not exist, or an endpoint's URI without its scheme=http (an
    unquoted & in the shell drops it), were tracebacks; a --storage bucket that does not
    exist one after the MLflow run was made."""
    bucket, _ = pafs.FileSystem.from_uri(f"s3://svt?{s3_server}&allow_bucket_creation=true")
    bucket.create_dir("svt")
    with bucket.open_output_stream("svt/videos/a.mp4") as stream:
        stream.write(b"not a dataset")
    # A bucket it may write, checked by the trials of a study at once: one probe file each
    # (with one name, a trial deleted another's and that one failed: "cannot write there").
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: check_remote_storage(f"s3://svt/runs?{s3_server}"), range(24)))
    assert not bucket.get_file_info(pafs.FileSelector("svt/runs", allow_not_found=True))
    check_remote_storage(f"file://{tmp_path}/new/runs")  # a local URI: the folder is made
    assert (tmp_path / "new" / "runs").is_dir()
    with pytest.raises(ConfigError) as error:
        check_remote_storage(f"s3://no-such-bucket/runs?{s3_server}")
    assert str(error.value).startswith(f"--storage s3://no-such-bucket/runs?{s3_server}: cannot ")
    assert "The specified bucket does not exist" in str(error.value)
    without_scheme = s3_server.replace("&scheme=http", "")
    with pytest.raises(ConfigError, match=r"SSL .* needs scheme=http in the URI's query; quote"):
        check_remote_storage(f"s3://svt/runs?{without_scheme}")
    for data_path, message in [
        (f"s3://no-such-bucket/k400?{s3_server}", "there is no bucket 'no-such-bucket' (or "),
        (f"s3://svt/k400?{s3_server}", "k400?" + s3_server + " does not exist; check it for"),
        (f"s3://svt/videos?{s3_server}", f"`svt-ray prep VIDEOS 's3://svt/videos?{s3_server}'`"),
    ]:
        with pytest.raises(ConfigError) as error:
            read_dataset_manifest(data_path)
        assert message in str(error.value)


def test_the_online_knns_clips_are_decoded_into_and_read_from_s3(
    s3_server, synthetic_shards, monkeypatch
):
    """The online kNN's decoded clips live in the run's storage: on S3, written part by part
    by Ray Data tasks (the endpoint in the URI's query), read back as a local decode gives
    them."""
    import numpy as np

    from svt_ray import data

    bucket, _ = pafs.FileSystem.from_uri(f"s3://svt?{s3_server}&allow_bucket_creation=true")
    bucket.create_dir("svt")
    monkeypatch.setattr(data, "EVAL_PART_CLIPS", 3)
    monkeypatch.setattr(data, "EVAL_IN_PROCESS_S", 0.0)  # after the first part: Ray Data
    settings = data.eval_cache_settings("train", {"clip": (2, 16)}, 8, window_frames=32)
    folder = join_uri(f"s3://svt/runs?{s3_server}", "online_knn_clips", "k")
    (record,) = data.cache_eval_clips(str(synthetic_shards), {folder: settings}).values()
    assert record["num_clips"] == 8 and len(record["parts"]) >= 3
    assert listing(bucket, "svt/runs/online_knn_clips/k") == {"clips.json", *record["parts"]}
    expected = data.load_eval_clips(str(synthetic_shards), **settings)
    for key, value in data.read_eval_clips(folder).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_each_rank_reads_its_own_copy_of_a_remote_checkpoint(tmp_path, monkeypatch):
    # Ray's Checkpoint.as_directory shares one download folder per node, and a rank arriving
    # after another's download downloads again over the file the other is reading: a resume on
    # S3 failed with "PytorchStreamReader failed reading file data/N". Here a second rank loads
    # the same checkpoint (a pickled copy, as Ray hands each worker) in the middle of the
    # first one's read; the first one's file must stay as it was.
    (tmp_path / "checkpoint_00000007").mkdir()
    saved = {"step": 7, "weights": torch.arange(1000.0)}
    torch.save(saved, tmp_path / "checkpoint_00000007" / "state.pt")
    remote = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not local to Ray
    checkpoint = ray.train.Checkpoint("checkpoint_00000007", filesystem=remote)
    real_load, other_rank = torch.load, []

    def load_while_another_rank_loads(file, **kwargs):
        if other_rank:  # the other rank's own read
            return real_load(file, **kwargs)
        before = os.stat(file)
        other_rank.append(pickle.loads(pickle.dumps(checkpoint)))
        other_rank[0] = load_checkpoint(other_rank[0], "cpu")
        after = os.stat(file)  # FileNotFoundError: the other rank removed it
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
            before.st_ino,
            before.st_mtime_ns,
            before.st_size,
        ), "another rank's load rewrote the file this rank is reading"
        return real_load(file, **kwargs)

    monkeypatch.setattr(torch, "load", load_while_another_rank_loads)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's copies only
    (tmp_path / "tmp").mkdir()
    for state in (load_checkpoint(checkpoint, "cpu"), other_rank[0]):
        assert state["step"] == 7 and torch.equal(state["weights"], saved["weights"])
    leftovers = list((tmp_path / "tmp").glob("svt_checkpoint_*"))
    assert not leftovers, f"temporary copies left behind: {leftovers}"


@pytest.mark.slow
@pytest.mark.ray
def test_shards_checkpoints_and_resume_on_s3(
    tmp_path, mlflow_db, synthetic_videos, s3_server, monkeypatch
):
    # The endpoint travels inside the URIs (pyarrow query options) to the driver, data_prep's
    # tasks, Ray Data's read tasks and Ray Train's controller and workers.
    bucket, _ = pafs.FileSystem.from_uri(f"s3://svt?{s3_server}&allow_bucket_creation=true")
    bucket.create_dir("svt")
    shards, runs = f"s3://svt/shards?{s3_server}", f"s3://svt/runs?{s3_server}"
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a local path would show up here
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local metrics.jsonl goes here

    videos, _ = synthetic_videos
    code = data_prep.main(
        [str(videos), shards, "--short-side", "64", "--val-fraction", "0.2",
         "--max-videos-per-shard", "4", "--min-frames", "8"]
    )  # fmt: skip
    assert code == 0
    s3, _ = pafs.FileSystem.from_uri(shards)
    prepared = listing(s3, "svt/shards")
    assert {"manifest.json", "rejects.jsonl", "_state/plan.json"} <= prepared
    assert sum(name.endswith(".parquet") for name in prepared) == 5  # 20 clips, 4 per shard

    config = load_config(
        "tiny",
        overrides=[
            *SHORT_RUN,
            f"data.path={shards}",
            f"train.storage_path={runs}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "scaling.num_workers=2",
            "train.run_name=on-s3",
            "train.max_failures=0",
        ],
    )
    with pytest.raises(RunStoppedError, match=r"failed more than train.max_failures=0 times"):
        run_pretraining(config, fail_at_step=3, fail_rank=1)  # rank 1 is killed at step 3
    run_dir = join_uri(runs, "on-s3")
    assert read_json(join_uri(run_dir, "injected_failure_3.json")) == {"step": 3}
    assert read_json(join_uri(run_dir, PROGRESS_FILE)) == {"step": 2}
    assert "checkpoint_00000002/state.pt" in listing(s3, "svt/runs/on-s3")
    with pytest.raises(ConfigError, match="checkpoints up to step 2"):
        run_pretraining(config)  # progress.json on S3 says the run exists
    first_run_id = read_json(join_uri(run_dir, RUN_FILE))["mlflow_run_id"]
    assert len(read_metrics_file(fetch_metrics(tmp_path / "elsewhere", run_dir))) >= 2
    shutil.rmtree(tmp_path / "svt_ray_runs")  # rank 0 and the driver move to another node

    # `svt-ray pretrain --resume on-s3 --storage <runs>`: the recipe comes from run.json on S3.
    kept = recorded_config("on-s3", runs, ["train.keep_checkpoints=3"])  # the default is 2
    resumed = run_pretraining(kept, resume=True)
    steps = resumed.config.derived.total_steps
    assert steps == 6 and resumed.mlflow_run_id == first_run_id
    assert resumed.checkpoint_path == join_uri(run_dir, f"checkpoint_{steps:08d}")
    assert load_state(resumed.checkpoint_path)["step"] == steps  # read back through the URI
    assert read_json(join_uri(run_dir, PROGRESS_FILE)) == {"step": steps}
    stored = listing(s3, "svt/runs/on-s3")
    checkpoints = sorted(
        name for name in stored if name.startswith("checkpoint_0") and "/" not in name
    )
    assert checkpoints == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]
    assert {"run.json", "progress.json", "injected_failure_3.json"} <= stored

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["svt.resumed_at_step"] == "2"  # the workers restored the S3 checkpoint
    assert run.data.tags["svt.run_dir"] == run_dir
    logged = [metric.step for metric in client.get_metric_history(first_run_id, "loss")]
    assert logged == [4 * (i + 1) for i in range(steps)]  # each step once, across both attempts
    assert not any(tmp_path.glob("s3*")), "a URI was used as a local path"
    # rank 0's local metrics.jsonl continues the one the first attempt left in the run
    # directory, and the copy there is complete: the curves cover the whole run.
    (metrics,) = tmp_path.glob("svt_ray_runs/on-s3-*/metrics.jsonl")
    assert [line["step"] for line in read_metrics_file(metrics)] == list(range(1, steps + 1))
    with s3.open_input_stream("svt/runs/on-s3/metrics.jsonl") as stream:
        assert stream.read() == metrics.read_bytes()
    artifacts = [artifact.path for artifact in client.list_artifacts(first_run_id)]
    assert "training_curves.png" in artifacts
