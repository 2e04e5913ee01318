import math

import pytest
import torch

from shardrun.config import ModelSpec
from shardrun.trainer.models import build, gpt_config
from shardrun.trainer.models.gpt import GPT, GPTConfig


def test_initial_loss_is_near_uniform_over_bytes():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    x = torch.randint(0, 256, (4, 16))
    loss = model(x, torch.roll(x, -1, dims=1))
    assert abs(loss.item() - math.log(256)) < 0.1


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    a, b = model.logits(x), model.logits(y)
    assert torch.allclose(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_position_ids_place_a_packed_document_as_if_it_began_the_row():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).eval()
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(model.logits(x, torch.arange(12)[None]), model.logits(x))
    restarted = torch.cat([torch.arange(5), torch.arange(7)])[None]  # a second document from token 5
    assert not torch.allclose(model.logits(x, restarted)[0, 5:], model.logits(x)[0, 5:])
    assert torch.allclose(model.logits(x, restarted)[0, :5], model.logits(x)[0, :5])
    assert model(x, x, position_ids=restarted) != model(x, x)


def test_too_long_a_sequence_is_refused():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4))
    with pytest.raises(ValueError, match="exceeds block_size 4"):
        model.logits(torch.zeros(1, 5, dtype=torch.long))


def test_config_checks_heads():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)


def test_build_from_spec_ties_embeddings():
    spec = ModelSpec(n_layer=1, n_head=2, n_embd=16, block_size=8)
    model = build(spec)
    assert model.lm_head.weight is model.wte.weight
    assert gpt_config(spec).n_embd == 16


def test_user_entrypoint(tmp_path, monkeypatch):
    from shardrun.errors import UserError
    from shardrun.trainer.models import resolve_entrypoint

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def build(width):\n    return torch.nn.Linear(width, width)\n"
        "def not_a_module():\n    return 3\n"
    )
    assert build(ModelSpec(entrypoint="mymodels:build", args={"width": 3})).in_features == 3
    with pytest.raises(UserError, match="returned int, not an nn.Module"):
        build(ModelSpec(entrypoint="mymodels:not_a_module"))
    with pytest.raises(UserError, match="has no function 'nope'"):
        resolve_entrypoint("mymodels:nope")
    with pytest.raises(UserError, match="cannot import 'nowhere_to_be_found'"):
        resolve_entrypoint("nowhere_to_be_found:build")


def test_example_user_model_trains_a_step():
    import sys

    from helpers import REPO
    sys.path.insert(0, str(REPO))
    try:
        from examples.user_model import build as build_user
    finally:
        sys.path.pop(0)
    model = build_user(hidden=32, layers=1)
    x = torch.randint(0, 256, (2, 12))
    loss = model(x, torch.roll(x, -1, 1))
    loss.backward()
    assert loss.item() > 0


def test_the_loss_leaves_ignored_targets_out_and_keeps_bf16_logits_in_bf16():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build(ModelSpec(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :5] = -100
    logits = model.logits(idx)
    expected = F.cross_entropy(logits.view(-1, 64), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(model(idx, targets), expected, atol=1e-6)
    low = model.to(torch.bfloat16)
    loss = low(idx, targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 0.05


def _grads(model, x, y):
    torch.manual_seed(1)  # the same dropout masks for both
    model.zero_grad()
    model(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, dropout=0.1)).train()
    x = torch.randint(0, 256, (2, 16))
    y = torch.roll(x, -1, dims=1)
    plain = _grads(model, x, y)
    model.enable_activation_checkpointing(every)
    again = _grads(model, x, y)
    assert plain.keys() == again.keys() and all(torch.equal(plain[n], again[n]) for n in plain)


def test_a_hugging_face_model_checkpoints_every_nth_layer_with_the_same_gradients(tmp_path):
    transformers = pytest.importorskip("transformers")
    from shardrun.trainer.models.hf import CausalLM

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = CausalLM(transformers.LlamaForCausalLM(config)).train()
    x = torch.randint(0, 64, (2, 12))
    y = torch.roll(x, -1, dims=1)
    plain = _grads(model, x, y)
    model.enable_activation_checkpointing(2)
    layers = model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    again = _grads(model, x, y)
    assert all(torch.allclose(plain[n], again[n], atol=1e-6, rtol=0) for n in plain)


def test_an_entrypoint_model_without_the_hook_is_refused_before_ray_and_the_setting_is_checked():
    import sys

    from helpers import REPO

    from shardrun.errors import UserError
    from shardrun.trainer.models import check_checkpointing_hook

    sys.path.insert(0, str(REPO))
    spec = ModelSpec(entrypoint="examples.user_model:build", activation_checkpointing=True)
    with pytest.raises(UserError, match="has no enable_activation_checkpointing"):
        check_checkpointing_hook(spec)
    check_checkpointing_hook(ModelSpec(entrypoint="examples.user_model:build"))  # off: nothing to check
    assert ModelSpec(activation_checkpointing=3).checkpoint_every == 3 and ModelSpec().checkpoint_every == 0
    with pytest.raises(ValueError, match="every N-th block"):
        ModelSpec(activation_checkpointing=-1)
