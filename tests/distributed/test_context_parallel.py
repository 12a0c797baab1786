"""Context parallelism on gloo ranks against a single-process full-sequence run of the same model.

Each rank runs its zigzag shard, takes loss = (local summed CE) / (global valid tokens), backpropagates and
sums gradients over cp (FSDP does that in training). Logits reassembled from the shards, the loss and every
parameter gradient must match the full-sequence run. Cases are grouped so each world size spawns once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from parallel.context_parallel import ContextParallelAttention, apply_context_parallel, shard_batch_for_cp
from tests.distributed.launcher import run_ranks
from trainer.config import ModelConfig
from trainer.loss import IGNORE_INDEX, count_valid, cross_entropy_sum
from trainer.model import GPTModel

TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                   num_query_groups=2)
SEED = 7


def _packed(B: int, S: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """document_ids and position_ids (restarting per document) for rows packed with these lengths."""
    assert sum(lengths) == S
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    return docs.expand(B, S).clone(), positions.expand(B, S).clone()


def _case(name: str, S: int, B: int = 2, docs: list[int] | None = None, ignore: bool = False, **cfg) -> dict:
    gen = torch.Generator().manual_seed(len(name) * 1000 + S)
    ids = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    labels = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    batch = {"input_ids": ids, "labels": labels}
    if ignore:  # prompt-masked tokens, and one whole shard-sized run of them on row 0
        labels[torch.rand(B, S, generator=gen) < 0.3] = IGNORE_INDEX
        labels[0, : S // 4] = IGNORE_INDEX
    if docs is not None:
        batch["document_ids"], batch["position_ids"] = _packed(B, S, docs)
    return {"name": name, "cfg": dataclasses.replace(TINY, **cfg), "batch": batch}


def _cp_step(rank: int, cp: int, case: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    model = GPTModel(case["cfg"], seed=SEED)
    apply_context_parallel(model, mesh)
    assert all(isinstance(layer.self_attention.core_attention, ContextParallelAttention)
               for layer in model.decoder.layers.values())
    local = shard_batch_for_cp(case["batch"], cp, mesh.get_local_rank())
    logits = model(local["input_ids"], position_ids=local["position_ids"], seq_index=local["seq_index"],
                   document_ids=local.get("document_ids"))
    valid = torch.tensor(count_valid(local["labels"]))
    dist.all_reduce(valid, group=mesh.get_group())
    loss = cross_entropy_sum(logits, local["labels"]) / valid
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.get_group())
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient on cp rank {rank}"
        dist.all_reduce(p.grad, group=mesh.get_group())  # SUM: each rank holds a partial gradient
        grads[n] = p.grad
    # numpy arrays pickle by value; tensors would travel as shared memory that dies with the rank.
    return {"logits": logits.detach().numpy(), "seq_index": local["seq_index"].numpy(), "loss": total.item(),
            "grads": {n: g.numpy() for n, g in grads.items()} if rank == 0 else None}


def _run_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    return [_cp_step(rank, world_size, case) for case in cases]


def _reference(case: dict) -> dict:
    batch = case["batch"]
    model = GPTModel(case["cfg"], seed=SEED)
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   document_ids=batch.get("document_ids"))
    loss = cross_entropy_sum(logits, batch["labels"]) / count_valid(batch["labels"])
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.item(),
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def _check(cases: list[dict], per_rank: list[list[dict]]) -> None:
    for i, case in enumerate(cases):
        ref = _reference(case)
        results = [rank_results[i] for rank_results in per_rank]
        index = torch.cat([torch.from_numpy(r["seq_index"]) for r in results], dim=1)
        shards = torch.cat([torch.from_numpy(r["logits"]) for r in results], dim=1)
        logits = torch.empty_like(shards).scatter_(1, index[..., None].expand_as(shards), shards)
        torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=0, msg=lambda m: f"{case['name']}: {m}")
        for r in results:
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), case["name"]
        assert set(results[0]["grads"]) == set(ref["grads"])
        for n, g in ref["grads"].items():
            torch.testing.assert_close(torch.from_numpy(results[0]["grads"][n]), g, atol=1e-5, rtol=0,
                                       msg=lambda m, n=n: f"{case['name']} {n}: {m}")


def test_context_parallel_cp2_matches_single_process():
    cases = [
        _case("gqa_ignore", 16, ignore=True),
        _case("sliding_window", 16, sliding_window=5),
        _case("packed_docs", 16, docs=[5, 7, 4], ignore=True),
        _case("qwen3_mqa_tied", 16, num_query_groups=1, qk_layernorm=True, tie_word_embeddings=True,
              kv_channels=12),
    ]
    _check(cases, run_ranks(2, _run_cases, cases))


def test_context_parallel_cp4_matches_single_process():
    cases = [
        _case("gqa", 32),
        # Window shorter than a chunk and documents crossing chunk and rank boundaries, all at once.
        _case("window_docs_ignore", 32, docs=[9, 14, 9], ignore=True, sliding_window=3),
    ]
    _check(cases, run_ranks(4, _run_cases, cases))
