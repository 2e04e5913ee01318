"""Notice that Azure is about to take this VM away: its Scheduled Events, watched from a thread.

Every Azure VM can read its upcoming maintenance from the Instance Metadata Service (IMDS):
GET /metadata/scheduledevents lists events such as `Preempt` (a Spot VM is evicted, at least 30 s
notice) or `Terminate` (a scale-set instance is deleted, 5 to 15 min notice). Events for a whole
availability set or scale-set placement group are delivered to every VM in it, so an event concerns
this VM only when its name (/metadata/instance/compute/name, `vmss_3` for a scale-set instance) is
in the event's `Resources`. A POST of the event id approves it: Azure may then start it early.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

IMDS = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents"
EVENTS_API_VERSION = "2020-07-01"
NAME_PATH = "/metadata/instance/compute/name"
INSTANCE_API_VERSION = "2021-02-01"


class MetadataServiceError(Exception):
    """A request to the instance metadata service failed; the message names the URL."""


class MetadataUnavailable(MetadataServiceError):
    """Nothing that is Azure's metadata service answered: refused, unreachable, timed out, or 404."""


class MetadataError(MetadataServiceError):
    """The metadata service answered, but with an error status or a body the API does not document."""


@dataclass(frozen=True)
class Event:
    """One scheduled event, as IMDS api-version 2020-07-01 describes it."""

    event_id: str
    event_type: str
    """Freeze, Reboot, Redeploy, Preempt or Terminate."""
    status: str
    """Scheduled, or Started (Azure goes straight to Started after a host hardware failure)."""
    resources: tuple[str, ...]
    """Names of the VMs the event affects."""
    not_before: datetime | None
    """The event will not start before this time; None once it has started."""
    description: str = ""
    source: str = ""
    """Platform or User."""
    duration_s: int = -1
    """Expected interruption; -1 when unknown."""

    def affects(self, vm_name: str) -> bool:
        """Whether `vm_name` is one of the resources (exactly: `vmss_3` is not `vmss_30`)."""
        # Azure resource names are case-insensitive
        return any(name.casefold() == vm_name.casefold() for name in self.resources)

    @classmethod
    def from_json(cls, item: dict) -> Event:
        """Parse one element of `Events`; KeyError/TypeError/ValueError when it is not an event."""
        resources = item["Resources"]
        if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
            raise TypeError(f"Resources is not a list of names: {resources!r}")
        event_id, event_type = item["EventId"], item["EventType"]
        if not (isinstance(event_id, str) and event_id and isinstance(event_type, str) and event_type):
            raise TypeError(f"EventId and EventType must be non-empty strings: {event_id!r}, {event_type!r}")
        return cls(
            event_id=event_id,
            event_type=event_type,
            status=str(item.get("EventStatus", "")),
            resources=tuple(resources),
            not_before=_parse_time(item.get("NotBefore")),
            description=str(item.get("Description", "")),
            source=str(item.get("EventSource", "")),
            duration_s=int(item.get("DurationInSeconds", -1)),
        )


def _parse_time(value) -> datetime | None:
    """NotBefore is an RFC 1123 date ("Mon, 19 Sep 2016 18:29:47 GMT"), blank once the event started."""
    try:
        return parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None  # the notice still stands without its time


