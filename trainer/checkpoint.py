"""Sharded, atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

One directory per step, ``<output_dir>/checkpoints/step_<N>/``:

    .metadata, __*_*.distcp   DCP: {"model": FQN -> tensor, "optim": flattened FQN-keyed optimizer state}
    trainer_state.pt          step, token count, data-loader position, LR schedule (rank 0; weights_only)
    rng/rank_<r>.pt           python / numpy / torch RNG states of rank r, as tensors and primitives
    config.yaml               the resolved run config (secrets redacted)
    hf/                       HF config.json, tokenizer files and chat template: an HF export needs nothing else
    COMPLETE                  written last, by rank 0, after every rank has finished: every file of the
                              checkpoint with its size and CRC-32 (checkpoint_convert/integrity.py)

Model and optimizer tensors are saved as DTensors keyed by the original model's FQNs, so a checkpoint
loads on any mesh. The last pipeline stage's copy of tied embeddings (``output_layer.weight``) is saved
and loaded as ``embedding.word_embeddings.weight``: both copies are kept bitwise equal, optimizer state
included, so one key serves both.

Atomicity: everything is written to ``.tmp_step_<N>``; when every rank has written its part (and described
its files in ``.manifest/``), rank 0 writes ``COMPLETE``, renames the directory to ``step_<N>`` and only then
moves the ``latest`` pointer and deletes checkpoints beyond ``keep_last``. A directory without ``COMPLETE`` is
never resumed from. A synchronous save commits at once (two barriers); an async save commits at the first step
boundary where every rank's background write has finished: the ranks agree through the step's own reduction
(trainer.step.step_totals), so committing costs no collective. Preemption and the end of training wait for a
pending save and commit it.

Integrity: a resume checks the size of every file COMPLETE lists, and with ``trainer.checkpoint.verify=full``
every checksum too (the reads split between ranks); a damaged checkpoint is reported by file and the newest
intact one is used instead.

Trust: the non-DCP files are read with ``torch.load(weights_only=True)``. DCP's own ``.metadata`` file is a
pickle that torch reads without that protection: only load checkpoints you (or your cluster) wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from checkpoint_convert.integrity import (COMPLETE, LATEST, DamagedCheckpoint, check_files, recorded_files,
                                          total_bytes, write_complete, write_rank_manifest)
from trainer.config import Config
from trainer.config_io import resolved_yaml
from trainer.errors import ConfigError
from trainer.disk import NoSpace, check_space, is_no_space
from trainer.distributed import broadcast_str
from trainer.exits import EXIT_CHECKPOINT_FAILED, EXIT_NO_SPACE, RunExit

TMP_PREFIX = ".tmp_step_"


@contextlib.contextmanager
def _dcp_quietly(distributed: bool):
    """DCP warns "torch.distributed is disabled ... assuming the intent is to save in a single process" at every
    save and load of a one-process run: that is the intent, and nothing a user could act on."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield

TIED_COPY_FQN = "output_layer.weight"
EMBEDDING_FQN = "embedding.word_embeddings.weight"
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# A LoRA run saves what it trains, the adapters, and loads them into a base built from its own weights.
_TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used with this run; the message says which file or tensor and why."""


# ------------------------------------------------------------------------------------------ finding


def step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def scan(root: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints by increasing step, incomplete directories) under a checkpoints/ directory."""
    complete, incomplete = [], []
    if not root.is_dir():
        return complete, incomplete
    for d in root.iterdir():
        if not d.is_dir():
            continue
        if d.name.startswith("step_") and (d / COMPLETE).is_file():
            complete.append(d)
        elif d.name.startswith(("step_", TMP_PREFIX)):
            incomplete.append(d)
    return sorted(complete, key=step_of), sorted(incomplete)


