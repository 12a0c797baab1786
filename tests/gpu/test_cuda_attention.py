"""model.attention_backend on CUDA: packed rows give the same logits as each document alone, per backend,
and the kernel that ran is the fused one (flash for sdpa/varlen, a compiled triton template for flex),
never the math fallback and never the dense [B, 1, S, S] mask. Skipped without CUDA.

Tolerances (bf16 weights and activations, 2 layers, logits of magnitude ~1): packed vs alone differ only by
accumulation order over different tile splits, so atol = rtol = 2e-2 (about 3 bf16 ulps at 1.0); against
the fp32 dense reference the bf16 rounding of every matmul adds up, so atol = rtol = 5e-2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from trainer.config import ModelConfig  # noqa: E402
from trainer.data.attention_meta import attention_metadata  # noqa: E402
from trainer.model import GPTModel  # noqa: E402
from trainer.model import attention as attn  # noqa: E402

# head_dim 64: flash-eligible; documents of odd lengths cross the 128-token flex blocks.
CFG = ModelConfig(vocab_size=256, hidden_size=256, ffn_hidden_size=512, num_layers=2, num_attention_heads=4,
                  num_query_groups=2)
DOCS = [(100, 90, 66), (256,), (31, 200, 25)]
S = 256
TIGHT, LOOSE = dict(atol=2e-2, rtol=2e-2), dict(atol=5e-2, rtol=5e-2)


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    # Every test compiles flex for its own shapes and masks; a fresh cache keeps each one under dynamo's
    # recompile limit (past it, flex would silently run the eager, unfused reference).
    torch._dynamo.reset()
    yield


def _batch(docs=DOCS, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    B = len(docs)
    ids = torch.randint(0, CFG.vocab_size, (B, S), generator=gen)
    doc, pos = torch.full((B, S), -1), torch.zeros(B, S, dtype=torch.long)
    for r, lengths in enumerate(docs):
        start = 0
        for i, n in enumerate(lengths):
            doc[r, start:start + n], pos[r, start:start + n] = i, torch.arange(n)
            start += n
    return {"input_ids": ids, "position_ids": pos, "document_ids": doc}


def _model(backend: str, dtype=torch.bfloat16, **cfg) -> GPTModel:
    return GPTModel(dataclasses.replace(CFG, attention_backend=backend, **cfg), seed=1).cuda().to(dtype)


def _forward(model: GPTModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    meta = attention_metadata(batch, context_parallel=False)  # on the host, as trainer/step.py does
    kwargs = {k: meta[k].cuda() for k in ("position_ids", "document_ids", "doc_lens") if k in meta}
    return model(meta["input_ids"].cuda(), **kwargs).float()


def _skip_without_varlen(backend: str, cfg: dict) -> None:
    missing = attn.varlen_missing()  # None on every supported torch, GQA and window included
    if backend == "varlen" and missing:
        pytest.skip(missing)


BACKENDS = ["sdpa", "flex", "varlen", "auto"]
SHAPES = [{}, {"sliding_window": 48}, {"num_query_groups": 4}]


@pytest.mark.parametrize("cfg", SHAPES, ids=["gqa", "window", "mha"])
@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_packed_rows_equal_each_document_alone(backend, cfg):
    _skip_without_varlen(backend, cfg)
    model = _model(backend, **cfg).eval()
    batch = _batch()
    packed = _forward(model, batch)
    reference = _forward(_model("sdpa", torch.float32, **cfg).eval(), batch)
    real = batch["document_ids"] >= 0
    torch.testing.assert_close(packed[real.cuda()], reference[real.cuda()], **LOOSE)
    for r, lengths in enumerate(DOCS):
        start = 0
        for n in lengths:
            # Each document alone in a row of the same length S, trailing padding after it (one document per
            # row, as the loader makes them): one shape, so flex compiles once and not once per length.
            alone = _batch(docs=[(n,)])
            alone["input_ids"][0, :n] = batch["input_ids"][r, start:start + n]
            out = _forward(model, alone)[:, :n]
            torch.testing.assert_close(packed[r:r + 1, start:start + n], out, **TIGHT,
                                       msg=lambda m: f"{backend} row {r} doc at {start}: {m}")
            start += n


def _kernels(fn) -> tuple[list[str], list[str]]:
    """(CUDA kernel names, CPU op names) of one call of fn under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    cuda = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    cpu = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    return cuda, cpu


