"""Config composition, schema errors, cross-field validation and secret redaction (no process group)."""

import dataclasses

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from trainer.config import Config, validate_config
from trainer.config_io import redact_secrets, resolved_yaml
from trainer.errors import ConfigError

PRESETS = ["tiny", "tiny_moe", "llama3_8b", "llama3_2_1b", "mistral_7b", "qwen2_5_7b", "qwen2_5_0_5b", "qwen3_8b"]


def test_default_composes_to_tiny(compose):
    cfg = compose()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny" and cfg.data.name == "pretrain_text"
    assert cfg.trainer.max_steps == 200 and cfg.data.seq_len == 256
    validate_config(cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_model_presets_validate(compose, preset):
    cfg = compose(f"model={preset}", "data.seq_len=1024")
    assert cfg.model.name == preset
    validate_config(cfg)


def test_preset_features(compose):
    assert compose("model=llama3_2_1b").model.tie_word_embeddings
    assert compose("model=llama3_2_1b").model.rope_scaling.rope_type == "llama3"
    q = compose("model=qwen2_5_0_5b").model
    assert q.tie_word_embeddings and q.add_qkv_bias
    q3 = compose("model=qwen3_8b").model
    assert q3.qk_layernorm and q3.head_dim == 128
    assert compose("model=mistral_7b").model.sliding_window == 4096


def test_overrides_reach_typed_config(compose):
    cfg = compose("trainer.max_steps=7", "optim.lr=0.01", "logging.wandb=false", "model.num_layers=2")
    assert (cfg.trainer.max_steps, cfg.optim.lr, cfg.logging.wandb, cfg.model.num_layers) == (7, 0.01, False, 2)


@pytest.mark.parametrize("override,key", [
    ("model.bogus=1", "model.bogus"),
    ("+model.bogus=1", "bogus"),
    ("trainer.typo_steps=3", "trainer.typo_steps"),
])
def test_unknown_key_names_the_key(compose, override, key):
    # '+key=value' force-adds past the schema in Hydra; to_config refuses it instead of dropping it.
    with pytest.raises((ConfigCompositionException, ConfigError)) as err:
        compose(override)
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("model.num_layers=abc", "num_layers"),
    ("trainer.seed=1.5", "seed"),
    ("logging.wandb=maybe", "wandb"),
])
def test_wrong_type_names_the_key(compose, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("overrides,fragments", [
    (["model.num_attention_heads=6", "model.num_query_groups=4"], ["num_attention_heads=6", "num_query_groups=4"]),
    (["data.seq_len=4096", "model.max_position_embeddings=2048"], ["data.seq_len=4096", "max_position_embeddings=2048"]),
    (["model.hidden_size=130"], ["hidden_size=130", "num_attention_heads=4"]),
    (["trainer.global_batch_size=10", "parallel.microbatch_size=4"], ["global_batch_size=10", "microbatch_size=4"]),
    (["model.family=gpt2"], ["model.family='gpt2'", "llama"]),
    (["optim.decay=step"], ["optim.decay='step'", "cosine"]),
    (["optim.min_lr=1.0", "optim.lr=0.1"], ["min_lr=1.0", "lr=0.1"]),
    (["trainer.precision=fp16"], ["precision='fp16'", "bf16"]),
    (["data.format=csv"], ["data.format='csv'", "jsonl_text"]),
    (["model=llama3_2_1b", "model.rope_scaling.rope_type=yarn"], ["rope_type='yarn'", "llama3"]),
    (["parallel.tp=0"], ["parallel.tp=0"]),
    (["trainer.checkpoint.resume=sometimes"], ["trainer.checkpoint.resume='sometimes'", "never"]),
    (["trainer.checkpoint.every_steps=-1"], ["trainer.checkpoint.every_steps=-1"]),
    (["trainer.nonfinite=ignore"], ["trainer.nonfinite='ignore'", "skip"]),
])
def test_cross_field_errors_name_both_values(compose, overrides, fragments):
    cfg = compose(*overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_redaction_removes_secrets_everywhere():
    plain = {"logging": {"wandb_api_key": "abc123", "wandb_project": "p"},
             "x": [{"hf_token": "hf_zzz"}, {"password": None}], "tokenizer": "/path"}
    red = redact_secrets(plain)
    assert red["logging"] == {"wandb_api_key": "<redacted>", "wandb_project": "p"}
    assert red["x"][0]["hf_token"] == "<redacted>"
    assert red["tokenizer"] == "/path"  # a path, not a secret: 'tokenizer' is not a secret-looking key
    from trainer.config_io import is_secret_key

    # "token" is a secret as the name's last word only: settings about tokens are not.
    assert [is_secret_key(k) for k in ("token", "auth_token", "HF-TOKEN", "moe_token_drop_policy",
                                       "moe_token_dispatcher_type", "max_tokens")] == [True] * 3 + [False] * 3
    assert plain["logging"]["wandb_api_key"] == "abc123"  # the input is not modified


def test_resolved_yaml_has_no_secret(compose):
    cfg = compose("logging.wandb_api_key=supersecret-key-42")
    text = resolved_yaml(cfg)
    assert "supersecret-key-42" not in text
    loaded = yaml.safe_load(text)
    assert loaded["logging"]["wandb_api_key"] == "<redacted>"
    assert loaded["model"]["hidden_size"] == cfg.model.hidden_size


def test_validation_runs_per_group():
    cfg = Config()
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, beta2=1.0))
    with pytest.raises(ConfigError, match="optim.beta2=1.0"):
        validate_config(bad)


@pytest.mark.parametrize("overrides,keys", [
    (["trainer.max_steps=???"], "trainer.max_steps has no value"),
    (["model.hf_path=???", "data.tokenizer=???"], "data.tokenizer, model.hf_path have no value"),
    (["data.sources=[{weight: 2}]"], "data.sources[0].path has no value"),
])
def test_missing_values_are_errors_naming_the_keys(compose, overrides, keys):
    """A '???' left in the composed config used to become the schema's default (or None) without a word."""
    with pytest.raises(ConfigError) as err:
        compose(*overrides)
    assert keys in str(err.value) and "'???'" in str(err.value) and "\n" not in str(err.value)


def test_schema_errors_of_to_config_are_one_line(compose):
    with pytest.raises(ConfigError) as err:
        compose("+model.bogus=1")
    assert str(err.value).startswith("model.bogus is not a config key") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^model.hidden_size: Interpolation key 'oops' not found$"):
        compose("model.hidden_size=${oops}")


def test_checkpoint_defaults(compose):
    ck = compose().trainer.checkpoint
    assert (ck.every_steps, ck.keep_last, ck.async_save, ck.load_from, ck.resume) == (0, 2, False, None, "auto")
    t = compose("trainer.checkpoint.every_steps=100", "trainer.nonfinite=skip").trainer
    assert t.checkpoint.every_steps == 100 and t.nonfinite == "skip" and t.max_consecutive_skips == 5
