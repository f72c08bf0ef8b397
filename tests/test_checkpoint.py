"""Tests for checkpoint.py: every broken checkpoint named, the tokenizer against sentencepiece,
loading never writes. Run: python -m pytest tests/test_checkpoint.py -q"""
import importlib.resources
import json
import shutil

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from checkpoint import CheckpointError, Tokenizer
from model import Llama, ModelArgs


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=100))
    model.init_weights(0)
    path = str(tmp_path_factory.mktemp("good"))
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- bad checkpoints
def corrupt(good, tmp_path, edit_state=None, edit_config=None):
    shutil.copytree(good, tmp_path, dirs_exist_ok=True)
    if edit_state:
        state = load_file(tmp_path / "model.safetensors")
        edit_state(state)
        save_file(state, tmp_path / "model.safetensors")
    if edit_config:
        cfg = json.loads((tmp_path / "config.json").read_text())
        edit_config(cfg)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_a_missing_tensor_is_named(good_checkpoint, tmp_path):
    path = corrupt(good_checkpoint, tmp_path, edit_state=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        Llama.from_pretrained(path)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(good_checkpoint, tmp_path):
    path = corrupt(good_checkpoint, tmp_path, edit_state=lambda s: s.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight has shape \(63,\), expected \(64,\)"):
        Llama.from_pretrained(path)


def test_an_unexpected_tensor_is_named(good_checkpoint, tmp_path):
    extra = "model.layers.0.self_attn.q_proj.bias"
    path = corrupt(good_checkpoint, tmp_path, edit_state=lambda s: s.update({extra: torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {extra}"):
        Llama.from_pretrained(path)


def test_a_truncated_safetensors_file_is_reported_as_unreadable(good_checkpoint, tmp_path):
    path = corrupt(good_checkpoint, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        Llama.from_pretrained(path)


def test_a_missing_config_key_is_named(good_checkpoint, tmp_path):
    path = corrupt(good_checkpoint, tmp_path, edit_config=lambda c: c.pop("hidden_size"))
    with pytest.raises(CheckpointError, match="config.json: missing key 'hidden_size'"):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_an_unknown_rope_type_is_named(good_checkpoint, tmp_path, key):
    def edit(cfg):
        cfg.pop("rope_parameters")
        cfg[key] = {"rope_type": "magic", "factor": 2.0}
    path = corrupt(good_checkpoint, tmp_path, edit_config=edit)
    with pytest.raises(CheckpointError, match="unsupported rope type 'magic'"):
        Llama.from_pretrained(path)


def test_attention_bias_is_refused_by_name(good_checkpoint, tmp_path):
    path = corrupt(good_checkpoint, tmp_path, edit_config=lambda c: c.update(attention_bias=True))
    with pytest.raises(CheckpointError, match="unsupported setting attention_bias=True"):
        Llama.from_pretrained(path)


def test_a_directory_without_config_json_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Llama.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def spm_path():
    # the Llama-recipe SentencePiece model (byte fallback, split digits) that mistral-common ships
    pytest.importorskip("mistral_common")
    return str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")


TEXTS = ["Hello, world!", "  two leading spaces", "tabs\tand\nnewlines\n", "Ünïcödé — 日本語 🙂",
         "12 + 345 = 357", ""]


def test_tokenizer_encode_matches_sentencepiece(spm_path):
    tok, sp = Tokenizer(spm_path), spm.SentencePieceProcessor(model_file=spm_path)
    assert [tok.encode(t) for t in TEXTS] == [sp.encode(t) for t in TEXTS]


def test_tokenizer_decode_matches_sentencepiece(spm_path):
    tok, sp = Tokenizer(spm_path), spm.SentencePieceProcessor(model_file=spm_path)
    ids = [sp.encode(t) for t in TEXTS]
    assert [tok.decode(i) for i in ids] == [sp.decode(i) for i in ids]


def test_tokenizer_special_ids_match_sentencepiece_and_encode_adds_none(spm_path):
    tok, sp = Tokenizer(spm_path), spm.SentencePieceProcessor(model_file=spm_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())
    assert tok.bos_id not in tok.encode("hi") and tok.eos_id not in tok.encode("hi")


def test_every_digit_of_a_long_number_is_its_own_token(spm_path):
    tok = Tokenizer(spm_path)
    number = "31415926535897932384"
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode(f"x = {number}")]
    assert pieces[-len(number):] == list(number)


def test_changing_a_loaded_model_in_place_never_writes_to_its_checkpoint(tmp_path):
    """Loading may map the file's tensors lazily; training must still never touch the file."""
    model = Llama(ModelArgs(dim=32, n_layers=1, n_heads=2, hidden_dim=48, vocab_size=50))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    loaded = Llama.from_pretrained(tmp_path)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    assert (tmp_path / "model.safetensors").read_bytes() == before
