"""A Hugging Face model the run cannot train is refused by `shardrun check` (as by `run`, before Ray) with the
reason, exit 2: no model there, an architecture transformers does not know, a model that needs its own code while
trust_remote_code is off, token ids beyond its vocabulary, sequences beyond its positions. A good one is
described: its size and the memory each rank's share of training state takes."""

import json

import pytest
import torch
from helpers import tiny_spec, write_spec

from shardrun import cli
from shardrun.driver.model_check import state_bytes_per_rank

pytestmark = pytest.mark.timeout(120)


def llama(folder, vocab=256, positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=positions)).save_pretrained(folder)
    return folder


def check(tmp_path, corpus, hf: dict, capsys, **sections) -> tuple[int, str]:
    spec = tiny_spec(corpus, tmp_path / "runs", scaling={"num_workers": 2}, **sections)
    spec["model"] = {"hf": hf}
    code = cli.main(["check", str(write_spec(tmp_path / "job.yaml", spec))])
    return code, capsys.readouterr().err


def test_a_good_model_is_described_with_its_size_and_memory(tmp_path, corpus, capsys):
    code, err = check(tmp_path, corpus, {"path": str(llama(tmp_path / "m"))}, capsys,
                      deepspeed={"zero_stage": 3, "precision": "bf16"})
    assert code == 0, err
    assert (f"model: LlamaForCausalLM from {tmp_path / 'm'}, 34,976 parameters; weights, gradients and optimizer "
            "state take about 0.3 MiB per rank at ZeRO 3 in bf16 on 2 workers (activations come on top)") in err


@pytest.mark.parametrize(("make", "hf", "expect"), [
    (lambda d: None, {}, "no such folder"),
    (lambda d: d.mkdir(), {}, "no config.json there"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))), {},
     "cannot read its config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps(
        {"model_type": "acme-lm", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"}}))), {},
     "this model runs its own code"),
    (lambda d: llama(d, vocab=128), {}, "the shards' token ids go up to 255"),
    (lambda d: llama(d, positions=16), {}, "data.seq_len (32) is longer than"),
    (lambda d: llama(d), {"config_overrides": {"no_such_key": 1}}, "config has no no_such_key"),
], ids=["missing", "no-config", "unknown-architecture", "remote-code", "vocabulary", "positions", "override"])
def test_a_model_the_run_cannot_train_exits_2_with_the_reason(tmp_path, corpus, capsys, make, hf, expect):
    make(tmp_path / "m")
    code, err = check(tmp_path, corpus, {"path": str(tmp_path / "m"), **hf}, capsys)
    assert code == 2 and "shardrun: error: " in err and expect in err, err


def test_the_state_each_rank_holds_shrinks_with_the_zero_stage():
    b = 1_000_000_000
    assert [state_bytes_per_rank(b, stage=s, precision="bf16", world=8) / b for s in range(4)] == [16, 5.5, 3.75, 2]
    assert state_bytes_per_rank(b, stage=0, precision="fp32", world=8) / b == 16
    assert state_bytes_per_rank(b, stage=2, precision="fp32", world=4) / b == 4 + 12 / 4
