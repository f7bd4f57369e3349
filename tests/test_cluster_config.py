"""ray_cluster.yaml: valid for the installed Ray's launcher, closed to the world, its nodes
able to reach the bucket; and what svt-ray says of paths only the driver's node sees."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import free_port
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _commands(cluster: dict, *keys: str) -> str:
    return "\n".join(line for key in keys for line in cluster.get(key, []))


def test_matches_the_schema_shipped_with_ray(cluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    broken = {**cluster, "available_node_types": {**cluster["available_node_types"]}}
    broken["available_node_types"]["gpu_worker"] = {
        **cluster["available_node_types"]["gpu_worker"],
        "resources": {"GPU": 0.5},
    }
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        jsonschema.validate(broken, schema)


def test_ray_up_preparation_accepts_it(cluster):
    """What `ray up` does before it talks to the cloud: merge provider defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(cluster)))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_image_matches_the_client_ray_and_python(cluster):
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{python}-gpu"


def test_nothing_is_opened_to_the_world(cluster):
    head = _commands(cluster, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head  # dashboard and Jobs API: localhost only
    # Every node names the user's security group: Ray's default one opens SSH to everyone.
    # (Ray reads provider.security_group, and its IpPermissions, only for a node type that
    # names no group, so nothing else about groups is checked here.)
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), name
    # MLflow: every node logs to it, so it listens beyond loopback, kept inside the cluster by
    # the security group; nothing widens its Host-header and CORS defaults.
    mlflow = _commands(cluster, "head_setup_commands")
    assert "mlflow server --host 0.0.0.0" in mlflow
    assert "--allowed-hosts" not in mlflow and "--cors-allowed-origins" not in mlflow
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert text.count("0.0.0.0") == 1  # that server line alone


def test_token_authentication_stays_on(cluster):
    starts = _commands(cluster, "head_start_ray_commands", "worker_start_ray_commands")
    all_commands = _commands(
        cluster, "setup_commands", "head_setup_commands", "initialization_commands"
    )
    assert "RAY_AUTH_MODE=disabled" not in starts + all_commands
    assert starts.count("RAY_AUTH_MODE=token ray start") == 2
    # `ray start` makes no token (Ray 2.60: "Token authentication is enabled but no
    # authentication token was found"): the user's goes to every node, where Ray looks for it
    # (~/.ray/auth_token of the containers' user, ray), and the README says how it is made and
    # that clients send it only with RAY_AUTH_MODE=token.
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    readme = (ROOT / "README.md").read_text()
    assert "ray get-auth-token --generate" in readme
    assert "export RAY_AUTH_MODE=token" in readme


def test_checkpoints_and_mlflow_artifacts_point_at_shared_storage(cluster):
    """The yaml's MLflow server keeps artifacts in the bucket; checkpoints and shards are the
    jobs' flags, so the README's cluster commands are checked for them."""
    server = next(c for c in cluster["head_setup_commands"] if "mlflow server" in c)
    assert "--artifacts-destination s3://" in server
    assert cluster["provider"]["cache_stopped_nodes"] is False  # `ray down` stops the bill
    jobs = [job for job in _readme_cluster_commands() if job.startswith("ray job submit")]
    training = [job for job in jobs if "svt-ray pretrain" in job or "studies/" in job]
    assert len(training) == 2, jobs
    for job in training:
        assert "--storage s3://" in job and "--data s3://" in job, job


def _readme_cluster_commands() -> list[str]:
    """The commands of the README's first code block under "On a cluster", one a line."""
    section = (ROOT / "README.md").read_text().split("\n## On a cluster\n")[1]
    block = section.split("```bash\n")[1].split("```")[0]
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]


