"""Failures across nodes, on a 3-node Ray cluster in network namespaces (tests/netns.py): the head without
CPUs for workers, one worker slot on each other node, num_workers [1, 2].

- A worker node dies: the run goes on with 1 worker from the latest checkpoint (converted to DeepSpeed's
  universal format); the node comes back and the group grows to 2 again; the run finishes with the global
  batch kept, its loss falling, and its data position exactly where an uninterrupted run's would be.
- A worker node is preempted (Azure Scheduled Events): every rank checkpoints within the notice, the event
  is acknowledged, the node is drained in Ray; when the node goes (the test takes it, as Azure would), the
  group restarts without it, counted as a preemption; then SIGTERM to the driver (what `ray job stop`
  sends) checkpoints and stops the run, exit 143.
- A worker node is drained by someone else (`ray drain-node`, as Ray's autoscaler does): the ranks
  checkpoint at once and train on; when the node goes, the group resumes from that checkpoint.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_spec, write_spec
from netns import PYTHON, NetnsCluster, unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

STEPS, EVERY, BATCH = 120, 10, 8  # global batch: micro-batch 4 x 2 workers, or 4 x 2 micro-steps x 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := unavailable():
        pytest.skip(reason)
    # gloo would take the address of the host name, 127.0.0.1 in every namespace: name the interface, as on
    # a real cluster with several networks. Ray's workers take their environment from their node. After a
    # node loss, Ray Train tries to start the group at its old size until its AutoscalingCoordinator, which
    # looks at the node table every 20 s, sees the node gone; each try gives up after
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default; 6 s tries waste the least of those 20 s).
    with NetnsCluster(3, tmp_path_factory.mktemp("cluster"), num_cpus=[0, 1, 1],
                      env={"GLOO_SOCKET_IFNAME": "eth0", "SHARDRUN_STEP_DELAY": "0.1",
                           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "6"}) as started:
        yield started
    # the harness leaves nothing behind: no Ray process, no namespace
    leftover = subprocess.run(["pgrep", "-af", str(started.ray_root)], capture_output=True, text=True).stdout
    assert not leftover and not any(started.pids(i) for i in range(3)), leftover
    assert started.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def both_workers_up(cluster: NetnsCluster) -> None:
    if len([n for n in cluster.nodes() if n["state"] == "ALIVE"]) < 3:
        cluster.start_node(2)
        cluster.wait_nodes(alive=3, timeout=90)


FREE_CPUS = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[3])
while ray.available_resources().get("CPU", 0) < float(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.5)
print(ray.available_resources().get("CPU", 0))
"""


def wait_free_cpus(cluster: NetnsCluster, cpus: int, timeout: float = 60) -> None:
    """Until the cluster has `cpus` CPUs free: a node that restarted is ALIVE in the node table a moment before
    Ray Train sees its resources, and an earlier run's workers may still be letting theirs go."""
    out = cluster.run(0, [PYTHON, "-c", FREE_CPUS, cluster.address, str(cpus), str(timeout)], timeout=timeout + 30)
    assert float(out.stdout.strip().splitlines()[-1]) >= cpus, out.stdout[-2000:]


