"""LoRA against PEFT. Run: python -m pytest tests/test_lora.py -q"""
import copy

import pytest
import torch

from lora import Dropout, LoRALinear, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter, unmerge_lora
from model import Llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


X = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(0))


def adapted(checkpoint, targets=("q_proj", "v_proj", "down_proj"), randomise=True):
    model = Llama.from_pretrained(checkpoint).eval()
    apply_lora(model, r=8, alpha=16, dropout=0.0, targets=targets)
    if randomise:  # B = 0 at init; give it values so the adapter actually changes something
        g = torch.Generator().manual_seed(1)
        for m in lora_layers(model):
            m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
    return model


def test_zero_initialised_b_leaves_the_logits_unchanged(checkpoint):
    base = Llama.from_pretrained(checkpoint).eval()
    model = adapted(checkpoint, randomise=False)
    assert torch.equal(base(X), model(X))


def test_only_the_adapter_receives_gradients(checkpoint):
    model = adapted(checkpoint).train()
    model(X).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merged_equals_unmerged_and_merging_twice_is_a_no_op(checkpoint):
    model = adapted(checkpoint)
    before = model(X)
    merge_lora(model)
    once = model(X)
    weights = [m.base.weight.clone() for m in lora_layers(model)]
    merge_lora(model)
    assert all(torch.equal(w, m.base.weight) for w, m in zip(weights, lora_layers(model)))
    torch.testing.assert_close(once, before, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(X), before, atol=1e-5, rtol=0)


def test_train_and_eval_never_merge_implicitly(checkpoint):
    model = adapted(checkpoint)
    model.train(), model.eval(), model.train()
    assert not any(m.merged for m in lora_layers(model))


def test_an_adapter_saved_by_us_loads_in_peft_with_equal_logits(checkpoint, tmp_path):
    model = adapted(checkpoint)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(checkpoint), tmp_path).eval()
    torch.testing.assert_close(theirs(X).logits, model(X), atol=1e-5, rtol=0)


def test_a_peft_saved_adapter_loads_in_ours_with_equal_logits(checkpoint, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["k_proj", "o_proj", "up_proj"],
                          init_lora_weights=False)  # random B, so the adapter is not a no-op
    torch.manual_seed(2)
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(checkpoint), cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(Llama.from_pretrained(checkpoint).eval(), tmp_path)
    assert len(lora_layers(ours)) == 3 * 2
    torch.testing.assert_close(ours(X), theirs(X).logits, atol=1e-5, rtol=0)


def test_an_adapter_for_another_model_is_refused_with_a_clear_error(checkpoint, tmp_path):
    save_adapter(adapted(checkpoint, targets=("q_proj",)), tmp_path)
    other = Llama.from_pretrained(checkpoint)
    apply_lora(other, r=4, alpha=8, dropout=0.0, targets=("q_proj",))
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(other, tmp_path)


def test_an_unknown_target_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(Llama.from_pretrained(checkpoint), targets=("qkv",))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_drops_a_share_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    d = Dropout(p).train()
    y = d(torch.ones(1000, 1000))
    sigma = (p * (1 - p) / y.numel()) ** 0.5  # of the dropped share
    assert abs((y == 0).float().mean().item() - p) < 5 * sigma
    assert torch.all((y == 0) | (y == d.scale)) and d.scale == pytest.approx(1 / (1 - p), rel=1e-4)
    assert abs(y.mean().item() - 1) < 5 * sigma * d.scale


def test_dropout_is_the_identity_in_eval_mode_and_at_p_0():
    x = torch.randn(8, 8)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x


def test_dropout_draws_one_mask_per_input_tensor():
    """q, k and v read one tensor and so share a mask; any other tensor gets a fresh one."""
    torch.manual_seed(0)
    d = Dropout(0.5).train()
    x, other = torch.ones(64, 64), torch.ones(64, 64)
    first = d(x)
    assert d(x) is first
    assert not torch.equal(d(other), first) and not torch.equal(d(x), first)  # x again, after another


def test_one_dropout_serves_all_of_a_models_adapters_and_a_copy_after_training_too(checkpoint):
    model = Llama.from_pretrained(checkpoint).train()
    apply_lora(model, r=4, alpha=8, dropout=0.1)
    model(X).sum().backward()  # the dropout now remembers its last input and output
    twin = copy.deepcopy(model)  # a copy carries no activations (deepcopy refuses non-leaf tensors)
    for m in (model, twin):
        assert len({id(layer.dropout) for layer in lora_layers(m)}) == 1


def test_lora_forward_and_gradients_equal_the_textbook_formula_under_dropout():
    """y = x W^T + (alpha / r) ((x * mask) A^T) B^T, the mask being the one dropout drew."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=False)
    layer = LoRALinear(base, 4, 8, Dropout(0.3)).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = layer(x)
    mask = layer.dropout.last[1].detach() / x.detach()  # 0 or 1 / (1 - p), elementwise
    x2 = x.detach().clone().requires_grad_()
    A, B = (w.detach().clone().requires_grad_() for w in (layer.lora_A.weight, layer.lora_B.weight))
    ref = x2 @ base.weight.T + 2.0 * ((x2 * mask) @ A.T) @ B.T
    g = torch.randn_like(y)
    y.backward(g), ref.backward(g)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in ((x.grad, x2.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
