"""The step boundary: what the ranks agreed on after a step (a preemption notice, a stop request, a drain by
others) and what the loop does about it, decided as a value; and the way out of a preempted VM."""

from __future__ import annotations

import datetime
import enum
import threading
from collections.abc import Callable

from shardrun.config import JobSpec
from shardrun.errors import Preempted
from shardrun.fs import log
from shardrun.trainer import azure_events
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.checkpointer import Checkpointer
from shardrun.trainer.collectives import Collectives
from shardrun.trainer.session import Session
from shardrun.trainer.topology import Topology

FLAGS = 3
"""preemption notice, stop request, a node drained by others"""


class StepAction(enum.Enum):
    CONTINUE = "continue"
    SAVE_FOR_DRAIN = "save for a drain"
    """A node of the group is being drained by someone else: checkpoint now (once) and go on."""
    STOP = "stop"
    """Asked to stop: checkpoint and end the run before max_steps."""
    PREEMPT = "preempt"
    """A VM of the group is being taken away: checkpoint, let its node go, end this worker group."""

    @property
    def ends_group(self) -> bool:
        return self in (StepAction.STOP, StepAction.PREEMPT)


def decide(*, preempt: bool, stop: bool, drained: bool, saved_for_drain: bool) -> StepAction:
    """The loop's action after a step, from the flags every rank agreed on: a preemption outranks a stop
    request (the VM goes either way), and a drain by others is checkpointed for once per worker group."""
    if preempt:
        return StepAction.PREEMPT
    if stop:
        return StepAction.STOP
    if drained and not saved_for_drain:
        return StepAction.SAVE_FOR_DRAIN
    return StepAction.CONTINUE


def watcher_for(spec: JobSpec, topology: Topology, emit: Callable[[str], None] = log) -> \
        azure_events.PreemptionWatcher | None:
    """The Azure Scheduled Events watcher of this VM (failure.scheduled_events), on its first rank only."""
    endpoint = azure_events.endpoint_for(spec.failure.scheduled_events)
    if not endpoint or topology.local_rank != 0:
        return None
    return azure_events.PreemptionWatcher(azure_events.ScheduledEvents(endpoint), emit=emit)


class StepControl:
    """Owns what feeds the step flags: the Azure events watcher (first rank of each VM), the stop request
    poller (rank 0, a thread), the launcher's drain notice; exchanges them each step and decides."""

    def __init__(self, session: Session, topology: Topology, collectives: Collectives, *,
                 watcher: azure_events.PreemptionWatcher | None, emit: Callable[[str], None] = log,
                 poll_seconds: float = 2.0):
        self.session, self.topology, self.collectives = session, topology, collectives
        self.watcher, self.emit, self.poll_seconds = watcher, emit, poll_seconds
        self.stop_request = threading.Event()
        self.saved_for_drain = False
        """The group checkpointed for a drain announced by the launcher (once per group)."""
        self._closed = threading.Event()

    def start(self) -> None:
        """Start watching: Azure's events, and (rank 0) stop requests. Both only set flags."""
        if self.watcher is not None:
            self.watcher.start()
        if self.topology.is_main:
            threading.Thread(target=self._poll_stop, name="shardrun-stop", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        if self.watcher is not None:
            self.watcher.stop()

    def next_action(self) -> StepAction:
        """After each step, on every rank: exchange this step's flags (in the background) and decide on the
        previous step's, which every rank sees the same."""
        drain = self.session.placement.drain_notice() if self.session.placement is not None else None
        preempt, stop, drained = self.collectives.flags.exchange(
            [self.watcher is not None and self.watcher.notice is not None, self.stop_request.is_set(),
             not self.saved_for_drain and drain is not None])
        return decide(preempt=preempt, stop=stop, drained=drained, saved_for_drain=self.saved_for_drain)

    def settle(self) -> None:
        """Nothing left in flight on the control group (before the group ends, or gathers on it)."""
        self.collectives.flags.settle()

    def carry_out(self, action: StepAction, state: TrainState, checkpointer: Checkpointer) -> None:
        """Every action but CONTINUE checkpoints this step (unless just saved). SAVE_FOR_DRAIN then trains on;
        STOP ends the run; PREEMPT lets the VM's node go and raises Preempted to end this worker group."""
        if action is StepAction.CONTINUE:
            return
        if action.ends_group:
            self.settle()  # nothing left in flight on the control group
        step, seconds = state.step, checkpointer.save_now(state)
        if action is StepAction.PREEMPT:
            raise self.preempted(step, seconds)
        if action is StepAction.SAVE_FOR_DRAIN:
            self.saved_for_drain = True
            # When the node goes, Ray Train restarts the group on the nodes left, from this checkpoint or a
            # later one, and counts it against failure.max_preemptions; a drain that is cancelled costs the save.
            self._note(f"{self._drain_notice()}: checkpoint of step {step} written in {seconds:.2f} s; training "
                       "goes on until the node goes, then the run resumes from its latest checkpoint on the nodes "
                       "left")
            return
        self._note(f"stop requested: checkpoint of step {step} written in {seconds:.2f} s; start the run again "
                   "(same name) to resume")
        if self.topology.is_main:
            self.session.reporter.stopped()

    def _note(self, line: str) -> None:
        if self.topology.is_main:
            self.session.reporter.note(line)

    def _drain_notice(self) -> str:
        placement = self.session.placement
        return (placement.drain_notice() if placement is not None else None) or "a node of this run is being drained"

    def preempted(self, step: int, save_seconds: float) -> Preempted:
        """A VM of the group is going, step is checkpointed: acknowledge the event, drain this VM's node and
        wait for every drained node to go before the group ends. Returns the error that ends it."""
        drained, left = None, 0.0
        notice = self.watcher.notice if self.watcher is not None else None
        if notice is not None:
            self.watcher.acknowledge()
            if notice.not_before is not None:
                left = (notice.not_before - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
            drained, what = self._leaving(f"{notice.event_type} {notice.event_id}")
            self.emit(f"preemption: {what}")
        everyone = self.collectives.gather((drained, left if drained else None))
        nodes = sorted({node for node, _ in everyone if node})
        left = min((seconds for node, seconds in everyone if node and seconds is not None), default=0.0)
        self._note(f"preemption: checkpoint of step {step} written in {save_seconds:.2f} s; "
                   + (f"waiting for {len(nodes)} drained node(s) to go, then the run resumes from it on the nodes "
                      "left" if nodes else "this worker group stops and the run resumes from it"))
        if nodes:
            # Ray Train's controller restarts the group once the drained nodes' actors die with them (counted
            # as preempted). Ending the group before they are gone would have Ray Train count the draining
            # node's resources and try to start the whole group there again.
            wait = max(left, 0.0) + azure_events.WAIT_MARGIN_S
            if not self.session.placement.wait_gone(nodes, timeout=wait):
                self.emit(f"preemption: the drained node(s) were still there {wait:.0f} s later; the group stops "
                          "anyway")
        return Preempted(f"a VM of this run is being taken away (Azure Scheduled Events); checkpointed step {step}")

    def _leaving(self, reason: str) -> tuple[str | None, str]:
        if self.session.placement is None:
            return None, "torchrun places nothing: start the run again on other machines"
        return self.session.placement.leaving(reason)

    def _poll_stop(self) -> None:
        while not self.stop_request.is_set() and not self._closed.wait(self.poll_seconds):
            try:
                if self.session.reporter.stop_requested():
                    self.stop_request.set()
            except Exception as e:  # the driver may be gone; its loss ends the group anyway
                self.emit(f"could not ask for a stop request: {e!r}")
                return