def drive(cluster: NetnsCluster, spec: Path, on_line, timeout: float = 360) -> tuple[subprocess.Popen, str]:
    """`shardrun run spec` in the head's namespace; on_line(line) sees each line of its output, which is also
    kept in driver.log beside the spec, each line with its second since the start."""
    driver = cluster.exec(0, [PYTHON, "-m", "shardrun", "run", str(spec)], env={"RAY_ADDRESS": cluster.address},
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    start = time.monotonic()
    with open(spec.parent / "driver.log", "w") as log:
        for line in driver.stdout:
            out.append(line)
            log.write(f"{time.monotonic() - start:7.2f} {line}")
            on_line(line, driver)
            assert time.monotonic() < start + timeout, "".join(out)[-4000:]
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


def test_a_preempted_node_is_drained_and_left_behind_then_sigterm_stops_the_run(cluster, tmp_path, corpus):
    """Each node answers its own 127.0.0.1 (its network namespace), so a fake metadata service inside node 2
    is that VM's alone: its Preempt reaches only the rank on node 2, and every rank stops at the same step."""
    both_workers_up(cluster)
    port, trigger, acks = 18080, tmp_path / "announce", tmp_path / "acks"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": [1, 2]}, run={"max_steps": 1000, "log_every": 1},
        checkpoint={"every_steps": 1000},
        failure={"max_failures": 0, "max_preemptions": 1, "scheduled_events": f"http://127.0.0.1:{port}"}))
    imds = cluster.exec(2, [PYTHON, str(Path(__file__).parents[1] / "fake_imds.py"), "--port", str(port),
                            "--vm-name", "shardrun-node-2", "--trigger", str(trigger), "--acks", str(acks),
                            "--not-before", "30"],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: dict = {}

    def on_line(line, driver):
        if "announced" not in times and re.search(r"step +5/", line):
            trigger.touch()
            times["announced"] = time.monotonic()
        if "saved" not in times and "preemption: checkpoint of step" in line:
            times["saved"] = time.monotonic()
            deadline = time.monotonic() + 10
            while not (acks.exists() and acks.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.1)
            times["acks"] = acks.read_text().split() if acks.exists() else []
            cluster.kill_node(2)  # Azure takes the VM once the event is acknowledged
        resumed = re.search(r"resuming from step (\d+) with 1 worker \(restart 1\)", line)
        if resumed:
            times["resumed_step"] = int(resumed[1])
        step = re.search(r"step +(\d+)/", line)
        if "resumed_step" in times and "stop" not in times and step and int(step[1]) >= times["resumed_step"] + 3:
            driver.send_signal(signal.SIGTERM)  # the driver: what `ray job stop` does first
            times["stop"] = time.monotonic()

    try:
        driver, text = drive(cluster, spec, on_line)
        table = cluster.nodes()
    finally:
        imds.kill()
    stopped = re.search(r"preemption: checkpoint of step (\d+) written in [0-9.]+ s; waiting for 1 drained node", text)
    assert stopped and times["saved"] - times["announced"] < 30, text[-5000:]  # within the Preempt notice
    assert len(times["acks"]) == 1, "the event was not acknowledged"
    drained = re.search(r"Ray drains node ([0-9a-f]{12})", text)
    assert drained, text[-5000:]
    # (node 2's earlier incarnations, killed by another test, have rows of their own, with its address)
    [gone] = [n for n in table if n["node_id"].startswith(drained[1])]
    assert gone["node_ip"] == cluster.ips[2], gone
    assert times.get("resumed_step") == int(stopped[1]), text[-6000:]
    # Ray knew the node was drained for that event: its death counted as a preemption (max_failures is 0)
    why = f"Terminated due to preemption: Preempt {times['acks'][0]}"
    assert (gone["state"], gone["state_message"]) == ("DEAD", why), gone

    assert "stop" in times and "stop requested (SIGTERM)" in text and driver.returncode == 143, text[-5000:]
    last = re.search(r"stop requested: checkpoint of step (\d+) written", text)
    assert last and int(last[1]) >= times["resumed_step"] + 3, text[-5000:]
    summary = json.loads((tmp_path / "runs/tiny/summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and summary["restarts"] == 1 and not summary["finished"]
    assert summary["final_step"] == int(last[1])
    assert (tmp_path / f"runs/tiny/checkpoint_{int(last[1]):08d}/shardrun.json").exists()


def test_a_node_drained_by_ray_gets_a_checkpoint_before_it_goes(cluster, tmp_path, corpus):
    """Someone else drains node 2 (`ray drain-node`, as Ray's autoscaler does for a spot reclaim): Ray Train's
    preemption watcher marks every worker, the ranks agree on it in their step flags, checkpoint at once and
    train on; the node goes after the drain's deadline and the group resumes from that checkpoint, counted as
    a preemption."""
    both_workers_up(cluster)
    wait_free_cpus(cluster, 2)
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", scaling={"num_workers": [1, 2], "resize_check_seconds": 3},
        run={"max_steps": 1000, "log_every": 1}, checkpoint={"every_steps": 1000},
        failure={"max_failures": 0, "max_preemptions": 1, "scheduled_events": "off"}))
    [node] = [n for n in cluster.nodes() if n["node_ip"] == cluster.ips[2] and n["state"] == "ALIVE"]
    times: dict = {"steps_with_2": 0}

    def on_line(line, driver):
        # (a node back from an earlier test may join the group only at the next resize check)
        if re.search(r"(starting|resuming from step \d+) with 2 workers", line):
            times["two"] = True
        if "two" in times and "drained" not in times and re.search(r"step +\d+/", line):
            times["steps_with_2"] += 1
        if "drained" not in times and times["steps_with_2"] == 3:  # one rank on node 2
            cluster.run(0, [str(Path(PYTHON).parent / "ray"), "drain-node", "--address", cluster.address,
                            "--node-id", node["node_id"], "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                            "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds", "8"],
                        timeout=60)
            times["drained"] = time.monotonic()
        saved = re.search(r"Ray drains node\(s\) (\w+) of this run .*: checkpoint of step (\d+) written", line)
        if saved and "saved" not in times:
            times["saved"], times["saved_step"] = time.monotonic(), int(saved[2])
            assert node["node_id"].startswith(saved[1]), line
        step = re.search(r"step +(\d+)/", line)
        if "saved" in times and "killed" not in times and step and int(step[1]) >= times["saved_step"] + 3:
            time.sleep(max(0.0, times["drained"] + 9 - time.monotonic()))  # past the drain's deadline
            cluster.kill_node(2)
            times["killed"] = int(step[1])
        resumed = re.search(r"resuming from step (\d+) with 1 worker \(restart \d+\)", line)
        if resumed and "killed" in times:
            times["resumed_step"] = int(resumed[1])
        if "resumed_step" in times and "stop" not in times and step and int(step[1]) >= times["resumed_step"] + 2:
            driver.send_signal(signal.SIGTERM)
            times["stop"] = True

    try:
        driver, text = drive(cluster, spec, on_line)
    finally:
        if "killed" in times:
            cluster.start_node(2)  # for the tests after this one
    assert "saved" in times and times["saved"] - times["drained"] < 8, text[-5000:]  # before the deadline
    assert times["killed"] >= times["saved_step"] + 3  # training went on after the checkpoint
    # nothing later was saved (checkpoint.every_steps is 1000): the restart took the drain's checkpoint
    assert times.get("resumed_step") == times["saved_step"], text[-6000:]
    # Ray Train counted the restart as a preemption: max_failures is 0 (its first try at the old size, while
    # the node is still listed alive, times out as a controller error, which max_failures does not count)
    assert ("[shardrun] the worker group ended: a preemption (counted against failure.max_preemptions); Ray Train "
            "restarts it") in text, text[-6000:]
    assert driver.returncode == 143 and "stop requested: checkpoint of step" in text, text[-4000:]
