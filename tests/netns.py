"""A multi-node Ray cluster on one machine: one Linux network namespace per Ray node.

Each node is a network namespace with one veth into a bridge that lives in a private "switch" namespace,
so the nodes see each other on 198.18.<s>.<i>/24 (RFC 2544 benchmarking space) and nothing else: the root
namespace has no route to them and they have none to the outside. Drivers (`ray job submit`, python
scripts) run inside the head's namespace through `NetnsCluster.exec` / `NetnsCluster.run`.

Every node is a `ray start --block` under `ip netns exec`, with token authentication on and its own
`--temp-dir`. A node's processes are exactly the processes in its namespace (every process Ray spawns
inherits it, whatever its process group), which is how `kill_node` and `stop` find them all.

Clean-up happens in `stop()`, which `with`, a finalizer and atexit call; and if this Python process dies
without running it (SIGKILL, SIGTERM), a reaper process started with the cluster kills the namespaces'
processes and deletes the namespaces. Needs root and iproute2; `unavailable()` says why not.

Run as `python netns.py reap OWNER_PID TEMP_ROOT NETNS...` it is that reaper.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
PYTHON = str(BIN / "python")
GCS_PORT = 6379  # every node has its own port space, so fixed ports cannot collide
DASHBOARD_PORT = 8265
NETNS_DIR = Path("/run/netns")

# How fast the GCS declares a silent node dead (defaults: 5 s delay, every 3 s, 10 s timeout, 5 misses).
# A killed raylet refuses connections, so each check fails at once: dead in about period x threshold.
# A cut node does not answer at all: each check waits for the timeout.
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}

_clusters = itertools.count()

_CONNECT = "import socket, sys; host, port = sys.argv[1].split(':'); socket.create_connection((host, int(port)), 2)"

# Polls the state API of the dashboard it is given; run inside the head's namespace.
_LIST_NODES = """
import json, os, sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/v0/nodes?limit=10000&detail=false",
                                 headers={"Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]})
with urllib.request.urlopen(request, timeout=10) as reply:
    print(json.dumps(json.load(reply)["data"]["result"]["result"]))
"""


class NetnsError(RuntimeError):
    """The namespaces could not be set up, or a node did not start or would not die."""


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"shardrun-probe-{os.getpid()}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None if created.returncode == 0 else f"`ip netns add` failed: {created.stderr.strip()}"


class NetnsCluster:
    """`n_nodes` Ray nodes, node 0 the head, each in its own network namespace (a context manager)."""

    def __init__(self, n_nodes: int, tmp_path: Path, *, num_cpus: int | Sequence[int] = 1,
                 object_store_memory: int = 100 * 2**20, env: Mapping[str, str] | None = None,
                 node_args: Mapping[int, Sequence[str]] | None = None, start_timeout: float = 180.0):
        """Plan the cluster; `start()` (or `with`) builds it. `env` goes to every node and command run in one."""
        if not 1 <= n_nodes <= 250:
            raise ValueError(f"n_nodes must be 1..250, got {n_nodes}")
        self.n_nodes = n_nodes
        self.tmp_path = Path(tmp_path)
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self.num_cpus = [num_cpus] * n_nodes if isinstance(num_cpus, int) else list(num_cpus)
        if len(self.num_cpus) != n_nodes:
            raise ValueError(f"num_cpus has {len(self.num_cpus)} entries for {n_nodes} nodes")
        self.object_store_memory = object_store_memory
        self.env = dict(env or {})
        self.node_args = {i: list(args) for i, args in (node_args or {}).items()}
        self.start_timeout = start_timeout
        self.token = os.urandom(32).hex()
        # Each cluster has its own bridge, so addresses cannot clash; the subnet still differs per
        # process and cluster so that logs of parallel runs are told apart.
        serial = next(_clusters)
        subnet = (os.getpid() * 8 + serial) % 512
        self.subnet = f"198.{18 + subnet // 256}.{subnet % 256}"
        self.ips = [f"{self.subnet}.{i + 1}" for i in range(n_nodes)]
        self.name = f"shardrun-{os.getpid()}-{serial}"
        self.switch = f"{self.name}-sw"
        self.namespaces = [f"{self.name}-n{i}" for i in range(n_nodes)]
        self.procs: list[subprocess.Popen | None] = [None] * n_nodes
        self.start_seconds: float | None = None
        # Ray's unix sockets live under <temp dir>/session_<date>_<pid>/sockets/ and their paths must stay
        # under 107 bytes, so the nodes' temp dirs sit in a short directory; stop() copies the logs to tmp_path.
        self.ray_root = Path(tempfile.mkdtemp(prefix="sr-"))
        self._started: list[subprocess.Popen] = []
        self._reaper: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _teardown, [self.switch, *self.namespaces], self._started,
                                           self._reaper, self.ray_root, self.tmp_path / "logs")

    # -- addresses and environment ------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address, for `ray.init(address=...)` and `ray start --address` inside a namespace."""
        return f"{self.ips[0]}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard (Ray Jobs, state API) URL, for `ray job submit --address` inside a namespace."""
        return f"http://{self.ips[0]}:{DASHBOARD_PORT}"

    def temp_dir(self, i: int) -> Path:
        """Node i's Ray `--temp-dir` (its session_latest/logs hold the node's logs while it runs)."""
        return self.ray_root / f"n{i}"

    def node_env(self, i: int) -> dict[str, str]:
        """The environment of node i's processes: this venv first on PATH, the token, `env` on top."""
        # without PYTEST_* Ray behaves as in production (ray._private.utils.is_in_test looks for them)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH") and not k.startswith("PYTEST_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        # Ray's state API (Ray Train's placement-group cleaner uses it) finds the cluster through
        # /tmp/ray/ray_current_cluster, not under the nodes' --temp-dir: name the dashboard instead, or it
        # asks a cluster of some earlier run and stalls the end of every Ray Train run
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        env.update(HEALTH_CHECK_ENV)
        env.update(self.env)
        return env

    def node_command(self, i: int) -> list[str]:
        """argv that runs node i in the foreground; override to start nodes another way (a bootstrap script)."""
        argv = [RAY, "start", "--block", f"--node-ip-address={self.ips[i]}", f"--num-cpus={self.num_cpus[i]}",
                "--num-gpus=0", f"--object-store-memory={self.object_store_memory}",
                f"--temp-dir={self.temp_dir(i)}", "--disable-usage-stats"]
        if i == 0:
            argv += ["--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                     f"--dashboard-host={self.ips[0]}", f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            argv += [f"--address={self.address}"]
        return argv + self.node_args.get(i, [])

    # -- life cycle ---------------------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> NetnsCluster:
        """Start the reaper, build the network, start the head, then the workers; wait until all are alive."""
        self._reaper.append(subprocess.Popen(
            [sys.executable, __file__, "reap", str(os.getpid()), str(self.ray_root), self.switch,
             *self.namespaces], stdin=subprocess.DEVNULL, start_new_session=True))
        self._build_network()
        began = time.monotonic()
        deadline = began + self.start_timeout
        self.start_node(0)
        # a joining node gives up on the GCS after about 20 s, less than a loaded machine may take to start it
        self._poll(self._gcs_answers, deadline, "the head's GCS did not answer")
        for i in range(1, self.n_nodes):
            self.start_node(i)
        self._poll(lambda: len(self._alive(self._try_nodes())) == self.n_nodes, deadline,
                   f"not all {self.n_nodes} nodes became alive")
        self.start_seconds = time.monotonic() - began
        return self

    def _gcs_answers(self) -> bool:
        return self.run(0, [PYTHON, "-c", _CONNECT, self.address], timeout=30, check=False).returncode == 0

    def _poll(self, ready, deadline: float, failure: str) -> None:
        while not ready():
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    raise NetnsError(f"node {i} exited with {proc.returncode}:\n{self.log_tail(i)}")
            if time.monotonic() > deadline:
                raise NetnsError(f"{failure} within {self.start_timeout:.0f}s:\n"
                                 + "\n".join(self.log_tail(i, 1500) for i in range(self.n_nodes)))
            time.sleep(0.5)

    def start_node(self, i: int) -> subprocess.Popen:
        """(Re)start node i with `node_command(i)` in the background, its output in tmp_path/n<i>.log."""
        with open(self.tmp_path / f"n{i}.log", "a") as log:
            self.procs[i] = self.exec(i, self.node_command(i), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        return self.procs[i]

    def stop(self) -> None:
        """Kill every process of every node, delete namespaces, bridge and veths, keep the logs (idempotent)."""
        self._finalizer()

    # -- running things on nodes --------------------------------------------------------------------

    def exec(self, node: int, argv: Sequence[str], *, env: Mapping[str, str | None] | None = None,
             **popen_kwargs) -> subprocess.Popen:
        """Start argv in node's namespace, in a new session; env entries override node_env (None unsets)."""
        full_env = self.node_env(node)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[node], *argv], env=full_env,
                                **popen_kwargs)
        self._started[:] = [p for p in self._started if p.poll() is None] + [proc]  # the same list as the finalizer's
        return proc

    def run(self, node: int, argv: Sequence[str], *, timeout: float, env: Mapping[str, str | None] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run argv in node's namespace to the end (output and errors together in .stdout); kill it on timeout."""
        proc = self.exec(node, argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            out, _ = proc.communicate()
            raise NetnsError(f"{list(argv)} on node {node} timed out after {timeout}s:\n{out[-4000:]}") from None
        if check and proc.returncode != 0:
            raise NetnsError(f"{list(argv)} on node {node} exited {proc.returncode}:\n{out[-6000:]}")
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, "")

    # -- faults -------------------------------------------------------------------------------------

    def pids(self, i: int) -> list[int]:
        """Every live process of node i (the processes in its network namespace)."""
        return _netns_pids(self.namespaces[i])

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of node i (raylet, workers, agents, commands run there) and check none is left."""
        if self.procs[i] is not None:
            _killpg(self.procs[i])
        survivors = _kill_netns(self.namespaces[i])
        if self.procs[i] is not None:
            self.procs[i].wait(timeout=10)
            self.procs[i] = None
        if survivors:
            raise NetnsError(f"node {i}: processes {survivors} survived SIGKILL")

    def cut_node(self, i: int) -> None:
        """Unplug node i from the bridge: its processes live on, but no packet reaches or leaves it."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def heal_node(self, i: int) -> None:
        """Plug node i back in; if the GCS declared it dead meanwhile, its raylet exits (then `start_node(i)`)."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")

    # -- the node table -----------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """The node table from the head's dashboard (state API rows: node_id, node_ip, state ALIVE/DEAD, ...)."""
        out = self.run(0, [PYTHON, "-c", _LIST_NODES, self.dashboard_url], timeout=30).stdout
        return json.loads(out.strip().splitlines()[-1])

    def wait_nodes(self, alive: int, timeout: float = 60.0) -> list[dict]:
        """Poll the node table until exactly `alive` nodes are ALIVE; return that table."""
        deadline = time.monotonic() + timeout
        while True:
            table = self._try_nodes()
            if table is not None and len(self._alive(table)) == alive:
                return table
            if time.monotonic() > deadline:
                raise NetnsError(f"not {alive} nodes alive after {timeout}s; node table: {table}")
            time.sleep(0.5)

    def _try_nodes(self) -> list[dict] | None:
        try:
            return self.nodes()
        except (NetnsError, ValueError, IndexError):
            return None  # the dashboard is not up (yet)

    @staticmethod
    def _alive(table: list[dict] | None) -> list[dict]:
        return [row for row in table or [] if row.get("state") == "ALIVE"]

    def log_tail(self, i: int, chars: int = 3000) -> str:
        """The end of node i's `ray start` output."""
        path = self.tmp_path / f"n{i}.log"
        return f"--- {path}\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "(none)")

    # -- network ------------------------------------------------------------------------------------

    def _build_network(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            _ip("netns", "add", ns)
            # created inside the switch namespace, so these short names cannot clash with anyone's
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _killpg(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that proc leads; nothing when proc is already reaped or leads no group.

    A reaped pid may belong to someone else by now (pid_max can be as low as 32768), and a proc started
    without a session of its own shares the caller's group, which must not be killed.
    """
    if proc.returncode is not None:
        return
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _netns_pids(name: str) -> list[int]:
    """The processes whose network namespace is the named one (what `ip netns pids` prints)."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ns = os.stat(f"/proc/{entry.name}/ns/net")
            except OSError:
                continue  # gone, or a zombie
            if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
                pids.append(int(entry.name))
    return pids


def _kill_netns(name: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL the namespace's processes until none is left (they may fork meanwhile); return survivors."""
    deadline = time.monotonic() + timeout
    while pids := _netns_pids(name):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.05)
    return []


def _teardown(namespaces: list[str], started: list[subprocess.Popen], reaper: list[subprocess.Popen],
              ray_root: Path, logs: Path | None) -> None:
    """Kill, delete and tidy everything a cluster made; each step goes on even when another fails."""
    for proc in started:
        proc.poll()
        _killpg(proc)  # a command still between `ip netns exec` and entering its namespace
    for name in namespaces:
        _kill_netns(name)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if logs is not None:
        for session in ray_root.glob("n*/session_latest"):
            try:
                shutil.copytree(session / "logs", logs / session.parent.name, dirs_exist_ok=True)
            except (OSError, shutil.Error):
                pass  # the logs are a courtesy; clean-up goes on
    shutil.rmtree(ray_root, ignore_errors=True)
    for proc in reaper:
        _killpg(proc)
        proc.wait()


def _reap(owner: int, ray_root: str, namespaces: list[str]) -> None:
    """Wait for the owner process to end, then tear its cluster down (a no-op after a clean stop)."""
    try:
        select.select([os.pidfd_open(owner)], [], [])
    except ProcessLookupError:
        pass  # gone already
    _teardown(namespaces, [], [], Path(ray_root), None)


if __name__ == "__main__" and sys.argv[1:2] == ["reap"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _reap(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