class ScheduledEvents:
    """Client of this VM's Scheduled Events (and its own name) on the instance metadata service."""

    def __init__(self, endpoint: str = IMDS, timeout: float = 2.0):
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        # Azure: IMDS must never be reached through a proxy, even one found in the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def events_url(self) -> str:
        return f"{self.endpoint}{EVENTS_PATH}?api-version={EVENTS_API_VERSION}"

    def vm_name(self) -> str:
        """This VM's name as scheduled events list it in `Resources` (for a scale set: `<set>_<instance id>`)."""
        url = f"{self.endpoint}{NAME_PATH}?api-version={INSTANCE_API_VERSION}&format=text"
        name = self._request(url).decode("utf-8", "replace").strip()
        if not name:
            raise MetadataError(f"{url} answered an empty VM name")
        return name

    def poll(self) -> tuple[int, list[Event]]:
        """The document incarnation (grows whenever the events change) and the current events."""
        url = self.events_url
        body = self._request(url)
        try:
            document = json.loads(body)
            incarnation = int(document["DocumentIncarnation"])
            events = [Event.from_json(item) for item in document["Events"]]
        except (ValueError, KeyError, TypeError) as e:
            raise MetadataError(f"{url} answered something that is not a scheduled events document "
                                f"({type(e).__name__}: {e}): {body[:200]!r}") from None
        return incarnation, events

    def acknowledge(self, event_id: str) -> None:
        """Approve an event: this VM is ready, Azure may start it before its NotBefore time."""
        payload = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
        self._request(self.events_url, payload)

    def _request(self, url: str, data: bytes | None = None) -> bytes:
        headers = {"Metadata": "true"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:  # another cloud's metadata service, or none of Azure's endpoints
                raise MetadataUnavailable(f"{url} answered 404 {e.reason}: this is not Azure's "
                                          "instance metadata service") from None
            detail = e.read()[:200].decode("utf-8", "replace")
            raise MetadataError(f"{url} answered HTTP {e.code} {e.reason}: {detail}") from None
        except http.client.HTTPException as e:
            raise MetadataError(f"{url} answered something that is not HTTP: {e!r}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
            reason = getattr(e, "reason", e)
            raise MetadataUnavailable(f"no metadata service answered at {url}: {reason}") from None


class PreemptionWatcher:
    """A daemon thread that polls Scheduled Events and records the first event that takes this VM away.

    It never raises into the training loop: without a metadata service (not on Azure) it says so in
    one line and stops; later failures are reported once per outage and retried. After the notice it
    stops polling. Run one per VM (local rank 0) and share the notice through the step flags: IMDS answers at
    most 5 requests a second per VM, and 429s the rest.
    """

    def __init__(self, events: ScheduledEvents, *, poll_seconds: float = 1.0,
                 kinds: Iterable[str] = ("Preempt", "Terminate"), emit: Callable[[str], object] = print):
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
        self.events = events
        self.poll_seconds = poll_seconds
        self.kinds = frozenset(kinds)
        self.emit = emit
        self.vm_name: str | None = None
        self._lock = threading.Lock()
        self._notice: Event | None = None
        self._acknowledged = False
        self._incarnation: int | None = None
        self._failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def notice(self) -> Event | None:
        """The event that takes this VM away, once seen; None until then."""
        with self._lock:
            return self._notice

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> PreemptionWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shardrun-preemption", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; waits at most for a request in flight (events.timeout)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.events.timeout + 1)

    def __enter__(self) -> PreemptionWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def acknowledge(self) -> bool:
        """Approve the noticed event, once; True when this call approved it."""
        with self._lock:
            event = self._notice
            if event is None or self._acknowledged:
                return False
            self._acknowledged = True
        try:
            self.events.acknowledge(event.event_id)
        except MetadataServiceError as e:
            with self._lock:
                self._acknowledged = False  # let a later call try again
            self.emit(f"preemption: could not acknowledge event {event.event_id}: {e}")
            return False
        self.emit(f"preemption: acknowledged event {event.event_id}")
        return True

    def _run(self) -> None:
        try:
            self.vm_name = self._resolve_vm_name()
            while self.vm_name is not None and self.notice is None and not self._stopping.is_set():
                self._poll_once()
                self._stopping.wait(self.poll_seconds)
        except Exception as e:  # a bug here must cost the notice, never the training run
            self.emit(f"preemption: watcher stopped by an unexpected error: {e!r}")

    def _resolve_vm_name(self) -> str | None:
        while not self._stopping.is_set():
            try:
                name = self.events.vm_name()
            except MetadataUnavailable as e:
                self.emit(f"preemption: not watching for Azure scheduled events ({e})")
                return None
            except MetadataError as e:
                self._failed(e)
            else:
                self._recovered()
                return name
            self._stopping.wait(self.poll_seconds)
        return None

    def _poll_once(self) -> None:
        try:
            # the first request can take up to two minutes while Azure turns Scheduled Events on:
            # its timeout is one more transient failure, retried
            incarnation, events = self.events.poll()
        except MetadataServiceError as e:
            self._failed(e)
            return
        self._recovered()
        if incarnation == self._incarnation:
            return  # the same incarnation holds the same events
        self._incarnation = incarnation
        for event in events:
            if event.event_type in self.kinds and event.affects(self.vm_name):
                with self._lock:
                    self._notice = event
                self.emit(_describe(event, self.vm_name))
                return

    def _failed(self, error: MetadataServiceError) -> None:
        if not self._failing:
            self._failing = True
            self.emit(f"preemption: scheduled events not readable, retrying every {self.poll_seconds:g}s: {error}")

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            self.emit("preemption: scheduled events readable again")


def _describe(event: Event, vm_name: str) -> str:
    when = f" not before {event.not_before.isoformat()}" if event.not_before else ""
    status = event.status.lower() or "scheduled"
    return f"preemption: {event.event_type} {status} for {vm_name}{when} (event {event.event_id})"


WAIT_MARGIN_S = 60.0
"""How long past an event's NotBefore the ranks wait for a drained node to go before they stop anyway."""

AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
"""The DMI chassis asset tag of every Azure VM: tells Azure apart with no request sent."""


def on_azure(dmi: str = "/sys/class/dmi/id/chassis_asset_tag") -> bool:
    try:
        with open(dmi) as f:
            return f.read().strip() == AZURE_ASSET_TAG
    except OSError:
        return False


def endpoint_for(setting: str) -> str | None:
    """failure.scheduled_events: "auto" (the metadata service on Azure VMs, else none), "off", or a URL."""
    if setting == "off":
        return None
    if setting == "auto":
        return IMDS if on_azure() else None
    return setting
