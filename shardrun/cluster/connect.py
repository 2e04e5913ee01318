"""Connect the driver to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`), else a local one."""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading

import ray

from shardrun.errors import UserError
from shardrun.net import free_port

SHARED_WITH_RAY_INIT = ("ray.autoscaler._private.cli_logger", "ray._common.usage.usage_lib", "ray.dashboard",
                        "prometheus_client")
"""Modules that both ray.init and Ray Train's import pull in (measured with sys.modules, ray 2.60): imported
before the preload starts (about 25 ms), so that the two threads never import one module at once."""

PROBE_TIMEOUT_S = 10.0
_where: str | None = None


def connect(preload: str | None = None) -> str:
    """ray.init for the driver; returns a few words on where it is connected.

    preload: a module to import in a thread meanwhile. ray.init mostly waits for Ray's processes to start
    (or for the cluster to answer), so Ray Train's modules and torch under them (about 2 s) come nearly
    free then (bench/startup.py, the driver's "Ray up" phase). An import that fails there fails again,
    with its traceback, where the caller imports the module itself.
    """
    global _where
    if ray.is_initialized():
        return _where or "the Ray cluster this process joined already"
    thread = None
    if preload:
        for name in SHARED_WITH_RAY_INIT:
            importlib.import_module(name)
        thread = threading.Thread(target=_import_quietly, args=(preload,), name="shardrun-preload", daemon=True)
        thread.start()
    try:
        _where = _init()
    finally:
        if thread is not None:
            thread.join()
    return _where


def _import_quietly(name: str) -> None:
    try:
        importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - the caller's own import raises it again
        pass


def _probe(address: str) -> None:
    """A TCP connect to RAY_ADDRESS's host:port ("auto" and other forms are left to Ray). Ray's own client
    retries an address where nothing answers for good, printing GCS warnings every few seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(
            f"nothing answers at RAY_ADDRESS={address!r} ({e or type(e).__name__}): check the address (the head "
            "node's GCS port, 6379 unless `ray start --port` said otherwise) and that the head node is up, or "
            "unset RAY_ADDRESS to train on a local Ray instance"
        ) from None


def _local_dashboard() -> dict:
    """ray.init's arguments that put a local instance's dashboard on a port chosen here, and that port in
    RAY_API_SERVER_ADDRESS, which the instance's processes inherit from this one (a job-wide runtime_env did the
    same, but its worker group started 1.4 s later in the one run tried).

    Ray Train's PlacementGroupCleaner, a detached actor, asks Ray's state API every second whether the run's
    controller still lives. Without an address in its environment the state API takes the cluster named in
    /tmp/ray/ray_current_cluster, which only `ray start` writes: on a machine where one ran before, a cluster
    that is gone (each check then waits on a GCS that never answers, and the end of every run waits 12 s for
    the cleaner to stop) or another live cluster, which does not know this run's controller.
    RAY_API_SERVER_ADDRESS comes first in Ray's lookup. One set already is left as it is.
    """
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return {}
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"dashboard_port": port}


def _init() -> str:
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            _probe(address)
            ray.init(address=address, logging_level=logging.WARNING)
            return f"the Ray cluster at {address}"
        ray.init(address="local", logging_level=logging.WARNING, **_local_dashboard())
    except ConnectionError as e:
        raise UserError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address!r} ({e}); "
            "check the address, or unset RAY_ADDRESS to train on a local Ray instance"
        ) from None
    except ray.exceptions.AuthenticationError as e:
        raise UserError(
            f"the Ray cluster at {address} refused this client's token ({e}); put the cluster's "
            "token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and set RAY_AUTH_MODE=token "
            "(Ray's client sends a token to a given address only then)"
        ) from None
    return "a local Ray instance"
