"""What the exporters serve passes `promtool check metrics` (names, units, help, types) and is the contract."""

import subprocess
import urllib.request

import pytest
from monitoring_config import PROMTOOL, contract_series

from shardrun.config import MetricsSpec
from shardrun.metrics import JobMetrics, WorkerMetrics

pytestmark = pytest.mark.timeout(60)


OPTIONAL = {"shardrun_eval_loss", "shardrun_grad_norm", "shardrun_loss_scale", "shardrun_mfu_ratio",
            "shardrun_device_memory_allocated_bytes", "shardrun_device_memory_reserved_bytes",
            "shardrun_device_memory_peak_bytes"}


def _exposition(everything: bool = True) -> str:
    spec = MetricsSpec(host="127.0.0.1")
    worker, job = WorkerMetrics(spec, run="r", rank=0, local_rank=0), JobMetrics(spec, run="r")
    try:
        worker.step_done(step=1, seconds=0.1, data_wait=0.0, samples=2, tokens=64)
        if everything:
            data = {"queue_depth": 1, "buffered_bytes": 1, "skipped_files": 0, "skipped_row_groups": 0}
            worker.logged(loss=1.0, lr=0.1, grad_norm=1.0, loss_scale=1024.0, mfu=0.4, skipped_steps=0, data=data,
                          world_size=1, memory=(1, 2, 3))
            worker.evaluated(1.5)
        return "".join(urllib.request.urlopen(f"http://{m.address}/metrics", timeout=10).read().decode()
                       for m in (worker, job))
    finally:
        worker.close()
        job.close()


def test_promtool_finds_nothing_to_lint_in_the_exposition():
    text = _exposition()
    result = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def _served(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("shardrun_")}


def test_the_exporters_serve_exactly_the_contract():
    assert _served(_exposition()) == set(contract_series())
    # gauges with nothing to say (MFU on CPU, loss scale outside fp16) are absent, not 0
    assert _served(_exposition(everything=False)) == set(contract_series()) - OPTIONAL
