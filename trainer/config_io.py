"""The configuration's plumbing: the schemas (trainer/config.py) registered in Hydra's ConfigStore, a composed
DictConfig turned into the typed Config (OmegaConf errors as one line), and the resolved config written with
secrets redacted (config.yaml in the output directory and in every checkpoint)."""

from __future__ import annotations

import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from trainer.config import (Config, DataConfig, LauncherConfig, ModelConfig, OptimConfig, ParallelConfig,
                            TrainerConfig)
from trainer.errors import ConfigError


def _asset_path(rel: str):
    from trainer.assets import asset_path

    return asset_path(*rel.split("/"))


# The arguments of @hydra.main for every entry point that composes conf/ (python -m trainer, trainer.launch).
HYDRA_MAIN = dict(config_path="pkg://conf", config_name="config", version_base="1.3")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="launcher", name="base_launcher", node=LauncherConfig)


register_configs()
# ${meshtron_asset:sft_chat/train.jsonl} in YAML: a file bundled with meshtron, wherever it is installed.
OmegaConf.register_new_resolver("meshtron_asset", lambda rel: str(_asset_path(rel)), replace=True)


# ------------------------------------------------------------------------------------------ converting


def to_config(cfg: DictConfig | Config) -> Config:
    """The typed object behind a composed DictConfig, interpolations resolved.

    Re-merging into a fresh schema catches keys that Hydra's ``+key=value`` force-adds past the schema,
    which would otherwise be dropped without a word.
    """
    if isinstance(cfg, Config):
        return cfg
    try:
        # A '???' left in the composed config would be merged over by the schema's default without a word.
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no value ('???' in "
                              f"the config); give {'it' if len(missing) == 1 else 'each'} on the command line, e.g. "
                              f"{missing[0]}=..., or in a YAML file")
        plain = OmegaConf.to_container(cfg, resolve=False)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), plain))
    except OmegaConfBaseException as err:
        raise ConfigError(omegaconf_error_line(err)) from err


def omegaconf_error_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's error in one line: the key and the first line of its message (the lines after it repeat the
    key and name the schema's classes)."""
    lines = str(getattr(err, "msg", None) or err).strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    key = getattr(err, "full_key", None)
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and key:
        return f"{key} is not a config key ({first}); `python -m trainer --cfg job` prints every key"
    return f"{key}: {first}" if key and key not in first else first


# ------------------------------------------------------------------------------------------- secrets

_SECRET_WORDS = {"secret", "password", "passwd", "credential", "credentials", "apikey"}


def is_secret_key(key: str) -> bool:
    """api keys, tokens, passwords... judged by whole words, so 'tokenizer' or 'max_tokens' are kept; 'token'
    only as the last word (hf_token, auth_token), so settings about tokens (moe_token_drop_policy) are kept."""
    k = str(key).lower()
    words = re.split(r"[_\-.]", k)
    return "api_key" in k or "access_key" in k or bool(_SECRET_WORDS & set(words)) or words[-1] == "token"


def redact_secrets(node: Any) -> Any:
    """A copy of a plain container with every secret-looking key's value replaced by '<redacted>'."""
    if isinstance(node, dict):
        return {k: ("<redacted>" if is_secret_key(k) and v is not None else redact_secrets(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [redact_secrets(v) for v in node]
    return node


def resolved_yaml(cfg: Config) -> str:
    """The run's resolved config as YAML with secrets removed: what goes into the output directory."""
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return OmegaConf.to_yaml(OmegaConf.create(redact_secrets(plain)))
