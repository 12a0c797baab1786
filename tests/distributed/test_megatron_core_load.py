"""megatron-core's own GPTModel (local spec, CPU, gloo) loads every converted shard with strict=True.

The model is built from the checkpoint's args the way Megatron-LM does, at the checkpoint's TP x PP, so this
checks names, shapes, the per-stage layer numbering, the tied last-stage output layer and the args together.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

from checkpoint_convert.megatron import hf_to_megatron
from checkpoint_convert.megatron_format import rank_dir
from tests.distributed.launcher import run_ranks
from tests.distributed.megatron_core_models import core_gpt_model
from tests.tiny_hf import VARIANTS, save_tiny_hf

with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")


def _load_all(rank: int, world: int, layouts: dict) -> list[str]:
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps

    # megatron-core moves the tied last-stage output weight to CUDA before all-reducing it with the
    # embedding (LanguageModule.setup_embeddings_and_output_layer); on CPU the tensor stays where it is.
    torch.Tensor.cuda = lambda self, *a, **k: self
    done = []
    for (tp, pp), dirs in layouts.items():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        path_of = rank_dir(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), pp)
        for name, meg in dirs.items():
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(Path(meg) / "release" / path_of / "model_optim_rng.pt", weights_only=True)
            model = core_gpt_model(ckpt["args"])
            assert model.state_dict().keys() == ckpt["model"].keys(), (name, tp, pp)  # _extra_state included
            model.load_state_dict(ckpt["model"], strict=True)
            for key, value in model.state_dict().items():
                if not key.endswith("._extra_state"):
                    assert torch.equal(value, ckpt["model"][key]), (name, key)
            done.append(f"{name} tp{tp}pp{pp} {path_of}")
        ps.destroy_model_parallel()
    return done


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_core_gpt_model_loads_converted_shards_strictly(tmp_path):
    layouts = {(2, 2): {}, (1, 1): {}}
    for name in VARIANTS:
        save_tiny_hf(name, tmp_path / name)
        for tp, pp in layouts:
            out = hf_to_megatron(tmp_path / name, tmp_path / f"{name}-tp{tp}pp{pp}", tp=tp, pp=pp, progress=False)
            layouts[tp, pp][name] = str(out)
    results = run_ranks(4, _load_all, layouts)
    # TP is the fastest-varying rank: ranks 0, 1 are stage 0 and ranks 2, 3 stage 1.
    assert [r[0].split()[-1] for r in results] == ["mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001",
                                                   "mp_rank_01_001"]
    assert all(len(r) == 2 * len(VARIANTS) for r in results)
