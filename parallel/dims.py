"""The parallel layout of a run: degrees, their validation, and the device mesh built from them.

Validation runs before ``init_process_group``: a layout that cannot work is refused while nothing has
started, with a message naming the values involved.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ConfigError, ParallelConfig

# Mesh axis order, outermost first. tp is innermost so its collectives stay inside a node.
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        cfg.validate()
        others = cfg.dp_replicate * cfg.tp * cfg.pp * cfg.cp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"cannot infer parallel.dp_shard: world size {world_size} is not divisible by "
                    f"dp_replicate*tp*pp*cp = {cfg.dp_replicate}*{cfg.tp}*{cfg.pp}*{cfg.cp} = {others}"
                )
            dp_shard = world_size // others
        dims = cls(cfg.dp_replicate, dp_shard, cfg.tp, cfg.pp, cfg.cp, world_size)
        dims._validate()
        return dims

    def _validate(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees multiply to {product} (dp_replicate={self.dp_replicate} x "
                f"dp_shard={self.dp_shard} x tp={self.tp} x pp={self.pp} x cp={self.cp}) but the world size "
                f"is {self.world_size}; make the product equal the number of processes"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}
