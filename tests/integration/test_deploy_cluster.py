"""The deploy bootstrap on a 3-node Ray cluster in network namespaces (tests/netns.py): every node is
deploy/bootstrap/ray-node.sh in the foreground, as its systemd unit runs it on the VMs, with the cluster's
token handed over through fetch-token.sh's test hook instead of Key Vault.

- The nodes run with token auth on, the token from the file that fetch-token.sh wrote (not the harness's).
- `ray job submit` without the token, or with a wrong one, is refused.
- `ray job submit` of a short shardrun job with the token succeeds, one rank on each worker node; while it
  runs, the metrics discovery file lists both ranks at their nodes' addresses and the driver at the head's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_spec, write_spec
from netns import BIN, PYTHON, RAY, NetnsCluster, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RAY_NODE = REPO / "deploy" / "bootstrap" / "ray-node.sh"
STEPS, STEP_DELAY = 8, 0.5  # the discovery file exists for at least STEPS x STEP_DELAY seconds

# Every job the dashboard knows, by submission id, with its status (the Jobs SDK, token from the environment).
JOB_STATUSES = """
import json, sys
from ray.job_submission import JobSubmissionClient
print(json.dumps({job.submission_id: job.status.value for job in JobSubmissionClient(sys.argv[1]).list_jobs()}))
"""


class BootstrapCluster(NetnsCluster):
    """A NetnsCluster whose nodes are started by `ray-node.sh head|worker` with SHARDRUN_NO_SYSTEMD=1."""

    def __init__(self, n_nodes: int, tmp_path: Path, **kwargs):
        super().__init__(n_nodes, tmp_path, **kwargs)
        # What Key Vault would hold; fetch-token.sh copies it to each node's token file (SHARDRUN_TOKEN_SOURCE_FILE).
        self.token_source = self.tmp_path / "cluster-token"
        self.token_source.touch(mode=0o600)
        self.token_source.write_text(self.token + "\n")
        # Ray Train's placement group cleaner asks the state API, which finds the cluster through this variable,
        # else /tmp/ray/ray_current_cluster: a VM's `ray start` writes that file, but here each node writes its
        # own --temp-dir's and /tmp/ray may name another cluster, unreachable from here (a stall at every run's end).
        self.env.setdefault("RAY_API_SERVER_ADDRESS", self.dashboard_url)

    def token_file(self, i: int) -> Path:
        """Where fetch-token.sh writes node i's token (/etc/shardrun/ray-auth-token on a VM)."""
        return self.tmp_path / f"n{i}" / "ray-auth-token"

    def node_command(self, i: int) -> list[str]:
        ray_args = (f"--num-cpus={self.num_cpus[i]} --num-gpus=0 --object-store-memory={self.object_store_memory} "
                    f"--temp-dir={self.temp_dir(i)}")
        # The harness's RAY_AUTH_TOKEN would spare ray-node.sh from fetching the token: the nodes go without it.
        return ["env", "-u", "RAY_AUTH_TOKEN",
                f"SHARDRUN_ENV_FILE={self.tmp_path / 'no-bootstrap.env'}", "SHARDRUN_NO_SYSTEMD=1",
                f"SHARDRUN_VENV={BIN.parent}", f"SHARDRUN_NODE_IP={self.ips[i]}",
                f"SHARDRUN_HEAD_ADDRESS={self.ips[0]}",
                f"SHARDRUN_TOKEN_SOURCE_FILE={self.token_source}", f"SHARDRUN_TOKEN_FILE={self.token_file(i)}",
                f"SHARDRUN_RAY_ARGS={ray_args}", "bash", str(RAY_NODE), "head" if i == 0 else "worker"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := unavailable():
        pytest.skip(reason)
    # The head trains nothing (the VMs' head has no CPU for Ray either); one worker slot on each other node.
    # gloo would take the address of the host name, 127.0.0.1 in every namespace: name the interface. Ray's
    # workers take their environment from their node, so the step delay goes there.
    with BootstrapCluster(3, tmp_path_factory.mktemp("deploy"), num_cpus=[0, 1, 1],
                          env={"GLOO_SOCKET_IFNAME": "eth0", "SHARDRUN_STEP_DELAY": str(STEP_DELAY)}) as started:
        print(f"3 bootstrapped nodes alive {started.start_seconds:.1f}s after the head started")
        yield started


def client_env(tmp_path: Path, **auth: str) -> dict[str, str | None]:
    """A client's environment with only the given auth settings, and a HOME without ~/.ray/auth_token."""
    return {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None, "HOME": str(tmp_path), **auth}


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(entry.split("=", 1) for entry in raw.split("\0") if "=" in entry)


def program(pid: int) -> bytes:
    """The path a process runs (empty when it is gone meanwhile)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


def raylet_pid(cluster: NetnsCluster, i: int) -> int:
    pids = [pid for pid in cluster.pids(i) if program(pid).endswith(b"/raylet")]
    assert len(pids) == 1, f"node {i}: raylets {pids}"
    return pids[0]


def submit(cluster: NetnsCluster, args: list[str], env: dict[str, str | None], **kwargs):
    return cluster.run(0, [RAY, "job", "submit", "--address", cluster.dashboard_url, *args], env=env, **kwargs)


def wait_for_targets(path: Path, submitted: subprocess.Popen, log: Path, timeout: float) -> list[dict]:
    """The discovery file's groups as soon as the run writes it (it goes when the run ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())  # written whole (a rename): never half a file
        except FileNotFoundError:
            pass
        if submitted.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{path} never listed the ranks while the job ran:\n"
                         + log.read_text(errors="replace")[-6000:])


