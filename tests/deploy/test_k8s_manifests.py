"""deploy/k8s checked offline: built-in kinds and every Ray pod template against Kubernetes' own JSON schemas
(kubernetes-validate), the KubeRay resources structurally (no CRD schema ships offline), and what the manifests
promise: GPU workers from zero on a tainted AKS pool, token auth from a Secret that is not in the repo, read from
a file, the image of Ray's pinned version, Workload Identity, deploy/monitoring's Prometheus, a valid job spec;
and their hardening: the autoscaler's Kubernetes API rights on the head's service account alone, restricted
pods, Ray's ports closed to all but the cluster's own pods (NetworkPolicy, evaluated here as Kubernetes would)."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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
# What KubeRay adds to the pods it makes (ray-operator/controllers/ray: common/pod.go, utils/constant.go, 1.6 and 1.7).
AUTOSCALER = "autoscaler"  # the name of its autoscaler sidecar in the head pod
KUBERAY_PROTECTED_LABELS = {"ray.io/cluster", "ray.io/node-type", "ray.io/group"}  # a template cannot override these
RAYJOB_CLUSTER_SUFFIX = "-x7k2q"  # a RayJob's cluster is <RayJob name>-<5 random characters>
DEFAULT_DASHBOARD_PORT = 8265
API_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where Ray's KubeRay node provider reads it
WORKLOAD_IDENTITY_SKIP = "azure.workload.identity/skip-containers"
# Namespace labels that README.md says to set: where Prometheus runs, where the KubeRay operator runs.
METRICS_SCRAPER_LABEL = "shardrun/metrics-scraper"
OPERATOR_LABEL = "shardrun/kuberay-operator"
NAMESPACE = {"kubernetes.io/metadata.name": "shardrun"}  # the labels of the namespace the manifests go to
IMDS = "169.254.169.254"
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


def submitter_template(resource: dict) -> dict | None:
    return resource["spec"].get("submitterPodTemplate") if resource["kind"] == "RayJob" else None


def pod_templates(resource: dict) -> list[tuple[str, dict]]:
    """Every pod template KubeRay makes pods from: each group's and, for a RayJob, its submitter's."""
    found = [(group, g["template"]) for group, g in groups(resource)]
    if submitter_template(resource) is not None:
        found.append(("submitter", submitter_template(resource)))
    return found


def token_containers(resource: dict) -> list[tuple[str, dict]]:
    """The containers that talk to Ray and that these manifests write: each group's Ray container, the submitter's."""
    found = [(group, ray_container(g)) for group, g in groups(resource)]
    if submitter_template(resource) is not None:
        found.append(("submitter", submitter_template(resource)["spec"]["containers"][0]))
    return found


def autoscaler_container(resource: dict) -> dict | None:
    """What autoscalerOptions makes of the sidecar KubeRay adds to the head pod (None without in-tree autoscaling)."""
    spec = cluster_spec(resource)
    if not spec.get("enableInTreeAutoscaling"):
        return None
    options = spec.get("autoscalerOptions", {})
    return {"name": AUTOSCALER, "image": options.get("image", ray_container(spec["headGroupSpec"])["image"]),
            **{k: options[k] for k in ("env", "volumeMounts", "securityContext") if k in options}}


def containers_of(resource: dict, group: str, template: dict) -> list[dict]:
    """A pod's containers as they will run: the template's, its init containers and KubeRay's: the autoscaler on
    a head; on a worker, wait-gcs-ready, which copies the Ray container's env, mounts and securityContext."""
    pod = template["spec"]
    found = pod["containers"] + pod.get("initContainers", [])
    if group == "head" and autoscaler_container(resource) is not None:
        found = found + [autoscaler_container(resource)]
    elif group not in ("head", "submitter"):
        ray = pod["containers"][0]
        found = found + [{"name": "wait-gcs-ready", "image": ray["image"],
                          **{k: ray[k] for k in ("env", "volumeMounts", "securityContext") if k in ray}}]
    return found


