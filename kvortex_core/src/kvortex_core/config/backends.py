"""Validate each tier's backend type and options against the registered backends."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from kvortex_core.config.messages import where
from kvortex_core.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from kvortex_core.config.settings import KVortexConfig
    from kvortex_core.plugins.manager import PluginManager
    from kvortex_core.storage.protocol import BackendOptions


def validate_tier_options(
    config: KVortexConfig, config_file: Path | None, manager: PluginManager | None = None
) -> None:
    """Raise one ConfigError listing every unknown type, missing dependency or bad option."""
    from kvortex_core.plugins.manager import PluginManager

    manager = manager or PluginManager()
    problems: list[str] = []
    for tier, tc in config.tiers.items():
        loc = ("tiers", tier, "type")
        try:
            info = manager.backend(tc.type)
            info.check_dependencies()
        except PluginError as exc:
            problems.append(f"  tiers.{tier}.type = {tc.type!r}: {exc}\n    set it through {where(loc, config_file)}")
            continue
        try:
            info.cls.Options.model_validate(tc.options)
        except ValidationError as exc:
            valid = ", ".join(sorted(info.cls.Options.model_fields)) or "(none)"
            for err in exc.errors(include_url=False):
                oloc = ("tiers", tier, *err["loc"])
                shown = "(missing)" if err["type"] == "missing" else repr(err.get("input"))
                msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
                problems.append(
                    f"  {'.'.join(map(str, oloc))} = {shown}: {msg} (backend {tc.type!r})\n"
                    f"    set it through {where(oloc, config_file)}\n"
                    f"    valid options of {tc.type!r}: {valid}, plus type, capacity, write_through"
                )
    if problems:
        raise ConfigError("invalid KVortex configuration:\n" + "\n".join(problems))


def backend_options(config: KVortexConfig, tier: str, manager: PluginManager) -> BackendOptions:
    """The validated options object of one tier."""
    tc = config.tiers[tier]
    return manager.backend(tc.type).cls.Options.model_validate(tc.options)
