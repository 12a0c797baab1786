"""Typed configuration schemas (registered in Hydra's ConfigStore by trainer/config_io.py, which also turns a
composed config into these and writes it back with secrets redacted).

YAML files under ``conf/`` extend these dataclasses (``defaults: [base_<group>]``), so an unknown key or a
value of the wrong type fails in OmegaConf with the key's full name. Each dataclass checks its own fields in
``validate()``; checks that span several groups live in :func:`validate_config`, which runs before any
process group starts or any tensor is allocated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from trainer.errors import one_of, require
from trainer.families import MODEL_FAMILIES
from trainer.dpo_config import OBJECTIVES, DpoConfig
from trainer.lora_config import LoraConfig
from trainer.moe_config import MoEConfig


# --------------------------------------------------------------------------------------------- model


@dataclass
class RopeScalingConfig:
    """HF ``rope_scaling`` / ``rope_parameters``. Only Llama 3.1's frequency-band scaling is implemented."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        one_of("model.rope_scaling.rope_type", self.rope_type, ("llama3",))
        require(self.factor >= 1.0, f"model.rope_scaling.factor={self.factor} must be >= 1")
        require(
            self.high_freq_factor > self.low_freq_factor,
            f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
            f"low_freq_factor={self.low_freq_factor}",
        )


ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "varlen")


@dataclass
class ModelConfig:
    """A decoder-only transformer. Field names follow Megatron-LM's arguments where it has one."""

    name: str = "tiny"
    family: str = "llama"
    # An HF checkpoint directory. When set, its config.json replaces the shape fields below and its
    # safetensors weights initialise the model.
    hf_path: Optional[str] = None
    vocab_size: int = 2048
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 2
    # Per-head dimension; None means hidden_size // num_attention_heads (Qwen3 sets it explicitly).
    kv_channels: Optional[int] = None
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    # Mistral-style sliding-window attention; None or 0 means full causal attention.
    sliding_window: Optional[int] = None
    init_std: float = 0.02
    # Megatron pads the vocabulary to a multiple of this x tensor-parallel size; padded logits are -inf.
    make_vocab_size_divisible_by: int = 128
    # The attention kernel (see trainer/model/attention.py): auto picks per micro-batch and device; sdpa
    # (causal when every row is one document, else the dense-mask reference); flex and varlen are CUDA-only.
    attention_backend: str = "auto"
    # Mixture of experts (trainer/moe_config.py); the default is a dense model.
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Low-rank adapters (trainer/lora_config.py, trainer/lora.py); rank 0, the default, trains every parameter.
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        one_of("model.family", self.family, MODEL_FAMILIES)
        one_of("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "max_position_embeddings", "make_vocab_size_divisible_by"):
            require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"model.num_query_groups={self.num_query_groups} (the number of key/value heads)",
        )
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels explicitly",
            )
        require(self.head_dim % 2 == 0, f"model head dim {self.head_dim} must be even for rotary embeddings")
        require(self.rotary_base > 0, f"model.rotary_base={self.rotary_base} must be positive")
        require(self.norm_epsilon > 0, f"model.norm_epsilon={self.norm_epsilon} must be positive")
        if self.sliding_window is not None:
            require(self.sliding_window >= 0, f"model.sliding_window={self.sliding_window} must be >= 0")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        self.moe.validate(self.num_layers)
        self.lora.validate()


# ------------------------------------------------------------------------------------------ parallel


# torch.distributed.pipelining schedules: GPipe, 1F1B, interleaved 1F1B, and the two zero-bubble schedules
# (interleaved_zb: loop placement; zbv: "V" placement with exactly 2 stages per rank).
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")


