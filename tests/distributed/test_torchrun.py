"""Two gloo ranks under torchrun, no Ray: every ZeRO stage trains, checkpoints and resumes exactly, in fp32 and
in bf16 (DeepSpeed's CPU accelerator runs bf16), on the same world size and on another."""

import json
import sys

import pytest
import torch
from helpers import free_port, run, tiny_spec, write_spec

# The first DeepSpeed start on a new machine compiles its CPU comm op (~100 s) once.
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]


def torchrun(spec_path, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "shardrun", "train", str(spec_path), *args]
    return run(cmd, timeout=300)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (2, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16"),
                                                  (3, "bf16")])
def test_zero_stage_trains_checkpoints_and_resumes(tmp_path, corpus, stage, precision):
    """fp32 resumes on the same world size; bf16 on one rank, which at ZeRO 1-3 takes the universal format (ZeRO 0
    keeps the whole optimizer state in the model file, and loads as it is). bf16 at ZeRO 1 and 3 reduces in fp32."""
    reduce = {"reduce_dtype": "fp32"} if precision == "bf16" and stage % 2 else {}
    spec = tiny_spec(corpus, tmp_path / "runs", deepspeed={"zero_stage": stage, "precision": precision, **reduce},
                     run={"max_steps": 6, "log_every": 3}, checkpoint={"every_steps": 3})
    path = write_spec(tmp_path / "job.yaml", spec)
    out = torchrun(path).stdout
    assert "starting with 2 workers" in out
    # the summary as `shardrun run` says it, and DeepSpeed's routine kept off the console
    assert "[shardrun] finished: steps 0-6 in " in out and "built successfully" not in out, out
    first = summary(tmp_path / "runs" / "tiny")
    assert (first["start_step"], first["final_step"]) == (0, 6)
    assert first["last_loss"] < first["first_loss"]
    ckpts = sorted(p.name for p in (tmp_path / "runs/tiny/checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]

    if precision == "bf16":  # on one rank
        out = torchrun(path, "--set", "run.max_steps=8", nproc=1).stdout
        converted = ", converted to DeepSpeed's universal format" if stage else ""
        assert (f"resuming from step 6 with 1 worker; the checkpoint was written by 2 workers{converted}; now 2 "
                "micro-batches per step, a global batch of 8") in out, out
    else:
        out = torchrun(path, "--set", "run.max_steps=8").stdout
        assert "resuming from step 6 with 2 workers" in out
    second = summary(tmp_path / "runs" / "tiny")
    assert (second["start_step"], second["final_step"], second["steps"]) == (6, 8, 2)
    assert second["last_loss"] < first["first_loss"]


def _weights(checkpoint_dir):
    [states] = checkpoint_dir.glob("global_step*/mp_rank_00_model_states.pt")
    return torch.load(states, weights_only=False)["module"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumed_run_is_bitwise_identical_to_uninterrupted(tmp_path, corpus, precision):
    sections = dict(deepspeed={"zero_stage": 2, "grad_accum_steps": 2, "precision": precision,
                               "schedule": {"decay": "constant", "warmup_steps": 3}},
                    model={"dropout": 0.1}, run={"max_steps": 8, "log_every": 4},
                    checkpoint={"every_steps": 4},  # with a validation loop, which must leave training alone
                    eval={"paths": [str(corpus)], "every_steps": 3, "max_batches": 5, "at_start": True})
    whole = write_spec(tmp_path / "whole.yaml",
                       tiny_spec(corpus, tmp_path / "a", **sections))
    torchrun(whole)
    split = write_spec(tmp_path / "split.yaml", tiny_spec(corpus, tmp_path / "b", **sections))
    torchrun(split, "--set", "run.max_steps=4")
    torchrun(split)
    a = _weights(tmp_path / "a/tiny/checkpoints/step_00000008")
    b = _weights(tmp_path / "b/tiny/checkpoints/step_00000008")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    fresh = _weights(tmp_path / "b/tiny/checkpoints/step_00000004")
    assert not torch.equal(a["wte.weight"], fresh["wte.weight"])
    evals = {}  # step -> held-out loss, the same in both runs: at 0, 3, 6 and the ends (4 for the split run, 8)
    for run_dir in ("a", "b"):
        for line in (tmp_path / run_dir / "tiny/metrics.jsonl").read_text().splitlines():
            if "eval_loss" in (rec := json.loads(line)):
                assert evals.setdefault(rec["step"], rec["eval_loss"]) == rec["eval_loss"], (run_dir, rec)
                assert rec["eval_tokens"] == 5 * 4 * 32, rec  # 5 batches of 4 rows of 32 targets
    assert sorted(evals) == [0, 3, 4, 6, 8]
    assert summary(tmp_path / "a/tiny")["best_eval_loss"] == min(evals[s] for s in (0, 3, 6, 8))
    assert summary(tmp_path / "b/tiny")["first_eval_loss"] == evals[0]  # the resumed invocation keeps the run's
    manifest = json.loads((tmp_path / "a/tiny/checkpoints/step_00000008/shardrun.json").read_text())
    assert manifest["eval_loss"] == evals[8]  # a checkpoint records its step's evaluation (checkpoint.keep_best)
    if precision == "fp32":  # the same checkpoint evaluated offline by 1 rank: the 2 ranks' number
        out = run([sys.executable, "-m", "shardrun", "eval", str(tmp_path / "a/tiny"), "--json"], timeout=240).stdout
        offline = json.loads(out.strip().splitlines()[-1])
        assert offline["step"] == 8 and offline["eval_tokens"] == 5 * 4 * 32, offline
        assert abs(offline["eval_loss"] - evals[8]) < 1e-6, (offline, evals[8])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_table_data_trains_a_user_model_on_its_columns(tmp_path, precision):
    """data.format: table gives the model its columns as keyword arguments (float columns in the module's dtype);
    one process, no torchrun."""
    from helpers import REPO

    sys.path.insert(0, str(REPO))
    from examples.tabular_model import make_data

    make_data(tmp_path / "data", rows=4000)
    spec = {"name": "tab", "model": {"entrypoint": "examples.tabular_model:build"},
            "data": {"paths": [str(tmp_path / "data")], "format": "table", "label": "label"},
            "deepspeed": {"zero_stage": 1, "micro_batch_size": 32, "precision": precision,
                          "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
                          "schedule": {"warmup_steps": 0, "decay": "constant"}},
            "scaling": {"num_workers": 1}, "checkpoint": {"storage": str(tmp_path / "runs"), "every_steps": 30},
            "run": {"max_steps": 30, "log_every": 10}}
    path = write_spec(tmp_path / "tab.yaml", spec)
    out = run([sys.executable, "-m", "shardrun", "train", str(path)], timeout=300, cwd=REPO).stdout
    assert "samples/s" in out
    result = summary(tmp_path / "runs" / "tab")
    assert result["final_step"] == 30 and result["samples"] == 30 * 32 and result["tokens"] == 0
    assert result["last_loss"] < 0.5 * result["first_loss"]