def with_kuberay_token_env(env: list[dict], secret: str) -> list[dict]:
    """SetContainerTokenAuthEnvVars (KubeRay 1.6 and 1.7) for authOptions {mode: token, secretName}: it adds
    RAY_AUTH_MODE and RAY_AUTH_TOKEN (from the Secret) to a container whose env does not name them already."""
    names = {e["name"] for e in env}
    added = [{"name": "RAY_AUTH_MODE", "value": "token"}] if "RAY_AUTH_MODE" not in names else []
    if "RAY_AUTH_TOKEN" not in names:
        added.append({"name": "RAY_AUTH_TOKEN",
                      "valueFrom": {"secretKeyRef": {"name": secret, "key": AUTH_SECRET_KEY}}})
    return env + added


def dockerfile_user() -> tuple[int, int] | None:
    """The numeric uid:gid of the image's last USER, None when it names a user (kubelet cannot tell root from it)."""
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.M)
    m = re.fullmatch(r"(\d+):(\d+)", users[-1]) if users else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def volumes_of(template: dict) -> dict[str, dict]:
    return {v["name"]: v for v in template["spec"].get("volumes", [])}


def mounts_of(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


# NetworkPolicy, evaluated as the API documents it (one namespace: all manifests are applied to $NS)


class Source(NamedTuple):
    """Where a connection comes from: a pod (its labels and its namespace's) or, labels None, an address."""

    what: str
    labels: dict[str, str] | None
    namespace: dict[str, str]
    address: str = "10.224.0.9"


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector's verdict on a set of labels ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    tests = {"In": lambda key, values: labels.get(key) in values,
             "NotIn": lambda key, values: labels.get(key) not in values,
             "Exists": lambda key, values: key in labels,
             "DoesNotExist": lambda key, values: key not in labels}
    return all(tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", []))


def peer_admits(peer: dict, source: Source) -> bool:
    if "ipBlock" in peer:
        if source.labels is not None:
            return False  # whether an ipBlock covers pod IPs is up to the network plugin: nothing here relies on it
        address = ipaddress.ip_address(source.address)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and \
            not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if source.labels is None:
        return False
    namespaces = peer.get("namespaceSelector")
    in_namespace = selects(namespaces, source.namespace) if namespaces is not None else source.namespace == NAMESPACE
    return in_namespace and selects(peer.get("podSelector", {}), source.labels)


def ingress_ports(policies: list[dict], target: dict[str, str], named: dict[str, int], source: Source) -> set | None:
    """The ports of a pod with labels `target` that `source` may connect to; None: every port."""
    applying = [p["spec"] for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"]["podSelector"], target)]
    if not applying:
        return None
    ports: set[int] = set()
    for rule in (r for spec in applying for r in spec.get("ingress", [])):
        if rule.get("from") and not any(peer_admits(peer, source) for peer in rule["from"]):
            continue
        if not rule.get("ports"):
            return None
        for p in rule["ports"]:
            first = named[p["port"]] if isinstance(p["port"], str) else p["port"]
            ports |= set(range(first, p.get("endPort", first) + 1))
    return ports


def egress_reaches(policy: dict, destination: Source) -> bool:
    return any(not rule.get("to") or any(peer_admits(p, destination) for p in rule["to"])
               for rule in policy["spec"].get("egress", []))


def ray_pod_labels(resource: dict, group: str, template: dict) -> dict[str, str]:
    """A Ray pod's labels as KubeRay sets them (labelPod): its own, then the template's, but not over its ray.io
    keys. A RayJob's cluster, and so its ray.io/cluster label, is named when the job starts."""
    name = resource["metadata"]["name"]
    cluster = name if resource["kind"] == "RayCluster" else name + RAYJOB_CLUSTER_SUFFIX
    head = group == "head"
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": "head" if head else "worker",
              "ray.io/group": "headgroup" if head else group, "app.kubernetes.io/name": "kuberay",
              "app.kubernetes.io/created-by": "kuberay-operator"}
    own = template.get("metadata", {}).get("labels", {})
    return labels | {k: v for k, v in own.items() if k not in KUBERAY_PROTECTED_LABELS}


def submitter_pod_labels(resource: dict) -> dict[str, str]:
    """The submitter's: its template's and the Job controller's (the Job is named after the RayJob)."""
    name = resource["metadata"]["name"]
    own = (submitter_template(resource) or {}).get("metadata", {}).get("labels", {})
    return own | {"batch.kubernetes.io/job-name": name, "job-name": name}


def documented_namespace_labels() -> dict[str, str]:
    return dict(re.findall(r"kubectl label namespace \S+ ([\w./-]+)=(\S+)", README.read_text()))


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
    # Each group's template (and a RayJob's submitter's) is a core/v1 PodTemplateSpec: check it as the template
    # of a PodTemplate; the autoscaler's overrides are a SecurityContext and VolumeMounts, checked in a container.
    errors = [
        schema_error(kubernetes_validate, f"{where} {group}", {"apiVersion": "v1", "kind": "PodTemplate",
                                                                "metadata": {"name": group}, "template": template})
        for where, resource in ray_resources for group, template in pod_templates(resource)
    ]
    for where, resource in ray_resources:
        if (autoscaler := autoscaler_container(resource)) is not None:
            template = {"spec": {"containers": [autoscaler]}}
            errors.append(schema_error(kubernetes_validate, f"{where} autoscalerOptions", {
                "apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": AUTOSCALER}, "template": template}))
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
        # KubeRay's operator (a RayJob's status) and autoscaler read the token from the Secret named here
        assert spec["authOptions"] == {"mode": "token", "secretName": secret}, where


