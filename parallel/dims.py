"""The parallel layout of a run: degrees, their validation, and the device mesh built from them.

Validation runs before ``init_process_group``: a layout that cannot work is refused while nothing has
started, with a message naming the values involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import Config, ModelConfig, ParallelConfig
from trainer.errors import ConfigError
from trainer.model.shapes import padded_vocab_size

# Mesh axis order, outermost first. tp is innermost so its collectives stay inside a node; pp outermost
# since its point-to-point traffic is the lightest.
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Flattened views: which ranks see different data, which shard parameters, which sum the loss.
FLAT_VIEWS = {
    "batch": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "loss": ("dp_replicate", "dp_shard", "cp"),
}
# With expert parallelism (ep > 1) dp_shard is two axes, as torchtitan splits it: dp_shard_in_ep (its part of
# the ep group; ep = dp_shard_in_ep x cp) and dp_shard_mod_ep (what shards the experts' weights). Rank order is
# unchanged: dp_shard = dp_shard_mod_ep x dp_shard_in_ep, row-major. dp_shard itself is then a flattened view.
EP_MESH_AXES = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
EP_FLAT_VIEWS = {
    "dp_shard": ("dp_shard_mod_ep", "dp_shard_in_ep"),
    "batch": ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"),
    "dp_shard_cp": ("dp_shard_mod_ep", "dp_shard_in_ep", "cp"),
    "loss": ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp"),
    "ep": ("dp_shard_in_ep", "cp"),
}


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int
    # Expert parallelism: MoE experts split over ep of the dp_shard x cp ranks (not a factor of the world size).
    ep: int = 1

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        cfg.validate()
        others = cfg.dp_replicate * cfg.tp * cfg.pp * cfg.cp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"parallel.dp_replicate*tp*pp*cp = {cfg.dp_replicate}*{cfg.tp}*{cfg.pp}*{cfg.cp} = {others} "
                    f"processes per model replica does not divide world size {world_size}; start a multiple "
                    f"of {others} processes (torchrun --nproc_per_node {others}, or srun/sbatch tasks) or lower "
                    f"those degrees so their product divides {world_size}")
            dp_shard = world_size // others
        dims = cls(cfg.dp_replicate, dp_shard, cfg.tp, cfg.pp, cfg.cp, world_size, cfg.ep)
        dims._validate()
        return dims

    @classmethod
    def single(cls) -> "ParallelDims":
        return cls(1, 1, 1, 1, 1, 1)

    def _validate(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees multiply to {product} (dp_replicate={self.dp_replicate} x "
                f"dp_shard={self.dp_shard} x tp={self.tp} x pp={self.pp} x cp={self.cp}) but the world size "
                f"is {self.world_size}; make the product equal the number of processes"
            )
        if self.ep > 1:
            data = self.dp_shard * self.cp
            if self.ep % self.cp or data % self.ep:
                raise ConfigError(
                    f"parallel.ep={self.ep} must be a multiple of parallel.cp={self.cp} and divide dp_shard x cp = "
                    f"{self.dp_shard} x {self.cp} = {data}: the experts are split over ep of the ranks that shard "
                    f"data (every cp rank of a row in the same ep group), and the rest shard each expert's weights"
                )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    # Values derived from the layout, defined here only.

    @property
    def seq_multiple(self) -> int:
        """What data.seq_len must be a multiple of: 2 x cp chunks for the load-balanced context split, each
        split again over tp for sequence parallelism."""
        return (2 * self.cp if self.cp > 1 else 1) * self.tp

    def microbatches_per_step(self, global_batch_size: int, microbatch_size: int) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (gradient accumulation, or the
        pipeline schedule's n_microbatches); validate_layout has checked that it divides."""
        return global_batch_size // (self.dp * microbatch_size)

    def padded_vocab(self, model: ModelConfig) -> int:
        """Embedding and output-layer rows: the vocabulary padded to make_vocab_size_divisible_by x tp."""
        return padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, self.tp)

    @property
    def fsdp_enabled(self) -> bool:
        # cp ranks hold the same parameters and see different tokens: their gradients are summed by FSDP.
        return self.dp_replicate * self.dp_shard * self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def expert_shard(self) -> int:
        """Ranks sharding each expert's weights (FSDP) under expert parallelism: dp_shard x cp / ep."""
        return self.dp_shard * self.cp // self.ep

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def degrees(self) -> dict[str, int]:
        """The degree of each mesh axis (and ep, carved from dp_shard x cp, where it is on)."""
        out = {axis: getattr(self, axis) for axis in MESH_AXES}
        return {**out, "ep": self.ep} if self.ep_enabled else out

    def mesh_axes(self) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
        """(axis -> size, outermost first; flattened view -> axes) of the mesh this layout builds."""
        if not self.ep_enabled:
            return self.degrees(), FLAT_VIEWS
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard_mod_ep": self.expert_shard,
                 "dp_shard_in_ep": self.ep // self.cp, "cp": self.cp, "tp": self.tp}
        return sizes, EP_FLAT_VIEWS

    def build_mesh(self, device_type: str, timeout_s: Optional[float] = None):
        """The 5-D mesh (every axis present, size 1 where unused; 6-D with expert parallelism, see
        EP_MESH_AXES) plus its flattened views.

        ``timeout_s`` (trainer.dist_timeout_s) goes to every group the mesh creates: torch gives sub-groups
        the backend's default timeout otherwise, not the default group's (device_mesh.py, split_group).
        """
        from torch.distributed.device_mesh import init_device_mesh

        opts = None if timeout_s is None else group_options(device_type, timeout_s)
        sizes, views = self.mesh_axes()
        override = None if opts is None else {a: opts for a in sizes}
        mesh = init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=tuple(sizes),
                                backend_override=override)
        for name, axes in views.items():
            mesh[axes]._flatten(name, backend_override=opts)
        return mesh


