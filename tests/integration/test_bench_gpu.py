"""bench/gpu.py runs end to end on CPU at its tiny size: both loops train the same tokens over the same
windows, their losses fall, and the table and JSON agree (its speed is not checked: benchmarks are not tests)."""

import json
import math
import sys

import pytest
from helpers import REPO, child_env, run

# The first DeepSpeed start on a new machine compiles its CPU comm op (~100 s) once.
pytestmark = pytest.mark.timeout(300)

STEPS, WARMUP, MICRO_BATCH, SEQ_LEN = 6, 2, 4, 64  # bench/gpu.py's tiny size: micro-batch 4, seq 64


def test_tiny_cpu_run_trains_both_loops_alike_and_reports_the_ratio(tmp_path):
    out_file = tmp_path / "gpu.json"
    out = run([sys.executable, "bench/gpu.py", "--size", "tiny", "--device", "cpu", "--steps", str(STEPS),
               "--warmup-steps", str(WARMUP), "--out", str(out_file)], timeout=280, cwd=REPO,
              env=child_env(OMP_NUM_THREADS="1")).stdout  # one thread: the tiny bf16 steps, steady on a busy CPU
    result = json.loads(out_file.read_text())

    assert result["peak"]["peak_flops"] > 0
    assert result["peak"]["device"]["datasheet_flops"] is None  # no datasheet figure for a CPU
    bare, shardrun = result["runs"]
    assert (bare["loop"], shardrun["loop"], shardrun["zero_stage"]) == ("bare", "shardrun", 0)
    for r in (bare, shardrun):
        assert "error" not in r, r
        # a device sync at the same steps in both loops: step 1, then every gcd(warm-up, timed) steps
        assert [w["step"] for w in r["windows"]] == [1, 2, 4, 6, 8]
        assert r["tokens"] == (WARMUP + STEPS) * MICRO_BATCH * SEQ_LEN
        assert (r["timed_steps"], r["timed_tokens"]) == (STEPS, STEPS * MICRO_BATCH * SEQ_LEN)
        losses = [w["loss"] for w in r["windows"]]
        assert all(math.isfinite(x) for x in losses), losses
        assert r["last_loss"] < r["first_loss"] < 7  # from about ln(512) = 6.2 down
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] < 1 and r["mfu_datasheet"] is None
    assert shardrun["flops_per_token"] == bare["flops_per_token"]
    assert shardrun["params"] == bare["params"]
    assert shardrun["vs_bare"] == pytest.approx(shardrun["tokens_per_s"] / bare["tokens_per_s"])

    assert "bf16 matmul peak: measured" in out
    assert f"| bare | - | no | {bare['tokens_per_s']:,.0f} |" in out
    assert f"| shardrun | 0 | no | {shardrun['tokens_per_s']:,.0f} |" in out
    assert f"shardrun / bare (ZeRO 0, eager) = {shardrun['vs_bare']:.3f}" in out
