"""Mixture-of-experts checkpoints in both Megatron-LM formats, proven by megatron-core itself (0.16.1, CPU, gloo).

megatron-core's GPTModel with its MoE layer spec (SequentialMLP experts, the router, Qwen2-MoE's gated shared
expert, dense layers where moe_layer_freq says) runs on 2 ranks at TP=1 x EP=2 and then at TP=2 x EP=1, for
Qwen3-MoE, Mixtral, a Qwen3-MoE with dense and MoE layers mixed, and Qwen2-MoE:
- legacy: each rank strict-loads its file of our `hf-to-megatron --format torch` output at that layout (EP=2:
  mp_rank_00_00E, EP rank k holding experts k E/2 .. as local_experts.0, ..; TP=2: each expert's fc1 as
  [gate_r; up_r], fc2 split on its input dim), every key of its state dict there;
- torch_dist: dist_checkpointing.load fills its sharded_state_dict() from our layout-free files (args: TP=1, EP=1)
  with no key missing on either side;
and both models' forward gives transformers' logits (1e-4). Back: what megatron-core saves at each layout, its
state dicts as Megatron-LM's legacy save_checkpoint pickles them (real enum types, signal.Signals in args) and its
own dist_checkpointing.save (stacked keys at EP=2; at TP=2 per-expert singleton keys with fc1 as _w/_v for two of
the models), converts to HF tensors equal to the original ones bit for bit.

megatron-core on CPU needs, beyond the dense tests' patches (test_megatron_torch_dist._on_cpu), its router's
Transformer Engine GEMM switched off (moe_utils.te_general_gemm, an unbound name without TE) and the allgather
token dispatcher (alltoall's __init__ makes CUDA streams).
"""

from __future__ import annotations

import argparse
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from checkpoint_convert.megatron import hf_to_megatron, megatron_to_hf
from checkpoint_convert.megatron_format import rank_dir
from checkpoint_convert.megatron_dist import read_dcp_metadata
from checkpoint_convert.megatron_dist_read import megatron_dist_to_hf
from checkpoint_convert.megatron_dist_write import hf_to_megatron_dist
from tests.distributed.launcher import run_ranks
from tests.distributed.megatron_core_models import core_gpt_model
from tests.tiny_hf import save_tiny_hf
from tests.unit.test_hf_parity import _read_safetensors_dir

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from tests.distributed.test_megatron_torch_dist import _forward, _on_cpu, _save_like_megatron_lm
    from tests.unit.test_megatron_legacy_real import _megatron_lm_args

LAYOUTS, ITERATION = ((1, 2), (2, 1)), 7  # (TP, EP) megatron-core runs at, on 2 ranks
MODELS = ("qwen3-moe", "mixtral", "qwen3-moe-mixed", "qwen2-moe-shared")
SINGLETON = ("mixtral", "qwen2-moe-shared")  # saved at TP=2 with singleton_local_shards (one key per expert)


