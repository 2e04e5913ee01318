"""A fake Azure instance metadata service on 127.0.0.1: Scheduled Events and the VM's name.

It answers like IMDS does where the tests can tell: 400 without the `Metadata: true` header or the
api-version, 404 for paths it does not serve, RFC 1123 NotBefore times, a DocumentIncarnation that
grows on every change, and an approved event (POST StartRequests) taken off the list.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FakeMetadataServer:
    """`with FakeMetadataServer("vmss_3") as imds:` serves on `imds.endpoint` until the block ends."""

    def __init__(self, vm_name: str = "shardrun_0", port: int = 0):
        self.vm_name = vm_name
        self._lock = threading.Lock()
        self._incarnation = 1
        self._events: list[dict] = []
        self._acknowledged: list[str] = []
        self._raw_body: bytes | None = None
        self._polls = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        # a short poll interval: close() waits for it
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-imds", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def acknowledged(self) -> list[str]:
        """Event ids approved by a POST, in order."""
        with self._lock:
            return list(self._acknowledged)

    @property
    def polls(self) -> int:
        """How many GETs of the scheduled events there were."""
        with self._lock:
            return self._polls

    def announce(self, event_type: str, resources: list[str], *, not_before_s: float = 30.0,
                 status: str = "Scheduled", source: str = "Platform", description: str = "",
                 duration_s: int = -1) -> str:
        """Schedule an event for `resources` (VM names) `not_before_s` from now; returns its id."""
        event_id = str(uuid.uuid4()).upper()
        not_before = datetime.now(timezone.utc) + timedelta(seconds=not_before_s)
        event = {
            "EventId": event_id, "EventType": event_type, "ResourceType": "VirtualMachine",
            "Resources": list(resources), "EventStatus": status,
            "NotBefore": "" if status == "Started" else format_datetime(not_before, usegmt=True),
            "Description": description, "EventSource": source, "DurationInSeconds": duration_s,
        }
        with self._lock:
            self._events.append(event)
            self._incarnation += 1
        return event_id

    def clear(self) -> None:
        """Take every event off the list (they completed, or Azure cancelled them)."""
        with self._lock:
            self._events.clear()
            self._incarnation += 1

    def answer_raw(self, body: bytes | None) -> None:
        """Answer GETs of the scheduled events with `body` as is (200, JSON type); None: the real document."""
        with self._lock:
            self._raw_body = body

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeMetadataServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _document(self) -> bytes:
        with self._lock:
            self._polls += 1
            if self._raw_body is not None:
                return self._raw_body
            return json.dumps({"DocumentIncarnation": self._incarnation, "Events": self._events}).encode()

    def _approve(self, body: bytes) -> int:
        try:
            ids = [request["EventId"] for request in json.loads(body)["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return 400
        with self._lock:
            known = {e["EventId"] for e in self._events}
            if not ids or any(i not in known for i in ids):
                return 400
            self._acknowledged.extend(ids)
            self._events = [e for e in self._events if e["EventId"] not in ids]
            self._incarnation += 1
        return 200


def _handler_for(imds: FakeMetadataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path, query = self._checked()
            if path is None:
                return
            if path == "/metadata/scheduledevents":
                self._send(200, imds._document(), "application/json")
            elif path == "/metadata/instance/compute/name":
                if query.get("format") != ["text"]:  # a leaf of the instance document needs format=text
                    self._error(400, "Bad request. format=text is required for a leaf node")
                else:
                    self._send(200, imds.vm_name.encode(), "text/plain")
            else:
                self._error(404, "Not found")

        def do_POST(self):
            path, _ = self._checked()
            if path is None:
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path != "/metadata/scheduledevents":
                self._error(404, "Not found")
            elif (status := imds._approve(body)) != 200:
                self._error(status, "Bad request. StartRequests payload is malformed or names an unknown event")
            else:
                self._send(200, b"", "application/json")

        def _checked(self) -> tuple[str | None, dict]:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if self.headers.get("Metadata", "").lower() != "true":
                self._error(400, "Bad request. Required metadata header not specified")
                return None, query
            if "api-version" not in query:
                self._error(400, "Bad request. api-version is invalid or was not specified in the request.")
                return None, query
            return url.path, query

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: tests read their own output
            pass

    return Handler


def main() -> None:
    """Serve as one VM's metadata service, e.g. inside a test node's network namespace, where each node
    has a loopback of its own: once --trigger exists, announce --event for --vm-name; write every
    acknowledged event id to --acks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--vm-name", required=True)
    parser.add_argument("--event", default="Preempt")
    parser.add_argument("--not-before", type=float, default=30.0, help="seconds of notice")
    parser.add_argument("--trigger", required=True)
    parser.add_argument("--acks", required=True)
    args = parser.parse_args()
    with FakeMetadataServer(args.vm_name, args.port) as imds:
        print(f"fake metadata service for {args.vm_name} at {imds.endpoint}", flush=True)
        while not os.path.exists(args.trigger):
            time.sleep(0.2)
        print(f"announced {args.event}: {imds.announce(args.event, [args.vm_name], not_before_s=args.not_before)}",
              flush=True)
        while True:
            with open(args.acks + ".tmp", "w") as f:
                f.write("".join(f"{event_id}\n" for event_id in imds.acknowledged))
            os.replace(args.acks + ".tmp", args.acks)
            time.sleep(0.2)


if __name__ == "__main__":
    main()
