"""ray_cluster.yaml: valid for the installed Ray's launcher, and closed to the world."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

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
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), name
    assert "IpPermissions" not in cluster["provider"].get("security_group", {})
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
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert "--storage s3://" in text and "--artifacts-destination s3://" in text
    assert cluster["provider"]["cache_stopped_nodes"] is False  # `ray down` stops the bill


def test_the_heads_mlflow_store_outlives_the_cluster(cluster, tmp_path):
    """The head's setup backs the server's SQLite store up to the bucket and a new head starts
    from that copy: run the yaml's own two commands, the bucket and home mapped to tmp_path."""
    import shlex

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from svt_ray.cli import app

    commands = cluster["head_setup_commands"]
    server = next(c for c in commands if "mlflow server" in c)
    store = server.split("--backend-store-uri ")[1].split()[0]
    restore = next(c for c in commands if "svt-ray tracking restore" in c)
    backup = next(c for c in commands if "svt-ray tracking backup" in c)
    assert commands.index(restore) < commands.index(server)  # before the server creates one
    assert "--every" in backup and "nohup" in backup  # keeps copying while the cluster runs

    def run(command: str, home: Path) -> None:
        command = command.replace("s3://YOUR-BUCKET", (tmp_path / "bucket").as_uri())
        command = command.replace("/home/ray", str(home))
        words = shlex.split(command[command.index("svt-ray") :].split(">")[0])
        if "--every" in words:  # one round of the loop
            del words[words.index("--every") : words.index("--every") + 2]
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, result.output

    old_head, new_head = tmp_path / "old", tmp_path / "new"
    old_head.mkdir()
    old_store = store.replace("/home/ray", str(old_head))
    client = MlflowClient(old_store)
    run_id = client.create_run(client.create_experiment("kept")).info.run_id
    run(restore, old_head)  # a first cluster: nothing to restore, the store stays
    run(backup, old_head)
    run(restore, new_head)  # the next cluster's head
    restored = MlflowClient(store.replace("/home/ray", str(new_head)))
    assert restored.get_run(run_id).info.experiment_id == client.get_run(run_id).info.experiment_id


def test_rerunning_the_heads_setup_keeps_a_running_mlflow_server(cluster, tmp_path):
    """`ray up --no-restart` reruns head_setup_commands to bring back a stopped server; the
    yaml's server command starts one only if nothing answers on its port."""
    import http.server
    import subprocess
    import threading

    from conftest import free_port

    server = next(c for c in cluster["head_setup_commands"] if "mlflow server" in c)
    check, _, start = server.partition(" || ")
    assert start.startswith("nohup mlflow server") and ":5000/health" in check

    port = free_port()
    command = server.rstrip(" &").replace("5000", str(port)).replace("/home/ray", str(tmp_path))
    command = command.replace("python -c", f"{sys.executable} -c", 1)

    def run(text: str) -> int:
        return subprocess.run(["bash", "-c", text], timeout=60).returncode

    assert run(check.replace("5000", str(port)).replace("python", sys.executable, 1)) != 0

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    answering = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    thread = threading.Thread(target=answering.serve_forever, daemon=True)
    thread.start()
    try:
        assert run(command) == 0
    finally:
        answering.shutdown()
    assert not (tmp_path / "mlflow.log").exists(), "a second server was started"
