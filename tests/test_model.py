"""Tests for model.py: logits against transformers (loaded through checkpoint.py), the KV cache.

Run: python -m pytest tests/test_model.py -q

Everything runs on CPU in float32 (bf16 where stated) on tiny random models built here with
transformers; nothing is downloaded. The reference is transformers.LlamaForCausalLM with eager
attention (lit-gpt test_model.py, minGPT test_huggingface_import.py compare the same way).
"""
import copy
import json
import os
import shutil

import pytest
import torch

from kvcache import KVCache
from model import Llama, ModelArgs, attend

transformers = pytest.importorskip("transformers")  # the oracle (requirements-dev.txt)
LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

# ----------------------------------------------------------------------------- tiny models
TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            tie_word_embeddings=False)
# Llama 3.1 scaling with original_max_position_embeddings=64 so that, at head_dim 16 and
# theta 5e5, the wavelengths fall in all three bands (kept, blended, slowed).
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {  # name -> overrides of TINY, as a transformers v5 LlamaConfig spells them
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "rope_theta_5e5": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3_scaling": dict(num_key_value_heads=2, rope_parameters=LLAMA3),
    "linear_scaling": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "head_dim_32": dict(num_key_value_heads=2, head_dim=32),  # 4 heads * 32 != hidden 64
}
OUR_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=100,
                     rope_theta=500000.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
TOKENS = torch.tensor([[1, 17, 42, 99, 3, 0, 56, 23, 23, 8, 71, 64, 5, 30, 2, 11],
                       [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]])