def test_every_worker_can_reach_the_bucket(cluster):
    """Ray's AWS setup gives the head an instance profile (its default, with S3 access) and
    the workers none: their Ray Data readers, prep tasks and Train workers could read no
    s3:// shard and write no checkpoint. Each worker type names one (boto3's run_instances
    takes node_config as it is); as shipped, the one Ray makes for the head."""
    from ray.autoscaler._private.aws.config import DEFAULT_RAY_INSTANCE_PROFILE

    for name, node_type in cluster["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        if name == cluster["head_node_type"]:
            assert profile is None  # `ray up` makes and gives the default (it launches workers)
        else:
            assert profile == {"Name": DEFAULT_RAY_INSTANCE_PROFILE}, name


def test_ray_sizes_every_nodes_shared_memory(cluster):
    """Ray sizes a container's /dev/shm for its object store unless run_options set
    --shm-size, and caps the object store at 95% of /dev/shm: --shm-size=16g held every node's
    store to ~15 GB."""
    docker = cluster["docker"]
    options = [*docker.get("run_options", []), *docker.get("head_run_options", [])]
    options += docker.get("worker_run_options", [])
    for node_type in cluster["available_node_types"].values():
        options += node_type.get("docker", {}).get("worker_run_options", [])
    assert not any("--shm-size" in option for option in options), options
    assert not docker.get("disable_shm_size_detection")


def test_what_git_ignores_stays_off_the_nodes(cluster, tmp_path):
    """file_mounts copies this checkout with rsync and the yaml's rsync options: nothing that
    .gitignore lists (runs, data, synthetic videos, MLflow stores) nor .git goes to the nodes."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    options = {key: cluster.get(key) for key in ("rsync_exclude", "rsync_filter")}
    arguments = SSHCommandRunner._create_rsync_filter_args(None, options)  # Ray's own
    assert arguments[-2:] == ["--filter", "dir-merge,- .gitignore"]
    if not shutil.which("rsync"):
        pytest.skip("rsync is not installed")
    checkout = tmp_path / "checkout"
    (checkout / "svt_ray").mkdir(parents=True)
    (checkout / "svt_ray" / "model.py").write_text("")
    (checkout / ".git").mkdir()
    (checkout / ".git" / "HEAD").write_text("")
    shutil.copyfile(ROOT / ".gitignore", checkout / ".gitignore")
    ignored = [".git"]
    for line in (ROOT / ".gitignore").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name = line.strip().replace("*", "x").rstrip("/")
        for folder in (checkout, checkout / "svt_ray"):
            if line.endswith("/"):
                (folder / name).mkdir()
                (folder / name / "file").write_text("")
            else:
                (folder / name).write_text("")
        ignored += [name, f"svt_ray/{name}"]
    copy = tmp_path / "node"
    subprocess.run(["rsync", "-a", *arguments, f"{checkout}/", str(copy)], check=True)
    assert (copy / "svt_ray" / "model.py").exists()
    assert [name for name in ignored if (copy / name).exists()] == []


def test_the_heads_mlflow_store_outlives_the_cluster(cluster, tmp_path, empty_mlflow_store):
    """The head's setup backs the server's SQLite store up to the bucket and a new head starts
    from that copy. The yaml's own commands run in bash, in their order, the bucket, home and
    port mapped to tmp_path and a free port, a listening socket standing in for the server:
    on a first cluster the backup loop starts before the server has made the database, and
    waits for it instead of stopping."""
    commands = cluster["head_setup_commands"]
    server = next(c for c in commands if "mlflow server" in c)
    restore = next(c for c in commands if "svt-ray tracking restore" in c)
    backup = next(c for c in commands if "svt-ray tracking backup" in c)
    assert commands.index(restore) < commands.index(server) < commands.index(backup)
    assert "--every" in backup and "nohup" in backup  # keeps copying while the cluster runs
    port = str(free_port())
    bin_folder = os.path.dirname(sys.executable)  # svt-ray's, with this Python
    environment = {**os.environ, "PATH": bin_folder + os.pathsep + os.environ["PATH"]}

    def run(command: str, home: Path) -> str:
        command = command.replace("s3://YOUR-BUCKET", (tmp_path / "bucket").as_uri())
        command = command.replace("/home/ray", str(home)).replace("5000", port)
        command = command.replace("sleep 5", "sleep 0.2")
        done = subprocess.run(
            ["bash", "-c", command], env=environment, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    old_head, new_head = tmp_path / "old", tmp_path / "new"
    old_head.mkdir()
    new_head.mkdir()
    copy = tmp_path / "bucket" / "mlflow-backup" / "mlflow.db"
    assert "unchanged" in run(restore, old_head)  # a first cluster: nothing to restore
    assert not (old_head / "mlflow.db").exists()
    run(backup, old_head)  # before the server has made the database
    loop = int((old_head / "mlflow-backup.pid").read_text())
    listening = socket.socket()
    try:
        deadline = time.monotonic() + 4  # a `svt-ray tracking backup` that stops takes ~1 s
        while time.monotonic() < deadline and _alive(loop):
            time.sleep(0.1)
        assert _alive(loop), (old_head / "mlflow-backup.log").read_text()
        assert not copy.exists()
        shutil.copyfile(empty_mlflow_store, old_head / "mlflow.db")  # what the server makes
        client = MlflowClient(f"sqlite:///{old_head / 'mlflow.db'}")
        run_id = client.create_run(client.create_experiment("kept")).info.run_id
        listening.bind(("127.0.0.1", int(port)))
        listening.listen()  # the server answers: the loop's first round copies the store
        deadline = time.monotonic() + 60
        while not copy.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert copy.exists(), (old_head / "mlflow-backup.log").read_text()
    finally:
        listening.close()
        if _alive(loop):
            os.kill(loop, signal.SIGTERM)
    assert "restored" in run(restore, new_head)  # the next cluster's head
    restored = MlflowClient(f"sqlite:///{new_head / 'mlflow.db'}")
    assert restored.get_run(run_id).info.experiment_id == client.get_run(run_id).info.experiment_id


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a finished child of an exited shell is reaped by init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not status.exists() or status.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_stopped_mlflow_server_is_brought_back_without_a_second_one(cluster, tmp_path):
    """A plain `ray up` skips the setup commands when the yaml is unchanged, so the README
    gives the yaml's server command to `ray exec`; it starts a server only if nothing listens
    on its port."""
    server = next(c for c in cluster["head_setup_commands"] if "mlflow server" in c)
    assert "'" not in server  # quoted as it is in `ray exec ray_cluster.yaml '...'`
    assert f"ray exec ray_cluster.yaml '{server}'" in _readme_cluster_text()
    check, _, start = server.partition(" || ")
    assert start.startswith("nohup mlflow server") and "/dev/tcp/127.0.0.1/5000" in check

    port = str(free_port())
    command = server.rstrip(" &").replace("5000", port).replace("/home/ray", str(tmp_path))

    def run(text: str) -> int:
        return subprocess.run(["bash", "-c", text], timeout=60).returncode

    assert run(check.replace("5000", port)) != 0
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", int(port)))
        listening.listen()
        assert run(command) == 0
    assert not (tmp_path / "mlflow.log").exists(), "a second server was started"


def _readme_cluster_text() -> str:
    return (ROOT / "README.md").read_text().split("\n## On a cluster\n")[1].split("\n## ")[0]


def test_paths_named_by_a_file_uri_on_the_drivers_own_disk_are_named_on_a_cluster(
    tmp_path, monkeypatch, caplog
):
    from svt_ray import cluster

    kinds = {str(tmp_path / "runs"): "ext4"}
    monkeypatch.setattr(cluster, "_filesystem_type", lambda path: kinds.get(path))
    with caplog.at_level(logging.WARNING, logger="svt_ray.cluster"):
        cluster.warn_node_local_paths({
            "--storage": (tmp_path / "runs").as_uri(), "--data": "s3://bucket/k400",
        })  # fmt: skip
    assert [_named(record) for record in caplog.records] == [
        f"--storage {(tmp_path / 'runs').as_uri()} is on this node's own disk (ext4)"
    ]


def test_prep_on_a_cluster_names_an_input_or_output_on_the_drivers_own_disk(
    tmp_path, monkeypatch, caplog
):
    """Its video tasks and shard writers run on every node: a local OUTPUT scatters the shards
    over the nodes' disks. Said before Ray starts, only when the prep joins a cluster."""
    import argparse

    import ray

    from data_prep import cli as prep
    from svt_ray import cluster

    class RayStarted(Exception):
        pass

    def no_ray(*args, **kwargs):
        raise RayStarted

    kinds = {str(tmp_path / "raw"): "ext4", str(tmp_path / "shards"): "xfs"}
    monkeypatch.setattr(cluster, "_filesystem_type", lambda path: kinds.get(path))
    monkeypatch.setattr(cluster, "init_address", lambda address: "local")
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(prep, "_process", no_ray)  # where a Ray is already up
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    said = {}
    for address in ("auto", None):
        args = argparse.Namespace(
            address=address, num_cpus=None, input=str(tmp_path / "raw"),
            output=str(tmp_path / "shards"),
        )  # fmt: skip
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="svt_ray.cluster"),
            pytest.raises(RayStarted),
        ):
            prep._run_on_ray(args, *[None] * 7)
        said[address] = [_named(record) for record in caplog.records]
    assert said == {
        "auto": [
            f"INPUT {tmp_path / 'raw'} is on this node's own disk (ext4)",
            f"OUTPUT {tmp_path / 'shards'} is on this node's own disk (xfs)",
        ],
        None: [],
    }


def _named(record: logging.LogRecord) -> str:
    """A node-local path warning up to the filesystem it names."""
    return record.getMessage().partition("):")[0] + ")"
