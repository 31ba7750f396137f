"""Tiering: ordered tiers, write-behind, promotion, demotion and failure isolation.

The engine and the vLLM connector use :class:`TierManager` (see ``manager.py``) and the leases it
hands out; the other modules are its parts (loop thread, circuit breaker, lower-tier wrapper).
"""

from __future__ import annotations

from kvortex_core.tiering.breaker import CircuitBreaker
from kvortex_core.tiering.leases import LoadLease, SaveLease
from kvortex_core.tiering.manager import TierManager

__all__ = ["CircuitBreaker", "LoadLease", "SaveLease", "TierManager"]
