"""Configuration: typed schema (``schema``) and Hydra composition (``compose``)."""

from sdca_dist.config.compose import ConfigError, compose_config, config_to_yaml
from sdca_dist.config.schema import CHAIN, STAGES, TRAINING_STAGES, Config

__all__ = ["CHAIN", "STAGES", "TRAINING_STAGES", "Config", "ConfigError", "compose_config", "config_to_yaml"]
