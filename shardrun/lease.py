"""One run at a time per run dir: a lease, `<checkpoint.storage>/<name>.lease.json`, beside the run dir.

A run (`shardrun run`, `train`, the job `submit` starts) takes the lease before it writes anything, renews it
every TTL_S / 3 seconds from a thread and deletes it at its end. A second run of the name finds a live lease
and stops at once, naming the holder. A lease whose holder is gone expires: TTL_S seconds after its last
renewal, or at once when its holder was a process on this machine that no longer exists.

It lies beside the run dir, not in it: `--fresh` moves the run dir aside while the lease stays.

Taking it: on a local or shared disk the lease file appears through a hard link, which fails when the name
exists (atomic on local disks and NFS), so of two runs racing exactly one gets it. Object stores (pyarrow has
no conditional write) have the last writer win: the run writes, waits SETTLE_S, reads back, and goes on only
if what it reads is its own; each renewal reads back too, so a run that lost a race too close to call finds
out within one renewal and says so.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from shardrun import fs
from shardrun.errors import UserError, redact

TTL_S = 120.0
"""A lease not renewed for this long is expired (renewed every TTL_S / 3; clocks of the machines that share a
storage must agree to well within it, as NTP keeps them)."""
SETTLE_S = 2.0
"""On object stores: the wait between writing the lease and reading it back."""
SUFFIX = ".lease.json"


def lease_path(run_dir: str) -> str:
    """`<storage>/<name>.lease.json` for the run dir `<storage>/<name>` (a URI's query kept last)."""
    base, query = fs.split_query(run_dir)
    return base.rstrip("/") + SUFFIX + query


@dataclass(frozen=True)
class Holder:
    """Who holds a run dir: what a refusal names."""

    id: str
    command: str
    user: str
    host: str
    pid: int
    started: float
    renewed: float
    ttl_s: float
    job: str | None = None
    """The Ray job's submission id, for a run that `shardrun submit` (or `ray job submit`) started."""

    @classmethod
    def me(cls, command: str, now: float, ttl_s: float) -> Holder:
        return cls(id=uuid.uuid4().hex, command=command, user=_user(), host=socket.gethostname(), pid=os.getpid(),
                   started=now, renewed=now, ttl_s=ttl_s, job=_ray_job())

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        job = f", Ray job {self.job}" if self.job else ""
        return (f"`shardrun {self.command}` by {self.user} on {self.host} (pid {self.pid}{job}), started {started}, "
                f"last renewed {max(0, round(now - self.renewed))} s ago")


def live(holder: Holder, now: float, *, host: str | None = None, alive: Callable[[int], bool] | None = None) -> bool:
    """Whether holder still holds its lease at `now`: renewed within its ttl, and, if it ran on this machine
    (`host`), its process still there."""
    if now - holder.renewed >= holder.ttl_s:
        return False
    if holder.host == (host or socket.gethostname()):
        return (alive or _alive)(holder.pid)
    return True


def read(run_dir: str) -> Holder | None:
    """The lease's holder, or None when there is none. A lease file that cannot be parsed (cut off by a full
    disk) names no holder: it counts as expired."""
    text = fs.read_text(lease_path(run_dir))
    if text is None:
        return None
    try:
        data = json.loads(text)
        return Holder(**{f.name: data[f.name] for f in fields(Holder) if f.name in data})
    except (ValueError, TypeError, AttributeError):
        return Holder(id="unreadable", command="?", user="?", host="?", pid=0, started=0, renewed=0, ttl_s=0)


class RunDirBusy(UserError):
    """Another run holds the run dir."""


class Lease:
    """The run dir held by this process: `with Lease(run_dir, "run"):` takes it (RunDirBusy if another run
    holds it), renews it from a daemon thread, and gives it back at the end."""

    def __init__(self, run_dir: str, command: str, *, emit: Callable[[str], None] = fs.log, ttl_s: float = TTL_S,
                 settle_s: float = SETTLE_S, clock: Callable[[], float] = time.time):
        self.run_dir = run_dir
        self.path = lease_path(run_dir)
        self.emit = emit
        self.clock = clock
        self.settle_s = settle_s
        self.holder = Holder.me(command, clock(), ttl_s)
        self.local = not fs.is_uri(run_dir)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_folder: str | None = None
        self.lost_to: Holder | None = None
        """Set when a renewal found another run's lease in place of this one."""

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):  # a stale lease removed, or raced for, then tried again
            current = read(self.run_dir)
            if current is not None and live(current, self.clock()):
                raise self._busy(current)
            if self._take(current):
                break
        else:
            raise self._busy(read(self.run_dir))
        self._thread = threading.Thread(target=self._renew_loop, name="shardrun-lease", daemon=True)
        self._thread.start()

    def _take(self, stale: Holder | None) -> bool:
        """Write this holder's lease in place of `stale` (None: no lease); False if another run got there first."""
        if not self.local:
            self._write()
            time.sleep(self.settle_s)
            now = read(self.run_dir)
            if now is not None and now.id != self.holder.id:
                if live(now, self.clock()):
                    raise self._busy(now)
                return False
            return True
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            os.makedirs(parent)
            self._made_folder = parent  # removed again at the end if the run left it empty
        if stale is not None:  # renamed away first: of two runs that both found it stale, one renames it
            try:
                os.rename(self.path, f"{self.path}.stale-{self.holder.id}")
            except FileNotFoundError:
                return False
            os.unlink(f"{self.path}.stale-{self.holder.id}")
        tmp = f"{self.path}.tmp-{self.holder.id}"
        with open(tmp, "w") as f:
            f.write(self._text())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # fails if the name exists: exactly one of two racing runs gets it
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _text(self) -> str:
        return json.dumps(asdict(self.holder), indent=2) + "\n"

    def _write(self) -> None:
        fs.write_text(self.path, self._text())

    def renew(self) -> bool:
        """Write the lease again with the time now; False (and lost_to set, said once) when another run's lease
        is in its place."""
        current = read(self.run_dir)
        if current is not None and current.id != self.holder.id:
            if self.lost_to is None:
                self.lost_to = current
                self.emit(f"this run's lease on {redact(self.run_dir)} was taken by {current.describe(self.clock())}:"
                          " two runs are writing one run dir; stop one of them")
            return False
        self.holder = Holder(**{**asdict(self.holder), "renewed": self.clock()})
        self._write()
        return True

    def _renew_loop(self) -> None:
        failing = False
        while not self._stop.wait(self.holder.ttl_s / 3):
            try:
                if not self.renew():
                    return
                failing = False
            except OSError as e:  # storage unreachable for a moment: tried again at the next tick
                if not failing:
                    self.emit(f"could not renew the lease on {redact(self.run_dir)} ({e}); trying again")
                failing = True

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            current = read(self.run_dir)
            if current is not None and current.id == self.holder.id:
                storage, path = fs.filesystem(self.path)
                storage.delete_file(path)
        except OSError as e:  # it expires by itself
            self.emit(f"could not delete the lease {redact(self.path)} ({e}); it expires in {self.holder.ttl_s:.0f} s")
        if self._made_folder:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                os.rmdir(self._made_folder)

    def _busy(self, holder: Holder | None) -> RunDirBusy:
        if holder is None:
            return RunDirBusy(f"{redact(self.run_dir)}: another run took this run dir's lease at the same moment; "
                              "try again")
        stop = (f"`shardrun stop {holder.job}`" if holder.job
                else f"Ctrl-C in its terminal, or `kill -INT {holder.pid}` on {holder.host}")
        return RunDirBusy(
            f"{redact(self.run_dir)} is in use by {holder.describe(self.clock())}. Wait for it to end, stop it "
            f"({stop}), or give this run another name. If that run is gone, its lease ({redact(self.path)}) "
            f"expires {holder.ttl_s:.0f} s after its last renewal.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _ray_job() -> str | None:
    """The submission id of the Ray job this process is the driver of (Ray's job supervisor passes it in the
    job's config), or None."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return (config.get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
