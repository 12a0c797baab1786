"""Pipeline parallelism on 2 gloo ranks against a single-process run with gradient accumulation.

Every case trains 3 AdamW steps of 4 microbatches, the loss normalised by the step's valid tokens (some
labels are -100, rows are packed so document_ids and position_ids must reach every stage), with one
forward-only evaluation between the first and second step (the schedule switches eval <-> train). The
per-step losses, the evaluation's summed CE and every final parameter (gathered by FQN) must match the
reference. All cases share one spawn of 2 ranks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.pipeline import (
    TIED_COPY_FQN,
    PipelineRunner,
    build_stage_modules,
    duplicate_params,
    tied_embedding_grad_sync,
)
from tests.distributed.launcher import run_ranks
from trainer.config import ModelConfig
from trainer.loss import IGNORE_INDEX, count_valid, cross_entropy_sum
from trainer.model import GPTModel

pytestmark = pytest.mark.distributed

BASE = ModelConfig(vocab_size=80, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=4,
                   num_query_groups=4)
PADDED_VOCAB = 96  # padded rows exercise the -inf logits on the last stage
SEED, STEPS, N_MB, MBS, SEQ = 11, 3, 4, 2, 12
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)

# (name, schedule, virtual stages, model overrides)
CASES = [
    ("gpipe", "gpipe", 1, {}),
    ("1f1b", "1f1b", 1, {}),
    ("interleaved_1f1b", "interleaved_1f1b", 2, {}),
    ("interleaved_zb", "interleaved_zb", 2, {}),
    ("zbv", "zbv", 2, {}),
    ("1f1b_tied", "1f1b", 1, {"tie_word_embeddings": True}),
    ("interleaved_1f1b_tied", "interleaved_1f1b", 2, {"tie_word_embeddings": True}),
    ("zbv_tied", "zbv", 2, {"tie_word_embeddings": True}),  # both tied copies on rank 0
    ("1f1b_gqa", "1f1b", 1, {"num_query_groups": 2}),
    ("interleaved_1f1b_gqa", "interleaved_1f1b", 2, {"num_query_groups": 1}),
]


def _batch(step: int) -> dict:
    """One step's local batch: [N_MB * MBS, SEQ], two packed documents per row, ~25% ignored labels."""
    gen = torch.Generator().manual_seed(1000 + step)
    B = N_MB * MBS
    ids = torch.randint(0, BASE.vocab_size, (B, SEQ), generator=gen)
    labels = torch.randint(0, BASE.vocab_size, (B, SEQ), generator=gen)
    labels[torch.rand(B, SEQ, generator=gen) < 0.25] = IGNORE_INDEX
    split = torch.randint(2, SEQ - 2, (B, 1), generator=gen)
    pos = torch.arange(SEQ).expand(B, SEQ)
    docs = (pos >= split).long()
    return {"input_ids": ids, "labels": labels, "document_ids": docs,
            "position_ids": torch.where(docs == 1, pos - split, pos)}


def _micro(batch: dict, i: int) -> dict:
    return {k: v[i * MBS:(i + 1) * MBS] for k, v in batch.items()}


def _forward_sum(model: GPTModel, mb: dict) -> torch.Tensor:
    logits = model(mb["input_ids"], position_ids=mb["position_ids"], document_ids=mb["document_ids"])
    return cross_entropy_sum(logits, mb["labels"])