def _no_dense_mask(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the dense [B, 1, S, S] mask was built on a fused-kernel path")

    monkeypatch.setattr(attn, "allowed_mask", refuse)
    monkeypatch.setattr(attn, "dense_mask", refuse)


@pytest.mark.parametrize("backend, packed", [("sdpa", False), ("auto", False), ("varlen", True),
                                             ("auto", True), ("flex", True)])
def test_the_fused_kernel_runs_forward_and_backward(backend, packed, monkeypatch):
    _skip_without_varlen(backend, {})
    # auto: packed rows take varlen where this torch's varlen_attn can (GQA here), else flex.
    expected = {"sdpa": "sdpa", "flex": "flex", "varlen": "varlen"}.get(backend) or (
        ("varlen" if attn.varlen_missing() is None else "flex") if packed else "sdpa")
    _no_dense_mask(monkeypatch)
    model = _model(backend)
    batch = _batch() if packed else _batch(docs=[(S,), (S,), (S,)])

    def step():
        _forward(model, batch).sum().backward()

    step()  # flex: compile outside the profiled call
    cuda, cpu = _kernels(step)
    assert not any("_scaled_dot_product_attention_math" in n for n in cpu), "math fallback ran"
    if expected == "flex":
        # torch.compile's flex kernels are triton templates (forward and backward).
        assert any("triton_tem" in n or "flex" in n for n in cuda), cuda
    else:
        assert any("flash" in n for n in cuda), cuda
    if expected == "varlen":
        assert any("_varlen_attn" in n for n in cpu), cpu
    if expected == "sdpa":
        assert any("_scaled_dot_product_flash_attention" in n for n in cpu), cpu


def test_sdpa_on_packed_gqa_rows_is_never_the_math_kernel():
    """An explicit sdpa on packed rows of a grouped-query model: the dense mask goes to the memory-efficient
    kernel (k/v heads repeated first, trainer/model/attention.py sdpa_forward), not the math fallback."""
    model = _model("sdpa")
    batch = _batch()

    def step():
        _forward(model, batch).sum().backward()

    cuda, cpu = _kernels(step)
    assert not any("_scaled_dot_product_attention_math" in n for n in cpu), "math fallback ran"
    assert any("_efficient_attention" in n for n in cpu), cpu


def test_sdpa_on_one_document_rows_is_flash_eligible():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model("sdpa")
    batch = _batch(docs=[(S,), (S - 40,), (S,)])  # trailing padding keeps rows one-document
    assert "document_ids" not in attention_metadata(batch, context_parallel=False)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot take the call
        _forward(model, batch).sum().backward()


@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_gradients_match_the_dense_reference_with_selective_checkpointing(backend):
    from parallel.activation_checkpoint import apply_activation_checkpointing

    _skip_without_varlen(backend, {})
    batch = _batch()
    ref = _model("sdpa", torch.float32)
    _forward(ref, batch).square().mean().backward()
    model = _model(backend)
    apply_activation_checkpointing(model, "selective")
    _forward(model, batch).square().mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        name = n.replace("._checkpoint_wrapped_module", "")
        g, r = p.grad.float(), ref_grads[name]
        # Relative to the tensor's scale: bf16 gradients of a 2-layer model.
        assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6, name


def test_varlen_under_autocast_with_fp32_weights():
    _skip_without_varlen("varlen", {})
    model = _model("varlen", torch.float32)
    batch = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _forward(model, batch)
    ref = _forward(_model("sdpa", torch.float32), batch)
    real = (batch["document_ids"] >= 0).cuda()
    torch.testing.assert_close(out[real], ref[real], **LOOSE)
