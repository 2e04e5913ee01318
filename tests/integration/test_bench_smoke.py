"""bench/data.py runs end to end on tiny data (its numbers are not checked: benchmarks are not tests)."""

import sys

import pytest
from helpers import REPO, run

pytestmark = pytest.mark.timeout(180)


def test_data_benchmark_smoke_run_checks_every_reader_batch(tmp_path):
    out = run([sys.executable, "bench/data.py", "--smoke", "--only", "raw,shardrun", "--cache", str(tmp_path)],
              timeout=150, cwd=REPO).stdout
    assert "| shardrun |" in out and "| raw |" in out


def test_metrics_benchmark_runs():
    out = run([sys.executable, "bench/metrics.py", "--reps", "1", "--steps", "20"], timeout=120, cwd=REPO).stdout
    assert "share of the step" in out
