"""The parallel layout of a run: degrees, their validation, and the device mesh built from them.

Validation runs before ``init_process_group``: a layout that cannot work is refused while nothing has
started, with a message naming the values involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import Config, ConfigError, ParallelConfig
from trainer.model.shapes import padded_vocab_size  # noqa: F401 (the layouts' name for it)

# Mesh axis order, outermost first. tp is innermost so its collectives stay inside a node; pp outermost
# since its point-to-point traffic is the lightest.
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Flattened views: which ranks see different data, which shard parameters, which sum the loss.
FLAT_VIEWS = {
    "batch": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "loss": ("dp_replicate", "dp_shard", "cp"),
}


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

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches are processed at once."""
        return self.dp_replicate * self.dp_shard

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
    def is_single(self) -> bool:
        return self.world_size == 1

    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def build_mesh(self, device_type: str, timeout_s: Optional[float] = None):
        """The 5-D mesh (every axis present, size 1 where unused) plus its flattened views.

        ``timeout_s`` (trainer.dist_timeout_s) goes to every group the mesh creates: torch gives sub-groups
        the backend's default timeout otherwise, not the default group's (device_mesh.py, split_group).
        """
        from torch.distributed.device_mesh import init_device_mesh

        opts = None if timeout_s is None else group_options(device_type, timeout_s)
        override = None if opts is None else {a: opts for a in MESH_AXES}
        mesh = init_device_mesh(device_type, tuple(getattr(self, a) for a in MESH_AXES), mesh_dim_names=MESH_AXES,
                                backend_override=override)
        for name, axes in FLAT_VIEWS.items():
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
    if dims.pp > 1:
        check_pp_divisibility(m.num_layers, dims.pp, p.pp_virtual_stages, p.pp_schedule)
    seq_multiple = (2 * dims.cp if dims.cp > 1 else 1) * dims.tp
    if cfg.data.seq_len % seq_multiple:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not divisible by {seq_multiple} "
            f"(2 x cp={dims.cp} for the load-balanced context split, x tp={dims.tp} for sequence parallelism)"
            if dims.cp > 1 else
            f"data.seq_len={cfg.data.seq_len} is not divisible by tp={dims.tp} (sequence parallelism)"
        )
    per_step = dims.dp * p.microbatch_size
    if cfg.trainer.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not divisible by data-parallel "
            f"degree {dims.dp} (dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard}) x "
            f"parallel.microbatch_size={p.microbatch_size} = {per_step}"
        )
    accum = cfg.trainer.global_batch_size // per_step
    if dims.pp > 1:
        # Micro-batches per step = global batch / (dp x microbatch_size); the schedules have their own needs.
        check_pp_divisibility(m.num_layers, dims.pp, p.pp_virtual_stages, p.pp_schedule, n_microbatches=accum)


def check_moe_layout(cfg: Config, dims: ParallelDims) -> None:
    """MoE models train on one process or under data parallelism (FSDP/HSDP shard the stacked experts like any
    parameter) for now: tensor parallelism has no plan for the router and experts yet, context parallelism would
    need each row's router counts all-reduced over cp, and the pipeline's shape-inference forward would count
    into the step's router totals (see trainer/model/moe.py)."""
    moe = cfg.model.moe
    if not moe.enabled:
        return
    refused = {name: getattr(dims, name) for name in ("tp", "pp", "cp") if getattr(dims, name) > 1}
    if refused:
        given = ", ".join(f"parallel.{k}={v}" for k, v in refused.items())
        raise ConfigError(f"MoE models (model.moe.num_moe_experts={moe.num_moe_experts}) run on one process or "
                          f"with data parallelism (parallel.dp_shard / dp_replicate) for now, not with {given}")
    widths = (cfg.model.hidden_size, moe.expert_ffn(cfg.model.ffn_hidden_size))
    bf16_grouped = cfg.trainer.precision == "bf16" and moe.moe_grouped_gemm and not any(w % 8 for w in widths)
    if cfg.parallel.compile and not bf16_grouped:
        # The loop over experts reads group sizes on the host (a graph break), and torch 2.13 traces
        # torch._grouped_mm for bf16 only (its meta function refuses fp32; the eager CPU kernel does not).
        raise ConfigError(f"parallel.compile=true with an MoE model needs trainer.precision=bf16 (got "
                          f"{cfg.trainer.precision}), model.moe.moe_grouped_gemm=true (got {moe.moe_grouped_gemm}) "
                          f"and hidden/expert widths {widths} that are multiples of 8")