def _inputs() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def _save_legacy_like_megatron_lm(model, args: argparse.Namespace, root: Path) -> None:
    """What Megatron-LM's save_checkpoint writes with --ckpt-format torch: one file per (TP, PP, EP) rank, in
    mp_rank_TT_EEE (get_checkpoint_name), args as its argument parser makes them."""
    from megatron.core import parallel_state as ps

    tp, ep = ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    saved = _megatron_lm_args(args, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=tp, iteration=ITERATION)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state()}
    path = root / f"iter_{ITERATION:07d}" / rank_dir(ps.get_tensor_model_parallel_rank(), 0, 1,
                                                     ps.get_expert_model_parallel_rank(), ep) / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"args": saved, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model.state_dict(),
                "rng_state": [rng], "num_floating_point_operations_so_far": 0}, path)
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def _megatron_core(rank: int, world: int, jobs: dict, ids: torch.Tensor, hf_logits: dict) -> dict:
    warnings.simplefilter("ignore")
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.safe_globals import register_safe_globals
    from megatron.core.transformer.moe import moe_utils

    _on_cpu()
    moe_utils.te_general_gemm = None
    register_safe_globals()  # as Megatron-LM's initialize does: the files hold an argparse.Namespace
    results = {}
    for tp, ep in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
        file = rank_dir(ps.get_tensor_model_parallel_rank(), 0, 1, ps.get_expert_model_parallel_rank(), ep)
        for name, dirs in jobs.items():
            legacy, torch_dist, core = dirs[tp, ep], dirs["dist"], Path(dirs["core"]) / f"tp{tp}ep{ep}"
            ckpt = torch.load(Path(legacy) / "release" / file / "model_optim_rng.pt", weights_only=True)
            model = core_gpt_model(ckpt["args"], parallel_output=False, dropout=0.0)
            same_keys = model.state_dict().keys() == ckpt["model"].keys()  # _extra_state included
            model.load_state_dict(ckpt["model"], strict=True)
            equal = all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items()
                        if not k.endswith("._extra_state"))
            legacy_diff = (_forward(model, ids, ckpt["args"])[..., :96] - hf_logits[name]).abs().max().item()
            _save_legacy_like_megatron_lm(model, ckpt["args"], core / "legacy")

            args = dist_checkpointing.load_common_state_dict(str(Path(torch_dist) / "release"))["args"]
            model = core_gpt_model(args, pad_vocab_for_run=True, parallel_output=False, dropout=0.0)
            loaded, in_file_only, asked_only = dist_checkpointing.load(
                {"model": model.sharded_state_dict()}, str(Path(torch_dist) / "release"),
                strict=StrictHandling.RETURN_ALL)
            model.load_state_dict(loaded["model"], strict=True)
            dist_diff = (_forward(model, ids, args)[..., :args.vocab_size] - hf_logits[name]).abs().max().item()
            _save_like_megatron_lm(model, args, core / "dist", newer=tp == 2 and name in SINGLETON)
            results[name, tp, ep] = {"file": file, "same_keys": same_keys, "equal": equal, "legacy_diff": legacy_diff,
                                     "missing": sorted(asked_only), "unexpected": sorted(in_file_only),
                                     "dist_diff": dist_diff}
        ps.destroy_model_parallel()
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_core_loads_and_saves_moe_in_both_formats(tmp_path, capsys):
    ids = _inputs()
    jobs, hf_logits = {}, {}
    for name in MODELS:
        with torch.no_grad():
            hf_logits[name] = save_tiny_hf(name, tmp_path / name)(ids).logits
        jobs[name] = {(tp, ep): str(hf_to_megatron(tmp_path / name, tmp_path / f"{name}-tp{tp}ep{ep}", tp=tp, pp=1,
                                                   ep=ep, progress=False)) for tp, ep in LAYOUTS}
        jobs[name]["dist"] = str(hf_to_megatron_dist(tmp_path / name, tmp_path / f"{name}-dist", progress=False))
        jobs[name]["core"] = str(tmp_path / f"{name}-core")

    results = run_ranks(2, _megatron_core, jobs, ids, hf_logits, timeout=600)

    assert [r["mixtral", 1, 2]["file"] for r in results] == ["mp_rank_00_000", "mp_rank_00_001"]
    assert [r["mixtral", 2, 1]["file"] for r in results] == ["mp_rank_00", "mp_rank_01"]
    for res in results:
        assert len(res) == len(MODELS) * len(LAYOUTS)
        for key, r in res.items():
            assert r["same_keys"] and r["equal"], (key, r["file"])
            assert r["missing"] == [] and r["unexpected"] == [], (key, r["missing"], r["unexpected"])
            assert r["legacy_diff"] < 1e-4 and r["dist_diff"] < 1e-4, (key, r)

    for name in MODELS:
        original = _read_safetensors_dir(tmp_path / name)
        for tp, ep in LAYOUTS:
            core = tmp_path / f"{name}-core" / f"tp{tp}ep{ep}"
            entries = read_dcp_metadata(core / "dist" / f"iter_{ITERATION:07d}").state_dict_metadata
            expert_key = ("decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight_w"
                          if tp == 2 and name in SINGLETON else
                          "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" if name == "qwen3-moe-mixed" else
                          "decoder.layers.mlp.experts.experts.linear_fc1.weight")
            assert expert_key in entries, (name, tp, ep, sorted(k for k in entries if "experts" in k)[:4])
            for kind, convert in (("legacy", megatron_to_hf), ("dist", megatron_dist_to_hf)):
                out = tmp_path / f"{name}-back-{kind}-tp{tp}ep{ep}"
                convert(core / kind, out, hf_config_dir=tmp_path / name, progress=False)
                returned = _read_safetensors_dir(out)
                assert returned.keys() == original.keys(), (name, kind, tp, ep, set(returned) ^ set(original))
                assert all(torch.equal(returned[k], original[k]) for k in original), (name, kind, tp, ep)
    capsys.readouterr()
