"""Tensor parallelism (+ sequence parallelism, vocab-parallel embedding/logits, loss parallelism) on gloo
ranks against a single-process run of the same model, data and seed.

Every rank builds the same model (init is layout-independent), applies TP on a 1-D tp mesh, and runs
forward, loss = summed CE / valid tokens, backward on a fixed batch with ignored labels. The loss, the
logits and every gradient gathered to a full tensor must match the single process. Cases are grouped so
each world size spawns once (spawning costs more than the cases).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from trainer.model.shapes import check_tp_divisibility, padded_vocab_size
from tests.distributed.launcher import run_ranks
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.loss import IGNORE_INDEX, count_valid, cross_entropy_sum
from trainer.model import GPTModel
from trainer.model.gpt import VOCAB_PARAMS

TINY = ModelConfig(vocab_size=100, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                   num_query_groups=2, make_vocab_size_divisible_by=8)
SEED = 11
B, S = 2, 8
QWEN3 = {"family": "qwen3", "qk_layernorm": True, "kv_channels": 12}  # head_dim != hidden / heads


@dataclass(frozen=True)
class Case:
    name: str
    model: dict = field(default_factory=dict)
    sp: bool = True          # sequence parallelism
    lp: bool = True          # loss parallelism (logits stay vocab-sharded)
    padded: bool = False     # pad the vocabulary with Megatron's rule for this tp
    meta: bool = False       # build on meta, parallelize, then materialise and init, as training does
    packed: bool = False     # two documents per row (document_ids, restarting position_ids)

    def cfg(self) -> ModelConfig:
        return dataclasses.replace(TINY, **self.model)


TP2_CASES = [
    Case("gqa"),
    Case("gqa_no_sp_no_lp", sp=False, lp=False),
    Case("gqa_sp_no_lp", lp=False, packed=True),
    Case("gqa_no_sp_lp", sp=False),
    Case("mqa_per_rank", {"num_attention_heads": 8, "num_query_groups": 2}),  # one kv head per rank
    Case("mha", {"num_query_groups": 4}, sp=False, lp=False),
    Case("tied", {"tie_word_embeddings": True}),
    Case("tied_no_sp_no_lp_padded", {"tie_word_embeddings": True}, sp=False, lp=False, padded=True),
    Case("qwen2_qkv_bias", {"family": "qwen2", "add_qkv_bias": True}, meta=True),
    Case("qwen3_tied_padded", {**QWEN3, "tie_word_embeddings": True}, padded=True),
    Case("qwen3_no_sp", QWEN3, sp=False, lp=False),
    Case("padded", padded=True, meta=True),
    Case("padded_no_lp", padded=True, lp=False),
]
TP4_CASES = [
    Case("gqa_tp4_padded", {"num_attention_heads": 8, "num_query_groups": 4}, padded=True),
    Case("qwen3_tp4_no_sp", {**QWEN3, "num_attention_heads": 8, "num_query_groups": 4, "add_qkv_bias": True,
                             "tie_word_embeddings": True}, sp=False, lp=False, padded=True),
]
ADAMW_CASE = Case("adamw", {"tie_word_embeddings": True, "add_qkv_bias": True}, padded=True)
ADAMW_LR, ADAMW_STEPS = 1e-3, 2
STAGES_CASE = Case("pipeline_stages", {"add_qkv_bias": True})


def _batch(case: Case) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(case.name))
    batch = {"tokens": torch.randint(0, TINY.vocab_size, (B, S), generator=gen),
             "labels": torch.randint(0, TINY.vocab_size, (B, S), generator=gen),
             "position_ids": torch.arange(S).expand(B, S).clone()}
    batch["labels"][0, :3] = IGNORE_INDEX  # a masked prompt
    batch["labels"][1, -1] = IGNORE_INDEX
    if case.packed:
        half = S // 2
        batch["document_ids"] = (torch.arange(S) >= half).long().expand(B, S).clone()
        batch["position_ids"] = (torch.arange(S) % half).expand(B, S).clone()
    return batch


def _forward_loss(model: GPTModel, batch: dict, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["tokens"], position_ids=batch["position_ids"], document_ids=batch.get("document_ids"))
    with ctx:
        loss = cross_entropy_sum(logits, batch["labels"]) / count_valid(batch["labels"])
        loss.backward()
    return logits, loss


# ---------------------------------------------------------------------------------- on the tp ranks


def _build_tp(case: Case, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    cfg = case.cfg()
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp) if case.padded else None
    if case.meta:
        with torch.device("meta"):
            model = GPTModel(cfg, padded_vocab_size=padded, seed=SEED)
        apply_tensor_parallel(model, mesh, sequence_parallel=case.sp, loss_parallel=case.lp)
        model.to_empty(device="cpu")
        model.init_weights(SEED)
    else:
        model = GPTModel(cfg, padded_vocab_size=padded, seed=SEED)
        apply_tensor_parallel(model, mesh, sequence_parallel=case.sp, loss_parallel=case.lp)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _tp_case(rank: int, tp: int, case: Case) -> dict:
    from torch.distributed.tensor import DTensor, Shard

    from parallel.tensor_parallel import vocab_parallel_loss

    model = _build_tp(case, tp)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "every TP parameter is a DTensor"
    logits, loss = _forward_loss(model, _batch(case), vocab_parallel_loss(model))
    if case.lp:  # no rank ever materialises [B, S, vocab]
        assert isinstance(logits, DTensor) and logits.placements == (Shard(2),), logits
        assert logits.to_local().shape[-1] == logits.shape[-1] // tp
    else:
        assert type(logits) is torch.Tensor and logits.shape[-1] == model.padded_vocab_size
    out = {"loss": loss.item()}
    full_logits = _full(logits.detach())
    grads = {n: _full(p.grad).numpy() for n, p in model.named_parameters()}  # collectives: all ranks
    if rank == 0:  # numpy pickles by value; tensors would travel as shared memory that dies with the rank
        out.update(logits=full_logits.numpy(), grads=grads)
    return out


def _tp_adamw(rank: int, tp: int, case: Case) -> dict:
    from parallel.tensor_parallel import vocab_parallel_loss

    model = _build_tp(case, tp)
    norms = _train(model, _batch(case), lambda: vocab_parallel_loss(model))
    params = {n: _full(p.detach()).numpy() for n, p in model.named_parameters()}
    return {"norms": norms, "params": params if rank == 0 else None}


def _split_stages(model: GPTModel) -> tuple[GPTModel, GPTModel]:
    """Two pipeline-style stages sharing the model's modules: embedding + layer 0, then layer 1 + head."""
    first, last = GPTModel(model.config, seed=SEED), GPTModel(model.config, seed=SEED)
    first.embedding, last.embedding = model.embedding, None
    first.decoder.layers = torch.nn.ModuleDict({"0": model.decoder.layers["0"]})
    last.decoder.layers = torch.nn.ModuleDict({"1": model.decoder.layers["1"]})
    first.decoder.final_layernorm, first.output_layer = None, None
    last.decoder.final_layernorm, last.output_layer = model.decoder.final_layernorm, model.output_layer
    return first, last


