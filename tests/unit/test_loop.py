"""The worker loop and its collaborators with fakes: no processes, no DeepSpeed engine, no Parquet.

A fake engine (a loss per step, DeepSpeed's count of skipped updates), an in-memory stream and a recording
session stand in for the real ones; the decisions (StepAction, the non-finite policy) are pure and tested
with made-up inputs. End-to-end tests keep one run per failure mode."""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field

import pytest
import torch
from helpers import tiny_spec

from shardrun import checkpoint_format as layout
from shardrun.config import DeepSpeedSpec, FailureSpec, parse
from shardrun.errors import Preempted, RepeatedFailure, TrainingDiverged, UserError
from shardrun.trainer import engine as engines
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.checkpointer import Checkpointer
from shardrun.trainer.collectives import LONG_TIMEOUT_S, Collectives
from shardrun.trainer.control import FLAGS, StepAction, decide
from shardrun.trainer.entry import ended_by
from shardrun.trainer.faults import FaultInjector
from shardrun.trainer.loop import Trainer
from shardrun.trainer.nonfinite import NonFinitePolicy
from shardrun.trainer.restore import Restored
from shardrun.trainer.session import Session
from shardrun.trainer.topology import Topology
from shardrun.trainer.window import LogWindow

ONE = Topology(rank=0, world_size=1, local_rank=0, device="cpu")


# -- fakes ----------------------------------------------------------------------------------------------


class FakeEngine:
    """Losses 1/step; DeepSpeed's ZeRO skips (and counts) an update whose loss is not finite."""

    def __init__(self):
        self.steps = 0
        self.skipped_steps = 0
        self.optimizer = None
        self._loss = None

    def __call__(self, inputs, targets):
        return torch.tensor(1.0 / (self.steps + 1), requires_grad=True)

    def backward(self, loss):
        self._loss = loss

    def step(self):
        self.steps += 1
        if not torch.isfinite(self._loss):
            self.skipped_steps += 1

    def get_global_grad_norm(self):
        return 0.5

    def get_lr(self):
        return [1e-3]

    def save_checkpoint(self, directory, tag, client_state, exclude_frozen_parameters=False):
        os.makedirs(os.path.join(directory, tag))
        torch.save(client_state, os.path.join(directory, tag, "model_states.pt"))


class MemoryStream:
    global_batch = 4
    wait_seconds = 0.0

    def __init__(self):
        self.taken = 0
        self.closed = False

    def next_batch(self):
        self.taken += 1
        return {"inputs": torch.zeros(1, 2, dtype=torch.long), "targets": torch.zeros(1, 2, dtype=torch.long)}

    def position(self):
        return {"taken": self.taken}

    def stats(self):
        return {"queue_depth": 0, "buffered_bytes": 0, "skipped_files": 0, "skipped_row_groups": 0}

    def close(self):
        self.closed = True


@dataclass
class RecordingSession:
    """A CheckpointStore, RunReporter and Placement in one, recording what the loop told it."""

    root: str
    stop: bool = False
    """What stop_requested answers."""
    on_record: object = None
    """Called with each progress record."""
    drain_from: int | None = None
    """The launcher's drain notice appears from this step on."""
    saved: list = field(default_factory=list)
    records: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    events: list = field(default_factory=list)
    steps_seen: int = 0

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield None

    @contextlib.contextmanager
    def checkpoint_dir(self, step, metrics):
        directory = os.path.join(self.root, layout.local_dir_name(step))
        os.makedirs(directory)
        yield directory
        self.saved.append(step)

    def started(self, info):
        self.events.append(("started", info["step"]))

    def progress(self, record):
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def note(self, line):
        self.notes.append(line)

    def stop_requested(self):
        return self.stop

    def stopped(self):
        self.events.append(("stopped", None))

    def finished(self):
        self.events.append(("finished", None))

    repeated: str | None = None
    """What failed answers."""

    def failed(self, rank, step, error):
        self.events.append(("failed", (rank, step, str(error))))
        return self.repeated

    def leaving(self, reason):
        self.events.append(("leaving", reason))
        return None, "nothing to drain here"

    def wait_gone(self, nodes, timeout):
        return True

    def drain_notice(self):
        self.steps_seen += 1
        return "node abc is being drained" if self.drain_from and self.steps_seen >= self.drain_from else None

    def as_session(self, placement=True) -> Session:
        return Session(self, self, self if placement else None)


@dataclass
class Notice:
    event_type: str = "Preempt"
    event_id: str = "E1"
    not_before: object = None


