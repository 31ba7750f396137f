"""The root settings model and its sub-models.

Sources, highest first: keyword arguments > environment (``KVORTEX_`` prefix, ``__`` nesting)
> a YAML file (``KVORTEX_CONFIG_FILE`` or ``KVortexConfig.load(config_file=...)``) > defaults.
Every validation failure is turned into one :class:`~kvortex_core.errors.ConfigError` at the
boundary (see :mod:`kvortex_core.config.messages`).
"""

from __future__ import annotations

import contextvars
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from kvortex_core.errors import ConfigError

if TYPE_CHECKING:
    from kvortex_core.plugins.manager import PluginManager

ENV_PREFIX = "KVORTEX_"
CONFIG_FILE_ENV = "KVORTEX_CONFIG_FILE"
#: Environment variables with our prefix that are switches, not configuration fields: the
#: plugin switches, and the ones ``scripts/setup`` reads (README), which stay set in the shell
#: that then runs the demo, the tests or vLLM.
RESERVED_ENV = frozenset(
    {CONFIG_FILE_ENV, "KVORTEX_DISABLE_PLUGIN_AUTOLOAD", "KVORTEX_TRACE_PLUGINS",
     "KVORTEX_PYTHON", "KVORTEX_TORCH_SPEC", "KVORTEX_VENV", "KVORTEX_VLLM_EXTRA"}
)

_config_file: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kvortex_config_file", default=None
)
# The plugin manager whose backends tier types are checked against while loading (None = a
# fresh autoloading one). A context variable, not a global: two engines may load at once.
_plugins: contextvars.ContextVar[PluginManager | None] = contextvars.ContextVar(
    "kvortex_config_plugins", default=None
)

# The tier names each settings source lists, highest priority first, recorded while one
# instance loads: merging the sources alone would order tiers by the lowest source naming them.
_tier_orders: contextvars.ContextVar[list[tuple[list[str], bool]] | None] = contextvars.ContextVar(
    "kvortex_tier_orders", default=None
)

HashAlgorithm = Literal["sha256", "blake3", "xxh3_128"]
EvictionPolicy = Literal["lru", "prefix-lru", "s3fifo"]


#: A number without a unit (``"4096"``, ``"1e9"``): a byte count.
_UNITLESS = re.compile(r"[+-]?(\d[\d_]*(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
#: A number and one unit (``"8GiB"``, ``"1.5 MB"``); ``ByteSize`` checks the unit's name.
_WITH_UNIT = re.compile(r"(\d[\d_]*(\.\d*)?|\.\d+)\s*[A-Za-z]+")


def check_size(value: Any, example: str = "8GiB") -> Any:
    """Before ``ByteSize``: a number without a unit is a whole byte count, never a bool.

    ``ByteSize`` alone reads ``True`` as 1 byte and truncates ``"1.5"`` to 1 byte (while it
    rejects ``1.5``); here both spellings of a number behave the same, and a fractional byte
    count or a negative size is an error that says so. ``ByteSize`` also reads the leading size
    of any text (``"8GiB garbage"`` as 8 GiB, ``"64MB/s"`` as 64 MB): anything after the unit
    is an error here.
    """
    if isinstance(value, bool):
        # ValueError, not TypeError: pydantic turns only ValueError into a validation error.
        raise ValueError(f"{value} is not a size; use a size such as {example!r}")  # noqa: TRY004
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"a size cannot be negative; use a positive size such as {example!r}")
        if not _UNITLESS.fullmatch(text):
            if not _WITH_UNIT.fullmatch(text):
                raise ValueError(f"{value!r} is not a size: give a number and one unit, such as {example!r}")
            return value  # has a unit: ByteSize parses it
        value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a size must be finite; use a size such as {example!r}")
        if not value.is_integer():
            raise ValueError(
                f"a number without a unit is a byte count, and {value:g} is not a whole number "
                f"of bytes; add a unit, e.g. '{value:g}GiB' or '{value:g}MiB'"
            )
        value = int(value)
    if isinstance(value, int) and value < 0:
        raise ValueError(f"a size cannot be negative; use a positive size such as {example!r}")
    return value


_NUMBERS = (int, float, int | None, float | None)


