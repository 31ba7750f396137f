"""Settings sources: the YAML file and a strict check of ``KVORTEX_*`` environment names."""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from kvortex_core.errors import ConfigError


def read_yaml(path: os.PathLike[str] | str) -> dict[str, Any]:
    """Parse a KVortex YAML file into a mapping, or raise a ConfigError naming the problem."""
    from kvortex_core.config.settings import CONFIG_FILE_ENV

    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - tiny file, read once
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(path)!r} does not exist; fix the path or unset {CONFIG_FILE_ENV}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping at the top level "
            f"(e.g. 'chunk_tokens: 256'), not a {type(data).__name__}"
        )
    return data


class YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by ``load(config_file=...)`` or ``KVORTEX_CONFIG_FILE``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ returns the whole mapping at once

    def __call__(self) -> dict[str, Any]:
        from kvortex_core.config.settings import config_file_path

        path = config_file_path()
        return read_yaml(path) if path is not None else {}


class StrictEnvCheck(PydanticBaseSettingsSource):
    """Contributes nothing; rejects ``KVORTEX_*`` variables that name no setting (typos)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        from kvortex_core.config.settings import ENV_PREFIX, RESERVED_ENV

        fields = set(self.settings_cls.model_fields)
        for name in os.environ:
            upper = name.upper()
            if not upper.startswith(ENV_PREFIX) or upper in RESERVED_ENV:
                continue
            head = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
            if head not in fields:
                valid = ", ".join(f"{ENV_PREFIX}{f.upper()}" for f in sorted(fields))
                raise ConfigError(
                    f"environment variable {name} names no KVortex setting ({head!r} is unknown); "
                    f"valid names: {valid}, plus {', '.join(sorted(RESERVED_ENV))}"
                )
        return {}


def env_values(settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The nested mapping the environment contributes (used for provenance)."""
    from pydantic_settings import EnvSettingsSource

    return EnvSettingsSource(settings_cls)()
