"""HF <-> Megatron-LM for mixtures of experts, without a process group: bitwise round trips through both formats at
TP x PP x EP, the files' names and layout (SequentialMLP and TEGroupedMLP legacy names, mp_rank_TT[_PPP]_EEE, the
torch_dist keys), the MoE args, and refusals that write nothing. megatron-core loading and saving these files:
tests/distributed/test_megatron_moe.py. TEGroupedMLP cannot be built here (no Transformer Engine): its names are
checked against megatron-core's naming only (experts.linear_fc1.weight<e>, TE's GroupedLinear parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from checkpoint_convert.cli import main as convert_cli
from checkpoint_convert.hf import read_hf_config
from checkpoint_convert.megatron import hf_to_megatron, megatron_to_hf
from checkpoint_convert.megatron_dist import read_dcp_metadata
from checkpoint_convert.megatron_dist_read import megatron_dist_to_hf
from checkpoint_convert.megatron_dist_write import hf_to_megatron_dist
from checkpoint_convert.megatron_format import config_from_args
from tests.tiny_hf import save_tiny_hf
from tests.unit.test_hf_parity import _read_safetensors_dir
from trainer.errors import ConfigError

pytest.importorskip("transformers")

MOE = ("qwen3-moe", "mixtral", "qwen3-moe-mixed", "qwen2-moe-shared")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name in MOE + ("llama3.1",):
        save_tiny_hf(name, root / name)
    return root


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _same(a: Path, b: Path) -> None:
    original, returned = _read_safetensors_dir(a), _read_safetensors_dir(b)
    assert returned.keys() == original.keys(), set(returned) ^ set(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)
    ca, cb = read_hf_config(a), read_hf_config(b)
    assert dataclasses.replace(ca, name="", hf_path=None) == dataclasses.replace(cb, name="", hf_path=None)


@pytest.mark.parametrize("name,tp,pp,ep,spec", [("qwen3-moe", 1, 2, 2, "local"), ("mixtral", 2, 1, 2, "te"),
                                                ("qwen3-moe-mixed", 2, 2, 2, "local"),
                                                ("qwen2-moe-shared", 2, 1, 4, "local")])
def test_legacy_round_trip_is_bitwise_at_every_layout(hf_dirs, tmp_path, name, tp, pp, ep, spec):
    meg = hf_to_megatron(hf_dirs / name, tmp_path / "meg", tp=tp, pp=pp, ep=ep, spec=spec, progress=False)
    files = sorted(p.name for p in (meg / "release").iterdir())
    want = [f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") + f"_{e:03d}"
            for t in range(tp) for s in range(pp) for e in range(ep)]
    assert files == sorted(want)
    back = megatron_to_hf(meg, tmp_path / "back", progress=False)  # config.json rebuilt from the args alone
    _same(hf_dirs / name, back)


def test_sequential_experts_are_split_over_ep_and_tp_as_megatron_core_does(hf_dirs, tmp_path):
    """EP rank k holds experts [k E/EP, (k+1) E/EP) as local_experts.0..; each TP rank [gate_r; up_r] of an
    expert's fc1 and its fc2 columns; router, norms and the shared expert's gate replicated."""
    src = _read_safetensors_dir(hf_dirs / "qwen2-moe-shared")  # 4 experts of width 32, shared expert 48
    meg = hf_to_megatron(hf_dirs / "qwen2-moe-shared", tmp_path / "meg", tp=2, pp=1, ep=2, progress=False)
    ckpt = _load(meg / "release" / "mp_rank_01_001" / "model_optim_rng.pt")  # TP rank 1, EP rank 1
    model, layer = ckpt["model"], "decoder.layers.1.mlp"
    hf = "model.layers.1.mlp"
    gate, up = src[f"{hf}.experts.3.gate_proj.weight"], src[f"{hf}.experts.3.up_proj.weight"]
    assert torch.equal(model[f"{layer}.experts.local_experts.1.linear_fc1.weight"],
                       torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    assert torch.equal(model[f"{layer}.experts.local_experts.1.linear_fc2.weight"],
                       src[f"{hf}.experts.3.down_proj.weight"].chunk(2, dim=1)[1])
    assert torch.equal(model[f"{layer}.router.weight"], src[f"{hf}.gate.weight"])
    assert torch.equal(model[f"{layer}.shared_experts.gate_weight"], src[f"{hf}.shared_expert_gate.weight"])
    assert model[f"{layer}.shared_experts.linear_fc1.weight"].shape == (48, 64)
    assert model[f"{layer}.shared_experts.linear_fc2.weight"].shape == (64, 24)
    assert f"{layer}.experts.local_experts.2.linear_fc1.weight" not in model  # 2 experts per EP rank
    assert model[f"{layer}.experts.local_experts.0.linear_fc1._extra_state"] is None
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in model
    args = ckpt["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size, args.moe_shared_expert_intermediate_size,
            args.moe_shared_expert_gate, args.moe_router_pre_softmax) == (4, 2, 32, 48, True, True)
    assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size, args.moe_grouped_gemm,
            args.moe_token_dispatcher_type, args.moe_layer_freq) == (2, 2, False, "alltoall", 1)
    assert args.moe_aux_loss_coeff == pytest.approx(0.01 * 2)  # megatron-core's scale: HF's / top_k


def test_te_spec_writes_te_grouped_mlp_names(hf_dirs, tmp_path):
    """--spec te: TEGroupedMLP's `experts.linear_fc1.weight<e>` (local index), its one `_extra_state` per linear,
    the MoE layer's own pre_mlp_layernorm (TENorm: nothing to fuse it into) beside the fused input norm."""
    src = _read_safetensors_dir(hf_dirs / "mixtral")
    meg = hf_to_megatron(hf_dirs / "mixtral", tmp_path / "meg", tp=1, pp=1, ep=2, spec="te", progress=False)
    model = _load(meg / "release" / "mp_rank_00_001" / "model_optim_rng.pt")["model"]
    layer = "decoder.layers.0"
    assert sorted(k for k in model if k.startswith(f"{layer}.mlp.experts.")) == [
        f"{layer}.mlp.experts.linear_fc1._extra_state", f"{layer}.mlp.experts.linear_fc1.weight0",
        f"{layer}.mlp.experts.linear_fc1.weight1", f"{layer}.mlp.experts.linear_fc2._extra_state",
        f"{layer}.mlp.experts.linear_fc2.weight0", f"{layer}.mlp.experts.linear_fc2.weight1"]
    moe = "model.layers.0.block_sparse_moe.experts.3"
    assert torch.equal(model[f"{layer}.mlp.experts.linear_fc1.weight1"],
                       torch.cat([src[f"{moe}.w1.weight"], src[f"{moe}.w3.weight"]]))
    assert torch.equal(model[f"{layer}.mlp.experts.linear_fc2.weight1"], src[f"{moe}.w2.weight"])
    assert f"{layer}.pre_mlp_layernorm.weight" in model and f"{layer}.mlp.linear_fc1.layer_norm_weight" not in model
    assert f"{layer}.self_attention.linear_qkv.layer_norm_weight" in model
    assert _load(meg / "release" / "mp_rank_00_000" / "model_optim_rng.pt")["args"].moe_grouped_gemm is True


