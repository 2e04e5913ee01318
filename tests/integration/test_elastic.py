"""Failures across nodes, on a 3-node Ray cluster in network namespaces (tests/netns.py): the head without
CPUs for workers, one worker slot on each other node, num_workers [1, 2].

- A worker node dies: the run goes on with 1 worker from the latest checkpoint (converted to DeepSpeed's
  universal format); the node comes back and the group grows to 2 again; the run finishes with the global
  batch kept, its loss falling, and its data position exactly where an uninterrupted run's would be.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_spec, write_spec
from netns import PYTHON, NetnsCluster, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

STEPS, EVERY, BATCH = 200, 10, 8  # global batch: micro-batch 4 x 2 workers, or 4 x 2 micro-steps x 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := unavailable():
        pytest.skip(reason)
    # gloo would take the address of the host name, 127.0.0.1 in every namespace: name the interface, as on
    # a real cluster with several networks. Ray's workers take their environment from their node. After a
    # node loss, Ray Train first tries to start the group at its old size and gives up after
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) before it goes on with fewer.
    with NetnsCluster(3, tmp_path_factory.mktemp("cluster"), num_cpus=[0, 1, 1],
                      env={"GLOO_SOCKET_IFNAME": "eth0", "SHARDRUN_STEP_DELAY": "0.1",
                           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}) as started:
        yield started
    # the harness leaves nothing behind: no Ray process, no namespace
    leftover = subprocess.run(["pgrep", "-af", str(started.ray_root)], capture_output=True, text=True).stdout
    assert not leftover and not any(started.pids(i) for i in range(3)), leftover
    assert started.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def both_workers_up(cluster: NetnsCluster) -> None:
    if len([n for n in cluster.nodes() if n["state"] == "ALIVE"]) < 3:
        cluster.start_node(2)
        cluster.wait_nodes(alive=3, timeout=90)


def drive(cluster: NetnsCluster, spec: Path, on_line, timeout: float = 360) -> tuple[subprocess.Popen, str]:
    """`shardrun run spec` in the head's namespace; on_line(line) sees each line of its output."""
    driver = cluster.exec(0, [PYTHON, "-m", "shardrun", "run", str(spec)], env={"RAY_ADDRESS": cluster.address},
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    deadline = time.monotonic() + timeout
    for line in driver.stdout:
        out.append(line)
        on_line(line, driver)
        assert time.monotonic() < deadline, "".join(out)[-4000:]
    driver.wait(timeout=60)
    return driver, "".join(out)


def test_two_workers_then_one_then_two_again(cluster, tmp_path, corpus):
    both_workers_up(cluster)
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": [1, 2], "resize_check_seconds": 3},
        run={"max_steps": STEPS, "log_every": 1}, checkpoint={"every_steps": EVERY, "keep": 2},
        failure={"max_failures": 2, "scheduled_events": "off"}))
    seen = {"killed": False, "restarted": False}

    def on_line(line, driver):
        step = re.search(r"step +(\d+)/", line)
        if not seen["killed"] and step and int(step[1]) >= EVERY + 2:
            cluster.kill_node(2)
            seen["killed"] = True
        if seen["killed"] and not seen["restarted"] and "with 1 worker (restart 1)" in line:
            cluster.start_node(2)
            seen["restarted"] = True

    driver, text = drive(cluster, spec, on_line)
    assert driver.returncode == 0, text[-5000:]
    shrunk = re.search(r"resuming from step (\d+) with 1 worker \(restart 1\); the checkpoint was written by "
                       r"2 workers, converted to DeepSpeed's universal format; now 2 micro-batches per step, "
                       rf"a global batch of {BATCH}", text)
    grown = re.search(r"resuming from step (\d+) with 2 workers \(restart 2\); the checkpoint was written by "
                      r"1 worker, converted to DeepSpeed's universal format; now 1 micro-batch per step, "
                      rf"a global batch of {BATCH}", text)
    assert shrunk and grown and EVERY <= int(shrunk[1]) < int(grown[1]) < STEPS, text[-5000:]

    run = tmp_path / "runs/tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["restarts"] == 2, summary
    losses = [json.loads(row)["loss"] for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses
    # every step took the next BATCH samples: the position is the uninterrupted run's (2 partitions)
    final = torch.load(run / f"checkpoint_{STEPS:08d}/rank_0.pt", weights_only=False)
    assert final["train"]["samples"] == STEPS * BATCH
    assert (final["data"]["epoch"], final["data"]["offset"], final["data"]["partitions"]) == (0, STEPS * BATCH // 2, 2)
