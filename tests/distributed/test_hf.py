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


def _states(run_dir, step):
    """Every tensor in a checkpoint's DeepSpeed files (weights and optimizer state), by file and key path."""
    out = {}

    def walk(value, key):
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")

    for path in sorted((run_dir / f"checkpoints/step_{step:08d}").glob("global_step*/*.pt")):
        walk(torch.load(path, weights_only=False), path.name)
    return out


def test_lora_adapters_alone_are_checkpointed_resume_bitwise_and_on_another_world_size(tmp_path, corpus, tiny_llama):
    """LoRA under ZeRO-3 (the combination users find hardest), AdamW with weight decay and adapter dropout: the
    checkpoints hold the adapters alone, a run stopped and resumed ends bitwise where an unbroken one does, and
    the 2 ranks' shards resume on 1."""
    sections = dict(deepspeed={"zero_stage": 3, "grad_accum_steps": 2, "micro_batch_size": 2,
                               "optimizer": {"type": "adamw", "weight_decay": 0.1, "lr": 3e-3},
                               "schedule": {"decay": "constant", "warmup_steps": 2}},
                    run={"max_steps": 6, "log_every": 3}, checkpoint={"every_steps": 3})
    whole = hf_spec(corpus, tmp_path / "a", tiny_llama, **sections)
    whole["scaling"] = {"num_workers": 2}
    whole["model"]["lora"] = {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    torchrun(write_spec(tmp_path / "whole.yaml", whole))
    split = {**whole, "checkpoint": {**whole["checkpoint"], "storage": str(tmp_path / "b")}}
    path = write_spec(tmp_path / "split.yaml", split)
    torchrun(path, "--set", "run.max_steps=3")
    assert "resuming from step 3 with 2 workers" in torchrun(path)
    a, b = _states(tmp_path / "a/tiny", 6), _states(tmp_path / "b/tiny", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    [module] = (tmp_path / "a/tiny/checkpoints/step_00000006").glob("global_step6/zero_pp_rank_0_*model_states.pt")
    names = torch.load(module, weights_only=False)["module"].keys()
    assert names and all(".lora_" in name for name in names), names  # no base weight in the checkpoint
    adapters = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # A and B of q_proj (32 -> 32), v_proj (32 -> 16)
    assert sum(t.numel() for t in a.values()) < 10 * adapters  # weights, Adam's moments: of 35 k, the adapters'
    manifest = json.loads(next((tmp_path / "a/tiny/checkpoints/step_00000006").glob("*.json")).read_text())
    assert manifest["base_model"] == {"path": str(tiny_llama), "revision": None}

    out = torchrun(path, "--set", "run.max_steps=8", nproc=1)  # 2 ranks' ZeRO-3 shards, on 1
    assert ("resuming from step 6 with 1 worker; the checkpoint was written by 2 workers, converted to DeepSpeed's "
            "universal format") in out, out
    assert "[shardrun] finished: steps 6-8" in out


# One rank: the engine as the worker loop builds it for a model.lora run with activation checkpointing, in training
# mode, three AdamW steps with weight decay, then every base weight compared with the pretrained file's.
BASE_AFTER_TRAINING = """
import contextlib, sys, torch, yaml
from transformers import AutoModelForCausalLM
from shardrun.config import JobSpec
from shardrun.trainer import engine
from shardrun.trainer.restore import restore
from shardrun.trainer.topology import Topology


class Store:
    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield None


spec = JobSpec.model_validate(yaml.safe_load(open(sys.argv[1])))
topology = Topology(rank=0, world_size=1, local_rank=0, device="cpu")
engine.init_distributed(topology)
built = restore(spec, Store(), topology).engine
evaluating = [name for name, m in built.module.named_modules() if not m.training]
assert not evaluating, evaluating  # from_pretrained leaves eval mode: no dropout, no activation checkpointing
calls = []
for m in built.module.modules():
    if type(m).__name__.endswith("Attention"):
        m.register_forward_hook(lambda *_: calls.append(1))
rows = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
for _ in range(3):
    built.backward(built(rows[:, :-1], rows[:, 1:]))
    built.step()
print("attention forwards per step:", len(calls) // 3)
trained = built.module.model.get_base_model().state_dict()
base = {k.replace(".base_layer", ""): v for k, v in trained.items() if ".lora_" not in k}
pretrained = AutoModelForCausalLM.from_pretrained(sys.argv[2]).state_dict()
assert base.keys() == pretrained.keys(), sorted(base.keys() ^ pretrained.keys())
changed = [k for k in base if not torch.equal(base[k], pretrained[k])]
assert not changed, changed
moved = [k for k, v in trained.items() if ".lora_B." in k and v.abs().sum() > 0]
assert moved, "the adapters did not train"
print("base unchanged;", len(moved), "adapters trained")
"""


def test_lora_trains_in_training_mode_with_checkpointing_and_leaves_every_base_weight_bitwise_unchanged(
        tmp_path, corpus, tiny_llama):
    raw = hf_spec(corpus, tmp_path / "runs", tiny_llama, deepspeed={
        "zero_stage": 2, "optimizer": {"type": "adamw", "weight_decay": 0.1, "lr": 1e-2}})
    raw["model"].update(lora={"r": 4, "target_modules": "all-linear"}, activation_checkpointing=True)
    out = run([sys.executable, "-c", BASE_AFTER_TRAINING, str(write_spec(tmp_path / "job.yaml", raw)),
               str(tiny_llama)], timeout=240).stdout
    assert "attention forwards per step: 4" in out, out  # 2 layers, each recomputed in the backward
    assert "base unchanged; 14 adapters trained" in out, out


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
