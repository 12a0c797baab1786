"""The chunked loss (trainer.loss_chunk_size) under tensor, pipeline and fully sharded data parallelism on
2 gloo ranks, against the single-process unchunked run of the same model, data and seed.

- tp2 with loss parallelism: the chunks' logits stay vocab-sharded and the backward recompute runs inside
  ``loss_parallel`` (the chunked run all-gathers exactly what the unchunked one does: the sequence shards of
  the hidden state, never logits); losses 1e-6 relative, gradients and parameters after AdamW 1e-5.
- pp2 through every schedule the pipeline tests use (GPipe, 1F1B, Interleaved 1F1B, Interleaved ZB, ZB-V),
  tied and untied: per-step losses, an evaluation, per-document losses, gradients and final parameters.
- fsdp2: the root's output weight is resharded after forward, so the backward recompute sees it only
  because FSDP unshards it again; fp32 against the single process, bf16 against unchunked bf16 FSDP.

One spawn of 2 ranks runs every case (spawning costs more than the cases).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.pipeline import TIED_COPY_FQN, PipelineRunner, build_stage_modules, tied_embedding_grad_sync
from tests.distributed import test_pipeline as pp
from tests.distributed import test_tensor_parallel as tp
from tests.distributed.launcher import run_ranks
from trainer.loss import DocumentLoss, count_valid
from trainer.model import GPTModel
from trainer.model.gpt import VOCAB_PARAMS, loss_chunk

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
ADAMW = dict(lr=1e-3, eps=1e-6)  # eps as in test_mesh_matrix: Adam would amplify float noise in ~0 grads

# tp: B x S = 16 tokens per forward; 5 does not divide them, 8 does.
TP_CASES = [tp.Case("gqa"), tp.Case("gqa_no_sp", sp=False),
            tp.Case("tied_padded", {"tie_word_embeddings": True}, padded=True),
            tp.Case("padded_meta", padded=True, meta=True)]
TP_CHUNKS = (5, 8)
# pp: micro-batches of 2 x 12 = 24 tokens; (name, schedule, virtual stages, model overrides, chunk)
PP_CASES = [("gpipe", "gpipe", 1, {}, 5),
            ("1f1b", "1f1b", 1, {}, 5),
            ("1f1b_tied", "1f1b", 1, {"tie_word_embeddings": True}, 7),
            ("interleaved_1f1b", "interleaved_1f1b", 2, {}, 8),
            ("interleaved_zb", "interleaved_zb", 2, {}, 5),
            ("zbv_tied", "zbv", 2, {"tie_word_embeddings": True}, 5)]
PP_STEPS = 2
# fsdp: each rank takes one of the tp batch's 2 rows (8 tokens); chunk 3 does not divide them.
FSDP_CASES = [("fsdp_untied", {}), ("fsdp_tied", {"tie_word_embeddings": True})]
FSDP_CHUNK = 3


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _counting(calls: list):
    def fn(hidden, weight, labels, vocab_size):
        calls.append(hidden.shape[0])
        return loss_chunk(hidden, weight, labels, vocab_size)
    return fn


def _step(named_params: list[tuple[str, torch.nn.Parameter]]) -> dict:
    """One AdamW step from the current gradients; the full gradients and parameters (collectives: every
    rank calls this), as numpy (tensors would travel as shared memory that dies with the rank)."""
    grads = {n: _full(p.grad).numpy() for n, p in named_params}
    torch.optim.AdamW([p for _, p in named_params], **ADAMW).step()
    return {"grads": grads, "params": {n: _full(p).numpy() for n, p in named_params}}


# ------------------------------------------------------------------------------------------ tp2


def _tp_case(case: tp.Case, chunk: int) -> dict:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.debug import CommDebugMode

    from parallel.tensor_parallel import vocab_parallel_loss

    model, calls = tp._build_tp(case, 2), []
    model.loss_chunk_size, model.loss_chunk_fn = chunk, _counting(calls)
    weight = model.output_weight()
    assert isinstance(weight, DTensor) and weight.placements == (Shard(0),)
    batch = tp._batch(case)
    forward, backward = CommDebugMode(), CommDebugMode()
    with vocab_parallel_loss(model):
        with forward:
            losses = model(batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"])
        assert type(losses) is torch.Tensor and losses.shape == batch["labels"].shape
        with backward:
            (losses.sum() / count_valid(batch["labels"])).backward()
    gathers = [mode.get_comm_counts().get(torch.ops.c10d_functional.all_gather_into_tensor, 0)
               for mode in (forward, backward)]
    return {"losses": losses.detach().numpy(), "calls": calls, "gathers": gathers,
            **_step(list(model.named_parameters()))}


def _tp_reference(case: tp.Case) -> dict:
    model = GPTModel(case.cfg(), seed=tp.SEED)  # unpadded and unchunked
    batch = tp._batch(case)
    losses = model(batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"])
    (losses.sum() / count_valid(batch["labels"])).backward()
    return {"losses": losses.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "params": _step(list(model.named_parameters()))["params"]}


def _tp_all(rank: int) -> dict:
    return {(case.name, chunk): _tp_case(case, chunk) for case in TP_CASES for chunk in (0, *TP_CHUNKS)}


# ------------------------------------------------------------------------------------------ pp2


def _pp_batch(step: int) -> dict:
    batch = pp._batch(step)
    rows = torch.arange(batch["input_ids"].shape[0])[:, None]
    return {**batch, "sample_ids": 2 * rows + batch["document_ids"]}  # one id per (row, document)


def _pp_case(rank: int, pp_mesh, schedule: str, virtual: int, cfg, chunk: int) -> dict:
    stages, calls = build_stage_modules(GPTModel(cfg, pp.PADDED_VOCAB, seed=pp.SEED), rank, 2, virtual, schedule), []
    for _, m in stages:
        m.loss_chunk_size, m.loss_chunk_fn = chunk, _counting(calls)
    runner = PipelineRunner(stages, pp_mesh, schedule, pp.N_MB, CPU)
    named = [(n, p) for _, m in stages for n, p in m.named_parameters()]
    opt = torch.optim.AdamW([p for _, p in named], **ADAMW)
    out = {"losses": [], "docs": [], "has_last": runner.has_last}
    for step in range(PP_STEPS):
        batch = _pp_batch(step)
        doc = DocumentLoss(batch["sample_ids"], CPU)
        calls.clear()
        loss = runner.step(batch, normalizer=count_valid(batch["labels"]), doc_loss=doc)
        out["train_calls"] = list(calls)  # the last step's: the first one also infers shapes
        tied_embedding_grad_sync(stages, pp_mesh)
        if step == 0:
            out["grads"] = {n: p.grad.numpy().copy() for n, p in named}
        opt.step()
        opt.zero_grad()
        out["losses"].append(None if loss is None else loss.item())
        out["docs"].append(torch.stack([doc.sums, doc.counts]).numpy())
        if step == 0:
            ev = runner.eval_loss_sum(_pp_batch(99))
            out["eval"] = None if ev is None else ev.item()
    out["params"] = {n: p.detach().numpy() for n, p in named}
    return out


def _pp_reference(cfg) -> dict:
    model = GPTModel(cfg, pp.PADDED_VOCAB, seed=pp.SEED)  # unchunked
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    out = {"losses": [], "docs": []}

    def token_losses(mb):
        return model(mb["input_ids"], position_ids=mb["position_ids"], document_ids=mb["document_ids"],
                     labels=mb["labels"])

    for step in range(PP_STEPS):
        batch = _pp_batch(step)
        doc, normalizer, total = DocumentLoss(batch["sample_ids"], CPU), count_valid(batch["labels"]), 0.0
        for i in range(pp.N_MB):
            mb = pp._micro(batch, i)
            losses = token_losses(mb)
            (losses.sum() / normalizer).backward()
            doc.add(losses, mb["labels"], mb["sample_ids"])
            total += losses.sum().item() / normalizer
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        out["losses"].append(total)
        out["docs"].append(torch.stack([doc.sums, doc.counts]))
        if step == 0:
            with torch.no_grad():
                out["eval"] = sum(token_losses(pp._micro(_pp_batch(99), i)).sum().item() for i in range(pp.N_MB))
    out["params"] = {n: p.detach() for n, p in model.named_parameters()}
    return out


def _pp_all(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    pp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    return {name: _pp_case(rank, pp_mesh, schedule, virtual, dataclasses.replace(pp.BASE, **over), chunk)
            for name, schedule, virtual, over, chunk in PP_CASES}


# ---------------------------------------------------------------------------------------- fsdp2


def _fsdp_case(rank: int, mesh, over: dict, precision: str, chunk: int) -> dict:
    from torch.distributed.tensor import DTensor

    from parallel.fsdp import apply_fsdp

    case = tp.Case("fsdp", over, padded=True)
    model, calls = GPTModel(case.cfg(), padded_vocab_size=112, seed=tp.SEED), []
    model.loss_chunk_size, model.loss_chunk_fn = chunk, _counting(calls)
    apply_fsdp(model, mesh, precision)  # reshard_after_forward=True, the root included
    batch = tp._batch(case)
    mine = {k: v[rank:rank + 1] for k, v in batch.items()}
    losses = model(mine["tokens"], position_ids=mine["position_ids"], labels=mine["labels"])
    # Resharded after forward: the recompute in backward works only on the weight FSDP unshards again.
    assert isinstance(model.output_weight(), DTensor), "the root's weights should be sharded between passes"
    (losses.sum() / count_valid(batch["labels"])).backward()
    out = {"losses": losses.detach().numpy(), "calls": calls}
    return {**out, **_step(list(model.named_parameters()))}


def _fsdp_all(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard_cp",))
    out = {(name, "fp32", FSDP_CHUNK): _fsdp_case(rank, mesh, over, "fp32", FSDP_CHUNK) for name, over in FSDP_CASES}
    for chunk in (0, FSDP_CHUNK):
        out[("fsdp_untied", "bf16", chunk)] = _fsdp_case(rank, mesh, {}, "bf16", chunk)
    return out


def _worker(rank: int, world_size: int) -> dict:
    return {"tp": _tp_all(rank), "pp": _pp_all(rank), "fsdp": _fsdp_all(rank)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(2, _worker)


# ---------------------------------------------------------------------------------------- checks


def _close(got, want, tol: float, what: str, vocab: int | None = None, name: str = "") -> None:
    got = torch.as_tensor(got)
    if vocab is not None and name in VOCAB_PARAMS:
        assert (got[vocab:] == 0).all(), f"{what}: padded rows of {name} are not zero"
        got = got[:vocab]
    torch.testing.assert_close(got, torch.as_tensor(want), rtol=tol, atol=tol, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("case", TP_CASES, ids=lambda c: c.name)
def test_tp2_chunked_matches_single_process(results, case):
    ref, vocab = _tp_reference(case), tp.TINY.vocab_size
    baseline = [r["tp"][(case.name, 0)] for r in results]
    for chunk in TP_CHUNKS:
        for rank, r in enumerate(results):
            got, base = r["tp"][(case.name, chunk)], baseline[rank]
            what = f"{case.name} chunk {chunk} rank {rank}"
            forward = [5, 5, 5, 1] if chunk == 5 else [8, 8]
            # The backward recomputes chunks one at a time, last first.
            assert got["calls"] == forward + forward[::-1], f"{what}: {got['calls']}"
            assert got["gathers"] == base["gathers"], f"{what}: all-gathers {got['gathers']} vs {base['gathers']}"
            torch.testing.assert_close(torch.from_numpy(got["losses"]), ref["losses"], rtol=1e-6, atol=0)
            for key in ("grads", "params"):
                for name, want in ref[key].items():
                    _close(got[key][name], want, 1e-5, f"{what} {key}", vocab, name)
    if case.sp:  # the hidden state's sequence shards, forward (and layers' inputs again in backward)
        assert all(b["gathers"][0] > 0 for b in baseline)
    else:  # without sequence parallelism nothing is ever gathered, chunked or not
        assert all(r["tp"][(case.name, c)]["gathers"] == [0, 0] for r in results for c in TP_CHUNKS)


@pytest.mark.parametrize("index", range(len(PP_CASES)), ids=[c[0] for c in PP_CASES])
def test_pp2_chunked_matches_single_process(results, index):
    name, schedule, virtual, over, chunk = PP_CASES[index]
    cfg = dataclasses.replace(pp.BASE, **over)
    ref = _pp_reference(cfg)
    ranks = [r["pp"][name] for r in results]
    last = next(r for r in ranks if r["has_last"])
    tokens = pp.MBS * pp.SEQ
    per_mb = [chunk] * (tokens // chunk) + ([tokens % chunk] if tokens % chunk else [])
    # Each micro-batch's chunks in forward, then again (last first) in its backward; zero-bubble schedules
    # split backward into an input-gradient and a weight-gradient pass, and each recomputes the chunks.
    # torch's stages also run one micro-batch forward and backward (inputs only) to infer shapes when
    # (re)initialised, e.g. after eval.
    recomputes = 2 if schedule in ("interleaved_zb", "zbv") else 1
    calls, size = last["train_calls"], len(per_mb)
    groups = [calls[i:i + size] for i in range(0, len(calls), size)]
    assert all(g in (per_mb, per_mb[::-1]) for g in groups), calls
    assert len(groups) in ((1 + recomputes) * pp.N_MB, (1 + recomputes) * pp.N_MB + 2), calls
    if per_mb != per_mb[::-1]:
        assert sum(g == per_mb for g in groups) in (pp.N_MB, pp.N_MB + 1), calls
    for step, (got, want) in enumerate(zip(last["losses"], ref["losses"])):
        assert got == pytest.approx(want, rel=1e-6), f"step {step}"
    assert last["eval"] == pytest.approx(ref["eval"], rel=1e-6)
    for key, tol in (("grads", 1e-5), ("params", 1e-5)):
        got_all = {n: a for r in ranks for n, a in r[key].items()}
        tied_copy = got_all.pop(TIED_COPY_FQN) if cfg.tie_word_embeddings else None
        assert set(got_all) == set(ref[key])
        for pname, want in ref[key].items():
            _close(got_all[pname], want, tol, f"{name} {key}", name=pname)
        if tied_copy is not None:
            assert (tied_copy == got_all["embedding.word_embeddings.weight"]).all()


def test_pp2_per_document_losses_match_single_process(results):
    name = PP_CASES[0][0]
    ref = _pp_reference(pp.BASE)
    last = next(r["pp"][name] for r in results if r["pp"][name]["has_last"])
    for step in range(PP_STEPS):
        _close(last["docs"][step], ref["docs"][step], 1e-6, f"step {step} per-document sums and counts")


@pytest.mark.parametrize("name,over", FSDP_CASES, ids=[c[0] for c in FSDP_CASES])
def test_fsdp2_chunked_matches_single_process(results, name, over):
    ref, vocab = _tp_reference(tp.Case("fsdp", over)), tp.TINY.vocab_size
    got = [r["fsdp"][(name, "fp32", FSDP_CHUNK)] for r in results]
    losses = torch.cat([torch.from_numpy(g["losses"]) for g in got])  # rank r holds row r
    torch.testing.assert_close(losses, ref["losses"], rtol=1e-6, atol=0)
    for rank, g in enumerate(got):
        assert g["calls"] == [3, 3, 2, 2, 3, 3], g["calls"]
        for key in ("grads", "params"):
            for pname, want in ref[key].items():
                _close(g[key][pname], want, 1e-5, f"{name} rank {rank} {key}", vocab, pname)


def test_fsdp2_bf16_chunked_matches_unchunked(results):
    """bf16 parameters (FSDP's mixed precision): chunk matmuls in bf16, cross-entropy in fp32; chunked and
    unchunked agree to bf16 rounding (losses 1e-3, gradients 1e-2 relative + 1e-3)."""
    for rank, r in enumerate(results):
        got, want = r["fsdp"][("fsdp_untied", "bf16", FSDP_CHUNK)], r["fsdp"][("fsdp_untied", "bf16", 0)]
        assert got["losses"].dtype == want["losses"].dtype == "float32"
        _close(got["losses"], want["losses"], 1e-3, f"rank {rank} losses")
        for pname, g in want["grads"].items():
            torch.testing.assert_close(torch.from_numpy(got["grads"][pname]), torch.from_numpy(g), rtol=1e-2,
                                       atol=1e-3, msg=lambda m: f"rank {rank} {pname}: {m}")
