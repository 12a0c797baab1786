"""What kind of directory a path is, and which meshtron-convert command reads it.

Every reader refuses a directory of the wrong kind with one line naming what it is instead, e.g.
``runs/x/checkpoints is a meshtron checkpoints/ directory; read it with `meshtron-convert meshtron-to-hf
--checkpoint runs/x/checkpoints --out DIR```. Detection only lists directories and reads two small text
files (Megatron's tracker and metadata.json); it never unpickles anything.

What tells the kinds apart (meshtron's step directories and Megatron's torch_dist iteration directories both
hold DCP's ``.metadata`` and ``__*.distcp``):

    meshtron step_<N>/        .metadata + COMPLETE (written last); without COMPLETE an interrupted save
    meshtron checkpoints/     `latest` and step_<N>/ ; a run directory holds checkpoints/
    Megatron legacy           iteration directory with mp_rank_TT[_PPP]/ ; root with
                              latest_checkpointed_iteration.txt naming release/ or iter_NNNNNNN/
    Megatron torch_dist       iteration directory with metadata.json {"sharded_backend": "torch_dist"}
                              (+ .metadata, __*.distcp, common.pt); root as above
    HF                        config.json + *.safetensors
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from checkpoint_convert.integrity import COMPLETE, LATEST
from checkpoint_convert.megatron_format import TRACKER, rank_dirs
from trainer.errors import ConfigError

MISSING, NOT_A_DIRECTORY, UNKNOWN = "missing", "not_a_directory", "unknown"
MESHTRON_STEP, MESHTRON_INCOMPLETE = "meshtron_step", "meshtron_incomplete"
MESHTRON_CHECKPOINTS = "meshtron_checkpoints"
MEGATRON_LEGACY, MEGATRON_TORCH_DIST, MEGATRON_OTHER = "megatron_legacy", "megatron_torch_dist", "megatron_other"
HF, HF_CONFIG, DCP = "hf", "hf_config", "dcp"

# Files only meshtron's checkpoint writer puts in a step directory (trainer/checkpoint.py).
_MESHTRON_MARKERS = ("config.yaml", "trainer_state.pt", "hf", "rng", ".manifest")
_STEP_NAME = re.compile(r"(\.tmp_)?step_\d+")


@dataclass(frozen=True)
class Kind:
    """name: one of the constants above; description: what it is, for a sentence "X is <description>";
    command: the meshtron-convert command line that reads it (None: no command does)."""

    name: str
    description: str
    command: Optional[str]
    path: str

    def sentence(self) -> str:
        """One line: what the directory is and what to do with it."""
        if self.name == MESHTRON_INCOMPLETE:  # its command reads the newest complete checkpoint beside it
            return f"{self.path} is {self.description}; read the newest complete one with `meshtron-convert " \
                   f"{self.command}`"
        if self.command:
            return f"{self.path} is {self.description}; read it with `meshtron-convert {self.command}`"
        if self.name in (MISSING, NOT_A_DIRECTORY):
            return f"{self.path} is {self.description}"
        return f"{self.path} is {self.description}; no meshtron-convert command reads it"


def detect(path: Union[str, Path]) -> Kind:
    p = Path(path).expanduser()

    def kind(name: str, description: str, command: Optional[str] = None) -> Kind:
        return Kind(name, description, command, str(path))

    if not p.exists():
        return kind(MISSING, "missing (no such file or directory)")
    if not p.is_dir():
        return kind(NOT_A_DIRECTORY, "a file, not a checkpoint directory")
    megatron = _megatron(p)
    if megatron is not None:
        name, what = megatron
        return kind(name, what, f"megatron-to-hf --megatron {path} --out DIR" if name != MEGATRON_OTHER else None)
    meshtron = f"meshtron-to-hf --checkpoint {path} --out DIR"
    if (p / ".metadata").is_file():
        if (p / COMPLETE).is_file():
            return kind(MESHTRON_STEP, "a meshtron checkpoint (step directory)", meshtron)
        if _STEP_NAME.fullmatch(p.name) or any((p / m).exists() for m in _MESHTRON_MARKERS):
            return kind(MESHTRON_INCOMPLETE, f"an incomplete meshtron checkpoint (no {COMPLETE} file: its save "
                                             f"was interrupted)", f"meshtron-to-hf --checkpoint {p.parent} --out DIR")
        return kind(DCP, "a PyTorch distributed checkpoint (DCP) written neither by meshtron (no COMPLETE) nor by "
                         "Megatron-LM (no metadata.json)")
    for root, what in ((p, "a meshtron checkpoints/ directory"), (p / "checkpoints", "a meshtron run directory")):
        if (root / LATEST).is_file() or any(_STEP_NAME.fullmatch(d.name) for d in _subdirs(root)):
            return kind(MESHTRON_CHECKPOINTS, what, meshtron)
    if (p / "config.json").is_file():
        if any(p.glob("*.safetensors")):
            return kind(HF, "an HF model directory (config.json + safetensors)",
                        f"hf-to-megatron --hf {path} --out DIR --tp T --pp P")
        return kind(HF_CONFIG, "an HF config directory (config.json without *.safetensors weights)",
                    f"megatron-to-hf --megatron MEGATRON_DIR --out DIR --hf-config {path}")
    return kind(UNKNOWN, "not a checkpoint meshtron-convert knows (neither meshtron's, Megatron-LM's nor HF's)")


def refuse_other_kinds(path: Union[str, Path], *accepted: str) -> None:
    """ConfigError naming what `path` is and which command reads it, when it is a known kind not in `accepted`
    (unknown or missing paths are left to the reader, which says what it misses)."""
    kind = detect(path)
    if kind.name not in (*accepted, UNKNOWN, MISSING):
        raise ConfigError(kind.sentence())


def _megatron(p: Path) -> Optional[tuple[str, str]]:
    """(kind name, description) when `p` is a Megatron-LM iteration directory or checkpoint root."""
    here = _iteration_format(p)
    if here is not None:
        return here[0], f"a Megatron-LM {here[1]} checkpoint (iteration directory {p.name})"
    tracker = p / TRACKER
    named = tracker.read_text(errors="replace").strip() if tracker.is_file() else ""
    subdir = "release" if named == "release" else f"iter_{int(named):07d}" if named.isdigit() else None
    # The directory the tracker names first, else any iteration directory (with --iteration N, say).
    iterations = sorted(d for d in _subdirs(p) if re.fullmatch(r"iter_\d+|release", d.name))
    for d in ([p / subdir] if subdir else []) + iterations:
        found = _iteration_format(d)
        if found is not None:
            note = f"{TRACKER} -> {d.name}" if tracker.is_file() else f"{d.name}, no {TRACKER}"
            return found[0], f"a Megatron-LM {found[1]} checkpoint ({note})"
    if tracker.is_file():  # the readers say what is missing
        return MEGATRON_LEGACY, f"a Megatron-LM checkpoint ({TRACKER} -> {named!r})"
    return None


def _iteration_format(d: Path) -> Optional[tuple[str, str]]:
    """(kind name, format words) of a Megatron iteration directory, None if `d` is not one."""
    if rank_dirs(d):
        return MEGATRON_LEGACY, "legacy (torch format)"
    meta = d / "metadata.json"
    if meta.is_file():
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except (ValueError, UnicodeDecodeError, AttributeError):
            backend = None
        if backend == "torch_dist":
            return MEGATRON_TORCH_DIST, "torch_dist"
        if backend is not None:
            return MEGATRON_OTHER, f"distributed (sharded_backend {backend!r}, unsupported)"
    if (d / "common.pt").is_file() and (d / ".metadata").is_file():  # metadata.json lost or unreadable
        return MEGATRON_TORCH_DIST, "torch_dist"
    return None


def _subdirs(p: Path) -> list[Path]:
    try:
        return [d for d in p.iterdir() if d.is_dir()]
    except OSError:
        return []
