"""cluster.yaml / cluster-gcp.yaml: valid for `ray up`, and shaped the way raysweep needs.

Validation is Ray's own, offline: ``prepare_config`` (what ``ray up`` does first: merge with the
provider's defaults.yaml, merge setup commands, check docker, fill per-type min/max workers) and
``validate_config`` (the autoscaler's JSON schema ``ray-schema.json`` plus its cross-field checks).
``ray up`` would then call the cloud (key pairs, IAM, subnets, instance-type lookup); that part is
not exercised here. Every shell command of the file is also checked with ``bash -n``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILES = {"aws": ROOT / "cluster.yaml", "gcp": ROOT / "cluster-gcp.yaml"}
TOFU = ROOT / "search_spaces" / "tofu.yaml"
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
A100_INSTANCE = {"aws": "p4d.24xlarge", "gcp": "a2-highgpu-8g"}

PROVIDERS = [p for p, path in CLUSTER_FILES.items() if path.is_file()]


def load(provider: str) -> dict:
    return yaml.safe_load(CLUSTER_FILES[provider].read_text())


def prepared(provider: str) -> dict:
    """The config as `ray up` sees it after Ray's offline preparation, validated by Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(provider)))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError when invalid
    return config


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def gpu_worker(config: dict) -> dict:
    gpus = [t for t in worker_types(config).values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpus) == 1, "expected exactly one GPU worker node type"
    return gpus[0]


def instance_type(node: dict, provider: str) -> str:
    return node["node_config"]["InstanceType" if provider == "aws" else "machineType"]


def commands(config: dict, key: str) -> list[str]:
    return list(config.get(key) or [])


def all_commands(config: dict) -> list[str]:
    return [c for key in COMMAND_KEYS for c in commands(config, key)]


def start_flag_resources(cmd: str) -> dict:
    match = re.search(r"--resources='(\{.*?\})'", cmd)
    return json.loads(match.group(1)) if match else {}


