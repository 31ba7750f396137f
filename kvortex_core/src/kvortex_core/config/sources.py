"""Settings sources: the YAML file, a strict check of ``KVORTEX_*`` variables, and the
flattening of each tier's ``options:`` mapping (per source, before the sources merge).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from kvortex_core.errors import ConfigError

#: Keys of a tier itself: never backend options, so never under ``options:``.
TIER_KEYS = ("type", "capacity", "write_through")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"line {again}: the key {key!r} is given twice (first on line {first}); YAML "
                         "would keep only the last one and drop the other: merge them into one")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    YAML loaders keep the last value of a repeated key; in a config file that silently drops
    the first block (a second ``tiers:`` would replace the whole tier list).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base': keys given after it override
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if first is not None:
                raise _DuplicateKey(key, first.start_mark.line + 1, key_node.start_mark.line + 1)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: os.PathLike[str] | str, *, from_env: bool = False) -> dict[str, Any]:
    """Parse a KVortex YAML file into a mapping, or raise a ConfigError naming the problem.

    ``from_env``: the path came from ``KVORTEX_CONFIG_FILE`` (the fix then names it).
    """
    from kvortex_core.config.settings import CONFIG_FILE_ENV

    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - tiny file, read once
    except FileNotFoundError:
        fix = f"fix the path or unset {CONFIG_FILE_ENV}" if from_env else "fix the path"
        named = f" (named by {CONFIG_FILE_ENV})" if from_env else ""
        raise ConfigError(f"config file {str(path)!r}{named} does not exist; {fix}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
            f"at offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {str(path)!r}, {exc}") from None
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


def options_conflicts(tier: dict[str, Any]) -> list[str]:
    """Keys a tier gives both directly and under ``options:``."""
    nested = tier.get("options")
    return [k for k in nested if k in tier] if isinstance(nested, dict) else []


def without_options(tier: dict[str, Any]) -> dict[str, Any]:
    """``{path: a, options: {fsync: b}}`` -> ``{path: a, fsync: b}`` (no conflicts assumed)."""
    flat = {k: v for k, v in tier.items() if k != "options"}
    return {**flat, **tier["options"]}


def flat_tier_options(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """One source's values with each tier's ``options:`` spelt as flat keys.

    Done per source, before the sources merge, so that a higher source overrides a lower one
    whichever spelling each uses. A key given both ways within ``origin`` (one source) is an
    error naming both spellings; so is a tier key (``capacity``) under ``options:``.
    """
    from kvortex_core.config.messages import HEADLINE, env_name, shown_value, where
    from kvortex_core.config.settings import config_file_path, note_tier_order

    note_tier_order(data, ordered=origin != "env")  # environment variables carry no order
    tiers = data.get("tiers")
    if not isinstance(tiers, dict):
        return data
    problems: list[str] = []
    out: dict[Any, Any] = {}
    for name, tier in tiers.items():
        if not (isinstance(tier, dict) and isinstance(tier.get("options"), dict)):
            out[name] = tier
            continue
        for key in options_conflicts(tier):
            flat, nested = ("tiers", name, key), ("tiers", name, "options", key)
            problems.append(
                f"  tiers.{name}.{key} = {shown_value(flat, tier[key])} and "
                f"tiers.{name}.options.{key} = {shown_value(flat, tier['options'][key])} "
                f"(both from {origin}): the same option is given twice\n"
                f"    set it through {where(flat, config_file_path())}\n"
                f"    fix: give it once: drop 'tiers.{name}.options.{key}' "
                f"({env_name(nested)}) or 'tiers.{name}.{key}' ({env_name(flat)})"
            )
        for key in (k for k in tier["options"] if k in TIER_KEYS):
            loc = ("tiers", name, key)
            problems.append(
                f"  tiers.{name}.options.{key} (from {origin}): {key!r} is a key of the tier, "
                "not a backend option\n"
                f"    set it through {where(loc, config_file_path())}\n"
                f"    fix: move it out of 'options:' to 'tiers.{name}.{key}'"
            )
        out[name] = without_options(tier)
    if problems:
        raise ConfigError(HEADLINE + "\n" + "\n".join(problems))
    return {**data, "tiers": out}


class YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by ``load(config_file=...)`` or ``KVORTEX_CONFIG_FILE``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ returns the whole mapping at once

    def __call__(self) -> dict[str, Any]:
        from kvortex_core.config.settings import config_file_from_env, config_file_path

        path = config_file_path()
        if path is None:
            return {}
        return flat_tier_options(read_yaml(path, from_env=config_file_from_env()), f"YAML {path}")


class FlatTierOptions(PydanticBaseSettingsSource):
    """Another source (keyword arguments, environment) with tier options spelt flat."""

    def __init__(self, inner: PydanticBaseSettingsSource, origin: str) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner
        self.origin = origin
        self.__name__ = type(inner).__name__  # pydantic-settings keys its per-source data by it

    def _set_current_state(self, state: dict[str, Any]) -> None:
        super()._set_current_state(state)
        self.inner._set_current_state(state)

    def _set_settings_sources_data(self, states: dict[str, dict[str, Any]]) -> None:
        super()._set_settings_sources_data(states)
        self.inner._set_settings_sources_data(states)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        return flat_tier_options(self.inner(), self.origin)


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
            head, _, rest = upper[len(ENV_PREFIX) :].lower().partition("__")
            if head not in fields:
                valid = ", ".join(f"{ENV_PREFIX}{f.upper()}" for f in sorted(fields))
                raise ConfigError(
                    f"environment variable {name} names no KVortex setting ({head!r} is unknown); "
                    f"valid names: {valid}, plus {', '.join(sorted(RESERVED_ENV))}"
                )
            if not rest and head in section_fields(self.settings_cls):
                _check_json_section(name, head, os.environ[name], self.settings_cls)
        return {}


def section_fields(settings_cls: type[BaseSettings]) -> set[str]:
    """Top-level fields an env variable sets as a whole JSON object (tiers, eviction, ...)."""
    from pydantic import BaseModel

    out = set()
    for name, field in settings_cls.model_fields.items():
        ann = field.annotation
        if getattr(ann, "__origin__", None) is dict or (
            isinstance(ann, type) and issubclass(ann, BaseModel)
        ):
            out.add(name)
    return out


def _check_json_section(name: str, field: str, raw: str, settings_cls: type[BaseSettings]) -> None:
    """``KVORTEX_TIERS='not json'``: a ConfigError naming the variable and the two fixes."""
    from pydantic import BaseModel

    from kvortex_core.config.messages import redact_urls

    try:
        value = json.loads(raw)
    except ValueError as exc:
        problem = f"is not valid JSON ({exc})"
    else:
        if isinstance(value, dict):
            return
        problem = f"is JSON {type(value).__name__}, not an object"
    ann = settings_cls.model_fields[field].annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        key = next(iter(ann.model_fields))
        example = json.dumps({key: ann.model_fields[key].default})
        one = f"{name}__{key.upper()}=..."
    else:
        example = '{"cpu": {"type": "cpu", "capacity": "8GiB"}}'
        one = f"{name}__CPU__CAPACITY=8GiB"
    shown = redact_urls(raw if len(raw) <= 60 else raw[:57] + "...")
    raise ConfigError(
        f"environment variable {name}={shown!r} {problem}; it sets the whole '{field}' "
        f"section, so it must be a JSON object, e.g. {name}='{example}'; or set one value "
        f"at a time, e.g. {one}"
    )


def env_values(settings_cls: type[BaseSettings]) -> dict[str, Any]:
    """The nested mapping the environment contributes (used for provenance)."""
    from pydantic_settings import EnvSettingsSource

    return EnvSettingsSource(settings_cls)()
