"""fp8 under every layout it composes with: `torchrun -m trainer` with trainer.precision=fp8 (torchao, emulated
on CPU) at fsdp2 (tensorwise: FSDP2 all-gathers the weights in fp8), tp2 with sequence parallelism, pp2 and
compile trains like one fp8 process of the same recipe, and every layout converts its layers (the run's own
count of fp8 layers, rank 0's share).

Bound: each step's loss within 1e-3 (relative) of the one-process fp8 run's. A layout's bf16 casts happen in
other places than one process's (FSDP's bf16 parameters against autocast over fp32 weights; split matmuls under
tp) and fp8's 3 mantissa bits turn some of those differences into a whole fp8 step of the element: measured on 2
CPU cores, at most 4.2e-4 (fsdp2, tensorwise) over these cases and 3 steps; the bound is the bf16 matrix's
(tests/distributed/test_mesh_matrix.py BF16_BOUNDS) and 2.4x the largest measured difference."""

from __future__ import annotations

import pytest

from tests.distributed.test_mesh_matrix import MODEL, RUN, _losses, _run, reference  # noqa: F401 (fixture)

pytest.importorskip("torchao")

LOSS_REL = 1e-3
FP8 = ["trainer.precision=fp8", "trainer.export_hf=false", "trainer.checkpoint.save_before_export=false"]
PP2 = ["parallel=fsdp", "parallel.dp_shard=1", "parallel.pp=2", "parallel.pp_schedule=1f1b"]
# (id, ranks, parallel overrides, recipe, fp8 layers on rank 0: 5 per decoder layer it holds)
CASES = [
    ("fsdp2_rowwise", 2, ["parallel=fsdp"], "rowwise", 20),
    ("fsdp2_tensorwise_fp8_allgather", 2, ["parallel=fsdp"], "tensorwise", 20),
    ("tp2_sp_rowwise", 2, ["parallel=tp2"], "rowwise", 20),
    ("tp2_sp_tensorwise", 2, ["parallel=tp2"], "tensorwise", 20),
    ("pp2_rowwise", 2, PP2, "rowwise", 10),
    ("fsdp2_compile_rowwise", 2, ["parallel=fsdp", "parallel.compile=true"], "rowwise", 20),
]


def _fp8_line(run) -> str:
    return next(line for line in (run / "console.log").read_text().splitlines() if line.startswith("fp8: "))


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,parallel,recipe,layers", CASES)
def test_fp8_layout_tracks_one_fp8_process(reference, name, nproc, parallel, recipe, layers):
    ref, tmp = reference([*FP8, f"trainer.fp8.recipe={recipe}"])
    run = _run(tmp, name, nproc, [*MODEL, *RUN, *FP8, f"trainer.fp8.recipe={recipe}", *parallel])
    losses, ref_losses = _losses(run), _losses(ref)
    assert len(losses) == len(ref_losses) == 3
    for step, (a, b) in enumerate(zip(losses, ref_losses), start=1):
        assert a == pytest.approx(b, rel=LOSS_REL), f"{name}: step {step} loss {a} vs one fp8 process {b}"
    assert f"fp8: {layers} linear layers in fp8 on rank 0 (trainer.fp8.recipe={recipe}" in _fp8_line(run)
