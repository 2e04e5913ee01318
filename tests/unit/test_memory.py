"""The memory estimate `shardrun check` prints: the model states per GPU as DeepSpeed's own estimators count them
(ZeRO 2 and 3, with and without offload, on 1 to 16 GPUs), activations by the per-layer formula, shrunk by
activation checkpointing; LoRA's frozen base holds its weights alone."""

import pytest

from shardrun.config import parse
from shardrun.memory import ModelShape, activation_bytes, estimate, estimate_line, model_states

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama8b():
    """Llama 3 8B's shape (on the meta device: nothing allocated), as DeepSpeed's estimator measures it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())  # DeepSpeed's model_to_params tells tied weights apart by
    # their storage, which the meta device has none of
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert params == 8_030_261_248
    return ModelShape(params=params, trained=params, largest_layer=largest, layers=32, hidden=4096,
                      intermediate=14336, heads=32, vocab=128256)


@pytest.mark.parametrize(("gpus_per_node", "nodes"), [(1, 1), (8, 1), (8, 2)])
def test_model_states_per_gpu_are_deepspeeds_own_estimate(llama8b, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = gpus_per_node * nodes

    def on_gpu(**kw):
        states = model_states(llama8b, precision="bf16", world=world, **kw)
        return int(states["weights"] + states["gradients"] + states["optimizer"])

    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(llama8b.params, gpus_per_node, nodes, cpu_offload=offload)
        assert on_gpu(stage=2, offload_optimizer=offload) == gpu
    for offload, params in ((False, False), (True, False), (True, True)):
        _, gpu, _ = estimate_zero3_model_states_mem_needs(llama8b.params, llama8b.largest_layer, gpus_per_node, nodes,
                                                          cpu_offload=offload, cpu_offload_params=params)
        assert on_gpu(stage=3, offload_optimizer=offload, offload_params=params) == gpu
    offloaded = model_states(llama8b, stage=3, precision="bf16", world=world, offload_optimizer=True)
    assert offloaded["host"] == 16 * llama8b.params / world  # fp32 weights, gradients, moments: the rank's shard


def test_activations_follow_the_per_layer_formula_and_checkpointing_keeps_layer_inputs(llama8b):
    s, b, h = 4096, 1, 4096
    full = s * b * (15 * h + 19 * 14336 / 4)  # bytes of one layer in bf16 (34 s b h with a 4h MLP)
    logits = s * b * 128256 * (2 + 4)
    assert activation_bytes(llama8b, precision="bf16", micro_batch=b, seq_len=s) == 32 * full + logits
    every = activation_bytes(llama8b, precision="bf16", micro_batch=b, seq_len=s, checkpoint_every=1)
    assert every == 32 * s * b * h * 2 + full + logits  # each layer's input, one layer recomputed at a time
    second = activation_bytes(llama8b, precision="bf16", micro_batch=b, seq_len=s, checkpoint_every=2)
    assert second == 16 * s * b * h * 2 + 16 * full + full + logits
    eager = ModelShape(**{**llama8b.__dict__, "eager_attention": True})
    assert activation_bytes(eager, precision="bf16", micro_batch=b, seq_len=s) == 32 * (full + 5 * 32 * s * s * b) + \
        logits
    assert activation_bytes(llama8b, precision="fp32", micro_batch=b, seq_len=s) == 2 * 32 * full + s * b * 128256 * 8


def test_the_levers_show_in_the_estimate_of_a_7b_fine_tune_on_two_nc_a100_vms(llama8b):
    """The docs' examples: 2 x NC A100 v4 (4 x A100 80GB each), seq 4096, micro batch 1."""
    raw = {"name": "llama", "model": {"hf": {"path": "meta-llama/Meta-Llama-3-8B"}, "activation_checkpointing": True},
           "data": {"paths": ["d"], "seq_len": 4096}, "run": {"max_steps": 100},
           "deepspeed": {"zero_stage": 3, "precision": "bf16", "micro_batch_size": 1},
           "scaling": {"num_workers": 8, "use_gpu": True}}
    full = estimate(llama8b, parse(raw), 8)
    assert 20 < full["device"] / 2**30 < 30  # fits 80 GB with room
    plain = estimate(llama8b, parse({**raw, "model": {"hf": raw["model"]["hf"]}}), 8)
    assert plain["activations"] > 4 * full["activations"]
    lora = ModelShape(**{**llama8b.__dict__, "trained": 42_000_000})
    raw_lora = {**raw, "model": {**raw["model"], "lora": {"r": 16}}, "deepspeed": {**raw["deepspeed"], "zero_stage": 2}}
    adapters = estimate(lora, parse(raw_lora), 8)
    assert adapters["weights"] < 2.01 * llama8b.params and adapters["optimizer"] < 0.1 * 2**30
    line = estimate_line(lora, parse(raw_lora), 8, device_bytes=80 * 10**9, where="an A100 80GB")
    assert line.startswith("memory per GPU (estimate): weights 14.98 GiB")
    assert "activation checkpointing every layer" in line
    assert line.endswith("it fits an A100 80GB (74.51 GiB)"), line