@pytest.mark.parametrize("name", MOE)
def test_torch_dist_round_trip_and_keys(hf_dirs, tmp_path, name):
    """Experts global [L, E, 2F, H] ([gate[e]; up[e]]) stacked over layers, or per layer `decoder.layers.N.` when
    dense and MoE layers mix (moe_layer_freq a list: megatron-core's non_homogeneous_layers)."""
    meg = hf_to_megatron_dist(hf_dirs / name, tmp_path / "meg", progress=False)
    entries = read_dcp_metadata(meg / "release").state_dict_metadata
    if name == "qwen3-moe-mixed":  # layer 1 is MoE, 0, 2, 3 dense
        assert list(entries["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].size) == [4, 64, 64]
        assert "decoder.layers.0.mlp.linear_fc1.weight" in entries and "decoder.layers.1.mlp.router.weight" in entries
        assert "decoder.layers.1.mlp.experts.experts.linear_fc2._extra_state/shard_3_4" in entries
        assert "decoder.layers.0.mlp.linear_fc1._extra_state/shard_0_1" in entries
    else:
        experts = {"qwen3-moe": 8, "mixtral": 4, "qwen2-moe-shared": 4}[name]
        width = {"mixtral": 112}.get(name, 32)
        assert list(entries["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == [2, experts, 2 * width, 64]
        assert list(entries["decoder.layers.mlp.router.weight"].size) == [2, experts, 64]
        key = "decoder.layers.mlp.experts.experts.linear_fc1._extra_state"
        assert f"{key}/shard_1.{experts - 1}_2.{experts}" in entries  # [layer, expert] of [L, E]
        assert not any(k.startswith("decoder.layers.mlp.linear_fc1.weight") for k in entries)
    assert ("decoder.layers.mlp.shared_experts.gate_weight" in entries) == (name == "qwen2-moe-shared")
    back = megatron_dist_to_hf(meg, tmp_path / "back", progress=False)
    _same(hf_dirs / name, back)


def test_megatron_lm_args_alone_give_the_family():
    """A Megatron-LM MoE checkpoint without meshtron's own keys: q/k norms -> Qwen3-MoE, a shared expert ->
    Qwen2-MoE, else Mixtral; Megatron's integer moe_layer_freq N means every N-th layer from layer 0."""
    base = dict(num_layers=4, hidden_size=64, ffn_hidden_size=112, num_attention_heads=4, num_query_groups=2,
                group_query_attention=True, kv_channels=16, max_position_embeddings=256, padded_vocab_size=128,
                normalization="RMSNorm", swiglu=True, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                moe_aux_loss_coeff=0.02, tokenizer_type="HuggingFaceTokenizer")
    cfg = config_from_args(argparse.Namespace(**base, qk_layernorm=True, moe_layer_freq=2))
    assert (cfg.family, cfg.moe.moe_layer_freq, cfg.moe.moe_aux_loss_coeff) == ("qwen3_moe", [1, 0, 1, 0], 0.01)
    cfg = config_from_args(argparse.Namespace(**base, add_qkv_bias=True, moe_shared_expert_intermediate_size=48,
                                              moe_shared_expert_gate=True))
    assert (cfg.family, cfg.moe.moe_shared_expert_gate) == ("qwen2_moe", True)
    assert config_from_args(argparse.Namespace(**base)).family == "mixtral"
    with pytest.raises(ConfigError, match="moe_router_score_function='sigmoid'"):
        config_from_args(argparse.Namespace(**base, moe_router_score_function="sigmoid"))


def test_expert_layouts_that_do_not_fit_are_refused_before_writing(hf_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="ep=3 does not divide num_experts=4"):
        hf_to_megatron(hf_dirs / "mixtral", out, tp=1, pp=1, ep=3, progress=False)
    with pytest.raises(ConfigError, match="ep=2 needs a mixture-of-experts model"):
        hf_to_megatron_dist(hf_dirs / "llama3.1", out, ep=2, progress=False)
    assert not out.exists()
    assert convert_cli(["hf-to-megatron", "--hf", str(hf_dirs / "mixtral"), "--out", str(out), "--format", "torch",
                        "--tp", "1", "--pp", "1", "--ep", "8", "--no-progress"]) == 2
    assert "ep=8 does not divide num_experts=4" in capsys.readouterr().err and not out.exists()
    assert convert_cli(["hf-to-megatron", "--hf", str(hf_dirs / "mixtral"), "--out", str(out), "--format", "torch",
                        "--tp", "1", "--pp", "1", "--ep", "2", "--no-progress"]) == 0
    assert "EP=2" in capsys.readouterr().out
    assert convert_cli(["megatron-to-hf", "--megatron", str(out), "--out", str(tmp_path / "back"),
                        "--no-progress"]) == 0
    _same(hf_dirs / "mixtral", tmp_path / "back")
