"""model.attention_backend: the host-made attention metadata, the per-micro-batch kernel choice, refusals,
and every kernel's mask logic against the dense reference (allowed_mask) on CPU.

flex_attention runs forward on CPU (no backward), so flex is compared under no_grad; varlen_attn is CUDA
only, so its plumbing (flattening, cu_seqlens, flash's window convention) runs here with a reference
kernel standing in for flash. The real kernels are checked in tests/gpu/test_cuda_attention.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainer import torch_compat
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.data.attention_meta import attention_metadata, document_run_lengths, one_document_rows
from trainer.data.packing import PAD_DOC
from trainer.model import GPTModel
from trainer.model import attention as attn
from trainer.model.attention import (TokenLayout, allowed_mask, check_attention_backend, choose_kernel,
                                     cu_seqlens, varlen_tokens, varlen_window)

TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                   num_query_groups=2)
P = PAD_DOC


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    # Eager flex on CPU warns that it is the unfused reference; that is what these tests want.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


# ------------------------------------------------------------------------------- attention_metadata


def _batch(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    d = torch.tensor(docs)
    return {"input_ids": torch.zeros_like(d), "labels": torch.zeros_like(d), "document_ids": d}


def test_packed_rows_get_run_lengths_zero_padded_to_the_most_runs():
    batch = _batch([[0, 0, 0, 1, 1, P, P, P],
                    [0, 0, 0, 0, 0, 0, 0, 0],
                    [P, P, 0, 0, 1, 2, 2, 2]])
    out = attention_metadata(batch, context_parallel=False)
    assert out["doc_lens"].dtype == torch.int32
    assert out["doc_lens"].tolist() == [[3, 2, 3, 0], [8, 0, 0, 0], [2, 2, 1, 3]]
    assert out["document_ids"] is batch["document_ids"] and out["input_ids"] is batch["input_ids"]
    assert "doc_lens" not in batch  # the input dict is not modified


def test_one_document_rows_drop_document_ids():
    batch = _batch([[0, 0, 0, 0, 0, P, P, P], [0] * 8, [P] * 8])
    out = attention_metadata(batch, context_parallel=False)
    assert set(out) == {"input_ids", "labels"}
    # Under cp the drop applies too (cp then attends plain causal across ranks).
    assert set(attention_metadata(batch, context_parallel=True)) == {"input_ids", "labels"}


@pytest.mark.parametrize("row, single", [
    ([0, 0, 0, 0], True),
    ([3, 3, P, P], True),
    ([P, P, P, P], True),
    ([P, 0, 0, 0], False),   # leading padding: the document would see it under a causal mask
    ([0, 0, 1, 1], False),
    ([0, P, 0, 0], False),   # padding inside a row
    ([0, 0, P, 1], False),
])
def test_one_document_rule(row, single):
    assert one_document_rows(torch.tensor([row])).tolist() == [single]


def test_context_parallel_keeps_document_ids_without_doc_lens():
    batch = _batch([[0, 0, 1, 1], [0, 0, 0, 0]])
    out = attention_metadata(batch, context_parallel=True)
    assert set(out) == {"input_ids", "labels", "document_ids"}


def test_run_lengths_match_a_per_token_reference_on_random_packings():
    gen = torch.Generator().manual_seed(0)
    B, S = 6, 40
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randperm(S - 1, generator=gen)[:int(torch.randint(0, 6, (1,), generator=gen))] + 1)
        ids = torch.zeros(S, dtype=torch.long)
        for i, c in enumerate(cuts):
            ids[c:] = i + 1
        ids[S - int(torch.randint(0, 5, (1,), generator=gen)):] = P
        rows.append(ids)
    docs = torch.stack(rows)
    expected = []
    for row in docs.tolist():  # the slow reference: walk the tokens
        runs = [1]
        for a, b in zip(row, row[1:]):
            runs[-1:] = [runs[-1] + 1] if a == b else [runs[-1], 1]
        expected.append(runs)
    K = max(map(len, expected))
    got = document_run_lengths(docs)
    assert got.tolist() == [r + [0] * (K - len(r)) for r in expected]
    assert (got.sum(1) == S).all()


def test_local_batch_adds_the_metadata_on_the_host_before_the_cp_split():
    from trainer.step import local_batch

    pm = SimpleNamespace(dims=SimpleNamespace(dp=1, cp_enabled=False), mesh=None)
    packed = local_batch(_batch([[0, 0, 1, 1], [0, 0, 0, P]]), pm)
    assert packed["doc_lens"].tolist() == [[2, 2], [3, 1]] and "document_ids" in packed
    single = local_batch(_batch([[0, 0, 0, 0], [0, 0, 0, P]]), pm)
    assert "document_ids" not in single and "doc_lens" not in single and "position_ids" in single


def test_attention_metadata_refuses_device_tensors():
    batch = _batch([[0, 1]])
    batch["document_ids"] = batch["document_ids"].to("meta")
    with pytest.raises(ValueError, match="on the host"):
        attention_metadata(batch, context_parallel=False)


# ----------------------------------------------------------------------------------- kernel choice


class _OnCuda:
    """Stands in for a CUDA tensor: choose_kernel reads only shape, device and dtype (host facts)."""

    def __init__(self, B=2, H=4, S=16, d=8, dtype=torch.bfloat16):
        self.shape, self.dtype, self.device = (B, H, S, d), dtype, torch.device("cuda")


def _layout(packed=False, doc_lens=True, window=None, backend="auto", cp=False) -> TokenLayout:
    docs = torch.tensor([[0] * 8 + [1] * 8] * 2) if packed else None
    lens = torch.tensor([[8, 8]] * 2, dtype=torch.int32) if packed and doc_lens else None
    seq_index = torch.arange(16).expand(2, 16) if cp else None
    return TokenLayout(seq_index, docs, window, lens, backend=backend)


def test_auto_on_cpu_is_always_sdpa():
    q, k = torch.zeros(2, 4, 16, 8), torch.zeros(2, 2, 16, 8)
    for layout in (_layout(), _layout(packed=True), _layout(window=4), _layout(cp=True)):
        assert choose_kernel(layout, q, k, context_parallel=layout.seq_index is not None) == "sdpa"


def test_auto_on_cuda_picks_per_micro_batch():
    q, k = _OnCuda(), _OnCuda(H=2)
    assert choose_kernel(_layout(), q, k) == "sdpa"                        # one document per row
    assert choose_kernel(_layout(window=32), q, k) == "sdpa"               # window covers the row
    assert choose_kernel(_layout(window=4), q, k) == "varlen"              # window bites
    assert choose_kernel(_layout(packed=True), q, k) == "varlen"
    assert choose_kernel(_layout(packed=True, doc_lens=False), q, k) == "flex"  # no host run lengths
    assert choose_kernel(_layout(cp=True), q, k, context_parallel=True) == "flex"
    assert choose_kernel(_layout(packed=True, cp=True), q, k, context_parallel=True) == "flex"
    fp32 = _OnCuda(dtype=torch.float32)  # flash needs half precision; without autocast: flex
    assert choose_kernel(_layout(packed=True), fp32, k) == "flex"


def test_auto_falls_back_to_flex_on_a_torch_without_usable_varlen(monkeypatch):
    monkeypatch.setattr(attn, "varlen_missing", lambda: "torch 2.x has no varlen_attn")
    assert choose_kernel(_layout(packed=True), _OnCuda(), _OnCuda(H=2)) == "flex"


def test_explicit_backends_are_kept():
    q = torch.zeros(2, 4, 16, 8)
    for backend in ("sdpa", "flex", "varlen"):
        assert choose_kernel(_layout(packed=True, backend=backend), q, q) == backend


# varlen_attn's signature in each release (parameters after the seven positional ones).
def _varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
    raise AssertionError("signature only")


def _varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
    raise AssertionError("signature only")


def _varlen_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    raise AssertionError("signature only")


@pytest.fixture
def installed_varlen(monkeypatch):
    """installed_varlen(fn): make fn this torch's varlen_attn (None: no varlen module) for the detection."""
    import torch.nn.attention.varlen as varlen_mod

    def install(fn):
        if fn is None:
            monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)
        else:
            monkeypatch.setattr(varlen_mod, "varlen_attn", fn)
        torch_compat.varlen_params.cache_clear()

    yield install
    monkeypatch.undo()
    torch_compat.varlen_params.cache_clear()


