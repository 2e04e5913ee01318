"""`shardrun export --format hf`: a folder that transformers' AutoModelForCausalLM.from_pretrained loads, with the
logits of the model that was trained: the built-in GPT as GPT-2, a model.hf run as its own model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import commit, write_checkpoint

from shardrun import cli
from shardrun.driver.model_check import tokenizer_name
from shardrun.errors import UserError
from shardrun.export import check_out
from shardrun.hf_export import parse_size

transformers = pytest.importorskip("transformers")

GPT_SIZE = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16}


def _run(storage, model_section: dict, module_state: dict):
    """A run dir `tiny` with one committed ZeRO 0 checkpoint (step 4) holding module_state."""
    run = storage / "tiny"
    folder = write_checkpoint(run / "checkpoint_00000004", 4, world=1, ranks=(0,), stage=0)
    (run / "job.yaml").write_text(yaml.safe_dump({"name": "tiny", "model": model_section}))
    torch.save({"module": module_state}, folder / "global_step4/mp_rank_00_model_states.pt")
    commit(folder)
    return run


def _export(storage, out, *extra) -> int:
    return cli.main(["export", "tiny", "--storage", str(storage), "--out", str(out), "--format", "hf", *extra])


def _gpt(bias: bool):
    from shardrun.config import ModelSpec
    from shardrun.trainer.models import gpt_config
    from shardrun.trainer.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(gpt_config(ModelSpec(**GPT_SIZE, bias=bias))).eval()
    with torch.no_grad():  # biases and norms away from their init, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_the_gpt_exports_as_gpt2_with_the_same_logits(tmp_path, bias):
    model = _gpt(bias)
    _run(tmp_path / "runs", {**GPT_SIZE, "bias": bias}, model.state_dict())
    out = tmp_path / "export"
    assert _export(tmp_path / "runs", out) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu"
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["vocab_size"]) == (16, 16, 2, 256)
    assert config["tie_word_embeddings"] is True and config.get("bos_token_id") is None
    assert config["eos_token_id"] == 0 and json.loads((out / "generation_config.json").read_text())["top_k"] == 50
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the text's bytes, as the GPT read them
    text = 'def f(x):\n    """Ünïcode, tabs\tand — dashes."""\n'
    assert tokenizer(text)["input_ids"] == list(text.encode()) and tokenizer.decode(list(text.encode())) == text
    assert tokenizer.eos_token_id == 0
    assert tokenizer_name(str(out)) == "bytes"  # byte-level data, made without a tokenizer, fits it
    record = json.loads((out / "shardrun-export.json").read_text())
    assert record["step"] == 4 and record["format"] == "hf" and "model.safetensors" in record["files"]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, model.logits(idx), atol=1e-5, rtol=0)
    check_out(str(tmp_path / "runs/tiny"), str(out))  # an earlier hf export may be replaced
    assert _export(tmp_path / "runs", out, "--dtype", "bf16") == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.fixture
def llama(tmp_path):
    """A tiny random Llama written by save_pretrained, with a small tokenizer, as model.hf.path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "llama"
    model.save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<unk>": 127}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(path)
    return model, path


def _logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits


def test_a_hf_run_exports_as_its_own_model_with_tokenizer_and_shards(tmp_path, llama):
    model, path = llama
    state = {"model." + k: v for k, v in model.state_dict().items()}
    _run(tmp_path / "runs", {"hf": {"path": str(path)}}, state)
    out = tmp_path / "export"
    assert _export(tmp_path / "runs", out, "--max-shard-size", "20KB") == 0

    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(loaded, idx), _logits(model, idx), atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out)("w3 w5")["input_ids"] == [3, 5]

    assert _export(tmp_path / "runs", out, "--dtype", "bf16") == 0  # replaces the sharded export whole
    assert not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16), atol=0, rtol=0)


def test_a_tied_hf_model_exports_without_the_head_and_config_overrides_apply(tmp_path, llama):
    _, path = llama
    config = transformers.AutoConfig.from_pretrained(path)
    config.update({"tie_word_embeddings": True, "num_hidden_layers": 1})
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    state = {"model." + k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hf = {"path": f"file://{path}", "config_overrides": {"tie_word_embeddings": True, "num_hidden_layers": 1}}
    _run(tmp_path / "runs", {"hf": hf}, state)  # path as a URI: its small files are fetched
    out = tmp_path / "export"
    assert _export(tmp_path / "runs", out) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 1 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(loaded, idx), _logits(model, idx), atol=1e-5, rtol=0)


