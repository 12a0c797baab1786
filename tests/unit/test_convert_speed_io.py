"""checkpoint_convert.parallel_io: the overlapped, bounded I/O the converters stream through."""

from __future__ import annotations

import threading

import pytest
import torch

from checkpoint_convert.megatron_common import MetaShapes, meshtron_shapes
from checkpoint_convert.parallel_io import Channel, drop_pages, read_ahead, save_streamed
from trainer.config import ModelConfig


def test_read_ahead_keeps_order_bounds_memory_and_raises_the_producers_error():
    seen, ahead = [], []

    def items():
        for i in range(50):
            ahead.append(i)
            yield i, torch.full((256,), i, dtype=torch.uint8)
    for i, t in read_ahead(items(), lambda item: item[1].numel(), max_bytes=1024):
        assert len(ahead) - i <= 1024 // 256 + 1  # never more than the budget ahead of the consumer
        seen.append(int(t[0]))
    assert seen == list(range(50))

    def failing():
        yield 1
        raise KeyError("boom")
    with pytest.raises(KeyError, match="boom"):
        list(read_ahead(failing(), lambda item: 1))


def test_an_item_larger_than_the_budget_still_passes_alone():
    assert [len(x) for x in read_ahead(iter([b"x" * 10, b"y" * 3]), len, max_bytes=4)] == [10, 3]


def test_channel_fans_out_to_consumers_and_a_failing_consumer_stops_the_producer():
    channel, got = Channel(2, max_bytes=10), [[], []]

    def consume(r):
        for item in channel.items(r):
            got[r].append(item)
    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for i in range(20):
        channel.put(i % 2, i, 3)
    channel.close()
    for t in threads:
        t.join(10)
    assert got == [list(range(0, 20, 2)), list(range(1, 20, 2))]

    stalled = Channel(1, max_bytes=1)
    stalled.put(0, "a", 1)
    stalled.abort()
    with pytest.raises(Exception, match="writer stopped"):
        stalled.put(0, "b", 1)


def test_save_streamed_writes_the_bytes_torch_save_writes(tmp_path):
    real = {"a.weight": torch.randn(4, 8), "a._extra_state": None, "b.weight": torch.arange(6, dtype=torch.int64)}
    model = {k: torch.empty(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for k, v in real.items()}
    records = iter([(k, v.clone()) for k, v in real.items() if isinstance(v, torch.Tensor)])
    (tmp_path / "streamed").mkdir()
    (tmp_path / "whole").mkdir()
    save_streamed(tmp_path / "streamed" / "m.pt", {"model": model, "iteration": 0}, model, records)
    torch.save({"model": real, "iteration": 0}, tmp_path / "whole" / "m.pt")  # the archive is named after the file
    loaded = torch.load(tmp_path / "streamed" / "m.pt", weights_only=True)["model"]
    assert all(torch.equal(loaded[k], real[k]) for k in ("a.weight", "b.weight"))
    assert (tmp_path / "streamed" / "m.pt").read_bytes() == (tmp_path / "whole" / "m.pt").read_bytes()
    out_of_order = iter([(k, real[k].clone()) for k in ("b.weight", "a.weight")])
    with pytest.raises(RuntimeError, match="record data/0 is a.weight"):
        save_streamed(tmp_path / "bad.pt", {"model": model}, model, out_of_order)


def test_drop_pages_leaves_mapped_tensors_readable(tmp_path):
    torch.save({"t": torch.arange(1 << 16, dtype=torch.float32)}, tmp_path / "m.pt")
    t = torch.load(tmp_path / "m.pt", mmap=True, weights_only=True)["t"]
    before = t.clone()
    drop_pages(t)
    assert torch.equal(t, before)  # the pages come back from the file


def test_meta_shapes_match_torch_and_refuse_what_torch_cat_refuses():
    a, b = torch.empty(3, 4, device="meta"), torch.empty(5, 4, device="meta", dtype=torch.bfloat16)
    with MetaShapes():
        c = torch.cat([a, b])
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            torch.cat([a, torch.empty(2, 3, device="meta")])
    assert (c.shape, c.dtype, c.is_meta) == (torch.Size([8, 4]), torch.float32, True)
    cfg = ModelConfig(name="t", family="llama", vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                      num_attention_heads=4, num_query_groups=2, max_position_embeddings=64)
    from trainer.model import GPTModel
    with torch.device("meta"):
        want = {n: (p.shape, p.dtype) for n, p in GPTModel(cfg).named_parameters()}
    got = meshtron_shapes(cfg)
    assert {n: (p.shape, p.dtype) for n, p in got.items()} == want and all(p.is_meta for p in got.values())
