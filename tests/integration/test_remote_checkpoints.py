"""Checkpoints on abfs:// (Azurite): a rank killed while writing checkpoint 8 leaves checkpoint 4 in use; the
group resumes from it by itself; the run's spec, summary, metrics and checkpoints are in the container, and no
SAS signature reaches the driver's output (Ray's own log lines included); `shardrun checkpoints` and `shardrun
runs` list them from the container, and `shardrun export` and `generate` read a checkpoint from it."""

from __future__ import annotations

import json
import re

import pytest
from helpers import child_env, run, tiny_spec, write_spec
from pyarrow import fs

from shardrun.fs import join
from shardrun.generate import load

pytestmark = [pytest.mark.integration, pytest.mark.object_store, pytest.mark.timeout(300)]


def test_checkpoints_on_azure_blob_survive_a_rank_killed_while_saving(tmp_path, corpus, azurite):
    storage = azurite.uri("runs")
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path, checkpoint={"storage": storage, "every_steps": 4, "keep": 2},
        run={"max_steps": 12, "log_every": 4}, failure={"max_failures": 1, "scheduled_events": "off"}))
    env = child_env(SHARDRUN_FAULT="checkpoint-save:step=8:rank=1", SHARDRUN_FAULT_MARKER=str(tmp_path / "fired"))
    out = run(["shardrun", "run", str(spec)], timeout=280, env=env).stdout
    assert (tmp_path / "fired").exists()
    assert "resuming from step 4 with 2 workers (restart 1)" in out, out[-4000:]
    leaked = [line for line in out.splitlines() if "sig=" in line.replace("sig=***", "")]
    assert not leaked, f"a SAS signature was printed: {leaked[:3]}"

    blob, root = azurite.filesystem()
    run_dir = f"{root}/runs/tiny"
    names = {info.base_name for info in blob.get_file_info(fs.FileSelector(run_dir))}
    assert {"job.yaml", "summary.json", "metrics.jsonl", "checkpoint_00000008", "checkpoint_00000012"} <= names
    # (checkpoint_00000004 stays: Ray prunes it through pyarrow's DeleteDir, which Azurite 3.37 answers with a
    # 500 Internal Server Error; not checked against Azure itself)
    with blob.open_input_stream(f"{run_dir}/summary.json") as f:
        summary = json.loads(f.read())
    assert summary["final_step"] == 12 and summary["restarts"] == 1
    with blob.open_input_stream(f"{run_dir}/checkpoint_00000012/shardrun.json") as f:
        assert json.loads(f.read())["step"] == 12
    ranks = blob.get_file_info(fs.FileSelector(f"{run_dir}/checkpoint_00000012"))
    assert {"rank_0.pt", "rank_1.pt"} <= {info.base_name for info in ranks}

    # the listing commands read the container too, and print no signature
    listed = run(["shardrun", "checkpoints", join(storage, "tiny")], timeout=60, env=child_env()).stdout
    rows = dict(re.findall(r"step +(\d+) .* (complete|incomplete: [^/]+) ", listed))
    assert {"8": "complete", "12": "complete"}.items() <= rows.items(), listed
    [tiny] = json.loads(run(["shardrun", "runs", storage, "--json"], timeout=60, env=child_env()).stdout)
    assert (tiny["name"], tiny["state"], tiny["step"], tiny["checkpoint"]) == ("tiny", "finished", 12, 12), tiny
    assert "sig=" not in listed.replace("sig=***", "") + json.dumps(tiny).replace("sig=***", "")

    # export and generate download a checkpoint from the container into a temporary folder, then remove it
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    exported = run(["shardrun", "export", join(storage, "tiny"), "--step", "8", "--out", str(tmp_path / "export")],
                   timeout=120, env=child_env(TMPDIR=str(tmp))).stdout
    assert re.search(r"downloading checkpoint 8 \([\d.,]+ MB\) from .*/runs/tiny/checkpoint_00000008", exported)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["step"] == 8 and config["source"].endswith("/runs/tiny/checkpoint_00000008"), config
    model = load(str(tmp_path / "export"))
    assert sum(p.numel() for p in model.parameters()) > 0
    sampled = run(["shardrun", "generate", join(storage, "tiny"), "--prompt", "def ", "--tokens", "20",
                   "--seed", "1"], timeout=120, env=child_env(TMPDIR=str(tmp))).stdout
    assert "downloading checkpoint 12 " in sampled and sampled.rstrip("\n").split("\n")[-1].startswith("def ")
    assert "sig=" not in (exported + sampled + json.dumps(config)).replace("sig=***", "")
    assert list(tmp.iterdir()) == []

    # and an export in the Hugging Face format is uploaded to the container, config.json last
    uploaded = run(["shardrun", "export", join(storage, "tiny"), "--format", "hf", "--out", join(storage, "hf")],
                   timeout=120, env=child_env(TMPDIR=str(tmp))).stdout
    names = {info.base_name for info in blob.get_file_info(fs.FileSelector(f"{root}/runs/hf"))}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "shardrun-export.json"} == names, uploaded
    with blob.open_input_stream(f"{root}/runs/hf/config.json") as f:
        assert json.loads(f.read())["architectures"] == ["GPT2LMHeadModel"]
    leaked = [line for line in uploaded.splitlines() if "sig=" in line.replace("sig=***", "")]
    assert not leaked, leaked
    assert not [p for p in tmp.iterdir() if p.name.startswith("shardrun-")]  # (torch may leave its own cache)
