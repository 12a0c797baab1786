"""Overlapped, memory-bounded I/O for the converters: reading and converting in one thread while others write.

A conversion is a stream of tensors: read (memory-mapped pages, DCP chunks), converted (fuse, split, shard: one
copy each), written (a safetensors offset, a DCP chunk, a torch.save record). Run in one thread those steps
take turns; torch releases the GIL in copies and file I/O, so a producer thread ahead of the writer(s) keeps both
cores busy. `Channel` hands tensors over with at most `max_bytes` of them in flight: memory stays bounded by that,
not by the model. `save_streamed` is torch.save whose storage records are filled as they are written, so a
Megatron rank file is written without its whole state dict in memory, and `drop_pages` hands back the pages of a
memory-mapped tensor once it is read, so a long-lived mapping does not grow the process to the checkpoint's size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import pickle
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch

T = TypeVar("T")

# Tensors in flight between the reading and the writing threads: enough to keep both busy (a 7B layer's largest
# tensor, fc1, is 180 MB); a single larger item (a 70B model's fc1, 0.9 GiB) still passes, alone.
DEFAULT_INFLIGHT_BYTES = 256 * 2**20
# Items in flight, whatever their size: a tensor read through safetensors keeps its whole file mapped (address
# space, not memory) while it lives, and a stream of small ones must not hold hundreds of mappings.
DEFAULT_INFLIGHT_ITEMS = 16
_POLL_S = 0.5  # how often a blocked side looks whether the other failed


class ChannelClosed(Exception):
    """The other side of a Channel failed or stopped; its own error is raised there."""


class Channel:
    """Items from one producer to `consumers` consumers (each its own FIFO), at most `max_bytes` and `max_items`
    in flight.

    An item counts from `put` until its consumer asks for the next one (it is written by then). A single item
    larger than the budget passes when nothing else is in flight, so the stream never stalls. `close(error)`
    ends every queue; a consumer that fails calls `abort`, and the producer's next `put` raises."""

    def __init__(self, consumers: int = 1, max_bytes: int = DEFAULT_INFLIGHT_BYTES,
                 max_items: int = DEFAULT_INFLIGHT_ITEMS):
        self.queues = [deque() for _ in range(consumers)]
        self.held = [None] * consumers  # (bytes) of the item each consumer is working on
        self.max, self.used, self.max_items, self.items_used = max_bytes, 0, max_items, 0
        self.cond = threading.Condition()
        self.done, self.error, self.aborted = False, None, False

    def put(self, consumer: int, item, nbytes: int) -> None:
        with self.cond:
            while not (self.items_used == 0 or (self.used + nbytes <= self.max and self.items_used < self.max_items)):
                if self.aborted:
                    raise ChannelClosed("a writer stopped")
                self.cond.wait(_POLL_S)
            if self.aborted:
                raise ChannelClosed("a writer stopped")
            self.used, self.items_used = self.used + nbytes, self.items_used + 1
            self.queues[consumer].append((item, nbytes))
            self.cond.notify_all()

    def get(self, consumer: int):
        """The next item for `consumer`; StopIteration at the end of the stream."""
        with self.cond:
            if self.held[consumer] is not None:
                self.used, self.items_used = self.used - self.held[consumer], self.items_used - 1
                self.held[consumer] = None
                self.cond.notify_all()
            while not self.queues[consumer]:
                if self.error is not None or self.aborted:
                    raise ChannelClosed("the reader stopped") from self.error
                if self.done:
                    raise StopIteration
                self.cond.wait(_POLL_S)
            item, self.held[consumer] = self.queues[consumer].popleft()
            return item

    def close(self, error: Optional[BaseException] = None) -> None:
        with self.cond:
            self.done, self.error = True, error
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.queues = [deque() for _ in self.queues]
            self.cond.notify_all()

    def items(self, consumer: int = 0) -> Iterator:
        while True:
            try:
                yield self.get(consumer)
            except StopIteration:
                return


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def read_ahead(items: Iterable[T], size: Callable[[T], int], max_bytes: int = DEFAULT_INFLIGHT_BYTES
               ) -> Iterator[T]:
    """`items`, produced in a thread of their own up to `max_bytes` ahead of the caller's loop. The producer's
    exception is raised here; leaving the loop early stops the producer."""
    channel = Channel(1, max_bytes)

    def produce() -> None:
        try:
            for item in items:
                channel.put(0, item, size(item))
        except ChannelClosed:
            channel.close()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            channel.close(e)
        else:
            channel.close()

    thread = threading.Thread(target=produce, name="convert-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = channel.get(0)
            except StopIteration:
                return
            except ChannelClosed:
                raise channel.error from None
            yield item
            del item
    finally:
        channel.abort()
        thread.join(timeout=60)


@contextmanager
def one_op_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside: the converters' parallelism is their reader and writer threads
    (copies are memory-bound), and OpenMP workers competing with them on a busy machine only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ===================================================================================== memory-mapped pages

_libc = None
if hasattr(mmap, "MADV_DONTNEED"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        _libc = None


def drop_pages(t: torch.Tensor) -> None:
    """Unmap the pages of a tensor that views a read-only file mapping (torch.load(mmap=True)) from this process.

    The file's pages stay in the page cache and come back on the next access; the process's resident size no longer
    counts them. Only whole pages inside the tensor's bytes are dropped, and only for mappings nobody writes to
    (MAP_PRIVATE, never written: dropping a written page would lose the write). No-op where madvise is missing."""
    if _libc is None or not t.numel():
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + nbytes(t)
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc.madvise(first, last - first, mmap.MADV_DONTNEED)


# ======================================================================================= streamed torch.save


def save_streamed(path: Path, obj: dict, placeholders: dict[str, torch.Tensor],
                  records: Iterator[tuple[str, torch.Tensor]]) -> None:
    """torch.save(obj, path), the same bytes, with each tensor's data taken from `records` as its record is written.

    `obj` holds `placeholders` (name -> tensor of the right shape and dtype; torch.empty: their pages are never
    touched, so never resident). torch.save writes one record per storage
    in the order the pickle meets them; `records` yields (name, tensor) in that order, each tensor with storage of
    its own (contiguous, from offset 0), and only it is in memory while it is written."""
    save, open_zip = getattr(torch.serialization, "_save", None), getattr(torch.serialization, "_open_zipfile_writer",
                                                                          None)
    if save is None or open_zip is None:  # another torch: fill the placeholders, then torch.save them whole
        for name, t in records:
            placeholders[name].copy_(t)
        torch.save(obj, path)
        return
    by_ptr = {t.data_ptr(): name for name, t in placeholders.items() if isinstance(t, torch.Tensor)}

    class _Filling:
        """torch's zip writer, with the bytes of each storage record taken from `records`."""

        def __init__(self, zip_file):
            self.zip = zip_file

        def write_record(self, name, data, size):
            if name.startswith("data/"):
                want = by_ptr.get(data.data_ptr())
                got, t = next(records)
                if got != want or nbytes(t) != size or t.storage_offset() or t.untyped_storage().nbytes() != size:
                    raise RuntimeError(f"{path}: record {name} is {want}, but the stream gave {got} "
                                       f"({nbytes(t)} of {size} bytes)")
                data = t.untyped_storage()
            self.zip.write_record(name, data, size)

        def __getattr__(self, attr):
            return getattr(self.zip, attr)

    with open_zip(str(path)) as zip_file:
        save(obj, _Filling(zip_file), pickle, torch.serialization.DEFAULT_PROTOCOL, False)
