"""Where each configuration value came from: argument, env, YAML file or default.

Provenance is computed separately from loading: each source is read again on its own and
flattened to dotted paths, then every leaf of the effective configuration is attributed to the
highest-priority source that sets it (the same order the loader merges them in). A variable
holding a whole section as JSON (``KVORTEX_TIERS='{...}'``) is credited with the leaves its
JSON sets, not with everything under the section; ``tiers.X.options.K`` counts as
``tiers.X.K``, as the loader merges it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from kvortex_core.config.settings import ENV_PREFIX, RESERVED_ENV, KVortexConfig

Path_ = tuple[str, ...]
SourceKind = Literal["argument", "env", "yaml", "default"]


@dataclass(frozen=True)
class Source:
    """One origin of a value: ``kind`` plus the env variable or file name when there is one."""

    kind: SourceKind
    detail: str = ""

    def __str__(self) -> str:
        labels = {"argument": "argument", "env": "env", "yaml": "YAML", "default": "default"}
        return f"{labels[self.kind]} {self.detail}".strip()


def flatten(data: Mapping[str, Any], prefix: Path_ = ()) -> dict[Path_, Any]:
    """``{"a": {"b": 1}}`` -> ``{("a", "b"): 1}``; an empty mapping is a leaf of its own."""
    out: dict[Path_, Any] = {}
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def flat_options_path(path: Path_) -> Path_:
    """``tiers.disk.options.path`` -> ``tiers.disk.path`` (the loader flattens ``options:``)."""
    if len(path) >= 4 and path[0] == "tiers" and path[2] == "options":
        return (*path[:2], *path[3:])
    return path


def env_paths(environ: Mapping[str, str] | None = None) -> dict[Path_, str]:
    """The lowercase path each ``KVORTEX_*`` configuration variable sets -> variable name.

    A JSON object in a section variable sets the leaves it names; where two variables set the
    same path, the more nested one wins (as when the environment is loaded).
    """
    from kvortex_core.config.sources import section_fields

    environ = os.environ if environ is None else environ
    sections = section_fields(KVortexConfig)
    found: list[tuple[Path_, str]] = []
    for name in environ:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in RESERVED_ENV:
            found.append((tuple(upper[len(ENV_PREFIX) :].lower().split("__")), name))
    out: dict[Path_, str] = {}
    for path, name in sorted(found, key=lambda item: len(item[0])):
        value = _json_object(environ[name]) if path[0] in sections else None
        paths = [(*path, *sub) for sub in flatten(value)] if value else [path]
        for p in paths:
            out[flat_options_path(tuple(part.lower() for part in p))] = name
    return out


def _json_object(raw: str) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class SourceMaps:
    """The paths each source sets (arguments, env, YAML) for attributing values."""

    arguments: frozenset[Path_]
    env: dict[Path_, str]
    yaml: frozenset[Path_]
    config_file: Path | None

    @classmethod
    def collect(
        cls, overrides: Mapping[str, Any] | None = None, config_file: Path | None = None
    ) -> SourceMaps:
        """Read every source again (the YAML file only when one is given)."""
        from kvortex_core.config.sources import read_yaml

        yaml_data = read_yaml(config_file) if config_file is not None else {}
        return cls(
            arguments=frozenset(map(flat_options_path, flatten(dict(overrides or {})))),
            env=env_paths(),
            yaml=frozenset(map(flat_options_path, flatten(yaml_data))),
            config_file=config_file,
        )

    def source_of(self, path: Path_) -> Source:
        """The highest-priority source that sets ``path``, a mapping above it, or a value below
        it (an unknown key given as a mapping: ``--set nope.x=1`` names ``nope``)."""
        if _setting(self.arguments, path) is not None:
            return Source("argument")
        env = _setting(self.env, tuple(part.lower() for part in path))
        if env is not None:
            return Source("env", self.env[env])
        if _setting(self.yaml, path) is not None:
            return Source("yaml", str(self.config_file))
        return Source("default")


def _setting(paths: Any, path: Path_) -> Path_ | None:
    """The entry of ``paths`` that sets ``path``: itself or a mapping above it, else a value below."""
    above = next((path[:i] for i in range(len(path), 0, -1) if path[:i] in paths), None)
    return above if above is not None else next((q for q in paths if tuple(q[:len(path)]) == path), None)


def leaves(value: Any, prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every leaf of a config model (fields, then extra keys), keeping typed values."""
    if isinstance(value, BaseModel):
        items: dict[str, Any] = {name: getattr(value, name) for name in type(value).model_fields}
        items.update(value.model_extra or {})
    elif isinstance(value, Mapping) and value:
        items = dict(value)
    else:
        yield prefix, value
        return
    for key, child in items.items():
        yield from leaves(child, (*prefix, str(key)))


def provenance(config: KVortexConfig) -> dict[str, tuple[Any, Source]]:
    """Dotted path -> (effective value, where it came from), for every leaf of ``config``.

    Uses the keyword arguments and YAML file the config was loaded with and the current
    environment (the one it was loaded under, unless the caller changed it since).
    """
    maps = SourceMaps.collect(config.arguments, config.source_file)
    return {".".join(path): (value, maps.source_of(path)) for path, value in leaves(config)}