@dataclass
class ParallelConfig:
    """Mesh degrees. ``dp_shard=-1`` takes whatever the world size leaves after the other degrees."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # Expert parallelism (MoE models): each expert lives on one of ep ranks carved from dp_shard x cp (a multiple
    # of cp dividing dp_shard x cp; it adds no ranks); tokens travel to their experts by all-to-all.
    ep: int = 1
    # Sequences per forward/backward on one data-parallel rank; the global batch is reached by accumulation.
    microbatch_size: int = 1
    # Pipeline schedule (see PP_SCHEDULES); interleaved_* need pp_virtual_stages >= 2, zbv exactly 2.
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    # Megatron sequence parallelism in norms and residuals (only meaningful when tp > 1).
    sequence_parallel: bool = True
    # Recompute activations in backward: none, full (every block), selective (keep matmul/attention outputs).
    activation_checkpoint: str = "none"
    # torch.compile each transformer layer (fullgraph) and the loss chunk, after activation checkpointing and
    # before FSDP (parallel/compile.py).
    compile: bool = False
    # FSDP gradient reduction: reduce-scatter after every micro-batch (no rank ever holds unsharded gradients
    # of the whole model), or only after the last micro-batch of a step (fewer collectives, more memory).
    fsdp_grad_sync: str = "every_microbatch"

    def validate(self) -> None:
        one_of("parallel.fsdp_grad_sync", self.fsdp_grad_sync, ("every_microbatch", "last_microbatch"))
        for name in ("dp_replicate", "tp", "pp", "cp", "ep", "microbatch_size", "pp_virtual_stages"):
            require(getattr(self, name) >= 1, f"parallel.{name}={getattr(self, name)} must be >= 1")
        one_of("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        one_of("parallel.activation_checkpoint", self.activation_checkpoint, ("none", "full", "selective"))
        require(self.dp_shard == -1 or self.dp_shard >= 1,
                 f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 to infer it from the world size")


# ---------------------------------------------------------------------------------------------- data


PRETRAIN_FORMATS = ("text", "jsonl_text", "parquet", "hf_disk", "megatron")
SFT_FORMATS = ("messages", "sharegpt", "alpaca")
# Preference pairs (trainer/data/preference.py): TRL's explicit- and implicit-prompt rows, .jsonl files.
PREFERENCE_FORMATS = ("preference",)
CHAT_FORMATS = SFT_FORMATS + PREFERENCE_FORMATS  # rendered with a chat template, labels on completions only
DATA_FORMATS = PRETRAIN_FORMATS + CHAT_FORMATS


@dataclass
class DataSource:
    """One corpus of a blend: Megatron-style, each source contributes samples in proportion to its weight."""

    path: str = "???"
    weight: float = 1.0
    format: str = "jsonl_text"
    text_field: str = "text"

    def validate(self, where: str) -> None:
        one_of(f"{where}.format", self.format, DATA_FORMATS)
        require(self.weight > 0, f"{where}.weight={self.weight} must be positive")


@dataclass
class DataConfig:
    name: str = "pretrain_text"
    # Training corpus: a file or a directory of files; None means the corpus bundled with meshtron.
    # A shortcut for a single-entry `sources` list.
    path: Optional[str] = None
    # Several corpora blended by weight; when given, `path`/`format`/`text_field` are not used.
    sources: list[DataSource] = field(default_factory=list)
    # Held-out corpus for validation; None with path=None means the bundled validation split, otherwise
    # val_fraction of the training documents is held out.
    val_path: Optional[str] = None
    val_fraction: float = 0.05
    # Pretraining: text (blank-line separated blocks), jsonl_text, parquet, hf_disk (datasets.save_to_disk),
    # megatron (.bin/.idx from Megatron's preprocess_data.py). SFT: messages, sharegpt, alpaca. Preference
    # pairs (trainer.objective=dpo): preference.
    format: str = "text"
    text_field: str = "text"
    # HF tokenizer directory; None means model.hf_path's tokenizer if it has one, else the bundled one.
    tokenizer: Optional[str] = None
    # SFT: chat template to render with: None = the tokenizer's own; or a .jinja file path.
    chat_template: Optional[str] = None
    # SFT labels: every assistant turn, or only the last one of each conversation.
    train_on: str = "all_assistant"
    seq_len: int = 256
    # Pack several documents/conversations per row (document-isolated attention); false pads each alone.
    packing: bool = True
    # A sample longer than seq_len: truncate it, drop it, or stop with an error naming it.
    overlong: str = "truncate"
    # A malformed row: stop with an error naming file and line, or skip it and count it per file.
    on_bad_row: str = "error"
    # Where tokenized corpora are cached (keyed by file contents and tokenizer); None: ~/.cache/meshtron
    # (or $XDG_CACHE_HOME/meshtron).
    cache_dir: Optional[str] = None
    # Token caches are keyed by each file's path, size and mtime plus the tokenizer's hash; true keys them by
    # a hash of every byte instead (slower to start; survives files copied with new mtimes).
    content_hash: bool = False

    def validate(self) -> None:
        one_of("data.format", self.format, DATA_FORMATS)
        one_of("data.train_on", self.train_on, ("all_assistant", "last_assistant"))
        one_of("data.overlong", self.overlong, ("truncate", "drop", "error"))
        one_of("data.on_bad_row", self.on_bad_row, ("error", "skip"))
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]")
        require(self.seq_len >= 2, f"data.seq_len={self.seq_len} must be >= 2")
        require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in [0, 1)")


# --------------------------------------------------------------------------------------------- optim


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    # LR after warmup: cosine or linear decay to min_lr over the remaining steps, or constant.
    decay: str = "cosine"
    # Max global gradient norm; 0 disables clipping (the norm is still measured and logged).
    grad_clip: float = 1.0
    # torch AdamW implementation: auto picks fused on CUDA and foreach elsewhere.
    implementation: str = "auto"

    def validate(self) -> None:
        one_of("optim.name", self.name, ("adamw",))
        one_of("optim.decay", self.decay, ("cosine", "linear", "constant"))
        one_of("optim.implementation", self.implementation, ("auto", "fused", "foreach", "for_loop"))
        require(self.lr > 0, f"optim.lr={self.lr} must be positive")
        require(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        require(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"optim.{name}={getattr(self, name)} must be in [0, 1)")


# ------------------------------------------------------------------------------------------- trainer


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints under ``<output_dir>/checkpoints/step_<N>/`` (see trainer/checkpoint.py)."""

    # Save every N steps (and after the last step); 0 turns periodic checkpoints off.
    every_steps: int = 0
    # Complete checkpoints kept; older ones are deleted only after a newer one is complete. 0 keeps all.
    keep_last: int = 2
    # torch's async save: training continues while shards are written (``async`` is a Python keyword).
    async_save: bool = False
    # With every_steps=0 and trainer.export_hf, save the last step anyway before the HF export, so a failed
    # export (a full disk, a quota) never loses the trained weights; false: the export is their only copy.
    save_before_export: bool = True
    # Resume from this checkpoint directory (a step_<N> directory, or a checkpoints/ directory: its latest).
    load_from: Optional[str] = None
    # auto: resume from the latest complete checkpoint in output_dir, if any; never: always start afresh.
    resume: str = "auto"
    # What a resume checks against the file list in COMPLETE: sizes (a stat per file), or full (sizes and
    # CRC-32 checksums: reads the whole checkpoint once, split between ranks).
    verify: str = "sizes"

    def validate(self) -> None:
        one_of("trainer.checkpoint.resume", self.resume, ("auto", "never"))
        one_of("trainer.checkpoint.verify", self.verify, ("sizes", "full"))
        require(self.every_steps >= 0, f"trainer.checkpoint.every_steps={self.every_steps} must be >= 0")
        require(self.keep_last >= 0, f"trainer.checkpoint.keep_last={self.keep_last} must be >= 0")


