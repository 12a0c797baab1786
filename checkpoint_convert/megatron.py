"""Megatron-LM legacy (`torch` format) checkpoints <-> HF safetensors and meshtron, at any TP x PP (x EP for
mixtures of experts: checkpoint_convert.megatron_moe).

Each rank file (layout and args: `checkpoint_convert.megatron_format`) holds {"model": the megatron-core
GPTModel state dict of that rank (layers numbered from 0 on every pipeline stage), "checkpoint_version":
3.0, "iteration", "args": argparse.Namespace}. It is only ever read with weights_only=True, memory-mapped.

Conversion chains two declarative tables through meshtron's names: the family table (HF <-> meshtron,
`checkpoint_convert.models.<family>`) and the Megatron table (meshtron <-> megatron-core,
`checkpoint_convert.models.megatron_names`). Both work on full tensors; TP splits and PP x EP placement
(checkpoint_convert.megatron_layout) are applied here. Every conversion first runs on meta tensors: that checks names and shapes before a byte is
written, and sizes the progress bar and the output files.

Speed and memory (checkpoint_convert.parallel_io): both directions stream tensor by tensor, a reading thread ahead
of the writers, at most DEFAULT_INFLIGHT_BYTES in flight. HF -> Megatron converts each full tensor once and writes
the TP ranks of a stage in parallel, each rank file a torch.save whose records are filled as they are written (never
a whole rank in memory). Megatron -> HF unpickles each rank file once, memory-mapped, and hands back the pages of
each tensor once read, so the process does not grow with the checkpoint.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open
from transformers import GenerationConfig

from checkpoint_convert.detect import HF, HF_CONFIG, MEGATRON_LEGACY, refuse_other_kinds
from checkpoint_convert.hf import SafetensorsDir, hf_config, read_config_json, read_hf_config, write_config_files
from checkpoint_convert.megatron_common import (MetaShapes, Ours, check_hf_tensors, check_layout, common_dtype,
                                                 meshtron_shapes)
from checkpoint_convert.megatron_layout import merge, plan, stage_tensors
from checkpoint_convert.megatron_moe import check_expert_layout, expert_tp, same_moe
from checkpoint_convert.lora import PeftMerge
from checkpoint_convert.megatron_tokenizer import (TOKENIZER_GLOBS, copy_tokenizer, copy_tokens, record_tokenizer,
                                                   special_tokens)
from checkpoint_convert.models.megatron_names import REPLICATED, VOCAB, layer_of, tp_split
from checkpoint_convert.models.registry import family
from checkpoint_convert.parallel_io import Channel, drop_pages, nbytes, one_op_thread, read_ahead, save_streamed
from checkpoint_convert.safetensors_files import (DEFAULT_MAX_SHARD_BYTES, ST_DTYPES, PlannedShardWriter,
                                                  byte_progress, check_out_dir, dtype_name, staged_dir)
from checkpoint_convert.megatron_format import (CHECKPOINT_VERSION, CKPT_FILE, MODEL_KEY, TRACKER, PathLike,
                                                config_from_args, first_rank_args, load_rank_file, megatron_args,
                                                rank_dir, rank_dirs, resolve_iteration_dir,
                                                vocab_from_args, vocab_note)
from trainer.model.shapes import padded_vocab_size
from trainer.config import ModelConfig
from trainer.errors import ConfigError

__all__ = ["hf_to_megatron", "megatron_to_hf", "load_megatron_as_meshtron"]


# ======================================================================================= HF -> Megatron


def hf_to_megatron(hf_dir: PathLike, out_dir: PathLike, tp: int, pp: int, spec: str = "local",
                   vocab_divisible_by: int = 128, progress: bool = True, *, overwrite: bool = False,
                   ep: int = 1, lora: Optional[PathLike] = None) -> Path:
    """Write an HF checkpoint as a Megatron-LM `release` checkpoint at TP x PP (x EP for experts). Returns out_dir.

    Raises (before writing anything) ConfigError for an unsupported architecture or a TP/PP/spec that does
    not fit the model, KeyError for missing or unexpected HF tensors (e.g. no lm_head.weight with untied
    embeddings), ValueError for tensors of the wrong shape, FileExistsError for a non-empty out_dir.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    refuse_other_kinds(hf_dir, HF, HF_CONFIG)  # HF_CONFIG: the safetensors reader says what is missing
    cfg = read_hf_config(hf_dir)
    check_layout(cfg, tp, pp, spec, vocab_divisible_by)
    check_expert_layout(cfg, tp, ep)
    check_out_dir(out, overwrite)
    padded = padded_vocab_size(cfg.vocab_size, vocab_divisible_by, tp)
    expected = meshtron_shapes(cfg)
    placed = plan(spec, [cfg.num_layers // pp] * pp, expected, cfg, ep)
    with ExitStack() as stack:
        src = SafetensorsDir(hf_dir, stack)
        hf_units = family(cfg.family).table.units(expected, cfg)
        check_hf_tensors(src, hf_units, cfg, hf_dir)
        merge = PeftMerge(lora, set(src.files)) if lora is not None else None  # --lora: merged as read

        def stage(fetch: Callable[[str], torch.Tensor], s: int) -> Iterator[tuple[Optional[int], str, list]]:
            ours = Ours(hf_units, fetch, cfg, expected, what=str(hf_dir))
            return stage_tensors(placed[s], ours, cfg, tp, padded, last=s == pp - 1)

        def meta(name: str) -> torch.Tensor:
            sl = src.get_slice(name)
            return torch.empty(sl.get_shape(), dtype=ST_DTYPES[sl.get_dtype()], device="meta")

        def read(name: str) -> torch.Tensor:
            # A mapping of its own per tensor: pages read through a long-lived one would stay resident and
            # grow the process to the size of the whole checkpoint.
            with safe_open(str(src.files[name]), framework="pt") as f:
                return merge(name, f.get_tensor(name)) if merge else f.get_tensor(name)

        dry = {}  # (stage, EP rank, TP rank) -> its model state dict of meta tensors; raises on any mismatch
        for s in range(pp):
            with MetaShapes():
                tensors = list(stage(meta, s))
            for ep_rank, local, parts in tensors:
                for e in range(ep) if ep_rank is None else (ep_rank,):
                    for r in range(tp):
                        dry.setdefault((s, e, r), {})[local] = parts[r]
        args = megatron_args(cfg, tp, pp, spec, padded, vocab_divisible_by, common_dtype(dry[0, 0, 0].values()), ep)
        tokenizer = record_tokenizer(args, read_config_json(hf_dir), hf_dir, out)
        total = sum(map(_nbytes, dry.values()))
        with staged_dir(out, overwrite) as tmp, byte_progress(total, progress, f"writing {out.name}") as bar, \
                one_op_thread():
            (tmp / TRACKER).write_text("release")
            copy_tokenizer(tokenizer, tmp)
            for s in range(pp):
                paths = [tmp / "release" / rank_dir(r, s, pp, e, ep) / CKPT_FILE for e in range(ep) for r in range(tp)]
                _write_stage(paths, [dry[s, e, r] for e in range(ep) for r in range(tp)], stage(read, s), args, bar,
                             tp)
    return out


def _write_stage(paths: list[Path], models: list[dict], tensors: Iterator[tuple[Optional[int], str, list]], args,
                 bar, tp: int) -> None:
    """The rank files of one pipeline stage (EP-major, then TP), each written by a thread of its own while this one
    converts: each full tensor is converted once and its TP parts handed to the writers of every EP rank holding it
    (checkpoint_convert.parallel_io)."""
    channel, errors = Channel(len(paths)), []

    def write(r: int) -> None:
        try:
            paths[r].parent.mkdir(parents=True)
            model = {k: torch.empty(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v
                     for k, v in models[r].items()}  # never touched: no memory until filled
            records = channel.items(r)
            save_streamed(paths[r], {"model": model, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                                     "args": args}, model, records)
            if next(records, None) is not None:
                raise RuntimeError(f"{paths[r]}: more tensors than the file has records")
        except BaseException as e:  # noqa: BLE001 - raised in the converting thread below
            errors.append(e)
            channel.abort()

    writers = [threading.Thread(target=write, args=(r,), name=f"write-rank-{r}", daemon=True)
               for r in range(len(paths))]
    for w in writers:
        w.start()
    try:
        for ep_rank, local, parts in tensors:
            for e in range(len(paths) // tp) if ep_rank is None else (ep_rank,):
                for r, t in enumerate(parts):
                    if isinstance(t, torch.Tensor):
                        channel.put(e * tp + r, (local, t), nbytes(t))
                        bar.update(nbytes(t))
            del parts
        channel.close()
    except BaseException as e:
        channel.close(e)
        if not errors:
            raise
    finally:
        for w in writers:
            w.join()
    if errors:
        raise errors[0]


# ======================================================================================= reading


class _MegatronCheckpoint:
    """One iteration of a Megatron checkpoint, all rank files memory-mapped, indexed by global name.

    Its model chunks in model order: one per pipeline stage ("model"), or V per stage with virtual pipeline
    stages ("model0" .. "model<V-1>"), chunk c of stage s holding the (c x PP + s)-th run of layers
    (megatron-core's get_transformer_layer_offset): each chunk is numbered from layer 0 like a stage. With expert
    parallelism each stage has EP files per TP rank (checkpoint_convert.megatron_moe); `files[v][e][r]`.
    """

    def __init__(self, megatron_dir: PathLike, iteration: Optional[int]):
        root = Path(megatron_dir)
        refuse_other_kinds(root, MEGATRON_LEGACY)
        self.dir, self.iteration = resolve_iteration_dir(root, iteration)
        self.root = root
        self.args = first_rank_args(self.dir)
        self.tp = getattr(self.args, "tensor_model_parallel_size", 1)
        self.pp = getattr(self.args, "pipeline_model_parallel_size", 1)
        self.ep = getattr(self.args, "expert_model_parallel_size", None) or 1
        expert_tp(self.args, self.tp)
        layout = f"TP={self.tp} x PP={self.pp}" + (f" x EP={self.ep}" if self.ep > 1 else "")
        paths = [[[self.dir / rank_dir(r, s, self.pp, e, self.ep) / CKPT_FILE for r in range(self.tp)]
                  for e in range(self.ep)] for s in range(self.pp)]
        flat = [p for stage in paths for row in stage for p in row]
        missing = [str(p.relative_to(self.dir)) for p in flat if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir}: args say {layout} but rank files {missing} are missing")
        extra = sorted({p.name for p in rank_dirs(self.dir)} - {p.parent.name for p in flat})
        if extra:
            raise ValueError(f"{self.dir}: args say {layout}, but there are also {extra}")
        self.paths = paths
        # Each file is unpickled once, its tensors memory-mapped (`mapped`); `full` hands back the pages of what it
        # read, so they never stay resident and memory does not grow with the checkpoint. `files`: meta tensors.
        self.mapped = [[[self._model_entries(p) for p in row] for row in stage] for stage in paths]
        self.chunks = [(s, key) for key in self.mapped[0][0][0] for s in range(self.pp)]
        self.files = [[[{n: _meta_like(t) for n, t in self.mapped[s][e][r][key].items()} for r in range(self.tp)]
                       for e in range(self.ep)] for s, key in self.chunks]
        for v, stage in enumerate(self.files):
            for row in stage:
                keys = [{k for k in f if not k.endswith("._extra_state")} for f in row]
                if any(k != keys[0] for k in keys):
                    raise KeyError(f"{self.dir}: the TP ranks of {self._chunk(v)} hold different tensor names")
        self.cfg = config_from_args(self.args, name=root.name)
        check_expert_layout(self.cfg, self.tp, self.ep, where=f"{self.dir}: ")
        self.shapes = meshtron_shapes(self.cfg)
        # TE fuses the pre-attention/pre-MLP norms into the next linear: its names say which spec saved this.
        first = [k for stage in self.files for k in stage[0][0]]
        self.spec = "te" if any(k.endswith(".layer_norm_weight") for k in first) else "local"
        self.experts = "sequential" if any(".mlp.experts.local_experts." in k for k in first) else "grouped"
        self._index()

    def _model_entries(self, path: Path) -> dict[str, dict[str, torch.Tensor]]:
        """{"model" or "model<c>": {name: mapped tensor}} of one rank file; its keys must be what the args say."""
        found = {k: v for k, v in load_rank_file(path).items() if MODEL_KEY.fullmatch(k)}
        keys = sorted(found, key=lambda k: int(k[5:] or 0))
        vpp = getattr(self.args, "virtual_pipeline_model_parallel_size", None) or 1
        want = ["model"] if vpp == 1 else [f"model{c}" for c in range(vpp)]
        if keys != want or not all(isinstance(found[k], dict) for k in keys):
            raise KeyError(f"{path}: holds model entries {keys}, but args say virtual_pipeline_model_parallel_size="
                           f"{vpp}: expected {want}, each a state dict")
        return {k: found[k] for k in keys}

    def _chunk(self, v: int) -> str:
        s, key = self.chunks[v]
        return f"pipeline stage {s}" + ("" if key == "model" else f" ({key})")

    def padded_rows(self) -> int:
        """Vocabulary rows the checkpoint holds (padding included), over all TP ranks."""
        v, e, local = self.where["embedding.word_embeddings.weight"]
        return sum(f[local].shape[0] for f in self.files[v][e])

    def _index(self) -> None:
        """global Megatron name -> (chunk, EP rank, local name); checks the names against the model the args
        describe, on every EP rank."""
        counts = [1 + max((layer_of(k)[0] for k in stage[0][0] if layer_of(k)), default=-1) for stage in self.files]
        if sum(counts) != self.cfg.num_layers:
            raise ValueError(f"{self.dir}: stages hold {counts} layers, but args say num_layers={self.cfg.num_layers}")
        self.plan = plan(self.spec, counts, self.shapes, self.cfg, self.ep, self.experts)
        self.where: dict[str, tuple[int, int, str]] = {}
        for s, placed in enumerate(self.plan):
            for e in range(self.ep):
                want = {local for p in placed for at, local in p.names.values() if at in (None, e)}
                have = {k for k in self.files[s][e][0] if not k.endswith("._extra_state")}
                missing, unexpected = sorted(want - have), sorted(have - want)
                if "output_layer.weight" in missing and not self.cfg.tie_word_embeddings:
                    raise KeyError(f"{self.dir}: output_layer.weight is missing on the last pipeline stage but args "
                                   f"say untie_embeddings_and_output_weights=True")
                if missing or unexpected:
                    where = self._chunk(s) + (f", expert-parallel rank {e}" if self.ep > 1 else "")
                    raise KeyError(f"{self.dir}: {where} ({self.spec} spec) is missing {missing} and has "
                                   f"unexpected {unexpected}")
            for p in placed:
                for name, (at, local) in p.names.items():
                    self.where.setdefault(name, (s, at or 0, local))  # a tied last-stage copy is never read

    def full(self, name: str) -> torch.Tensor:
        """The full Megatron tensor (TP shards merged, vocabulary un-padded)."""
        v, e, local = self.where[name]
        stage, key = self.chunks[v]
        shards = [self.mapped[stage][e][r][key][local] for r in range(self.tp)]
        t = merge(name, shards)
        t = t[:self.cfg.vocab_size] if tp_split(name) == VOCAB else t
        if len(shards) == 1 or tp_split(name) == REPLICATED:  # still a view into the mapped file
            t = t.clone(memory_format=torch.contiguous_format)
        for shard in shards:
            drop_pages(shard)
        return t

    def meta(self, name: str) -> torch.Tensor:
        v, e, local = self.where[name]
        t = merge(name, [f[local] for f in self.files[v][e]])
        if tp_split(name) == VOCAB and t.shape[0] < self.cfg.vocab_size:
            raise ValueError(f"{self.dir}: {name} has {t.shape[0]} vocabulary rows, fewer than vocab_size="
                             f"{self.cfg.vocab_size}")
        return t[:self.cfg.vocab_size] if tp_split(name) == VOCAB else t

    def meshtron(self, fetch: Callable[[str], torch.Tensor]) -> Ours:
        units = [p.unit for stage in self.plan for p in stage]
        return Ours(units, fetch, self.cfg, self.shapes, what=str(self.dir))


def _meta_like(value):
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value


def read_checkpoint(megatron_dir: PathLike, iteration: Optional[int], hf_config_dir: Optional[PathLike] = None,
                    reader: Optional[Callable] = None):
    """The checkpoint (`reader`: this module's legacy reader, or the torch_dist one), with every name and shape
    checked by a dry run on meta tensors."""
    ckpt = (reader or _MegatronCheckpoint)(megatron_dir, iteration)
    if hf_config_dir is not None:
        refuse_other_kinds(Path(hf_config_dir), HF, HF_CONFIG)
        cfg = read_hf_config(hf_config_dir)
        _check_same_model(cfg, ckpt, hf_config_dir)
        ckpt.cfg, ckpt.shapes = cfg, meshtron_shapes(cfg)
    ckpt.vocab_note = vocab_note(ckpt.args, ckpt.cfg.vocab_size, ckpt.padded_rows(), hf_config_dir)
    ours = ckpt.meshtron(ckpt.meta)
    with MetaShapes():
        for name in ckpt.shapes:
            ours.take(name)
    return ckpt


def _check_same_model(hf: ModelConfig, ckpt: _MegatronCheckpoint, where: PathLike) -> None:
    fields = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
              "head_dim", "tie_word_embeddings", "add_qkv_bias", "qk_layernorm")
    if vocab_from_args(ckpt.args)[0] is not None:  # else only the padded size is known: the HF config says
        fields += ("vocab_size",)
    diff = [f"{f}: config.json {getattr(hf, f)} vs checkpoint {getattr(ckpt.cfg, f)}" for f in fields
            if getattr(hf, f) != getattr(ckpt.cfg, f)] + same_moe(hf.moe, ckpt.cfg.moe)
    if diff:
        raise ConfigError(f"hf_config_dir {where} describes another model than the Megatron checkpoint in "
                          f"{ckpt.dir}: " + "; ".join(diff))


def load_megatron_as_meshtron(megatron_dir: PathLike, iteration: Optional[int] = None
                              ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full state dict in meshtron's names, vocabulary un-padded): GPTModel(cfg).load_state_dict works."""
    return meshtron_state(read_checkpoint(megatron_dir, iteration))


def meshtron_state(ckpt) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    ours = ckpt.meshtron(ckpt.full)
    return ckpt.cfg, {name: ours.take(name).contiguous() for name in ckpt.shapes}


# ======================================================================================= Megatron -> HF


def megatron_to_hf(megatron_dir: PathLike, out_dir: PathLike, hf_config_dir: Optional[PathLike] = None,
                   iteration: Optional[int] = None, progress: bool = True, *, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a Megatron-LM checkpoint (any TP x PP, local or TE names) as an HF directory. Returns out_dir.

    Weights keep their saved dtype; the vocabulary is un-padded and tied embeddings get no lm_head.
    config.json and generation_config.json come from hf_config_dir when given (its tokenizer files are
    copied too), else they are rebuilt from the checkpoint's args. Raises before writing: FileNotFoundError
    (no tracker, missing rank files), KeyError (missing/unexpected tensors), ValueError (shapes),
    ConfigError (unsupported args, or hf_config_dir describing another model), FileExistsError (out_dir).
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    ckpt = read_checkpoint(megatron_dir, iteration, hf_config_dir)
    print(ckpt.vocab_note, file=sys.stderr, flush=True)
    write_hf_dir(ckpt, out, hf_config_dir, progress, overwrite, max_shard_bytes)
    return out


def write_hf_dir(ckpt, out: Path, hf_config_dir: Optional[PathLike], progress: bool, overwrite: bool,
                 max_shard_bytes: int) -> None:
    """A checked checkpoint (read_checkpoint) as an HF directory, one tensor in memory at a time."""
    cfg = ckpt.cfg
    units = family(cfg.family).table.units(ckpt.shapes, cfg)

    def hf_tensors(fetch) -> Iterator[tuple[str, torch.Tensor]]:
        ours = ckpt.meshtron(fetch)
        for unit in units:
            yield from unit.convert_to_theirs([ours.take(n) for n in unit.ours], cfg).items()

    with MetaShapes():
        planned = {name: (t.shape, t.dtype) for name, t in hf_tensors(ckpt.meta)}  # every shape before writing
    total = sum(math.prod(shape) * dt.itemsize for shape, dt in planned.values())
    with staged_dir(out, overwrite) as tmp, byte_progress(total, progress, f"writing {out.name}") as bar, \
            one_op_thread():
        writer = PlannedShardWriter(tmp, planned, max_shard_bytes)  # tensors in flight only, not a shard
        # Read and converted in a thread of its own, a bounded number of bytes ahead of the writes here.
        for name, t in read_ahead(hf_tensors(ckpt.full), lambda item: nbytes(item[1])):
            writer.add(name, t)  # refuses a name, shape or dtype the dry run did not plan
            bar.update(nbytes(t))
            del t
        writer.finish()
        _write_hf_config(tmp, ckpt, hf_config_dir, dtype_name(dt for _, dt in planned.values()))


def _write_hf_config(tmp: Path, ckpt, hf_config_dir: Optional[PathLike], dtype: str) -> None:
    if hf_config_dir is None:  # the special tokens and tokenizer the checkpoint records (megatron_tokenizer)
        tokens = special_tokens(ckpt.args, ckpt.root)
        if tokens.note:
            print(f"note: {tokens.note}", file=sys.stderr, flush=True)
        config = hf_config(ckpt.cfg, **tokens.ids)
        config.dtype = dtype
        copy_tokens(tokens, tmp)
        write_config_files(tmp, config)
        return
    config = hf_config(ckpt.cfg)
    config.dtype = dtype
    src = Path(hf_config_dir)  # its config.json as it is, its tokenizer and generation config
    for pattern in ("config.json", "generation_config.json") + TOKENIZER_GLOBS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
    if not (tmp / "generation_config.json").exists():
        GenerationConfig.from_model_config(config).save_pretrained(tmp)


# ========================================================================================= helpers


def _nbytes(tensors) -> int:
    tensors = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
