"""The chunked output layer + cross-entropy (trainer.loss_chunk_size) on a CUDA device: equal to the unchunked
loss and gradients in fp32 and bf16 (autocast), also at the labelled positions only (label_index), and the
peak device memory of the loss is one chunk's. CPU tests (tests/unit/test_chunked_loss.py,
tests/unit/test_label_index.py) prove the same logic; these check CUDA's kernels and allocator.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import ModelConfig
from trainer.loss import IGNORE_INDEX, count_valid, label_index
from trainer.model import GPTModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ModelConfig(vocab_size=1000, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                   num_query_groups=2)
PADDED = 1024
B, S, CHUNK = 4, 250, 384  # 1000 tokens: the last chunk is partial


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    labels[0, :100] = IGNORE_INDEX
    labels[1, :200] = IGNORE_INDEX  # a chat row: mostly prompt
    labels[2, :40] = IGNORE_INDEX
    labels[3, 200:230] = IGNORE_INDEX  # K = 220: label_index selects 880 of the 1000 positions (896 padded)
    return {"tokens": torch.randint(0, TINY.vocab_size, (B, S), generator=gen).to(device),
            "labels": labels.to(device)}


def _run(chunk: int, tied: bool, precision: str, select: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    device = torch.device("cuda")
    model = GPTModel(dataclasses.replace(TINY, tie_word_embeddings=tied), PADDED, seed=3).to(device)
    model.loss_chunk_size = chunk
    batch = _batch(device)
    index = label_index(batch["labels"].cpu()).to(device) if select else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        losses = model(batch["tokens"], labels=batch["labels"], label_index=index)
        (losses.sum() / count_valid(batch["labels"])).backward()
    return losses.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("select", [False, True], ids=["every_position", "labelled_only"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_equals_unchunked_on_cuda(precision, tied, select):
    """fp32 (TF32 off): 1e-5, since cuBLAS may pick another kernel for a chunk's row count than for all
    tokens. bf16: the logits are bf16, so a differently blocked matmul can move them by a bf16 ulp
    (losses 2e-2); gradients sum bf16 products in another order (2e-2 relative + 2e-3)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want_losses, want_grads = _run(0, tied, precision)
        losses, grads = _run(CHUNK, tied, precision, select)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert losses.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(losses, want_losses, **tol)
    gtol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, **gtol, msg=lambda m: f"{name}: {m}")


def _loss_peak_bytes(chunk: int) -> int:
    """Peak device memory of forward + backward above what the model and batch hold before it."""
    cfg = dataclasses.replace(TINY, vocab_size=128256, hidden_size=256, ffn_hidden_size=704, num_layers=1)
    model = GPTModel(cfg, seed=0).cuda()
    model.loss_chunk_size = chunk
    gen = torch.Generator().manual_seed(0)
    # 8192 tokens as 2 rows of 4096, so attention (quadratic in the row length) stays small beside the loss.
    tokens, labels = (torch.randint(0, cfg.vocab_size, (2, 4096), generator=gen).cuda() for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(tokens, labels=labels).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    return peak


def test_chunked_loss_peak_memory_on_cuda():
    """8192 tokens x 128256 vocab: each fp32 [tokens, vocab] tensor of the unchunked loss is 4.2 GB and
    several coexist in backward; chunked by 1024 they are 8x smaller, so the step's peak must fall to well
    under the unchunked one's (0.4x leaves room for gradients, weights' casts and the allocator's rounding)."""
    whole, chunked = _loss_peak_bytes(0), _loss_peak_bytes(1024)
    assert whole > 2 * 8192 * 128256 * 4, f"the unchunked step should hold several logits-sized tensors: {whole}"
    assert chunked <= 0.4 * whole, f"chunked peak {chunked / 2**30:.2f} GiB vs unchunked {whole / 2**30:.2f} GiB"
