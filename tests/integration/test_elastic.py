"""Elastic training across nodes: a 3-node Ray cluster in network namespaces (tests/netns.py), the head
without CPUs for workers and one worker slot on each other node. num_workers [1, 2]: a worker node dies,
the run goes on with 1 worker from the latest checkpoint (converted to DeepSpeed's universal format);
the node comes back, the group grows to 2 again; the run finishes with the global batch kept, its loss
falling, and its data position exactly where an uninterrupted run's would be."""

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


def test_two_workers_then_one_then_two_again(tmp_path, corpus):
    if reason := unavailable():
        pytest.skip(reason)
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": [1, 2], "resize_check_seconds": 3},
        run={"max_steps": STEPS, "log_every": 1}, checkpoint={"every_steps": EVERY, "keep": 2},
        failure={"max_failures": 2, "scheduled_events": "off"}))
    # gloo would take the address of the hostname, 127.0.0.1 in every namespace: name the interface,
    # as on a real cluster with several networks (docs/troubleshooting)
    # (Ray's workers take their environment from their node, not from the driver)
    with NetnsCluster(3, tmp_path / "cluster", num_cpus=[0, 1, 1],
                      env={"GLOO_SOCKET_IFNAME": "eth0", "SHARDRUN_STEP_DELAY": "0.1"}) as cluster:
        driver = cluster.exec(0, [PYTHON, "-m", "shardrun", "run", str(spec)], env={"RAY_ADDRESS": cluster.address},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out: list[str] = []
        killed = restarted = False
        deadline = time.monotonic() + 360
        for line in driver.stdout:
            out.append(line)
            step = re.search(r"step +(\d+)/", line)
            if not killed and step and int(step[1]) >= EVERY + 2:
                cluster.kill_node(2)
                killed = True
            if killed and not restarted and "with 1 worker (restart 1)" in line:
                cluster.start_node(2)
                restarted = True
            assert time.monotonic() < deadline, "".join(out)[-4000:]
        driver.wait(timeout=60)
    text = "".join(out)
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


def test_a_preempted_node_checkpoints_acknowledges_is_drained_and_the_group_goes_on_without_it(tmp_path, corpus):
    """Each node answers its own 127.0.0.1 (its network namespace), so a fake metadata service inside node 2
    is that VM's alone: its Preempt reaches only the rank on node 2, and every rank stops at the same step."""
    if reason := unavailable():
        pytest.skip(reason)
    port, trigger, acks = 18080, tmp_path / "announce", tmp_path / "acks"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": [1, 2]}, run={"max_steps": 60, "log_every": 1},
        checkpoint={"every_steps": 100}, failure={"max_failures": 1, "scheduled_events": f"http://127.0.0.1:{port}"}))
    with NetnsCluster(3, tmp_path / "cluster", num_cpus=[0, 1, 1],
                      env={"GLOO_SOCKET_IFNAME": "eth0", "SHARDRUN_STEP_DELAY": "0.2"}) as cluster:
        imds = cluster.exec(2, [PYTHON, str(Path(__file__).parents[1] / "fake_imds.py"), "--port", str(port),
                                "--vm-name", "shardrun-node-2", "--trigger", str(trigger), "--acks", str(acks)],
                            stdin=subprocess.DEVNULL, stdout=open(tmp_path / "imds.log", "w"), stderr=subprocess.STDOUT)
        driver = cluster.exec(0, [PYTHON, "-m", "shardrun", "run", str(spec)], env={"RAY_ADDRESS": cluster.address},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out: list[str] = []
        deadline = time.monotonic() + 300
        for line in driver.stdout:
            out.append(line)
            if not trigger.exists() and re.search(r"step +5/", line):
                trigger.touch()
            assert time.monotonic() < deadline, "".join(out)[-4000:]
        driver.wait(timeout=60)
        nodes = {n["node_ip"]: n["state"] for n in cluster.nodes()}
        imds.kill()
    text = "".join(out)
    assert driver.returncode == 0, text[-5000:]
    stopped = re.search(r"preemption: checkpoint of step (\d+) written", text)
    assert stopped, text[-5000:]
    assert re.search(rf"resuming from step {stopped[1]} with 1 worker \(restart 1\)", text), text[-5000:]
    assert len(acks.read_text().split()) == 1, "the event was not acknowledged"
    assert nodes[cluster.ips[2]] != "ALIVE", nodes  # drained: the restarted group was placed elsewhere
    assert json.loads((tmp_path / "runs/tiny/summary.json").read_text())["final_step"] == 60