@dataclass
class Fp8Config:
    """trainer.precision=fp8: torchao's float8 training of the decoder's linear layers (parallel/float8.py)."""

    # rowwise: a scale per row (torchao's more accurate recipe); tensorwise: one per tensor, with fp8
    # all-gathers under FSDP2 and tensor parallelism.
    recipe: str = "rowwise"
    # Cast to fp8 and back, multiplying in high precision: fp8 numerics without fp8 GEMMs. null: true on CPU,
    # false on CUDA.
    emulate: Optional[bool] = None
    # Linear layers kept in bf16, as fnmatch patterns on their names, e.g. ['decoder.layers.0.*'].
    skip: list[str] = field(default_factory=list)

    def validate(self) -> None:
        one_of("trainer.fp8.recipe", self.recipe, ("rowwise", "tensorwise"))
        for pattern in self.skip:
            require(isinstance(pattern, str) and pattern.strip() != "",
                    f"trainer.fp8.skip entry {pattern!r} must be a non-empty pattern like 'decoder.layers.0.*'")


@dataclass
class TrainerConfig:
    seed: int = 1234
    max_steps: int = 200
    # Sequences (rows of data.seq_len tokens) per optimizer step, summed over all data-parallel ranks.
    global_batch_size: int = 16
    # Run validation every N steps (and after the last step); 0 disables it.
    eval_every: int = 50
    # Validation batches per evaluation, each of global_batch_size rows.
    eval_batches: int = 4
    log_every: int = 1
    output_dir: str = "outputs/${now:%Y-%m-%d_%H-%M-%S}"
    # fp32; bf16 autocast over fp32 master weights; fp8: bf16, and the decoder's linear layers in fp8 (trainer.fp8).
    precision: str = "fp32"
    # lm: summed token cross-entropy over the global batch's labels (pretraining, SFT); dpo: a preference loss
    # over the global batch's pairs (dpo.*, data.format=preference).
    objective: str = "lm"
    fp8: Fp8Config = field(default_factory=Fp8Config)
    device: str = "auto"
    # Tokens per chunk of the output layer + cross-entropy (trainer/loss.py): at most one chunk's logits exist
    # at a time, in forward and backward; 0 computes the whole [tokens, vocab] logits at once.
    loss_chunk_size: int = 1024
    # Dense bf16 peak TFLOP/s of one device, the denominator of the `mfu` metric; None: detected from the
    # GPU's name where known (trainer/flops.py), else no mfu is reported.
    peak_tflops: Optional[float] = None
    # Seconds any rank waits for the others (process-group collectives, shared tokenization, the export)
    # before failing with a message naming what it waited for; NCCL's watchdog uses it too.
    dist_timeout_s: float = 1800.0
    # Save the final model as HF safetensors (+ tokenizer) under <output_dir>/hf; a LoRA run (model.lora) saves
    # its adapters as a PEFT adapter under <output_dir>/hf_adapter instead, and with export_merged also the
    # base with the adapters merged in under hf/.
    export_hf: bool = True
    export_merged: bool = False
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A non-finite loss or gradient norm: skip drops that step's update (at most max_consecutive_skips in a
    # row, then stops); stop exits at once without saving anything newer.
    nonfinite: str = "stop"
    max_consecutive_skips: int = 5

    def validate(self) -> None:
        self.checkpoint.validate()
        one_of("trainer.nonfinite", self.nonfinite, ("skip", "stop"))
        require(self.max_consecutive_skips >= 0,
                 f"trainer.max_consecutive_skips={self.max_consecutive_skips} must be >= 0")
        one_of("trainer.precision", self.precision, ("fp32", "bf16", "fp8"))
        one_of("trainer.objective", self.objective, OBJECTIVES)
        self.fp8.validate()
        one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        for name in ("max_steps", "global_batch_size", "log_every", "eval_batches"):
            require(getattr(self, name) >= 1, f"trainer.{name}={getattr(self, name)} must be >= 1")
        require(self.eval_every >= 0, f"trainer.eval_every={self.eval_every} must be >= 0")
        require(self.loss_chunk_size >= 0, f"trainer.loss_chunk_size={self.loss_chunk_size} must be >= 0 "
                                            f"(0 turns chunking off)")
        require(self.peak_tflops is None or self.peak_tflops > 0,
                 f"trainer.peak_tflops={self.peak_tflops} must be positive (or unset to detect it)")
        require(self.dist_timeout_s > 0, f"trainer.dist_timeout_s={self.dist_timeout_s} must be positive (seconds)")


