"""bench/overhead.py, bench/startup.py, bench/checkpoint.py and bench/prepare.py run end to end at their tiny
--quick sizes (their numbers are not checked: benchmarks are not tests).

`make test` runs the one-rank overhead check of the GPT (the benchmark that leans most on shardrun's internals;
the transformers Llama's path through both loops is bench/gpu.py's llama-tiny check in test_bench_gpu.py); the
others are marked `bench` and run first in `make bench`, which runs the benchmarks themselves anyway: they would
add about two minutes to every test run."""

import re
import sys

import pytest
from helpers import REPO, run

pytestmark = pytest.mark.timeout(300)


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows whose first cell is first_cell."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell} |")]


@pytest.mark.distributed
def test_overhead_pairs_both_loops_on_one_rank():
    out = run([sys.executable, "bench/overhead.py", "--quick", "--ranks", "1"], timeout=180, cwd=REPO).stdout
    [row] = table_rows(out, "1")
    bare, ours, ratio = float(row[1]), float(row[3]), float(row[5])
    assert bare > 0 and ours > 0 and ratio == pytest.approx(ours / bare, rel=1e-2)
    assert "1 rank: shardrun / bare = " in out


@pytest.mark.bench
def test_overhead_pairs_both_loops_on_a_transformers_llama():
    # both loads of the Llama's folder (shardrun's model.hf, the bare loop's models.hf.build), which the GPT's
    # check above does not reach
    out = run([sys.executable, "bench/overhead.py", "--size", "llama", "--quick", "--ranks", "1"], timeout=180,
              cwd=REPO).stdout
    [row] = table_rows(out, "1")
    assert float(row[1]) > 0 and float(row[3]) > 0
    assert "1 rank: shardrun / bare = " in out


@pytest.mark.bench
def test_overhead_profiles_two_ranks():
    out = run([sys.executable, "bench/overhead.py", "--quick", "--ranks", "2", "--profile"], timeout=180,
              cwd=REPO).stdout
    assert re.search(r"\| trainer\.loop:\d+ train_step \| 6 \|", out), out  # rank 0's 6 timed steps, profiled
    assert re.search(r"\| trainer\.collectives:\d+ exchange \| 6 \|", out), out  # the per-step flags' collective
    assert "in what train_step calls outside shardrun" in out


@pytest.mark.bench
def test_startup_times_torchrun_and_shardrun_run_to_their_first_step():
    out = run([sys.executable, "bench/startup.py", "--quick", "--only", "torchrun,shardrun"], timeout=280,
              cwd=REPO).stdout
    totals = {r[0]: float(r[1]) for r in (*table_rows(out, "torchrun"), *table_rows(out, "shardrun run"))}
    assert set(totals) == {"torchrun", "shardrun run"} and all(t > 0 for t in totals.values())
    [init] = table_rows(out, "DeepSpeed init (deepspeed.initialize)")
    assert all(float(c) > 0 for c in init[1:])  # both ways marked DeepSpeed's start from their workers
    [ray_up] = table_rows(out, "driver: Ray up (shardrun: importing its launcher meanwhile, in a thread)")
    assert ray_up[1] == "" and float(ray_up[2]) > 0  # shardrun's driver line, timed; torchrun has none
    assert "shardrun run - torchrun = " in out


@pytest.mark.bench
def test_checkpoint_saves_and_loads_zero_3_on_two_ranks():
    out = run([sys.executable, "bench/checkpoint.py", "--quick", "--ranks", "2", "--stages", "3"], timeout=240,
              cwd=REPO).stdout
    [row] = table_rows(out, "3")[:1]
    assert row[1] == "2" and float(row[2].split()[0]) > 0
    assert "ZeRO 3, 2 ranks: save = " in out and "an asynchronous save would keep the loop waiting" in out


@pytest.mark.bench
def test_prepare_writes_the_same_rows_as_datasets():
    pytest.importorskip("datasets")  # the anchor: pip install 'shardrun[bench]'
    out = run([sys.executable, "bench/prepare.py", "--quick"], timeout=120, cwd=REPO).stdout
    speeds = {r[0]: float(r[1]) for r in (*table_rows(out, "shardrun"), *table_rows(out, "datasets"))}
    assert set(speeds) == {"shardrun", "datasets"} and all(s > 0 for s in speeds.values()), out
    # the bench itself stops if the two ways' rows differ; this is its line saying they matched
    assert re.search(r"same rows: both ways wrote [\d,]+ rows of 1025 .* identical tokens and loss_mask", out), out
    assert "shardrun / datasets = " in out
