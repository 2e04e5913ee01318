"""deploy/k8s checked offline: built-in kinds and every Ray pod template against Kubernetes' own JSON schemas
(kubernetes-validate), the KubeRay resources structurally (no CRD schema ships offline), and what the manifests
promise: GPU workers from zero on a tainted AKS pool, token auth from a Secret that is not in the repo, the
image of Ray's pinned version, Workload Identity, deploy/monitoring's Prometheus, a valid job spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml

from shardrun import config

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
README = K8S / "README.md"
DOCKERFILE = K8S / "Dockerfile"
MONITORING = REPO / "deploy" / "monitoring"
# The placeholders README.md's envsubst fills, with values of the right shape.
PLACEHOLDERS = {"ACR_NAME": "shardrunacr", "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000000",
                "STORAGE_ACCOUNT": "shardrundata"}
KUBERNETES_VERSION = "1.33.0"  # a version AKS supports
RAY_KINDS = ("RayCluster", "RayJob")
AUTH_SECRET_KEY = "auth_token"  # the Secret key KubeRay reads for authOptions.secretName
# Fields of the ray.io/v1 API (KubeRay 1.6) that these manifests may use.
RAYCLUSTER_SPEC = {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy", "idleTimeoutSeconds", "suspend"}
AUTOSCALER_OPTIONS = {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy", "env",
                      "envFrom", "volumeMounts", "securityContext", "version"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
RAYJOB_SPEC = {"entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "runtimeEnvYAML", "submissionMode", "activeDeadlineSeconds", "backoffLimit", "metadata", "jobId",
               "submitterPodTemplate", "submitterConfig", "clusterSelector", "suspend", "entrypointNumCpus",
               "entrypointNumGpus", "entrypointResources", "deletionStrategy"}


def substitute(text: str) -> str:
    """What `envsubst` with README's variables makes of a manifest; an unknown placeholder is an error."""
    return re.sub(r"\$\{(\w+)\}", lambda m: PLACEHOLDERS[m.group(1)], text)


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(substitute(path.read_text())) if d is not None]


@pytest.fixture(scope="module")
def documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in load_documents(p)]


@pytest.fixture(scope="module")
def ray_resources(documents) -> list[tuple[str, dict]]:
    found = [(f"{name}:{d['kind']}", d) for name, d in documents if d["kind"] in RAY_KINDS]
    assert {d["kind"] for _, d in found} == set(RAY_KINDS)
    return found


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev dependency) is not installed")


def cluster_spec(resource: dict) -> dict:
    return resource["spec"] if resource["kind"] == "RayCluster" else resource["spec"]["rayClusterSpec"]


