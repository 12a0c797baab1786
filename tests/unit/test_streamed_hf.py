"""The pieces of issue 12's model-side memory work, in one process: the planned safetensors writer against
safetensors' own save_file, save_hf_stream against save_hf, the initialisation against the algorithm it
replaced, and the HF load from a bf16, padded-vocabulary checkpoint."""

from __future__ import annotations

import dataclasses
import filecmp
import math
import os
from pathlib import Path

import pytest
import torch

from checkpoint_convert.hf import hf_layout, load_hf_weights, save_hf, save_hf_stream, to_hf_state_dict
from checkpoint_convert.safetensors_files import PlannedShardWriter, ShardWriter
from trainer.config import ModelConfig
from trainer.model import GPTModel
from trainer.model.gpt import VOCAB_PARAMS
from trainer.model.init import normal_like

CFG = ModelConfig(vocab_size=100, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                  num_query_groups=2)
VARIANTS = {
    "llama": {},
    "tied": {"tie_word_embeddings": True},
    "qwen2-bias": {"family": "qwen2", "add_qkv_bias": True},
    "qwen3-head-dim": {"family": "qwen3", "qk_layernorm": True, "kv_channels": 12},
}


def _same_dirs(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for f in os.listdir(a):
        assert filecmp.cmp(a / f, b / f, shallow=False), f


@pytest.mark.parametrize("max_bytes", [10**9, 64, 1])
def test_planned_writer_writes_save_files_bytes(tmp_path, max_bytes):
    """Every dtype order, an empty tensor, names that sort differently from arrival; one shard, several, one
    per tensor: the same files as ShardWriter (safetensors' save_file), tensors given in reverse order."""
    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(3, 2, generator=g).bfloat16(), "a": torch.randn(5, generator=g),
               "z": torch.arange(2), "c.x": torch.randn(1, generator=g).half(), "layers.10.x": torch.randn(4, 4),
               "layers.2.x": torch.randn(40, generator=g), "e": torch.zeros(0), "f": torch.ones(7, dtype=torch.float64),
               "g": torch.tensor([True, False]), "h": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    old = ShardWriter(tmp_path / "a", max_bytes)
    for n, t in tensors.items():
        old.add(n, t)
    old.finish()
    new = PlannedShardWriter(tmp_path / "b", {n: (t.shape, t.dtype) for n, t in tensors.items()}, max_bytes)
    for n, t in reversed(tensors.items()):
        new.add(n, t)
    new.finish()
    _same_dirs(tmp_path / "a", tmp_path / "b")


def test_planned_writer_refuses_what_was_not_planned(tmp_path):
    w = PlannedShardWriter(tmp_path, {"a": (torch.Size([2]), torch.float32)}, 100)
    with pytest.raises(ValueError, match=r"a: got \[3\] torch.float32, planned \[2\]"):
        w.add("a", torch.zeros(3))
    with pytest.raises(KeyError, match="b is not planned"):
        w.add("b", torch.zeros(2))
    with pytest.raises(ValueError, match="export ended before these tensors arrived"):
        w.finish()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_save_hf_stream_equals_save_hf(tmp_path, variant, dtype):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    model = GPTModel(cfg, padded_vocab_size=112, seed=3)
    state = model.state_dict()
    layout = {n: (t.shape, t.dtype) for n, t in state.items()}
    save_hf(state, cfg, tmp_path / "old", dtype=dtype, max_shard_bytes=9000, config_overrides={"eos_token_id": 2})
    save_hf_stream(iter(state.items()), layout, cfg, tmp_path / "new", dtype=dtype, max_shard_bytes=9000,
                   config_overrides={"eos_token_id": 2})
    assert (tmp_path / "old" / "model.safetensors.index.json").exists()
    _same_dirs(tmp_path / "old", tmp_path / "new")
    planned = hf_layout(layout, cfg, dtype)
    assert {n: (t.shape, t.dtype) for n, t in to_hf_state_dict(state, cfg, dtype).items()} == planned


def test_save_hf_stream_refuses_a_tensor_of_another_shape(tmp_path):
    state = GPTModel(CFG).state_dict()
    layout = {n: (t.shape, t.dtype) for n, t in state.items()}
    bad = [(n, t[:1] if n == "decoder.final_layernorm.weight" else t) for n, t in state.items()]
    with pytest.raises(ValueError, match=r"decoder.final_layernorm.weight \[1\]; the model's layout has \[32\]"):
        save_hf_stream(iter(bad), layout, CFG, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # staged: nothing that looks complete
    with pytest.raises(ValueError, match="export ended before"):
        save_hf_stream(iter(list(state.items())[:-1]), layout, CFG, tmp_path / "out")


def _reference_init(model: GPTModel, seed: int) -> dict[str, torch.Tensor]:
    """The algorithm init_weights replaced: every tensor drawn whole, padded vocabulary rows concatenated."""
    cfg = model.config
    std, out = cfg.init_std, {}
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            out[name] = torch.ones(p.shape)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(p.shape)
        elif name in VOCAB_PARAMS:
            source = VOCAB_PARAMS[0] if cfg.tie_word_embeddings else name
            real = normal_like((cfg.vocab_size, *p.shape[1:]), std, seed, source, p.device)
            out[name] = torch.cat([real, real.new_zeros(p.shape[0] - real.shape[0], *p.shape[1:])])
        else:
            proj = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
            out[name] = normal_like(tuple(p.shape), std / math.sqrt(2.0 * cfg.num_layers) if proj else std,
                                    seed, name, p.device)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_init_is_bitwise_the_previous_algorithm(variant):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    with torch.device("meta"):
        model = GPTModel(cfg, padded_vocab_size=104, seed=7)
    model.to_empty(device="cpu")
    model.init_weights(7)
    ref = _reference_init(model, 7)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[name]), name


def test_load_bf16_checkpoint_into_padded_vocab(tmp_path):
    """A bf16 checkpoint read by slices (whole, in one process) gives the same fp32 weights as reading each
    tensor whole and converting: padded rows zero, values upcast exactly."""
    src = GPTModel(CFG, padded_vocab_size=104, seed=1)
    save_hf(src, CFG, tmp_path / "ck", dtype=torch.bfloat16)
    dst = GPTModel(CFG, padded_vocab_size=104, seed=2)
    load_hf_weights(dst, tmp_path / "ck")
    for name, p in src.named_parameters():
        want = p.detach().bfloat16().float()
        if name in VOCAB_PARAMS:
            want[CFG.vocab_size:] = 0
        assert torch.equal(dict(dst.named_parameters())[name].detach(), want), name
