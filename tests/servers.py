"""Local object-storage servers for tests: Azurite (Azure Blob) and moto (S3), bound to 127.0.0.1 only.

Each server runs in its own process group (so teardown kills it and every child), answers on a free
port, and is reached through pyarrow's native filesystems with URIs that `pyarrow.fs.FileSystem.from_uri`
accepts as they are: endpoint, scheme and credentials all travel inside the URI, so the same string works
in this process, in a subprocess and on a Ray worker with no environment to pass along.

URI forms (pyarrow 26):

- S3 (moto): ``s3://KEY_ID:SECRET@bucket/path?endpoint_override=127.0.0.1:PORT&scheme=http&region=us-east-1``
  (the secret percent-encoded). pyarrow's S3 query keys: region, scheme, endpoint_override,
  allow_bucket_creation, allow_bucket_deletion, allow_delayed_open, tls_ca_file_path, tls_ca_dir_path,
  tls_verify_certificates, smart_defaults. Without a key in the URI the AWS SDK's default chain is used
  (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, instance metadata); AWS_ENDPOINT_URL_S3 is honoured
  too, so with `ObjectStore.env` set a plain ``s3://bucket/path`` reaches moto.
- Azure (Azurite): ``abfs://ACCOUNT@127.0.0.1:PORT/container/path?enable_tls=false&sv=...&sig=...``.
  pyarrow 26's AzureOptions::FromUri takes the account from the user part and the endpoint from
  host:port, and accepts only these query keys: blob_storage_authority, dfs_storage_authority,
  enable_tls, credential_kind (default | anonymous | cli | workload_identity | environment), tenant_id,
  client_id, client_secret, background_writes, and the SAS token fields (sv, ss, srt, sp, se, sig, ...).
  An account key cannot be given in a URI (a ``:password`` in the user part is parsed and then ignored,
  and pyarrow reads no AZURE_STORAGE_ACCOUNT_KEY variable), and token credentials refuse plain http, so
  the only URI credential Azurite can check is a SAS token: `AzuriteServer` signs an account SAS with
  the account key it started Azurite with. `ObjectStore.env` is therefore empty for Azure.

Azurite has no hierarchical namespace; pyarrow probes it once per container (a DFS
``?action=getAccessControl`` request on the blob port, answered 400) and falls back to flat-namespace
blob calls, which is what the tests exercise.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from helpers import REPO, free_port, kill_group

HOST = "127.0.0.1"
AZURITE_VERSION = "3.37.0"
AZURITE_BLOB = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"
S3_REGION = "us-east-1"
INSTALL_HINT = "run `make setup` (it installs moto[server] into .venv and Azurite into .tools/)"


class ServerError(RuntimeError):
    """A test server could not be started (not installed, exited early, or never answered)."""


class ServerProcess:
    """One server command in its own process group, its output in a log file, waited for until it answers."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict | None = None,
                 cwd: Path | None = None):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        t0 = time.monotonic()
        cmd = self.cmd
        if shutil.which("setpriv"):  # killed with us even if pytest dies before teardown (Linux, util-linux)
            cmd = ["setpriv", "--pdeathsig", "KILL", *cmd]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        try:
            self._wait_until_answers(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_until_answers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} before answering on "
                                  f"{HOST}:{self.port}; log:\n{self.log_tail()}")
            # http.client, not urllib: it never goes through an http_proxy from the environment.
            conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return  # any HTTP answer (Azurite says 400 to a bare GET) means it is serving
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} did not answer on {HOST}:{self.port} within {timeout:.0f}s; "
                                  f"log:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, grace=2)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _start_on_free_port(make, tries: int = 3) -> ServerProcess:
    """free_port() can race with another process taking the port; start again on a new one if so."""
    for attempt in range(tries):
        server = make(free_port())
        try:
            return server.start()
        except ServerError as e:
            if attempt + 1 == tries or "in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _join(container: str, path: str) -> str:
    path = path.strip("/")
    return f"{container}/{urllib.parse.quote(path, safe='/')}" if path else container


