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


def torchrun(spec_path, *args, nproc=2):
    from helpers import free_port

    return run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", "-m", "shardrun", "train", str(spec_path), *args], timeout=240).stdout


def _weights(run_dir, step):
    [states] = (run_dir / f"checkpoints/step_{step:08d}").glob("global_step*/mp_rank_00_model_states.pt")
    return torch.load(states, weights_only=False)["module"]


def test_an_hf_run_resumed_ends_bitwise_equal_and_resumes_on_another_world_size(tmp_path, corpus, tiny_llama):
    sections = dict(deepspeed={"zero_stage": 2, "grad_accum_steps": 2, "micro_batch_size": 2,
                               "schedule": {"decay": "constant", "warmup_steps": 2}},
                    run={"max_steps": 6, "log_every": 3}, checkpoint={"every_steps": 3})
    whole = hf_spec(corpus, tmp_path / "a", tiny_llama, **sections)
    whole["scaling"] = {"num_workers": 2}
    torchrun(write_spec(tmp_path / "whole.yaml", whole))
    split = {**whole, "checkpoint": {**whole["checkpoint"], "storage": str(tmp_path / "b")}}
    path = write_spec(tmp_path / "split.yaml", split)
    torchrun(path, "--set", "run.max_steps=3")
    assert "resuming from step 3 with 2 workers" in torchrun(path)
    a, b = _weights(tmp_path / "a/tiny", 6), _weights(tmp_path / "b/tiny", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("model.model.layers.") for k in a)  # the transformers module's own names

    out = torchrun(path, "--set", "run.max_steps=8", nproc=1)  # 2 ranks' ZeRO-2 shards, on 1
    assert ("resuming from step 6 with 1 worker; the checkpoint was written by 2 workers, converted to DeepSpeed's "
            "universal format") in out, out
    assert "[shardrun] finished: steps 6-8" in out


def labelled_table(folder, rows=2048, length=16):
    """Rows of token ids from one of two ranges, the range their label, with padding (id 0, mask 0) at their ends:
    a classifier learns it in a few dozen steps."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, size=rows)
    ids = np.where(label[:, None] == 1, rng.integers(50, 100, (rows, length)), rng.integers(3, 50, (rows, length)))
    mask = (np.arange(length)[None, :] < rng.integers(length // 2, length + 1, size=rows)[:, None]).astype(np.int8)
    ids = (ids * mask).astype(np.int32)

    def column(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), length)

    folder.mkdir()
    pq.write_table(pa.table({"input_ids": column(ids), "attention_mask": column(mask), "label": label}),
                   folder / "part-0.parquet", row_group_size=256)
    return folder


def test_a_bert_classifier_trains_on_a_labelled_table_and_its_loss_falls(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
                                  ).save_pretrained(tmp_path / "bert")
    data = labelled_table(tmp_path / "table")
    raw = tiny_spec(data, tmp_path / "runs", scaling={"num_workers": 1},
                    data={"paths": [str(data)], "format": "table", "label": "label"},
                    deepspeed={"zero_stage": 2, "micro_batch_size": 16, "optimizer": {"lr": 2e-3},
                               "schedule": {"warmup_steps": 2}},
                    run={"max_steps": 40, "log_every": 10})
    raw["model"] = {"hf": {"path": str(tmp_path / "bert"), "task": "sequence_classification", "num_labels": 2},
                    "activation_checkpointing": True}  # recomputed: the same training, less memory
    out = run([sys.executable, "-m", "shardrun", "train", str(write_spec(tmp_path / "job.yaml", raw))],
              timeout=240).stdout
    assert "model: BertForSequenceClassification from" in out, out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 0.6 and losses[-1] < 0.35, losses  # from chance (ln 2) to most rows right
