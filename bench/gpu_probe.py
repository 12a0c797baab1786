"""The kernel facts meshtron's CUDA step rests on, checked on this machine's torch through meshtron's own calls.

    python bench/gpu_probe.py          # one JSON line per check; on a machine without CUDA: the environment only

Each check is independent and prints as soon as it ends, so a time box that cuts the run keeps what ran:

- varlen_*: trainer/model/attention.py's varlen path (tokens flattened, cu_seqlens from doc_lens, the keyword
  arguments trainer/torch_compat.py gives this torch: grouped-query heads without enable_gqa on 2.11) forward
  and backward, against per-document fp32 attention; MHA, GQA, a sliding window, a zero-length sequence.
- flex_*: meshtron's BlockMask (the compiled builder) and compiled flex_attention forward and backward against
  the dense reference, and how many graphs a second micro-batch of the same shape compiles (0 expected).
- sdpa_*: which SDPA kernel meshtron's sdpa path takes: causal one-document rows (flash expected) and the dense
  mask of packed rows with grouped heads (memory-efficient expected, never math).
- grouped_mm_*: torch._grouped_mm (the MoE expert GEMMs) against a loop of matmuls, and whether it syncs.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def emit(name: str, **fields) -> None:
    print(json.dumps({"check": name, **fields}, default=str), flush=True)


def run(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        emit(name, ok=True, seconds=round(time.perf_counter() - t0, 2), **(fn() or {}))
    except Exception as e:  # noqa: BLE001 - every check reports, the next one still runs
        emit(name, ok=False, seconds=round(time.perf_counter() - t0, 2), error=f"{type(e).__name__}: {e}"[:600],
             where=traceback.format_exc().splitlines()[-3:])


def env() -> dict:
    import importlib.metadata as md

    def version(package):
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return None

    from trainer import torch_compat

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else None,
            "capability": torch.cuda.get_device_capability() if cuda else None,
            "varlen_params": sorted(torch_compat.varlen_params() or ()),
            "varlen_missing": torch_compat.varlen_missing(),
            "packages": {p: version(p) for p in ("triton", "transformers", "hydra-core", "omegaconf", "pytest",
                                                 "pytest-timeout", "datasets", "wandb", "numpy", "safetensors")},
            "sdp_priority": [torch.nn.attention.SDPBackend(b).name for b in torch._C._get_sdp_priority_order()]}


DEV = torch.device("cuda", 0)
LENGTHS = [300, 17, 500, 211, 0, 996]  # zero-length: what zero-padded doc_lens make


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def qkv(H: int, G: int, T: int, d: int = 64, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEV).manual_seed(0)
    return [torch.randn(1, h, T, d, device=DEV, dtype=dtype, generator=gen, requires_grad=True) for h in (H, G, G)]


def reference(q, k, v, window):
    """Causal attention per document in fp32 (q [1, H, T, d], k/v [1, G, T, d], documents of LENGTHS)."""
    from trainer.model.attention import allowed_mask

    doc = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEV), torch.tensor(LENGTHS, device=DEV))[None]
    i = torch.arange(doc.shape[1], device=DEV)[None]
    mask = allowed_mask(i, i, window, doc, doc)
    return F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


def against_reference(out, q, k, v, window) -> dict:
    g = torch.randn_like(out)
    out.backward(g)
    grads = [t.grad.clone() for t in (q, k, v)]
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, window)
    ref.backward(g.float())
    return {"out_rel": rel(out, ref), **{f"d{n}_rel": rel(a, b.grad) for n, a, b in zip("qkv", grads, leaves)}}


def varlen_case(H: int, G: int, window=None) -> dict:
    from torch.nn.attention.varlen import varlen_attn

    from trainer.model.attention import cu_seqlens, varlen_tokens, varlen_window
    from trainer.torch_compat import varlen_kwargs

    T = sum(LENGTHS)
    q, k, v = qkv(H, G, T)
    cu = cu_seqlens(torch.tensor([LENGTHS], dtype=torch.int32), 1, T, DEV)
    kwargs = varlen_kwargs(varlen_window(window, T), gqa=G != H)
    out = varlen_tokens(varlen_attn, q, k, v, cu, **kwargs)
    return {"kwargs": kwargs, **against_reference(out, q, k, v, window)}


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def flex_case(H: int, G: int, window=None) -> dict:
    from trainer.model.attention import flex_block_mask, flex_forward

    T = sum(LENGTHS)
    doc = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEV), torch.tensor(LENGTHS, device=DEV))[None]
    t0 = time.perf_counter()
    mask = flex_block_mask(1, T, T, DEV, window=window, q_doc=doc, k_doc=doc)
    q, k, v = qkv(H, G, T)
    out = flex_forward(q, k, v, mask)
    result = against_reference(out, q, k, v, window)
    first_s = time.perf_counter() - t0
    before = compiled_graphs()
    flex_forward(*qkv(H, G, T), flex_block_mask(1, T, T, DEV, window=window, q_doc=doc.flip(1), k_doc=doc.flip(1)))
    return {**result, "first_call_s": round(first_s, 1), "graphs_compiled_by_a_second_micro_batch":
            compiled_graphs() - before}


def sdpa_ops(packed: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from trainer.model.attention import allowed_mask, sdpa_forward

    q, k, v = qkv(8, 2, 1024)
    mask = None
    if packed:
        doc = (torch.arange(1024, device=DEV) // 300)[None]
        i = torch.arange(1024, device=DEV)[None]
        mask = allowed_mask(i, i, None, doc, doc)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sdpa_forward(q, k, v, mask).sum().backward()
    return {"ops": sorted({e.name for e in prof.events() if "attention" in e.name and e.name.startswith("aten::_")})}


def grouped_mm(dtype) -> dict:
    E, N, Hd, Fd = 8, 1000, 64, 128
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(N, Hd, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(E, Fd, Hd, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    offs = torch.bincount(torch.randint(0, E, (N,), device=DEV, generator=gen), minlength=E).cumsum(0).to(torch.int32)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            out.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ref, start = [], 0
    for e, end in enumerate(offs.tolist()):
        ref.append(x[start:end].float() @ w[e].float().T)
        start = end
    return {"out_rel": rel(out, torch.cat(ref)), "syncs": sum("synchroniz" in str(m.message) for m in seen)}


def main() -> None:
    run("env", env)
    if not torch.cuda.is_available():
        emit("stop", reason="no CUDA device: the kernel checks need one")
        return
    run("varlen_mha", lambda: varlen_case(8, 8))
    run("varlen_gqa", lambda: varlen_case(8, 2))
    run("varlen_gqa_window", lambda: varlen_case(8, 2, window=64))
    run("sdpa_causal_one_document", lambda: sdpa_ops(packed=False))
    run("sdpa_packed_gqa_dense_mask", lambda: sdpa_ops(packed=True))
    run("grouped_mm_bf16", lambda: grouped_mm(torch.bfloat16))
    run("flex_gqa", lambda: flex_case(8, 2))
    run("flex_gqa_window", lambda: flex_case(8, 2, window=64))


if __name__ == "__main__":
    main()
