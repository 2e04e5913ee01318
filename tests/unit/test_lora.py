"""LoRA adapters (model.lora) checked before Ray: described with what trains, modules the model lacks and
combinations that cannot work refused with the reason (exit 2); a checkpoint of adapters alone resumes only the
base it was trained on; a classifier's new head trains beside the adapters; MFU counts frozen weights' matmuls
without their weight gradients."""

import pytest
from helpers import tiny_spec, write_spec
from test_hf_checks import llama

from shardrun import cli
from shardrun.checkpoint_format import base_model_mismatch
from shardrun.config import ModelSpec, parse
from shardrun.errors import UserError

pytestmark = pytest.mark.timeout(120)
pytest.importorskip("peft")


def check(tmp_path, corpus, model: dict, capsys) -> tuple[int, str]:
    spec = tiny_spec(corpus, tmp_path / "runs", scaling={"num_workers": 2})
    spec["model"] = model
    code = cli.main(["check", str(write_spec(tmp_path / "job.yaml", spec))])
    return code, capsys.readouterr().err


def test_adapters_are_described_and_modules_the_model_lacks_exit_2(tmp_path, corpus, capsys):
    hf = {"path": str(llama(tmp_path / "m"))}
    code, err = check(tmp_path, corpus, {"hf": hf, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}, capsys)
    assert code == 0, err
    assert "35,872 parameters, LoRA r=4 on q_proj, v_proj: 896 of them train (2.50%)" in err, err

    code, err = check(tmp_path, corpus, {"hf": hf, "lora": {"target_modules": ["qkv", "c_attn"]}}, capsys)
    assert code == 2
    assert "model.lora: Target modules" in err and "not found" in err
    assert "linear layers are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in err


@pytest.mark.parametrize(("model", "expect"), [
    ({"lora": {"r": 8}}, "model.lora adapts the pretrained weights of a model.hf model"),
    ({"hf": {"path": "m", "from_scratch": True}, "lora": {}}, "with model.hf.from_scratch there are none"),
    ({"hf": {"path": "m"}, "lora": {"target_modules": []}}, "names at least one module"),
    ({"hf": {"path": "m"}, "lora": {"r": 0}}, "lora.r"),
    ({"hf": {"path": "m"}, "lora": {"rank": 8}}, "rank"),
])
def test_lora_where_it_cannot_work_is_a_spec_error(tmp_path, corpus, model, expect):
    spec = tiny_spec(corpus, tmp_path)
    spec["model"] = model
    with pytest.raises(UserError, match=expect):
        parse(spec)


def test_a_checkpoint_of_adapters_resumes_only_the_base_it_was_trained_on():
    base = {"path": "/models/llama", "revision": None}
    assert base_model_mismatch(base, dict(base), 6) is None
    assert base_model_mismatch(None, None, 6) is None
    assert "holds LoRA adapters alone (on /models/llama), and the spec trains every weight" in base_model_mismatch(
        base, None, 6)
    assert "holds every weight of the model, and the spec trains model.lora adapters" in base_model_mismatch(
        None, base, 6)
    other = base_model_mismatch(base, {"path": "/models/llama", "revision": "v2"}, 6)
    assert "trained on /models/llama, and the spec's base model is /models/llama at revision v2" in other
    assert ModelSpec(hf={"path": "m", "revision": "main"}, lora={}).adapter_base == {"path": "m", "revision": "main"}
    assert ModelSpec(hf={"path": "m"}).adapter_base is None


def test_a_classifier_trains_its_new_head_beside_the_adapters():
    from transformers import BertConfig

    from shardrun.config import HFModelSpec, LoraSpec
    from shardrun.driver.model_check import model_shape

    spec = HFModelSpec(path="bert", task="sequence_classification", num_labels=3)
    config = BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_labels=3)
    shape = model_shape(config, spec, LoraSpec(r=2, target_modules=["query", "value"]))
    adapters = 2 * (2 * 16 + 16 * 2)
    head = 16 * 3 + 3
    assert shape.trained == adapters + head, shape
    assert shape.vocab == 3  # the logits are the labels'



def test_mfu_counts_frozen_weights_without_their_weight_gradients(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardrun.config import HFModelSpec, LoraSpec
    from shardrun.trainer.models.hf import CausalLM, apply_lora

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    full = CausalLM(LlamaForCausalLM(config))
    lora = CausalLM(apply_lora(LlamaForCausalLM(config), LoraSpec(r=2, target_modules=["q_proj"]),
                               HFModelSpec(path="m")))
    matmuls = sum(p.numel() for n, p in full.named_parameters() if "embed" not in n) + 64 * 16  # + the tied head
    attention = 12 * 1 * 16 * 8
    assert full.flops_per_token(8) == 6 * matmuls + attention
    adapters = 2 * 16 + 16 * 2
    assert lora.flops_per_token(8) == 4 * matmuls + 6 * adapters + attention
