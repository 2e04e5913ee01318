"""shardrun checkpoints / export / generate on a ZeRO-3 run of 2 gloo ranks: the export (shards gathered,
one safetensors file) gives the same loss on a batch as the checkpoint it came from, loaded back by DeepSpeed."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env, free_port, run, tiny_spec, write_spec

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

# One rank: build the engine as the worker loop does and load the checkpoint through shardrun's restore (the
# 2-rank ZeRO-3 shards are converted to DeepSpeed's universal format), then the loss of a fixed batch.
CHECKPOINT_LOSS = """
import contextlib, json, sys, torch
from shardrun.config import JobSpec
from shardrun.trainer import engine
from shardrun.trainer.restore import restore
from shardrun.trainer.topology import Topology
import yaml


class Store:
    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield sys.argv[2]


spec = JobSpec.model_validate(yaml.safe_load(open(sys.argv[1])))
topology = Topology(rank=0, world_size=1, local_rank=0, device="cpu")
engine.init_distributed(topology)
restored = restore(spec, Store(), topology)
assert restored.resized_from == 2 and restored.universal and restored.state.step == 6
built = restored.engine
built.eval()
batch = torch.load(sys.argv[3])
with torch.no_grad():
    print(json.dumps({"loss": built(batch[:, :-1], batch[:, 1:]).item()}))
"""


def test_export_gathers_zero3_shards_and_keeps_the_loss(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "runs", deepspeed={"zero_stage": 3}, run={"max_steps": 6, "log_every": 3},
                     checkpoint={"every_steps": 3, "keep": 2})
    path = write_spec(tmp_path / "job.yaml", spec)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", "-m", "shardrun", "train", str(path)], timeout=240)
    run_dir = tmp_path / "runs/tiny"

    # the sampled text alone on stdout: DeepSpeed's lines while it gathers the ZeRO-3 shards go to stderr
    sampled = subprocess.run([sys.executable, "-m", "shardrun", "generate", str(run_dir), "--prompt", "ab",
                              "--tokens", "3"], capture_output=True, text=True, env=child_env(), timeout=180)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.startswith("ab") and len(sampled.stdout) <= len("ab") + 3 + 1, sampled.stdout

    listing = run([sys.executable, "-m", "shardrun", "checkpoints", str(run_dir)], timeout=60).stdout
    assert "step        3" in listing and "step        6" in listing and listing.count("complete") == 2

    out = run([sys.executable, "-m", "shardrun", "export", str(run_dir), "--out", str(tmp_path / "export")],
              timeout=120).stdout
    assert "exported step 6 (fp32" in out
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["step"] == 6 and config["model"]["n_embd"] == 32

    from shardrun.generate import load

    torch.manual_seed(1)
    batch = torch.randint(0, 256, (4, 33))
    torch.save(batch, tmp_path / "batch.pt")
    exported = load(str(tmp_path / "export"))
    assert exported.lm_head.weight.data_ptr() == exported.wte.weight.data_ptr()  # still tied
    with torch.no_grad():
        mine = exported(batch[:, :-1], batch[:, 1:]).item()

    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                    WORLD_SIZE="1")
    env["TMPDIR"] = str(tmp_path)  # the universal copy goes to the temp folder
    proc = subprocess.run([sys.executable, "-c", CHECKPOINT_LOSS, str(run_dir / "job.yaml"),
                           str(run_dir / "checkpoints/step_00000006"), str(tmp_path / "batch.pt")],
                          capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])["loss"]
    assert abs(mine - theirs) < 1e-5, (mine, theirs)
    assert not os.path.exists(tmp_path / "shardrun-universal/tiny/rank0")  # the converted copy is removed

    sampled = run([sys.executable, "-m", "shardrun", "generate", str(tmp_path / "export"), "--prompt", "def ",
                   "--tokens", "20"], timeout=60).stdout
    assert sampled.startswith("def ") and len(sampled) > 4
