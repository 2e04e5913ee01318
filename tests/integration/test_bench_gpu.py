"""bench/gpu.py runs end to end on CPU at its tiny size: both loops train the same tokens over the same
windows, their losses fall, and the table and JSON agree (its speed is not checked: benchmarks are not tests).
Every shardrun row runs torch's AdamW unless it asks for DeepSpeed's FusedAdam, whose rows are skipped, with
their reason, where it cannot be built (always on a CPU); ZeRO 0 and ZeRO 1 are set side by side. Its tiny
transformers Llama (--size llama-tiny) is written by save_pretrained first, then loaded and trained by both loops."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from helpers import REPO, child_env, run

# The first DeepSpeed start on a new machine compiles its CPU comm op (~100 s) once.
pytestmark = pytest.mark.timeout(300)

STEPS, WARMUP, MICRO_BATCH, SEQ_LEN = 6, 2, 4, 64  # bench/gpu.py's tiny size: micro-batch 4, seq 64


@pytest.fixture(scope="module")
def gpu(request):
    """bench/gpu.py as a module (its pure parts: no child runs), importing bench/common.py beside it."""
    sys.path.insert(0, str(REPO / "bench"))
    request.addfinalizer(lambda: sys.path.remove(str(REPO / "bench")))
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_trains_both_loops_alike_and_reports_the_ratio(tmp_path):
    out_file = tmp_path / "gpu.json"
    out = run([sys.executable, "bench/gpu.py", "--size", "tiny", "--device", "cpu", "--steps", str(STEPS),
               "--warmup-steps", str(WARMUP), "--zero-stage", "0,1", "--optimizers", "torch,deepspeed",
               "--out", str(out_file)], timeout=280, cwd=REPO,
              env=child_env(OMP_NUM_THREADS="1")).stdout  # one thread: the tiny bf16 steps, steady on a busy CPU
    result = json.loads(out_file.read_text())

    assert result["peak"]["peak_flops"] > 0
    assert result["peak"]["device"]["datasheet_flops"] is None  # no datasheet figure for a CPU
    bare, zero0, zero1, fused0, fused1 = result["runs"]
    assert [(r["loop"], r["zero_stage"], r["optimizer"]) for r in result["runs"]] == [
        ("bare", None, "torch"), ("shardrun", 0, "torch"), ("shardrun", 1, "torch"),
        ("shardrun", 0, "deepspeed"), ("shardrun", 1, "deepspeed")]
    for r in (bare, zero0, zero1):
        assert "error" not in r and "skipped" not in r, r
        # a device sync at the same steps in both loops: step 1, then every gcd(warm-up, timed) steps
        assert [w["step"] for w in r["windows"]] == [1, 2, 4, 6, 8]
        assert r["tokens"] == (WARMUP + STEPS) * MICRO_BATCH * SEQ_LEN
        assert (r["timed_steps"], r["timed_tokens"]) == (STEPS, STEPS * MICRO_BATCH * SEQ_LEN)
        losses = [w["loss"] for w in r["windows"]]
        assert all(math.isfinite(x) for x in losses), losses
        assert r["last_loss"] < r["first_loss"] < 7  # from about ln(512) = 6.2 down
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] < 1 and r["mfu_datasheet"] is None
        # torch's AdamW in every row that did not ask for DeepSpeed's (not fused on a CPU)
        assert r["optimizer_class"] == "torch.optim.adamw.AdamW" and not r["fused"]
        assert r["optimizer_ms"] > 0 and r["peak_memory_bytes"] is None  # no CUDA memory on a CPU
    assert bare["wrapper"] is None
    # bf16 at ZeRO 0: DeepSpeed's FP16 wrapper; at ZeRO 1: ZeRO's optimizer
    assert zero0["wrapper"].startswith("FP16_") and zero1["wrapper"] == "DeepSpeedZeroOptimizer"
    for r in (zero0, zero1):
        assert r["flops_per_token"] == bare["flops_per_token"] and r["params"] == bare["params"]
        assert r["vs_bare"] == pytest.approx(r["tokens_per_s"] / bare["tokens_per_s"])
        assert r["optimizer_ms_vs_bare"] == pytest.approx(r["optimizer_ms"] - bare["optimizer_ms"])

    # FusedAdam was asked for but cannot be built on a CPU: its rows are skipped, one reason, exit code 0
    reason = result["fused_adam"]["reason"]
    assert result["fused_adam"]["requested"] and not result["fused_adam"]["ready"]
    assert "no GPU" in reason and "CUDA op" in reason
    assert fused0["skipped"] == fused1["skipped"] == reason
    assert f"FusedAdam rows skipped: {reason}" in out
    assert f"FusedAdam (implementation=deepspeed) rows skipped: {reason}" in out
    assert "| shardrun | 0 | FusedAdam | no | skipped (see below) |" in out

    # ZeRO 0 and ZeRO 1 side by side, with a conclusion
    (pair,) = result["zero_comparison"]
    assert (pair["compile"], pair["optimizer"]) == (False, "torch")
    assert pair["zero0"]["tokens_per_s"] == zero0["tokens_per_s"] and pair["zero1"]["step_ms"] == zero1["step_ms"]
    assert pair["zero1_vs_zero0"] == pytest.approx(zero1["tokens_per_s"] / zero0["tokens_per_s"])
    assert result["zero_conclusion"].startswith("ZeRO 0 vs ZeRO 1 (bf16, the CPU; ZeRO 1 / ZeRO 0 tokens/s: "
                                                f"eager torch AdamW {pair['zero1_vs_zero0']:.3f}): ")
    assert result["zero_conclusion"] in out and result["zero_conclusion"] in result["findings"]
    assert "ZeRO 0 vs ZeRO 1:" in out
    assert (f"| no | torch AdamW | {zero0['tokens_per_s']:,.0f} | {zero1['tokens_per_s']:,.0f} | "
            f"{pair['zero1_vs_zero0']:.3f} |") in out

    # the optimizer line: what each loop steps, and whose cost the optimizer step's difference is
    assert ("optimizers: bare loop torch.optim.AdamW on fp32 master weights; shardrun implementation=torch: "
            "torch.optim.AdamW inside DeepSpeed, compiles nothing; implementation=deepspeed: DeepSpeed's FusedAdam, "
            "skipped.") in out
    assert "is DeepSpeed's own cost (its bf16 optimizer wrapper, ZeRO's bookkeeping), not shardrun's loop" in out
    assert "bf16 matmul peak: measured" in out
    assert f"| bare | - | AdamW | no | {bare['tokens_per_s']:,.0f} |" in out
    assert f"| shardrun | 0 | AdamW in {zero0['wrapper']} | no | {zero0['tokens_per_s']:,.0f} |" in out
    assert f"| shardrun | 1 | AdamW in DeepSpeedZeroOptimizer | no | {zero1['tokens_per_s']:,.0f} |" in out
    assert f"shardrun / bare (ZeRO 0, eager, torch AdamW) = {zero0['vs_bare']:.3f}" in out
    assert f"optimizer step, shardrun (ZeRO 1, eager, torch AdamW): {zero1['optimizer_ms']:.2f} ms" in out


def test_ds_config_may_not_choose_the_optimizer():
    done = subprocess.run([sys.executable, "bench/gpu.py", "--size", "tiny", "--ds-config",
                           '{"optimizer": {"params": {"torch_adam": false}}}'],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--ds-config may not set DeepSpeed's optimizer: --optimizers torch,deepspeed chooses it" in done.stderr
    done = subprocess.run([sys.executable, "bench/gpu.py", "--optimizers", "torch,apex"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "implementations are torch and deepspeed" in done.stderr


def test_fused_adam_runs_only_where_it_can_be_built(gpu):
    nvcc = "/usr/local/cuda/bin/nvcc"
    plan = gpu.fused_adam_plan
    assert plan(prebuilt=True, nvcc=None, on_path=None, compatible=None, ninja=False)["ready"]
    assert plan(prebuilt=False, nvcc=nvcc, on_path=nvcc, compatible=True, ninja=True) == {
        "ready": True, "how": f"built with {nvcc}"}
    for found, why in [({"nvcc": None, "on_path": None}, "no nvcc on PATH"),
                       ({"nvcc": None, "on_path": "/opt/nvcc"}, "nvcc on PATH (/opt/nvcc) is not under"),
                       ({"nvcc": nvcc, "on_path": nvcc, "compatible": False}, "incompatible"),
                       ({"nvcc": nvcc, "on_path": nvcc, "compatible": True, "ninja": False}, "no ninja")]:
        out = plan(**{"prebuilt": False, "compatible": None, "ninja": True, **found})
        assert not out["ready"] and why in out["reason"] and "\n" not in out["reason"], out


def test_zero_conclusion_names_the_faster_stage(gpu):
    def pair(ratio, compiled=False):
        return {"compile": compiled, "optimizer": "torch", "zero1_vs_zero0": ratio}

    assert gpu.zero_conclusion([]) is None
    assert gpu.zero_conclusion([pair(1.08), pair(1.05, True)]) == (
        "ZeRO 0 vs ZeRO 1 (bf16, one GPU; ZeRO 1 / ZeRO 0 tokens/s: eager torch AdamW 1.080, compiled torch AdamW "
        "1.050): ZeRO 1 is faster, use ZeRO 1")
    assert gpu.zero_conclusion([pair(0.9)]).endswith("ZeRO 0 is faster, use ZeRO 0")
    assert gpu.zero_conclusion([pair(1.005)]).endswith("within 1% of each other, neither is faster")
    assert gpu.zero_conclusion([pair(1.1), pair(0.9, True)]).endswith("neither is faster in every pair")


def test_tiny_llama_is_written_first_then_loaded_and_trained_by_both_loops(tmp_path):
    out_file = tmp_path / "gpu.json"
    out = run([sys.executable, "bench/gpu.py", "--size", "llama-tiny", "--device", "cpu", "--steps", str(STEPS),
               "--warmup-steps", str(WARMUP), "--zero-stage", "1", "--out", str(out_file)], timeout=280, cwd=REPO,
              env=child_env(OMP_NUM_THREADS="1")).stdout
    result = json.loads(out_file.read_text())

    written = result["hf_model"]  # random weights, by save_pretrained, before any row
    assert written["params"] > 0 and written["bytes"] > 0 and written["write_s"] >= 0
    bare, zero1 = result["runs"]
    assert [(r["loop"], r["zero_stage"]) for r in result["runs"]] == [("bare", None), ("shardrun", 1)]
    for r in (bare, zero1):
        assert "error" not in r, r
        losses = [w["loss"] for w in r["windows"]]
        assert all(math.isfinite(x) for x in losses) and r["last_loss"] < r["first_loss"] < 7, losses
        assert r["params"] == written["params"] and 0 < r["mfu_measured"] < 1
        assert r["load"]["from_pretrained_s"] > 0
    assert zero1["flops_per_token"] == bare["flops_per_token"]
    assert bare["load"]["to_device_s"] >= 0
    assert zero1["load"]["to_engine_ready_s"] > zero1["load"]["from_pretrained_s"]  # deepspeed.initialize after it
    assert "transformers Llama llama-tiny (2 layers x 64" in out
    assert "loaded by from_pretrained in bf16 with SDPA attention" in out
    assert f"| shardrun | 1 | no | {zero1['load']['from_pretrained_s']:.2f} | - |" in out


def test_cpu_sizes_are_not_recorded():
    done = subprocess.run([sys.executable, "bench/gpu.py", "--size", "llama-tiny", "--record"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--size llama-tiny numbers say nothing about speed" in done.stderr
