"""What the Hydra entry points (``python -m trainer``, ``trainer.launch``, ``trainer.verify``) do with a
configuration error, Hydra's own included: one line on stderr, printed once however many ranks found it, the
same line in torchrun's per-rank error file (so torchrun's failure summary shows it instead of "To enable
traceback see ..."), and exit code 2 on every rank. This module imports nothing heavy until an error happens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Callable, NoReturn, Optional, Sequence

EXIT_CONFIG = 2
GRAMMAR_URL = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"
# The c10d store key the ranks race for, so that the first rank to find an error prints it.
_CLAIM_KEY = "meshtron/config_error_reported"
# rank_info()'s inputs: without any of them this is a single process and torch need not be imported.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID")


def one_line(text: str) -> str:
    """Messages from libraries can span lines; a log grep and torchrun's summary want one."""
    return " ".join(str(text).split())


def exit_config_error(err: BaseException | str, prog: str = "meshtron", what: str = "configuration error") -> NoReturn:
    """Report a configuration error and exit 2: the same on every rank, printed by one of them."""
    line = one_line(f"{prog}: {what}: {err}")
    _write_elastic_error_file(line)
    if _reports_here():
        print(line, file=sys.stderr, flush=True)
    _ignore_sigterm()
    sys.exit(EXIT_CONFIG)


def _ignore_sigterm() -> None:
    """torchrun (and srun) SIGTERM the other ranks as soon as one exits. Python restores SIGTERM's default
    action while it shuts down, so a rank still shutting down would die of it (exit -15) instead of leaving
    with 2; an ignored signal stays ignored through the shutdown. The error is reported: nothing is lost."""
    import signal
    import threading

    # Only under a launcher: a single process (or a test calling an entry point in-process) keeps its SIGTERM.
    if any(name in os.environ for name in _LAUNCHER_VARS) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_hydra(main: Callable[[], None], prog: str = "meshtron") -> None:
    """Call a ``@hydra.main`` function. Hydra reports its own composition errors (override syntax, unknown key,
    wrong type, no such config file) in several lines and exits 1; with HYDRA_FULL_ERROR set it raises them
    instead, and they become one line naming the override and exit 2. A user who set HYDRA_FULL_ERROR
    themselves gets Hydra's full traceback, as Hydra documents."""
    from hydra.errors import HydraException

    ours = "HYDRA_FULL_ERROR" not in os.environ
    if ours:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except HydraException as err:
        if not ours:
            raise
        exit_config_error(hydra_error_line(err, _cli_overrides()), prog)
    finally:
        if ours:
            os.environ.pop("HYDRA_FULL_ERROR", None)


# ------------------------------------------------------------------------------------- Hydra's errors


def hydra_error_line(err: BaseException, overrides: Sequence[str]) -> str:
    """One line for a Hydra composition error that names the override at fault and what is wrong with it."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config_io import omegaconf_error_line

    if isinstance(err, OverrideParseException):
        lines = [ln for ln in str(err.message).splitlines()
                 if ln.strip() and not ln.startswith(("Error parsing override", "See https://"))]
        why = lines[0].strip() if lines else "not key=value"
        return f"cannot parse the override {err.override!r}: {why} (the syntax: {GRAMMAR_URL})"
    if isinstance(err, MissingConfigException):
        return _missing_option_line(err, overrides)
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        culprit = _override_for_key(key, overrides)
        detail = omegaconf_error_line(cause)
        return f"override {culprit!r}: {detail}" if culprit else f"{_first_line(err)}: {detail}"
    return _first_line(err)


def _missing_option_line(err, overrides: Sequence[str]) -> str:
    """'model=nosuch' -> which group, which name, and the names there are."""
    wanted = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, name = wanted.rpartition("/")
    options = [o for o in (getattr(err, "options", None) or []) if not o.startswith("base_")]
    culprit = _override_for_key(group, overrides) if group else None
    head = f"override {culprit!r}: " if culprit else ""
    if group and options:
        return f"{head}there is no {group} config {name!r}; choose one of {', '.join(options)}"
    return head + _first_line(err)


def _override_for_key(key: str, overrides: Sequence[str]) -> Optional[str]:
    """The command-line override that sets ``key`` (or chooses group ``key``), if there is one."""
    if not key:
        return None
    for text in reversed(overrides):  # the last one wins in Hydra too
        target = text.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if target == key:
            return text
    return None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _cli_overrides() -> list[str]:
    return [a for a in sys.argv[1:] if not a.startswith("-")]


# --------------------------------------------------------------------------------- once, every rank


def _reports_here() -> bool:
    """Whether this process prints the error. Before the process group exists every rank has composed the
    same config and found the same error: global rank 0 prints it. Once the group is up an error may be one
    rank's own (a file only it reads): the first rank to claim a key in the group's store prints it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return _first_to_claim(dist)
    if not any(name in os.environ for name in _LAUNCHER_VARS):
        return True
    from trainer.distributed import rank_info

    return rank_info().is_main


def _first_to_claim(dist) -> bool:
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))  # a store whose host is gone must not hold up the exit
        return store.add(_CLAIM_KEY, 1) == 1
    except Exception:  # no store, or its host (rank 0 under srun) already gone: better twice than never
        return True


def _write_elastic_error_file(line: str) -> None:
    """torchrun gives each worker TORCHELASTIC_ERROR_FILE; its summary shows the file's py_callstack as the
    rank's 'traceback'. The layout is the one torch's own ErrorHandler.record_exception writes."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then says "To enable traceback see ..."; stderr still has the line
