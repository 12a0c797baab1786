"""Context parallelism on the flex kernel: 2 gloo ranks, each attending its zigzag query chunks against the
all-gathered keys through one flex BlockMask, against a single-process forward on the dense reference mask.

flex_attention has no CPU backward, so this compares forward logits (no_grad); gradients through the
cp all-gathers are covered with the dense mask by test_context_parallel.py and on CUDA by tests/gpu.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from parallel.context_parallel import apply_context_parallel, shard_batch_for_cp
from tests.distributed.launcher import run_ranks
from trainer.config import ModelConfig
from trainer.model import GPTModel

TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                   num_query_groups=2)
SEED = 5


def _case(name: str, S: int = 32, B: int = 2, docs: list[int] | None = None, **cfg) -> dict:
    gen = torch.Generator().manual_seed(S + len(name))
    batch = {"input_ids": torch.randint(0, TINY.vocab_size, (B, S), generator=gen)}
    if docs is not None:  # the last document is padding (-1), like the packer's tail
        ids = torch.cat([torch.full((n,), i if i < len(docs) - 1 else -1) for i, n in enumerate(docs)])
        pos = torch.cat([torch.arange(n) for n in docs])
        batch["document_ids"], batch["position_ids"] = ids.expand(B, S).clone(), pos.expand(B, S).clone()
    return {"name": name, "cfg": dataclasses.replace(TINY, **cfg), "batch": batch}


CASES = [
    _case("causal_gqa"),
    # Documents crossing the chunk and rank boundaries (chunks of 8), a window shorter than a chunk, GQA.
    _case("packed_window_gqa", docs=[11, 9, 7, 5], sliding_window=4),
    _case("packed_mqa", docs=[6, 20, 6], num_query_groups=1),
]


def _forward_cp(rank: int, world: int, cases: list[dict]) -> list[dict]:
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    gathers = []
    real_gather = funcol.all_gather_tensor
    funcol.all_gather_tensor = lambda *a, **k: gathers.append(1) or real_gather(*a, **k)
    out = []
    for case in cases:
        model = GPTModel(dataclasses.replace(case["cfg"], attention_backend="flex"), seed=SEED).eval()
        apply_context_parallel(model, mesh)
        local = shard_batch_for_cp(case["batch"], world, rank)
        gathers.clear()
        with torch.no_grad():
            logits = model(local["input_ids"], position_ids=local["position_ids"], seq_index=local["seq_index"],
                           document_ids=local.get("document_ids"))
        out.append({"logits": logits.numpy(), "seq_index": local["seq_index"].numpy(), "gathers": len(gathers)})
    return out


def test_cp2_flex_forward_matches_single_process_dense():
    per_rank = run_ranks(2, _forward_cp, CASES)
    for i, case in enumerate(CASES):
        results = [r[i] for r in per_rank]
        # Row indices and document ids are gathered once per forward, not once per layer (3 layers here).
        assert [r["gathers"] for r in results] == [1 if "document_ids" not in case["batch"] else 2] * 2
        index = torch.cat([torch.from_numpy(r["seq_index"]) for r in results], dim=1)
        shards = torch.cat([torch.from_numpy(r["logits"]) for r in results], dim=1)
        logits = torch.empty_like(shards).scatter_(1, index[..., None].expand_as(shards), shards)
        batch = case["batch"]
        ref_model = GPTModel(dataclasses.replace(case["cfg"], attention_backend="sdpa"), seed=SEED).eval()
        with torch.no_grad():
            ref = ref_model(batch["input_ids"], position_ids=batch.get("position_ids"),
                            document_ids=batch.get("document_ids"))
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{case['name']}: {m}")