def find_resume(cfg: Config, out: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints a resume may use, newest first (the first intact one is taken: Checkpointer.pick),
    and notes for the log (incomplete directories ignored)."""
    ck = cfg.trainer.checkpoint
    notes: list[str] = []
    if ck.load_from:
        path = Path(ck.load_from).expanduser()
        if (path / COMPLETE).is_file():
            return [path], notes  # named by the user: no fallback to another step
        complete, _ = scan(path)
        if not complete:
            raise CheckpointError(f"trainer.checkpoint.load_from={ck.load_from!r} is neither a complete checkpoint "
                                  f"(a step_<N> directory with a {COMPLETE} file) nor a directory holding one")
        return complete[::-1], notes
    if ck.resume == "never":
        return [], notes
    complete, incomplete = scan(out / "checkpoints")
    for d in incomplete:
        notes.append(f"checkpoint: ignoring incomplete {d} (no {COMPLETE} file: its save was interrupted)")
    return complete[::-1], notes


def load_untrusted(path: Path) -> Any:
    """A non-DCP checkpoint file: tensors and primitives only, never arbitrary pickled objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a forbidden global; anything else means unreadable
        raise CheckpointError(f"refusing to load {path}: not a weights-only file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e


# ------------------------------------------------------------------------------------- state dicts


def _has_tied_copy(module) -> bool:
    return bool(module.config.tie_word_embeddings and getattr(module, "output_layer", None) is not None)


def _rename(key: str, tied: bool) -> str:
    if not tied:
        return key
    if key == TIED_COPY_FQN:
        return EMBEDDING_FQN
    return key.replace(f".{TIED_COPY_FQN}.", f".{EMBEDDING_FQN}.")


def _stage_states(pm, opt, trained_only: bool = False) -> list[tuple[bool, dict, dict]]:
    model_options = _TRAINED_ONLY if trained_only else None
    return [(_has_tied_copy(m), get_model_state_dict(m, options=model_options),
             get_optimizer_state_dict(m, o, options=_OPTIM_OPTIONS)) for m, o in zip(pm.modules, opt.optimizers)]


def base_identity(cfg: Config) -> dict:
    """What a LoRA run's adapters were trained on: the HF directory and a hash of its config.json and weight
    index (or safetensors header), or, for a base initialised from the seed, a hash of the model config and seed."""
    import hashlib

    digest = hashlib.sha256()
    m = cfg.model
    if m.hf_path:
        hf = Path(m.hf_path)
        for name in ("config.json", "model.safetensors.index.json"):
            if (hf / name).is_file():
                digest.update((hf / name).read_bytes())
        single = hf / "model.safetensors"
        if single.is_file() and not (hf / "model.safetensors.index.json").is_file():
            with open(single, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(n, 1 << 26)))  # the header: names, dtypes, shapes, offsets
        return {"base": str(hf.resolve()), "hash": digest.hexdigest()[:16]}
    import dataclasses
    import json

    shape = {k: v for k, v in dataclasses.asdict(m).items() if k not in ("lora", "name", "hf_path")}
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode() + f"seed={cfg.trainer.seed}".encode())
    return {"base": f"initialised from trainer.seed={cfg.trainer.seed}", "hash": digest.hexdigest()[:16]}


def _merge(stages: list[tuple[bool, dict, dict]]) -> dict[str, dict]:
    """One {"model", "optim"} dict for DCP; a key held twice on this rank (both copies of a tied embedding
    with V placement) is stored once: the copies are equal."""
    merged: dict[str, dict] = {"model": {}, "optim": {}}
    for tied, msd, osd in stages:
        for part, sd in (("model", msd), ("optim", osd)):
            for k, v in sd.items():
                merged[part].setdefault(_rename(k, tied), v)
    return merged