def groups(resource: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(resource)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the first container of each pod.
    return group["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def schema_error(kubernetes_validate, where: str, doc: dict) -> str | None:
    """Kubernetes' schema of the document's kind, strict (unknown fields too): None, or the first error."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{where}: {e.message} at {list(e.absolute_path)}"
    return None


def documented_secret() -> tuple[str, str]:
    m = re.search(r"kubectl -n \$NS create secret generic (\S+) --from-literal=(\w+)=", README.read_text())
    assert m, "README.md does not say how to create the token Secret"
    return m.group(1), m.group(2)


# Shape and schemas


def test_placeholders_are_the_documented_ones():
    used = {m for p in MANIFESTS for m in re.findall(r"\$\{(\w+)\}", p.read_text())}
    assert used == PLACEHOLDERS.keys()
    envsubst = re.findall(r"envsubst '([^']*)'", README.read_text())
    assert envsubst and all(set(re.findall(r"\$(\w+)", line)) == used for line in envsubst)


def test_every_document_has_kind_and_name(documents):
    for name, doc in documents:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), name


def test_builtin_kinds_match_kubernetes_schema(documents, kubernetes_validate):
    builtin = [(name, d) for name, d in documents if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in builtin} >= {"ServiceAccount", "ConfigMap"}
    errors = [schema_error(kubernetes_validate, f"{name} {doc['kind']}", doc) for name, doc in builtin]
    assert not any(errors), "\n".join(filter(None, errors))


def test_ray_pod_templates_match_kubernetes_schema(ray_resources, kubernetes_validate):
    # Each group's template is a core/v1 PodTemplateSpec: check it as the template of a PodTemplate.
    errors = [
        schema_error(kubernetes_validate, f"{where} {group}", {"apiVersion": "v1", "kind": "PodTemplate",
                                                                "metadata": {"name": group}, "template": g["template"]})
        for where, resource in ray_resources for group, g in groups(resource)
    ]
    assert not any(errors), "\n".join(filter(None, errors))


def test_ray_resources_use_known_fields(ray_resources):
    for where, resource in ray_resources:
        assert resource["apiVersion"] == "ray.io/v1", where
        if resource["kind"] == "RayJob":
            assert resource["spec"].keys() <= RAYJOB_SPEC, where
        spec = cluster_spec(resource)
        assert spec.keys() <= RAYCLUSTER_SPEC, where
        assert spec["headGroupSpec"].keys() <= HEAD_GROUP, where
        assert spec.get("autoscalerOptions", {}).keys() <= AUTOSCALER_OPTIONS, where
        assert spec["autoscalerOptions"].get("upscalingMode", "Default") in {"Default", "Aggressive", "Conservative"}
        assert spec["authOptions"].keys() <= AUTH_OPTIONS, where
        for group, g in groups(resource):
            if group != "head":
                assert g.keys() <= WORKER_GROUP, f"{where} {group}"
            # map[string]string in the CRD: an unquoted number would be refused
            assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{where} {group}"


# What the manifests promise


def test_gpu_workers_scale_from_zero_on_the_gpu_pool(ray_resources):
    for where, resource in ray_resources:
        spec = cluster_spec(resource)
        assert spec["enableInTreeAutoscaling"] is True, where
        workers = spec["workerGroupSpecs"]
        assert workers, where
        for g in workers:
            at = f"{where} {g['groupName']}"
            assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1, at
            pod = g["template"]["spec"]
            resources = ray_container(g)["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, at
            # extended resources: requests, when given, must equal limits
            assert resources["requests"] == resources["limits"], at
            assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["tolerations"], at
            assert pod["nodeSelector"].get("kubernetes.azure.com/agentpool"), at


def test_head_has_no_gpu_and_runs_no_training(ray_resources):
    for where, resource in ray_resources:
        head = cluster_spec(resource)["headGroupSpec"]
        assert "nvidia.com/gpu" not in ray_container(head)["resources"]["limits"], where
        assert head["rayStartParams"]["num-cpus"] == "0", where


def test_token_auth_from_a_secret_not_in_the_repo(documents, ray_resources):
    secret, key = documented_secret()
    assert key == AUTH_SECRET_KEY
    assert not [name for name, d in documents if d["kind"] == "Secret"], "a Secret with a value in the repo"
    for where, resource in ray_resources:
        spec = cluster_spec(resource)
        assert spec["authOptions"] == {"mode": "token", "secretName": secret}, where
        for group, g in groups(resource):
            env = env_of(ray_container(g))
            at = f"{where} {group}"
            assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, at
            from_secret = {"secretKeyRef": {"name": secret, "key": key}}
            assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": from_secret}, at


def test_image_is_pinned_to_the_ray_version():
    version = ray.__version__
    assert f"ray=={version}\n" in (REPO / "constraints.txt").read_text()
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py3\d+-gpu", base), base


def test_every_ray_container_runs_the_shardrun_image(ray_resources):
    images = set()
    for where, resource in ray_resources:
        assert cluster_spec(resource)["rayVersion"] == ray.__version__, where
        images |= {ray_container(g)["image"] for _, g in groups(resource)}
    assert len(images) == 1, images
    image = images.pop()
    assert re.fullmatch(r"[a-z0-9]+\.azurecr\.io/shardrun:\d+\.\d+\.\d+", image), image


def test_dockerfile_context_holds_what_it_copies():
    copied = {src.rstrip("/") for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", DOCKERFILE.read_text(), re.M)
              for src in line.split()[:-1]}
    kept = {line[1:].rstrip("/") for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")}
    assert copied and copied == kept
    assert all((REPO / c).exists() for c in copied)


def test_pods_use_workload_identity(documents, ray_resources):
    accounts = [d for _, d in documents if d["kind"] == "ServiceAccount"]
    assert len(accounts) == 1
    account = accounts[0]
    assert account["metadata"]["annotations"]["azure.workload.identity/client-id"] == PLACEHOLDERS["AZURE_CLIENT_ID"]
    for where, resource in ray_resources:
        for group, g in groups(resource):
            template = g["template"]
            assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true", f"{where} {group}"
            assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], f"{where} {group}"


def test_prometheus_beside_the_head_serves_deploy_monitoring(documents):
    (cluster,) = [d for _, d in documents if d["kind"] == "RayCluster"]
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    prometheus = containers["prometheus"]
    mounts = {m["mountPath"]: m["name"] for m in prometheus["volumeMounts"]}
    config_file = next(a.split("=", 1)[1] for a in prometheus["args"] if a.startswith("--config.file="))
    config_dir = config_file.rsplit("/", 1)[0]
    # Ray's discovery file and shardrun's target files: the head's /tmp/ray, as prometheus.yml expects
    ray_mounts = {m["mountPath"]: m["name"] for m in ray_container(cluster["spec"]["headGroupSpec"])["volumeMounts"]}
    assert mounts["/tmp/ray"] == ray_mounts["/tmp/ray"]
    assert "emptyDir" in volumes[mounts["/tmp/ray"]]
    # the ConfigMap lays out deploy/monitoring's files as prometheus.yml names them
    items = {i["key"]: i["path"] for i in volumes[mounts[config_dir]]["configMap"]["items"]}
    prometheus_yml = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    expected = {"prometheus.yml": "prometheus.yml", **{Path(f).name: f for f in prometheus_yml["rule_files"]}}
    assert items == expected
    assert all((MONITORING / path).is_file() for path in expected.values())
    created = re.findall(r"--from-file=deploy/monitoring/(\S+)", README.read_text())
    assert sorted(created) == sorted(expected.values())
    # Ray's dashboard graphs read it
    assert env_of(containers["ray-head"])["RAY_PROMETHEUS_HOST"]["value"] == "http://127.0.0.1:9090"


def test_rayjob_runs_the_job_spec_of_its_configmap(documents):
    (job,) = [d for _, d in documents if d["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    command, path = spec["entrypoint"].rsplit(" ", 1)
    assert command == "shardrun run"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    (mount,) = [m for m in ray_container(head)["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    configmap_name = volumes[mount["name"]]["configMap"]["name"]
    (configmap,) = [d for _, d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == configmap_name]
    job_spec = config.parse(yaml.safe_load(configmap["data"][path.removeprefix(mount["mountPath"] + "/")]))
    assert job_spec.scaling.use_gpu
    # more than one node: data and checkpoints where every pod sees them
    assert all(p.startswith("abfs://") for p in job_spec.data.paths)
    assert job_spec.checkpoint.storage.startswith("abfs://")


def test_no_secret_values_in_deploy_k8s():
    hex_secret = re.compile(r"\b[0-9a-fA-F]{32,}\b")
    for path in sorted(p for p in K8S.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not hex_secret.search(text), f"{path.name}: a long hex string looks like a token"
        assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)", text), f"{path.name}: RAY_AUTH_TOKEN set to a value"
        assert not re.search(r"--from-literal=\w+=(?!\"?\$\()", text), f"{path.name}: a literal Secret value"