def fresh_name(prefix: str = "shardrun") -> str:
    """A valid bucket/container name (3-63 chars, lowercase letters, digits, hyphens) not used before."""
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass
class ObjectStore:
    """A fresh bucket (S3) or container (Azure) on a local test server.

    - ``base``: the URI of the bucket/container root, credentials and endpoint included (``uri("")``).
    - ``uri(path)``: the URI of a path in it that ``pyarrow.fs.FileSystem.from_uri`` accepts as is.
    - ``env``: environment variables for the credentials-from-environment route (S3 only; see the module
      docstring for why Azure has none). The fixtures do not put them in os.environ: ``uri()`` does not need
      them. Tests of the environment route set them with monkeypatch and use ``uri(path, credentials=False)``.
    - ``filesystem()``: ``(pyarrow filesystem, root path)`` for uploading test files, e.g.
      ``fs, root = store.filesystem(); pq.write_table(t, f"{root}/a.parquet", filesystem=fs)``.
    - ``fresh()``: another new, empty bucket/container on the same server.
    """

    server: S3Server | AzuriteServer
    container: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return self.server.scheme

    @property
    def base(self) -> str:
        return self.uri("")

    def uri(self, path: str = "", *, credentials: bool = True) -> str:
        return self.server.uri(self.container, path, credentials=credentials)

    def uri_with_wrong_key(self, path: str = "") -> str:
        """The same URI signed with a wrong secret: every request through it must be refused."""
        return self.server.uri(self.container, path, wrong_key=True)

    def filesystem(self):
        return self.server.filesystem(), self.container

    def fresh(self) -> ObjectStore:
        return self.server.new_store()


class S3Server:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1 with request signing enforced.

    Start-up creates an IAM user with an access key allowed s3:*, then switches moto's authentication on
    (POST /moto-api/reset-auth 0), so a wrong key id or secret is refused like on AWS.
    """

    scheme = "s3"

    def __init__(self, workdir: Path):
        if importlib.util.find_spec("moto") is None:
            raise ServerError(f"moto is not installed in {sys.executable}; {INSTALL_HINT}")
        self.workdir = workdir
        self.process = _start_on_free_port(lambda port: ServerProcess(
            "moto_server", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], port,
            workdir / "moto.log", env=_server_env(), cwd=workdir))
        self.port = self.process.port
        self.endpoint = f"http://{HOST}:{self.port}"
        try:
            self.access_key, self.secret_key = self._create_user_and_enforce_auth()
        except BaseException:
            self.stop()
            raise

    def _create_user_and_enforce_auth(self) -> tuple[str, str]:
        import boto3  # installed with moto

        kw = dict(endpoint_url=self.endpoint, region_name=S3_REGION,
                  aws_access_key_id="setup", aws_secret_access_key="setup")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="shardrun-tests")
        key = iam.create_access_key(UserName="shardrun-tests")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="shardrun-tests", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset-auth", body=b"0", headers={"Content-Type": "text/plain"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise ServerError(f"moto refused reset-auth: {resp.status} {body[:500]!r}")
        finally:
            conn.close()
        return key["AccessKeyId"], key["SecretAccessKey"]

    @property
    def env(self) -> dict[str, str]:
        """The AWS SDK's own variables: with these, ``s3://bucket/path`` (no query) reaches moto too."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": S3_REGION, "AWS_DEFAULT_REGION": S3_REGION,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def uri(self, bucket: str, path: str, *, credentials: bool = True, wrong_key: bool = False) -> str:
        query = f"endpoint_override={HOST}:{self.port}&scheme=http&region={S3_REGION}"
        userinfo = ""
        if credentials or wrong_key:
            secret = _wrong(self.secret_key) if wrong_key else self.secret_key
            userinfo = f"{_quote(self.access_key)}:{_quote(secret)}@"
        return f"s3://{userinfo}{_join(bucket, path)}?{query}"

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=S3_REGION,
                               scheme="http", endpoint_override=f"{HOST}:{self.port}",
                               allow_bucket_creation=True, allow_bucket_deletion=True)

    def new_store(self) -> ObjectStore:
        bucket = fresh_name()
        self.filesystem().create_dir(bucket)
        return ObjectStore(self, bucket, env=self.env)

    def stop(self) -> None:
        self.process.stop()