def randomize(module, seed):
    """Seeded weights large enough that logits are far from uniform (init's 0.02 is not), and norm
    gains away from 1, so a skipped or misplaced norm or a transposed matrix cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale, mean = (0.1, 1.0) if name.endswith("norm.weight") else (0.2, 0.0)
            p.copy_(mean + scale * torch.randn(p.shape, generator=g))
    return module


def hf_logits(hf, tokens):
    return hf(tokens).logits.float()


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """name -> (transformers model, directory it was saved to); each built once per module."""
    built = {}

    def get(name):
        if name not in built:
            cfg = LlamaConfig(**{**TINY, **VARIANTS[name]}, attn_implementation="eager")
            hf = randomize(LlamaForCausalLM(cfg), seed=list(VARIANTS).index(name)).eval()
            path = str(tmp_path_factory.mktemp(name))
            hf.save_pretrained(path)
            built[name] = hf, path
        return built[name]
    return get


@pytest.fixture(scope="module")
def ours():
    return randomize(Llama(OUR_ARGS), seed=7).eval()


# ----------------------------------------------------------------------------- logits vs transformers
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_transformers_in_float32(hf_model, name):
    hf, path = hf_model(name)
    model = Llama.from_pretrained(path)
    torch.testing.assert_close(model(TOKENS), hf_logits(hf, TOKENS), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_load_as_one_shared_matrix(hf_model):
    model = Llama.from_pretrained(hf_model("tied")[1])
    assert model.lm_head.weight is model.embed_tokens.weight


def test_a_sharded_checkpoint_loads_with_equal_logits(hf_model, tmp_path):
    hf, _ = hf_model("gqa")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # ~370 KB of weights: several shards
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    model = Llama.from_pretrained(str(tmp_path))
    torch.testing.assert_close(model(TOKENS), hf_logits(hf, TOKENS), atol=1e-5, rtol=1e-5)


def v4_config(v5: dict, rope_theta, rope_scaling) -> dict:
    """The config.json transformers v4 would have written: torch_dtype, top-level rope_theta
    (absent meaning 10000) and rope_scaling without theta, no rope_parameters."""
    cfg = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    cfg.update(torch_dtype="float32", rope_scaling=rope_scaling, transformers_version="4.46.0")
    if rope_theta is not None:
        cfg["rope_theta"] = rope_theta
    return cfg


V4_CASES = {  # variant -> (top-level rope_theta or None for "absent", rope_scaling as v4 wrote it)
    "mha": (None, None),
    "rope_theta_5e5": (500000.0, None),
    "llama3_scaling": (500000.0, {k: v for k, v in LLAMA3.items() if k != "rope_theta"}),
    "linear_scaling": (None, {"type": "linear", "factor": 4.0}),  # early v4 spelled it "type"
}


@pytest.mark.parametrize("name", V4_CASES)
def test_a_transformers_v4_config_gives_equal_logits(hf_model, tmp_path, name):
    hf, path = hf_model(name)
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "config.json") as f:
        cfg = v4_config(json.load(f), *V4_CASES[name])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = Llama.from_pretrained(str(tmp_path))
    torch.testing.assert_close(model(TOKENS), hf_logits(hf, TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_checkpoint_saved_by_us_loads_in_transformers_with_equal_logits(tmp_path, tied):
    args = ModelArgs(**{**OUR_ARGS.__dict__, "tie_word_embeddings": tied})
    model = randomize(Llama(args), seed=3).eval()
    model.save_pretrained(str(tmp_path))
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    torch.testing.assert_close(model(TOKENS), hf_logits(hf.eval(), TOKENS), atol=1e-5, rtol=1e-5)


def test_loading_with_dtype_bfloat16_gives_bfloat16_parameters(hf_model):
    model = Llama.from_pretrained(hf_model("gqa")[1], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bfloat16_logits_are_as_close_to_float32_as_transformers_own_bfloat16(hf_model):
    hf, path = hf_model("llama3_scaling")
    exact = hf_logits(hf, TOKENS)  # float32
    ours = Llama.from_pretrained(path, dtype=torch.bfloat16)(TOKENS)
    hf16 = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    # on the CPU our bf16 model attends in float32 (model.attend), so it lands nearer the float32
    # logits than transformers' bf16 SDPA path, which rounds the attention to bf16
    ours_err, hf_err = (ours - exact).abs().max().item(), (hf_logits(hf16, TOKENS) - exact).abs().max().item()
    print(f"max |bf16 - float32| logit: ours {ours_err:.4f}, transformers {hf_err:.4f}")
    assert ours_err <= hf_err


def test_cpu_bf16_attention_runs_in_float32_even_under_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    with torch.autocast("cpu", torch.bfloat16):  # autocast alone would cast float32 inputs back to bf16
        y = attend(q, k, v)
    assert y.dtype == torch.bfloat16 and torch.equal(y, exact.to(torch.bfloat16))


def test_a_bfloat16_checkpoint_loads_as_bfloat16_by_default(hf_model, tmp_path):
    hf16 = LlamaForCausalLM.from_pretrained(hf_model("gqa")[1], dtype=torch.bfloat16)
    hf16.save_pretrained(tmp_path)  # config.json now says dtype bfloat16
    assert Llama.from_pretrained(str(tmp_path)).embed_tokens.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- KV cache
def greedy(model, prompt, n):
    """Reference: recompute the whole sequence for every new token, no cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def greedy_cached(model, cache, slot, prompt, n):
    """Prefill the prompt into the slot, then feed back one token at a time; the last token
    returned has not been fed, so the slot holds prompt + all but the last."""
    logits = model.step(torch.tensor([prompt]), cache, [slot], last_only=True)
    out = [int(logits[0].argmax())]
    while len(out) < n:
        logits = model.step(torch.tensor([out[-1:]]), cache, [slot], last_only=True)
        out.append(int(logits[0].argmax()))
    return out


def right_padded(rows, pad=0):
    T = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (T - len(r)) for r in rows])


def test_cached_greedy_decoding_equals_uncached_token_for_token(ours):
    cache = KVCache(OUR_ARGS, n_slots=1, max_len=64)
    prompt = [1, 17, 42, 99, 3]
    assert greedy_cached(ours, cache, cache.alloc(), prompt, 20) == greedy(ours, prompt, 20)


def test_a_multi_token_append_after_prefill_matches_uncached(ours):
    cache = KVCache(OUR_ARGS, n_slots=1, max_len=64)
    slot, prompt, chunk = cache.alloc(), [1, 17, 42, 99, 3], [50, 51, 52, 53]
    head = greedy_cached(ours, cache, slot, prompt, 3)  # prefill, then 3 tokens (the last not fed)
    seq = prompt + head + chunk  # e.g. a child's answer spliced into its parent (Re-Tuning Sec. 3)
    logits = ours.step(torch.tensor([head[-1:] + chunk]), cache, [slot])  # 5 tokens in one call
    torch.testing.assert_close(logits, ours(torch.tensor([seq]))[:, -5:], atol=1e-5, rtol=1e-5)
    out = [int(logits[0, -1].argmax())]
    for _ in range(7):
        out.append(int(ours.step(torch.tensor([out[-1:]]), cache, [slot], last_only=True)[0].argmax()))
    assert out == greedy(ours, seq, 8)


