"""parallel.compile: what apply_compile does to a model without running it (no compilation happens until
the first forward). The training parity of compiled runs is in tests/integration/test_compile_training.py."""

from __future__ import annotations

import pytest
import torch

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile, is_compiled
from trainer.config import ModelConfig
from trainer.model import GPTModel

TINY = ModelConfig(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=3, num_attention_heads=4,
                   num_query_groups=2)


def _model(ac: str = "none", tied: bool = False) -> GPTModel:
    from dataclasses import replace

    model = GPTModel(replace(TINY, tie_word_embeddings=tied), seed=3)
    apply_activation_checkpointing(model, ac)
    return model


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
@pytest.mark.parametrize("tied", [False, True])
def test_compile_keeps_every_parameter_name(ac, tied):
    plain, compiled = _model(ac, tied), _model(ac, tied)
    apply_compile(compiled)
    # In place: no `_orig_mod.` level in state_dict keys or parameter names, so checkpoints and converters
    # see the same FQNs with and without parallel.compile.
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert not any("_orig_mod" in n for n in compiled.state_dict())
    for a, b in zip(plain.state_dict().values(), compiled.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ac", ["none", "full"])
def test_every_block_is_compiled_and_the_loss_chunk_swapped(ac):
    model = _model(ac)
    eager_chunk = model.loss_chunk_fn
    apply_compile(model)
    blocks = list(model.decoder.layers.values())
    assert len(blocks) == TINY.num_layers and all(is_compiled(b) for b in blocks)
    if ac != "none":  # the checkpoint wrapper is the compiled module, so recompute is inside the graph
        assert all(type(b).__name__ == "CheckpointWrapper" for b in blocks)
    assert model.loss_chunk_fn is not eager_chunk
    assert model.selection_multiple is None  # label selections padded to whole chunks: one compiled shape
    assert not is_compiled(model)  # the root (embedding, final norm, loss loop) stays eager


def test_a_stage_without_the_loss_keeps_its_chunk_function():
    """A pipeline stage before the last has no final norm and never computes the loss."""
    model = _model()
    model.decoder.final_layernorm = None
    eager_chunk = model.loss_chunk_fn
    apply_compile(model)
    assert model.loss_chunk_fn is eager_chunk
    assert all(is_compiled(b) for b in model.decoder.layers.values())


def test_tensor_parallel_compile_on_cpu_is_refused_before_anything_starts(compose):
    from parallel.dims import ParallelDims, validate_layout
    from trainer.errors import ConfigError

    cfg = compose("parallel=tp2", "parallel.compile=true", "trainer.device=cpu")
    with pytest.raises(ConfigError, match=r"parallel.compile=true with parallel.tp=2 cannot train on CPU"):
        validate_layout(cfg, ParallelDims.from_config(cfg.parallel, 2))
    # CUDA runs (the 70B preset: tp 8 + compile) and CPU runs without tp are not refused.
    validate_layout(compose("parallel=tp2", "parallel.compile=true", "trainer.device=cuda"),
                    ParallelDims.from_config(cfg.parallel, 2))
    fsdp = compose("parallel=fsdp", "parallel.compile=true", "trainer.device=cpu")
    validate_layout(fsdp, ParallelDims.from_config(fsdp.parallel, 2))