def _shape(t: Any) -> Optional[tuple]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def check_shapes(merged: dict[str, dict], path: Path) -> None:
    """Refuse a checkpoint of another model shape, naming the first tensor that differs."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for k, t in merged["model"].items():
        want = _shape(t)
        saved = meta.get(f"model.{k}")
        if saved is None:
            raise CheckpointError(f"checkpoint {path} has no tensor {k!r} that this model needs (model shape "
                                  f"{list(want) if want else None}); it was saved from a different model config")
        got = tuple(getattr(saved, "size", ()))
        if want is not None and got != want:
            raise CheckpointError(f"checkpoint {path} does not match the configured model: {k!r} has shape "
                                  f"{list(got)} in the checkpoint but {list(want)} in this model")


# --------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    np_key, np_state, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": np_key, "state": torch.from_numpy(np_state.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------- checkpointer


def _describe(e: BaseException) -> str:
    """One line per failing rank instead of DCP's full tracebacks."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, (exc, _) in sorted(e.failures.items()))
    return f"rank {dist.get_rank() if dist.is_initialized() else 0}: {type(e).__name__}: {e}"


class Checkpointer:
    """Saves and loads this run's checkpoints; every rank constructs one and calls save/load together."""

    def __init__(self, cfg: Config, out: Path, rank: int, world_size: int, tokenizer=None):
        self.cfg, self.ck = cfg, cfg.trainer.checkpoint
        self.timeout_s = cfg.trainer.dist_timeout_s
        self.root = out / "checkpoints"
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer
        self.pending: Optional[tuple[Future, int, Path]] = None  # (this rank's write, step, tmp dir) of an async save
        self.last_saved = -1
        self._needed = 0  # bytes the save under way writes (about: _expected_bytes)
        # Async saves run collectives from a background thread: give them their own gloo group (torch's advice).
        self.group = dist.new_group(backend="gloo") if self.ck.async_save and world_size > 1 else None
        self._background = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if self.ck.async_save else None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---------------------------------------------------------------------------------------- save

    def should_save(self, step: int, preempted: bool) -> bool:
        """Every trainer.checkpoint.every_steps steps and after the last step (0: never), and on preemption."""
        every = self.ck.every_steps
        return preempted or bool(every and (step % every == 0 or step == self.cfg.trainer.max_steps))

    def should_save_before_export(self, step: int) -> bool:
        """The last step of a run that saves none otherwise and exports (trainer.checkpoint.save_before_export),
        asked when should_save said no."""
        t = self.cfg.trainer
        return step == t.max_steps and t.export_hf and self.ck.save_before_export

    def save(self, step: int, pm, opt, loader, tokens: int) -> None:
        if step == self.last_saved:
            return
        self.wait()
        tmp = self.root / f"{TMP_PREFIX}{step}"
        state = _merge(_stage_states(pm, opt, self.cfg.model.lora.enabled))
        # Rank 0 checks the free space and makes the directory; every rank hears the outcome (the barrier
        # before anyone writes), so a full disk stops all of them here with nothing written.
        self._needed = self._expected_bytes(state, pm)
        problem = self._prepare(step, tmp) if self.rank == 0 else ""
        problem = broadcast_str(problem) if self.distributed else problem
        if problem:
            raise RunExit(EXIT_NO_SPACE, problem)
        try:  # the small files first; every rank says how they went before DCP's collectives begin
            torch.save(rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                self._write_run_files(tmp, step, opt, loader, tokens)
            mine: Optional[BaseException] = None
        except OSError as e:
            mine = e
        failed = self._failed_ranks(mine)
        if failed:
            self._fail(step, tmp, mine, f"rank(s) {failed} could not write their files")
        self.last_saved = step
        writer = self._writer(step, tmp)
        if self.ck.async_save:
            with _dcp_quietly(self.distributed):
                result = dcp.async_save(state, storage_writer=writer, process_group=self.group)
            written = getattr(result, "upload_completion", result)
            self.pending = (self._background.submit(self._describe_when_written, written, tmp), step, tmp)
            return
        try:
            with _dcp_quietly(self.distributed):
                dcp.save(state, storage_writer=writer, no_dist=not self.distributed)
            self._describe_files(tmp)
        except (Exception, CheckpointException) as e:
            self._fail(step, tmp, e)
        self._commit(step, tmp)

    def _prepare(self, step: int, tmp: Path) -> str:
        """Rank 0: '' once ``.tmp_step_N/rng`` exists, or why it cannot (not enough space for this save)."""
        needed = self._needed
        try:
            check_space(f"checkpoint step {step}", self.root, needed, self._advice())
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        except NoSpace as e:
            return str(e)
        except OSError as e:
            if not is_no_space(e):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return str(NoSpace(f"checkpoint step {step}", self.root, needed, self._advice()))
        return ""

    def _expected_bytes(self, state: dict, pm) -> int:
        """What this save writes: the size of the last complete checkpoint, else the state's tensors at their
        global sizes as this rank sees them (its pipeline stage) times the number of stages."""
        complete, _ = scan(self.root)
        try:
            files = recorded_files(complete[-1]) if complete else None
        except DamagedCheckpoint:
            files = None
        if files:
            return total_bytes(files)
        held = sum(t.numel() * t.element_size() for part in state.values() for t in part.values()
                   if isinstance(t, torch.Tensor))
        return held * max(1, getattr(getattr(pm, "dims", None), "pp", 1))

    def _advice(self) -> str:
        return (f"free space there, lower trainer.checkpoint.keep_last (now {self.ck.keep_last}; a save needs room "
                f"for one more before the oldest is deleted), or set trainer.output_dir on a larger filesystem")

    def _failed_ranks(self, mine: Optional[BaseException]) -> list[int]:
        if not self.distributed:
            return [0] if mine is not None else []
        flags: list[Optional[bool]] = [None] * self.world_size
        dist.all_gather_object(flags, mine is not None)
        return [r for r, bad in enumerate(flags) if bad]

    def _fail(self, step: int, tmp: Path, error: Optional[BaseException], what: str = "") -> None:
        """A save that failed on some rank: its partial directory goes (a resume ignores it anyway and it may
        be filling the disk), then RunExit: EXIT_NO_SPACE for a full disk or quota, else EXIT_CHECKPOINT_FAILED."""
        if self.distributed:
            dist.barrier()  # every rank is done with the directory
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.last_saved = -1  # nothing of this step is saved
        if is_no_space(error):
            raise NoSpace(f"checkpoint step {step}", self.root, self._needed,
                          f"its partial files were removed; {self._advice()}") from error
        detail = _describe(error) if error is not None else what
        raise RunExit(EXIT_CHECKPOINT_FAILED, f"checkpoint of step {step} failed: {detail}") from error

    def _writer(self, step: int, tmp: Path) -> dcp.FileSystemWriter:
        return dcp.FileSystemWriter(str(tmp))

    def _rank_files(self, tmp: Path) -> list[str]:
        """What this rank wrote: its RNG state and DCP shards (FileSystemWriter names them __<rank>_<i>.distcp);
        rank 0 also the DCP metadata and the run files."""
        files = [f"rng/rank_{self.rank:05d}.pt"] + sorted(p.name for p in tmp.glob(f"__{self.rank}_*.distcp"))
        if self.rank == 0:
            files += [".metadata", "trainer_state.pt", "config.yaml"]
            files += sorted(str(p.relative_to(tmp)) for p in (tmp / "hf").rglob("*") if p.is_file())
        return files

    def _describe_files(self, tmp: Path) -> None:
        # Right after writing, so the bytes come from the page cache; each rank its own files.
        write_rank_manifest(tmp, self.rank, self._rank_files(tmp))

    def _describe_when_written(self, written: Future, tmp: Path) -> None:
        written.result()
        self._describe_files(tmp)

    def _write_run_files(self, tmp: Path, step: int, opt, loader, tokens: int) -> None:
        lora = {"lora_base": base_identity(self.cfg)} if self.cfg.model.lora.enabled else {}
        torch.save({"step": step, "tokens": tokens, "world_size": self.world_size, "loader": loader.state_dict(), **lora,
                    "schedulers": opt.scheduler_state()}, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(resolved_yaml(self.cfg))
        hf = tmp / "hf"
        hf.mkdir()
        if self.tokenizer is not None:
            from checkpoint_convert.hf import hf_config_dict

            ids = {k: getattr(self.tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            self.tokenizer.save_pretrained(str(hf))
            (hf / "config.json").write_text(json.dumps(hf_config_dict(self.cfg.model, **ids), indent=2,
                                                       sort_keys=True) + "\n")
        template = self.cfg.data.chat_template
        if template and Path(template).is_file():
            shutil.copyfile(template, hf / "chat_template.jinja")

    def save_flags(self) -> tuple[bool, bool]:
        """(still writing, failed) of this rank's pending async save, for the step's reduction."""
        if self.pending is None or not self.pending[0].done():
            return self.pending is not None, False
        return False, self.pending[0].exception() is not None

    def at_step_boundary(self, writing_ranks: int, failed_ranks: int) -> None:
        """Commit a pending async save once no rank is still writing it (the counts come from the step's
        reduction, so every rank decides alike); a failed one stops the run with EXIT_CHECKPOINT_FAILED."""
        if self.pending is None or writing_ranks:
            return
        future, step, tmp = self.pending
        if failed_ranks:
            self.pending = None
            error = future.exception()
            mine = f": {_describe(error)}" if error is not None else ""
            self._fail(step, tmp, error, f"written in the background, it failed on {failed_ranks} rank(s){mine}")
        self.pending = None
        self._commit(step, tmp, agreed=True)

    def wait(self) -> None:
        """Finish (and commit) a pending async save; a failed one stops the run with EXIT_CHECKPOINT_FAILED."""
        if self.pending is None:
            return
        future, step, tmp = self.pending
        self.pending = None
        if not future.done() and self.rank == 0:
            print(f"checkpoint: waiting for every rank's background write of step {step} (at most "
                  f"trainer.dist_timeout_s={self.timeout_s:g}s)", flush=True)
        try:
            future.result(timeout=self.timeout_s)
        except FutureTimeout as e:
            raise RunExit(EXIT_CHECKPOINT_FAILED, f"checkpoint of step {step} still writing after "
                                                  f"trainer.dist_timeout_s={self.timeout_s:g}s") from e
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            self._fail(step, tmp, e)
        self._commit(step, tmp)

    def _commit(self, step: int, tmp: Path, agreed: bool = False) -> None:
        """COMPLETE, rename, `latest`, prune (rank 0). `agreed`: every rank has already said (in the step's
        reduction) that its part is written, so no barrier is needed before or after."""
        if not agreed:
            self._barrier()  # every rank's shards and file manifest are written
        if self.rank == 0:
            try:
                write_complete(tmp, step, self.world_size)
            except OSError as e:
                raise RunExit(EXIT_CHECKPOINT_FAILED, f"checkpoint of step {step} failed: {e}") from e
            final = self.root / f"step_{step}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.root / f".{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            self._prune()
        if not agreed:
            self._barrier()

    def complete(self, step: int) -> Optional[Path]:
        """This run's complete checkpoint of `step`, if one exists."""
        path = self.root / f"step_{step}"
        return path if (path / COMPLETE).is_file() else None

    def _prune(self) -> None:
        if self.ck.keep_last <= 0:
            return
        complete, _ = scan(self.root)
        for old in complete[:-self.ck.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------------------------- verify

    def pick(self, candidates: list[Path]) -> tuple[Optional[Path], list[str]]:
        """The newest intact checkpoint among `candidates` (newest first) and notes for the log. Every rank
        checks its share (sizes: rank 0, a stat per file; checksums with verify=full: every rank a part), and
        all agree on the outcome; none intact -> DamagedCheckpoint (exit 2) naming the files."""
        notes: list[str] = []
        damaged: list[str] = []
        for path in candidates:
            problems = self._check(path)
            if not problems:
                if damaged:
                    notes.append(f"checkpoint: using {path}, the newest intact checkpoint")
                return path, notes
            damaged += problems
            notes.append(f"checkpoint: {path} is damaged, not resuming from it: " + "; ".join(problems[:5])
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        if damaged:
            raise DamagedCheckpoint("no intact checkpoint to resume from: " + "; ".join(damaged[:10])
                                    + "; restore the files, point trainer.checkpoint.load_from at another "
                                      "checkpoint, or set trainer.checkpoint.resume=never to start afresh")
        return None, notes

    def _check(self, path: Path) -> list[str]:
        full = self.ck.verify == "full"
        try:
            files = recorded_files(path)
            if files is None:
                problems = []
            else:
                from checkpoint_convert.safetensors_files import byte_progress

                share = (self.rank, self.world_size)
                desc = f"verifying {path.name}" + (" (rank 0's share)" if self.world_size > 1 else "")
                with byte_progress(total_bytes(files, share), full and self.rank == 0, desc) as bar:
                    problems = check_files(path, files, full, share, bar.update)
        except DamagedCheckpoint as e:
            problems = [str(e)]
        if self.distributed:
            gathered: list[Optional[list[str]]] = [None] * self.world_size
            dist.all_gather_object(gathered, problems)
            problems = [p for part in gathered for p in (part or [])]
        return problems

    # ---------------------------------------------------------------------------------------- load

    def load(self, path: Path, pm, opt, loader) -> tuple[int, int, list[str]]:
        """Restores model, optimizer, schedule, loader and RNG; returns (step, tokens, notes for the log)."""
        ts = load_untrusted(path / "trainer_state.pt")
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        rng = load_untrusted(rng_file) if ts["world_size"] == self.world_size and rng_file.is_file() else None
        lora = self.cfg.model.lora.enabled
        if lora != ("lora_base" in ts):
            raise CheckpointError(f"checkpoint {path} is " + ("a full model's; this run trains LoRA adapters "
                                  "(model.lora.rank > 0): start it from the HF export instead (model.hf_path)"
                                  if lora else "a LoRA run's (adapters only); this run trains every parameter "
                                  "(model.lora.rank=0): set model.lora.* as that run had them"))
        if lora and ts["lora_base"] != base_identity(self.cfg):
            saved, now = ts["lora_base"], base_identity(self.cfg)
            raise CheckpointError(f"checkpoint {path} holds LoRA adapters trained on {saved['base']} (hash "
                                  f"{saved['hash']}), but this run's base is {now['base']} (hash {now['hash']}); "
                                  f"resume with the same base model")
        stages = _stage_states(pm, opt, lora)
        merged = _merge(stages)
        check_shapes(merged, path)
        with _dcp_quietly(self.distributed):
            dcp.load(merged, checkpoint_id=str(path), no_dist=not self.distributed)
        for (tied, msd, osd), module, optimizer in zip(stages, pm.modules, opt.optimizers):
            set_model_state_dict(module, {k: merged["model"][_rename(k, tied)] for k in msd},
                                 options=_TRAINED_ONLY if lora else None)
            set_optimizer_state_dict(module, optimizer, {k: merged["optim"][_rename(k, tied)] for k in osd},
                                     options=_OPTIM_OPTIONS)
        opt.load_scheduler_state(ts["schedulers"])
        loader.load_state_dict(ts["loader"])
        notes = []
        if rng is not None:
            set_rng_state(rng)
        else:
            notes.append(f"checkpoint: saved at world size {ts['world_size']}, now {self.world_size}: "
                         "per-rank RNG states not restored")
        self.last_saved = int(ts["step"])
        return int(ts["step"]), int(ts["tokens"]), notes

    def close(self) -> None:
        self.wait()
        if self._background is not None:
            self._background.shutdown()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