class FakeWatcher:
    """An Azure events watcher whose notice appears after `after` calls to notice."""

    def __init__(self, after: int):
        self.after, self.looked, self.acknowledged = after, 0, False

    @property
    def notice(self):
        self.looked += 1
        return Notice() if self.looked > self.after else None

    def start(self):
        return self

    def stop(self):
        pass

    def acknowledge(self):
        self.acknowledged = True
        return True


def spec(tmp_path, **sections):
    raw = tiny_spec(tmp_path / "data", tmp_path / "runs", scaling={"num_workers": 1},
                    metrics={"enabled": False}, **sections)
    return parse(raw)


def trainer(tmp_path, session, *, faults=None, watcher=None, **sections) -> Trainer:
    s = spec(tmp_path, **sections)
    restored = Restored(engine=FakeEngine(), flops_per_token=6.0)
    return Trainer(s, session, ONE, restored=restored, stream=MemoryStream(), collectives=Collectives(ONE, FLAGS),
                   faults=faults or FaultInjector(), watcher=watcher)


# -- decisions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("preempt", "stop", "drained", "saved", "action"), [
    (False, False, False, False, StepAction.CONTINUE),
    (True, True, True, False, StepAction.PREEMPT),  # the VM goes either way
    (False, True, True, False, StepAction.STOP),
    (False, False, True, False, StepAction.SAVE_FOR_DRAIN),
    (False, False, True, True, StepAction.CONTINUE),  # once per group
])
def test_the_step_decision(preempt, stop, drained, saved, action):
    assert decide(preempt=preempt, stop=stop, drained=drained, saved_for_drain=saved) is action
    assert action.ends_group == (action in (StepAction.STOP, StepAction.PREEMPT))


def test_the_nonfinite_policy_counts_skips_and_stops_after_too_many_in_a_row():
    policy = NonFinitePolicy(FailureSpec(max_nonfinite_steps=3), DeepSpeedSpec(zero_stage=2))
    assert [policy.was_skipped(n) for n in (0, 1, 1, 2)] == [False, True, False, True]
    assert policy.on_step(1, skipped=True).note.endswith("(1 in a row, 1 in this run so far)")
    assert policy.on_step(2, skipped=False).note is None and policy.in_a_row == 0
    assert policy.on_step(3, skipped=True).diverged is None
    assert policy.on_step(4, skipped=True).diverged is None
    action = policy.on_step(5, skipped=True)
    assert action.diverged.startswith("step 5: the loss or the gradients are not finite, 3 steps in a row "
                                      "(failure.max_nonfinite_steps: 3)")
    assert policy.total == 4


def test_the_nonfinite_policy_stop_setting_stops_at_the_first():
    policy = NonFinitePolicy(FailureSpec(nonfinite_loss="stop"), DeepSpeedSpec(zero_stage=1))
    assert "(failure.nonfinite_loss: stop)" in policy.on_step(3, skipped=True).diverged


def test_without_skipped_updates_only_the_logged_loss_tells():
    fp32_zero0 = NonFinitePolicy(FailureSpec(), DeepSpeedSpec(zero_stage=0, precision="fp32"))
    assert not fp32_zero0.was_skipped(5)  # DeepSpeed applies every update here
    assert fp32_zero0.on_log(7, 2.0).diverged is None
    assert fp32_zero0.on_log(7, math.nan).diverged.startswith("step 7: the loss is nan; with ZeRO stage 0 in fp32")
    fp16 = NonFinitePolicy(FailureSpec(), DeepSpeedSpec(zero_stage=1, precision="fp16"))
    assert not fp16.was_skipped(3) and fp16.on_log(7, math.nan).diverged is None  # the loss scaler's business


# -- the log window -------------------------------------------------------------------------------------


def test_the_log_window_turns_steps_into_a_record_and_starts_again():
    now = [100.0]
    window = LogWindow(device="cpu", tokens_per_step=1000, global_batch=8, world_size=2, flops_per_token=6e6,
                       peak_flops=1e12, clock=lambda: now[0])
    window.add(torch.tensor(2.0), wait=0.5)
    window.add(None, wait=0.0)  # a skipped update: its loss does not count
    window.add(torch.tensor(4.0), wait=0.5)
    now[0] += 3.0 + 10.0
    window.exclude(10.0)  # a checkpoint save is not training time
    assert window.mean_loss().item() == 3.0
    record = window.record({"step": 3}, loss=3.0, lr=1e-3, grad_norm=None)
    assert list(record) == ["step", "loss", "lr", "tokens_per_s", "samples_per_s", "step_time",
                            "data_wait_fraction", "grad_norm", "mfu"]  # metrics.jsonl's column order
    assert record["tokens_per_s"] == pytest.approx(1000.0) and record["samples_per_s"] == pytest.approx(8.0)
    assert record["step_time"] == pytest.approx(1.0) and record["data_wait_fraction"] == pytest.approx(1 / 3)
    assert record["mfu"] == pytest.approx(1000.0 / 2 * 6e6 / 1e12)
    assert window.steps == 0 and math.isnan(window.mean_loss().item())  # the next window, none applied yet