def test_rows_of_different_lengths_decode_as_if_each_were_alone(ours):
    cache = KVCache(OUR_ARGS, n_slots=3, max_len=64)
    prompts = [[1, 5, 9], [1, 60, 61, 62, 63, 64, 65], [1, 30, 31, 32, 33]]
    slots = [cache.alloc() for _ in prompts][::-1]  # rows need not be in slot order
    logits = ours.step(right_padded(prompts), cache, slots, n_new=[len(p) for p in prompts], last_only=True)
    outs = [[] for _ in prompts]
    for _ in range(10):
        for out, row in zip(outs, logits):
            out.append(int(row.argmax()))
        logits = ours.step(torch.tensor([out[-1:] for out in outs]), cache, slots, n_new=[1, 1, 1], last_only=True)
    assert outs == [greedy(ours, p, 10) for p in prompts]


def test_a_prefill_can_share_one_call_with_another_rows_decode_step(ours):
    cache = KVCache(OUR_ARGS, n_slots=2, max_len=64)
    parent, child = cache.alloc(), cache.alloc()
    p_prompt, c_prompt = [1, 17, 42, 99, 3], [1, 30, 31, 32, 33, 34]
    p_out = greedy_cached(ours, cache, parent, p_prompt, 2)  # parent is mid-decode
    logits = ours.step(right_padded([p_out[-1:], c_prompt]), cache, [parent, child], n_new=[1, 6], last_only=True)
    outs = [p_out, []]
    for _ in range(6):
        for out, row in zip(outs, logits):
            out.append(int(row.argmax()))
        logits = ours.step(torch.tensor([out[-1:] for out in outs]), cache, [parent, child], n_new=[1, 1], last_only=True)
    assert outs == [greedy(ours, p_prompt, 8), greedy(ours, c_prompt, 6)]


def test_a_row_near_max_len_can_share_a_call_with_a_longer_prefill(ours):
    cache = KVCache(OUR_ARGS, n_slots=2, max_len=16)
    parent, child = cache.alloc(), cache.alloc()
    p_prompt, c_prompt = list(range(1, 15)), [1, 30, 31, 32, 33, 34]
    p_next = greedy_cached(ours, cache, parent, p_prompt, 1)  # parent holds 14 of 16 positions
    # the parent's row has 5 padding tokens that would land past max_len: never written or counted
    logits = ours.step(right_padded([p_next, c_prompt]), cache, [parent, child], n_new=[1, 6], last_only=True)
    assert [int(r.argmax()) for r in logits] == [greedy(ours, p_prompt, 2)[1], greedy(ours, c_prompt, 1)[0]]


def test_the_page_storage_grows_past_its_initial_size_and_keeps_live_slots(ours):
    cache = KVCache(OUR_ARGS, n_slots=1, max_len=64, page_size=4)  # 3 pages of 4 positions at first
    prompts = [[1, 17, 42, 99, 3], [1, 8], [1, 30, 31, 32]]
    a = cache.alloc()
    first = ours.step(torch.tensor([prompts[0]]), cache, [a], last_only=True)  # a holds a prefix before growth
    b, c = cache.alloc(), cache.alloc()
    assert len({a, b, c}) == 3 and cache.in_use() == 3
    rest = ours.step(right_padded(prompts[1:]), cache, [b, c], n_new=[2, 4], last_only=True)
    assert cache.k.shape[1] > 3  # a and b took the two free pages: c's prefill doubled the storage
    # continue all three (growing again): slot a's keys and values survived every reallocation
    logits, outs = torch.cat([first, rest]), [[], [], []]
    for _ in range(6):
        for out, row in zip(outs, logits):
            out.append(int(row.argmax()))
        logits = ours.step(torch.tensor([out[-1:] for out in outs]), cache, [a, b, c], n_new=[1, 1, 1], last_only=True)
    assert outs == [greedy(ours, p, 6) for p in prompts] and cache.k.shape[1] > 6


def test_a_released_slot_is_reused_and_starts_empty(ours):
    cache = KVCache(OUR_ARGS, n_slots=2, max_len=64)
    slot = cache.alloc()
    greedy_cached(ours, cache, slot, list(range(1, 13)), 4)  # fills positions 0..14
    cache.release(slot)
    assert cache.in_use() == 0
    again = cache.alloc()
    assert again == slot and cache.length[again] == 0
    # the stale keys at positions past the new prefix must be neither seen nor kept
    assert greedy_cached(ours, cache, again, [1, 5, 9], 8) == greedy(ours, [1, 5, 9], 8)


