"""A Hugging Face model the run cannot train is refused by `shardrun check` (as by `run`, before Ray) with the
reason, exit 2: no model there, an architecture transformers does not know, a model that needs its own code while
trust_remote_code is off, token ids beyond its vocabulary, data made by another tokenizer, sequences beyond its
positions; for a classifier, a table it cannot read, labels beyond num_labels, no padding id where it needs one;
a GPU run whose share of the training state is more than the GPU holds. A good one is described: its size and the
memory each rank's share of training state takes."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_spec, write_spec

from shardrun import cli
from shardrun.config import parse
from shardrun.errors import UserError
from shardrun.memory import GIB, check_fits, state_bytes_per_rank

pytestmark = pytest.mark.timeout(120)


def llama(folder, vocab=256, positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=positions)).save_pretrained(folder)
    return folder


def with_tokenizer(folder):
    """A word-level tokenizer.json of 256 ids beside the model: not the byte-level one the corpus was made with."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(255)} | {"<unk>": 255}, unk_token="<unk>")).save(
        str(folder / "tokenizer.json"))
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
    assert f"model: LlamaForCausalLM from {tmp_path / 'm'}, 34,976 parameters\n" in err
    # ZeRO 3 over 2 workers: (2 + 4) bytes of weights per parameter / 2 + 4 x 8,192 (the largest module gathered),
    # 4 / 2 of fp32 gradients, 8 / 2 of moments; activations: 2 layers of 4 x 32 tokens x (15 x 32 + 19 x 64 / 4)
    # bytes, and the logits, 4 x 32 x 256 x (2 + 4)
    assert ("memory per rank (estimate): weights 134.5 KiB, gradients 68.3 KiB, optimizer state 136.6 KiB, "
            "activations 388.0 KiB (micro batch 4 x 32 tokens, no activation checkpointing): 727.4 KiB at ZeRO 3 in "
            "bf16 on 2 workers") in err, err


@pytest.mark.parametrize(("make", "hf", "expect"), [
    (lambda d: None, {}, "no such folder"),
    (lambda d: d.mkdir(), {}, "no config.json there"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))), {},
     "cannot read its config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps(
        {"model_type": "acme-lm", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"}}))), {},
     "this model runs its own code"),
    (lambda d: llama(d, vocab=128), {}, "the shards' token ids go up to 255"),
    (lambda d: with_tokenizer(llama(d)), {}, "the shards were made by the tokenizer bytes, but"),
    (lambda d: llama(d, positions=16), {}, "data.seq_len (32) is longer than"),
    (lambda d: llama(d), {"config_overrides": {"no_such_key": 1}}, "config has no no_such_key"),
], ids=["missing", "no-config", "unknown-architecture", "remote-code", "vocabulary", "tokenizer", "positions",
        "override"])
def test_a_model_the_run_cannot_train_exits_2_with_the_reason(tmp_path, corpus, capsys, make, hf, expect):
    make(tmp_path / "m")
    code, err = check(tmp_path, corpus, {"path": str(tmp_path / "m"), **hf}, capsys)
    assert code == 2 and "shardrun: error: " in err and expect in err, err


def test_the_state_each_rank_holds_shrinks_with_the_zero_stage():
    b = 1_000_000_000  # bf16: 2 + 4 bytes of weights, 2 + 4 of gradients, 8 of moments; ZeRO 3 keeps no 16-bit grads
    assert [state_bytes_per_rank(b, stage=s, precision="bf16", world=8) / b for s in range(4)] == [20, 6, 4.25, 2.25]
    assert state_bytes_per_rank(b, stage=0, precision="fp32", world=8) / b == 16
    assert state_bytes_per_rank(b, stage=2, precision="fp32", world=4) / b == 4 + 12 / 4


