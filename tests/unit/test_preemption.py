"""The Azure Scheduled Events watcher against a fake metadata service, and StepFlags across 2 gloo ranks."""

import os
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from fake_imds import FakeMetadataServer
from helpers import free_port

from shardrun.trainer.azure_events import Event, MetadataError, MetadataUnavailable, PreemptionWatcher, ScheduledEvents
from shardrun.trainer.collectives import StepFlags

VM = "shardrun_3"
POLL = 0.05


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {predicate}")
        time.sleep(0.01)
    return value


@pytest.fixture
def imds():
    with FakeMetadataServer(VM) as server:
        yield server


@pytest.fixture
def watch(imds):
    """Start a watcher on the fake service; yields (watcher, lines it emitted); stopped at the end."""
    lines: list[str] = []
    watchers = []

    def start(**kwargs):
        kwargs.setdefault("poll_seconds", POLL)
        watcher = PreemptionWatcher(ScheduledEvents(imds.endpoint), emit=lines.append, **kwargs).start()
        watchers.append(watcher)
        return watcher, lines

    yield start
    for watcher in watchers:
        watcher.stop()


@pytest.mark.timeout(20)
def test_a_preempt_for_this_vm_is_noticed_within_a_poll(imds, watch):
    watcher, lines = watch(poll_seconds=0.2)
    wait_for(lambda: imds.polls >= 1)
    t0 = time.monotonic()
    event_id = imds.announce("Preempt", ["shardrun_1", VM], not_before_s=30)
    notice = wait_for(lambda: watcher.notice)
    assert time.monotonic() - t0 < 1.5  # a poll is 0.2 s; the rest is slack for a busy machine
    assert (notice.event_id, notice.event_type, notice.status) == (event_id, "Preempt", "Scheduled")
    assert 20 < (notice.not_before.timestamp() - time.time()) <= 31
    assert lines == [f"preemption: Preempt scheduled for {VM} not before {notice.not_before.isoformat()} "
                     f"(event {event_id})"]
    wait_for(lambda: not watcher.running)  # its job is done: one notice, then it stops polling


@pytest.mark.timeout(20)
def test_other_vms_and_kinds_not_asked_for_are_ignored(imds, watch):
    watcher, lines = watch()
    imds.announce("Preempt", ["shardrun_30"])  # a name that merely starts with ours
    imds.announce("Freeze", [VM], duration_s=5)
    imds.announce("Reboot", [VM])
    imds.announce("Preempt", [])
    polls = imds.polls
    wait_for(lambda: imds.polls >= polls + 5)
    assert watcher.notice is None and lines == [] and watcher.running
    event_id = imds.announce("Terminate", [VM.upper()])  # names are case-insensitive on Azure
    assert wait_for(lambda: watcher.notice).event_id == event_id


@pytest.mark.timeout(20)
def test_acknowledge_approves_the_noticed_event_once(imds, watch):
    watcher, lines = watch()
    assert watcher.acknowledge() is False  # nothing noticed yet
    event_id = imds.announce("Preempt", [VM])
    wait_for(lambda: watcher.notice)
    assert watcher.acknowledge() is True
    assert watcher.acknowledge() is False
    assert imds.acknowledged == [event_id]
    assert lines[-1] == f"preemption: acknowledged event {event_id}"
    assert ScheduledEvents(imds.endpoint).poll()[1] == []  # approved: off the list


@pytest.mark.timeout(20)
def test_without_a_metadata_service_the_watcher_says_so_once_and_stops():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lines: list[str] = []
    watcher = PreemptionWatcher(ScheduledEvents(endpoint), poll_seconds=POLL, emit=lines.append).start()
    try:
        wait_for(lambda: not watcher.running)
    finally:
        watcher.stop()
    assert len(lines) == 1 and lines[0].startswith("preemption: not watching for Azure scheduled events")
    assert endpoint in lines[0]
    assert watcher.notice is None and watcher.acknowledge() is False


@pytest.mark.timeout(20)
def test_refused_or_404_means_unavailable_and_names_the_url(imds):
    refused = ScheduledEvents(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MetadataUnavailable, match=r"no metadata service answered at http://127\.0\.0\.1:\d+/metadata"):
        refused.poll()
    elsewhere = ScheduledEvents(imds.endpoint + "/another-cloud")  # 404s, like a non-Azure metadata service
    with pytest.raises(MetadataUnavailable, match="404.*not Azure's"):
        elsewhere.vm_name()


