"""Counts what would be device->host transfers on a GPU, on CPU where every tensor is a host tensor.

A tensor counts as a device tensor when it descends from the model's parameters and buffers (marked with
``mark``), from a ``.to(device)`` / ``.cuda()`` of anything, or from any op with a device tensor among its
inputs (a TorchDispatchMode follows every op, backward and optimizer included); an in-place write by a device
tensor makes its target (and the base it views) one. The host batch, and what the host derives from it with
numpy or torch, stays a host tensor; so does the result of ``.cpu()``, as on a GPU.

A transfer is a read of a device tensor's values by the host: ``_local_scalar_dense`` (what ``item()``,
``float()``, ``int()``, ``bool()`` and ``if t:`` call), ``tolist()``, ``cpu()``, ``numpy()``, and ops whose
output size depends on values (boolean indexing, nonzero, masked_select, unique), which sync on CUDA.
Factory calls with an explicit device (``torch.zeros(n, device=d)``) cannot be told from host ones on
CPU, so they become device tensors only once a device tensor flows into them.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
_MARK = "_sync_counter_on_device"
VALUE_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


def on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def mark(t: torch.Tensor) -> None:
    while t is not None:
        setattr(t, _MARK, True)
        t = t._base


@dataclass
class Transfer:
    what: str
    stack: list[str] = field(default_factory=list)  # function names, innermost last


class TransferCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.transfers: list[Transfer] = []
        self.paused = False

    def record(self, what: str) -> None:
        names = [f.name for f in traceback.extract_stack()[:-2]]
        self.transfers.append(Transfer(what, names))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        device_inputs = any(on_device(a) for a in leaves)
        if device_inputs and (func in VALUE_DEPENDENT or _bool_index(func, leaves)):
            self.record(str(func))
        out = func(*args, **kwargs)
        if device_inputs:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    mark(t)
            for i, arg in enumerate(func._schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    target = args[i] if i < len(args) else kwargs.get(arg.name)
                    if isinstance(target, torch.Tensor):
                        mark(target)
        return out

    @contextlib.contextmanager
    def host_side(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def _bool_index(func, leaves) -> bool:
    return func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in leaves)


@contextlib.contextmanager
def count_transfers(*modules: torch.nn.Module):
    """``with count_transfers(model) as counter:``; counter.transfers lists every transfer made inside."""
    counter = TransferCounter()
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            mark(t)
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy", "to", "cuda")}
    sync = torch.cuda.synchronize

    def reading(name):
        def method(self, *args, **kwargs):
            if not on_device(self):
                return originals[name](self, *args, **kwargs)
            counter.record(f"Tensor.{name}")
            with counter.host_side():
                out = originals[name](self, *args, **kwargs)
                # On CPU .cpu() returns the tensor itself; a GPU returns a new host tensor.
                return out.clone() if name == "cpu" and out is self else out
        return method

    def moving(name):
        def method(self, *args, **kwargs):
            out = originals[name](self, *args, **kwargs)
            target = torch._C._nn._parse_to(*args, **kwargs)[0] if name == "to" else "cuda"
            if target is not None and not on_device(out):
                if out is self:  # already there: a new object, so the host's tensor stays a host tensor
                    with counter.host_side():
                        out = self.view_as(self)
                setattr(out, _MARK, True)  # not its base: that is the host's
            return out
        return method

    def synchronize(*args, **kwargs):
        counter.record("torch.cuda.synchronize")
        return sync(*args, **kwargs) if torch.cuda.is_available() else None

    try:
        for name in ("tolist", "cpu", "numpy"):
            setattr(torch.Tensor, name, reading(name))
        for name in ("to", "cuda"):
            setattr(torch.Tensor, name, moving(name))
        torch.cuda.synchronize = synchronize
        with counter:
            yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = sync


def counted_train(cfg, info=None) -> list[Transfer]:
    """Trains as configured (trainer.loop.train) and returns the transfers made by the step loop only:
    set-up, the HF export and everything else outside ``_run_steps`` are not counted."""
    import trainer.loop as loop

    original, seen = loop._run_steps, {}

    def counted(run, *rest):
        with count_transfers(*run.pm.modules) as counter:
            try:
                return original(run, *rest)
            finally:
                seen["transfers"] = counter.transfers

    loop._run_steps = counted
    try:
        loop.train(cfg, info)
    finally:
        loop._run_steps = original
    return seen.get("transfers", [])