def host(address: str) -> str:
    return re.sub(r":\d+$", "", address)


def test_nodes_take_the_token_that_fetch_token_wrote(cluster):
    for i in range(cluster.n_nodes):
        token_file = cluster.token_file(i)
        assert token_file.read_text() == cluster.token
        assert token_file.stat().st_mode & 0o777 == 0o600
        env = process_env(raylet_pid(cluster, i))
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN_PATH"] == str(token_file)
        assert "RAY_AUTH_TOKEN" not in env


def test_a_submission_without_the_right_token_is_refused(cluster, tmp_path):
    job = ["--", "python", "-c", "print('job ran')"]
    refused = submit(cluster, job, client_env(tmp_path), timeout=90, check=False)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout, refused.stdout[-3000:]
    wrong = client_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    refused = submit(cluster, job, wrong, timeout=90, check=False)
    assert refused.returncode != 0 and "Authentication failed" in refused.stdout, refused.stdout[-3000:]


def test_job_runs_across_the_workers_and_lists_its_ranks_for_prometheus(cluster, tmp_path, corpus):
    job_dir, targets = tmp_path / "job", tmp_path / "targets"
    job_dir.mkdir()
    write_spec(job_dir / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", name="deploy-cluster",
        scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
        run={"max_steps": STEPS, "log_every": 1}, checkpoint={"every_steps": STEPS},
        # 0.0.0.0: each endpoint is advertised at its node's address
        metrics={"host": "0.0.0.0", "targets_dir": str(targets)}))
    # the client has the token as users keep it: in a file (Ray's default is ~/.ray/auth_token)
    env = client_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_source))
    job_id = f"deploy-{os.getpid()}"
    log = tmp_path / "submit.log"
    with open(log, "w") as out:
        submitted = cluster.exec(0, [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id",
                                     job_id, "--working-dir", str(job_dir), "--",
                                     "python", "-m", "shardrun", "run", "job.yaml"],
                                 env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    listed = wait_for_targets(targets / "deploy-cluster.json", submitted, log, timeout=150)
    submitted.wait(timeout=120)
    text = log.read_text(errors="replace")
    assert submitted.returncode == 0, text[-6000:]
    assert f"Job '{job_id}' succeeded" in text and "starting with 2 workers" in text, text[-6000:]
    assert f"step {STEPS:>6}/{STEPS}" in text, text[-6000:]

    ranks = {group["labels"]["rank"]: group["targets"][0] for group in listed if "rank" in group["labels"]}
    drivers = [group["targets"][0] for group in listed if group["labels"].get("role") == "driver"]
    assert sorted(ranks) == ["0", "1"], listed
    assert sorted(host(address) for address in ranks.values()) == cluster.ips[1:], listed  # one rank per worker
    assert [host(address) for address in drivers] == [cluster.ips[0]], listed
    assert not (targets / "deploy-cluster.json").exists(), "the run left its targets in Prometheus's discovery"

    statuses = json.loads(cluster.run(0, [PYTHON, "-c", JOB_STATUSES, cluster.dashboard_url], env=env,
                                      timeout=60).stdout.strip().splitlines()[-1])
    assert statuses == {job_id: "SUCCEEDED"}, statuses  # and nothing from the refused submissions
