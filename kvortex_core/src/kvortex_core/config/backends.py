"""Validate each tier's backend type and options against the registered backends."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kvortex_core.config.messages import (
    HEADLINE,
    did_you_mean,
    redact_urls,
    shown_value,
    where,
)
from kvortex_core.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from kvortex_core.config.settings import KVortexConfig, TierConfig
    from kvortex_core.plugins.manager import PluginManager
    from kvortex_core.storage.protocol import BackendOptions

#: Keys every tier accepts besides its backend's options (see ``TierConfig``).
_COMMON_KEYS = ("type", "capacity", "write_through")
#: The type the first tier must have: saves land there, in pinned host memory (TierManager).
FIRST_TIER_TYPE = "cpu"


def first_tier_problem(tiers: Mapping[str, TierConfig], config_file: Path | None) -> str | None:
    """The message entry when the first (hottest) tier is not a cpu tier, else None."""
    if not tiers:
        return None
    name, tc = next(iter(tiers.items()))
    if tc.type == FIRST_TIER_TYPE:
        again = [n for n, t in list(tiers.items())[1:] if t.type == FIRST_TIER_TYPE]
        if not again:
            return None
        loc = ("tiers", again[0], "type")
        return (
            f"  tiers.{again[0]}.type = {FIRST_TIER_TYPE!r}: only the first tier ({name!r}) may be a "
            f"cpu tier (the pinned pool every save and load goes through)\n"
            f"    set it through {where(loc, config_file)}\n"
            f"    fix: raise tiers.{name}.capacity instead, or give {again[0]!r} another type "
            "(disk, redis, s3)"
        )
    loc = ("tiers", name, "type")
    if name == "cpu":  # the tier called cpu is of another type: keep the name for the cpu tier
        fix = (f"make it a cpu tier and move the {tc.type} settings to a tier below, e.g. tiers: "
               f"{{cpu: {{type: cpu, capacity: 8GiB}}, {tc.type}: {{type: {tc.type}, ...}}}}")
    else:
        fix = f"put a cpu tier first, e.g. tiers: {{cpu: {{type: cpu, capacity: 8GiB}}, {name}: ...}}"
    return (
        f"  tiers.{name}.type = {tc.type!r}: the first tier must have type "
        f"{FIRST_TIER_TYPE!r} (pinned host memory, where every save lands)\n"
        f"    set it through {where(loc, config_file)}\n"
        f"    fix: {fix}"
    )


def validate_tier_options(
    tiers: Mapping[str, TierConfig], config_file: Path | None, manager: PluginManager | None = None
) -> None:
    """Raise one ConfigError listing every unknown type, missing dependency or bad option.

    ``manager`` is the plugin manager whose backends count (default: a fresh one loading the
    installed ``kvortex`` entry points).
    """
    from kvortex_core.plugins.manager import PluginManager

    manager = manager or PluginManager()
    try:  # a broken plugin is the installation's problem, not one of the user's tiers
        manager.backends()
    except PluginError as exc:
        raise ConfigError(f"{HEADLINE}\n  installed plugins: {exc}") from None
    first = first_tier_problem(tiers, config_file)
    problems: list[str] = [first] if first else []
    for tier, tc in tiers.items():
        loc = ("tiers", tier, "type")
        try:
            info = manager.backend(tc.type)
            info.check_dependencies()
        except PluginError as exc:
            problems.append(
                f"  tiers.{tier}.type = {tc.type!r}: {exc}\n"
                f"    set it through {where(loc, config_file)}"
            )
            continue
        problems.extend(_option_problems(tier, tc.type, tc.options, info.cls.Options, config_file))
    if problems:
        # Backends' own messages may quote a URL they were given: never its password.
        raise ConfigError(redact_urls(HEADLINE + "\n" + "\n".join(problems)))


def _option_problems(
    tier: str,
    type_: str,
    options: dict[str, Any],
    model: type[BackendOptions],
    config_file: Path | None,
) -> list[str]:
    """One entry per bad option of one tier, checked by the backend's own Options model."""
    try:
        model.model_validate(options)
    except ValidationError as exc:
        valid = sorted(model.model_fields)
        problems = []
        for err in exc.errors(include_url=False):
            oloc = ("tiers", tier, *err["loc"])
            shown = (
                "(missing)"
                if err["type"] == "missing"
                else shown_value(oloc, err.get("input"), valid)
            )
            unknown = err["type"] == "extra_forbidden"
            msg = (
                f"unknown option{did_you_mean(str(oloc[-1]), [*valid, *_COMMON_KEYS])}"
                if unknown
                else err["msg"]
            )
            problems.append(
                f"  {'.'.join(map(str, oloc))} = {shown}: {msg} (backend {type_!r})\n"
                f"    set it through {where(oloc, config_file)}\n"
                f"    valid options of {type_!r}: {', '.join(valid) or '(none)'}, "
                "plus type, capacity, write_through"
            )
        return problems
    return []


def backend_options(config: KVortexConfig, tier: str, manager: PluginManager) -> BackendOptions:
    """The validated options object of one tier."""
    tc = config.tiers[tier]
    return manager.backend(tc.type).cls.Options.model_validate(tc.options)