class AzuriteServer:
    """Azurite's blob service (npm azurite, from <repo>/.tools) on 127.0.0.1, in memory, telemetry off.

    Azurite is started with one account of our own (AZURITE_ACCOUNTS=name:key, a random key per run), so
    the well-known devstoreaccount1 key is not what makes the tests pass.
    """

    scheme = "abfs"
    account = "shardrun"
    sas_version = "2022-11-02"

    def __init__(self, workdir: Path, memory_limit_mb: int = 1024):
        if not AZURITE_BLOB.exists():
            raise ServerError(f"Azurite {AZURITE_VERSION} is not installed at {AZURITE_BLOB}; {INSTALL_HINT}")
        self.workdir = workdir
        self.account_key = base64.b64encode(secrets.token_bytes(64)).decode()
        env = _server_env(AZURITE_ACCOUNTS=f"{self.account}:{self.account_key}")

        def make(port: int) -> ServerProcess:
            return ServerProcess("azurite-blob", [
                str(AZURITE_BLOB), "--blobHost", HOST, "--blobPort", str(port),
                "--inMemoryPersistence", "--extentMemoryLimit", str(memory_limit_mb),
                "--disableTelemetry",  # Azurite 3.3x sends usage telemetry off-machine unless told not to
                "--disableProductStyleUrl", "--skipApiVersionCheck", "--loose",
            ], port, workdir / "azurite.log", env=env, cwd=workdir)

        self.process = _start_on_free_port(make)
        self.port = self.process.port
        self._sas = self.account_sas(self.account_key)
        self._wrong_sas = self.account_sas(_wrong(self.account_key))

    def account_sas(self, key: str, *, permissions: str = "rwdlacup", valid: dt.timedelta = dt.timedelta(days=1),
                    protocols: str = "https,http") -> str:
        """An account SAS token (blob service; service, container and object level), as a query string."""
        expiry = (dt.datetime.now(dt.timezone.utc) + valid).strftime("%Y-%m-%dT%H:%M:%SZ")
        fields = {"sv": self.sas_version, "ss": "b", "srt": "sco", "sp": permissions, "se": expiry,
                  "spr": protocols}
        # Account SAS string-to-sign since version 2020-12-06: account, permissions, services, resource
        # types, start, expiry, IP, protocols, version, encryption scope, each followed by a newline.
        to_sign = "".join(f"{v}\n" for v in (self.account, permissions, "b", "sco", "", expiry, "", protocols,
                                              self.sas_version, ""))
        digest = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
        fields["sig"] = base64.b64encode(digest).decode()
        return urllib.parse.urlencode(fields)

    @property
    def env(self) -> dict[str, str]:
        return {}

    def uri(self, container: str, path: str, *, credentials: bool = True, wrong_key: bool = False) -> str:
        if not (credentials or wrong_key):
            # Without a SAS pyarrow falls back to DefaultAzureCredential, which Azurite over http cannot serve
            # (and which would look for Azure identity endpoints); there is no environment route for a key.
            raise ValueError("an abfs:// URI for Azurite needs its SAS token: pyarrow 26 takes no account key "
                             "from a URI or the environment")
        sas = self._wrong_sas if wrong_key else self._sas
        return f"abfs://{self.account}@{HOST}:{self.port}/{_join(container, path)}?enable_tls=false&{sas}"

    def filesystem(self):
        from pyarrow import fs

        authority = f"{HOST}:{self.port}"
        return fs.AzureFileSystem(self.account, account_key=self.account_key,
                                  blob_storage_authority=authority, dfs_storage_authority=authority,
                                  blob_storage_scheme="http", dfs_storage_scheme="http")

    def new_store(self) -> ObjectStore:
        container = fresh_name()
        self.filesystem().create_dir(container)
        return ObjectStore(self, container, env=self.env)

    def stop(self) -> None:
        self.process.stop()


def _wrong(key: str) -> str:
    """The same-shaped secret with its first character changed (base64 keys stay valid base64)."""
    return ("B" if key[0] == "A" else "A") + key[1:]


def _server_env(**extra: str) -> dict:
    """The servers' environment: loopback never proxied, no cloud credentials of the developer's inherited."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "AZURE_", "AZURITE_")) and k.lower() not in ("http_proxy", "https_proxy")}
    env.update(NO_PROXY=loopback_no_proxy(env.get("NO_PROXY")), no_proxy=loopback_no_proxy(env.get("no_proxy")))
    env.update(extra)
    return env


def loopback_no_proxy(current: str | None) -> str:
    """A NO_PROXY value that also exempts the loopback addresses the servers listen on."""
    items = [x for x in (current or "").split(",") if x]
    return ",".join(items + [h for h in (HOST, "localhost") if h not in items])


MLFLOW = REPO / ".tools" / "mlflow" / "bin" / "mlflow"


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact root (its own venv, .tools/mlflow:
    mlflow's pyarrow pin conflicts with the project's). `pause()`/`resume()` stop and continue it (SIGSTOP,
    SIGCONT): a server that stops answering, its connections left open."""

    def __init__(self, workdir: Path):
        if not MLFLOW.exists():
            raise ServerError(f"the MLflow server is not installed at {MLFLOW}; run `make setup`")
        workdir.mkdir(parents=True, exist_ok=True)

        def make(port: int) -> ServerProcess:
            return ServerProcess("mlflow", [
                str(MLFLOW), "server", "--host", HOST, "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                "--default-artifact-root", str(workdir / "artifacts"),
            ], port, workdir / "mlflow.log", env=_server_env(MLFLOW_DISABLE_TELEMETRY="true",
                                                              DO_NOT_TRACK="true"), cwd=workdir)

        self.process = _start_on_free_port(make)
        self.uri = f"http://{HOST}:{self.process.port}"

    def pause(self) -> None:
        os.killpg(self.process.proc.pid, signal.SIGSTOP)  # the whole group (its workers) stops answering

    def resume(self) -> None:
        os.killpg(self.process.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.stop()
