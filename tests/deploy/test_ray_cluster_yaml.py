"""deploy/ray/azure-gpu.yaml checked offline against the installed Ray: the cluster launcher's schema, and every
Azure parameter against the ARM template that Ray's Azure provider deploys; then what the YAML promises (GPU
workers from zero on Spot, the Ubuntu HPC image, token auth with no token in the file, the bootstrap scripts)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
RAY_DEPLOY = REPO / "deploy" / "ray"
CLUSTER_YAML = RAY_DEPLOY / "azure-gpu.yaml"
BOOTSTRAP = REPO / "deploy" / "bootstrap"
AZURE_PROVIDER = Path(ray.autoscaler.__file__).parent / "_private" / "_azure"
VM_TEMPLATE = AZURE_PROVIDER / "azure-vm-template.json"

IMAGE = {"imagePublisher": "microsoft-dsvm", "imageOffer": "ubuntu-hpc", "imageSku": "2204", "imageVersion": "latest"}
# What YAML gives for each ARM parameter type.
ARM_TYPES = {"string": str, "securestring": str, "int": int, "bool": bool, "object": dict, "array": list}
# Microsoft.Compute/virtualMachines accepts these; the provider's template passes them through unchecked.
AZURE_PRIORITIES = {"Regular", "Low", "Spot"}
AZURE_EVICTION_POLICIES = {"Deallocate", "Delete"}
# How the YAML's commands run the bootstrap scripts, and how the scripts read their settings.
BOOTSTRAP_SCRIPT = re.compile(r"deploy/bootstrap/([\w-]+\.sh)$")
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.DOTALL)
VARIABLE_USE = re.compile(r"\$\{?([A-Za-z_]\w*)")
SEPARATORS = {";", "&", "&&", "||", "|"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def template_parameters() -> dict:
    return json.loads(VM_TEMPLATE.read_text())["parameters"]


def provider_source() -> str:
    return (AZURE_PROVIDER / "node_provider.py").read_text() + (AZURE_PROVIDER / "config.py").read_text()


def provider_set_parameters() -> set[str]:
    """Template parameters that the provider fills in itself, over whatever a node config says."""
    found = set(re.findall(r'(?:template_params|azure_arm_parameters)\["(\w+)"\]\s*=', provider_source()))
    assert {"vmName", "msi", "subnet"} <= found, f"the provider's code has changed: found {sorted(found)}"
    return found


def provider_only_keys() -> set[str]:
    """azure_arm_parameters keys the provider reads and removes before deploying the template."""
    return set(re.findall(r'template_params\.pop\("(\w+)"', provider_source()))


def node_arm_parameters(cluster: dict) -> list[tuple[str, dict]]:
    """(where, parameters) of every azure_arm_parameters mapping in the YAML."""
    found = [(f"available_node_types.{name}.node_config.azure_arm_parameters",
              node["node_config"].get("azure_arm_parameters", {}))
             for name, node in cluster["available_node_types"].items()]
    if "azure_arm_parameters" in cluster["provider"]:
        found.append(("provider.azure_arm_parameters", cluster["provider"]["azure_arm_parameters"]))
    return found


def worker_types(cluster: dict) -> dict:
    return {n: t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]}


def commands(cluster: dict, *sections: str) -> list[str]:
    return [cmd for section in sections for cmd in cluster.get(section, [])]


def ray_start(cluster: dict, section: str) -> str:
    starts = [c for c in cluster[section] if "ray start" in c]
    assert len(starts) == 1, f"{section}: expected one `ray start`, got {starts}"
    return starts[0]


def bootstrap_calls(cmds: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(script, variables set on its command line) for every deploy/bootstrap script that the commands run."""
    calls = []
    for cmd in cmds:
        lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        simple: list[str] = []
        for word in [*lexer, ";"]:
            if word in SEPARATORS:
                calls += [(m.group(1), assignments(simple[:i])) for i, w in enumerate(simple)
                          if (m := BOOTSTRAP_SCRIPT.search(w))]
                simple = []
            else:
                simple.append(word)
    return calls


def assignments(words: list[str]) -> dict[str, str]:
    """NAME=value words (`env NAME=value`, or before the command) as a mapping."""
    return dict(m.groups() for w in words if (m := ASSIGNMENT.match(w)))


