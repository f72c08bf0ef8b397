"""LoRA (Hu et al. 2021), by composition: a wrapper that holds the frozen nn.Linear it adapts.

        x ──► base: frozen W (out × in) ─────────────────────────────┐
        │                                                            + ──► y
        └──► dropout ──► lora_A (r × in) ──► lora_B (out × r) ──► × alpha/r

lora_B starts at zero, so an adapted model computes exactly what its base does until the first
update. Re-Tuning fine-tunes LLaMA this way (paper Sec. 4: r=64, alpha=64, dropout 0.05 on
q, k, v, o). Adapters are saved alone, in PEFT's layout, so `peft.PeftModel.from_pretrained` puts
ours on a transformers model and ours loads theirs. One Dropout serves all of a model's adapters
and draws one mask per input tensor (q, k and v share theirs), cheaply: see Dropout.
"""
import math
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from checkpoint import atomic_write, hf_key, read_json_object, state_mismatches, write_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014) for LoRA's input, shared by all of a model's
    adapters, and drawn far cheaper on the CPU than nn.Dropout's.

    Shared: the mask is drawn once per input tensor, so q, k and v, which read the same input, get
    the same mask, and so do gate and up; as in loralib's MergedLinear (Hu et al.'s code), where
    one dropout feeds GPT-2's fused qkv. A call on a different tensor draws afresh, so sharing
    never depends on the call order (the same tensor again gets the same output: inside a model
    every forward computes new inputs). With LoRA on all seven projections that is 4 masks per
    layer instead of 7.
    Cheaper: bernoulli_ costs one generator call per element on the CPU, a large share of a small
    model's training step (docs/REFERENCE.md, "Training speed"). Here each 64-bit draw gives four
    elements 16 random bits each, and an element is dropped when they fall below p * 2^16: p is
    rounded to a multiple of 2^-16 (0.05 -> 0.0500031) and the kept ones are scaled by
    1 / (1 - that p). The default generator draws them, so a resumed run, or a recomputation under
    gradient checkpointing, gets the same masks.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        dropped = min(round(p * 2**16), 2**16 - 1)  # of the 2^16 values 16 bits can take; p < 1
        self.threshold = dropped - 2**15  # compared as int16, whose values start at -2^15
        self.scale = 2**16 / (2**16 - dropped)
        self.last = (None, None)  # (input, output) of the last call

    def forward(self, x):
        if not self.training or self.threshold == -2**15:  # nothing to drop: not even a copy
            self.last = (None, None)
            return x
        if x is not self.last[0]:
            n = x.numel()
            bits = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_(-2**63, None)  # all 64 bits
            keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
            self.last = (x, x * torch.where(keep, self.scale, 0.0))  # a float mask: no casts, forward or back
        return self.last[1]

    def __getstate__(self):  # a copy or a pickle of the model carries no activations
        return dict(self.__dict__, last=(None, None))

    def extra_repr(self):
        return f"p={self.p}"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: Dropout):
        super().__init__()
        self.base = base.requires_grad_(False)
        w = base.weight
        # nn.Linear, so the state-dict keys end in ".lora_A.weight" exactly as PEFT's do; kept in
        # float32 even on a bf16 base, so small updates are not rounded away by the optimizer
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=w.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # loralib / PEFT init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout = dropout  # one module for all of a model's adapters (see Dropout)
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return y
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # a bf16 base without autocast; under it the
            h = h.to(self.lora_A.weight.dtype)  # matmul casts for itself, and a float32 copy would be wasted
        u = self.lora_A(h)
        if u.dtype != y.dtype:  # a bf16 base without autocast: the update rounded, then added, as the
            # committed SmolLM2 runs were evaluated (a float32 sum changes some of their answers)
            return y + (self.lora_B(u) * self.scaling).to(y.dtype)
        # y + scaling * u B^T as one BLAS call (addmm: beta 1, alpha = scaling), not a matmul, a
        # scaling and a sum over the whole output
        return torch.addmm(y.flatten(0, -2), u.flatten(0, -2), self.lora_B.weight.t(), alpha=self.scaling).view(y.shape)

    def delta(self) -> torch.Tensor:
        # in float32 whatever the weights' dtype: B @ A rounded to bf16 then added loses the update
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight; a second call does nothing."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta()).to(w.dtype))
            self.merged = False


def apply_lora(model: nn.Module, r=64, alpha=64, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Wrap every nn.Linear whose name ends in one of `targets`; freeze everything else."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {TARGETS}")
    model.requires_grad_(False)
    wrapped = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    shared = Dropout(dropout)
    for name, linear in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, r, alpha, shared))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets)}
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()
    return model


def lora_state(model) -> dict:
    """The adapter alone (loralib's `'lora_' in k` filter)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def save_adapter(model, path, base_name=""):
    """adapter_model.safetensors + adapter_config.json, keys as PEFT writes them."""
    os.makedirs(path, exist_ok=True)
    state = {"base_model.model." + hf_key(k): v.detach().contiguous() for k, v in lora_state(model).items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, **model.lora_config}
    atomic_write(os.path.join(path, "adapter_model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
    write_json(os.path.join(path, "adapter_config.json"), config)


def load_adapter(model, path):
    """Put a PEFT-layout adapter (ours or PEFT's) on `model`; strict about keys and shapes."""
    cfg = read_adapter_config(path)
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    if not lora_layers(model):
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), tuple(targets))
    # PEFT keys: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (".default" in memory)
    file = os.path.join(path, "adapter_model.safetensors")
    try:
        theirs = load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors file ({e})") from None
    state = {k.removeprefix("base_model.model.").removeprefix("model.").replace(".default", ""): v
             for k, v in theirs.items()}
    problems = state_mismatches({k: v.shape for k, v in lora_state(model).items()}, state)
    if problems:
        raise ValueError(f"{path}: adapter does not fit the model: " + "; ".join(problems[:5]))
    model.load_state_dict(state, strict=False)  # strictness checked above: base weights stay
    return model


def read_adapter_config(path) -> dict:
    """adapter_config.json, refused with one line naming what is missing or unsupported."""
    file = os.path.join(path, "adapter_config.json")
    cfg = read_json_object(file)
    missing = [repr(k) for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise ValueError(f"{file}: missing {', '.join(missing)}")
    if not (type(cfg["r"]) is int and cfg["r"] >= 1 and isinstance(cfg["lora_alpha"], (int, float))):
        raise ValueError(f"{file}: 'r' must be a whole number >= 1 and 'lora_alpha' a number")
    for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{path}: unsupported adapter setting {key}={cfg[key]!r}")
    return cfg
