"""ray_cluster.yaml checked against Ray's own schema and the cluster launcher's validation (no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_own_validation():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs, defaults filled in
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert (
        types["gpu_worker"]["resources"]["GPU"] == 1
        and types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"]
    )
    assert any("--metrics-export-port" in c for c in config["head_start_ray_commands"])
    with pytest.raises(jsonschema.ValidationError):  # the validator is live: a typo is caught
        jsonschema.validate(dict(config, max_wrokers=3), schema)
