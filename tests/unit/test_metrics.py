"""The metric set, MFU arithmetic, the run observer's target file and metrics.jsonl (no processes)."""

import json
import urllib.request

import pytest
from helpers import tiny_spec

from shardrun.config import MetricsSpec, parse
from shardrun.driver.observer import RunObserver
from shardrun.metrics import JobMetrics, WorkerMetrics, flops
from shardrun.trainer.models.gpt import GPT, GPTConfig

LOOPBACK = MetricsSpec(host="127.0.0.1")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str, **labels) -> float:
    """The sample `name{labels...}` in an exposition text (labels given must all match)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in:\n{text}")


def test_gpt2_small_flops_per_token_matches_the_palm_formula():
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304))
    n = sum(p.numel() for p in model.parameters()) - 1024 * 768  # tied head counted once, no wpe
    assert flops.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert 0.85e9 < flops.flops_per_token(model, 1024) < 0.86e9
    plain = GPT(GPTConfig()).blocks[0]  # no flops_per_token of its own: 6N
    assert flops.flops_per_token(plain, 64) == 6 * sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("Tesla T4", "fp16", 65e12),
    ("Tesla V100-PCIE-16GB", "fp32", 15.7e12),
    ("Tesla V100-PCIE-16GB", "bf16", None),  # no bf16 on Volta
    ("Some Future GPU", "bf16", None),
])
def test_device_peaks(name, precision, peak):
    assert flops.device_peak(name, precision) == peak


def test_worker_series_carry_bounded_labels_and_count_deltas():
    m = WorkerMetrics(LOOPBACK, run="r1", rank=3, local_rank=1)
    try:
        for step in (1, 2):
            m.step_done(step=step, seconds=0.2, data_wait=0.01, samples=4, tokens=128)
        data = {"queue_depth": 3, "buffered_bytes": 1000, "wait_seconds": 0.02, "skipped_files": 1,
                "skipped_row_groups": 2}
        m.logged(loss=2.5, lr=1e-3, grad_norm=0.7, loss_scale=None, mfu=0.41, skipped_steps=1, data=data,
                 world_size=4, memory=(10, 20, 30))
        m.logged(loss=float("nan"), lr=1e-3, grad_norm=float("inf"), loss_scale=None, mfu=None, skipped_steps=0,
                 data={**data, "skipped_row_groups": 3}, world_size=4, memory=None)
        m.checkpoint_saved(1.5)
        text = scrape(m.address)
    finally:
        m.close()
    labels = {"run": "r1", "rank": "3"}
    assert value(text, "shardrun_tokens_total", **labels) == 256
    assert value(text, "shardrun_steps_total", **labels) == 2 and value(text, "shardrun_step", **labels) == 2
    assert value(text, "shardrun_step_duration_seconds_count", **labels) == 2
    assert value(text, "shardrun_data_wait_seconds_sum", **labels) == pytest.approx(0.02)
    assert str(value(text, "shardrun_loss", **labels)) == "nan"  # what the alert looks for
    assert value(text, "shardrun_grad_norm", **labels) == 0.7  # a non-finite norm is not a reading
    assert value(text, "shardrun_mfu_ratio", **labels) == 0.41
    assert value(text, "shardrun_data_skipped_files_total", **labels) == 1
    assert value(text, "shardrun_data_skipped_row_groups_total", **labels) == 3
    assert value(text, "shardrun_skipped_steps_total", **labels) == 1
    assert value(text, "shardrun_checkpoint_save_seconds_count", **labels) == 1
    assert value(text, "shardrun_device_memory_reserved_bytes", **labels) == 20
    assert value(text, "shardrun_device_memory_peak_bytes", **labels) == 30
    # labels are run, rank and node only: never a step or sample id
    for line in text.splitlines():
        if line.startswith("shardrun_") and "{" in line:
            keys = {kv.split("=")[0] for kv in line[line.index("{") + 1 : line.index("}")].split(",")}
            assert keys <= {"run", "rank", "node", "le"}, line


def test_a_fixed_port_is_offset_by_the_local_rank():
    from helpers import free_port

    port = free_port()
    m = WorkerMetrics(MetricsSpec(host="127.0.0.1", port=port - 1), run="r", rank=5, local_rank=1)
    try:
        assert m.address == f"127.0.0.1:{port}"
    finally:
        m.close()


def test_observer_keeps_the_target_file_and_metrics_jsonl(tmp_path, corpus):
    spec = parse(tiny_spec(corpus, tmp_path / "runs"))
    lines = []
    observer = RunObserver(spec, lines.append)
    target_file = tmp_path / "runs" / "targets" / "tiny.json"
    endpoints = [{"rank": r, "address": f"127.0.0.1:{9000 + r}", "node": "n1"} for r in range(2)]
    observer.started({"step": 0, "world_size": 2, "endpoints": endpoints}, "starting")
    groups = json.loads(target_file.read_text())
    assert groups[0] == {"targets": ["127.0.0.1:9000"], "labels": {"run": "tiny", "rank": "0", "node": "n1"}}
    assert groups[-1]["labels"] == {"run": "tiny", "role": "driver"}
    job_text = scrape(groups[-1]["targets"][0])
    assert value(job_text, "shardrun_job_state", state="running") == 1
    assert value(job_text, "shardrun_job_workers") == 2

    observer.record({"step": 5, "loss": 2.0}, "step 5")
    observer.started({"step": 5, "world_size": 1, "endpoints": endpoints[:1]}, "resuming")  # a smaller group
    assert len(json.loads(target_file.read_text())) == 2
    job_text = scrape(groups[-1]["targets"][0])
    assert value(job_text, "shardrun_job_restarts_total") == 1 and value(job_text, "shardrun_job_workers") == 1
    observer.record({"step": 10, "loss": 1.5}, "step 10")
    observer.close("succeeded")

    assert not target_file.exists()
    assert [line for line in lines if not line.startswith("metrics: ")] == ["starting", "step 5", "resuming", "step 10"]
    assert lines[1].startswith("metrics: 2 ranks and the run's own series (state, workers, restarts) at 127.0.0.1:")
    assert lines[4].startswith("metrics: 1 ")
    rows = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(5, 2.0), (10, 1.5)] and all("time" in r for r in rows)


def test_job_state_is_one_state_at_a_time():
    job = JobMetrics(LOOPBACK, run="j")
    try:
        text = scrape(job.address)
        assert value(text, "shardrun_job_state", state="pending") == 1
        job.set_state("failed")
        text = scrape(job.address)
        states = {s: value(text, "shardrun_job_state", state=s) for s in ("pending", "running", "failed")}
        assert states == {"pending": 0, "running": 0, "failed": 1}
    finally:
        job.close()


def test_a_failing_append_to_metrics_jsonl_holds_the_records_back_and_never_stops_the_lines(tmp_path, corpus):
    spec = parse(tiny_spec(corpus, tmp_path / "runs", metrics={"enabled": False}))
    blocked = tmp_path / "runs/tiny/metrics.jsonl"
    blocked.mkdir(parents=True)  # storage refuses the append (as a blob store that is down would)
    lines = []
    observer = RunObserver(spec, lines.append)
    observer.record({"step": 1, "loss": 3.0}, "step 1")
    observer.record({"step": 2, "loss": 2.5}, "step 2")
    blocked.rmdir()
    observer.record({"step": 3, "loss": 2.0}, "step 3")
    observer.close("succeeded")
    assert lines[0] == "step 1" and lines[1].startswith(f"metrics.jsonl: cannot append to {blocked} (")
    assert lines[2:] == ["step 2", "step 3", "metrics.jsonl: written again (3 records held back are in)"]
    assert [json.loads(line)["step"] for line in blocked.read_text().splitlines()] == [1, 2, 3]


def test_metrics_listen_on_loopback_unless_the_launcher_says_it_is_a_cluster():
    from shardrun.metrics import bind_host

    assert MetricsSpec().host == "auto"
    assert bind_host("auto", cluster=False) == "127.0.0.1" and bind_host("auto", cluster=True) == "0.0.0.0"
    assert bind_host("10.0.0.4", cluster=False) == "10.0.0.4"
    m = WorkerMetrics(MetricsSpec(), run="laptop", rank=0, local_rank=0)  # a spec no launcher resolved
    try:
        assert m.endpoint.server.server_address[0] == "127.0.0.1"
    finally:
        m.close()
