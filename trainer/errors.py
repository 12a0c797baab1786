"""The errors a configuration or an input file raises before anything runs (exit 2, one line), and the two
checks every schema uses. Imports nothing of meshtron's: every config module (trainer/config.py, moe_config.py,
the groups to come) and every reader imports it without a cycle."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the values involved and what was expected."""


class DamagedFileError(ConfigError):
    """An input file that is not what its name says (truncated, corrupt, a Git LFS pointer): one message naming
    the file, what is wrong and what to do. Every format's reader raises it, so every entry point treats it
    like any other unusable input (exit 2, one line)."""

    def __init__(self, path: Any, problem: str, remedy: str):
        super().__init__(f"{path}: {problem}; {remedy}")
        self.path = str(path)


def require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def one_of(name: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, f"{name}={value!r} is not supported; expected one of {list(allowed)}")
