"""Hugging Face models (model.hf), no Ray: a tiny Llama with random weights written by save_pretrained trains
through shardrun's loop, and the loss of its first batch is what a plain transformers forward of the same weights
gives on that batch (fp32, CPU) at ZeRO 0, 2 and 3 (ZeRO 3 loads the weights into each rank's shard)."""

import json
import sys

import pytest
import torch
from helpers import run, tiny_spec, write_spec

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A Llama of 35 k parameters over a byte vocabulary, written as a pretrained model is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def hf_spec(corpus, storage, model_folder, **sections) -> dict:
    spec = tiny_spec(corpus, storage, scaling={"num_workers": 1}, **sections)
    spec["model"] = {"hf": {"path": str(model_folder)}}
    return spec


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_first_batch_loses_what_a_plain_transformers_forward_loses(tmp_path, corpus, tiny_llama, stage):
    from transformers import AutoModelForCausalLM

    from shardrun.config import parse
    from shardrun.datasets import Stream, build_index

    raw = hf_spec(corpus, tmp_path / "runs", tiny_llama, deepspeed={"zero_stage": stage, "micro_batch_size": 4},
                  run={"max_steps": 1, "log_every": 1})
    path = write_spec(tmp_path / "job.yaml", raw)
    out = run([sys.executable, "-m", "shardrun", "train", str(path)], timeout=240).stdout
    assert f"tiny: {tiny_llama}, fp32, ZeRO {stage}, 1 worker on CPU" in out, out
    [record] = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]

    spec = parse(raw)
    stream = Stream(spec.data, build_index(spec.data), rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=1,
                    partitions=spec.partitions)
    try:
        batch = stream.next_batch()
    finally:
        stream.close()
    rows = torch.cat([batch["inputs"], batch["targets"][:, -1:]], dim=1)  # the rows as stored: seq_len + 1 tokens
    assert (batch["targets"] >= 0).all()  # no padding: transformers' own loss counts every position
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        plain = model(input_ids=rows, labels=rows).loss.item()
    assert abs(record["loss"] - plain) < 1e-5, (record["loss"], plain)
