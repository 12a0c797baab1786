"""return_freed_memory: glibc's mmap threshold fixed, so freed step temporaries leave RSS."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from trainer.host_memory import return_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_set_on_glibc_unless_the_user_chose_a_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert return_freed_memory() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False
