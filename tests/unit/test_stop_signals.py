"""A stop signal asks for a checkpoint and a stop once; a second one stops at once; the exit status says which."""

import os
import signal

import pytest

from shardrun.cli import stopped_exit
from shardrun.driver.stop_signals import StopSignals


@pytest.mark.parametrize(("signum", "name", "status"), [(signal.SIGINT, "SIGINT", 130),
                                                       (signal.SIGTERM, "SIGTERM", 143),
                                                       (signal.SIGHUP, "SIGHUP", 129)])
def test_the_first_signal_requests_a_stop_and_the_second_stops_at_once(signum, name, status):
    requested, lines = [], []
    before = signal.getsignal(signum)
    with StopSignals(requested.append, lines.append) as stops:
        os.kill(os.getpid(), signum)
        assert requested == [name] and stops.received == name
        assert lines[0].startswith(f"stop requested ({name}): the workers checkpoint at the next step and stop")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signum) == before and requested == [name]
    assert stopped_exit(name) == status and stopped_exit(None) == 0
