"""Splitting GPTModel into pipeline stages: layer ranges, stage placement, FQNs, tied copies, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.pipeline import (
    EMBEDDING_FQN,
    TIED_COPY_FQN,
    build_stage_modules,
    check_pp_divisibility,
    duplicate_params,
    has_tied_copy,
    stage_ids_for_rank,
    stage_layer_ranges,
)
from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.model import GPTModel

TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=8, num_attention_heads=4,
                   num_query_groups=2)
SEED = 3
LAYOUTS = [(2, 1, "gpipe"), (4, 1, "1f1b"), (2, 2, "interleaved_1f1b"), (2, 4, "interleaved_zb"),
           (2, 2, "zbv"), (4, 2, "zbv"), (1, 2, "interleaved_1f1b")]


def _all_stages(model: GPTModel, pp: int, virtual: int, schedule: str) -> dict[int, GPTModel]:
    stages = {}
    for rank in range(pp):
        for s, module in build_stage_modules(model, rank, pp, virtual, schedule):
            assert s not in stages, f"stage {s} placed twice"
            stages[s] = module
    assert sorted(stages) == list(range(pp * virtual))
    return stages


def test_layer_ranges_are_contiguous_and_even():
    assert stage_layer_ranges(8, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(6, 3, 1) == [range(0, 2), range(2, 4), range(4, 6)]


def test_loop_and_v_placement():
    assert stage_ids_for_rank(0, 2, 1, "1f1b") == [0]
    assert stage_ids_for_rank(1, 2, 2, "interleaved_1f1b") == [1, 3]
    assert stage_ids_for_rank(2, 4, 3, "interleaved_zb") == [2, 6, 10]
    assert stage_ids_for_rank(0, 2, 2, "zbv") == [0, 3]
    assert stage_ids_for_rank(1, 4, 2, "zbv") == [1, 6]
    assert stage_ids_for_rank(3, 4, 2, "zbv") == [3, 4]


@pytest.mark.parametrize("pp,virtual,schedule", LAYOUTS)
@pytest.mark.parametrize("tied", [False, True])
def test_stages_keep_fqns_and_parts(pp, virtual, schedule, tied):
    model = GPTModel(dataclasses.replace(TINY, tie_word_embeddings=tied), padded_vocab_size=80, seed=SEED)
    original = model.state_dict()
    stages = _all_stages(model, pp, virtual, schedule)
    last = pp * virtual - 1
    seen = {}
    for s, stage in stages.items():
        assert list(stage.decoder.layers) == [str(i) for i in stage_layer_ranges(8, pp, virtual)[s]]
        assert (stage.embedding is not None) == (s == 0)
        assert (stage.decoder.final_layernorm is not None) == (s == last)
        assert (stage.output_layer is not None) == (s == last and (not tied or s != 0))
        assert has_tied_copy(stage) == (tied and s == last and s != 0)
        for name, tensor in stage.state_dict().items():
            if name == TIED_COPY_FQN and tied:
                assert torch.equal(tensor, original[EMBEDDING_FQN])
                continue
            assert name not in seen, f"{name} on stages {seen.get(name)} and {s}"
            seen[name] = s
            assert torch.equal(tensor, original[name]), name
    assert set(seen) == set(original)
    assert len(model.decoder.layers) == 8 and model.embedding is not None  # the input model is untouched


def test_stages_chained_equal_the_whole_model():
    model = GPTModel(TINY, seed=SEED)
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    hidden = ids
    for _, stage in sorted(_all_stages(model, 2, 2, "zbv").items()):
        hidden = stage(hidden, position_ids=pos)
    torch.testing.assert_close(hidden, model(ids, position_ids=pos), rtol=0, atol=0)


def test_meta_split_then_init_gives_tied_copy_equal_to_embedding():
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    reference = GPTModel(cfg, padded_vocab_size=80, seed=SEED).state_dict()
    with torch.device("meta"):
        meta = GPTModel(cfg, padded_vocab_size=80, seed=SEED)
    for rank in range(2):
        for s, stage in build_stage_modules(meta, rank, 2, 1, "1f1b"):
            stage.to_empty(device="cpu")
            stage.init_weights(SEED)
            for name, tensor in stage.state_dict().items():
                want = reference[EMBEDDING_FQN if name == TIED_COPY_FQN else name]
                assert torch.equal(tensor, want), name
            if s == 1:
                assert duplicate_params([(s, stage)]) == {stage.output_layer.weight}


def test_no_duplicates_without_tying():
    stages = build_stage_modules(GPTModel(TINY, seed=SEED), 1, 2, 1, "gpipe")
    assert duplicate_params(stages) == set()


@pytest.mark.parametrize("args,fragments", [
    ((6, 2, 2, "interleaved_1f1b"), ["num_layers=6", "2 x 2 = 4"]),
    ((7, 2, 1, "1f1b"), ["num_layers=7", "2 x 1 = 2"]),
    ((8, 2, 2, "gpipe"), ["'gpipe'", "virtual_stages=2"]),
    ((8, 2, 2, "1f1b"), ["'1f1b'", "virtual_stages=2"]),
    ((8, 2, 1, "interleaved_1f1b"), ["'interleaved_1f1b'", "virtual_stages=1"]),
    ((8, 2, 4, "zbv"), ["'zbv'", "virtual_stages=4"]),
    ((8, 2, 1, "looped_bfs"), ["'looped_bfs'", "gpipe"]),
])
def test_divisibility_errors_name_the_values(args, fragments):
    with pytest.raises(ConfigError) as err:
        check_pp_divisibility(*args)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_stage_layer_ranges_refuses_uneven_split():
    with pytest.raises(ConfigError, match="num_layers=10"):
        stage_layer_ranges(10, 2, 2)


def test_microbatch_checks():
    check_pp_divisibility(8, 2, 2, "interleaved_1f1b", n_microbatches=4)
    with pytest.raises(ConfigError, match="n_microbatches=1 < pp=2"):
        check_pp_divisibility(8, 2, 1, "1f1b", n_microbatches=1)
    with pytest.raises(ConfigError, match="n_microbatches=5"):
        check_pp_divisibility(8, 2, 2, "interleaved_1f1b", n_microbatches=5)
