"""config.json <-> ModelConfig for both HF config generations, and the errors for what is unsupported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import transformers

from checkpoint_convert.hf import hf_config_dict, model_config_from_hf, read_hf_config
from checkpoint_convert.models.registry import family_for_hf, table_for
from trainer.config import ModelConfig, RopeScalingConfig
from trainer.errors import ConfigError

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


def _write(dir_: Path, config: dict) -> Path:
    dir_.mkdir()
    (dir_ / "config.json").write_text(json.dumps(config))
    return dir_


def _save_new(dir_: Path, config: transformers.PreTrainedConfig) -> Path:
    config.save_pretrained(dir_)  # whatever the installed transformers (5.x) writes
    return dir_


def _read(dir_: Path) -> ModelConfig:
    return dataclasses.replace(read_hf_config(dir_, base=ModelConfig(name="m")), hf_path=None)


def test_llama31_both_generations_agree(tmp_path):
    new = _save_new(tmp_path / "new", transformers.LlamaConfig(
        **SHAPE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}))
    assert "rope_parameters" in json.loads((new / "config.json").read_text())
    old = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", **SHAPE,
           "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3},
           "tie_word_embeddings": False, "transformers_version": "4.43.0"}
    older = {**old, "rope_scaling": {"type": "llama3", **LLAMA3}}  # pre-4.45 key name
    cfg = _read(new)
    assert cfg == _read(_write(tmp_path / "old", old)) == _read(_write(tmp_path / "older", older))
    assert cfg.family == "llama" and cfg.name == "m"
    assert cfg.rotary_base == 500000.0
    assert cfg.rope_scaling == RopeScalingConfig(original_max_position_embeddings=1024)
    assert (cfg.num_query_groups, cfg.norm_epsilon, cfg.kv_channels) == (2, 1e-5, None)


def test_default_rope_both_generations_agree(tmp_path):
    new = _save_new(tmp_path / "new", transformers.MistralConfig(**SHAPE, sliding_window=256))
    old = {"model_type": "mistral", **SHAPE, "rope_theta": 10000.0, "sliding_window": 256}
    cfg = _read(new)
    assert cfg == _read(_write(tmp_path / "old", old))
    assert (cfg.family, cfg.rope_scaling, cfg.sliding_window) == ("mistral", None, 256)
    null_window = _read(_write(tmp_path / "null", {**old, "sliding_window": None}))
    assert null_window.sliding_window is None


def test_qwen2_bias_tie_and_disabled_window(tmp_path):
    new = _save_new(tmp_path / "new", transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True))
    # Qwen2.5 config.json as written by transformers 4.x: no attention_bias key, window switched off.
    old = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SHAPE, "rope_theta": 10000.0,
           "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
           "tie_word_embeddings": True, "hidden_act": "silu"}
    cfg = _read(new)
    assert cfg == _read(_write(tmp_path / "old", old))
    assert (cfg.add_qkv_bias, cfg.tie_word_embeddings, cfg.sliding_window) == (True, True, None)


def test_qwen3_head_dim_and_qk_norm(tmp_path):
    cfg = _read(_save_new(tmp_path / "q3", transformers.Qwen3Config(**SHAPE, head_dim=16)))
    assert (cfg.family, cfg.kv_channels, cfg.head_dim, cfg.qk_layernorm, cfg.add_qkv_bias) == (
        "qwen3", 16, 16, True, False)


def test_family_found_by_architectures_when_model_type_missing():
    assert family_for_hf(None, ["Qwen3ForCausalLM"]).name == "qwen3"
    assert table_for("mistral").rules == table_for("llama").rules


@pytest.mark.parametrize("cfg", [
    ModelConfig(family="llama", rope_scaling=RopeScalingConfig(), tie_word_embeddings=True),
    ModelConfig(family="mistral", sliding_window=64, num_query_groups=4),
    ModelConfig(family="qwen2", add_qkv_bias=True, sliding_window=128),
    ModelConfig(family="qwen3", qk_layernorm=True, kv_channels=48, num_query_groups=1),
])
def test_hf_config_dict_round_trips_and_loads_in_transformers(cfg):
    d = hf_config_dict(cfg)
    assert d["architectures"] == [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]]
    assert "rope_parameters" in d and "rope_theta" in d["rope_parameters"]
    assert model_config_from_hf(d, base=ModelConfig()) == cfg
    hf = transformers.AutoConfig.for_model(**d)
    assert (hf.num_key_value_heads, hf.head_dim) == (cfg.num_query_groups, cfg.head_dim)


# ---------------------------------------------------------------------------------------- errors

BASE = {"model_type": "llama", **SHAPE}


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "model_type": "gemma"}, r"model_type='gemma' is not supported.*'llama'"),
    ({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn' is not supported.*llama3"),
    ({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, r"'linear'"),
    ({**BASE, "hidden_act": "gelu"}, r"hidden_act='gelu' is not supported.*silu"),
    ({**BASE, "attention_bias": True}, r"attention_bias=true is not supported for llama"),
    ({**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     r"mixes full and sliding-window layers"),
])
def test_unsupported_configs_name_the_value(raw, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf(raw)


def test_hf_config_rejects_flags_the_family_lacks():
    with pytest.raises(ConfigError, match="qwen2 has qkv bias"):
        hf_config_dict(ModelConfig(family="llama", add_qkv_bias=True))
    with pytest.raises(ConfigError, match="sliding_window=8 cannot be written"):
        hf_config_dict(ModelConfig(family="llama", sliding_window=8))