def _no_bool(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A bool where a number belongs is a mistake (``chunk_tokens: true``); pydantic's lax mode
    would read it as 1."""
    field = model.model_fields.get(info.field_name or "")
    if isinstance(value, bool) and field is not None and field.annotation in _NUMBERS:
        raise ValueError(f"{value!r} is a boolean, not a number; give a number")
    return value


class _Section(BaseModel):
    # allow_inf_nan=False: a timeout or ratio of inf/nan is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        return _no_bool(cls, value, info)


class EvictionConfig(_Section):
    """When and how a tier makes room."""

    policy: EvictionPolicy = Field("prefix-lru", description="which chunks go first")
    high_watermark: float = Field(
        0.8, gt=0.0, le=1.0, description="usage fraction that starts eviction"
    )
    evict_ratio: float = Field(
        0.2, gt=0.0, le=1.0, description="capacity fraction freed per eviction"
    )


class TransferConfig(_Section):
    """GPU <-> pinned host transfer engine settings."""

    num_streams: int = Field(2, ge=1, le=16, description="CUDA streams per direction")
    staging_bytes: ByteSize = Field(
        ByteSize(64 * 1024**2),
        description="GPU staging buffer size (measured: 64MiB beats 32 and 128 on H100)",
    )
    layerwise: bool = Field(True, description="load layer by layer so compute overlaps the copy")
    gather: Literal["auto", "strided", "rows", "layers"] = Field(
        "auto", description="how blocks are gathered on the GPU: auto picks per layout (docs/engine.md)"
    )

    @field_validator("staging_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return check_size(v, "64MiB")

    @field_validator("staging_bytes")
    @classmethod
    def _positive(cls, v: ByteSize) -> ByteSize:
        if v <= 0:
            raise ValueError("must be a positive size such as '32MiB'")
        return v


class TimeoutConfig(_Section):
    """Seconds each kind of operation may take before it is abandoned."""

    backend_op_s: float = Field(5.0, gt=0, description="one backend call (put, get, contains)")
    remote_lookup_s: float = Field(
        0.05, gt=0, description="how long the vLLM scheduler lets a request wait (asking again) "
        "for a shared tier's answer about its next chunk"
    )
    transfer_s: float = Field(30.0, gt=0, description="one GPU <-> host transfer")
    close_s: float = Field(10.0, gt=0, description="draining write-behind queues at close")
    open_s: float = Field(
        10.0, gt=0, description="how long engine start waits for a lower tier to open; one still "
        "opening then (a store not answering, a large disk directory being scanned) goes on in "
        "the background, out of service until it opened")


class CircuitBreakerConfig(_Section):
    """A tier that fails repeatedly is taken out of service, then probed again."""

    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    reset_after_s: float = Field(30.0, gt=0, description="seconds before a probe tries again")


class MetricsConfig(_Section):
    """Prometheus metrics."""

    enabled: bool = Field(False, description="export Prometheus metrics")
    host: str = Field("127.0.0.1", description="address the metrics HTTP server binds")
    port: int | None = Field(None, ge=0, le=65535, description="HTTP port; none = no own server")


class TierConfig(BaseModel):
    """One storage tier. ``type`` and ``capacity`` are common; other keys are backend options.

    Backend options are validated by the backend's own ``Options`` model once the backend
    registry is known (see :func:`kvortex_core.config.backends.validate_tier_options`).
    """

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1, description="registered backend name (kvortex backends list)")
    capacity: ByteSize = Field(description="bytes this tier may hold, e.g. '8GiB'")
    write_through: bool = Field(
        False, description="write every save here too, not only on demotion"
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, data: Any) -> Any:
        # Settings sources are flattened one by one before they merge (so precedence works
        # whatever the spelling); this covers a TierConfig built directly.
        from kvortex_core.config.sources import options_conflicts, without_options

        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            clash = options_conflicts(data)
            if clash:
                raise ValueError(
                    f"{clash[0]!r} is given twice, as {clash[0]!r} and as 'options.{clash[0]}'; "
                    "give it once"
                )
            return without_options(data)
        return data

    @field_validator("capacity", mode="before")
    @classmethod
    def _capacity_size(cls, v: Any) -> Any:
        return check_size(v)

    @field_validator("capacity")
    @classmethod
    def _capacity_positive(cls, v: ByteSize) -> ByteSize:
        if v <= 0:
            raise ValueError("capacity must be a positive size such as '8GiB' or '512MiB'")
        return v

    def __repr_args__(self) -> Any:
        from kvortex_core.config.messages import masked

        for name, value in super().__repr_args__():
            yield name, masked(name or "", value)

    @property
    def options(self) -> dict[str, Any]:
        """The backend-specific options (everything but the common keys)."""
        return dict(self.model_extra or {})


def _default_tiers() -> dict[str, TierConfig]:
    return {"cpu": TierConfig(type="cpu", capacity=ByteSize(4 * 1024**3))}


class KVortexConfig(BaseSettings):
    """The whole KVortex configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_bools(cls, value: Any, info: ValidationInfo) -> Any:
        return _no_bool(cls, value, info)

    chunk_tokens: int = Field(256, gt=0, description="tokens per stored chunk")
    hash_algorithm: HashAlgorithm = Field("sha256", description="chunk key hash")
    salt: str = Field("", description="namespace salt (tenant, LoRA adapter)")
    model_id: str = Field("", description="model identity folded into every key")
    model_revision: str = Field("", description="model revision folded into every key")
    store_partial_chunks: bool = Field(
        False, description="also store a prompt's last partial chunk"
    )
    ranks_per_node: int | None = Field(
        None, ge=1, description="ranks sharing the node's cpu capacity"
    )
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers)
    eviction: EvictionConfig = Field(default_factory=EvictionConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="kvortex loggers"
    )

    # Kept for provenance (`kvortex config show`): what this instance was loaded from.
    _source_file: Path | None = PrivateAttr(None)
    _arguments: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        source_file = config_file_path()
        orders_token = _tier_orders.set([])
        try:
            super().__init__(**values)
        except ValidationError as exc:
            from kvortex_core.config.messages import format_validation_error

            raise ConfigError(format_validation_error(exc, source_file, values)) from None
        except SettingsError as exc:  # StrictEnvCheck catches the usual cases first
            raise ConfigError(
                f"{exc}: check the KVORTEX_* environment variables; a whole section is a JSON "
                "object, e.g. KVORTEX_TIERS='{\"cpu\": {\"type\": \"cpu\", \"capacity\": "
                "\"8GiB\"}}', one value is KVORTEX_SECTION__KEY=value"
            ) from None
        finally:
            _tier_orders.reset(orders_token)
        self._source_file = source_file
        self._arguments = values

    def __repr_args__(self) -> Any:
        from kvortex_core.config.messages import masked

        for name, value in super().__repr_args__():
            yield name, masked(name or "", value)

    @property
    def source_file(self) -> Path | None:
        """The YAML file this configuration was loaded from, if any."""
        return self._source_file

    @property
    def arguments(self) -> dict[str, Any]:
        """The keyword arguments this configuration was built with (highest priority)."""
        return dict(self._arguments)

    @field_validator("tiers", mode="before")
    @classmethod
    def _fill_default_tiers(cls, v: Any) -> Any:
        # `KVORTEX_TIERS__CPU__CAPACITY=16GiB` alone resizes the default cpu tier: keys a source
        # leaves out of a tier named like a default one come from that default.
        if not isinstance(v, dict):
            return v
        _check_tier_names(v)
        defaults = {name: tc.model_dump() for name, tc in _default_tiers().items()}
        cpu = [n for n, e in v.items() if isinstance(e, dict)
               and e.get("type", defaults.get(n, {}).get("type")) == "cpu"]
        v = {name: v[name] for name in tier_order(_tier_orders.get() or [], list(v), cpu)}
        return {
            name: {**defaults[name], **entry}
            if name in defaults and isinstance(entry, dict)
            else entry
            for name, entry in v.items()
        }

    @field_validator("tiers")
    @classmethod
    def _check_tiers(cls, v: dict[str, TierConfig]) -> dict[str, TierConfig]:
        # A field validator (not a model one) so backend problems are reported in the same
        # message as errors in other fields.
        from kvortex_core.config.backends import validate_tier_options

        if not v:
            raise ValueError(
                "at least one tier is needed, e.g. tiers: {cpu: {type: cpu, capacity: 4GiB}}"
            )
        validate_tier_options(v, config_file_path(), _plugins.get())
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        from kvortex_core.config.sources import FlatTierOptions, StrictEnvCheck, YamlFileSource

        return (
            FlatTierOptions(init_settings, "argument"),
            StrictEnvCheck(settings_cls),
            FlatTierOptions(env_settings, "env"),
            YamlFileSource(settings_cls),
        )

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        *,
        plugins: PluginManager | Iterable[object] | None = None,
        **overrides: Any,
    ) -> KVortexConfig:
        """Load with an explicit YAML file (else ``KVORTEX_CONFIG_FILE``) under ``overrides``.

        ``plugins`` is the plugin manager (or extra plugin objects, added to the autoloaded
        ones) whose backends the tier types must name; pass the engine's own manager when it
        registers backends that are not installed entry points (tests, embedded use).
        """
        manager = _as_manager(plugins)
        file_token = _config_file.set(str(config_file) if config_file is not None else None)
        plugins_token = _plugins.set(manager)
        try:
            return cls(**overrides)
        finally:
            _plugins.reset(plugins_token)
            _config_file.reset(file_token)

    @property
    def tier_names(self) -> list[str]:
        """Tier names in the configured order (first = hottest)."""
        return list(self.tiers)


