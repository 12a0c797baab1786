"""GPTModel loaded from tiny random HF checkpoints reproduces transformers' logits, and exports back bitwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_convert.hf import load_hf_weights, read_hf_config, save_hf
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.model import GPTModel
from tests.tiny_hf import randomized

transformers = pytest.importorskip("transformers")

SEQ = 12
SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _variants():
    T = transformers
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**SHAPE)),
        # Band edges at wavelengths 8 and 32 fall inside a head_dim-16 spectrum: all three bands are used.
        "llama3.1": (T.LlamaForCausalLM, T.LlamaConfig(**SHAPE, rope_parameters=llama3)),
        "llama-mqa": (T.LlamaForCausalLM, T.LlamaConfig(**{**SHAPE, "num_key_value_heads": 1})),
        "mistral-window": (T.MistralForCausalLM, T.MistralConfig(**SHAPE, sliding_window=5)),
        "qwen2-tied-bias": (T.Qwen2ForCausalLM, T.Qwen2Config(**SHAPE, tie_word_embeddings=True)),
        "qwen3-head-dim": (T.Qwen3ForCausalLM, T.Qwen3Config(**SHAPE, head_dim=24)),
    }


VARIANTS = list(_variants())


def _random_hf_model(name: str):
    return randomized(*_variants()[name])


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    # Second row starts mid-document: exercises explicit position_ids through rotary.
    pos = torch.stack([torch.arange(SEQ), torch.arange(SEQ) + 100])
    return ids, pos


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_and_export_is_bitwise(name, tmp_path):
    hf_model = _random_hf_model(name)
    src = tmp_path / "hf"
    # One variant saved in shards, so loading through model.safetensors.index.json is covered.
    hf_model.save_pretrained(src, max_shard_size="40KB" if name == "llama3.1" else "50GB")
    assert (src / "model.safetensors.index.json").exists() == (name == "llama3.1")

    cfg = read_hf_config(src)
    model = GPTModel(cfg).eval()
    load_hf_weights(model, src)

    ids, pos = _inputs(cfg.vocab_size)
    with torch.no_grad():
        for position_ids in (None, pos):
            ref = hf_model(input_ids=ids, position_ids=position_ids).logits
            ours = model(ids, position_ids)
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() <= 1e-4

    out = tmp_path / "export"
    save_hf(model, cfg, out, max_shard_bytes=30_000 if name == "qwen3-head-dim" else 10**9)
    assert (out / "model.safetensors.index.json").exists() == (name == "qwen3-head-dim")
    original, exported = _read_safetensors_dir(src), _read_safetensors_dir(out)
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    assert not list(tmp_path.glob(".export*")), "temporary export directory left behind"

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)


def test_sliding_window_is_active_in_mistral_variant():
    """Guards the mistral case above against silently testing full attention."""
    cls, config = _variants()["mistral-window"]
    assert config.sliding_window < SEQ


# -------------------------------------------------------------------------------- loading errors


def _tiny_export(tmp_path: Path, **overrides) -> tuple[ModelConfig, Path]:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=1, num_attention_heads=4,
                      num_query_groups=2, **overrides)
    torch.manual_seed(0)
    return cfg, save_hf(GPTModel(cfg), cfg, tmp_path / "ckpt")


def _rewrite(path: Path, edit) -> None:
    tensors = _read_safetensors_dir(path)
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_lm_head_is_an_error_that_says_so(tmp_path):
    cfg, path = _tiny_export(tmp_path)
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ConfigError, match="lm_head.weight is missing.*tie_word_embeddings=false"):
        load_hf_weights(GPTModel(cfg), path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    cfg, path = _tiny_export(tmp_path)
    wrong = dataclasses.replace(cfg, ffn_hidden_size=40)
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight \[48, 32\].*\[40, 32\]"):
        load_hf_weights(GPTModel(wrong), path)
    wrong_heads = dataclasses.replace(cfg, num_query_groups=1)
    with pytest.raises(ConfigError, match=r"k_proj.weight \[16, 32\]"):
        load_hf_weights(GPTModel(wrong_heads), path)


def test_unexpected_tensors_are_errors_but_rotary_buffers_are_ignored(tmp_path):
    cfg, path = _tiny_export(tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    load_hf_weights(GPTModel(cfg), path)
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(4)}))
    with pytest.raises(ConfigError, match="model.layers.0.extra.weight"):
        load_hf_weights(GPTModel(cfg), path)


def test_tied_export_has_no_lm_head_and_refuses_to_overwrite(tmp_path):
    cfg, path = _tiny_export(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in _read_safetensors_dir(path)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    model = GPTModel(cfg)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        save_hf(model, cfg, path)
    save_hf(model, cfg, path, overwrite=True, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in _read_safetensors_dir(path).values())
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def test_padded_vocabulary_loads_exports_and_keeps_logits(tmp_path):
    """Rows added for tensor parallelism are zero on load, -inf in the logits, and gone on export."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "in")
    cfg = read_hf_config(tmp_path / "in")
    model = GPTModel(cfg, padded_vocab_size=128)
    load_hf_weights(model, tmp_path / "in")
    assert model.embedding.word_embeddings.weight.shape[0] == 128
    assert torch.equal(model.output_layer.weight[100:], torch.zeros(28, 32))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert torch.isinf(ours[..., 100:]).all()
    torch.testing.assert_close(ours[..., :100], ref, rtol=0, atol=1e-4)
    labels = torch.randint(0, 100, (2, 7))
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(ce(ours.flatten(0, 1), labels.flatten()), ce(ref.flatten(0, 1), labels.flatten()))
    save_hf(model, cfg, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").shape[0] == 100
        assert f.get_tensor("model.embed_tokens.weight").shape[0] == 100