def device_type(name: str) -> str:
    """trainer.device as a device type: auto is cuda where a CUDA device is visible, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "meshtron"
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    # Prefer the WANDB_API_KEY environment variable. A key given here is used but never written to disk.
    wandb_api_key: Optional[str] = None
    # A console line every this many steps (and at every evaluation); 0: about ten over the run. metrics.jsonl
    # has every trainer.log_every step whatever this says.
    console_every: int = 0
    # TensorBoard event files under <output_dir>/tensorboard/ (rank 0): the scalars of metrics.jsonl, tagged by
    # their keys. Needs the tensorboard package (pip install 'meshtron[tensorboard]').
    tensorboard: bool = False

    def validate(self) -> None:
        require(self.console_every >= 0, f"logging.console_every={self.console_every} must be >= 0 (0: about "
                                          f"ten lines over the run)")
        if self.tensorboard:
            import importlib.util

            require(importlib.util.find_spec("tensorboard") is not None,
                     "logging.tensorboard=true needs the tensorboard package, which is not installed: pip install "
                     "'meshtron[tensorboard]' (or tensorboard), or set logging.tensorboard=false")


@dataclass
class VerifyConfig:
    """`python -m trainer.verify`: steps to compare and the largest relative loss difference accepted."""

    steps: int = 3
    tolerance: float = 1e-5


# ------------------------------------------------------------------------------------------ launcher


@dataclass
class LauncherConfig:
    """``python -m trainer.launch``: the sbatch script rendered from ``slurm/train.sbatch`` and submitted.

    Training (``python -m trainer``) never reads this group; only the launcher does, and it checks that
    nodes x gpus_per_node equals the mesh's world size before anything is submitted.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    # Slurm's --time (e.g. 24:00:00 or 2-00:00:00).
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    # Shell lines (container or venv activation) replacing the template's setup block; None keeps the
    # template's own block.
    setup: Optional[str] = None
    # The interpreter the job runs (the template's PYTHON); None: the one running trainer.launch when setup
    # is None too, else the template's default (python, after the setup block).
    python: Optional[str] = None
    # Print the rendered script and submit nothing.
    dry_run: bool = False
    job_name: str = "meshtron"
    # The sbatch template; None: slurm/train.sbatch of this checkout.
    template: Optional[str] = None
    # Where Slurm writes the job's stdout/stderr; None: <trainer.output_dir>/logs.
    log_dir: Optional[str] = None
    # --signal=B:USR1@<signal_seconds>: the warning before the time limit (checkpoint, exit 75, requeue).
    signal_seconds: int = 300
    requeue: bool = True
    # torchrun: one task per node, torchrun starts a worker per GPU; srun: one task per GPU started by srun
    # (MESHTRON_LAUNCH=srun, --ntasks-per-node=gpus_per_node), ranks taken from SLURM_PROCID etc.
    mode: str = "torchrun"
    # --cpus-per-task; None keeps the template's value.
    cpus_per_task: Optional[int] = None
    # Further "#SBATCH" options, e.g. ["--qos=high", "--exclusive"] (the leading "#SBATCH" is optional).
    extra_sbatch: list[str] = field(default_factory=list)

    def validate(self) -> None:
        one_of("launcher.mode", self.mode, ("torchrun", "srun"))
        for name in ("nodes", "gpus_per_node", "signal_seconds"):
            require(getattr(self, name) >= 1, f"launcher.{name}={getattr(self, name)} must be >= 1")
        if self.cpus_per_task is not None:
            require(self.cpus_per_task >= 1, f"launcher.cpus_per_task={self.cpus_per_task} must be >= 1")
        require(bool(re.fullmatch(r"[0-9:-]+|UNLIMITED|INFINITE", self.time)),
                 f"launcher.time={self.time!r} is not a Slurm time (e.g. 24:00:00, 2-00:00:00, 90)")
        require(bool(re.fullmatch(r"[\w.+-]+", self.job_name)),
                 f"launcher.job_name={self.job_name!r}: use letters, digits and ._+- only")
        for opt in self.extra_sbatch:
            require(opt.strip().removeprefix("#SBATCH").strip().startswith("-") and "\n" not in opt,
                     f"launcher.extra_sbatch entry {opt!r} is not an sbatch option like --qos=high")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # trainer.objective=dpo's settings (trainer/dpo_config.py).
    dpo: DpoConfig = field(default_factory=DpoConfig)
    # Read by `python -m trainer.launch` only.
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# ----------------------------------------------------------------------------------- cross-field checks


def validate_config(cfg: Config) -> None:
    """Every group's own checks, then those spanning groups. Runs before anything is allocated."""
    for part in (cfg.model, cfg.parallel, cfg.data, cfg.optim, cfg.trainer, cfg.logging):
        part.validate()
    m, d, t, p = cfg.model, cfg.data, cfg.trainer, cfg.parallel
    require(
        d.seq_len <= m.max_position_embeddings,
        f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}",
    )
    require(
        t.global_batch_size % p.microbatch_size == 0,
        f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
        f"parallel.microbatch_size={p.microbatch_size}",
    )
