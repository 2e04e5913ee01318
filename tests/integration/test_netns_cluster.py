"""A 3-node Ray cluster in network namespaces (tests/netns.py): placement, token auth, node failures."""

import json
import subprocess
import time

import pytest
from netns import PYTHON, RAY, NetnsCluster, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# One task pinned to each alive node reports where it ran: Ray's idea of its node's address, the source
# address the kernel picks for reaching the head, its network namespace, and that shardrun imports there.
WHERE_TASKS_RUN = """
import json, os, socket, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=1)
def where(head_ip):
    import shardrun
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((head_ip, 9))  # a UDP connect sends nothing; it only picks the route and source address
        source = s.getsockname()[0]
    return {"ray_ip": ray.util.get_node_ip_address(), "source_ip": source,
            "netns": os.stat("/proc/self/ns/net").st_ino, "shardrun": shardrun.__name__}

ray.init(address=sys.argv[1])
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)) for node in alive]
print(json.dumps(ray.get([task.remote(sys.argv[2]) for task in pinned], timeout=120)))
"""

# The dashboard's answer to no token, a wrong token and the right one (RAY_AUTH_TOKEN, set by the cluster).
HTTP_STATUSES = """
import os, sys, urllib.error, urllib.request
for token in (None, "wrong", os.environ["RAY_AUTH_TOKEN"]):
    headers = {"Authorization": "Bearer " + token} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=10) as reply:
            print(reply.status)
    except urllib.error.HTTPError as error:
        print(error.code)
"""


def ray_processes(cluster: NetnsCluster) -> str:
    """Processes whose command line names one of the cluster's Ray temp dirs."""
    return subprocess.run(["pgrep", "-af", str(cluster.ray_root)], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := unavailable():
        pytest.skip(reason)
    with NetnsCluster(3, tmp_path_factory.mktemp("netns")) as started:
        print(f"3 nodes alive {started.start_seconds:.1f}s after the head started")
        yield started
    assert not ray_processes(started), "Ray processes outlived the cluster"
    assert not any(started.pids(i) for i in range(3))
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert started.name not in listed, "namespaces outlived the cluster"


def test_each_node_runs_tasks_at_its_own_address(cluster):
    out = cluster.run(0, [PYTHON, "-c", WHERE_TASKS_RUN, cluster.address, cluster.ips[0]], timeout=180).stdout
    placed = json.loads(out.strip().splitlines()[-1])
    assert sorted(task["ray_ip"] for task in placed) == sorted(cluster.ips)
    assert all(task["source_ip"] == task["ray_ip"] for task in placed), placed
    assert len({task["netns"] for task in placed}) == 3, "two nodes share a network namespace"
    assert {task["shardrun"] for task in placed} == {"shardrun"}


def test_only_clients_with_the_token_get_in(cluster, tmp_path):
    statuses = cluster.run(0, [PYTHON, "-c", HTTP_STATUSES, f"{cluster.dashboard_url}/api/jobs/"], timeout=60)
    assert statuses.stdout.split() == ["401", "403", "200"]

    # one connection attempt instead of Ray's 20 (a second each) before the driver gives up
    wrong_token = {"RAY_AUTH_TOKEN": "0" * 64, "RAY_gcs_server_port_wait_time_s": "1"}
    driver = cluster.run(0, [PYTHON, "-c", "import ray, sys; ray.init(address=sys.argv[1])", cluster.address],
                         env=wrong_token, timeout=90, check=False)
    assert driver.returncode != 0 and "InvalidAuthToken" in driver.stdout, driver.stdout[-3000:]

    # no token anywhere: not in the environment, and a HOME without ~/.ray/auth_token
    no_token = {"RAY_AUTH_TOKEN": None, "RAY_AUTH_MODE": None, "HOME": str(tmp_path)}
    submit = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--", "python", "-c", "print('job ran')"]
    refused = cluster.run(0, submit, env=no_token, timeout=90, check=False)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout, refused.stdout[-3000:]
    accepted = cluster.run(0, submit, timeout=180)
    assert "job ran" in accepted.stdout and "succeeded" in accepted.stdout


def test_a_killed_node_is_dead_within_seconds(cluster):
    began = time.monotonic()
    cluster.kill_node(2)
    assert cluster.pids(2) == []
    assert str(cluster.temp_dir(2)) not in ray_processes(cluster)
    table = cluster.wait_nodes(alive=2, timeout=30)
    print(f"killed node seen dead after {time.monotonic() - began:.1f}s")
    assert [row["node_ip"] for row in table if row["state"] == "DEAD"] == [cluster.ips[2]]


def test_a_cut_off_node_is_dead_within_seconds(cluster):
    began = time.monotonic()
    cluster.cut_node(1)
    table = cluster.wait_nodes(alive=1, timeout=60)
    print(f"cut-off node seen dead after {time.monotonic() - began:.1f}s")
    assert cluster.pids(1), "cutting a node off killed its processes"
    assert sorted(row["node_ip"] for row in table if row["state"] == "DEAD") == sorted(cluster.ips[1:])
