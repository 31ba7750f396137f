"""The async storage-backend protocol.

A backend stores opaque byte values under string keys (lowercase hex chunk keys, at most 128
characters). Values are complete payloads (header + KV bytes, see ``kvortex_core.data.payload``);
a backend never interprets them. All I/O methods are coroutines run on the tiering event-loop
thread; the engine wraps every call in a timeout and a circuit breaker, so a backend may simply
raise on failure.

Contract (checked by ``kvortex_core.testing.BackendConformance``):
- ``put`` stores a full copy of ``data`` (the caller may reuse the buffer once it returns);
  overwriting a key replaces its value atomically. A put that would exceed ``capacity`` raises
  :class:`~kvortex_core.errors.BackendFullError` and changes nothing.
- ``get`` copies the value into the caller's writable buffer and returns its length, or
  returns ``None`` when the key is absent; a buffer that is too small raises
  :class:`~kvortex_core.errors.BufferTooSmallError`, a value that cannot be a payload at all
  :class:`~kvortex_core.errors.BadValueError` (the engine deletes both as bad payloads). A reader
  never sees a partial value.
- ``contains`` answers for many keys at once, in order.
- ``delete`` removes the keys that exist and returns how many it removed.
- ``usage`` reports bytes used by this instance against its capacity.
"""

from __future__ import annotations

import abc
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ByteSize, ConfigDict, ValidationInfo, field_validator


class BackendOptions(BaseModel):
    """Base of each backend's own options model: unknown keys are errors, and every ``ByteSize``
    field takes sizes as the engine's own settings do (a bool, a fractional byte count, or
    text after the unit, ``"64MB/s"``, is an error naming the value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _sizes(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if value is None or field is None or not _is_size(field.annotation):
            return value
        from kvortex_core.config.settings import check_size

        return check_size(value)

    def machine_notes(self) -> list[str]:
        """What these options need from the machine that is missing here (a certificate file,
        say): notes for ``kvortex config validate``, which may run on another machine than the
        one that serves. Not errors: the backend checks them for real when it opens."""
        return []


def _is_size(annotation: Any) -> bool:
    """``ByteSize`` or an optional ``ByteSize``."""
    return annotation is ByteSize or (
        get_origin(annotation) in (Union, types.UnionType) and ByteSize in get_args(annotation))


@dataclass(frozen=True)
class Usage:
    """Bytes this backend instance may hold, holds, and how many values."""

    capacity: int
    used: int
    items: int


@dataclass(frozen=True)
class Health:
    """Result of a liveness probe; ``detail`` says what is wrong when ``ok`` is False."""

    ok: bool
    detail: str = ""


@dataclass
class BackendContext:
    """What the engine tells a backend about where it runs."""

    tier: str = "default"
    namespace: str = ""
    rank: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    #: True when this instance only looks: the engine reads its ``scan()`` and may call
    #: ``contains``/``get``, never ``put`` or ``delete`` (the vLLM scheduler's view of each rank's
    #: tier, which the rank's own instance owns). A local backend then neither claims nor
    #: cleans its storage (the disk tier takes no directory lock and deletes nothing).
    observer: bool = False
    #: Which of several engines that share one configuration on one node this is (the vLLM
    #: connector: ``dp<k>`` for data-parallel engine k > 0, else empty). A local backend keeps each
    #: instance's data apart (the disk tier: ``<path>/<namespace>/<instance>/r<rank>``).
    instance: str = ""
    #: The engine this instance works for, as its other processes know it (the vLLM connector:
    #: ``kv_transfer_config.engine_id``, the same in its scheduler and its workers). The disk
    #: tier writes it next to its directory lock; an observer of that engine serves a directory
    #: only while it is free or held for the same engine (not for another server on one path).
    engine_id: str = ""


class StorageBackend(abc.ABC):
    """Base class of every storage tier."""

    #: The backend's options model (validated from the tier's config keys).
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    #: Module names that must be importable (optional dependencies).
    requires: ClassVar[tuple[str, ...]] = ()
    #: Shown when ``requires`` is not met, e.g. ``pip install "kvortex-backends[redis]"``.
    install_hint: ClassVar[str | None] = None
    #: True for tiers shared between instances (redis, s3): other writers may add keys.
    shared: ClassVar[bool] = False

    def __init__(self, options: BackendOptions, *, capacity: int, context: BackendContext) -> None:
        self.options = options
        self.capacity = int(capacity)
        self.context = context

    async def open(self) -> None:
        """Connect / create directories / rebuild state. Called once before any other call."""

    @abc.abstractmethod
    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str, out: memoryview) -> int | None: ...

    @abc.abstractmethod
    async def contains(self, keys: Sequence[str]) -> list[bool]: ...

    @abc.abstractmethod
    async def delete(self, keys: Sequence[str]) -> int: ...

    @abc.abstractmethod
    async def usage(self) -> Usage: ...

    async def health(self) -> Health:
        """Cheap liveness probe; the default is healthy."""
        return Health(ok=True)

    async def scan(self) -> list[tuple[str, int]] | None:
        """Every stored ``(key, size)`` pair, or ``None`` when listing is not supported.

        Used at start to rebuild the tier index from what a previous run left (disk).
        """
        return None

    @abc.abstractmethod
    async def close(self) -> None: ...