@pytest.mark.timeout(20)
def test_a_malformed_answer_is_reported_once_and_retried(imds, watch):
    imds.answer_raw(b"<html>captive portal</html>")
    with pytest.raises(MetadataError, match=r"/metadata/scheduledevents\?api-version=2020-07-01 answered .*not a "
                                            r"scheduled events document"):
        ScheduledEvents(imds.endpoint).poll()
    watcher, lines = watch()
    polls = imds.polls
    wait_for(lambda: imds.polls >= polls + 5)
    assert len(lines) == 1 and "not a scheduled events document" in lines[0] and watcher.running
    imds.answer_raw(b'{"DocumentIncarnation": 2, "Events": [{"EventId": "x"}]}')  # an event without a type
    polls = imds.polls
    wait_for(lambda: imds.polls >= polls + 2)
    assert len(lines) == 1
    imds.answer_raw(None)
    event_id = imds.announce("Preempt", [VM])
    assert wait_for(lambda: watcher.notice).event_id == event_id
    assert lines[1] == "preemption: scheduled events readable again"
    assert len(lines) == 3 and lines[2].startswith("preemption: Preempt scheduled") and event_id in lines[2]


@pytest.mark.timeout(20)
def test_stop_returns_promptly_during_a_long_sleep(imds, watch):
    watcher, _ = watch(poll_seconds=30)
    wait_for(lambda: imds.polls >= 1)
    t0 = time.monotonic()
    watcher.stop()
    assert time.monotonic() - t0 < 1.0 and not watcher.running


@pytest.mark.timeout(20)
def test_requests_bypass_proxies_and_carry_the_metadata_header(imds, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # a proxy that is not there
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert ScheduledEvents(imds.endpoint).vm_name() == VM
    plain = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as error:  # the fake refuses a request without it, like Azure
        plain.open(f"{imds.endpoint}/metadata/scheduledevents?api-version=2020-07-01", timeout=5)
    assert error.value.code == 400


def test_an_event_parses_from_the_documented_json_and_matches_names_exactly():
    event = Event.from_json({
        "EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123", "EventStatus": "Started", "EventType": "Freeze",
        "ResourceType": "VirtualMachine", "Resources": ["WestNO_0", "WestNO_1"], "NotBefore": "",
        "Description": "Virtual machine is being paused", "EventSource": "Platform", "DurationInSeconds": 5,
    })
    assert event.not_before is None and event.duration_s == 5 and event.status == "Started"
    assert event.affects("westno_1") and not event.affects("WestNO_10") and not event.affects("WestNO")
    scheduled = Event.from_json({"EventId": "a", "EventType": "Preempt", "Resources": ["vmss_3"],
                                 "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"})
    assert scheduled.not_before.isoformat() == "2016-09-19T18:29:47+00:00"
    with pytest.raises(TypeError):
        Event.from_json({"EventId": "a", "EventType": "Preempt", "Resources": "vmss_3"})


def test_step_flags_without_a_group_of_two_are_the_local_flags():
    # other tests in this process may have left a 1-rank group (DeepSpeed needs one): same answer
    assert not dist.is_initialized() or dist.get_world_size() == 1
    flags = StepFlags(2)
    assert flags.exchange([True, False]) == [True, False] and flags.settle() == [False, False]
    with pytest.raises(ValueError, match="1 flags given, 2 expected"):
        flags.exchange([True])


def _agree_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        flags = StepFlags(2, group=dist.new_group(backend="gloo"))
        # only rank 1 has a notice at step 2; each step returns the step before's, reduced
        steps = [[False, rank == 0], [rank == 1, False], [False, False]]
        results = [flag for step in steps for flag in flags.exchange(step)] + flags.settle()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(" ".join(str(r) for r in results))


@pytest.mark.timeout(90)
def test_step_flags_make_every_rank_see_one_ranks_flag_a_step_later(tmp_path):
    context = mp.start_processes(_agree_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    try:
        deadline = time.monotonic() + 60
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the 2 gloo ranks did not finish in 60 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    expected = [False, False, False, True, True, False, False, False]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == [" ".join(map(str, expected))] * 2