@pytest.mark.parametrize("release", [_varlen_2_11, _varlen_2_13], ids=["2.11", "2.13"])
def test_auto_picks_varlen_for_packed_gqa_rows_on_cuda_with_every_supported_torch(installed_varlen, release):
    installed_varlen(release)
    assert torch_compat.varlen_missing() is None
    q, k = _OnCuda(H=4), _OnCuda(H=2)  # grouped-query: 2 query heads per k/v head
    assert choose_kernel(_layout(packed=True), q, k) == "varlen"
    assert choose_kernel(_layout(packed=True, window=4), q, k) == "varlen"
    check_attention_backend(dataclasses.replace(TINY, attention_backend="varlen"), "cuda")
    check_attention_backend(dataclasses.replace(TINY, attention_backend="varlen", sliding_window=8), "cuda")
    # 2.13 takes the flag; 2.11 has none and flash takes the grouped heads as they are.
    gqa = torch_compat.varlen_kwargs((-1, 0), gqa=True)
    assert gqa == ({"window_size": (-1, 0), "enable_gqa": True} if release is _varlen_2_13
                   else {"window_size": (-1, 0)})
    assert torch_compat.varlen_kwargs((3, 0), gqa=False) == {"window_size": (3, 0)}


def test_the_installed_torch_runs_varlen_for_gqa():
    """No supported release refuses varlen: its signature has window_size (and enable_gqa or not)."""
    torch_compat.varlen_params.cache_clear()
    assert torch_compat.varlen_missing() is None
    assert "window_size" in torch_compat.varlen_params()