def test_ray_reads_its_token_from_the_secret_mounted_as_a_file(ray_resources, tmp_path):
    """Every process of a Ray container inherits its environment, and so would a token there: the token is a
    file of the Secret instead, which Ray reads through RAY_AUTH_TOKEN_PATH, with RAY_AUTH_TOKEN named empty so
    that KubeRay adds none (a RAY_AUTH_TOKEN with a value outranks the file, in Ray 2.60 as checked below)."""
    secret, key = documented_secret()
    envs = set()
    for where, resource in ray_resources:
        for group, container in token_containers(resource):
            at = f"{where} {group}"
            template = dict(pod_templates(resource))[group]
            env = with_kuberay_token_env(container.get("env", []), secret)
            names = [e["name"] for e in env]
            assert len(names) == len(set(names)), f"{at}: an env var named twice"
            assert not [e for e in env if "secretKeyRef" in e.get("valueFrom", {})], f"{at}: a Secret in the env"
            assert not [e for e in container.get("envFrom", []) if "secretRef" in e], f"{at}: a Secret in the env"
            values = env_of({"env": env})
            assert values["RAY_AUTH_MODE"].get("value") == "token", at
            assert values["RAY_AUTH_TOKEN"].get("value") == "", at
            path = values["RAY_AUTH_TOKEN_PATH"].get("value", "")
            folder, _, name = path.rpartition("/")
            volume = volumes_of(template).get(mounts_of(container).get(folder, ""), {})
            assert volume.get("secret", {}).get("secretName") == secret, f"{at}: {path} is not in the Secret"
            items = {i["path"]: i for i in volume["secret"].get("items", [{"key": n, "path": n} for n in [name]])}
            assert items.get(name, {}).get("key") == key, f"{at}: {path} is not the Secret's {key}"
            # Ray runs as a user that does not own the file (root does): its group must read it
            file_mode = items[name].get("mode", volume["secret"].get("defaultMode", 0o644))
            group_id = template["spec"].get("securityContext", {}).get("fsGroup")
            assert file_mode & 0o004 or (file_mode & 0o040 and group_id is not None), f"{at}: Ray cannot read {path}"
            envs.add((values["RAY_AUTH_MODE"]["value"], values["RAY_AUTH_TOKEN"]["value"]))
    # What Ray 2.60 makes of that environment: the token of the file, not one of the environment.
    (tmp_path / "token").write_text("token-of-the-file\n")
    probe = ("from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode\n"
             "print(get_authentication_mode() == AuthenticationMode.TOKEN, "
             "AuthenticationTokenLoader.instance().get_raw_token())")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    for mode, token in envs | {("token", "token-of-the-environment")}:
        env = clean | {"RAY_AUTH_MODE": mode, "RAY_AUTH_TOKEN": token, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["True", token or "token-of-the-file"], (token, out.stdout)


def test_every_pod_and_container_runs_restricted(ray_resources):
    """Kubernetes' restricted Pod Security Standard, and a read-only root filesystem, for every pod KubeRay makes
    of these templates, KubeRay's own containers included (its autoscaler; its wait-gcs-ready init container
    copies the Ray container's securityContext)."""
    image_user = dockerfile_user()
    assert image_user, "the Dockerfile's USER is no uid:gid, so kubelet cannot check runAsNonRoot"
    for where, resource in ray_resources:
        if resource["kind"] == "RayJob":
            assert submitter_template(resource), f"{where}: KubeRay's default submitter has no securityContext"
        for group, template in pod_templates(resource):
            at = f"{where} {group}"
            pod = template["spec"]
            context = pod.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, at
            assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, at
            # Ray's images run as ray (1000) of group users (100), who own /home/ray and its Python
            assert (context.get("runAsUser"), context.get("runAsGroup")) == image_user, at
            assert context.get("fsGroup") == image_user[1], at
            assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), at
            assert not [v for v in pod.get("volumes", []) if "hostPath" in v], at
            for c in containers_of(resource, group, template):
                own = c.get("securityContext", {})
                at_c = f"{at} {c['name']}"
                assert own.get("allowPrivilegeEscalation") is False, at_c
                assert own.get("capabilities", {}).get("drop") == ["ALL"], at_c
                assert not own.get("capabilities", {}).get("add"), at_c
                assert not own.get("privileged"), at_c
                assert own.get("readOnlyRootFilesystem") is True, at_c
                assert own.get("runAsNonRoot", True) is True and own.get("runAsUser", 1) > 0, at_c
                assert own.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}, at_c


