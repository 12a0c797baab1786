"""Megatron-LM's torch_dist format, proven by megatron-core itself (0.16.1, CPU, gloo), for every family.

HF -> torch_dist: hf-to-megatron writes the files once (args say TP=1, PP=1); megatron-core's own
dist_checkpointing.load fills its GPTModel's sharded_state_dict() at TP=2 x PP=2 and at TP=1 x PP=4 with no key
missing on either side, and the model's forward gives transformers' logits (1e-4).
torch_dist -> HF: megatron-core's own dist_checkpointing.save writes those models as Megatron-LM's
save_checkpoint does (iter_NNNNNNN/, args, rng_state, content metadata; at TP=1 x PP=4 in the other layouts:
per-layer keys with fc1 as _w/_v, and core 0.19's common state inside the DCP files); megatron-to-hf turns them into
HF directories whose logits in transformers equal megatron-core's forward (1e-4) and whose tensors equal the
original ones bit for bit.

megatron-core on CPU: `Tensor.cuda`, `torch.cuda.current_device`, `torch.cuda.synchronize` and the CUDA rng
tracker's `fork` are patched to no-ops or "cpu"; its sliding-window mask (built on "cuda") is rebuilt on CPU;
psutil (used by its writer for a debug log only) is not needed. Pipeline stages pass activations by hand
(dist.send/recv): megatron-core's schedules hard-code CUDA.
"""

from __future__ import annotations

import argparse
import random
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from checkpoint_convert.cli import main as convert_cli
from checkpoint_convert.megatron_dist import read_dcp_metadata
from checkpoint_convert.megatron_dist_read import load_megatron_dist_as_meshtron, megatron_dist_to_hf
from checkpoint_convert.megatron_dist_write import hf_to_megatron_dist
from tests.distributed.launcher import run_ranks
from tests.distributed.megatron_core_models import core_gpt_model
from tests.tiny_hf import VARIANTS, save_tiny_hf
from tests.unit.test_hf_parity import _read_safetensors_dir
from trainer.model import GPTModel

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")

LAYOUTS = ((2, 2), (1, 4))  # (TP, PP) megatron-core runs at; the converted files record TP=1, PP=1
SEQ, ITERATION = 12, 7  # 12 tokens: longer than Mistral's window of 5


def _inputs() -> torch.Tensor:
    return torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ megatron-core on CPU


def _on_cpu() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    tp_random.CudaRNGStatesTracker.fork = lambda self, name=None: nullcontext()
    filesystem_async._process_memory = lambda: 0

    def window_mask(sq: int, sk: int, window) -> torch.Tensor:  # True = masked; window (left, right)
        q = torch.arange(sq)[:, None] + (sk - sq)
        k = torch.arange(sk)[None, :]
        return (q - k > window[0]) | (k - q > window[1])

    fused_softmax.get_sliding_window_causal_mask = window_mask