@pytest.fixture(scope="module", params=PROVIDERS)
def provider(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def config(provider) -> dict:
    return prepared(provider)


def test_aws_cluster_file_exists():
    assert CLUSTER_FILES["aws"].is_file()


def test_ray_validates_config(config, provider):
    assert config["provider"]["type"] == provider
    assert config["head_node_type"] in config["available_node_types"]


def test_ray_rejects_a_broken_config(provider):
    """The validation is real: the same file with a typo'd key fails Ray's schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(load(provider))
    broken["available_node_types"][broken["head_node_type"]]["min_worker"] = 0  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_provides_trial_driver_and_no_cpu(config):
    head = head_type(config)
    assert head["resources"].get("trial_driver", 0) >= 1
    # CPU 0: Train workers and CPU tasks never land on the head.
    assert head["resources"].get("CPU") == 0
    assert head.get("max_workers", 0) == 0
    for node in worker_types(config).values():
        assert "trial_driver" not in node["resources"], "trial drivers belong on the head only"


def test_head_start_flags_match_node_type(config):
    head = head_type(config)
    starts = [c for c in commands(config, "head_start_ray_commands") if "ray start" in c]
    assert len(starts) == 1
    cmd = starts[0]
    assert "--head" in cmd
    assert start_flag_resources(cmd) == {"trial_driver": head["resources"]["trial_driver"]}
    assert "--num-cpus=0" in cmd
    for c in commands(config, "worker_start_ray_commands"):
        assert "trial_driver" not in c


def test_gpu_worker_is_autoscaled_a100(config, provider):
    node = gpu_worker(config)
    assert instance_type(node, provider) == A100_INSTANCE[provider]
    assert node["resources"]["GPU"] == 8
    assert node["resources"].get("accelerator_type:A100") == 1
    assert node["min_workers"] == 0
    assert node["max_workers"] >= 1
    assert config["max_workers"] >= node["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_enough_trial_drivers_to_fill_every_gpu_node(config):
    """tofu.yaml's trial shape x max nodes: the head must not cap concurrency below the GPUs."""
    res = yaml.safe_load(TOFU.read_text())["search"]["resources"]
    node = gpu_worker(config)
    per_trial_gpus = res["num_workers"] * res.get("gpus_per_worker", 1)
    per_trial_cpus = res["num_workers"] * res.get("cpus_per_worker", 1)
    trials_per_node = min(node["resources"]["GPU"] // per_trial_gpus, node["resources"]["CPU"] // per_trial_cpus)
    assert trials_per_node >= 1, "a tofu.yaml trial does not fit on one GPU node"
    assert head_type(config)["resources"]["trial_driver"] >= trials_per_node * node["max_workers"]


def test_project_synced_and_installed_with_gpu_extra(config):
    assert config["file_mounts"].get("~/raysweep") == "."
    worker_setup = " ".join(commands(config, "worker_setup_commands"))
    head_setup = " ".join(commands(config, "head_setup_commands"))
    for setup in (worker_setup, head_setup):
        assert re.search(r'DS_BUILD_OPS=0 pip install .*-e "\$HOME/raysweep\[gpu\]"', setup), setup
    # Workers get a CUDA build of torch (PyPI's Linux wheel), the head a CPU one (pytorch.org's cpu
    # index), both pinned before the project; the workers check that CUDA is there.
    assert re.search(r"pip install \"torch==[\d.]+\" --index-url https://pypi\.org/simple", worker_setup)
    assert "whl/cpu" not in worker_setup
    assert "assert torch.version.cuda" in worker_setup
    assert re.search(r"pip install \"torch==[\d.]+\" --index-url https://download\.pytorch\.org/whl/cpu", head_setup)
    assert worker_setup.index("torch==") < worker_setup.index("raysweep[gpu]")


def test_nothing_bound_to_all_interfaces(config):
    text = "\n".join(all_commands(config))
    assert "0.0.0.0" not in text
    head_start = "\n".join(commands(config, "head_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in head_start
    mlflow = [c for c in commands(config, "head_start_ray_commands") if "mlflow server" in c]
    assert len(mlflow) == 1
    host = re.search(r"--host\s+\$\{?(\w+)\}?\s", mlflow[0])
    assert host, "MLflow's --host must be a variable holding the head's private IP"
    assert re.search(host.group(1) + r"=\"\$\(hostname -I \| awk '\{print \$1\}'\)\"", mlflow[0]), (
        "MLflow must bind to the head's private IP (hostname -I), not 0.0.0.0 or a public address"
    )
    assert "sqlite:////home/ubuntu/mlflow.db" in mlflow[0]
    # Artifacts where the settings block says (bucket or the head's disk), proxied by the server.
    assert re.search(r"--artifacts-destination \$ARTIFACTS\b", mlflow[0])
    assert 'ARTIFACTS="${RAYSWEEP_MLFLOW_ARTIFACTS:-$HOME/mlflow-artifacts}"' in mlflow[0]


def test_commands_are_valid_bash(config):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    for cmd in all_commands(config):
        result = subprocess.run([bash, "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"bash -n failed on:\n{cmd}\n{result.stderr}"


def test_aws_has_no_placeholder_to_find():
    """Nothing to find by reading: no REPLACE_ME; the AMI resolves from AWS's public SSM parameter
    and the worker profile is named, not an account-specific ARN."""
    text = CLUSTER_FILES["aws"].read_text()
    assert "REPLACE_ME" not in text
    raw = load("aws")
    for node in raw["available_node_types"].values():
        assert node["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/")
    assert gpu_worker(raw)["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}


def test_settings_block_is_at_the_top(provider):
    """Region and bucket live in one marked place before anything else (cluster.yaml)."""
    text = CLUSTER_FILES[provider].read_text()
    raw = load(provider)
    assert "artifact_bucket" in raw["metadata"]["raysweep"]
    if provider == "aws":
        first_key = next(line for line in text.splitlines() if line and not line.startswith(("#", " ")))
        assert first_key == "provider:" and text.index("YOUR SETTINGS (edit here only)") < text.index("provider:")
        assert text.index("metadata:") < text.index("cluster_name:")


def _settings_command(config: dict) -> str:
    return next(c for c in commands(config, "head_setup_commands") if "artifact_bucket" in c)


@pytest.mark.parametrize("bucket", ["", "my-bucket"])
def test_head_exports_storage_and_artifacts_from_the_settings(config, provider, bucket, tmp_path):
    """Run the head's settings command in a scratch HOME against a bootstrap config like Ray's
    (the cluster config as JSON in ~/ray_bootstrap_config.yaml)."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    boot = copy.deepcopy(config)
    boot["metadata"]["raysweep"]["artifact_bucket"] = bucket
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(boot))
    (tmp_path / ".bashrc").write_text("")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    bindir = tmp_path / "bin"  # `python` as the nodes' venv has it
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    result = subprocess.run([bash, "-c", _settings_command(config)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    probe = subprocess.run([bash, "-c", 'source "$HOME/.raysweep_env"; echo "$RAYSWEEP_STORAGE|$RAYSWEEP_MLFLOW_ARTIFACTS|$MLFLOW_TRACKING_URI"'],
                           env=env, capture_output=True, text=True)
    storage, artifacts, uri = probe.stdout.strip().split("|")
    scheme = {"aws": "s3", "gcp": "gs"}[provider]
    if bucket:
        assert (storage, artifacts) == (f"{scheme}://my-bucket/ray_results", f"{scheme}://my-bucket/mlflow")
    else:
        assert (storage, artifacts) == (f"{tmp_path}/ray_results", f"{tmp_path}/mlflow-artifacts")
    assert re.fullmatch(r"http://\S+:5000", uri)
    assert "raysweep_env" in (tmp_path / ".bashrc").read_text()


def _tested_torch() -> str:
    """The torch version everything is tested on: the README's install line."""
    match = re.search(r"pip install torch==([\d.]+)", (ROOT / "README.md").read_text())
    assert match, "README.md names no tested torch version"
    return match.group(1)


def test_torch_on_every_node_is_the_tested_version_within_pyproject(provider):
    """Head (CPU) and GPU workers pin the same torch: the README's tested version, inside
    pyproject.toml's torch requirement (the GPU-cost issue owns that pin)."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    text = "\n".join(all_commands(load(provider)))
    pins = set(re.findall(r"torch==([\w.+]+)", text))
    assert pins == {_tested_torch()}, pins
    assert torch_req.specifier.contains(_tested_torch()), (str(torch_req.specifier), _tested_torch())
    for key in ("head_setup_commands", "worker_setup_commands"):
        setup = "\n".join(commands(load(provider), key))
        assert f'pip install "torch=={_tested_torch()}"' in setup and f'echo "torch=={_tested_torch()}"' in setup


def test_no_cluster_file_pins_another_torch():
    """One torch version: every cluster file that pins torch (cluster-local.yaml, the fake
    multi-node rehearsal, installs nothing today) pins the tested one, and pyproject's range
    holds it."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    files = sorted(ROOT.glob("cluster*.yaml"))
    assert {f.name for f in files} >= {"cluster.yaml", "cluster-local.yaml"}
    for path in files:
        pins = set(re.findall(r"torch==([\w.+]+)", path.read_text()))
        assert pins <= {_tested_torch()}, (path.name, pins)
        assert all(torch_req.specifier.contains(p) for p in pins), (path.name, pins, str(torch_req.specifier))


def test_gcp_placeholders_are_marked():
    """GCP needs a project id, which has no default: it stays a marked placeholder."""
    if "gcp" not in PROVIDERS:
        pytest.skip("no cluster-gcp.yaml")
    assert "REPLACE_ME_PROJECT_ID" in load("gcp")["provider"]["project_id"]


def test_gcp_gpu_node_terminates_on_host_maintenance():
    """GCE rejects live migration of GPU VMs; `scheduling` is an object in the GCE API."""
    if "gcp" not in PROVIDERS:
        pytest.skip("no cluster-gcp.yaml")
    node = gpu_worker(prepared("gcp"))
    scheduling = node["node_config"]["scheduling"]
    assert isinstance(scheduling, dict) and scheduling["onHostMaintenance"] == "TERMINATE"


def test_cluster_local_is_cluster_yaml_in_miniature():
    """cluster-local.yaml (the fake multi-node rehearsal) has the same shape: a head with
    trial_driver and CPU 0, one autoscaled worker type, valid for Ray's autoscaler schema."""
    from ray.autoscaler._private.util import validate_config

    local = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    validate_config(local)
    assert local["provider"]["type"] == "fake_multinode"
    head = local["available_node_types"][local["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["trial_driver"] >= 2
    workers = [t for n, t in local["available_node_types"].items() if n != local["head_node_type"]]
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["max_workers"] >= 1
    assert "trial_driver" not in workers[0]["resources"]
