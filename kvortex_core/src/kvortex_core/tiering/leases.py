"""Leases: what ``begin_save`` / ``begin_load`` hand out and ``commit``/``abort``/``end`` take back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvortex_core.control.index import PinHandle


@dataclass(eq=False)
class SaveLease:
    """A cpu slot reserved for one chunk that is stored nowhere yet.

    Fill ``payload`` (a uint8 view of the slot's payload area), then ``commit_save``.
    """

    key: bytes
    index: int  # position of ``key`` in the list given to begin_save
    slot: int
    payload: torch.Tensor
    parent: bytes | None = None
    done: bool = field(default=False, repr=False)
    header_written: bool = field(default=False, repr=False)
    #: Set by ``commit_save``: the chunk is in the cpu index (False: no room, or stored meanwhile).
    stored: bool = field(default=False, repr=False)


@dataclass(eq=False)
class LoadLease:
    """A pinned cpu slot holding one verified chunk; read ``payload``, then ``end_load``."""

    key: bytes
    index: int
    slot: int
    payload: torch.Tensor
    tier: str  # where the chunk was found ("cpu" or the lower tier it was promoted from)
    pin: PinHandle | None = field(default=None, repr=False)
