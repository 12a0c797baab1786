"""Issue 12 on gloo ranks: the streamed HF export and the sliced HF load against what they replace.

One spawn of 2 ranks runs every layout (fsdp2, tp2, pp2 gpipe with tied embeddings, pp2 interleaved, a Mixtral
MoE at ep2), each with a padded vocabulary:
- the streamed export (trainer.export.export_hf) of the freshly initialised model gives the same bytes as one
  process's save_hf (init is layout-independent), and after a layout-dependent perturbation of every local
  shard the same bytes as the old path, parallel.parallelize.full_state_dict + save_hf, on the same ranks;
- while it streams, rank 0's export never holds more than one full tensor it was given;
- loading an HF checkpoint (model.hf_path) reads only this rank's rows and columns of each 1:1 tensor, and
  gives every rank exactly its part of one process's load (bitwise).
"""

from __future__ import annotations

import filecmp
import os
import weakref
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.distributed  # one 2-rank spawn for all cases: ~13 s

MODEL = ["model.vocab_size=100", "model.make_vocab_size_divisible_by=8", "model.hidden_size=32",
         "model.ffn_hidden_size=48", "model.num_layers=4", "model.num_attention_heads=4",
         "model.num_query_groups=2", "trainer.seed=5", "trainer.precision=fp32"]
# (id, parallel overrides, model variant)
LAYOUTS = [
    ("fsdp2", ["parallel=fsdp"], ["model.family=qwen2", "model.add_qkv_bias=true"]),
    ("tp2", ["parallel=tp2", "parallel.dp_shard=1"], ["model.tie_word_embeddings=true"]),
    ("pp2_gpipe_tied", ["parallel=fsdp", "parallel.dp_shard=1", "parallel.pp=2", "parallel.pp_schedule=gpipe"],
     ["model.tie_word_embeddings=true"]),
    ("pp2_interleaved", ["parallel=pp2_interleaved", "parallel.dp_shard=1"], []),
    # Experts split over ep 2: each stacked [E, ...] tensor is gathered from the ep ranks' Shard(0).
    ("ep2_mixtral", ["parallel=fsdp", "parallel.ep=2"], ["model.family=mixtral", "model.moe.num_moe_experts=4"]),
]
SHARD_BYTES = 20_000  # several shards and an index, so their grouping is compared too


def _config(overrides: list[str], world_size: int):
    from hydra import compose, initialize_config_module

    from trainer.config_io import to_config
    from trainer.loop import prepare

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
    return prepare(cfg, world_size)


def _build(overrides: list[str], world_size: int):
    from parallel.parallelize import build_parallel_model
    from trainer.loop import hf_weight_loader

    cfg, dims = _config(overrides, world_size)
    mesh = None if dims.is_single else dims.build_mesh("cpu", cfg.trainer.dist_timeout_s)
    return cfg, build_parallel_model(cfg, dims, mesh, torch.device("cpu"), hf_weight_loader(cfg))


class _Tokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def save_pretrained(self, path: str) -> None:
        Path(path, "tokenizer_marker.txt").write_text("tokenizer")


def _stream(pm, cfg, out: Path, is_main: bool, watch: list | None = None) -> None:
    """trainer.export.export_hf, with save_hf_stream's input watched on rank 0: when each tensor arrives,
    at most one earlier one may still be alive (the unit being written)."""
    import parallel.export as export_mod
    import trainer.export as trainer_export

    inner = export_mod.iter_full_tensors

    def watched(pm, cfg):
        alive: list[weakref.ref] = []
        for name, t in inner(pm, cfg):
            if t is not None:
                alive = [r for r in alive if r() is not None]
                watch.append(len(alive))
                alive.append(weakref.ref(t))
            yield name, t
            t = None

    trainer_export.iter_full_tensors = watched if watch is not None else inner
    try:
        trainer_export.export_hf(pm, cfg, out, _Tokenizer(), is_main)
    finally:
        trainer_export.iter_full_tensors = inner


