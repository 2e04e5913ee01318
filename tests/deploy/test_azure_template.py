"""deploy/azure/main.json checked offline: checkov, and what matters evaluated for real.

A small evaluator of ARM template expressions (the functions the template uses; reference(), resourceId()
and the like come out as opaque names) turns the template into the properties Azure would receive for a
given set of parameters, so the tests look at values (the Spot settings with Spot and without, the custom
data a VM boots with) rather than at the spelling of expressions.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.timeout(120)

AZURE = REPO / "deploy" / "azure"
TEMPLATE = AZURE / "main.json"
EXAMPLE_PARAMETERS = AZURE / "main.parameters.example.json"
CHECKOV = REPO / ".tools" / "checkov" / "bin" / "checkov"
PLACEHOLDER = "__SHARDRUN_BOOTSTRAP_ENV__"

VMSS = "Microsoft.Compute/virtualMachineScaleSets"
VM = "Microsoft.Compute/virtualMachines"
NSG = "Microsoft.Network/networkSecurityGroups"
ROLE_IDS = {
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1": "Storage Blob Data Reader",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
}
# Values for the parameters that have no default.
REQUIRED = {
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly test@example",
    "sshSourceCidr": "203.0.113.7/32",
    "shardrunSource": "git+https://github.com/example/shardrun@v0.1.0",
}


# -- an evaluator for the template's expressions ------------------------------------------------------


class Opaque(str):
    """A value only Azure knows (a resource id, a reference()): its text names where it came from."""

    def __getattr__(self, name):  # property access on it: reference(...).clientId
        if name.startswith("__"):
            raise AttributeError(name)
        return Opaque(f"{self}.{name}")


_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+)|(?P<name>[A-Za-z_]\w*)|(?P<punct>[(),.\[\]]))")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"cannot read the expression at {text[pos:pos + 40]!r}")
        out.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    return out


class Template:
    """main.json with parameter values: `value(x)` evaluates any part of it."""

    def __init__(self, template: dict, parameters: dict):
        self.template = template
        self.parameters = {}
        for name, spec in template["parameters"].items():
            if name in parameters:
                self.parameters[name] = parameters[name]
            elif "defaultValue" in spec:
                self.parameters[name] = self.value(spec["defaultValue"])
            else:
                raise KeyError(f"parameter {name} has no default and no value")
        self._variables = {}

    def value(self, node):
        if isinstance(node, dict):
            return {self.value(k): self.value(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.value(v) for v in node]
        if isinstance(node, str) and node.startswith("[") and not node.startswith("[["):
            tokens = _tokens(node[1:-1])
            result, rest = self._expr(tokens)
            assert not rest, f"unread tokens {rest} in {node}"
            return result
        return node

    def variable(self, name: str):
        if name not in self._variables:
            self._variables[name] = self.value(self.template["variables"][name])
        return self._variables[name]

    def _expr(self, tokens):
        kind, text = tokens[0]
        if kind == "string":
            value, rest = text[1:-1].replace("''", "'"), tokens[1:]
        elif kind == "number":
            value, rest = int(text), tokens[1:]
        elif kind == "name" and tokens[1][1] == "(":
            args, rest = [], tokens[2:]
            while rest[0][1] != ")":
                arg, rest = self._expr(rest)
                args.append(arg)
                if rest[0][1] == ",":
                    rest = rest[1:]
            value, rest = self._call(text, args), rest[1:]
        else:
            raise ValueError(f"unexpected {text!r}")
        while rest and rest[0][1] in (".", "["):
            if rest[0][1] == ".":
                key, rest = rest[1][1], rest[2:]
            else:
                key, rest = self._expr(rest[1:])
                rest = rest[1:]
            value = getattr(value, key) if isinstance(value, Opaque) else value[key]
        return value, rest

    def _call(self, name: str, a: list):
        functions = {
            "parameters": lambda: self.parameters[a[0]],
            "variables": lambda: self.variable(a[0]),
            "if": lambda: a[1] if a[0] else a[2],
            "equals": lambda: a[0] == a[1],
            "not": lambda: not a[0],
            "empty": lambda: len(a[0]) == 0,
            "true": lambda: True,
            "false": lambda: False,
            "null": lambda: None,
            "createObject": lambda: dict(zip(a[0::2], a[1::2], strict=True)),
            "json": lambda: json.loads(a[0]),
            "format": lambda: re.sub(r"\{(\d+)\}", lambda m: str(a[1 + int(m.group(1))]), a[0]),
            "base64": lambda: base64.b64encode(a[0].encode()).decode(),
            "replace": lambda: a[0].replace(a[1], a[2]),
            "toLower": lambda: a[0].lower(),
            "take": lambda: a[0][: a[1]],
            "endsWith": lambda: a[0].endswith(a[1]),
            "uniqueString": lambda: hashlib.sha256("|".join(a).encode()).hexdigest()[:13],
            "resourceGroup": lambda: {"id": "/subscriptions/sub/resourceGroups/rg", "location": "eastus"},
            "subscription": lambda: {"tenantId": "tenant", "subscriptionId": "sub"},
            "environment": lambda: {"suffixes": {"keyvaultDns": ".vault.azure.net", "storage": "core.windows.net"}},
        }
        if name in functions:
            return functions[name]()
        return Opaque(f"{name}({', '.join(map(str, a))})")  # resourceId, reference, guid, ...

    def resources(self, type_: str) -> list[dict]:
        """Every resource of a type that is deployed with these parameters, evaluated."""
        out = []
        for resource in self.template["resources"]:
            if resource["type"] == type_ and self.value(resource.get("condition", True)):
                out.append(self.value(resource))
        return out

    def resource(self, type_: str) -> dict:
        (found,) = self.resources(type_)
        return found


def template_json() -> dict:
    return json.loads(TEMPLATE.read_text())


def evaluated(**parameters) -> Template:
    return Template(template_json(), {**REQUIRED, **parameters})


def custom_data_files(custom_data: str) -> tuple[dict, dict[str, str]]:
    """(the cloud-init document, {path on the VM: content}) of a VM's base64 customData."""
    document = yaml.safe_load(base64.b64decode(custom_data))
    files = {}
    for entry in document["write_files"]:
        raw = base64.b64decode(entry["content"])
        files[entry["path"]] = (gzip.decompress(raw) if entry["encoding"] == "gz+b64" else raw).decode()
    return document, files


