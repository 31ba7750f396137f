"""Turn pydantic validation errors into one message naming value, YAML path, env var and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kvortex_core.config.settings import ENV_PREFIX
from kvortex_core.errors import ConfigError

_SIZE_HINT = "a positive size such as '8GiB', '512MiB' or a byte count"


def yaml_path(loc: tuple[Any, ...]) -> str:
    """``('tiers', 'hot', 'capacity')`` -> ``tiers.hot.capacity``."""
    return ".".join(str(p) for p in loc)


def env_name(loc: tuple[Any, ...]) -> str:
    """``('tiers', 'hot', 'capacity')`` -> ``KVORTEX_TIERS__HOT__CAPACITY``."""
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc)


def where(loc: tuple[Any, ...], config_file: Path | None) -> str:
    """The two places a user can set this value."""
    file_part = f" in {config_file}" if config_file else ""
    return f"YAML key '{yaml_path(loc)}'{file_part}, env {env_name(loc)}"


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    from kvortex_core.config.settings import KVortexConfig, TierConfig

    model: type[BaseModel] | None = KVortexConfig
    parts = list(loc[:-1])
    while parts and model is not None:
        part = parts.pop(0)
        if model is KVortexConfig and part == "tiers":
            if not parts:
                return []
            parts.pop(0)
            model = TierConfig
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def _hint(err: dict[str, Any]) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        keys = _valid_keys(loc)
        return "unknown key; valid keys here: " + ", ".join(keys) if keys else "unknown key"
    if kind.startswith("byte_size") or (loc and loc[-1] in ("capacity", "staging_bytes")):
        return f"use {_SIZE_HINT}"
    return ""


def format_validation_error(exc: ValidationError, config_file: Path | None) -> str:
    """One message listing every bad value with where to fix it."""
    lines = ["invalid KVortex configuration:"]
    for err in exc.errors(include_url=False):
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ConfigError):
            lines.append(str(ctx_error).removeprefix(lines[0] + "\n"))
            continue
        loc = tuple(err["loc"])
        value = err.get("input")
        shown = "(missing)" if err["type"] == "missing" else repr(value)
        msg = err["msg"].removeprefix("Value error, ")
        hint = _hint(err)
        lines.append(f"  {yaml_path(loc) or '<root>'} = {shown}: {msg}")
        lines.append(f"    set it through {where(loc, config_file)}")
        if hint and hint not in msg:
            lines.append(f"    valid: {hint}")
    return "\n".join(lines)
