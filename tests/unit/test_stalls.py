"""Storage that stops answering during a checkpoint ends the rank within failure.checkpoint_timeout_s, with the
checkpoint named, instead of a wait that only the other ranks' 30-minute barrier ends (the data side's stall
is in test_data.py)."""

import threading
import time

import pytest

from shardrun import fs
from shardrun.errors import CheckpointStalled
from shardrun.trainer import checkpoint
from shardrun.trainer.topology import Topology

pytestmark = pytest.mark.timeout(60)


def test_a_call_that_hangs_raises_the_stall_error_in_time_and_others_pass_through():
    hang = threading.Event()
    started = time.monotonic()
    with pytest.raises(CheckpointStalled, match="upload of step 5"):
        fs.bounded(hang.wait, 0.3, lambda: CheckpointStalled("upload of step 5"))
    assert time.monotonic() - started < 5
    hang.set()
    assert fs.bounded(lambda: 42, 5, lambda: CheckpointStalled("no")) == 42
    with pytest.raises(OSError, match="disk full"):
        fs.bounded(lambda: (_ for _ in ()).throw(OSError("disk full")), 5, lambda: CheckpointStalled("no"))


def test_a_universal_conversion_that_overruns_is_stopped_and_named(tmp_path):
    manifest = {"tag": "global_step10", "world_size": 4}
    topology = Topology(rank=0, world_size=2, local_rank=0, device="cpu")
    started = time.monotonic()
    # the converter cannot even import DeepSpeed in 0.2 s: it is stopped, the checkpoint and the bound named
    with pytest.raises(CheckpointStalled, match=rf"converting checkpoint {tmp_path} \(4 workers\) for 2 workers "
                                                r"took more than failure.checkpoint_timeout_s \(0.2 s\)"):
        checkpoint.to_universal(str(tmp_path), manifest, topology, "stalls", timeout_s=0.2)
    assert time.monotonic() - started < 10