# -- the template as ARM JSON ------------------------------------------------------------------------


def test_template_is_an_arm_template_whose_expressions_parse():
    template = template_json()
    assert template["$schema"].endswith("/deploymentTemplate.json#")
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", template["contentVersion"])
    for resource in template["resources"]:
        assert {"type", "apiVersion", "name"} <= set(resource), resource.get("name")
    expressions = []

    def collect(node):
        if isinstance(node, dict):
            for key, value in node.items():
                collect(key)
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
        elif isinstance(node, str) and node.startswith("[") and not node.startswith("[["):
            expressions.append(node)

    collect({k: template[k] for k in ("parameters", "variables", "resources", "outputs")})
    names = {"parameters": set(template["parameters"]), "variables": set(template["variables"])}
    for expression in expressions:
        assert expression.endswith("]"), expression
        _tokens(expression[1:-1])
        for kind, name in re.findall(r"\b(parameters|variables)\('([^']*)'\)", expression):
            assert name in names[kind], f"{expression} uses the undefined {kind[:-1]} {name!r}"
    # every parameter is used, and every variable
    text = json.dumps({k: template[k] for k in ("variables", "resources", "outputs")})
    for kind, defined in names.items():
        unused = {n for n in defined if f"{kind}('{n}')" not in text}
        assert not unused, f"unused {kind}: {unused}"


