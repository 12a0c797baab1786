"""Global batches of packed rows: blended sources, an order fixed by (seed, epoch), exact resume, prefetch.

Every rank draws the same global batch and slices its own rows afterwards (trainer/step.py ``local_batch``),
so the global sample order here never depends on the data-parallel degree: a run saved at dp=4 resumes at
dp=2 (or any other) without repeating or skipping a sample.

Blends follow Megatron's BlendedDataset: sources are interleaved so that every prefix of k rows holds about
k * w_i / sum(w) rows of source i. Megatron picks, row by row, the source with the largest deficit
``w_i * k - count_i``; we schedule the same way in closed form (stride scheduling: source i's j-th row is due
at (j + 1/2) / p_i, rows are taken in due order), which keeps every source within about one row of its share
for every prefix and needs no Python loop over rows. A source whose share exceeds its size is repeated, each
pass in a freshly drawn order; a source with more rows than its share shows a different subset each epoch.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from trainer.errors import ConfigError
from trainer.data.packing import PackedRows


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash rather than seed + epoch, so runs with neighbouring seeds do not share epoch orders.
    digest = hashlib.sha256(f"meshtron-packed|{seed}|{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def blend_schedule(weights: Sequence[float], num_rows: int) -> np.ndarray:
    """Source index of each of ``num_rows`` blended rows (int64); deterministic, no seed."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w <= 0).any():
        raise ValueError(f"blend weights must be positive, got {list(weights)}")
    p = w / w.sum()
    due, src = [], []
    for i, pi in enumerate(p):
        n = int(np.ceil(num_rows * pi)) + 1
        due.append((np.arange(n) + 0.5) / pi)
        src.append(np.full(n, i, np.int64))
    due_all, src_all = np.concatenate(due), np.concatenate(src)
    order = np.lexsort((src_all, due_all))  # ties go to the earlier source
    return src_all[order[:num_rows]]


