"""The cluster configs cannot rot: ray_config.yaml validates against the schema the installed Ray ships,
the KubeRay manifests have the structure a GPU job needs, and the job inside the RayJob is a valid job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"


@pytest.fixture(scope="module")
def ray_config() -> dict:
    return yaml.safe_load((ROOT / "ray_config.yaml").read_text())


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_config_validates_against_rays_schema(ray_config):
    import jsonschema

    jsonschema.validate(ray_config, _ray_schema())  # raises with the offending path on any mistake


def test_ray_config_passes_the_launchers_own_checks(ray_config):
    """What `ray up` does before it contacts AWS: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(ray_config))


def test_the_schema_check_catches_a_typo(ray_config):
    import jsonschema

    broken = {**ray_config, "idle_timeout_minute": 5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


def test_ray_config_shape_for_13b_jobs(ray_config):
    assert ray_config["provider"]["type"] == "aws"
    types = ray_config["available_node_types"]
    head = types[ray_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu = [t for name, t in types.items() if name != ray_config["head_node_type"] and t["resources"].get("GPU")]
    assert len(gpu) == 1
    worker = gpu[0]
    assert worker["resources"]["GPU"] * worker["max_workers"] >= 8  # 8 GPUs across 1-2 nodes
    assert 1 <= worker["max_workers"] <= 2 and worker["min_workers"] == 0
    assert ray_config["max_workers"] >= worker["max_workers"]
    assert re.match(r"(p4d|p4de|p5|g5|g6)\.", worker["node_config"]["InstanceType"])
    disk = worker["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    assert disk >= 200  # a model cache for 13B checkpoints
    for t in types.values():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    setup = "\n".join(ray_config["setup_commands"])
    assert "pip install" in setup and "torch==" in setup and "download.pytorch.org/whl/cu" in setup
    assert re.search(r"pip install .*-e /home/ubuntu/qvlm", setup)
    assert "/home/ubuntu/qvlm" in ray_config["file_mounts"]


def test_ray_config_pins_the_installed_ray(ray_config):
    import ray

    assert f"ray[default]=={ray.__version__}" in "\n".join(ray_config["setup_commands"])


def test_every_ray_config_field_is_commented():
    """A newcomer's config: each mapping key in the file has a comment on its line or just above it
    (keys inside a node type's node_config block count through the comment that opens the block)."""
    lines = (ROOT / "ray_config.yaml").read_text().splitlines()
    top = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+:", line)]
    for i in top:
        assert "#" in lines[i] or lines[i - 1].lstrip().startswith("#"), f"line {i + 1} has no comment: {lines[i]}"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in head_containers)
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
                                           for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    total = sum(int(c["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
                for g in gpu_groups for c in g["template"]["spec"]["containers"])
    assert total >= 8
    for g in gpu_groups:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["groupName"]
    import ray

    assert spec["rayVersion"] == ray.__version__


def test_raycluster_manifest():
    (cluster,) = _docs("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])


def test_rayjob_manifest_runs_qvlm_on_a_valid_job(tmp_path):
    from jobs.spec import load_job

    docs = _docs("rayjob.yaml")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    entry = job["spec"]["entrypoint"]
    assert re.match(r"qvlm-submit --address auto \S+\.yaml$", entry)
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    # the job file the entrypoint names comes from a ConfigMap mounted on the head, and it validates
    path = Path(entry.split()[-1])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for c in head["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == str(path.parent))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
    (tmp_path / path.name).write_text(config_map["data"][path.name])
    spec = load_job(tmp_path / path.name)
    assert spec.model.path.startswith("s3://") and spec.output.uri.startswith("s3://")
    assert spec.resources.workers == 8 and spec.resources.gpus_per_worker == 1


def test_plan_names_the_placement_strategy(tmp_path, tiny_llava_dir):
    from typer.testing import CliRunner

    from jobs.cli import app

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "p", "model": {"path": str(tiny_llava_dir)},
                                   "calibration": {"samples": 8, "max_length": 64, "batch_size": 4},
                                   "output": {"uri": str(tmp_path / "out")}}))
    runner = CliRunner()
    packed = runner.invoke(app, ["plan", str(job)])
    assert packed.exit_code == 0 and "strategy PACK" in packed.output, packed.output
    spread = runner.invoke(app, ["plan", str(job), "--set", "resources.placement=spread"])
    assert spread.exit_code == 0 and "strategy SPREAD" in spread.output, spread.output
