"""The step's numbers as named fields of one vector: one all-reduce over the mesh and one device->host copy per
step, whatever an objective or a model transformation adds.

Two kinds of fields, told apart by what the reduction must do with them (parallel/collectives.py,
sum_tokens_and_ranks): token fields are sums over this rank's tokens (loss, per-document sums), which tensor-
parallel ranks share, so they count once per tp group; rank fields are per-rank numbers (flags, router totals of
a sequence-parallel rank's own rows) that every rank adds. Values already global (the gradient norm) ride along
after the reduction, in the same copy. A field is read back by its name, never by its position.
"""

from __future__ import annotations

import torch

from parallel.collectives import sum_tokens_and_ranks

F64 = torch.float64


class StepVector:
    """Fields added in any order; `reduce` packs them (tokens, then ranks, then the unreduced) and returns the
    host copy with each field's slice by name."""

    def __init__(self, device: torch.device):
        self.device = device
        self._token: dict[str, torch.Tensor] = {}
        self._rank: dict[str, torch.Tensor] = {}

    def tokens(self, name: str, value: torch.Tensor) -> None:
        self._token[self._new(name)] = value.detach().to(F64).flatten()

    def ranks(self, name: str, value: torch.Tensor) -> None:
        self._rank[self._new(name)] = value.detach().to(F64).flatten()

    def rank_flags(self, **flags: float) -> None:
        """Host numbers (signals, async-save state): one small copy to the device for all of them."""
        values = torch.tensor([float(v) for v in flags.values()], dtype=F64).to(self.device, non_blocking=True)
        for i, name in enumerate(flags):
            self._rank[self._new(name)] = values[i:i + 1]

    def _new(self, name: str) -> str:
        if name in self._token or name in self._rank:
            raise ValueError(f"step vector field {name!r} added twice")
        return name

    def reduce(self, mesh, **global_values: torch.Tensor) -> "HostStep":
        token_part = torch.cat(list(self._token.values())) if self._token else torch.zeros(0, dtype=F64,
                                                                                            device=self.device)
        rank_part = torch.cat(list(self._rank.values())) if self._rank else token_part.new_zeros(0)
        reduced = sum_tokens_and_ranks(token_part, rank_part, mesh)
        extra = [v.detach().to(device=self.device, dtype=F64).flatten() for v in global_values.values()]
        host = torch.cat([reduced, *extra]).cpu()  # the step's one device->host transfer
        sizes = [(n, t.numel()) for n, t in self._token.items()] + [(n, t.numel()) for n, t in self._rank.items()]
        sizes += [(n, t.numel()) for n, t in zip(global_values, extra)]
        return HostStep(host, sizes)


class HostStep:
    """The reduced step vector on the host, by field name."""

    def __init__(self, host: torch.Tensor, sizes: list[tuple[str, int]]):
        self.host = host
        self._slices: dict[str, slice] = {}
        offset = 0
        for name, n in sizes:
            self._slices[name] = slice(offset, offset + n)
            offset += n

    def __contains__(self, name: str) -> bool:
        return name in self._slices

    def tensor(self, name: str) -> torch.Tensor:
        return self.host[self._slices[name]]

    def value(self, name: str) -> float:
        """A one-number field as a Python float."""
        t = self.tensor(name)
        if t.numel() != 1:
            raise ValueError(f"step vector field {name!r} holds {t.numel()} numbers; read it with tensor()")
        return float(t[0])