def script_reads(script: str, seen: set[str] | None = None) -> set[str]:
    """Variables that a bootstrap script expands, with those of the scripts it sources or runs (not comments)."""
    seen = set() if seen is None else seen
    seen.add(script)
    code = "\n".join(line for line in (BOOTSTRAP / script).read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    names = set(VARIABLE_USE.findall(code))
    for other in set(re.findall(r"\b([\w-]+\.sh)\b", code)) - seen:
        if (BOOTSTRAP / other).is_file():
            names |= script_reads(other, seen)
    return names


def unread_variables(calls: list[tuple[str, dict[str, str]]]) -> list[tuple[str, str]]:
    """(script, variable) for each variable passed to a script that the script never reads."""
    return [(script, name) for script, env in calls for name in env if name not in script_reads(script)]


# Ray's own checks


def test_cluster_yaml_passes_ray_schema(cluster):
    # As `ray up` does: Azure's defaults filled in, setup commands merged, then Ray's JSON schema.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_provider_is_azure(cluster):
    assert cluster["provider"]["type"] == "azure"
    assert {"location", "resource_group"} <= cluster["provider"].keys()


def test_arm_parameters_are_template_parameters(cluster, template_parameters):
    allowed = template_parameters.keys() | provider_only_keys()
    for where, params in node_arm_parameters(cluster):
        unknown = params.keys() - allowed
        assert not unknown, f"{where}: {sorted(unknown)} are not parameters of {VM_TEMPLATE.name} ({sorted(allowed)})"


def test_arm_parameter_types_and_allowed_values(cluster, template_parameters):
    for where, params in node_arm_parameters(cluster):
        for key, value in params.items():
            declared = template_parameters.get(key)
            if declared is None:
                continue
            expected = ARM_TYPES[declared["type"].lower()]
            # bool is an int in Python; an ARM int must not be given as true/false
            assert isinstance(value, expected) and not (expected is int and isinstance(value, bool)), (
                f"{where}.{key}: {value!r} is not of the template's type {declared['type']}")
            if "allowedValues" in declared:
                allowed = declared["allowedValues"]
                assert value in allowed, f"{where}.{key}: {value!r} not in {allowed}"


def test_no_parameter_that_the_provider_overwrites(cluster):
    overwritten = provider_set_parameters()
    for where, params in node_arm_parameters(cluster):
        replaced = sorted(params.keys() & overwritten)
        assert not replaced, f"{where}: {replaced} are replaced by the provider; set them under provider: instead"


# What the deployment promises


def test_every_node_runs_the_ubuntu_hpc_image(cluster):
    for name, node in cluster["available_node_types"].items():
        params = node["node_config"]["azure_arm_parameters"]
        assert {k: params.get(k) for k in IMAGE} == IMAGE, name


def test_gpu_workers_scale_from_zero(cluster):
    workers = worker_types(cluster)
    assert workers, "no worker node type"
    for name, node in workers.items():
        assert node["min_workers"] == 0, name
        assert 1 <= node["max_workers"] <= cluster["max_workers"], name
        assert node["resources"].get("GPU", 0) >= 1, name
        assert node["node_config"]["azure_arm_parameters"]["vmSize"].startswith("Standard_NC"), name


def test_head_runs_no_training(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0


def test_gpu_workers_are_spot_and_deleted_on_eviction(cluster):
    for name, node in worker_types(cluster).items():
        params = node["node_config"]["azure_arm_parameters"]
        assert params["priority"] == "Spot" and params["priority"] in AZURE_PRIORITIES, name
        assert params["evictionPolicy"] in AZURE_EVICTION_POLICIES, name
        assert isinstance(params["billingProfile"]["maxPrice"], (int, float)), name


def test_only_the_head_has_a_public_address(cluster):
    provider = cluster["provider"]
    assert provider["use_internal_ips"] is True and provider["use_external_head_ip"] is True


def test_every_vm_uses_one_existing_identity(cluster):
    # With both keys the provider uses this identity instead of creating one per cluster.
    assert cluster["provider"]["msi_name"] and cluster["provider"]["msi_resource_group"]


def test_ray_starts_with_token_auth_and_metrics_port(cluster):
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = ray_start(cluster, section)
        assert "RAY_AUTH_MODE=token ray start" in start, section
        assert "--metrics-export-port=8080" in start, section
    head = ray_start(cluster, "head_start_ray_commands")
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    # the dashboard and Jobs API only through `ray dashboard`'s SSH tunnel
    assert "--dashboard-host=127.0.0.1" in head


def test_token_is_fetched_on_every_node_before_ray_starts(cluster):
    # setup_commands run on the head and on every worker, before the start commands.
    fetch = [env for script, env in bootstrap_calls(cluster["setup_commands"]) if script == "fetch-token.sh"]
    assert len(fetch) == 1
    env = fetch[0]
    assert env["SHARDRUN_TOKEN_FILE"] == "$HOME/.ray/auth_token"  # Ray's default token file
    assert env["SHARDRUN_KEY_VAULT_NAME"] and env["SHARDRUN_TOKEN_SECRET_NAME"]
    # a Key Vault that cannot be read fails `ray up` after a few minutes instead of hanging it
    assert int(env["SHARDRUN_TOKEN_ATTEMPTS"]) > 0
    assert any("export RAY_AUTH_MODE=token" in c for c in cluster["setup_commands"]), "login shells need token mode"


def test_monitoring_gives_tmp_ray_to_the_user_that_runs_ray(cluster):
    # Under `ray up` Ray runs as the SSH login user; the scripts' default user would own /tmp/ray instead.
    monitoring = [env for script, env in bootstrap_calls(cluster["head_setup_commands"]) if script == "monitoring.sh"]
    assert len(monitoring) == 1
    assert monitoring[0].get("SHARDRUN_USER") == "$(id -un)"


def test_head_installs_the_azure_sdk_of_rays_defaults(cluster):
    # The head's autoscaler imports Ray's Azure provider; Ray's defaults name the SDK versions it was tested with.
    defaults = yaml.safe_load((Path(ray.autoscaler.__file__).parent / "azure" / "defaults.yaml").read_text())
    pins = set(re.findall(r"\b(azure-[\w-]+|msrest\w*)==(\S+)", " ".join(defaults["head_setup_commands"])))
    assert pins, "Ray's Azure defaults install no SDK any more"
    ours = set(re.findall(r"\b(azure-[\w-]+|msrest\w*)==(\S+)", " ".join(cluster["head_setup_commands"])))
    assert ours == pins


def test_no_token_in_any_command(cluster):
    every = commands(cluster, "initialization_commands", "setup_commands", "head_setup_commands",
                     "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    assert not [c for c in every if "RAY_AUTH_TOKEN=" in c]


def test_bootstrap_scripts_exist(cluster):
    every = commands(cluster, "setup_commands", "head_setup_commands", "worker_setup_commands")
    scripts = sorted(set(re.findall(r"~/shardrun/(deploy/bootstrap/[\w.-]+)", " ".join(every))))
    assert scripts, "the YAML runs no bootstrap script"
    if not BOOTSTRAP.is_dir():
        pytest.skip(f"{BOOTSTRAP.relative_to(REPO)} is not in this checkout yet; the YAML calls {scripts}")
    missing = [s for s in scripts if not (REPO / s).is_file()]
    assert not missing, f"the YAML calls {missing}, which deploy/bootstrap does not have"


def test_every_variable_passed_to_a_bootstrap_script_is_one_it_reads(cluster):
    every = commands(cluster, "initialization_commands", "setup_commands", "head_setup_commands",
                     "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    calls = bootstrap_calls(every)
    assert {script for script, _ in calls} >= {"install.sh", "fetch-token.sh", "monitoring.sh"}
    if not BOOTSTRAP.is_dir():
        pytest.skip(f"{BOOTSTRAP.relative_to(REPO)} is not in this checkout yet")
    assert not unread_variables(calls), "the YAML passes variables that deploy/bootstrap does not read"


def test_the_variable_check_catches_old_names():
    # the names deploy/ray used before the bootstrap scripts settled on theirs
    old = ["sudo env SHARDRUN_SRC=$HOME/shardrun SHARDRUN_VENV=/v bash ~/shardrun/deploy/bootstrap/install.sh",
           "KEY_VAULT_NAME=kv RAY_AUTH_TOKEN_PATH=$HOME/t bash ~/shardrun/deploy/bootstrap/fetch-token.sh && ls"]
    assert unread_variables(bootstrap_calls(old)) == [
        ("install.sh", "SHARDRUN_SRC"), ("fetch-token.sh", "KEY_VAULT_NAME"), ("fetch-token.sh", "RAY_AUTH_TOKEN_PATH")]


def test_file_mounts_are_paths_of_this_repo(cluster):
    # `ray up` runs from the repo root (deploy/ray/README.md); the mount carries the bootstrap scripts.
    assert cluster["file_mounts"] == {"~/shardrun": "."}
    assert ".gitignore" in cluster["rsync_filter"]


def test_no_secret_values_in_deploy_ray():
    hex_secret = re.compile(r"\b[0-9a-fA-F]{32,}\b")
    for path in sorted(p for p in RAY_DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not hex_secret.search(text), f"{path.name}: a long hex string looks like a token"
        assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)", text), f"{path.name}: RAY_AUTH_TOKEN set to a value"
