"""The test launcher never waits forever: a hung rank and a rank that dies are reported by rank."""

from __future__ import annotations

import os
import time

import pytest

from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.distributed


def _rank1_hangs(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(60)
    return rank


def _rank1_dies(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def _ok(rank: int, world_size: int) -> int:
    return rank


def test_results_come_back_in_rank_order():
    assert run_ranks(2, _ok) == [0, 1]


def test_a_hung_rank_times_out_naming_it():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 4 s waiting for rank\(s\) \[1\]"):
        run_ranks(2, _rank1_hangs, timeout=4)
    assert time.monotonic() - started < 30


def test_a_rank_that_dies_is_named_with_its_exit_code():
    with pytest.raises(AssertionError, match=r"rank\(s\) \[1\] exited \(codes \{1: 3\}\) without a result"):
        run_ranks(2, _rank1_dies, timeout=120)