@dataclass
class Blend:
    """Several row sources mixed by weight; ``rows_per_epoch`` defaults to the sum of the sources' rows.

    A source is anything with PackedRows' interface (name, num_rows, seq_len, gather): the lazy RowIndex
    (row_index.py) in training, PackedRows in tests. A single source with weight 1 and the default epoch
    length is a plain shuffle of its rows.
    """

    sources: list[Any]
    weights: list[float]
    rows_per_epoch: int = 0  # 0: sum of the sources' rows

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.weights) or not self.sources:
            raise ValueError(f"{len(self.sources)} sources but {len(self.weights)} weights")
        if len({s.seq_len for s in self.sources}) > 1:
            raise ValueError(f"sources of a blend need one seq_len, got {[s.seq_len for s in self.sources]}")
        for s in self.sources:
            if s.num_rows == 0:
                raise ConfigError(f"{s.name} gives no rows of {s.seq_len} slots; use more data or a smaller "
                                  f"data.seq_len")
        if self.rows_per_epoch <= 0:
            self.rows_per_epoch = sum(s.num_rows for s in self.sources)
        # Source of each blended row, as the smallest integer type (a 1e12-token corpus has ~1e8 rows); one
        # source needs no schedule at all (every row is its own).
        self._schedule = (None if len(self.sources) == 1 else
                          blend_schedule(self.weights, self.rows_per_epoch).astype(np.min_scalar_type(len(self.sources))))
        self._base = np.cumsum([0] + [s.num_rows for s in self.sources])

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    def rows_per_source(self) -> list[int]:
        """How many rows of each source one epoch takes (more than the source has means repeats)."""
        if self._schedule is None:
            return [self.rows_per_epoch]
        return np.bincount(self._schedule, minlength=len(self.sources)).tolist()

    def epoch_order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """Global row ids (source base + row) of one epoch, a pure function of (seed, epoch)."""
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        if self._schedule is None:  # the same draws as the general case below, without its index arrays
            return self._passes(self.sources[0].num_rows, self.rows_per_epoch, gen, shuffle)  # base 0
        order = np.empty(self.rows_per_epoch, np.int64)
        for i, src in enumerate(self.sources):
            where = np.flatnonzero(self._schedule == i)
            order[where] = self._base[i] + self._passes(src.num_rows, len(where), gen, shuffle)
        return order

    @staticmethod
    def _passes(num_rows: int, count: int, gen: torch.Generator, shuffle: bool) -> np.ndarray:
        """The first ``count`` rows of back-to-back passes over ``num_rows`` rows, each freshly shuffled."""
        passes = -(-count // num_rows)
        if not passes:
            return np.zeros(0, np.int64)
        if shuffle:
            perms = [torch.randperm(num_rows, generator=gen).numpy() for _ in range(passes)]
        else:
            perms = [np.arange(num_rows)] * passes
        return (perms[0] if passes == 1 else np.concatenate(perms))[:count].astype(np.int64, copy=False)

    def gather(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """LongTensors [len(ids), seq_len] for every field of PackedRows, built by each source's gather()
        from only the rows drawn."""
        src = np.searchsorted(self._base, ids, side="right") - 1
        out = {f: np.empty((len(ids), self.seq_len), np.int64) for f in PackedRows.FIELDS}
        for i in np.unique(src):
            sel = src == i
            rows = self.sources[i].gather(ids[sel] - self._base[i])
            for f in PackedRows.FIELDS:
                out[f][sel] = rows[f]
        return {f: torch.from_numpy(a) for f, a in out.items()}

    def fingerprint(self) -> str:
        """Cheap identity of the data: shapes, weights and a strided sample of ~64 gathered rows per source."""
        h = hashlib.sha256(f"{self.rows_per_epoch}|{self.weights}".encode())
        for s in self.sources:
            h.update(f"|{s.num_rows}x{s.seq_len}|".encode())
            sample = s.gather(np.arange(0, s.num_rows, max(1, s.num_rows // 64)))
            h.update(np.ascontiguousarray(sample["input_ids"]).tobytes())
            h.update(np.ascontiguousarray(sample["sample_ids"]).tobytes())
        return h.hexdigest()[:16]


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class GlobalBatchLoader:
    """Endless global batches {input_ids, labels, position_ids, document_ids, sample_ids}: LongTensor [B, S].

    An epoch serves the largest multiple of ``global_batch_size`` rows of ``rows.rows_per_epoch`` in the
    order ``Blend.epoch_order(seed, epoch)``; the few rows left over differ by epoch. ``state_dict()`` holds
    the epoch and the rows served so far (counted at the consumer, not at the prefetch thread), so a restored
    loader continues the same global order. ``prefetch`` > 0 builds that many batches ahead on a thread.
    ``pin_memory`` (CUDA runs) puts each batch in page-locked memory as it is built, on that thread, so the
    step's host-to-device copies can be asynchronous (``non_blocking=True``) while the next batch is built.
    """

    def __init__(self, rows: Any, global_batch_size: int, seed: int, shuffle: bool = True,
                 prefetch: int = 2, pin_memory: bool = False):
        self.blend = rows if isinstance(rows, Blend) else Blend([rows], [1.0])
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        if self.blend.rows_per_epoch < global_batch_size:
            raise ConfigError(f"the data gives {self.blend.rows_per_epoch} rows per epoch, fewer than one global "
                              f"batch of {global_batch_size}; use more data, a smaller data.seq_len or batch size")
        self.global_batch_size, self.seed, self.shuffle, self.prefetch = global_batch_size, seed, shuffle, prefetch
        self.pin_memory = pin_memory
        self.epoch, self.position = 0, 0  # position: rows of the current epoch already served
        self._fingerprint = self.blend.fingerprint()
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._sync = None  # the batch generator when prefetch is off

    @property
    def rows_per_epoch(self) -> int:
        return self.blend.rows_per_epoch // self.global_batch_size * self.global_batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.blend.rows_per_epoch // self.global_batch_size

    # ---------------------------------------------------------------------------------- producing

    def _batches_from(self, epoch: int, position: int):
        """(batch, epoch, position after it) forever, starting at (epoch, position)."""
        order = None
        while True:
            if position + self.global_batch_size > self.rows_per_epoch:
                epoch, position, order = epoch + 1, 0, None
            if order is None:
                order = self.blend.epoch_order(self.seed, epoch, self.shuffle)
            ids = order[position:position + self.global_batch_size]
            position += self.global_batch_size
            batch = self.blend.gather(ids)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch, epoch, position

    @staticmethod
    def _put(item: Any, q: queue.Queue, stop: threading.Event) -> bool:
        """Block until the item is queued or the loader closes (then False)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, epoch: int, position: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for item in self._batches_from(epoch, position):
                if not self._put(item, q, stop):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failure(e), q, stop)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self.epoch, self.position, self._queue,
                                                                     self._stop), name="meshtron-data", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread (if any); the next batch starts a new one from the current state."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue, self._sync = None, None, None

    def __iter__(self) -> "GlobalBatchLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch > 0:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
        else:
            if self._sync is None:
                self._sync = self._batches_from(self.epoch, self.position)
            item = next(self._sync)
        batch, self.epoch, self.position = item
        return batch

    def __enter__(self) -> "GlobalBatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rows_per_epoch": self.blend.rows_per_epoch, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows_per_epoch"] != self.blend.rows_per_epoch or state["fingerprint"] != self._fingerprint:
            raise ConfigError(
                f"the saved data loader state is for other data ({state['rows_per_epoch']} rows per epoch, "
                f"fingerprint {state['fingerprint']}) than this run's ({self.blend.rows_per_epoch}, "
                f"{self._fingerprint}); the data, data.seq_len, packing or blend weights changed since the checkpoint")
        if state["seed"] != self.seed:
            raise ConfigError(f"the saved data loader state is for seed {state['seed']}, this run has {self.seed}; "
                              f"resuming with another seed would repeat and skip samples")
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