def test_read_only_root_leaves_writable_what_ray_and_prometheus_write(ray_resources):
    """Ray writes its temp dir (/tmp/ray: session dirs, logs, runtime envs, spilled objects) and shardrun its
    checkpoint staging in /tmp; DeepSpeed builds its ops in ~/.cache (shardrun's TORCH_EXTENSIONS_DIR), where
    Triton caches too (TRITON_CACHE_DIR); Prometheus writes its TSDB. Each is an emptyDir."""
    triton = re.search(r"^ENV TRITON_CACHE_DIR=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert triton and triton.group(1).startswith("/home/ray/.cache/")
    for where, resource in ray_resources:
        spec = cluster_spec(resource)
        for group, g in groups(resource):
            assert g["rayStartParams"].get("temp-dir", "/tmp/ray").startswith("/tmp/"), f"{where} {group}"
        for group, template in pod_templates(resource):
            volumes = volumes_of(template)
            first = template["spec"]["containers"][0]
            for c in containers_of(resource, group, template):
                at = f"{where} {group} {c['name']}"
                mounts = mounts_of(c)
                if c["name"] == "prometheus":
                    tsdb = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--storage.tsdb.path="))
                    wanted = [tsdb]
                elif c["image"] == ray_container(spec["headGroupSpec"])["image"]:
                    trains = c is first and group != "submitter"  # a Ray node, where DeepSpeed may build ops
                    wanted = ["/tmp", "/home/ray/.cache"] if trains else ["/tmp"]
                else:
                    raise AssertionError(f"{at}: which folders does it write?")
                for path in wanted:
                    assert "emptyDir" in volumes.get(mounts.get(path, ""), {}), f"{at}: {path} is not writable"
        # The autoscaler's events reach the head through a shared /tmp/ray (KubeRay would give it a volume of its
        # own, which the head does not read, since the head's /tmp/ray is already mounted).
        head = spec["headGroupSpec"]
        autoscaler = autoscaler_container(resource)
        if autoscaler is not None:
            shared = mounts_of(ray_container(head)).get("/tmp/ray")
            assert shared and mounts_of(autoscaler).get("/tmp/ray") == shared, where


def test_network_policies_keep_ray_ports_inside_each_cluster(documents, ray_resources):
    """Ray's ports (GCS, dashboard, client, the node manager's, object manager's and workers' ports, which Ray
    picks at random, metrics) admit the cluster's own pods on every port and nobody else, but Prometheus on the
    metrics port and, on a RayJob's head, its submitter and the KubeRay operator on the dashboard's."""
    policies = [d for _, d in documents if d["kind"] == "NetworkPolicy"]
    labels = documented_namespace_labels()
    assert labels.get(METRICS_SCRAPER_LABEL) == "true" and labels.get(OPERATOR_LABEL) == "true"
    pods = {(where, group): ray_pod_labels(resource, group, g["template"])
            for where, resource in ray_resources for group, g in groups(resource)}
    submitters = {where: submitter_pod_labels(resource) for where, resource in ray_resources
                  if resource["kind"] == "RayJob"}
    everyone = [Source(f"{w} {g}", labels, NAMESPACE) for (w, g), labels in pods.items()]
    everyone += [Source(f"{w} submitter", labels, NAMESPACE) for w, labels in submitters.items()]
    strangers = [
        Source("another pod of the namespace", {"app": "notebook"}, NAMESPACE),
        Source("a pod of another namespace", {"app": "notebook"}, {"kubernetes.io/metadata.name": "other"}),
        Source("an address outside the cluster", None, {}, "203.0.113.7"),
    ]
    prometheus = [
        Source("Prometheus in a labelled namespace", {"app.kubernetes.io/name": "prometheus"},
               {"kubernetes.io/metadata.name": "monitoring", METRICS_SCRAPER_LABEL: "true"}),
        Source("a labelled Prometheus pod", {METRICS_SCRAPER_LABEL: "true"}, NAMESPACE),
    ]
    operator = Source("the KubeRay operator", {"app.kubernetes.io/name": "kuberay-operator"},
                      {"kubernetes.io/metadata.name": "kuberay-system", OPERATOR_LABEL: "true"})
    for where, resource in ray_resources:
        spec = cluster_spec(resource)
        dashboard = int(spec["headGroupSpec"]["rayStartParams"].get("dashboard-port", DEFAULT_DASHBOARD_PORT))
        for group, g in groups(resource):
            at = f"{where} {group}"
            target = pods[(where, group)]
            named = {p["name"]: p["containerPort"] for p in ray_container(g).get("ports", [])}
            metrics = {int(g["rayStartParams"]["metrics-export-port"])}
            for source in everyone:
                reached = ingress_ports(policies, target, named, source)
                if source.what.startswith(f"{where} ") and source.what != f"{where} submitter":
                    assert reached is None, f"{at}: {source.what} cannot reach every port"
                elif source.what == f"{where} submitter" and group == "head":
                    assert reached == {dashboard}, f"{at}: {source.what} reaches {reached or 'every port'}"
                else:
                    assert reached == set(), f"{at}: {source.what} reaches {reached or 'every port'}"
            for source in strangers:
                reached = ingress_ports(policies, target, named, source)
                assert reached == set(), f"{at}: {source.what} reaches {reached or 'every port'}"
            for source in prometheus:
                assert ingress_ports(policies, target, named, source) == metrics, f"{at}: {source.what}"
            wanted = {dashboard} if resource["kind"] == "RayJob" and group == "head" else set()
            assert ingress_ports(policies, target, named, operator) == wanted, f"{at}: {operator.what}"


def test_readme_says_how_to_keep_pods_from_the_metadata_endpoint(kubernetes_validate):
    """A pod that reaches 169.254.169.254 can ask it for tokens of the node's managed identities."""
    text = README.read_text()
    assert "managed identit" in text and "--enable-imds-restriction" in text
    assert "scheduled_events" in text  # what blocking it costs shardrun's workers: the Spot eviction notice
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    policies = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "NetworkPolicy"]
    assert policies, "README.md shows no egress NetworkPolicy"
    for policy in policies:
        assert not schema_error(kubernetes_validate, "README.md NetworkPolicy", policy)
        assert "Egress" in policy["spec"]["policyTypes"]
        assert not egress_reaches(policy, Source("the metadata endpoint", None, {}, IMDS))
        assert egress_reaches(policy, Source("Entra ID and storage", None, {}, "20.60.0.1"))
        # with Cilium an ipBlock does not cover pods: other pods (DNS, Ray's) need a rule of their own
        dns = Source("DNS", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
        assert egress_reaches(policy, dns)
        assert egress_reaches(policy, Source("a Ray pod", {"ray.io/cluster": "shardrun"}, NAMESPACE))


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
    accounts = {d["metadata"]["name"]: d for _, d in documents if d["kind"] == "ServiceAccount"}
    text = README.read_text()
    loop = re.search(r"for sa in ([\w -]+); do\n\s+az identity federated-credential create [^;]*?"
                     r"--subject system:serviceaccount:\$NS:\$sa", text)
    federated = set(loop.group(1).split()) if loop else set()
    federated |= set(re.findall(r"--subject system:serviceaccount:\$NS:([\w-]+)", text))
    for where, resource in ray_resources:
        for group, g in groups(resource):
            at = f"{where} {group}"
            template = g["template"]
            assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true", at
            account = accounts[template["spec"]["serviceAccountName"]]
            annotations = account["metadata"]["annotations"]
            assert annotations["azure.workload.identity/client-id"] == PLACEHOLDERS["AZURE_CLIENT_ID"], at
            assert account["metadata"]["name"] in federated, f"{at}: README.md trusts no token of its account"
            # the webhook gives every container the Azure token unless told otherwise: only Ray's need it
            skipped = set(filter(None, template["metadata"].get("annotations", {}).get(WORKLOAD_IDENTITY_SKIP,
                                                                                       "").split(";")))
            others = {c["name"] for c in containers_of(resource, group, template)} - {ray_container(g)["name"]}
            assert skipped == others, at


def test_workers_have_a_service_account_of_their_own_with_no_token(documents, ray_resources):
    """KubeRay binds its autoscaler Role (patch pods and rayclusters) to the head's service account; a worker
    runs training code only, and needs no Kubernetes API at all."""
    accounts = {d["metadata"]["name"]: d for _, d in documents if d["kind"] == "ServiceAccount"}
    bound = {s["name"] for _, d in documents if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
             for s in d.get("subjects", []) if s["kind"] == "ServiceAccount"}
    for where, resource in ray_resources:
        head = cluster_spec(resource)["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
        for group, g in groups(resource):
            if group == "head":
                continue
            at = f"{where} {group}"
            pod = g["template"]["spec"]
            account = pod.get("serviceAccountName", "default")
            assert account != head, f"{at}: shares the autoscaler's service account"
            assert account in accounts and account not in bound, at
            assert accounts[account].get("automountServiceAccountToken") is False, at
            assert pod.get("automountServiceAccountToken") is False, at


def test_only_the_autoscaler_gets_a_kubernetes_api_token(documents, ray_resources):
    """No pod gets the automounted API token; the head's autoscaler, which scales the workers through the API,
    mounts one of its own where Ray's KubeRay node provider reads it. The head's Ray container runs jobs'
    drivers, which must not be able to patch pods."""
    accounts = {d["metadata"]["name"]: d for _, d in documents if d["kind"] == "ServiceAccount"}

    def api_token_volumes(template: dict) -> set[str]:
        # a projected token with no audience is one for the API server (Azure's names api://AzureADTokenExchange)
        return {v["name"] for v in template["spec"].get("volumes", []) for source in v.get("projected", {}).get(
            "sources", []) if "serviceAccountToken" in source and not source["serviceAccountToken"].get("audience")}

    for where, resource in ray_resources:
        for group, template in pod_templates(resource):
            at = f"{where} {group}"
            pod = template["spec"]
            assert pod.get("automountServiceAccountToken") is False, at
            account = pod.get("serviceAccountName")
            if group != "submitter" or account is not None:  # the submitter needs no account of its own
                assert account in accounts and accounts[account].get("automountServiceAccountToken") is False, at
            api = api_token_volumes(template)
            for c in containers_of(resource, group, template):
                mounted = {m["name"] for m in c.get("volumeMounts", [])} & api
                if c["name"] == AUTOSCALER:
                    assert len(mounted) == 1 and mounts_of(c).get(API_TOKEN_DIR) in mounted, at
                    sources = volumes_of(template)[mounted.pop()]["projected"]["sources"]
                    files = {i["path"] for s in sources for i in s.get("configMap", {}).get("items", [])}
                    files |= {s["serviceAccountToken"]["path"] for s in sources if "serviceAccountToken" in s}
                    assert {"token", "ca.crt"} <= files, at
                else:
                    assert not mounted, f"{at} {c['name']}: a Kubernetes API token"
            if group != "head" or autoscaler_container(resource) is None:
                assert not api, at


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
