"""The state the TierManager's save and load halves share (declared once, for type checkers)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvortex_core.config.settings import KVortexConfig
    from kvortex_core.control.index import ChunkIndex
    from kvortex_core.control.stats import Stats
    from kvortex_core.data.pool import PinnedPool
    from kvortex_core.tiering.loop import LoopThread
    from kvortex_core.tiering.tiers import LowerTier


class TierState:
    """Attributes set by :class:`~kvortex_core.tiering.manager.TierManager.__init__`."""

    config: KVortexConfig
    namespace: bytes
    payload_shape: tuple[int, ...]
    dtype: torch.dtype
    stats: Stats
    pool: PinnedPool
    payload_bytes: int
    cpu_name: str
    cpu_index: ChunkIndex
    tiers: list[LowerTier]
    loop: LoopThread
    _lock: threading.RLock
    _closed: bool
    _payload_views: list[torch.Tensor]  # by slot
    _header_views: list[memoryview]  # by slot
