"""MoE models loaded from tiny random HF checkpoints (Qwen3-MoE with mixed dense and MoE layers and
norm_topk_prob both ways, Mixtral, Qwen2-MoE with its gated shared expert) reproduce transformers' logits on
both expert-GEMM paths, export back bitwise under the Hub's per-expert names, and their load-balancing loss
is transformers' where the two definitions agree."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from checkpoint_convert.hf import load_hf_weights, read_hf_config, save_hf
from tests.tiny_hf import MOE_VARIANTS, tiny_hf_model
from tests.unit.test_hf_parity import _inputs
from tests.unit.test_hf_parity import _read_safetensors_dir as _tensors
from trainer.model import GPTModel

transformers = pytest.importorskip("transformers")

EXPERT_NAMES = {  # one tensor per expert on the Hub, as save_pretrained writes them
    "qwen3-moe-mixed": "model.layers.1.mlp.experts.3.down_proj.weight",
    "qwen3-moe": "model.layers.0.mlp.experts.7.gate_proj.weight",
    "mixtral": "model.layers.1.block_sparse_moe.experts.0.w3.weight",
    "qwen2-moe-shared": "model.layers.1.mlp.shared_expert_gate.weight",
}


@pytest.mark.parametrize("name", list(MOE_VARIANTS))
def test_logits_match_transformers_and_export_is_bitwise(name, tmp_path):
    hf_model = tiny_hf_model(name)
    src = tmp_path / "hf"
    hf_model.save_pretrained(src, max_shard_size="60KB" if name == "mixtral" else "50GB")
    assert (src / "model.safetensors.index.json").exists() == (name == "mixtral")
    original = _tensors(src)
    assert EXPERT_NAMES[name] in original  # the Hub's names, not transformers 5's fused in-memory ones
    assert not any("gate_up_proj" in k for k in original)

    cfg = read_hf_config(src)
    if name == "qwen3-moe-mixed":
        assert cfg.moe.moe_layer_freq == [0, 1, 0, 0] and not cfg.moe.moe_router_pre_softmax
    ids, pos = _inputs(cfg.vocab_size)
    for grouped in (True, False):
        model = GPTModel(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, moe_grouped_gemm=grouped))).eval()
        load_hf_weights(model, src)
        with torch.no_grad():
            for position_ids in (None, pos):
                ref = hf_model(input_ids=ids, position_ids=position_ids).logits
                ours = model(ids, position_ids)
                assert (ours - ref).abs().max().item() <= 1e-4, (grouped, position_ids is None)

    out = tmp_path / "export"
    save_hf(model, cfg, out)
    exported = _tensors(out)
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    assert read_hf_config(out) == dataclasses.replace(cfg, name="export", hf_path=str(out))
    keys = json.loads((out / "config.json").read_text())
    assert keys["router_aux_loss_coef"] == 0.01 and keys["num_experts_per_tok"] == 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_aux_loss_is_transformers_with_one_row_and_one_moe_layer(tmp_path):
    """Qwen3-MoE with one MoE layer, one sequence: our per-row, per-layer switch loss is HF's aux_loss, and the
    coefficient comes from the checkpoint's router_aux_loss_coef."""
    hf_model = tiny_hf_model("qwen3-moe-mixed")
    hf_model.save_pretrained(tmp_path / "hf")
    cfg = read_hf_config(tmp_path / "hf")
    assert cfg.moe.aux_loss_coeff == 0.01
    model = GPTModel(cfg)
    load_hf_weights(model, tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, output_router_logits=True).aux_loss
        model.train()  # records router totals (nothing here is random in training mode)
        model(ids)
    E = cfg.moe.num_moe_experts
    ours = model.router_totals[0, E]  # the aux column of the one MoE layer, summed over the one row
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=0)
    assert torch.equal(model.router_totals[0, :E].sum(), torch.tensor(40.0 * 2, dtype=torch.float64))


