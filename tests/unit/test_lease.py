"""A run dir is held by one run at a time: the lease beside it (shardrun.lease)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import tiny_spec, write_spec

from shardrun import cli, lease
from shardrun.lease import Holder, Lease, RunDirBusy, lease_path, live
from shardrun.runs import list_runs

pytestmark = pytest.mark.timeout(60)


def test_a_second_lease_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    run_dir = str(tmp_path / "runs" / "tiny")
    with Lease(run_dir, "run"):
        assert os.path.exists(tmp_path / "runs" / "tiny.lease.json")
        with pytest.raises(RunDirBusy) as refused:
            Lease(run_dir, "train").acquire()
        text = str(refused.value)
        assert "is in use by `shardrun run`" in text and socket.gethostname() in text and f"pid {os.getpid()}" in text
        assert f"kill -INT {os.getpid()}" in text
    assert not os.path.exists(lease_path(run_dir))  # given back at the end
    with Lease(run_dir, "train"):  # and then free
        pass


def test_a_lease_whose_holder_is_gone_is_taken_over(tmp_path):
    run_dir = str(tmp_path / "tiny")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = Holder(id="old", command="run", user="u", host=socket.gethostname(), pid=dead_pid,
                   started=time.time(), renewed=time.time(), ttl_s=120)
    with open(lease_path(run_dir), "w") as f:
        json.dump(stale.__dict__, f)
    with Lease(run_dir, "run") as mine:  # its process is gone from this machine: expired at once
        assert lease.read(run_dir).id == mine.holder.id
    assert not os.listdir(tmp_path)  # neither the stale lease nor a temporary file is left


def test_expiry_is_by_the_last_renewal_and_by_the_process_on_this_machine():
    holder = Holder(id="x", command="run", user="u", host="elsewhere", pid=1, started=0, renewed=1000, ttl_s=120)
    assert live(holder, 1100, host="here")
    assert not live(holder, 1120, host="here")
    same_host = Holder(**{**holder.__dict__, "host": "here"})
    assert live(same_host, 1100, host="here", alive=lambda pid: True)
    assert not live(same_host, 1100, host="here", alive=lambda pid: False)


def test_an_unreadable_lease_counts_as_expired(tmp_path):
    run_dir = str(tmp_path / "tiny")
    open(lease_path(run_dir), "w").close()  # cut off by a full disk
    with Lease(run_dir, "run"):
        pass


@pytest.mark.parametrize("local", [True, False], ids=["disk", "object-store"])
def test_of_runs_racing_for_one_run_dir_exactly_one_gets_it(tmp_path, local):
    run_dir = str(tmp_path / "tiny")
    for attempt in range(5 if local else 2):
        leases = [Lease(run_dir, "run", settle_s=0.5) for _ in range(4)]
        for one in leases:
            one.local = local  # object stores: write, wait, read back (last writer wins)
        outcomes = race(leases)
        assert outcomes.count("held") == 1, (attempt, outcomes)
        winner = leases[outcomes.index("held")]
        assert lease.read(run_dir).id == winner.holder.id
        winner.release()


def race(leases: list[Lease]) -> list:
    """Each lease's acquire, all started at once: "held", or the RunDirBusy it raised."""
    outcomes: list = [None] * len(leases)
    start = threading.Barrier(len(leases))

    def take(i):
        start.wait()
        try:
            leases[i].acquire()
            outcomes[i] = "held"
        except RunDirBusy as e:
            outcomes[i] = e

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_renewal_moves_the_time_on_and_notices_a_lease_taken_by_another_run(tmp_path):
    run_dir = str(tmp_path / "tiny")
    said = []
    now = [1000.0]
    mine = Lease(run_dir, "run", emit=said.append, clock=lambda: now[0])
    mine.acquire()
    try:
        now[0] = 1030.0
        assert mine.renew() and lease.read(run_dir).renewed == 1030.0
        other = Holder(**{**lease.read(run_dir).__dict__, "id": "other", "host": "vm-2", "pid": 7})
        with open(lease_path(run_dir), "w") as f:
            json.dump(other.__dict__, f)
        assert not mine.renew() and not mine.renew()
        assert mine.lost_to.id == "other" and len(said) == 1 and "was taken by" in said[0] and "vm-2" in said[0]
    finally:
        mine.release()
    assert lease.read(run_dir).id == "other"  # another run's lease is not deleted


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_second_train_or_run_of_a_running_name_exits_2_at_once(tmp_path, capsys, command):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tmp_path / "no-data-yet", tmp_path / "runs"))
    with Lease(str(tmp_path / "runs" / "tiny"), "run"):
        started = time.monotonic()
        assert cli.main([command, str(spec)]) == 2
        assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "is in use by `shardrun run`" in err and f"pid {os.getpid()}" in err, err
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing written


def test_runs_lists_a_leased_run_as_running_and_an_expired_lease_as_interrupted(tmp_path):
    storage = tmp_path / "runs"
    for name in ("going", "gone"):
        (storage / name).mkdir(parents=True)
        (storage / name / "job.yaml").write_text("name: x\n")
    with Lease(str(storage / "going"), "run"):
        stale = Holder(id="old", command="run", user="u", host="vm-9", pid=1, started=0, renewed=0, ttl_s=120)
        (storage / "gone.lease.json").write_text(json.dumps(stale.__dict__))
        states = {r["name"]: r["state"] for r in list_runs(str(storage))}
    assert states["going"].startswith("running (") and socket.gethostname() in states["going"]
    assert states["gone"] == "interrupted"  # its files are fresh, but its holder stopped renewing long ago