def _forward(model, ids: torch.Tensor, args: argparse.Namespace):
    """Logits [b, s, padded vocab] on the last pipeline stage (None elsewhere); stages pass activations."""
    from megatron.core import parallel_state as ps

    s = ids.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, ids.shape[0], args.hidden_size, dtype=args.params_dtype)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(ids, torch.arange(s).expand_as(ids), mask)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _save_like_megatron_lm(model, args: argparse.Namespace, root: Path, newer: bool) -> None:
    """What Megatron-LM's save_checkpoint hands dist_checkpointing.save (generate_state_dict, get_rng_state).

    newer: the other layouts, made with this megatron-core's own writer: per-layer keys with fc1 as `_w`/`_v`
    (content metadata singleton_local_shards=True; heterogeneous models get the per-layer keys too), and the
    common state where core 0.19 keeps it, the object "common_state" inside the DCP files, not common.pt."""
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    saved = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("meshtron_")})
    saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size = tp, pp
    content = {"singleton_local_shards": newer, "chained_optim_avoid_prefix": True}
    common = {"args": saved, "checkpoint_version": 3.0, "iteration": ITERATION, "content_metadata": content,
              "num_floating_point_operations_so_far": 0}
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state()}
    state = {**common, "model": model.sharded_state_dict(metadata=dict(content)),
             "rng_state": ShardedObject("rng_state", [rng], (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                                                       ps.get_tensor_model_parallel_rank()),
                                        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))}
    if newer:
        state["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=dist.get_rank())
    path = root / f"iter_{ITERATION:07d}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(path))
    if dist.get_rank() == 0:
        if newer:
            (path / "common.pt").unlink()
        (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def _megatron_core(rank: int, world: int, jobs: dict, ids: torch.Tensor, hf_logits: dict) -> dict:
    warnings.simplefilter("ignore")
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.safe_globals import register_safe_globals

    _on_cpu()
    register_safe_globals()  # as Megatron-LM's initialize does: common.pt holds an argparse.Namespace
    results = {}
    for tp, pp in LAYOUTS:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        for name, (ours, saved_root) in jobs.items():
            args = dist_checkpointing.load_common_state_dict(str(Path(ours) / "release"))["args"]
            model = core_gpt_model(args, pad_vocab_for_run=True, parallel_output=False, dropout=0.0)
            loaded, in_file_only, asked_only = dist_checkpointing.load(
                {"model": model.sharded_state_dict()}, str(Path(ours) / "release"), strict=StrictHandling.RETURN_ALL)
            model.load_state_dict(loaded["model"], strict=True)
            logits = _forward(model, ids, args)
            diff = None if logits is None else (logits[..., :args.vocab_size] - hf_logits[name]).abs().max().item()
            _save_like_megatron_lm(model, args, Path(saved_root) / f"tp{tp}pp{pp}", newer=(tp, pp) == LAYOUTS[1])
            keep = logits is not None and ps.get_tensor_model_parallel_rank() == 0
            results[name, tp, pp] = {"missing": sorted(asked_only), "unexpected": sorted(in_file_only),
                                     "diff": diff, "logits": logits[..., :args.vocab_size] if keep else None}
        ps.destroy_model_parallel()
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_core_reads_and_writes_torch_dist_for_every_family(tmp_path, capsys):
    ids = _inputs()
    jobs, hf_logits, sources = {}, {}, {}
    for name in VARIANTS:
        model = save_tiny_hf(name, tmp_path / name)
        with torch.no_grad():
            hf_logits[name] = model(ids).logits
        sources[name] = tmp_path / name
        ours = hf_to_megatron_dist(tmp_path / name, tmp_path / f"{name}-ours", progress=False)
        jobs[name] = (str(ours), str(tmp_path / f"{name}-core"))

    results = run_ranks(4, _megatron_core, jobs, ids, hf_logits, timeout=600)

    for res in results:  # megatron-core finds the keys a rank asks for but the files lack on that rank alone
        for (name, tp, pp), r in res.items():
            assert r["missing"] == [] and r["unexpected"] == [], (name, tp, pp, r["missing"], r["unexpected"])
    diffs = {key: r["diff"] for res in results for key, r in res.items() if r["diff"] is not None}
    assert len(diffs) == len(VARIANTS) * len(LAYOUTS)
    assert max(diffs.values()) < 1e-4, diffs

    core_logits = {key: r["logits"] for res in results for key, r in res.items() if r["logits"] is not None}
    for (name, tp, pp), logits in core_logits.items():
        saved = tmp_path / f"{name}-core" / f"tp{tp}pp{pp}"
        entries = read_dcp_metadata(saved / f"iter_{ITERATION:07d}").state_dict_metadata
        assert any(k.startswith("rng_state/") for k in entries) and any("_extra_state/" in k for k in entries)
        newer = (tp, pp) == LAYOUTS[1]
        assert ("decoder.layers.3.mlp.linear_fc1.weight_v" in entries) == newer
        assert ("common_state/shard_0_1" in entries) == newer
        assert (saved / f"iter_{ITERATION:07d}" / "common.pt").exists() != newer
        out = tmp_path / f"{name}-back-tp{tp}pp{pp}"
        if (tp, pp) == LAYOUTS[0] and name == "qwen3-head-dim":  # once through the CLI: the format is detected
            assert convert_cli(["megatron-to-hf", "--megatron", str(saved), "--out", str(out), "--hf-config",
                                str(sources[name]), "--no-progress"]) == 0
        else:
            megatron_dist_to_hf(saved, out, hf_config_dir=sources[name], progress=False)
        back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            assert (back(ids).logits - logits).abs().max().item() < 1e-4, (name, tp, pp)
        original, returned = _read_safetensors_dir(sources[name]), _read_safetensors_dir(out)
        assert returned.keys() == original.keys()
        assert all(torch.equal(returned[k], original[k]) for k in original), (name, tp, pp)
    capsys.readouterr()


def test_metadata_of_older_megatron_core_reads_with_stand_ins_and_without_megatron(tmp_path):
    """core <= 0.15 pickled its own classes into .metadata: MCoreMetadata (0.15) and MCoreSavePlan (in the
    all_local_plans it keeps). The files here are re-pickled with megatron-core's own (placeholder) classes of
    those names; megatron-to-hf reads them in a process that never imports megatron. Also: the checkpoint as
    meshtron's model (what verify needs) gives transformers' logits."""
    import pickle
    import subprocess
    import sys

    from megatron.core.dist_checkpointing.strategies import torch as core_torch

    from checkpoint_convert.megatron_dist import MCoreMetadata

    src = tmp_path / "hf"
    hf_model = save_tiny_hf("qwen2-tied-bias", src)
    release = hf_to_megatron_dist(src, tmp_path / "meg", progress=False) / "release"
    cfg, state = load_megatron_dist_as_meshtron(tmp_path / "meg")  # what verify --megatron needs
    model = GPTModel(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert (model(_inputs()) - hf_model(_inputs()).logits).abs().max().item() < 1e-4
    ours = read_dcp_metadata(release)
    old = core_torch.MCoreMetadata.__new__(core_torch.MCoreMetadata)
    plan = core_torch.MCoreSavePlan.__new__(core_torch.MCoreSavePlan)
    plan.__dict__.update(items=[], storage_data=None, planner_data=None, usable=True, mcore_data={})
    old.__dict__.update(vars(ours), mcore_data={}, all_local_plans=[plan])
    (release / ".metadata").write_bytes(pickle.dumps(old))
    assert b"MCoreMetadata" in (release / ".metadata").read_bytes()
    assert isinstance(read_dcp_metadata(release), MCoreMetadata)

    script = ("import sys; from checkpoint_convert.megatron_dist_read import megatron_dist_to_hf as f; "
              f"f({str(tmp_path / 'meg')!r}, {str(tmp_path / 'back')!r}, progress=False); "
              "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron')[:3] or 0)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(tmp_path / "back")
    assert returned.keys() == original.keys() and all(torch.equal(returned[k], original[k]) for k in original)