_KIND = {int: "a number, not", float: "a number, not", bool: "a boolean (YAML yes/no), not"}


def note_tier_order(data: Any, *, ordered: bool = True) -> None:
    """Record the tier names one source lists (sources call this in priority order);
    ``ordered=False`` for a source whose order means nothing (environment variables)."""
    orders = _tier_orders.get()
    if orders is not None and isinstance(data, dict) and isinstance(data.get("tiers"), dict):
        orders.append(([name for name in data["tiers"] if isinstance(name, str)], ordered))


def tier_order(orders: list[tuple[list[str], bool]], names: list[str],
               cpu_first: Iterable[str] = ()) -> list[str]:
    """The order of the merged ``names``.

    Among the sources with an order (YAML, keyword arguments), the one listing the most tiers
    decides, whatever others merely adjust one tier's key or add one (on a tie, the lower
    priority one: a keyword argument adding a tier to a YAML stack puts it after); the tiers
    only the other ordered sources list follow in their order. Tiers named only by environment
    variables (which carry no order) come last, those of type cpu (``cpu_first``) first.
    """
    ranked = sorted(enumerate(o for o, ok in orders if ok), key=lambda p: (-len(p[1]), -p[0]))
    out: list[str] = []
    for _, order in ranked:
        out.extend(n for n in order if n in names and n not in out)
    cpu = set(cpu_first)
    rest = [n for n in names if n not in out]
    return out + [n for n in rest if n in cpu] + [n for n in rest if n not in cpu]