# -- the checkpointer -----------------------------------------------------------------------------------


def test_the_checkpointer_saves_when_due_once_per_step_under_the_long_timeout(tmp_path):
    session = RecordingSession(str(tmp_path))
    collectives = Collectives(ONE, FLAGS)
    collectives.set_timeout(5.0)
    timeouts = []
    original = session.checkpoint_dir

    @contextlib.contextmanager
    def watched(step, metrics):
        timeouts.append(collectives.timeout)
        with original(step, metrics) as directory:
            yield directory

    session.checkpoint_dir = watched
    ticks = iter(range(100))
    checkpointer = Checkpointer(spec(tmp_path), session, ONE, collectives, engine=FakeEngine(),
                                position=lambda: {"taken": 1}, saved_step=0, clock=lambda: float(next(ticks)))
    state = TrainState()
    for step in range(1, 13):
        state.step = step
        checkpointer.save(state, last_step=step == 12)
    assert session.saved == [5, 10, 12] and timeouts == [LONG_TIMEOUT_S] * 3 and collectives.timeout == 5.0
    assert checkpointer.save_now(state) == 0.0 and session.saved == [5, 10, 12]  # saved already
    state.step = 13
    assert checkpointer.save_now(state) == 1.0  # its own clock: one tick
    manifest = layout.read_manifest(os.path.join(str(tmp_path), layout.local_dir_name(13)))
    assert manifest["step"] == 13 and manifest["tag"] == "global_step13" and manifest["world_size"] == 1


# -- the loop with fakes --------------------------------------------------------------------------------


def test_the_loop_trains_logs_and_checkpoints_to_max_steps(tmp_path):
    session = RecordingSession(str(tmp_path))
    t = trainer(tmp_path, session.as_session(), run={"max_steps": 12, "log_every": 5})
    t.train()
    t.close()
    assert [r["step"] for r in session.records] == [1, 5, 10, 12]
    assert session.saved == [5, 10, 12] and session.events == [("started", 0), ("finished", None)]
    assert t.state.step == 12 and t.state.samples == 48 and t.stream.closed
    assert session.records[0]["loss"] == pytest.approx(1.0) and session.records[-1]["grad_norm"] == 0.5


def test_a_stop_request_checkpoints_the_next_step_and_ends_the_run(tmp_path):
    session = RecordingSession(str(tmp_path))
    t = trainer(tmp_path, session.as_session(), run={"max_steps": 50, "log_every": 5},
                checkpoint={"every_steps": 100})
    session.on_record = lambda record: record["step"] == 5 and t.control.stop_request.set()
    t.train()
    t.close()
    assert t.state.step == 6 and session.saved == [6] and session.records[-1]["step"] == 6  # its last step logged
    assert session.events[-1] == ("stopped", None)
    assert session.notes[-1].startswith("stop requested: checkpoint of step 6 written in ")


def test_rank_0_polls_the_reporter_for_a_stop_request_in_the_background(tmp_path):
    session = RecordingSession(str(tmp_path), stop=True)
    t = trainer(tmp_path, session.as_session())
    t.control.poll_seconds = 0.01
    t.control.start()
    try:
        assert t.control.stop_request.wait(timeout=10)
    finally:
        t.close()


def test_nonfinite_losses_are_skipped_noted_and_stop_the_run_when_too_many(tmp_path):
    session = RecordingSession(str(tmp_path))
    t = trainer(tmp_path, session.as_session(), faults=FaultInjector("nonfinite-loss:step=3-5"),
                run={"max_steps": 8, "log_every": 1}, failure={"max_nonfinite_steps": 3})
    with pytest.raises(TrainingDiverged, match="step 5: .* 3 steps in a row"):
        t.train()
    assert session.notes == [
        "step 3: the loss or the gradients are not finite; DeepSpeed skipped the update (1 in a row, 1 in this run "
        "so far)",
        "step 4: the loss or the gradients are not finite; DeepSpeed skipped the update (2 in a row, 2 in this run "
        "so far)"]
    assert [r["step"] for r in session.records] == [1, 2, 3, 4]
    assert math.isnan(session.records[2]["loss"]) and math.isnan(session.records[3]["loss"])