def group_options(device_type: str, timeout_s: float):
    """(backend, options) with the given timeout, for DeviceMesh's backend_override."""
    import datetime

    import torch.distributed as dist

    if device_type == "cuda":
        backend, opts = "nccl", dist.ProcessGroupNCCL.Options()
    else:
        backend, opts = "gloo", dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return backend, opts


def validate_layout(cfg: Config, dims: ParallelDims, tokenizer_vocab: Optional[int] = None) -> None:
    """Rules between the mesh and the model, data and batch; each error names the values involved."""
    from parallel.pipeline import check_pp_divisibility
    from trainer.model.shapes import check_tp_divisibility

    p, m = cfg.parallel, cfg.model
    check_moe_layout(cfg, dims)
    check_tp_divisibility(m, dims.tp)
    from parallel.compile import check_compile

    check_compile(cfg, dims.tp)
    per_step = dims.dp * p.microbatch_size
    if dims.pp > 1:
        # Once, with the micro-batches per step when the batch divides (the schedules have their own needs);
        # a batch that does not divide is refused below, after the layers and the sequence length.
        accum = (dims.microbatches_per_step(cfg.trainer.global_batch_size, p.microbatch_size)
                 if cfg.trainer.global_batch_size % per_step == 0 else None)
        check_pp_divisibility(m.num_layers, dims.pp, p.pp_virtual_stages, p.pp_schedule, n_microbatches=accum)
    seq_multiple = dims.seq_multiple
    if cfg.data.seq_len % seq_multiple:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by {seq_multiple} "
            f"(2 x cp={dims.cp} for the load-balanced context split, x tp={dims.tp} for sequence parallelism)"
            if dims.cp > 1 else
            f"data.seq_len={cfg.data.seq_len} is not divisible by tp={dims.tp} (sequence parallelism)"
        )
    if cfg.trainer.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not divisible by data-parallel "
            f"degree {dims.dp} (dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard}) x "
            f"parallel.microbatch_size={p.microbatch_size} = {per_step}"
        )


def check_moe_layout(cfg: Config, dims: ParallelDims) -> None:
    """MoE models under every parallelism but these (trainer/model/moe.py, parallel/expert_parallel.py): tensor
    parallelism routes each rank's sequence shard, so it needs sequence parallelism; expert capacity ranks a
    row's assignments, so it needs each row on one rank (no cp or tp); compile needs bf16 grouped GEMMs and no
    host reads inside a layer (no expert parallelism)."""
    moe, p = cfg.model.moe, cfg.parallel
    if not moe.enabled:
        if dims.ep > 1:
            raise ConfigError(f"parallel.ep={dims.ep} needs an MoE model (model.moe.num_moe_experts is null: a dense "
                              f"model has no experts to split); set parallel.ep=1")
        return
    if moe.num_moe_experts % dims.ep:
        raise ConfigError(f"model.moe.num_moe_experts={moe.num_moe_experts} is not divisible by parallel.ep={dims.ep}; "
                          f"each expert-parallel rank holds the same number of whole experts")
    if dims.tp > 1 and not p.sequence_parallel:
        raise ConfigError(f"MoE models with parallel.tp={dims.tp} need parallel.sequence_parallel=true: each tp rank "
                          f"routes its own part of the sequence (got sequence_parallel=false)")
    if moe.moe_expert_capacity_factor is not None and (dims.cp > 1 or dims.tp > 1):
        raise ConfigError(f"model.moe.moe_expert_capacity_factor={moe.moe_expert_capacity_factor} ranks each row's "
                          f"assignments on one rank; with parallel.cp={dims.cp} and tp={dims.tp} rows are split "
                          f"over ranks: use dropless routing (moe_expert_capacity_factor=null) or cp=tp=1")
    if dims.ep > 1 and p.activation_checkpoint == "selective":
        # Measured (torch 2.13): the experts' FSDP unit inside the checkpointed layer records more profiler
        # ranges when recomputed than in forward, and selective checkpointing refuses the mismatch.
        raise ConfigError(f"parallel.activation_checkpoint=selective does not run with parallel.ep={dims.ep} yet; "
                          f"use parallel.activation_checkpoint=full (or none)")
    widths = (cfg.model.hidden_size, moe.expert_ffn(cfg.model.ffn_hidden_size))
    bf16_grouped = cfg.trainer.precision == "bf16" and moe.moe_grouped_gemm and not any(w % 8 for w in widths)
    if p.compile and not bf16_grouped:
        # The loop over experts reads group sizes on the host (a graph break), and torch 2.13 traces
        # torch._grouped_mm for bf16 only (its meta function refuses fp32; the eager CPU kernel does not).
        raise ConfigError(f"parallel.compile=true with an MoE model needs trainer.precision=bf16 (got "
                          f"{cfg.trainer.precision}), model.moe.moe_grouped_gemm=true (got {moe.moe_grouped_gemm}) "
                          f"and hidden/expert widths {widths} that are multiples of 8")
    if p.compile and (dims.ep > 1 or dims.tp > 1 or dims.cp > 1):
        # The dispatcher reads split sizes on the host, and FSDP units inside a compiled layer are untested.
        raise ConfigError(f"parallel.compile=true with an MoE model runs without ep, tp and cp for now (got "
                          f"ep={dims.ep}, tp={dims.tp}, cp={dims.cp}); set parallel.compile=false")
