"""Configuration: one pydantic-settings root (`KVortexConfig`) plus provenance for `config show`."""

from __future__ import annotations

from kvortex_core.config.settings import (
    CircuitBreakerConfig,
    EvictionConfig,
    KVortexConfig,
    MetricsConfig,
    TierConfig,
    TimeoutConfig,
    TransferConfig,
)

__all__ = [
    "CircuitBreakerConfig",
    "EvictionConfig",
    "KVortexConfig",
    "MetricsConfig",
    "TierConfig",
    "TimeoutConfig",
    "TransferConfig",
]
