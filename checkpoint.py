"""Checkpoint folders on disk: a Hugging Face Llama (config.json + safetensors), its tokenizer,
and the atomic writes every file of this project goes through.

Loading is a strict, shape-checked copy: every missing, unexpected or wrongly shaped tensor and
every unsupported config setting is named in one CheckpointError, never skipped (a partial load
gives a model that runs and is wrong). The model is built on the meta device and each tensor is
assigned as it is read, cast to its final dtype on its final device, so host memory peaks at about
one copy of the weights (bench/load_memory.py). What we write, transformers loads
(tests/test_model.py), in either of its config layouts (v4: rope_theta, rope_scaling, torch_dtype;
v5: rope_parameters, dtype).
"""
import json
import os
from typing import Optional

import sentencepiece as spm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import Llama, ModelArgs, rope_inv_freq


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be loaded; the message names what is wrong."""


# ----------------------------------------------------------------------------- files
def atomic_write(path, write):
    """Write a temporary file, flush it to the disk, rename it over `path`: a crash (or a power cut)
    leaves the old file or the new one, never half of one. A failed write leaves no temporary."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # disk full, a file-size limit (torch.save says RuntimeError)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short (a full disk or a file-size limit?)"
            raise OSError(f"could not write {path}: {reason}; the previous version, if any, is intact") from None
        raise
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def write_json(path, obj):
    atomic_write(path, lambda f: write_text(f, json.dumps(obj, indent=2)))


def read_json_object(path) -> dict:
    """A JSON file that must hold an object (a config), refused with one line naming the file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------- config.json
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "vocab_size", "max_position_embeddings")
DTYPES = ("float32", "float16", "bfloat16")  # what the weights may be stored and computed in


def args_from_hf(cfg: dict) -> ModelArgs:
    """Explicit mapping from a transformers config.json (v4 or v5 layout)."""
    bad = [k for k in SIZES if cfg.get(k) is not None and not (type(cfg[k]) is int and cfg[k] >= 1)]
    if bad:
        raise CheckpointError(f"config.json: {bad[0]} must be a whole number >= 1, got {cfg[bad[0]]!r}")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"config.json: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    for key, bad in (("attention_bias", True), ("mlp_bias", True)):
        if cfg.get(key, False) == bad:
            raise CheckpointError(f"config.json: unsupported setting {key}={bad}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: unsupported setting hidden_act={cfg['hidden_act']!r}")
    # v5 keeps theta and scaling together in rope_parameters; v4 has rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in rope:  # older v4 spelling of rope_type
        rope["rope_type"] = rope.pop("type")
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("config.json: unsupported setting partial_rotary_factor")
    eos = cfg.get("eos_token_id", 2)
    try:
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"), hidden_dim=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_id=cfg.get("bos_token_id", 1), eos_id=eos[0] if isinstance(eos, list) else eos,
            dtype=dtype)
    except KeyError as e:
        raise CheckpointError(f"config.json: missing key {e.args[0]!r}") from None
    except ValueError as e:  # ModelArgs' own checks (head counts, RoPE type): a bad checkpoint here
        raise CheckpointError(str(e)) from None


def args_to_hf(args: ModelArgs) -> dict:
    rope = {"rope_type": "default", **(args.rope_scaling or {}), "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_id, "eos_token_id": args.eos_id,
        "attention_bias": False, "mlp_bias": False,
        # Both spellings, so transformers v4 (rope_theta/rope_scaling/torch_dtype) and v5
        # (rope_parameters/dtype) read the same model.
        "rope_theta": args.rope_theta, "rope_scaling": rope if args.rope_scaling else None,
        "rope_parameters": rope, "dtype": args.dtype, "torch_dtype": args.dtype,
    }


def read_args(path) -> ModelArgs:
    """The ModelArgs of a checkpoint folder's config.json."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{path}: no config.json")
    return args_from_hf(read_json_object(cfg_file))


# ----------------------------------------------------------------------------- weights
def load_llama(path, dtype=None, device=None) -> Llama:
    """Load config.json + model.safetensors (or shards + index) strictly, one tensor at a time."""
    args = read_args(path)
    dtype = dtype or getattr(torch, args.dtype)
    with torch.device("meta"):  # no memory until real tensors are assigned
        model = Llama(args)
    state = read_safetensors(path, device or "cpu", dtype)
    if args.tie_word_embeddings and "lm_head.weight" in state:  # some exporters store the tied copy too
        head, emb = state.pop("lm_head.weight"), state.get("embed_tokens.weight")
        if emb is None or not torch.equal(head, emb):
            raise CheckpointError(f"{path}: tie_word_embeddings is set but lm_head.weight differs from the embeddings")
    check_state(model, state, path)
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:  # assign=True replaced both parameters: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device or "cpu")
    return model


