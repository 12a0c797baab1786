"""Parallel layout validation: every refusal names its values and happens before any process group."""

import pytest
import torch.distributed as dist

from parallel.dims import MESH_AXES, ParallelDims, validate_layout
from trainer.model.shapes import padded_vocab_size
from trainer.config import ParallelConfig
from trainer.errors import ConfigError
from trainer.loop import prepare


def test_dp_shard_inferred_from_world_size():
    dims = ParallelDims.from_config(ParallelConfig(tp=2, pp=2, dp_shard=-1), world_size=16)
    assert (dims.dp_shard, dims.dp, dims.tp, dims.pp) == (4, 4, 2, 2)
    assert dims.fsdp_enabled and dims.tp_enabled and dims.pp_enabled and not dims.cp_enabled
    assert list(dims.degrees()) == list(MESH_AXES) == ["pp", "dp_replicate", "dp_shard", "cp", "tp"]


def test_cp_alone_shards_parameters_over_cp():
    assert ParallelDims.from_config(ParallelConfig(cp=2, dp_shard=1), world_size=2).fsdp_enabled


def test_padded_vocab_like_megatron():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32001, 128, 1) == 32128
    assert padded_vocab_size(151936, 128, 8) == 152576
    assert padded_vocab_size(2048, 128, 4) == 2048


# (parallel overrides, world size, other overrides, fragments every message must contain)
ERRORS = [
    (["parallel.tp=2", "parallel.dp_shard=2"], 8, [], ["multiply to 4", "world size is 8", "tp=2"]),
    (["parallel.tp=3", "parallel.dp_shard=-1"], 8, [], ["world size 8", "tp*pp*cp", "= 3"]),
    (["parallel.tp=4", "parallel.dp_shard=1"], 4, [], ["model.num_query_groups=2", "parallel.tp=4"]),
    (["parallel.tp=4", "parallel.dp_shard=1"], 4, ["model.num_attention_heads=6", "model.num_query_groups=2",
                                                   "model.hidden_size=96"], ["num_attention_heads=6", "tp=4"]),
    (["parallel.pp=3", "parallel.dp_shard=1", "parallel.microbatch_size=1"], 3, [],
     ["model.num_layers=4", "3"]),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2", "parallel.pp_schedule=1f1b", "parallel.dp_shard=1"], 2, [],
     ["1f1b", "virtual_stages=2"]),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2", "parallel.pp_schedule=interleaved_1f1b",
      "parallel.dp_shard=1", "model.num_layers=6"], 2, [], ["model.num_layers=6", "4"]),
    (["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"], 4, ["data.seq_len=100"],
     ["data.seq_len=100", "8", "cp=2", "tp=2"]),
    (["parallel.dp_shard=4", "parallel.microbatch_size=3"], 4, ["trainer.global_batch_size=18"],
     ["global_batch_size=18", "dp_shard=4", "microbatch_size=3", "12"]),
    (["parallel.pp=2", "parallel.dp_shard=1", "parallel.microbatch_size=8"], 2, ["trainer.global_batch_size=8"],
     ["1f1b", "n_microbatches=1", "pp=2"]),
    (["parallel=4d_16ranks"], 8, [], ["multiply to 16", "world size is 8", "cp=2"]),
    (["parallel=4d_16ranks"], 16, ["data.seq_len=36"], ["data.seq_len=36", "8", "cp=2", "tp=2"]),
    (["parallel=4d_16ranks"], 16, ["trainer.global_batch_size=6"],
     ["global_batch_size=6", "dp_shard=2", "microbatch_size=2", "4"]),
    (["parallel.pp_schedule=chimera"], 1, [], ["pp_schedule='chimera'", "zbv"]),
    (["parallel.activation_checkpoint=some"], 1, [], ["activation_checkpoint='some'", "selective"]),
]


@pytest.mark.parametrize("parallel,world,other,fragments", ERRORS)
def test_layout_errors_name_values_before_any_process_group(compose, parallel, world, other, fragments):
    cfg = compose(*parallel, *other)
    with pytest.raises(ConfigError) as err:
        prepare(cfg, world)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert not dist.is_initialized()


def test_train_refuses_before_starting_the_process_group(compose, monkeypatch):
    """Under a launcher's environment (8 ranks), a bad layout fails in train() before init_process_group,
    which would otherwise block waiting for the other 7 ranks."""
    from trainer.loop import train

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="multiply to 4"):
        train(compose("parallel.tp=2", "parallel.dp_shard=2", "logging.wandb=false"))
    assert not dist.is_initialized()


def test_valid_layouts_pass(compose):
    for overrides, world in ([["parallel=tp2_pp2"], 4], [["parallel=pp2_fsdp2_tp2"], 8], [["parallel=tp2_cp2"], 8],
                             [["parallel=pp2_interleaved"], 2], [["parallel=hsdp"], 4], [["parallel=fsdp"], 4],
                             [["parallel=4d_16ranks"], 16]):
        cfg, dims = prepare(compose(*overrides), world)
        validate_layout(cfg, dims)


@pytest.mark.parametrize("preset,world,degrees", [
    ("4d_16ranks", 16, {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 2}),
    ("pp2_fsdp2_tp2", 8, {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}),
])
def test_mesh_presets_are_what_their_names_say(compose, preset, world, degrees):
    """4d_16ranks uses all four axes (data, pipeline, context, tensor); the 8-rank preset three."""
    cfg, dims = prepare(compose(f"parallel={preset}"), world)
    validate_layout(cfg, dims)
    assert dims.degrees() == degrees
    assert dims.fsdp_enabled and dims.pp_enabled and dims.tp_enabled and dims.cp_enabled == (degrees["cp"] > 1)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_default_preset_fills_the_world_with_data_parallelism(compose, world):
    """`torchrun --nproc_per_node N -m trainer` with no parallel= override runs FSDP over N ranks."""
    _, dims = prepare(compose(), world)
    assert (dims.dp_shard, dims.tp, dims.pp, dims.cp, dims.dp_replicate) == (world, 1, 1, 1, 1)
    assert dims.is_single == (world == 1) and dims.fsdp_enabled == (world > 1)
