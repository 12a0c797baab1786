"""The output layer only where a label counts (trainer/loss.py label_index, selected_token_losses).

Chat SFT and preference rows are mostly prompt, whose labels are ignored; the selected path runs the
output layer and cross-entropy at the labelled positions only (padded with ignored ones to a multiple of
GPTModel.selection_multiple rows, or of the chunk when that is None, as under compile) and must give exactly
the per-token losses and gradients of running it everywhere (fp32: 1e-6), with tied or untied, padded or
unpadded vocabularies, whether or not the chunk divides the selection. Padded to whole chunks, every chunk it
runs has one static length (a compiled chunk is built once); it runs fewer rows than the full path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import ModelConfig
from trainer.loss import IGNORE_INDEX, count_valid, label_index, selected_token_losses
from trainer.model import GPTModel
from trainer.model.gpt import loss_chunk

TINY = ModelConfig(vocab_size=100, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                   num_query_groups=2)
PADDED = 112
B, S = 4, 12
PROMPTS = (7, 4, 9, 12)  # ignored leading labels per row: with [1, 10], 5, 7, 3 and 0 labelled (K = 7)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    labels = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    for row, prompt in enumerate(PROMPTS):
        labels[row, :prompt] = IGNORE_INDEX
    labels[1, 10] = IGNORE_INDEX  # an ignored label inside a completion (a turn's end, padding)
    return {"tokens": torch.randint(0, TINY.vocab_size, (B, S), generator=gen), "labels": labels}


def _model(chunk: int, tied: bool, padded: bool, calls: list) -> GPTModel:
    model = GPTModel(dataclasses.replace(TINY, tie_word_embeddings=tied), PADDED if padded else None, seed=3)
    model.loss_chunk_size = chunk

    def counting(hidden, weight, labels, vocab_size):
        calls.append(hidden.shape[0])
        return loss_chunk(hidden, weight, labels, vocab_size)

    model.loss_chunk_fn = counting
    return model


def _run(model: GPTModel, batch: dict, index) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses = model(batch["tokens"], labels=batch["labels"], label_index=index)
    (losses.sum() / count_valid(batch["labels"])).backward()
    return losses.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_label_index_lists_each_rows_labelled_positions_first():
    labels = _batch()["labels"]
    index = label_index(labels)
    assert index.dtype == torch.int64 and index.shape == (B, 7)
    for row in range(B):
        valid = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        got = index[row].tolist()
        assert got[:len(valid)] == valid, "labelled positions first, in order"
        assert all(labels[row, p] == IGNORE_INDEX for p in got[len(valid):]), "then ignored positions only"
        assert len(set(got)) == len(got), "no position twice"
    assert label_index(torch.zeros(2, 5, dtype=torch.int64)) is None, "nothing ignored: nothing to skip"
    assert label_index(torch.full((2, 3), IGNORE_INDEX)).shape == (2, 1)


# 48 tokens, 15 labelled, K = 7 so 28 selected, padded to a multiple of `multiple` rows (None: of the chunk, as
# under parallel.compile): 28, 36 or 32; where that reaches 48 (no saving) or with chunk 0 and None, the full path.
@pytest.mark.parametrize("tied,padded", [(False, False), (True, True)], ids=["untied", "tied_padded"])
@pytest.mark.parametrize("chunk,multiple,rows", [(5, 4, 28), (7, 7, 28), (12, None, 36), (16, None, 32),
                                                 (24, None, 48), (0, None, 48), (0, 8, 32), (5, 64, 48)])
def test_selected_equals_every_position(chunk, multiple, rows, tied, padded):
    batch = _batch()
    full_calls, calls = [], []
    want, want_grads = _run(_model(chunk, tied, padded, full_calls), batch, None)
    model = _model(chunk, tied, padded, calls)
    model.selection_multiple = multiple
    got, grads = _run(model, batch, label_index(batch["labels"]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[batch["labels"] == IGNORE_INDEX] == 0).all()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Forward and (chunked: activation checkpointing) the backward's recompute run the same chunks.
    runs = 2 if 0 < chunk < rows else 1
    assert sum(calls) == runs * rows and sum(full_calls) == (2 if chunk else 1) * B * S
    if chunk and multiple is None:
        assert set(calls) == {min(chunk, B * S)}, f"one static chunk length: {calls}"


def test_without_gradients_equal():
    batch = _batch()
    model = _model(5, tied=False, padded=False, calls=[])
    with torch.no_grad():
        want = model(batch["tokens"], labels=batch["labels"])
        got = model(batch["tokens"], labels=batch["labels"], label_index=label_index(batch["labels"]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_selected_token_losses_is_the_loss_at_the_selected_rows_only():
    """Direct: the chunk function sees exactly the labelled rows of hidden (then padding rows with ignored
    labels), and the positions outside the index get 0."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 4, generator=gen)
    weight = torch.randn(10, 4, generator=gen)
    labels = torch.tensor([[-100, -100, -100, 3, 4, -100], [-100, -100, -100, -100, -100, 7]])
    seen = []

    def fn(h, w, y, v):
        seen.append((h.clone(), y.clone()))
        return loss_chunk(h, w, y, v)

    out = selected_token_losses(fn, hidden, weight, labels, label_index(labels), 10, 2, 2)
    (h, y), = [(torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen]))]
    # K = 2: row 0 -> positions 3, 4; row 1 -> 5, then its first ignored position 0; 4 rows = 2 whole chunks.
    assert y.tolist() == [3, 4, 7, -100]
    torch.testing.assert_close(h, torch.stack([hidden[0, 3], hidden[0, 4], hidden[1, 5], hidden[1, 0]]))
    full = loss_chunk(hidden.flatten(0, 1), weight, labels.flatten(), 10).view(2, 6)
    torch.testing.assert_close(out, full)