def table(folder, *, labels=(0, 1, 2), columns=("input_ids", "attention_mask")):
    """A labelled table of 2048 rows of 8 token ids (a classifier's data)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, size=(2048, 8), dtype=np.int32)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "other": ids}
    cols = {c: pa.FixedSizeListArray.from_arrays(pa.array(data[c].ravel()), 8) for c in columns}
    folder.mkdir()
    pq.write_table(pa.table({**cols, "label": np.resize(np.array(labels, dtype=np.int64), 2048)}),
                   folder / "part-0.parquet", row_group_size=256)
    return folder


def classify(tmp_path, capsys, *, labels=(0, 1, 2), columns=("input_ids", "attention_mask"), num_labels=3,
             overrides=None):
    spec = tiny_spec(table(tmp_path / "table", labels=labels, columns=columns), tmp_path / "runs",
                     scaling={"num_workers": 2}, data={"paths": [str(tmp_path / "table")], "format": "table",
                                                       "label": "label"})
    spec["model"] = {"hf": {"path": str(llama(tmp_path / "m")), "task": "sequence_classification",
                            "num_labels": num_labels, "config_overrides": overrides or {"pad_token_id": 0}}}
    code = cli.main(["check", str(write_spec(tmp_path / "job.yaml", spec))])
    return code, capsys.readouterr().err


def test_a_classifier_over_a_labelled_table_is_described(tmp_path, capsys):
    code, err = classify(tmp_path, capsys)
    assert code == 0, err
    assert "model: LlamaForSequenceClassification from" in err and "26,880 parameters" in err, err  # no lm_head


@pytest.mark.parametrize(("kwargs", "expect"), [
    ({"labels": (0, 1, 3)}, "data.label 'label': its values run from 0 to 3, but model.hf.num_labels is 3"),
    ({"columns": ("attention_mask",)}, "the table has attention_mask"),
    ({"columns": ("input_ids", "other")}, "the table has input_ids, other (set data.columns to those it takes)"),
    ({"overrides": {"rms_norm_eps": 1e-5}}, "its config has no pad_token_id; set model.hf.config_overrides"),
], ids=["label-range", "no-input-ids", "other-column", "no-pad-id"])
def test_a_table_the_classifier_cannot_read_exits_2_with_the_reason(tmp_path, capsys, kwargs, expect):
    code, err = classify(tmp_path, capsys, **kwargs)
    assert code == 2 and expect in err, err


@pytest.mark.parametrize(("model", "data", "expect"), [
    ({"task": "sequence_classification"}, {}, "needs model.hf.num_labels"),
    ({"task": "sequence_classification", "num_labels": 2}, {}, "trains on data.format: table"),
    ({"num_labels": 2}, {}, "model.hf.num_labels is for task: sequence_classification"),
    ({}, {"format": "table", "label": "label"}, "model.hf.task causal_lm trains on data.format: tokens"),
    ({"task": "sequence_classification", "num_labels": 2}, {"format": "table"}, "needs data.label"),
    ({"attn_implementation": "flash_attention_2"}, {}, "flash_attention_2 runs on GPUs in bf16 or fp16"),
])
def test_the_task_goes_with_the_data_format_and_the_attention_with_the_device(tmp_path, model, data, expect):
    spec = tiny_spec(tmp_path, tmp_path / "runs", data={"paths": [str(tmp_path)], **data})
    spec["model"] = {"hf": {"path": str(tmp_path), **model}}
    with pytest.raises(UserError, match=expect):
        parse(spec)


def test_a_gpu_run_whose_training_state_cannot_fit_is_refused_with_the_levers():
    spec = parse({"name": "big", "data": {"paths": ["d"]}, "run": {"max_steps": 10},
                  "deepspeed": {"zero_stage": 1, "precision": "fp32"}})
    check_fits(1_000_000_000, 80 * GIB, spec=spec, world=8, where="rank 0's GPU")  # 9 GB: fits
    with pytest.raises(UserError) as e:
        check_fits(10_000_000_000, 80 * GIB, spec=spec, world=8, where="rank 0's GPU (NVIDIA A100 80GB PCIe)")
    assert str(e.value) == (  # (4 + 4 + 8 / 8) x 10 B bytes
        "model: 10.00 B parameters need about 83.82 GiB per rank for weights, gradients and optimizer state at ZeRO 1 "
        "in fp32 on 8 workers, more than rank 0's GPU (NVIDIA A100 80GB PCIe) holds (80.00 GiB); try "
        "deepspeed.zero_stage: 2, deepspeed.precision: bf16, more workers, deepspeed.offload.optimizer: cpu")


def test_a_model_behind_a_uri_is_copied_once_into_the_node_cache(tmp_path, monkeypatch):
    from shardrun.config import HFModelSpec
    from shardrun.trainer.models import hf

    monkeypatch.setenv("SHARDRUN_HF_CACHE", str(tmp_path / "cache"))
    source = llama(tmp_path / "m")
    lines = []
    folder = hf.local_folder(HFModelSpec(path=f"file://{source}"), emit=lines.append)
    assert folder == str(hf.cache_dir(f"file://{source}", None)) and (tmp_path / "cache") in hf.Path(folder).parents
    assert {p.name for p in source.iterdir()} | {".complete"} == {p.name for p in hf.Path(folder).iterdir()}
    assert lines[0].startswith(f"copying the model from file://{source} (0.1 MB, 3 files) to this node's cache")
    assert lines[-1].startswith("copied the model in ")
    lines.clear()
    assert hf.local_folder(HFModelSpec(path=f"file://{source}"), emit=lines.append) == folder and lines == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json there"):
        hf.local_folder(HFModelSpec(path=f"file://{tmp_path / 'empty'}"), emit=lines.append)