def _tp_stages(rank: int, tp: int, case: Case) -> dict:
    """TP applied per stage: absent parts (embedding, final norm, output layer) are skipped, and the
    sequence-sharded hidden state passes from one stage to the next as a local tensor."""
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_loss

    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    model = GPTModel(case.cfg(), seed=SEED)
    first, last = _split_stages(model)
    for stage in (first, last):
        apply_tensor_parallel(stage, mesh, sequence_parallel=case.sp, loss_parallel=case.lp)
    batch = _batch(case)
    hidden = first(batch["tokens"], position_ids=batch["position_ids"])
    assert hidden.shape[1] == (S // tp if case.sp else S)
    logits = last(hidden, position_ids=batch["position_ids"])
    with vocab_parallel_loss(last):
        loss = cross_entropy_sum(logits, batch["labels"]) / count_valid(batch["labels"])
        loss.backward()
    out = {"loss": loss.item()}
    full_logits = _full(logits.detach())
    grads = {n: _full(p.grad).numpy() for n, p in model.named_parameters()}
    if rank == 0:
        out.update(logits=full_logits.numpy(), grads=grads)
    return out


def _tp_worker(rank: int, tp: int, cases: list[Case], adamw: Case | None, stages: Case | None) -> dict:
    results = {case.name: _tp_case(rank, tp, case) for case in cases}
    if adamw is not None:
        results[adamw.name] = _tp_adamw(rank, tp, adamw)
    if stages is not None:
        results[stages.name] = _tp_stages(rank, tp, stages)
    return results


def _train(model: GPTModel, batch: dict, ctx) -> list[float]:
    """AdamW steps on the fixed batch; returns the gradient norm before each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
    norms = []
    for _ in range(ADAMW_STEPS):
        _forward_loss(model, batch, ctx())
        norms.append(_full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)).item())
        opt.step()
        opt.zero_grad()
    return norms


# ------------------------------------------------------------------------------- single-process side


def _reference(case: Case) -> dict:
    """The single process never pads: padded columns must not change anything."""
    model = GPTModel(case.cfg(), seed=SEED)
    logits, loss = _forward_loss(model, _batch(case), contextlib.nullcontext())
    return {"loss": loss.item(), "logits": logits.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def _check_case(case: Case, ranks: list[dict]) -> None:
    ref = _reference(case)
    vocab = TINY.vocab_size
    for r, res in enumerate(ranks):
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5), f"{case.name}: loss on tp rank {r}"
    logits = torch.from_numpy(ranks[0]["logits"])
    torch.testing.assert_close(logits[..., :vocab], ref["logits"], atol=1e-5, rtol=0)
    assert torch.isneginf(logits[..., vocab:]).all(), "padded vocabulary columns must be -inf"
    assert ranks[0]["grads"].keys() == ref["grads"].keys()
    for name, want in ref["grads"].items():
        got = torch.from_numpy(ranks[0]["grads"][name])
        if name in VOCAB_PARAMS:
            assert (got[vocab:] == 0).all(), f"{case.name}: padded rows of {name} got a gradient"
            got = got[:vocab]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m: f"{case.name} {name}: {m}")


@pytest.fixture(scope="module")
def tp2_results() -> list[dict]:
    return run_ranks(2, _tp_worker, TP2_CASES, ADAMW_CASE, STAGES_CASE)


@pytest.mark.distributed
@pytest.mark.parametrize("case", TP2_CASES, ids=lambda c: c.name)
def test_tp2_matches_single_process(tp2_results, case):
    _check_case(case, [r[case.name] for r in tp2_results])


@pytest.mark.distributed
def test_tp2_pipeline_stages_match_single_process(tp2_results):
    _check_case(STAGES_CASE, [r[STAGES_CASE.name] for r in tp2_results])


@pytest.mark.distributed
def test_tp2_adamw_steps_match_single_process(tp2_results):
    case = ADAMW_CASE
    model = GPTModel(case.cfg(), seed=SEED)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = _train(model, _batch(case), contextlib.nullcontext)
    for r in tp2_results:
        assert r[case.name]["norms"] == pytest.approx(norms, rel=1e-5)
    got = tp2_results[0][case.name]["params"]
    for name, p in model.named_parameters():
        full = torch.from_numpy(got[name])
        if name in VOCAB_PARAMS:
            assert (full[TINY.vocab_size:] == 0).all(), f"padded rows of {name} moved"
            full = full[:TINY.vocab_size]
        assert not torch.equal(full, start[name]), f"{name} did not move"
        torch.testing.assert_close(full, p.detach(), atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.distributed
def test_tp4_matches_single_process():
    results = run_ranks(4, _tp_worker, TP4_CASES, None, None)
    for case in TP4_CASES:
        _check_case(case, [r[case.name] for r in results])


# ------------------------------------------------------------------------------- config-time checks


def test_padded_vocab_size_follows_megatron():
    assert padded_vocab_size(100, 8, 2) == 112
    assert padded_vocab_size(112, 8, 2) == 112
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_size(151936, 128, 1) == 151936


@pytest.mark.parametrize("field_name, value", [("num_attention_heads", 6), ("num_query_groups", 1),
                                               ("ffn_hidden_size", 50)])
def test_tp_divisibility_names_both_values(field_name, value):
    ok = {"num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": 48}
    check_tp_divisibility(dataclasses.replace(TINY, **ok), 4)
    with pytest.raises(ConfigError, match=rf"model\.{field_name}={value} .*parallel\.tp=4"):
        check_tp_divisibility(dataclasses.replace(TINY, **{**ok, field_name: value}), 4)
