"""Turn pydantic validation errors into one message naming value, YAML path, env var and fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kvortex_core.config.settings import ENV_PREFIX
from kvortex_core.errors import ConfigError

HEADLINE = "invalid KVortex configuration:"
_SIZE_HINT = "a positive size such as '8GiB', '512MiB' or a byte count"
_SIZE_FIELDS = ("capacity", "staging_bytes")


#: Setting names whose values are never printed (backend credentials).
SECRET_NAME = re.compile(
    r"(^|_)(password|passwd|secret|token|credentials?|access_key|private_key)(_|$)", re.IGNORECASE
)
MASK = "********"
#: ``scheme://user:password@`` in any text: the password part is masked wherever shown.
URL_USERINFO = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]*):(?P<pw>[^@/\s'\"]+)@"
)


def redact_urls(text: str) -> str:
    """``redis://user:hunter2@h:6379`` -> ``redis://user:********@h:6379``, anywhere in ``text``."""
    return URL_USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)


def masked(name: str, value: Any) -> Any:
    """``value`` as it may be shown: credentials by ``name`` masked, URL passwords redacted.

    Recurses into mappings (their keys are names too) and lists; a model is left to its own
    ``repr`` (a tier named ``secret`` is not a credential); other values are unchanged.
    """
    if isinstance(value, Mapping):
        return {k: masked(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(masked(name, v) for v in value)
    if isinstance(value, BaseModel):
        return value
    if value not in (None, "") and name and SECRET_NAME.search(name):
        return MASK
    return redact_urls(value) if isinstance(value, str) else value


def shown_value(loc: tuple[Any, ...], value: Any, candidates: list[str] | None = None) -> str:
    """``repr(value)`` for messages, masked when the setting looks like a credential.

    With ``candidates`` (the valid names), a misspelt name is judged by the setting it is
    closest to: ``pasword`` is masked, ``chunk_token`` (for ``chunk_tokens``) is shown.
    """
    name = str(loc[-1]) if loc else ""
    near = closest(name, candidates) if candidates else None
    names = [near] if near else [name]
    if value not in (None, "") and any(n and SECRET_NAME.search(n) for n in names):
        return repr(MASK)
    return redact_urls(repr(masked("", value)))


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


def closest(word: str, candidates: list[str]) -> str | None:
    """The one candidate close to ``word`` (a likely typo), if any."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    # a known name with something added: 'redis-cluster', 'disk_v2' (difflib scores them < 0.6)
    low = word.lower()
    parts = set(re.split(r"[-_.]", low))
    within = [c for c in candidates if len(c) >= 3 and (low.startswith(c.lower()) or c.lower() in parts)]
    return within[0] if len(within) == 1 else None


def did_you_mean(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'policy'?)`` when one candidate is close, else empty."""
    match = closest(word, candidates)
    return f" (did you mean {match!r}?)" if match else ""


def valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at ``loc[:-1]`` accepts (empty when unknown, e.g. free-form dicts)."""
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


def _hint(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        keys = valid_keys(loc)
        if not keys:
            return "remove this key"
        return (
            f"remove or rename it{did_you_mean(str(loc[-1]), keys)}; valid keys here: "
            + ", ".join(keys)
        )
    if kind == "missing" and isinstance(err.get("input"), Mapping):
        given = [str(k) for k in err["input"]]
        return f"add '{loc[-1]}'" + did_you_mean(str(loc[-1]), given).replace(
            "did you mean", "misspelt as"
        )
    if kind.startswith("byte_size") or (loc and loc[-1] in _SIZE_FIELDS):
        return f"use {_SIZE_HINT}"
    if kind == "string_type" and isinstance(err.get("input"), int | float) and not isinstance(err["input"], bool):
        return f"quote it to give text: {loc[-1]}: \"{err['input']}\" (YAML reads {err['input']} as a number)"
    return ""


def _origin(
    loc: tuple[Any, ...], overrides: Mapping[str, Any] | None, config_file: Path | None
) -> str:
    """Which source supplied the bad value, best effort (never raises: we are already failing)."""
    from kvortex_core.config.provenance import SourceMaps

    try:
        source = SourceMaps.collect(overrides, config_file).source_of(tuple(str(p) for p in loc))
    except ConfigError:
        return ""
    return "" if source.kind == "default" else f" (from {source})"


def format_validation_error(
    exc: ValidationError, config_file: Path | None, overrides: Mapping[str, Any] | None = None
) -> str:
    """One message listing every bad value, where it came from, where to fix it, what is valid."""
    lines = [HEADLINE]
    for err in exc.errors(include_url=False):
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ConfigError):
            lines.append(str(ctx_error).removeprefix(HEADLINE + "\n"))
            continue
        loc = tuple(err["loc"])
        # an unknown key is judged by the setting it is closest to (a misspelt credential stays
        # masked, a typo of chunk_tokens is shown)
        valid = valid_keys(loc) if err["type"] == "extra_forbidden" else None
        shown = "(missing)" if err["type"] == "missing" else shown_value(loc, err.get("input"), valid)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(
            f"  {yaml_path(loc) or '<root>'} = {shown}{_origin(loc, overrides, config_file)}: {msg}"
        )
        lines.append(f"    set it through {where(loc, config_file)}")
        hint = _hint(err)
        if hint and hint not in msg:
            lines.append(f"    fix: {hint}")
    # A backend's own message may quote a URL it was given: no password leaves this function.
    return redact_urls("\n".join(lines))