def save_llama(model: Llama, path):
    """Write config.json + model.safetensors in the layout transformers loads."""
    os.makedirs(path, exist_ok=True)
    state = {hf_key(k): v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.args.tie_word_embeddings and k == "lm_head.weight")}
    if any("lora" in k for k in state):
        raise ValueError("save_pretrained: model has LoRA layers; merge them or use lora.save_adapter")
    cfg = {**args_to_hf(model.args), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    cfg["torch_dtype"] = cfg["dtype"]
    atomic_write(os.path.join(path, "model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
    write_json(os.path.join(path, "config.json"), cfg)


def hf_key(name: str) -> str:
    """Our parameter name -> the Hugging Face key: everything but the LM head lives under "model."."""
    return name if name.startswith("lm_head") else "model." + name


def read_safetensors(path, device, dtype) -> dict:
    """All tensors of a single-file or sharded checkpoint, keyed by our names, each cast on load."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            if not all(isinstance(n, str) for n in files):
                raise TypeError("shard names must be strings")
        except (ValueError, KeyError, AttributeError, TypeError) as e:  # bad JSON, no or odd weight_map
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        outside = [n for n in files if not inside(path, n)]
        if outside:
            raise CheckpointError(f"{index}: shard {outside[0]!r} is outside the checkpoint folder")
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        try:
            with safe_open(os.path.join(path, name), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    ours = key.removeprefix("model.")
                    state[ours] = f.get_tensor(key).to(dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{os.path.join(path, name)}: unreadable safetensors file ({e})") from None
    state.pop("rotary_emb.inv_freq", None)  # some exporters store the (recomputed) frequencies
    return state


def inside(folder, name) -> bool:
    """Whether folder/name stays inside folder (no absolute path, no ../, no link out)."""
    root = os.path.realpath(folder)
    return os.path.realpath(os.path.join(root, name)).startswith(root + os.sep)


def check_state(model: Llama, state: dict, path):
    """One error listing every missing, unexpected or wrongly shaped tensor."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    problems = state_mismatches(expected, state)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def state_mismatches(expected: dict, state: dict) -> list:
    """Missing, unexpected and wrongly shaped tensors of `state` against {name: shape}, by HF name."""
    problems = [f"missing tensor {hf_key(k)}" for k in expected if k not in state]
    problems += [f"unexpected tensor {hf_key(k)}" for k in state if k not in expected]
    problems += [f"tensor {hf_key(k)} has shape {tuple(state[k].shape)}, expected {tuple(s)}"
                 for k, s in expected.items() if k in state and state[k].shape != s]
    return problems


# ----------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """The checkpoint's own tokenizer; encode() adds no BOS/EOS (the token contract adds them).

    `tokenizer.model` is SentencePiece (Llama 1/2, Mistral); `tokenizer.json` is a Hugging Face
    `tokenizers` file (Llama 3, SmolLM, most checkpoints since 2024), whose BOS/EOS ids the
    checkpoint's config.json defines, so they are passed in.
    """

    def __init__(self, path, bos_id: Optional[int] = None, eos_id: Optional[int] = None):
        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        if path.endswith(".json"):
            from tokenizers import Tokenizer as HFTokenizer  # only needed for tokenizer.json checkpoints
            try:
                self.hf = HFTokenizer.from_file(path)
            except Exception as e:  # tokenizers raises its own Exception type for bad files
                raise CheckpointError(f"{path}: unreadable tokenizer.json ({str(e).splitlines()[0]})") from None
            if bos_id is None or eos_id is None:
                raise CheckpointError(f"{path}: tokenizer.json needs the BOS and EOS ids of the checkpoint's config.json")
            self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, self.hf.get_vocab_size()
            self.encode = lambda text: self.hf.encode(text, add_special_tokens=False).ids
            self.decode = lambda ids: self.hf.decode(list(ids), skip_special_tokens=False)
            return
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable SentencePiece model ({str(e).splitlines()[0]})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self.encode = self.sp.encode
        self.decode = lambda ids: self.sp.decode(list(ids))

    @classmethod
    def from_folder(cls, path) -> "Tokenizer":
        """The tokenizer of a checkpoint folder: tokenizer.model, else tokenizer.json."""
        file = tokenizer_file(path)
        if file.endswith(".model"):
            return cls(file)
        args = read_args(path)
        return cls(file, args.bos_id, args.eos_id)


def check_vocabulary(tok: Tokenizer, args: ModelArgs, where):
    """A token id past the embedding table would crash the first forward pass: refuse it up front."""
    if tok.vocab_size > args.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size} pieces but the model only {args.vocab_size} embeddings")


def tokenizer_file(path) -> str:
    """tokenizer.model (SentencePiece) or tokenizer.json (tokenizers) inside a checkpoint folder."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CheckpointError(f"{path}: no tokenizer.model or tokenizer.json")