def test_the_whole_template_evaluates_for_spot_and_regular_workers():
    for priority in ("Regular", "Spot"):
        t = evaluated(workerPriority=priority)
        for resource in t.template["resources"]:
            t.value(resource)
        assert t.value(t.template["outputs"])


def test_example_parameters_name_real_parameters_and_all_required_ones():
    example = json.loads(EXAMPLE_PARAMETERS.read_text())
    assert example["$schema"].endswith("/deploymentParameters.json#")
    parameters = template_json()["parameters"]
    given = set(example["parameters"])
    assert given <= set(parameters), given - set(parameters)
    required = {name for name, spec in parameters.items() if "defaultValue" not in spec}
    assert required <= given, required - given
    assert required == set(REQUIRED)


def test_generated_cloud_init_in_the_template_is_current():
    result = subprocess.run([sys.executable, str(AZURE / "build.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- network: SSH is the only way in -----------------------------------------------------------------


def inbound_rules(t: Template) -> list[dict]:
    return [rule["properties"] | {"name": rule["name"]} for rule in t.resource(NSG)["properties"]["securityRules"]
            if rule["properties"]["direction"] == "Inbound"]


def test_only_ssh_from_the_parameter_range_comes_in_from_outside_the_subnet():
    t = evaluated()
    subnet = t.parameters["subnetPrefix"]
    allowed = [r for r in inbound_rules(t) if r["access"] == "Allow"]
    outside = [r for r in allowed if r["sourceAddressPrefix"] != subnet]
    assert len(outside) == 1, outside
    (ssh,) = outside
    assert ssh["sourceAddressPrefix"] == REQUIRED["sshSourceCidr"]
    assert (ssh["protocol"], ssh["destinationPortRange"]) == ("Tcp", "22")
    assert ssh["destinationAddressPrefix"] == t.parameters["headPrivateIp"]
    inside = [r for r in allowed if r["sourceAddressPrefix"] == subnet]
    assert all(r["destinationAddressPrefix"] == subnet for r in inside)
    # the last word is a deny of everything, ahead of Azure's AllowVnetInBound (65000)
    deny = [r for r in inbound_rules(t) if r["access"] == "Deny"]
    assert any(r["sourceAddressPrefix"] == "*" and r["destinationPortRange"] == "*" and r["protocol"] == "*"
               and r["priority"] < 65000 for r in deny)
    assert max(r["priority"] for r in allowed) < min(r["priority"] for r in deny)


def test_the_security_group_guards_the_subnet_and_only_the_head_has_a_public_address():
    t = evaluated()
    (vnet,) = t.resources("Microsoft.Network/virtualNetworks")
    (subnet,) = vnet["properties"]["subnets"]
    assert "networkSecurityGroups" in subnet["properties"]["networkSecurityGroup"]["id"]
    # workers reach PyPI through the NAT gateway, never through a default outbound address
    assert subnet["properties"]["defaultOutboundAccess"] is False
    assert "natGateways" in subnet["properties"]["natGateway"]["id"]
    public_ips = t.template["resources"]
    names = [r["name"] for r in public_ips if r["type"] == "Microsoft.Network/publicIPAddresses"]
    assert names == ["[variables('natIpName')]", "[variables('headIpName')]"]
    assert not t.resources("Microsoft.Network/loadBalancers")
    vmss_nic = t.resource(VMSS)["properties"]["virtualMachineProfile"]["networkProfile"]
    for config in vmss_nic["networkInterfaceConfigurations"]:
        for ip in config["properties"]["ipConfigurations"]:
            assert "publicIPAddressConfiguration" not in ip["properties"]


def test_storage_and_key_vault_take_the_subnet_and_the_operator_only():
    t = evaluated()
    for type_ in ("Microsoft.Storage/storageAccounts", "Microsoft.KeyVault/vaults"):
        acls = t.resource(type_)["properties"]["networkAcls"]
        assert acls["defaultAction"] == "Deny"
        assert [rule["value"] for rule in acls["ipRules"]] == ["203.0.113.7"]
        assert len(acls["virtualNetworkRules"]) == 1
    storage = t.resource("Microsoft.Storage/storageAccounts")["properties"]
    assert storage["allowSharedKeyAccess"] is False and storage["allowBlobPublicAccess"] is False
    assert storage["isHnsEnabled"] is True
    assert t.resource("Microsoft.KeyVault/vaults")["properties"]["enableRbacAuthorization"] is True


# -- no secret anywhere ------------------------------------------------------------------------------

_SECRET_PARAMETER = re.compile(r"password|secret(?!name)|token(?!secretname)|apikey|accountkey|sas", re.IGNORECASE)


def test_no_parameter_carries_a_secret():
    for name, spec in template_json()["parameters"].items():
        assert not _SECRET_PARAMETER.search(name), f"parameter {name} looks like it carries a secret"
        assert spec["type"].lower() not in ("securestring", "secureobject"), name


def test_custom_data_holds_no_token_and_no_key():
    for priority in ("Regular", "Spot"):
        t = evaluated(workerPriority=priority)
        profiles = [t.resource(VM)["properties"]["osProfile"],
                    t.resource(VMSS)["properties"]["virtualMachineProfile"]["osProfile"]]
        for profile in profiles:
            assert "adminPassword" not in profile
            assert profile["linuxConfiguration"]["disablePasswordAuthentication"] is True
            _, files = custom_data_files(profile["customData"])
            for path, text in files.items():
                # a token may be named (RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN in a test) but never assigned a value
                assert not re.search(r"RAY_AUTH_TOKEN=\S", text), path
                assert not re.search(r"(?i)(AccountKey|SharedAccessSignature|sig)=[A-Za-z0-9%+/]{16,}", text), path
                assert "BEGIN" not in text or "PRIVATE KEY" not in text, path
            env = dict(line.split("=", 1) for line in files["/etc/shardrun/bootstrap.env"].splitlines()
                       if line and not line.startswith("#"))
            assert not any("TOKEN" in key and key != "SHARDRUN_TOKEN_SECRET_NAME" for key in env), env


def test_custom_data_is_the_generated_cloud_init_with_the_deployment_in_its_env_file():
    t = evaluated(headPrivateIp="10.42.0.9", tokenSecretName="my-token")
    worker = t.resource(VMSS)["properties"]["virtualMachineProfile"]
    document, files = custom_data_files(worker["osProfile"]["customData"])
    generated = yaml.safe_load((AZURE / "cloud-init-worker.yaml").read_text())
    assert document["runcmd"] == generated["runcmd"] == [["/opt/shardrun/src/deploy/bootstrap/bootstrap.sh", "worker"]]
    assert [f["path"] for f in document["write_files"]] == [f["path"] for f in generated["write_files"]]
    env = dict(line.split("=", 1) for line in files["/etc/shardrun/bootstrap.env"].splitlines()
               if line and not line.startswith("#"))
    assert env["SHARDRUN_HEAD_ADDRESS"] == "10.42.0.9"
    assert env["SHARDRUN_TOKEN_SECRET_NAME"] == "my-token"
    assert re.fullmatch(r"https://[a-z0-9-]{3,24}\.vault\.azure\.net", env["SHARDRUN_KEY_VAULT_URL"])
    assert env["SHARDRUN_SOURCE"] == REQUIRED["shardrunSource"]
    assert env["SHARDRUN_IDENTITY_CLIENT_ID"] == env["AZURE_CLIENT_ID"] != ""
    assert re.fullmatch(r"abfs://shardrun@[a-z0-9]{3,24}\.dfs\.core\.windows\.net/", env["SHARDRUN_RUNS_URI"])
    assert re.fullmatch(r"abfs://data@[a-z0-9]{3,24}\.dfs\.core\.windows\.net/", env["SHARDRUN_DATA_URI"])
    head_doc, head_files = custom_data_files(t.resource(VM)["properties"]["osProfile"]["customData"])
    assert head_doc["runcmd"] == [["/opt/shardrun/src/deploy/bootstrap/bootstrap.sh", "head"]]
    assert "/opt/shardrun/src/deploy/monitoring/prometheus.yml" in head_files
    assert "/opt/shardrun/src/deploy/monitoring/prometheus.yml" not in files
    for custom_data in (t.resource(VM)["properties"]["osProfile"]["customData"],
                        t.resource(VMSS)["properties"]["virtualMachineProfile"]["osProfile"]["customData"]):
        assert len(custom_data) <= 65535  # Azure's limit for customData


# -- workers: Spot, scale to zero, Scheduled Events --------------------------------------------------


def test_spot_settings_appear_only_with_spot_priority():
    regular = evaluated()
    profile = regular.resource(VMSS)["properties"]["virtualMachineProfile"]
    assert profile["priority"] == "Regular"
    assert profile["evictionPolicy"] is None and profile["billingProfile"] is None

    spot = evaluated(workerPriority="Spot")
    profile = spot.resource(VMSS)["properties"]["virtualMachineProfile"]
    assert profile["priority"] == "Spot"
    assert (profile["evictionPolicy"], profile["billingProfile"]) == ("Delete", {"maxPrice": -1})

    capped = evaluated(workerPriority="Spot", spotEvictionPolicy="Deallocate", spotMaxPrice="1.25")
    profile = capped.resource(VMSS)["properties"]["virtualMachineProfile"]
    assert (profile["evictionPolicy"], profile["billingProfile"]) == ("Deallocate", {"maxPrice": 1.25})
    params = template_json()["parameters"]
    assert params["spotEvictionPolicy"]["defaultValue"] == "Delete"
    assert params["spotMaxPrice"]["defaultValue"] == "-1"


def test_terminate_notification_is_on_for_regular_workers():
    profile = evaluated(terminateNotBeforeTimeout="PT15M").resource(VMSS)["properties"]["virtualMachineProfile"]
    assert profile["scheduledEventsProfile"] == {
        "terminateNotificationProfile": {"enable": True, "notBeforeTimeout": "PT15M"}}
    default = template_json()["parameters"]["terminateNotBeforeTimeout"]
    assert all(re.fullmatch(r"PT([5-9]|1[0-5])M", v) for v in default["allowedValues"])
    # Azure refuses terminate notifications on Spot VMs; they get the Preempt event, which shardrun also handles
    spot = evaluated(workerPriority="Spot").resource(VMSS)["properties"]["virtualMachineProfile"]
    assert spot["scheduledEventsProfile"] is None


def test_workers_are_a_flexible_scale_set_that_scales_to_zero():
    spec = template_json()["parameters"]["workerCount"]
    assert spec["minValue"] == 0 and spec["defaultValue"] == 0
    vmss = evaluated(workerCount=3).resource(VMSS)
    assert vmss["sku"]["capacity"] == 3
    assert vmss["properties"]["orchestrationMode"] == "Flexible"
    assert evaluated().resource(VMSS)["sku"]["capacity"] == 0


def test_accelerated_networking_on_every_nic():
    t = evaluated()
    assert t.resource("Microsoft.Network/networkInterfaces")["properties"]["enableAcceleratedNetworking"] is True
    network = t.resource(VMSS)["properties"]["virtualMachineProfile"]["networkProfile"]
    configs = network["networkInterfaceConfigurations"]
    assert configs and all(c["properties"]["enableAcceleratedNetworking"] is True for c in configs)


# -- identity, roles, image, sizes -------------------------------------------------------------------


def test_head_and_workers_share_one_user_assigned_identity():
    t = evaluated()
    identities = []
    for resource in (t.resource(VM), t.resource(VMSS)):
        assert resource["identity"]["type"] == "UserAssigned"
        identities.append(list(resource["identity"]["userAssignedIdentities"]))
    assert identities[0] == identities[1] and len(identities[0]) == 1
    assert "userAssignedIdentities" in identities[0][0]


ROLE_ASSIGNMENT = "Microsoft.Authorization/roleAssignments"
ADMIN = "00000000-0000-0000-0000-000000000001"
# Built-in roles that may write, delete or re-permission blobs, or hand out keys or SAS that can.
WRITE_ROLES = {"Storage Blob Data Contributor", "Storage Blob Data Owner", "Storage Account Contributor",
               "Contributor", "Owner"}


def grants(t: Template) -> set[tuple[str, str, str]]:
    """Every role assignment deployed with t's parameters, as (who, role, scope): who is "nodes" for the
    identity that the head and the scale set carry, "admin" for adminPrincipalId."""
    (nodes,) = t.resource(VM)["identity"]["userAssignedIdentities"]
    out = set()
    for assignment in t.resources(ROLE_ASSIGNMENT):
        properties = assignment["properties"]
        role = ROLE_IDS[re.search(r"[0-9a-f-]{36}", properties["roleDefinitionId"]).group()]
        principal = properties["principalId"]
        if principal == f"reference({nodes}, 2023-01-31).principalId":
            who = "nodes"
            assert properties["principalType"] == "ServicePrincipal"
        else:
            assert principal == t.parameters["adminPrincipalId"] != "", principal
            who = "admin"
            assert properties["principalType"] == t.parameters["adminPrincipalType"]
        out.add((who, role, assignment["scope"]))
    return out


def scopes(t: Template) -> dict[str, str]:
    account = f"Microsoft.Storage/storageAccounts/{t.variable('storageName')}"
    return {"account": account,
            "vault": f"Microsoft.KeyVault/vaults/{t.variable('keyVaultName')}",
            **{use: f"{account}/blobServices/default/containers/{t.parameters[parameter]}"
               for use, parameter in (("runs", "storageContainer"), ("data", "dataContainer"))
               if parameter in t.parameters}}


def test_no_node_may_write_storage_beyond_the_runs_container():
    # Whatever a job can write, the operator's laptop may unpickle (shardrun export, generate): the nodes'
    # identity writes the runs container only, never the account, the data or another container.
    t = evaluated(adminPrincipalId=ADMIN)
    runs = scopes(t)["runs"]
    for who, role, scope in grants(t):
        if who == "nodes" and role in WRITE_ROLES:
            assert scope == runs, f"the nodes' identity has {role} at {scope}, beyond the runs container {runs}"


def test_each_principal_gets_its_roles_at_their_scopes():
    for parameters in ({}, {"storageContainer": "ckpt", "dataContainer": "corpus"}):
        t = evaluated(adminPrincipalId=ADMIN, **parameters)
        at = scopes(t)
        assert grants(t) == {
            ("nodes", "Storage Blob Data Contributor", at["runs"]),  # checkpoints, job.yaml, metrics, summary
            ("nodes", "Storage Blob Data Reader", at["data"]),       # the driver's index, the workers' reads
            ("nodes", "Key Vault Secrets User", at["vault"]),         # the Ray token
            ("admin", "Storage Blob Data Contributor", at["account"]),  # uploads data, reads and cleans runs
            ("admin", "Key Vault Secrets Officer", at["vault"]),      # writes the Ray token
        }, parameters
        # without adminPrincipalId, the nodes' three and nothing else
        t = evaluated(**parameters)
        assert {who for who, _, _ in grants(t)} == {"nodes"}
        assert len(grants(t)) == 3


def test_the_container_scopes_name_containers_the_template_creates_first():
    t = evaluated(storageContainer="ckpt", dataContainer="corpus")
    account = t.variable("storageName")
    containers = {c["name"]: c for c in t.resources("Microsoft.Storage/storageAccounts/blobServices/containers")}
    assert set(containers) == {f"{account}/default/ckpt", f"{account}/default/corpus"}
    assert all(c["properties"]["publicAccess"] == "None" for c in containers.values())
    for assignment in t.resources(ROLE_ASSIGNMENT):
        scope = assignment["scope"]
        if "/containers/" in scope:
            name = scope.rsplit("/", 1)[1]
            assert any(f"storageAccounts/blobServices/containers, {account}, default, {name})" in d
                       for d in assignment["dependsOn"]), (scope, assignment["dependsOn"])
    # role assignment names are GUIDs unique per (scope, principal, role): none is reused
    names = [a["name"] for a in evaluated(adminPrincipalId=ADMIN).resources(ROLE_ASSIGNMENT)]
    assert len(set(names)) == len(names) == 5


def test_runs_and_data_are_two_valid_containers_by_default():
    parameters = template_json()["parameters"]
    runs, data = parameters["storageContainer"]["defaultValue"], parameters["dataContainer"]["defaultValue"]
    assert runs != data
    for name in (runs, data):
        assert re.fullmatch(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}", name), name


def test_image_and_size_defaults():
    params = template_json()["parameters"]
    image = {k: params[f"image{k.title()}"]["defaultValue"] for k in ("publisher", "offer", "sku", "version")}
    assert image == {"publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204", "version": "latest"}
    assert params["workerVmSize"]["defaultValue"] == "Standard_NC24ads_A100_v4"
    assert params["headVmSize"]["defaultValue"] == "Standard_D4s_v5"
    t = evaluated()
    for profile in (t.resource(VM)["properties"], t.resource(VMSS)["properties"]["virtualMachineProfile"]):
        assert profile["storageProfile"]["imageReference"] == image


def test_outputs_give_the_tunnel_the_storage_and_the_vault():
    t = evaluated()
    outputs = {name: t.value(spec["value"]) for name, spec in t.template["outputs"].items()}
    assert outputs["sshTunnelCommand"].startswith("ssh -L 8265:localhost:8265 -L 3000:localhost:3000")
    assert " azureuser@reference(" in outputs["sshTunnelCommand"]  # the head's public IP, known once deployed
    account = t.variable("storageName")
    assert outputs["runsUri"] == f"abfs://shardrun@{account}.dfs.core.windows.net/"
    assert outputs["dataUri"] == f"abfs://data@{account}.dfs.core.windows.net/"
    assert (outputs["runsContainer"], outputs["dataContainer"], outputs["storageAccountName"]) == ("shardrun", "data",
                                                                                                   account)
    assert {"headPublicIp", "keyVaultName", "keyVaultUrl", "identityClientId", "workerScaleSetName"} <= set(outputs)


def test_the_outputs_the_guide_reads_exist():
    guide = (REPO / "docs" / "deploy-azure.md").read_text()
    read = set(re.findall(r"jq -r \.(\w+)\.value", guide))
    assert {"runsUri", "dataUri", "dataContainer", "storageAccountName"} <= read
    assert read <= set(template_json()["outputs"]), read - set(template_json()["outputs"])


# -- checkov -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov() -> str:
    if not CHECKOV.exists():
        pytest.fail(f"checkov is not installed at {CHECKOV}; run `make setup`")
    return str(CHECKOV)


def test_checkov_finds_nothing_and_every_skip_says_why(checkov, tmp_path):
    argv = [checkov, "-d", str(AZURE), "--framework", "arm", "--skip-download", "-o", "json"]
    # checkov asks Prisma Cloud for guidelines unless told not to; an empty network namespace makes sure
    # nothing leaves this machine (where one can be made; elsewhere --skip-download alone).
    if os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"]).returncode == 0:
        argv = ["unshare", "--net", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["failed"] == 0
    assert report["summary"]["passed"] >= 20, report["summary"]
    assert report["summary"]["parsing_errors"] == 0
    for skipped in report["results"]["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason) > 40, f"{skipped['check_id']} is skipped without a reason"
    checked = {r["check_id"] for r in report["results"]["passed_checks"]}
    assert {"CKV_AZURE_10", "CKV_AZURE_49", "CKV_AZURE_149", "CKV_AZURE_35", "CKV_AZURE_109"} <= checked