def _reference(cfg: ModelConfig) -> dict:
    model = GPTModel(cfg, PADDED_VOCAB, seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses, eval_sum = [], None
    for step in range(STEPS):
        batch = _batch(step)
        normalizer = count_valid(batch["labels"])
        total = 0.0
        for i in range(N_MB):
            loss = _forward_sum(model, _micro(batch, i)) / normalizer
            loss.backward()
            total += loss.item()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(total)
        if step == 0:
            with torch.no_grad():
                eval_sum = sum(_forward_sum(model, _micro(_batch(99), i)).item() for i in range(N_MB))
    return {"losses": losses, "eval": eval_sum, "grads": grads,
            "params": {n: p.detach() for n, p in model.named_parameters()}}


def _pipeline_case(rank: int, pp_mesh, schedule: str, virtual: int, cfg: ModelConfig) -> dict:
    model = GPTModel(cfg, PADDED_VOCAB, seed=SEED)
    stages = build_stage_modules(model, rank, 2, virtual, schedule)
    runner = PipelineRunner(stages, pp_mesh, schedule, N_MB, torch.device("cpu"))
    params = [p for _, m in stages for p in m.parameters()]
    opt = torch.optim.AdamW(params, **ADAMW)
    losses, eval_sum = [], None
    for step in range(STEPS):
        batch = _batch(step)
        loss = runner.step(batch, normalizer=count_valid(batch["labels"]))
        tied_embedding_grad_sync(stages, pp_mesh)
        if step == 0:
            grads = {n: p.grad.numpy().copy() for _, m in stages for n, p in m.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(None if loss is None else loss.item())
        if step == 0:
            out = runner.eval_loss_sum(_batch(99))
            eval_sum = None if out is None else out.item()
    state = {}
    for _, m in stages:
        state.update({n: t.numpy() for n, t in m.state_dict().items()})
    return {"losses": losses, "eval": eval_sum, "state": state, "grads": grads,
            "duplicates": len(duplicate_params(stages)), "has_last": runner.has_last}


def _run_cases(rank: int, world_size: int, cases: list) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh

    pp_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    results = [_pipeline_case(rank, pp_mesh, schedule, virtual, dataclasses.replace(BASE, **over))
               for _, schedule, virtual, over in cases]
    results.append(_dtensor_tied_sync(rank, world_size))
    return results


def _dtensor_tied_sync(rank: int, world_size: int) -> list:
    """tied_embedding_grad_sync on DTensor grads (a 2-D pp x tp mesh with tp=1): local shards are summed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("pp", "tp"))
    cfg = dataclasses.replace(BASE, tie_word_embeddings=True)
    stages = build_stage_modules(GPTModel(cfg, PADDED_VOCAB, seed=SEED), rank, world_size, 1, "1f1b")
    (_, stage), = stages
    param = stage.embedding.word_embeddings.weight if rank == 0 else stage.output_layer.weight
    dparam = torch.nn.Parameter(distribute_tensor(param.detach(), mesh["tp"], [Replicate()]))
    dparam.grad = distribute_tensor(torch.full(param.shape, float(rank + 1)), mesh["tp"], [Replicate()])
    if rank == 0:
        stage.embedding.word_embeddings.weight = dparam
    else:
        stage.output_layer.weight = dparam
    tied_embedding_grad_sync(stages, mesh["pp"])
    return dparam.grad.to_local().unique().tolist()


@pytest.fixture(scope="module")
def pipeline_results():
    return run_ranks(2, _run_cases, CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_pipeline_matches_single_process(pipeline_results, index):
    cfg = dataclasses.replace(BASE, **CASES[index][3])
    ref = _reference(cfg)
    ranks = [results[index] for results in pipeline_results]
    last = next(r for r in ranks if r["has_last"])
    assert all(r["losses"] == [None] * STEPS for r in ranks if not r["has_last"])
    for got, want in zip(last["losses"], ref["losses"]):
        assert got == pytest.approx(want, rel=1e-5)
    assert last["eval"] == pytest.approx(ref["eval"], rel=1e-5)

    for key, want_all, tol in (("grads", ref["grads"], dict(rtol=1e-5, atol=1e-7)),
                               ("state", ref["params"], dict(rtol=0, atol=1e-5))):
        got_all = {n: torch.from_numpy(a) for r in ranks for n, a in r[key].items()}
        assert sum(len(r[key]) for r in ranks) == len(got_all), "a parameter lives on two stages"
        tied_copy = got_all.pop(TIED_COPY_FQN) if cfg.tie_word_embeddings else None
        assert set(got_all) == set(want_all)
        for name, want in want_all.items():
            torch.testing.assert_close(got_all[name], want, **tol, msg=lambda m: f"{key} {name}: {m}")
        if cfg.tie_word_embeddings:
            # Both copies hold the same summed gradient, hence the same weights after every step.
            assert torch.equal(tied_copy, got_all["embedding.word_embeddings.weight"])
    assert sum(r["duplicates"] for r in ranks) == (1 if cfg.tie_word_embeddings else 0)


def test_tied_grad_sync_sums_dtensor_local_shards(pipeline_results):
    assert [results[-1] for results in pipeline_results] == [[3.0], [3.0]]
