"""The chunked output layer + cross-entropy (trainer.loss_chunk_size) on one process.

Chunked and unchunked runs of the same model and batch must give the same per-token losses and the same
gradient for every parameter (fp32: 1e-6), whether or not the chunk size divides the token count, with
ignored labels (a whole chunk of them included), padded vocabulary rows and tied or untied embeddings;
under bf16 autocast they agree within bf16 rounding. A dispatch-mode tracker shows that the tensors as wide
as the vocabulary that are alive at any moment, forward and backward, are one chunk's.
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from parallel.dims import ParallelDims
from parallel.parallelize import build_parallel_model
from trainer.config import ModelConfig
from trainer.loss import IGNORE_INDEX, DocumentLoss, count_valid
from trainer.model import GPTModel
from trainer.model.gpt import loss_chunk

TINY = ModelConfig(vocab_size=100, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                   num_query_groups=2)
PADDED = 112
SEED, B, S = 5, 4, 9  # 36 tokens: chunk sizes 6, 9, 12, 18 divide it, 5, 7 and 16 do not
N = B * S


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    labels[0, :7] = IGNORE_INDEX   # with chunk 7: a chunk with no valid token at all
    labels[2, 4] = IGNORE_INDEX
    labels[3, -1] = IGNORE_INDEX
    return {"tokens": torch.randint(0, TINY.vocab_size, (B, S), generator=gen), "labels": labels,
            "sample_ids": torch.tensor([[0] * 5 + [1] * 4, [1] * 9, [2] * 3 + [3] * 6, [3] * 9])}


def _model(chunk: int, tied: bool, padded: bool) -> GPTModel:
    model = GPTModel(dataclasses.replace(TINY, tie_word_embeddings=tied), PADDED if padded else None, seed=SEED)
    model.loss_chunk_size = chunk
    return model


def _run(model: GPTModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses and gradients of the step's loss (summed CE / valid tokens)."""
    losses = model(batch["tokens"], labels=batch["labels"])
    (losses.sum() / count_valid(batch["labels"])).backward()
    return losses.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied,padded", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["untied", "tied", "untied_padded", "tied_padded"])