def test_weights_that_do_not_fit_the_model_are_refused_and_nothing_is_written(tmp_path, llama, capsys):
    model, path = llama
    state = {"model." + k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    _run(tmp_path / "runs", {"hf": {"path": str(path)}}, state)
    assert _export(tmp_path / "runs", tmp_path / "export") == 2
    assert "do not fit LlamaForCausalLM (missing: model.layers.1." in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_what_hf_cannot_export_exits_2_with_what_it_can(tmp_path, capsys, llama):
    _run(tmp_path / "a", {"entrypoint": "mypkg.models:build"}, {})
    assert _export(tmp_path / "a", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "trains mypkg.models:build: --format hf writes the built-in GPT (as GPT-2) and model.hf runs" in err
    _run(tmp_path / "b", {"hf": {"path": str(llama[1])}}, {})
    assert cli.main(["export", "tiny", "--storage", str(tmp_path / "b"), "--out", str(tmp_path / "x")]) == 2
    assert "export it with --format hf" in capsys.readouterr().err
    run = tmp_path / "c"
    _run(run, GPT_SIZE, {})
    assert cli.main(["export", "tiny", "--storage", str(run), "--out", str(tmp_path / "x"),
                     "--max-shard-size", "1GB"]) == 2
    assert "--max-shard-size is for --format hf" in capsys.readouterr().err
    assert _export(run, tmp_path / "x", "--max-shard-size", "lots") == 2
    assert "--max-shard-size is a size such as 5GB" in capsys.readouterr().err


def test_shard_sizes_read_as_transformers_reads_them():
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1000", "20kb")] == [5 * 10**9, 5 * 10**8, 2 * 2**30,
                                                                              1000, 20_000]
    with pytest.raises(UserError):
        parse_size("0GB")


def test_generate_samples_from_a_hf_run_and_from_a_gpt_exported_as_gpt2(tmp_path, llama, capsys):
    model, path = llama
    _run(tmp_path / "runs", {"hf": {"path": str(path)}}, {"model." + k: v for k, v in model.state_dict().items()})
    storage = str(tmp_path / "runs")
    assert cli.main(["generate", "tiny", "--storage", storage, "--prompt", "w3 w5", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w3 w5") and len(out.strip()) > len("w3 w5") and "w" in out[5:]  # the model's own words

    _run(tmp_path / "gpt-runs", {"type": "gpt", **GPT_SIZE}, _gpt(bias=False).state_dict())
    assert _export(tmp_path / "gpt-runs", tmp_path / "gpt2") == 0
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "gpt2"), "--prompt", "def ", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_a_classifier_run_exports_as_a_sequence_classifier_and_generate_says_it_writes_no_text(tmp_path, llama,
                                                                                                  capsys):
    _, path = llama
    config = transformers.AutoConfig.from_pretrained(path, num_labels=3, pad_token_id=0)
    torch.manual_seed(2)
    model = transformers.LlamaForSequenceClassification(config).eval()
    hf = {"path": str(path), "task": "sequence_classification", "num_labels": 3,
          "config_overrides": {"pad_token_id": 0}}
    _run(tmp_path / "runs", {"hf": hf}, {"model." + k: v for k, v in model.state_dict().items()})
    out = tmp_path / "export"
    assert _export(tmp_path / "runs", out) == 0
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForSequenceClassification" and loaded.config.num_labels == 3
    idx = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(loaded, idx), _logits(model, idx), atol=1e-5, rtol=0)

    capsys.readouterr()
    assert cli.main(["generate", "tiny", "--storage", str(tmp_path / "runs")]) == 2
    assert "trains a sequence classifier, which labels text and writes none" in capsys.readouterr().err
    assert cli.main(["generate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a LlamaForSequenceClassification, a sequence classifier, which labels text and writes none" in err


def test_an_export_to_a_uri_is_uploaded_whole_and_replaces_an_earlier_one(tmp_path, llama, capsys):
    model, path = llama
    _run(tmp_path / "runs", {"hf": {"path": str(path)}}, {"model." + k: v for k, v in model.state_dict().items()})
    out = tmp_path / "bucket/exports/llama"
    assert _export(tmp_path / "runs", f"file://{out}", "--max-shard-size", "20KB") == 0
    printed = capsys.readouterr().err
    assert f"uploading {len(list(out.iterdir()))} files" in printed, repr(printed)
    shards = {p.name for p in out.glob("model-*.safetensors")}
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()

    assert _export(tmp_path / "runs", f"file://{out}") == 0  # one file now: the shards and their index go
    assert not (out / "model.safetensors.index.json").exists() and not any(out.glob("model-*.safetensors"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(loaded, idx), _logits(model, idx), atol=1e-5, rtol=0)

    (tmp_path / "bucket/other").mkdir()
    (tmp_path / "bucket/other/notes.txt").write_text("mine")
    assert _export(tmp_path / "runs", f"file://{tmp_path}/bucket/other") == 2
    assert "holds files that are no export (notes.txt)" in capsys.readouterr().err
    assert _export(tmp_path / "runs", f"file://{tmp_path}/runs/tiny/hf") == 2
    assert "is inside the run dir" in capsys.readouterr().err
    (out / "config.json").unlink()  # an upload that stopped before its last files: exported again, whole
    (out / "shardrun-export.json").unlink()
    assert _export(tmp_path / "runs", f"file://{out}") == 0
    assert (out / "config.json").is_file()


def _lora_run(tmp_path, path, lora: dict):
    """A model.lora run whose checkpoint holds trained adapters alone (lora_B away from its zero init), and the
    peft model that holds them."""
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(2)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    adapters = {"model." + k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    _run(tmp_path / "runs", {"hf": {"path": str(path)}, "lora": lora}, adapters)
    return model


def test_a_lora_run_exports_its_adapters_for_peft_and_merged_for_transformers_with_the_trained_logits(
        tmp_path, llama, capsys):
    from peft import AutoPeftModelForCausalLM

    _, path = llama
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    trained = _lora_run(tmp_path, path, lora)
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = _logits(trained, idx)

    adapters = tmp_path / "adapters"
    assert _export(tmp_path / "runs", adapters) == 0
    assert "LoRA adapters in peft's format" in capsys.readouterr().out
    written = {p.name for p in adapters.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= written
    assert not (adapters / "config.json").exists() and not (adapters / "README.md").exists()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == (str(path), 4, 8)
    torch.testing.assert_close(_logits(AutoPeftModelForCausalLM.from_pretrained(adapters).eval(), idx), expected,
                               atol=1e-5, rtol=0)

    merged = tmp_path / "merged"
    assert _export(tmp_path / "runs", merged, "--merge") == 0
    assert "adapters merged" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(_logits(loaded, idx), expected, atol=1e-5, rtol=0)

    assert cli.main(["generate", str(adapters), "--prompt", "w1 w2", "--tokens", "4"]) == 0  # peft's, over the base
    from_adapters = capsys.readouterr().out
    assert cli.main(["generate", str(tmp_path / "runs/tiny"), "--prompt", "w1 w2", "--tokens", "4"]) == 0  # merged
    assert capsys.readouterr().out == from_adapters and from_adapters.startswith("w1 w2")


def test_adapters_that_do_not_fit_the_spec_or_a_merge_of_no_lora_run_are_refused(tmp_path, llama, capsys):
    _, path = llama
    _lora_run(tmp_path, path, {"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    job = tmp_path / "runs/tiny/job.yaml"
    raw = yaml.safe_load(job.read_text())
    raw["model"]["lora"]["r"] = 8  # the adapters were trained at rank 4
    job.write_text(yaml.safe_dump(raw))
    assert _export(tmp_path / "runs", tmp_path / "out") == 2
    assert "do not fit the run's LoRA adapters" in capsys.readouterr().err and not (tmp_path / "out").exists()
    del raw["model"]["lora"]
    job.write_text(yaml.safe_dump(raw))
    assert _export(tmp_path / "runs", tmp_path / "out", "--merge") == 2
    assert "--merge is for a model.lora run" in capsys.readouterr().err