def test_a_torch_without_window_size_or_varlen_is_refused_naming_the_release_needed(installed_varlen):
    installed_varlen(_varlen_2_9)
    missing = torch_compat.varlen_missing()
    assert "window_size" in missing and torch.__version__ in missing and ">= 2.11" in missing
    with pytest.raises(ConfigError, match=re.escape(missing) + ".*flex"):
        check_attention_backend(dataclasses.replace(TINY, attention_backend="varlen"), "cuda")
    assert choose_kernel(_layout(packed=True), _OnCuda(), _OnCuda(H=2)) == "flex"
    installed_varlen(None)
    assert "has no torch.nn.attention.varlen" in torch_compat.varlen_missing()


# -------------------------------------------------------------------------------------- refusals


def test_flex_and_varlen_are_refused_on_cpu():
    with pytest.raises(ConfigError, match="flex needs CUDA.*no backward on CPU"):
        check_attention_backend(dataclasses.replace(TINY, attention_backend="flex"), "cpu")
    with pytest.raises(ConfigError, match="varlen needs CUDA.*CUDA-only"):
        check_attention_backend(dataclasses.replace(TINY, attention_backend="varlen"), "cpu")
    for ok in ("auto", "sdpa"):
        check_attention_backend(dataclasses.replace(TINY, attention_backend=ok), "cpu")


def test_varlen_is_refused_under_cp_and_on_a_torch_without_it(monkeypatch):
    cfg = dataclasses.replace(TINY, attention_backend="varlen")
    check_attention_backend(cfg, "cuda")
    check_attention_backend(dataclasses.replace(TINY, attention_backend="flex"), "cuda", context_parallel=True)
    with pytest.raises(ConfigError, match="context parallelism"):
        check_attention_backend(cfg, "cuda", context_parallel=True)
    monkeypatch.setattr(attn, "varlen_missing", lambda: f"torch {torch.__version__} lacks it")
    with pytest.raises(ConfigError, match=re.escape(f"torch {torch.__version__} lacks it") + ".*flex"):
        check_attention_backend(cfg, "cuda")


def test_cli_exits_2_for_flex_on_cpu(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}", "trainer.device=cpu",
           "model.attention_backend=flex", "logging.wandb=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "attention_backend=flex needs CUDA" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- kernels vs dense reference


def _model(backend: str, **cfg) -> GPTModel:
    return GPTModel(dataclasses.replace(TINY, attention_backend=backend, **cfg), seed=3).eval()