def _old_export(pm, cfg, out: Path, is_main: bool) -> None:
    from checkpoint_convert.hf import save_hf
    from parallel.parallelize import full_state_dict

    state = full_state_dict(pm)
    if is_main:
        save_hf(state, cfg.model, out, config_overrides={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                overwrite=True, max_shard_bytes=SHARD_BYTES)
        _Tokenizer().save_pretrained(str(out))


@torch.no_grad()
def _perturb(pm, rank: int) -> None:
    from torch.distributed.tensor import DTensor

    for i, p in enumerate(pm.parameters()):
        local = p.to_local() if isinstance(p, DTensor) else p
        local.add_(torch.arange(local.numel(), dtype=local.dtype).reshape(local.shape) * 1e-4 + rank + i)


def _local_parts(pm) -> dict[str, tuple[list, torch.Tensor]]:
    """name -> (this rank's region of the global tensor, its local tensor) for every parameter."""
    from trainer.model.init import clean_fqn, local_region

    out = {}
    for m in pm.modules:
        for name, p in m.named_parameters():
            region = local_region(p) or [(0, n) for n in p.shape]
            local = (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
            out[clean_fqn(name)] = (region, tuple(p.shape), local)
    return out


def _rank(rank: int, world_size: int, tmp: str) -> dict:
    import checkpoint_convert.hf as hf
    import torch.distributed as dist

    # Small shards for both export paths, so the streamed writer's grouping is checked as well.
    save_hf_stream = hf.save_hf_stream

    def small_shards(*args, **kwargs):
        kwargs["max_shard_bytes"] = SHARD_BYTES
        return save_hf_stream(*args, **kwargs)

    hf.save_hf_stream = small_shards
    reads: dict[str, int] = {}
    get_slice = hf.SafetensorsDir.get_slice

    class CountingSlice:
        def __init__(self, view, name):
            self.view, self.name = view, name

        def get_shape(self):
            return self.view.get_shape()

        def __getitem__(self, index):
            t = self.view[index]
            reads[self.name] = reads.get(self.name, 0) + t.numel()
            return t

    hf.SafetensorsDir.get_slice = lambda self, name: CountingSlice(get_slice(self, name), name)
    results = {}
    root = Path(tmp)
    for name, parallel, variant in LAYOUTS:
        cfg, pm = _build([*MODEL, *variant, *parallel], world_size)
        watch: list[int] = []
        _stream(pm, cfg, root / name / "stream_init", rank == 0, watch)
        _perturb(pm, rank)
        _stream(pm, cfg, root / name / "stream_perturbed", rank == 0)
        _old_export(pm, cfg, root / name / "old_perturbed", rank == 0)
        reads.clear()
        cfg_l, pm_l = _build([*MODEL, *variant, *parallel, f"model.hf_path={root / 'ckpt' / name}"], world_size)
        results[name] = {"watch": watch, "reads": dict(reads), "parts": _local_parts(pm_l)}
        dist.barrier()
    return results


def _single(overrides: list[str]):
    return _build(overrides, 1)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _same_dirs(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)), (a, b)
    for f in names:
        assert filecmp.cmp(a / f, b / f, shallow=False), f"{a / f} differs from {b / f}"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One process's export and a random HF checkpoint per layout, then the 2-rank spawn."""
    from checkpoint_convert.hf import save_hf

    tmp = tmp_path_factory.mktemp("stream")
    single = {}
    for name, _, variant in LAYOUTS:
        cfg, pm = _single([*MODEL, *variant])
        save_hf(pm.modules[0], cfg.model, tmp / name / "single", max_shard_bytes=SHARD_BYTES,
                config_overrides={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
        _Tokenizer().save_pretrained(str(tmp / name / "single"))
        # A checkpoint unlike any init: random values, so a misplaced slice cannot go unnoticed.
        gen = torch.Generator().manual_seed(len(name))
        model = pm.modules[0]
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        save_hf(model, cfg.model, tmp / "ckpt" / name, max_shard_bytes=SHARD_BYTES)
        ref_cfg, ref = _single([*MODEL, *variant, f"model.hf_path={tmp / 'ckpt' / name}"])
        single[name] = {n: p.detach().clone() for n, p in ref.modules[0].named_parameters()}
    results = run_ranks(2, _rank, str(tmp), timeout=600)
    return tmp, single, results


@pytest.mark.parametrize("name", [c[0] for c in LAYOUTS])
def test_streamed_export_equals_one_process_and_the_old_gather(spawned, name):
    tmp, _, results = spawned
    assert (tmp / name / "single" / "model.safetensors.index.json").exists()  # several shards compared
    _same_dirs(tmp / name / "stream_init", tmp / name / "single")
    if name == "pp2_interleaved":
        # The old gather concatenated interleaved stages rank by rank (stages 0, 2, 1, 3), so its shards group
        # tensors in that order; the stream keeps the model's order (the same grouping as one process, above).
        assert _tensors(tmp / name / "stream_perturbed").keys() == _tensors(tmp / name / "old_perturbed").keys()
        for k, v in _tensors(tmp / name / "old_perturbed").items():
            assert torch.equal(_tensors(tmp / name / "stream_perturbed")[k], v), k
    else:
        _same_dirs(tmp / name / "stream_perturbed", tmp / name / "old_perturbed")
    watch = results[0][name]["watch"]
    assert watch and max(watch) <= 1, watch


@pytest.mark.parametrize("name", [c[0] for c in LAYOUTS])
def test_sliced_load_equals_one_process_load(spawned, name):
    _, single, results = spawned
    covered = set()
    for rank_result in results:
        for pname, (region, shape, local) in rank_result[name]["parts"].items():
            ref = single[name][pname if pname in single[name] else "embedding.word_embeddings.weight"]
            # One process pads the vocabulary less than tp=2 does: the extra rows are zeros.
            ref = torch.cat([ref, ref.new_zeros(shape[0] - ref.shape[0], *ref.shape[1:])])
            index = tuple(slice(a, b) for a, b in region)
            assert torch.equal(local, ref[index]), f"{name}: {pname} region {region}"
            covered.add(pname)
    # Every tensor of the model is on some rank (a pipeline's tied copy comes as output_layer.weight).
    assert set(single[name]) <= covered | {"embedding.word_embeddings.weight"}


def test_sliced_load_reads_only_this_ranks_part(spawned):
    _, single, results = spawned
    for rank_result in results:
        reads = rank_result["fsdp2"]["reads"]
        # FSDP shards every 1:1 tensor on dim 0: each rank reads about half of its rows, none of the rest.
        down = "model.layers.0.mlp.down_proj.weight"
        assert reads[down] == single["fsdp2"]["decoder.layers.0.mlp.linear_fc2.weight"].numel() // 2
        assert reads["model.embed_tokens.weight"] < 100 * 32  # padded rows are never read
    tp = [r["tp2"]["reads"] for r in results]
    assert all(r["model.layers.0.mlp.down_proj.weight"] == 32 * 48 // 2 for r in tp)  # rowwise: half the columns
    pp = [r["pp2_gpipe_tied"]["reads"] for r in results]
    assert "model.layers.3.mlp.down_proj.weight" not in pp[0] and "model.layers.0.mlp.down_proj.weight" not in pp[1]
