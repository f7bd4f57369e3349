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


def test_checkpoints_and_mlflow_artifacts_point_at_shared_storage(cluster):
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert "--storage s3://" in text and "--artifacts-destination s3://" in text
    assert cluster["provider"]["cache_stopped_nodes"] is False  # `ray down` stops the bill
