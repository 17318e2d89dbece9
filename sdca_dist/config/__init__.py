"""Configuration: typed schema (``schema``), Hydra composition (``compose``) and the frozen run
configuration (``run_config``). The stage names live in ``sdca_dist.stage_table``."""

from sdca_dist.config.compose import ConfigError, compose_config, config_to_yaml
from sdca_dist.config.schema import Config

__all__ = ["Config", "ConfigError", "compose_config", "config_to_yaml"]