def test_a_drain_by_others_is_checkpointed_once_and_training_goes_on(tmp_path):
    session = RecordingSession(str(tmp_path), drain_from=4)
    t = trainer(tmp_path, session.as_session(), run={"max_steps": 12, "log_every": 100},
                checkpoint={"every_steps": 100})
    t.train()
    assert session.saved == [4, 12]  # one rank: its flags need no agreement, so they act at once
    [note] = session.notes
    assert note.startswith("node abc is being drained: checkpoint of step 4 written in ")
    assert session.events[-1] == ("finished", None)


def test_a_preemption_checkpoints_lets_the_vm_go_and_ends_the_group(tmp_path):
    session = RecordingSession(str(tmp_path))
    watcher = FakeWatcher(after=6)
    t = trainer(tmp_path, session.as_session(), watcher=watcher, run={"max_steps": 50, "log_every": 100},
                checkpoint={"every_steps": 100})
    with pytest.raises(Preempted, match="checkpointed step 7"):
        t.train()
    assert session.saved == [7] and watcher.acknowledged and ("leaving", "Preempt E1") in session.events
    assert re.fullmatch(r"preemption: checkpoint of step 7 written in \d+\.\d\d s; this worker group stops and "
                        r"the run resumes from it", session.notes[-1])


def test_a_lone_process_has_no_placement_and_stops_on_a_preemption(tmp_path):
    session = RecordingSession(str(tmp_path))
    t = trainer(tmp_path, session.as_session(placement=False), watcher=FakeWatcher(after=2),
                run={"max_steps": 50, "log_every": 100}, checkpoint={"every_steps": 100})
    with pytest.raises(Preempted):
        t.train()
    assert session.saved == [3] and not any(e[0] == "leaving" for e in session.events)


# -- how a rank ends ------------------------------------------------------------------------------------


def test_a_crash_is_reported_with_its_step_and_ends_the_run_when_the_launcher_says_it_repeats(tmp_path):
    crash = FaultInjector("crash:step=3:rank=0")
    session = RecordingSession(str(tmp_path))
    t = trainer(tmp_path, session.as_session(), faults=crash)
    with pytest.raises(RuntimeError, match="injected crash") as raised:
        t.train()
    assert ended_by(raised.value, t, session.as_session(), 0) is raised.value  # retried as Ray decides
    assert session.events[-1] == ("failed", (0, 3, "injected crash (SHARDRUN_FAULT) after step 3 on rank 0"))

    session.repeated = "rank 0 failed after step 3 in 3 attempts of the worker group with the same error"
    ended = ended_by(raised.value, t, session.as_session(), 0)
    assert isinstance(ended, RepeatedFailure) and ended.__cause__ is raised.value and "3 attempts" in str(ended)


@pytest.mark.parametrize("error", [UserError("bad row group"), TrainingDiverged("nan"), Preempted("vm goes")])
def test_deterministic_errors_and_preemptions_end_a_rank_as_they_are_uncounted(tmp_path, error):
    session = RecordingSession(str(tmp_path), repeated="would end it")
    assert ended_by(error, None, session.as_session(), 1) is error and not session.events


@pytest.mark.parametrize(("optimizer", "scale"), [
    (type("ZeroOptimizer", (), {"loss_scale": 1024.0, "cur_scale": 1024.0})(), 1024.0),
    (type("FP16Optimizer", (), {"loss_scale": 512.0})(), 512.0),  # ZeRO 0's: no cur_scale
])
def test_the_fp16_loss_scale_is_read_from_either_optimizer(optimizer, scale):
    engine = type("Engine", (), {"optimizer": optimizer})()
    assert engines.loss_scale(engine, "fp16") == scale and engines.loss_scale(engine, "bf16") is None


def test_table_columns_reach_a_bf16_module_in_its_dtype(tmp_path):
    t = trainer(tmp_path, RecordingSession(str(tmp_path)).as_session(), deepspeed={"precision": "bf16"})
    batch = {"x": torch.ones(2, 3), "label": torch.zeros(2), "ids": torch.ones(2, dtype=torch.int64)}
    cast = t.as_module_dtype(batch)
    assert (cast["x"].dtype, cast["label"].dtype, cast["ids"].dtype) == (torch.bfloat16, torch.bfloat16, torch.int64)
    fp32 = trainer(tmp_path, RecordingSession(str(tmp_path)).as_session())
    assert fp32.as_module_dtype(batch) is batch