def _inputs(B=2, S=32, docs=((10, 14, 8), (32,)), seed=0):
    """Tokens, restarting position_ids and document_ids (-1 for what the lengths leave) per row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    doc, pos = torch.full((B, S), P), torch.zeros(B, S, dtype=torch.long)
    for r, lengths in enumerate(docs):
        start = 0
        for i, n in enumerate(lengths):
            doc[r, start:start + n], pos[r, start:start + n] = i, torch.arange(n)
            start += n
    return ids, pos, doc


@pytest.mark.parametrize("cfg", [{}, {"num_query_groups": 4}, {"sliding_window": 5},
                                 {"sliding_window": 6, "num_query_groups": 1}], ids=["gqa", "mha", "window", "mqa"])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@torch.no_grad()
def test_flex_forward_matches_the_dense_reference(cfg, packed):
    ids, pos, doc = _inputs(docs=((10, 14, 8), (20, 12)) if packed else ((32,), (32,)))
    kwargs = {"position_ids": pos, "document_ids": doc} if packed else {}
    ref = _model("sdpa", **cfg)(ids, **kwargs)
    model = _model("flex", **cfg)
    torch.testing.assert_close(model(ids, **kwargs), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_flex_block_mask_is_built_once_per_forward(monkeypatch):
    calls = []
    real = attn.flex_block_mask
    monkeypatch.setattr(attn, "flex_block_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, pos, doc = _inputs()
    _model("flex", num_layers=3)(ids, position_ids=pos, document_ids=doc)
    assert len(calls) == 1


@torch.no_grad()
def test_sdpa_causal_on_one_document_rows_equals_the_dense_mask():
    ids, pos, doc = _inputs(docs=((32,), (27,)))  # row 1 ends in 5 padding slots
    model = _model("sdpa")
    dense = model(ids, position_ids=pos, document_ids=doc)
    batch = attention_metadata({"input_ids": ids, "position_ids": pos, "document_ids": doc}, False)
    assert "document_ids" not in batch  # so the model takes is_causal=True
    causal = model(ids, position_ids=pos)
    real = doc >= 0  # padding slots (no labels) may differ: under the dense mask they see only padding
    torch.testing.assert_close(causal[real], dense[real], rtol=1e-5, atol=1e-5)


def test_sdpa_takes_is_causal_exactly_when_the_layout_is_plain(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append((k.get("is_causal"), k.get("attn_mask") is None)) or real(*a, **k))
    ids, pos, doc = _inputs()
    model = _model("sdpa")
    with torch.no_grad():
        model(ids)
        assert seen == [(True, True)] * 2
        seen.clear()
        model(ids, position_ids=pos, document_ids=doc)
        assert seen == [(None, False)] * 2


def test_sdpa_with_a_mask_repeats_grouped_heads_exactly_like_enable_gqa():
    """On CUDA a dense mask with grouped k/v heads repeats the heads first (so the memory-efficient kernel,
    not the math one, takes it): the same pairing as enable_gqa, checked here with the expansion forced."""
    gen = torch.Generator().manual_seed(2)
    B, H, G, S, d = 2, 6, 2, 10, 8
    q, k, v = (torch.randn(B, h, S, d, generator=gen) for h in (H, G, G))
    i = torch.arange(S).expand(B, S)
    doc = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    mask = allowed_mask(i, i, 3, doc, doc)
    grouped = attn.sdpa_forward(q, k, v, mask, expand_groups=False)
    torch.testing.assert_close(attn.sdpa_forward(q, k, v, mask, expand_groups=True), grouped, rtol=0, atol=1e-6)
    assert torch.equal(attn.sdpa_forward(q, k, v, mask), grouped)  # on CPU the default keeps enable_gqa


# ------------------------------------------------------------------------------------------- varlen


def test_cu_seqlens_is_the_exclusive_cumsum_of_the_flattened_run_lengths():
    lens = torch.tensor([[3, 2, 3], [8, 0, 0]], dtype=torch.int32)
    cu = cu_seqlens(lens, 2, 8, torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 8, 16, 16, 16]
    assert cu_seqlens(None, 3, 8, torch.device("cpu")).tolist() == [0, 8, 16, 24]


@pytest.mark.parametrize("window, seq_len", [(None, 16), (0, 16), (5, 16), (1, 16), (16, 16), (20, 16)])
def test_varlen_window_is_flashs_convention_for_our_rule(window, seq_len):
    """Flash (and varlen_attn's docstring): query i sees keys in [i - left, i + right], -1 = unbounded."""
    left, right = varlen_window(window, seq_len)
    i = torch.arange(seq_len)
    q, k = i[:, None], i[None, :]
    flash = (k <= q + right) & ((k >= q - left) if left >= 0 else True)
    assert torch.equal(flash, allowed_mask(i[None], i[None], window)[0, 0])


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's contract on CPU: each [cu[n], cu[n+1]) is its own sequence; flash's window rule."""
    assert q.dim() == 3 and torch.equal(cu_q, cu_k) and max_q == max_k
    out = torch.zeros_like(q)
    for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        if b > a:
            i = torch.arange(b - a)
            left, right = window_size
            mask = (i[None] <= i[:, None] + right) & ((i[None] >= i[:, None] - left) if left >= 0 else True)
            out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                      v[a:b].transpose(0, 1), attn_mask=mask,
                                                      enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_varlen_plumbing_matches_the_dense_reference(window):
    """Flattening to tokens, cu_seqlens from doc_lens and the window tuple, with a reference kernel."""
    gen = torch.Generator().manual_seed(1)
    B, H, G, S, d = 2, 4, 2, 12, 8
    q, k, v = (torch.randn(B, h, S, d, generator=gen) for h in (H, G, G))
    doc = torch.tensor([[0] * 5 + [1] * 4 + [P] * 3, [0] * 12])
    lens = document_run_lengths(doc)
    cu = cu_seqlens(lens, B, S, q.device)
    got = varlen_tokens(_reference_varlen, q, k, v, cu, window_size=varlen_window(window, S), enable_gqa=True)
    i = torch.arange(S).expand(B, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_mask(i, i, window, doc, doc), enable_gqa=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_varlen_forward_refuses_cpu_and_missing_doc_lens():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="CUDA-only"):
        attn.varlen_forward(q, q, q, TokenLayout(backend="varlen"))
    with pytest.raises(ValueError, match="needs doc_lens"):
        attn.varlen_forward(q, q, q, TokenLayout(document_ids=torch.zeros(1, 4, dtype=torch.long), backend="varlen"))
