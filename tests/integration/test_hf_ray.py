"""The loop the README's tour closes, on Ray: the built-in GPT, trained and exported in the Hugging Face format, is
a pretrained transformers model that `shardrun run` fine-tunes with model.hf (2 workers, ZeRO 2)."""

import json
import sys

import pytest
from helpers import REPO, run, tiny_spec, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_the_gpt_exported_as_hf_is_fine_tuned_on_ray(tmp_path, corpus):
    gpt = write_spec(tmp_path / "gpt.yaml", tiny_spec(corpus, tmp_path / "runs", name="tiny-gpt",
                                                       scaling={"num_workers": 1}, run={"max_steps": 3}))
    run([sys.executable, "-m", "shardrun", "train", str(gpt)], timeout=180, cwd=REPO)
    export = tmp_path / "tiny-gpt-hf"
    run([sys.executable, "-m", "shardrun", "export", "tiny-gpt", "--storage", str(tmp_path / "runs"), "--format",
         "hf", "--out", str(export)], timeout=180, cwd=REPO)

    spec = tiny_spec(corpus, tmp_path / "runs", name="tiny-hf", run={"max_steps": 4, "log_every": 2},
                     checkpoint={"every_steps": 4})
    spec["model"] = {"hf": {"path": str(export)}}
    out = run([sys.executable, "-m", "shardrun", "run", str(write_spec(tmp_path / "hf.yaml", spec))], timeout=300,
              cwd=REPO).stdout
    assert f"[shardrun] tiny-hf: {export}, fp32, ZeRO 2, 2 workers on CPU" in out, out
    assert f"[shardrun] model: GPT2LMHeadModel from {export}" in out, out
    summary = json.loads((tmp_path / "runs/tiny-hf/summary.json").read_text())
    assert summary["finished"] and summary["final_step"] == 4 and summary["checkpoint"], summary