def _check_tier_names(tiers: dict[Any, Any]) -> None:
    """A tier name is a string: YAML reads ``1:`` as a number and ``yes:`` as a bool."""
    from kvortex_core.config.messages import HEADLINE, where

    bad = [name for name in tiers if not isinstance(name, str)]
    if bad:
        raise ConfigError(
            HEADLINE
            + "\n"
            + "\n".join(
                f"  tiers.{name}: the tier name {name!r} is {_KIND.get(type(name), 'not')} a "
                f"string\n    set it through {where(('tiers', str(name)), config_file_path())}\n"
                f"    fix: quote it in YAML ('{name}': {{type: ..., capacity: ...}}) or use a "
                "word such as disk"
                for name in bad
            )
        )


def _as_manager(plugins: PluginManager | Iterable[object] | None) -> PluginManager | None:
    from kvortex_core.plugins.manager import PluginManager

    if plugins is None or isinstance(plugins, PluginManager):
        return plugins
    return PluginManager(plugins)


def config_file_from_env() -> bool:
    """Whether the YAML file in effect was named by ``KVORTEX_CONFIG_FILE`` (not by ``load``)."""
    return _config_file.get() is None and bool(os.environ.get(CONFIG_FILE_ENV))


def config_file_path() -> Path | None:
    """The YAML file in effect: the one passed to ``load`` else ``KVORTEX_CONFIG_FILE``."""
    explicit = _config_file.get()
    name = explicit if explicit is not None else os.environ.get(CONFIG_FILE_ENV)
    return Path(name) if name else None