class Counted(KVCache):
    """Counts the prefixes read from the pages (the kept rows' point is to read fewer)."""
    n_gathered = 0

    def gathered(self, *args):
        self.n_gathered += 1
        return super().gathered(*args)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float32, torch.bfloat16)])
def test_kept_decoding_rows_give_bit_for_bit_the_logits_of_gathering_every_step(ours, dtype, cache_dtype):
    """Rows decoding step after step, a context closing and its slot reused by a new one, a row
    leaving, rows outgrowing their storage: keeping the decoding rows' prefixes must change no
    logit, only how often the pages are read (also with a cache narrower than the model)."""
    model = copy.deepcopy(ours).to(dtype)
    caches = [Counted(OUR_ARGS, 2, 64, dtype=cache_dtype, keep_rows=keep) for keep in (True, False)]
    logits = [[], []]
    for cache, out in zip(caches, logits):
        g = torch.Generator().manual_seed(0)  # the same tokens for both
        cache.room = 3  # outgrown every few steps
        slots = [cache.alloc() for _ in range(3)]
        script = [([5, 3, 7], slots)] + [([1, 1, 1], slots)] * 6  # prefill, then all three decode
        script += [([1, 4, 1], "reuse 1")] + [([1, 1, 1], None)] * 5 + [([1, 1], "drop 0")] + [([1, 1], None)] * 4
        for n_new, event in script:
            if event == "reuse 1":  # the context in slot 1 returned; a new one opens in the same slot
                cache.release(slots[1])
                assert cache.alloc() == slots[1]
            elif event == "drop 0":
                slots = slots[1:]
            x = torch.randint(0, 100, (len(n_new), max(n_new)), generator=g)
            out.append(model.step(x, cache, slots, n_new, last_only=True))
    assert all(torch.equal(a, b) for a, b in zip(*logits))
    assert caches[0].n_gathered < 0.6 * caches[1].n_gathered  # 40 of 76 here: kept rows are read far less


def test_position_ids_0_1_2_change_nothing_and_a_slots_own_ids_give_the_uncached_logits(ours):
    x = TOKENS[:, :12]
    assert torch.equal(ours(x, positions=torch.arange(12).expand(2, 12)), ours(x))
    own = torch.tensor([0, 3, 4, 9, 17, 18, 30, 31, 40, 41, 55, 60])  # a slot's own position ids (positions.py: stretched at test)
    want = ours(x[:1], positions=own[None])
    cache = KVCache(OUR_ARGS, 1, 16)
    slot = cache.alloc(own)
    got = torch.cat([ours.step(x[:1, :5], cache, [slot], [5]), ours.step(x[:1, 5:], cache, [slot], [7])], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, ours(x[:1]), atol=1e-2)  # the ids are really used


def test_logits_at_selected_positions_equal_the_full_logits_there(ours):
    """`select` (training) and `last_only` (decoding) run the last block's MLP and the output layer
    on those positions alone; what they return must be the full forward's rows."""
    x = torch.randint(0, OUR_ARGS.vocab_size, (3, 11), generator=torch.Generator().manual_seed(2))
    select = torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) < 0.4
    full = ours(x)
    torch.testing.assert_close(ours(x, select=select), full[select], atol=1e-5, rtol=1e-5)
    cache = KVCache(OUR_ARGS, 3, 32)
    slots = [cache.alloc() for _ in range(3)]
    last = ours.step(x, cache, slots, n_new=[11, 7, 4], last_only=True)
    torch.testing.assert_close(last, full[[0, 1, 2], [10, 6, 3]], atol=1e-5, rtol=1e-5)


def test_writing_past_max_len_raises_instead_of_wrapping(ours):
    cache = KVCache(OUR_ARGS, n_slots=1, max_len=8)
    with pytest.raises(ValueError, match="KV cache overflow"):
        ours.step(torch.tensor([list(range(1, 10))]), cache, [cache.alloc()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_cached_ragged_decoding_matches_the_cpu_logits():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=101)
    cpu = Llama(args).eval()
    cpu.init_weights(0)
    gpu = Llama(args).eval().to("cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = KVCache(args, 2, 16, device="cuda")
    slots = [cache.alloc(), cache.alloc()]
    with torch.no_grad():
        got = gpu.step(x.cuda(), cache, slots, [9, 5])
        want = cpu(x)
    torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :5].cpu(), cpu(x[1:, :5])[0], atol=1e-4, rtol=1e-4)
