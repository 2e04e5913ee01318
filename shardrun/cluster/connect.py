"""Connect the driver to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os

import ray

from shardrun.errors import UserError


def connect() -> str:
    """ray.init for the driver; returns a few words on where it is connected."""
    if ray.is_initialized():
        return "the Ray cluster this process joined already"
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
            return f"the Ray cluster at {address}"
        ray.init(address="local", logging_level=logging.WARNING)
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