def test_sliced_expert_reads_touch_only_the_part_asked_for(tmp_path, monkeypatch):
    """A rank holding experts 2..3 of 4 (and half their columns) reads only those slices of those experts."""
    import checkpoint_convert.hf as hf

    tiny_hf_model("mixtral").save_pretrained(tmp_path / "hf")
    cfg = read_hf_config(tmp_path / "hf")
    model = GPTModel(cfg)
    name = "decoder.layers.0.mlp.experts.linear_fc1_gate.weight"
    full = dict(model.named_parameters())[name]
    part = torch.empty(2, full.shape[1], full.shape[2] // 2)
    region = [(2, 4), (0, full.shape[1]), (full.shape[2] // 2, full.shape[2])]
    unit = next(u for u in hf.family(cfg.family).table.units([name], cfg))
    opened = []

    class Param:  # a sharded parameter as _load_stacked sees it: a global shape and a local part
        shape = full.shape

    monkeypatch.setattr(hf, "local_region", lambda p: region)
    monkeypatch.setattr(hf, "DTensor", Param)
    monkeypatch.setattr(Param, "to_local", lambda self: part, raising=False)
    from contextlib import ExitStack

    with ExitStack() as stack:
        ckpt = hf.SafetensorsDir(tmp_path / "hf", stack)
        get_slice = ckpt.get_slice
        ckpt.get_slice = lambda n: opened.append(n) or get_slice(n)
        hf._load_stacked(ckpt, unit, Param(), tmp_path / "hf")
    assert opened == ["model.layers.0.block_sparse_moe.experts.2.w1.weight",
                      "model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    tensors = _tensors(tmp_path / "hf")
    for e in (2, 3):
        assert torch.equal(part[e - 2], tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"][:, 32:])


def test_hub_config_json_and_what_hf_cannot_say(tmp_path):
    """config.json as the Hub has it (transformers 4.x keys: num_experts, top-level rope_theta) reads like the
    file transformers 5 writes (num_local_experts, rope_parameters); settings HF has no key for survive."""
    from checkpoint_convert.hf import hf_config_dict, model_config_from_hf
    from checkpoint_convert.hf_moe import sparse_step_keys
    from trainer.config import ModelConfig
    from trainer.errors import ConfigError
    from trainer.moe_config import MoEConfig

    hub = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
           "intermediate_size": 112, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
           "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "decoder_sparse_step": 2, "mlp_only_layers": [5], "norm_topk_prob": True, "vocab_size": 96,
           "router_aux_loss_coef": 0.001, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 256, "tie_word_embeddings": False, "transformers_version": "4.51.0"}
    base = ModelConfig(name="m", moe=MoEConfig(moe_z_loss_coeff=1e-3, moe_expert_capacity_factor=1.25))
    cfg = model_config_from_hf(hub, base)
    m = cfg.moe
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == (8, 2, 32)
    assert m.moe_layer_freq == [0, 1, 0, 1, 0, 0]
    assert (m.moe_aux_loss_coeff, m.moe_z_loss_coeff, m.moe_expert_capacity_factor) == (0.001, 1e-3, 1.25)
    assert cfg.rotary_base == 1e6 and cfg.qk_layernorm and cfg.ffn_hidden_size == 112
    written = hf_config_dict(cfg)
    assert (written["decoder_sparse_step"], written["mlp_only_layers"]) == (2, [5])
    assert model_config_from_hf(written, base) == cfg
    explicit = dataclasses.replace(base, moe=dataclasses.replace(base.moe, moe_aux_loss_coeff=0.05))
    assert model_config_from_hf(hub, explicit).moe.moe_aux_loss_coeff == 0.05  # the command line's wins
    assert sparse_step_keys([0, 0, 1, 0, 0, 1], 6) == (3, []) and sparse_step_keys(None, 4) == (1, [])

    mixtral = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "num_local_experts": 4,
               "num_experts_per_tok": 2, "router_jitter_noise": 0.01}
    with pytest.raises(ConfigError, match="router_jitter_noise=0.01 is not supported"):
        model_config_from_hf(mixtral)
    mixed = dataclasses.replace(model_config_from_hf({**mixtral, "router_jitter_noise": 0.0}),
                                moe=dataclasses.replace(cfg.moe, moe_layer_freq=[0, 1]))
    with pytest.raises(ConfigError, match=r"moe_layer_freq=\[0, 1\] has dense layers, which HF mixtral"):
        hf_config_dict(mixed)
    with pytest.raises(ConfigError, match="cannot be written as an HF llama config"):
        hf_config_dict(dataclasses.replace(mixed, family="llama"))