@pytest.mark.parametrize("chunk", [5, 6, 7, 9, 16, 18, 36, 100])
def test_chunked_equals_unchunked_fp32(chunk, tied, padded):
    batch = _batch()
    want_losses, want_grads = _run(_model(0, tied, padded), batch)
    losses, grads = _run(_model(chunk, tied, padded), batch)
    assert losses.dtype == torch.float32 and losses.shape == (B, S)
    assert (losses[batch["labels"] == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if padded:
        vocab_rows = grads["embedding.word_embeddings.weight" if tied else "output_layer.weight"]
        assert (vocab_rows[TINY.vocab_size:] == 0).all(), "padded vocabulary rows must get no gradient"


def test_unchunked_token_losses_equal_cross_entropy_of_the_logits():
    """The reference side itself: per-token losses are F.cross_entropy of the model's logits."""
    batch = _batch()
    model = _model(0, tied=False, padded=True)
    logits = model(batch["tokens"])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    torch.testing.assert_close(model(batch["tokens"], labels=batch["labels"]), want.view(B, S), rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_bf16_autocast(tied):
    """Under autocast the chunk's matmul runs in bf16 and its cross-entropy in fp32: losses stay fp32 and
    match the unchunked bf16 run (1e-3; bitwise on this CPU: each token's logits are the same bf16 dot
    products) and the fp32 run within bf16's precision (5e-3 on losses ~4.6; measured 8e-4). Gradients sum
    bf16 products in another order: 1e-2 relative + 1e-3 absolute (measured: 5e-4 absolute)."""
    batch = _batch()
    fp32_losses, _ = _run(_model(0, tied, True), batch)
    runs = {}
    for chunk in (0, 7):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[chunk] = _run(_model(chunk, tied, True), batch)
    (want_losses, want_grads), (losses, grads) = runs[0], runs[7]
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, want_losses, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(losses, fp32_losses, rtol=5e-3, atol=5e-3)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")


def test_document_loss_equal():
    batch = _batch()
    values = []
    for chunk in (0, 7):
        losses, _ = _run(_model(chunk, tied=True, padded=True), batch)
        doc = DocumentLoss(batch["sample_ids"], torch.device("cpu"))
        doc.add(losses[:2], batch["labels"][:2], batch["sample_ids"][:2])  # two micro-batches
        doc.add(losses[2:], batch["labels"][2:], batch["sample_ids"][2:])
        values.append(doc.value(lambda t: t))
    assert values[1] == pytest.approx(values[0], rel=1e-6)


def test_no_grad_evaluation_equal():
    batch = _batch()
    with torch.no_grad():
        want = _model(0, False, True)(batch["tokens"], labels=batch["labels"])
        got = _model(7, False, True)(batch["tokens"], labels=batch["labels"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_chunk_fn_is_a_replaceable_attribute_not_state():
    """torch.compile replaces model.loss_chunk_fn; it is called once per chunk in forward and again per
    chunk by the backward recompute. Neither attribute reaches state_dict."""
    batch = _batch()
    model, calls = _model(7, tied=False, padded=False), []

    def counted(hidden, weight, labels, vocab_size):
        calls.append(hidden.shape[0])
        return loss_chunk(hidden, weight, labels, vocab_size)

    model.loss_chunk_fn = counted
    losses = model(batch["tokens"], labels=batch["labels"])
    assert calls == [7, 7, 7, 7, 7, 1]
    losses.sum().backward()
    assert sorted(calls) == sorted([7, 7, 7, 7, 7, 1] * 2)
    assert set(model.state_dict()) == set(_model(0, False, False).state_dict())


def test_build_parallel_model_sets_the_chunk_size(compose):
    cfg = compose("trainer.loss_chunk_size=7", "model.num_layers=2")
    pm = build_parallel_model(cfg, ParallelDims.from_config(cfg.parallel, 1), None, torch.device("cpu"))
    assert [m.loss_chunk_size for m in pm.modules] == [7]


# ------------------------------------------------------------------------------------ live logits


class LiveVocabRows(TorchDispatchMode):
    """Peak number of rows, summed over the tensors alive at one moment, of [rows, vocab] op outputs.

    Tensors are tracked by their storage (views share it) and dropped when their last Python tensor dies;
    torch keeps a tensor's Python object alive while autograd still holds the tensor (PyObject
    preservation), so saved activations count as alive. [hidden, vocab] outputs are the output weight's
    transpose and its gradient, not logits, so they are left out (no chunk here has hidden_size tokens).
    """

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden = vocab, hidden
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [live tensors, rows]
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key][0] -= 1
        if self.refs[key][0] == 0:
            del self.refs[key]

    def _token_rows(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == self.vocab and t.shape[0] != self.hidden

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in filter(self._token_rows, tree_leaves(out)):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self.refs.setdefault(key, [0, storage.nbytes() // (t.element_size() * self.vocab)])
            entry[0] += 1
            weakref.finalize(t, self._release, key)
            self.peak = max(self.peak, sum(rows for _, rows in self.refs.values()))
        return out


def _peak_rows(chunk: int) -> tuple[int, int]:
    batch = _batch()
    model = _model(chunk, tied=False, padded=True)
    tracker = LiveVocabRows(PADDED, TINY.hidden_size)
    with tracker:
        losses = model(batch["tokens"], labels=batch["labels"])
        forward = tracker.peak
        losses.sum().backward()
    return forward, tracker.peak


def test_at_most_one_chunk_of_logits_alive():
    """Whatever lives at the unchunked peak (logits, log-softmax, their gradients) is all N tokens wide;
    chunked, the same tensors exist for one chunk at a time, so the peak scales by chunk / N."""
    whole_fwd, whole_bwd = _peak_rows(0)
    assert whole_fwd >= 2 * N and whole_bwd >= whole_fwd, "the tracker must see the unchunked logits"
    for chunk in (6, 9, 5, 7):
        fwd, bwd = _peak_rows(chunk)
        assert fwd * N <= whole_fwd * chunk and bwd * N <= whole_bwd * chunk, (chunk, fwd, bwd)
        if N % chunk == 0:
            assert (fwd * N, bwd * N) == (whole_fwd * chunk, whole_bwd * chunk), (chunk, fwd, bwd)


def test_chunks_cover_every_token_once():
    """Chunk boundaries fall in the flattened token order, across rows."""
    batch = _batch()
    model, seen = _model(5, tied=False, padded=False), []

    def recording(hidden, weight, labels, vocab_size):
        seen.append(labels.clone())
        return loss_chunk(hidden, weight, labels, vocab_size)

    model.loss_chunk_fn = recording
    with torch.no_grad():
        model(batch["tokens"], labels=batch["labels"])
    assert torch.equal(torch.cat(seen), batch["labels"].flatten())
    assert [len(s) for s in seen] == [5] * 7 + [1]
