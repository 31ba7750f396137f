"""KVortexEngine: the standalone KV cache API (keys + tiers + transfer engine, one process).

    with KVortexEngine.create(KVortexConfig(model_id="meta-llama/Llama-3.1-8B")) as engine:
        engine.register_kv_caches(kv_caches)        # list / dict of per-layer tensors, or one tensor
        engine.save(token_ids, block_ids)           # block_ids[i] holds tokens [i*bs, (i+1)*bs)
        hit = engine.lookup(token_ids)              # leading tokens stored
        got = engine.load(token_ids, block_ids)     # tokens written into the blocks

Every call is thread-safe. ``save_async`` / ``load_async`` return an :class:`EngineHandle`.
A save never fails the caller for lack of room (chunks that find no slot are skipped and
counted); bad input raises :class:`~kvortex_core.errors.KVortexError`, checked part by part
(see ``_parts``): a bad value never moves a byte of its own part, and chunks stored before it
are correct (a key depends only on its own prefix).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self

from kvortex_core.config import KVortexConfig
from kvortex_core.control.keys import MAX_TOKEN_ID as _MAX_TOKEN
from kvortex_core.errors import KVortexError, LayoutError

if TYPE_CHECKING:

    from kvortex_core.control.keys import ChunkHasher
    from kvortex_core.control.stats import Stats
    from kvortex_core.data.layouts import KVLayout
    from kvortex_core.data.transfer import TransferEngine
    from kvortex_core.plugins.manager import PluginManager
    from kvortex_core.tiering.manager import TierManager

log = logging.getLogger("kvortex_core.engine")

#: A save or load moves a first part of about this many bytes (at least a chunk), then parts of
#: twice as many chunks as the one before, each prepared while the ones before are on the wire
#: (see _parts). A small first part is less host work before the first DMA (hashes, slots,
#: indices of one chunk rather than two).
_FIRST_PART_BYTES = 24 * 1024**2

#: A save indexes its chunks in groups of about this many bytes as they land (_commit_as_ready).
_COMMIT_GROUP_BYTES = 64 * 1024**2

#: Engine-level counters in ``stats()``.
SAVED_TOKENS, LOADED_TOKENS, SAVE_CALLS, LOAD_CALLS = "engine_saved_tokens", "engine_loaded_tokens", \
    "engine_save_calls", "engine_load_calls"
#: Calls that raised (bad input, a transfer that failed); also in the calls and the histograms.
SAVE_ERRORS, LOAD_ERRORS = "engine_save_errors", "engine_load_errors"
#: Latency histograms of whole save / load calls (served as ``kvortex_engine_save_seconds``...).
SAVE_TIME, LOAD_TIME = "engine_save", "engine_load"


class EngineHandle:
    """Completion of a ``save_async`` / ``load_async``: ``wait()`` returns the call's result."""

    def __init__(self, future: Future[int], what: str) -> None:
        self._future = future
        self.what = what

    def wait(self, timeout: float | None = None) -> int:
        """Block until done and return the token count (re-raises the call's error)."""
        from concurrent.futures import TimeoutError as FutureTimeout

        from kvortex_core.data.streams import TransferTimeoutError

        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise TransferTimeoutError(f"{self.what} did not finish within timeout={timeout}s") from None

    def done(self) -> bool:
        return self._future.done()


class LayerwiseLoad:
    """A load started for all layers and awaited per layer (``KVortexEngine.load_layerwise``).

    ``wait_layer(i)`` orders the caller's current CUDA stream after layer ``i`` arrived (on CPU
    it returns once the layer is copied), so layer ``i`` computes while ``i+1`` is in flight.
    ``wait()`` blocks until every layer landed and releases the pinned slots; call it (or use
    the object as a context manager) once the forward pass is done.
    """

    def __init__(self, tokens: int, handles: list[Any], release: Any, timeout: float, num_layers: int) -> None:
        self.tokens = tokens
        self.num_layers = num_layers
        self._handles = handles  # one per pipelined part (one for a layer-wise load)
        self._release = release
        self._timeout = timeout
        self._finished = not handles

    def wait_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise KVortexError(
                f"wait_layer({layer!r}): layer must be an int in [0, {self.num_layers}) (the "
                "registered layers, in forward order)"
            )
        for handle in self._handles:
            handle.wait_layer(layer)

    def done(self) -> bool:
        return self._finished or all(h.done() for h in self._handles)

    def wait(self) -> int:
        """Block until all layers landed, release the slots, return the tokens loaded."""
        if not self._finished:
            try:
                for handle in self._handles:
                    handle.wait(self._timeout)
            finally:
                self._finished = True
                self._release()
        return self.tokens

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


class _Registered:
    """What ``register_kv_caches`` builds: layout, keys, tiers and the transfer engine."""

    def __init__(self, layout: KVLayout, hasher: ChunkHasher, tiers: TierManager,
                 transfer: TransferEngine, shapes: list[tuple[Any, ...]]) -> None:
        self.layout = layout
        self.hasher = hasher
        self.tiers = tiers
        self.transfer = transfer
        self.shapes = shapes
        self.parts: dict[int, list[tuple[int, int]]] = {}  # KVortexEngine._parts by chunk count


def _close_orphaned(reg: _Registered) -> None:
    """Close what an engine dropped without ``close()`` built, on a thread of its own: the
    garbage collector may run this on any thread, the tiering loop's own included."""
    log.warning("a KVortexEngine was dropped without close(): closing its tiers in the background")

    def run() -> None:
        try:
            reg.transfer.close()
        finally:
            reg.tiers.close()

    try:
        threading.Thread(target=run, name="kvortex-orphan-close", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: the loops stop on their own
        pass


class KVortexEngine:
    """Save, look up and load the KV cache of token prefixes; see the module docstring."""

    def __init__(self, config: KVortexConfig, plugins: PluginManager, *, rank: int = 0,
                 world_size: int = 1) -> None:
        from kvortex_core.control.stats import Stats

        _check_rank(rank, world_size)
        self.config = config
        self.plugins = plugins
        self.rank = rank
        self.world_size = world_size
        self._stats: Stats = Stats()
        self._stats.declare(counters=(SAVE_CALLS, LOAD_CALLS, SAVED_TOKENS, LOADED_TOKENS, SAVE_ERRORS, LOAD_ERRORS),
                            histograms=(SAVE_TIME, LOAD_TIME))
        self._lock = threading.RLock()
        self._reg: _Registered | None = None
        self._closed = False
        self._closing = False  # close() started: no new calls, accepted async calls finish
        self._orphan: weakref.finalize[Any, Any] | None = None
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvortex-engine")
        from kvortex_core.metrics import start_metrics

        # Prometheus export when config.metrics.enabled (serves on metrics.port when set).
        self._metrics = start_metrics(self._stats, config)

    @classmethod
    def create(cls, config: KVortexConfig | Mapping[str, Any] | None = None,
               plugins: PluginManager | Sequence[object] | None = None,
               *, rank: int = 0, world_size: int = 1) -> KVortexEngine:
        """An engine for ``config`` (default: ``KVortexConfig()``, i.e. env and YAML; a mapping
        is read as ``KVortexConfig.load(**mapping)``: its keys over env and YAML).

        ``plugins``: a PluginManager, or extra plugin objects registered beside the entry points.
        """
        from kvortex_core.plugins.manager import PluginManager

        if not isinstance(plugins, PluginManager):
            plugins = PluginManager(list(plugins or ()))
        if isinstance(config, Mapping):
            config = KVortexConfig.load(plugins=plugins, **config)
        elif config is not None and not isinstance(config, KVortexConfig):
            raise TypeError(f"config is a {type(config).__name__}; pass a KVortexConfig, a mapping of "
                            "its fields (e.g. {'chunk_tokens': 256}) or None (env and YAML)")
        return cls(config if config is not None else KVortexConfig(), plugins, rank=rank,
                   world_size=world_size)

    # ------------------------------------------------------------------ registration

    def register_kv_caches(self, kv_caches: Any, hints: dict[str, Any] | None = None) -> KVLayout:
        """Detect the layout of the engine's KV tensors and build tiers and transfers for it.

        Registering again with tensors of the same layout (a re-allocated cache) is allowed;
        a different shape, dtype or layout raises (stored chunks would no longer fit).
        """
        from kvortex_core.data.layouts import detect_layout

        layout = detect_layout(kv_caches, hints)
        shapes = _shapes(kv_caches)
        with self._lock:
            self._check_open()
            if self._reg is not None:
                if self._reg.layout != layout:
                    was, now = dataclasses.asdict(self._reg.layout), dataclasses.asdict(layout)
                    diff = ", ".join(f"{k} {was[k]!s} -> {now[k]!s}" for k in was if was[k] != now[k])
                    raise LayoutError(
                        f"register_kv_caches was already called with another layout ({diff}); "
                        "close this engine and create a new one for another model or cache layout"
                    )
                old = self._reg.transfer
                self._reg.transfer = self._transfer(kv_caches, layout)
                self._reg.shapes = shapes
                old.close()
                return layout
            self._reg = self._build(kv_caches, layout, shapes)
            # Dropped without close() (a notebook re-run, an exception before close): its tiers
            # would live on with the loop thread, holding their disk directories; closed then.
            self._orphan = weakref.finalize(self, _close_orphaned, self._reg)
            self._orphan.atexit = False  # at exit the loops stop on their own (tiering.loop)
        return layout

    def _build(self, kv_caches: Any, layout: KVLayout, shapes: list[tuple[Any, ...]]) -> _Registered:
        from kvortex_core.control.keys import ChunkHasher, KeyNamespace, validate_chunk_tokens
        from kvortex_core.tiering.manager import TierManager

        cfg = self.config
        validate_chunk_tokens(cfg.chunk_tokens, layout.block_size)
        ns = KeyNamespace(model_id=cfg.model_id, revision=cfg.model_revision, tp_size=self.world_size,
                          salt=cfg.salt, **layout.namespace_fields())
        hasher = ChunkHasher(ns, cfg.chunk_tokens, cfg.hash_algorithm, cfg.store_partial_chunks,
                             block_size=layout.block_size)
        # the tiers first: the pool names chunk_tokens when one chunk cannot fit the cpu tier,
        # before the transfer engine sizes its staging for such a chunk on the device
        tiers = TierManager.create(cfg, self.plugins, namespace=ns.digest(),
                                   payload_shape=layout.chunk_payload_shape(cfg.chunk_tokens),
                                   dtype=layout.dtype, stats=self._stats, rank=self.rank,
                                   world_size=self.world_size, device=_cuda_index(kv_caches))
        try:
            transfer = self._transfer(kv_caches, layout)
        except BaseException:
            tiers.close()
            raise
        return _Registered(layout, hasher, tiers, transfer, shapes)

    def _transfer(self, kv_caches: Any, layout: KVLayout) -> TransferEngine:
        from kvortex_core.data.transfer import TransferEngine

        t = self.config.transfer
        return TransferEngine(kv_caches, layout, chunk_tokens=self.config.chunk_tokens,
                              staging_bytes=int(t.staging_bytes), num_streams=t.num_streams, gather=t.gather)

    @property
    def layout(self) -> KVLayout | None:
        """The registered layout (None before ``register_kv_caches``)."""
        return self._reg.layout if self._reg is not None else None

    # ------------------------------------------------------------------ keys and lookups

    def keys(self, token_ids: Any) -> list[bytes]:
        """Storage keys of the chunks of ``token_ids`` (this rank)."""
        from kvortex_core.control.keys import rank_keys

        reg = self._registered()
        return rank_keys(reg.hasher.keys(_tokens(token_ids)), self.rank)

    def lookup(self, token_ids: Any) -> int:
        """How many leading tokens of ``token_ids`` are stored (whole chunks; never blocks on I/O)."""
        reg = self._registered()
        tokens = _tokens(token_ids)
        keys = self.keys(tokens)
        hit = reg.tiers.lookup(keys)
        hit_tokens = min(hit * self.config.chunk_tokens, len(tokens))
        self._stats.record_lookup(len(tokens), hit_tokens, len(keys), hit)
        return hit_tokens

    def contains(self, keys: Sequence[bytes]) -> int:
        """Bitmask over ``keys`` (as returned by :meth:`keys`): bit i set when keys[i] is stored."""
        if isinstance(keys, (bytes, bytearray, memoryview, str)):
            raise KVortexError(
                f"contains takes a sequence of keys, got one {type(keys).__name__}; pass [key] "
                "(keys as returned by engine.keys(token_ids))"
            )
        if keys is None or not hasattr(keys, "__iter__"):
            raise KVortexError(
                f"contains takes a sequence of keys, got {type(keys).__name__}; pass the list "
                "returned by engine.keys(token_ids)"
            )
        keys = list(keys)
        if keys and set(map(type, keys)) != {bytes}:  # one C-speed pass; the loop only to name it
            i, key = next((i, k) for i, k in enumerate(keys) if type(k) is not bytes)
            raise KVortexError(
                f"keys[{i}] = {key!r} is a {type(key).__name__}, not a key; pass the bytes "
                "returned by engine.keys(token_ids)"
            )
        reg = self._registered()
        return reg.tiers.contains(keys)

    # ------------------------------------------------------------------ save

    def save(self, token_ids: Any, block_ids: Sequence[int]) -> int:
        """Store the KV of ``token_ids`` read from ``block_ids``; returns tokens newly stored.

        Chunks already stored are skipped; so are chunks for which no cpu slot is free.
        When this returns the blocks may be overwritten: every byte has been copied out.
        """
        self._check_accepting()
        return self._save(token_ids, block_ids)

    def _save(self, token_ids: Any, block_ids: Sequence[int]) -> int:
        """:meth:`save` once accepted (``save_async`` runs this: close() lets it finish).

        Every call is counted and timed, one that raises too (and counted in its errors): a
        failed call was counted but not timed, so the two drifted apart (a red-team finding)."""
        return self._counted(lambda: self._save_chunks(token_ids, block_ids), calls=SAVE_CALLS,
                             errors=SAVE_ERRORS, seconds=SAVE_TIME)

    def _counted(self, call: Callable[[], int], *, calls: str, errors: str, seconds: str) -> int:
        """Run ``call``: counted in ``calls``, timed in ``seconds``, and if it raises, in ``errors``."""
        start = time.perf_counter()
        self._stats.inc(calls)
        try:
            return call()
        except BaseException:
            self._stats.inc(errors)
            raise
        finally:
            self._stats.observe(seconds, time.perf_counter() - start)

    def _save_chunks(self, token_ids: Any, block_ids: Sequence[int]) -> int:
        reg = self._registered()
        tokens = _Tokens(token_ids)
        blocks = _Blocks(block_ids, tokens.n, reg.layout)
        chain = _KeyChain(reg.hasher, tokens, self.rank)
        started: list[tuple[Any, list[Any]]] = []
        error: BaseException | None = None
        full_at: list[int] = []
        missed: list[Any] = []  # leases whose chunk was not indexed after all (rare)
        saved = 0
        try:
            for a, b in self._parts(chain.n, reg):
                # the rest is converted, checked and hashed while the head is on the wire
                keys = chain.upto(b)
                blocks.check(self._end_block(b, tokens.n, reg))
                leases = reg.tiers.begin_save(keys[a:b], [keys[i - 1] if i else None for i in range(a, b)],
                                              full_at=full_at)
                if not leases:
                    if full_at:
                        break
                    continue
                for lease in leases:
                    lease.index += a
                per_chunk = [self._chunk_blocks(blocks.ids, lease.index, tokens.n, reg) for lease in leases]
                try:
                    # enqueued on this thread: no hand-off before the first copy (save_async runs
                    # this on an executor thread, so a save and a load still enqueue side by side)
                    handle = reg.transfer.save(per_chunk, [lease.payload for lease in leases], inline=True,
                                               checked=True)
                except BaseException:
                    reg.tiers.abort_save(leases)
                    raise
                started.append((handle, leases))
                saved += self._lease_tokens(leases, tokens.n)  # while the copies run
                if full_at:  # the cpu tier is full: chunks after this one would be unreachable
                    break
            chain.upto(chain.n)  # every token and block id is checked, stored chunks or not
            blocks.check(blocks.need)
        except BaseException as exc:  # noqa: BLE001 - re-raised once enqueued parts are settled
            error = exc
        # A save that may fill the cpu tier holds its chunks as they are indexed, so that room for
        # its tail is never made by evicting its head (the tail is unreachable without it)
        hold = reg.tiers.hold_for_save(sum(map(len, (leases for _, leases in started)))) if started else None
        try:
            for handle, leases in started:  # parts already enqueued finish whatever happened later
                try:
                    missed += self._commit_as_ready(reg, handle, leases, hold)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    reg.tiers.abort_save(leases)
                    error = error or exc
        finally:
            if hold is not None:
                hold.release()
        if error is not None:
            raise error
        # chunks skipped because another thread is saving them: visible when this returns too
        reg.tiers.wait_saving(chain.upto(chain.n), self.config.timeouts.transfer_s)
        if missed:
            saved -= self._lease_tokens(missed, tokens.n)
        self._stats.inc(SAVED_TOKENS, saved)
        return saved

    def _lease_tokens(self, leases: list[Any], n_tokens: int) -> int:
        """Tokens of the chunks of ``leases`` (the last one may be partial)."""
        ct = self.config.chunk_tokens
        return sum(min((lease.index + 1) * ct, n_tokens) - lease.index * ct for lease in leases)

    def _end_block(self, end_chunk: int, n_tokens: int, reg: _Registered) -> int:
        """One past the last block holding tokens of chunks ``[0, end_chunk)``."""
        return -(-min(end_chunk * self.config.chunk_tokens, n_tokens) // reg.layout.block_size)

    def _parts(self, n_chunks: int, reg: _Registered) -> list[tuple[int, int]]:
        """Chunk ranges handled one after the other: a small first part, then twice as many
        chunks each time, the last part taking the rest (at most twice its predecessor's size).

        The first copy starts once the host prepared only the first part (keys, slot, indices
        of one chunk for Llama-8B, ~24 MiB); each later part is prepared while the parts before
        it are on the wire, so the per-call host work (~1.3 ms for 8K tokens on an H100 VM)
        hides behind the copies instead of delaying the first one. Growth by chunk count, not
        bytes: the host work of a part is per chunk, so a part of small chunks (MLA: 17.6 MiB)
        must not be 4x the chunks of the part whose copies hide it (measured on an H100, the
        engine's MLA loads showed a 100-190 us DMA gap at the end of a first part of 2 chunks
        followed by one of 6).
        """
        parts = reg.parts.get(n_chunks)
        if parts is not None:
            return parts
        chunk_bytes = reg.transfer.layout.chunk_bytes(self.config.chunk_tokens)
        size = max(1, -(-_FIRST_PART_BYTES // chunk_bytes))
        parts, start = [], 0
        while n_chunks - start > 2 * size:
            parts.append((start, start + size))
            start += size
            size *= 2
        parts.append((start, n_chunks))
        if len(reg.parts) < 4096:
            reg.parts[n_chunks] = parts
        return parts

    def _commit_as_ready(self, reg: _Registered, handle: Any, leases: list[Any], hold: Any = None) -> list[Any]:
        """Index the chunks as their DMAs land (~64 MiB at a time), while later ones are on the wire.

        On this thread: a commit is ~20 us of Python (no pass over the bytes, see
        ``TierManager.commit_save``), done while the next chunk's copy runs; committer threads
        would contend for the GIL with the caller exactly when its save returns. When this
        returns every chunk is off the device and visible to lookups.
        """
        timeout = self.config.timeouts.transfer_s
        reg.tiers.prepare_save(leases)  # headers while the payloads are on the wire
        # one wait per ~64 MiB of chunks: each wait is a thread hand-off that competes for the
        # GIL with whatever the process enqueues meanwhile (a load on another thread, say)
        group = max(1, _COMMIT_GROUP_BYTES // max(1, reg.tiers.payload_bytes))
        # the last chunk is a group of its own: what is left to index once the last copy
        # landed (the call's return waits for it) is one chunk, not a group
        body = len(leases) - 1
        missed = []
        for start in range(0, body, group):
            end = min(start + group, body)
            handle.wait_chunk(end - 1, timeout)
            missed += reg.tiers.commit_save(leases[start:end], hold)
        handle.wait(timeout)  # wakes on the last copy's end (see TransferHandle.wait)
        return missed + reg.tiers.commit_save(leases[max(body, 0):], hold)

    def _chunk_blocks(self, blocks: list[int], chunk: int, n_tokens: int, reg: _Registered) -> list[int]:
        ct, bs = self.config.chunk_tokens, reg.layout.block_size
        first = chunk * ct
        last = min(first + ct, n_tokens)
        return blocks[first // bs: -(-last // bs)]

    def save_async(self, token_ids: Any, block_ids: Sequence[int]) -> EngineHandle:
        """Non-blocking :meth:`save`; the blocks must stay untouched until ``wait()`` returns.

        The token ids are copied now: the caller may reuse their buffer at once."""
        tokens = _tokens(token_ids).copy()  # a numpy uint32 array or tensor was a view of the caller's
        blocks = _block_list(block_ids)
        self._check_accepting()
        return EngineHandle(self._submit(self._save, tokens, blocks), "save_async")

    # ------------------------------------------------------------------ load

    def load(self, token_ids: Any, block_ids: Sequence[int], *, skip_tokens: int = 0) -> int:
        """Write the stored KV of the longest stored prefix into ``block_ids``.

        ``skip_tokens``: leading tokens the caller already holds; their blocks are not written
        (rounded down to a block boundary: a partly held block is rewritten with equal bytes).
        Returns the number of tokens written after ``skip_tokens`` (0 on a miss).
        """
        self._check_accepting()
        return self._load(token_ids, block_ids, skip_tokens=skip_tokens)

    def _load(self, token_ids: Any, block_ids: Sequence[int], *, skip_tokens: int = 0) -> int:
        """:meth:`load` once accepted (``load_async`` runs this: close() lets it finish)."""
        return self._counted(lambda: self._start_load(token_ids, block_ids, skip_tokens, layerwise=False).wait(),
                             calls=LOAD_CALLS, errors=LOAD_ERRORS, seconds=LOAD_TIME)

    def load_layerwise(self, token_ids: Any, block_ids: Sequence[int], *, skip_tokens: int = 0) -> LayerwiseLoad:
        """Start loading the stored prefix for all layers; await each with ``wait_layer(i)``.

        ``.tokens`` says at once how many tokens (after ``skip_tokens``) will be written.
        """
        self._check_accepting()
        self._stats.inc(LOAD_CALLS)  # (not timed: it returns before the copies end)
        try:
            return self._start_load(token_ids, block_ids, skip_tokens, layerwise=True)
        except BaseException:
            self._stats.inc(LOAD_ERRORS)
            raise

    def _start_load(self, token_ids: Any, block_ids: Sequence[int], skip_tokens: int, *,
                    layerwise: bool) -> LayerwiseLoad:
        """Pin (or fetch) the stored prefix and enqueue its transfer into ``block_ids``."""

        reg = self._registered()
        skip_tokens = _skip(skip_tokens)
        tokens = _Tokens(token_ids)
        blocks = _Blocks(block_ids, tokens.n, reg.layout, unique=True)
        ct = self.config.chunk_tokens
        chain = _KeyChain(reg.hasher, tokens, self.rank)
        # Every token held already: nothing to write (a partial last chunk would rewrite its
        # block, the rows past the sequence's end included).
        first = chain.n if skip_tokens >= tokens.n else min(skip_tokens // ct, chain.n)
        parts = [(0, chain.n - first)] if layerwise else self._parts(chain.n - first, reg)
        handles: list[Any] = []
        pinned: list[Any] = []
        try:
            for a, b in parts:
                keys = chain.upto(first + b)[first + a:]  # later parts hash while the head moves
                blocks.check(self._end_block(first + b, tokens.n, reg))
                leases = reg.tiers.begin_load(keys, timeout=self.config.timeouts.backend_op_s)
                if not leases:
                    break
                pinned += leases
                per_chunk = [self._chunk_blocks(blocks.ids, first + a + lease.index, tokens.n, reg)
                             for lease in leases]
                skip_blocks = (skip_tokens - first * ct) // reg.layout.block_size if a == 0 else 0
                # the stored prefix ends here, or inside this part: the last part of this load
                last = b == parts[-1][1] or len(leases) < b - a
                handles.append(reg.transfer.load([lease.payload for lease in leases], per_chunk,
                                                 layerwise=layerwise, skip_blocks=skip_blocks, inline=True,
                                                 checked=True, drain=last))
                if last:
                    break
            chain.upto(chain.n)  # bad input raises even past the stored prefix
            blocks.check(blocks.need)
        except BaseException:
            try:  # enqueued copies read the slots: unpin only once they are done
                for handle in handles:
                    handle.wait(self.config.timeouts.transfer_s)
            finally:
                reg.tiers.end_load(pinned)
            raise
        if not pinned:
            return LayerwiseLoad(0, [], lambda: None, 0.0, reg.layout.num_layers)
        loaded = max(0, min((first + len(pinned)) * ct, tokens.n) - skip_tokens)
        self._stats.inc(LOADED_TOKENS, loaded)
        # Every load crosses the cpu tier (lower-tier chunks are promoted into a slot first).
        self._stats.record_loaded(len(pinned) * reg.tiers.payload_bytes, reg.tiers.cpu_name)
        return LayerwiseLoad(loaded, handles, lambda: reg.tiers.end_load(pinned),
                             self.config.timeouts.transfer_s, reg.layout.num_layers)

    def load_async(self, token_ids: Any, block_ids: Sequence[int], *, skip_tokens: int = 0) -> EngineHandle:
        """Non-blocking :meth:`load`; read the blocks only after ``wait()`` returned (the token
        ids are copied now)."""
        tokens = _tokens(token_ids).copy()
        blocks = _block_list(block_ids)
        skip_tokens = _skip(skip_tokens)
        self._check_accepting()
        return EngineHandle(self._submit(self._load, tokens, blocks, skip_tokens=skip_tokens),
                            "load_async")

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        """Counters, gauges and latency histograms (``StatsSnapshot.to_dict()``) plus the layout."""
        out: dict[str, Any] = self._stats.snapshot().to_dict()
        reg = self._reg
        if reg is not None:
            out["layout"] = {"kind": reg.layout.kind, "stride_order": reg.layout.stride_order,
                             "num_layers": reg.layout.num_layers, "dtype": str(reg.layout.dtype),
                             "chunk_bytes": reg.layout.chunk_bytes(self.config.chunk_tokens),
                             "row_gather": reg.transfer.row_gather, "gather": reg.transfer.gather_mode}
            out["pool"] = reg.tiers.pool.stats().to_dict()
            # why a lower tier is out of service (the breaker's last error), not only that it is
            out["tiers"] = {t.name: {"state": t.breaker.state, "last_error": t.breaker.last_error}
                            for t in reg.tiers.tiers}
        return out

    @property
    def stats_recorder(self) -> Stats:
        """The live :class:`~kvortex_core.control.stats.Stats` (for Prometheus export)."""
        return self._stats

    @property
    def metrics_url(self) -> str | None:
        """Where this engine serves its Prometheus metrics (``metrics.enabled``), else None.

        With ``metrics.port: 0`` the port is picked at start: this says which. None also when
        the server could not start (the port busy, say; the log says why)."""
        return self._metrics.url if self._metrics is not None else None

    def close(self) -> None:
        """Finish pending async calls, drain write-behind, free the pinned pool. Idempotent."""
        with self._lock:
            if self._closed or self._closing:
                return
            # new calls are refused from here on; async calls already accepted still run
            # (they check _closed, set only once the executor has finished them)
            self._closing = True
        self._executor.shutdown(wait=True)
        with self._lock:
            self._closed = True
        if self._orphan is not None:
            self._orphan.detach()
        if self._reg is not None:
            self._reg.transfer.close()
            self._reg.tiers.close()
        if self._metrics is not None:
            self._metrics.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise KVortexError("this KVortexEngine is closed; create a new one")

    def _check_accepting(self) -> None:
        """New calls are refused once close() started (accepted async calls still finish)."""
        if self._closing or self._closed:
            raise KVortexError("this KVortexEngine is closed; create a new one")

    def _submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[int]:
        """Run ``fn`` on the executor; a KVortexError when close() shut it down meanwhile."""
        try:
            return self._executor.submit(fn, *args, **kwargs)
        except RuntimeError:  # close() ran between the caller's check and this submit
            self._check_accepting()
            raise

    def _registered(self) -> _Registered:
        self._check_open()
        reg = self._reg
        if reg is None:
            raise KVortexError("no KV cache registered; call register_kv_caches(kv_caches) first")
        return reg


class _KeyChain:
    """The storage keys of a token sequence, hashed on demand up to a chunk (prefix-chained)."""

    def __init__(self, hasher: ChunkHasher, tokens: _Tokens, rank: int) -> None:
        self.hasher, self.tokens, self.rank = hasher, tokens, rank
        self.n = hasher.num_chunks(tokens.n)
        self._logical: list[bytes] = []
        self._keys: list[bytes] = []

    def upto(self, end: int) -> list[bytes]:
        """Keys of chunks ``[0, end)``."""
        from kvortex_core.control.keys import rank_keys

        have = len(self._logical)
        if end > have:
            ct = self.hasher.chunk_tokens
            span = self.tokens.span(have * ct, self.tokens.n if end >= self.n else end * ct)
            new = self.hasher.keys(span, prefix=self._logical[-1] if have else None)
            self._logical += new
            self._keys += rank_keys(new, self.rank)
        return self._keys[:end]


# ---------------------------------------------------------------------- input checks


class _Tokens:
    """Token ids: a list of ints is converted and checked span by span as parts need it (the
    head's copies start before the rest is converted); other inputs are converted at once."""

    def __init__(self, token_ids: Any) -> None:
        if isinstance(token_ids, list) and token_ids and type(token_ids[0]) is int:
            self._list: list[int] | None = token_ids
            self._array: Any = None
            self.n = len(token_ids)
        else:
            self._list, self._array = None, _tokens(token_ids)
            self.n = len(self._array)

    def span(self, lo: int, hi: int) -> Any:
        """Tokens ``[lo, hi)`` as a 1-D integer array (KVortexError for a bad element there).

        From a list: an ``array("I")``, whose ``fromlist`` range-checks each id at C speed; no
        numpy call (each costs 10-30 us on the cold path before a call's first copy).
        """
        if self._list is None:
            return self._array[lo:hi]
        import array

        ids = array.array("I")
        try:
            ids.fromlist(self._list[lo:hi])
        except (TypeError, OverflowError):
            return _tokens(self._list[lo:hi], offset=lo)  # raises or converts, as for other inputs
        return ids


class _Blocks:
    """Block ids, their count checked now and their values as parts need them."""

    def __init__(self, block_ids: Any, n_tokens: int, layout: KVLayout, *, unique: bool = False) -> None:
        self.need = -(-n_tokens // layout.block_size)
        self._layout, self._n_tokens, self._raw = layout, n_tokens, block_ids
        #: A load writes every block: the same id twice would keep only one of two chunks' KV.
        self._seen: set[int] | None = set() if unique else None
        if isinstance(block_ids, list) and len(block_ids) >= self.need:
            self.ids: list[int] = block_ids
            self._ok = 0
        else:  # arrays, tensors, short lists: converted (and any error raised) at once
            self.ids = _blocks(block_ids, n_tokens, layout)
            self._ok = 0
            self.check(self.need)

    def check(self, end: int) -> None:
        """KVortexError unless ids ``[0, end)`` are ints inside the registered cache."""
        if end <= self._ok:
            return
        import array

        part = self.ids[self._ok:end]
        try:  # no numpy: a part's few ids, and each numpy call costs 10-30 us on a cold path
            seg = array.array("q")
            seg.fromlist(part)  # takes bools and 0-d tensors too (anything with __index__)
            good = not seg or (min(seg) >= 0 and max(seg) < self._layout.num_blocks
                               and set(map(type, part)) == {int})
        except (TypeError, OverflowError):
            good = False
        if not good:
            # raises, naming the index and value; or converts what array() does not take (numpy
            # or tensor scalars in a list), so the repeat check below compares ints
            self.ids = _blocks(self._raw, self._n_tokens, self._layout)
            part = self.ids[self._ok:end]
        if self._seen is not None:
            self._seen.update(part)
            if len(self._seen) != end:
                _duplicate(self.ids[:end])
        self._ok = end


def _duplicate(ids: Sequence[int]) -> None:
    """Raise naming the first block id that ``ids`` holds twice."""
    first: dict[int, int] = {}
    for i, b in enumerate(ids):
        j = first.setdefault(b, i)
        if j != i:
            raise KVortexError(
                f"block_ids[{j}] and block_ids[{i}] are both block {b}: a load writes each block "
                "once; pass the request's block table (distinct block ids)"
            )


def _skip(skip_tokens: Any) -> int:
    """``skip_tokens`` as an int >= 0, else a KVortexError naming it."""
    if not isinstance(skip_tokens, bool):
        try:
            value = operator.index(skip_tokens)
        except TypeError:
            pass
        else:
            if value >= 0:
                return value
    raise KVortexError(
        f"skip_tokens={skip_tokens!r} must be an integer >= 0 (the leading tokens already in the "
        "blocks, e.g. vLLM's num_computed_tokens)"
    )


def _tokens(token_ids: Any, offset: int = 0) -> Any:
    """A 1-D integer numpy array from a list, tuple, range, numpy array or tensor, else KVortexError."""
    import array

    import numpy as np

    if isinstance(token_ids, (str, bytes)):
        raise KVortexError(f"token_ids must be a 1-D sequence of ints, got {type(token_ids).__name__}")
    if hasattr(token_ids, "detach"):
        token_ids = token_ids.detach().cpu().numpy()
    elif isinstance(token_ids, list) and token_ids and type(token_ids[0]) is int:
        try:  # the common case (vLLM's lists of ints): the key's uint32 bytes at C speed
            ids = array.array("I")
            ids.fromlist(token_ids)
            return np.frombuffer(ids, dtype=np.uint32)
        except (TypeError, OverflowError):
            pass  # a non-int or out-of-range element: np.asarray below reports it
    arr = _int_vector(token_ids, "token_ids", "pass one request's token ids", offset)
    if arr.size and arr.dtype != np.uint32:
        if int(arr.min()) < 0 or int(arr.max()) > _MAX_TOKEN:
            i = int(np.flatnonzero((arr < 0) | (arr > _MAX_TOKEN))[0])
            raise KVortexError(
                f"token_ids[{offset + i}] = {int(arr[i])} is not a token id in [0, {_MAX_TOKEN}]; "
                "pass one request's token ids"
            )
        arr = arr.astype(np.uint32)  # the keys' byte form: hashing then checks and converts nothing
    return arr if arr.size else arr.astype(np.int64)


def _int_vector(values: Any, name: str, hint: str, offset: int = 0) -> Any:
    """``values`` as a 1-D integer numpy array, else a KVortexError naming the first bad element."""
    import numbers

    import numpy as np

    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise KVortexError(
            f"{name} must be a 1-D sequence of ints (list, tuple, numpy array or tensor), got "
            f"{type(values).__name__}; {hint}"
        )
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise KVortexError(f"{name} must be a 1-D sequence of ints: {exc}") from None
    if arr.ndim != 1:
        raise KVortexError(f"{name} must be 1-D, got shape {arr.shape}; {hint}")
    if arr.dtype == object and values is not None:  # ints beyond 64 bits, or mixed objects
        big = next(((i, v) for i, v in enumerate(arr.tolist())
                    if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**64), None)
        if big is not None:
            raise KVortexError(f"{name}[{offset + big[0]}] = {big[1]} is out of range; {hint}")
    given = values if isinstance(values, (list, tuple)) else None
    if arr.size and (arr.dtype.kind not in "iu" or (given is not None and bool in set(map(type, given)))):
        given = given if given is not None else arr.tolist()
        bad = next(((i, v) for i, v in enumerate(given)
                    if isinstance(v, bool) or not isinstance(v, numbers.Integral)), None)
        if bad is None:  # all integers, some beyond int64: numpy made floats of them
            big = next(((i, v) for i, v in enumerate(given) if not -2**63 <= int(v) < 2**63), None)
            if big is not None:
                raise KVortexError(f"{name}[{offset + big[0]}] = {big[1]} is out of range; {hint}")
        what = (f"{name}[{offset + bad[0]}] = {bad[1]!r} ({type(bad[1]).__name__})" if bad
                else f"dtype {arr.dtype}")
        raise KVortexError(f"{name} must hold integers, got {what}; {hint}")
    return arr


def _block_list(block_ids: Any) -> list[Any]:
    """A copy of the caller's block ids for an async call (checked when the call runs)."""
    if isinstance(block_ids, list):
        return list(block_ids)
    if hasattr(block_ids, "tolist") and not isinstance(block_ids, (str, bytes)):
        return block_ids.tolist()  # type: ignore[no-any-return]
    return _int_vector(block_ids, "block_ids", "pass the request's block table (integer block indices)").tolist()


def _blocks(block_ids: Sequence[int], n_tokens: int, layout: KVLayout) -> list[int]:
    """Block ids covering ``n_tokens`` tokens, each inside the registered cache.

    The full check with its error messages; :class:`_Blocks` checks lists of ints part by part
    at C speed and calls this only to convert other inputs or to name a bad value.
    """
    import numpy as np

    need = -(-n_tokens // layout.block_size)
    if hasattr(block_ids, "detach"):
        block_ids = block_ids.detach().cpu().numpy()
    ids = _int_vector(block_ids, "block_ids", "pass the request's block table (integer block indices)")
    if len(ids) < need:
        raise KVortexError(
            f"{n_tokens} tokens need {need} blocks of {layout.block_size} tokens, got {len(ids)} "
            "block_ids; pass the request's whole block table"
        )
    ids = ids[:need]
    bad = np.flatnonzero((ids < 0) | (ids >= layout.num_blocks))
    if bad.size:
        i = int(bad[0])
        raise KVortexError(
            f"block_ids[{i}] = {int(ids[i])} is not a block id in [0, {layout.num_blocks}) of the "
            "registered KV cache"
        )
    return ids.tolist()


def _check_rank(rank: Any, world_size: Any) -> None:
    """KVortexError unless ``world_size >= 1`` and ``0 <= rank < world_size`` are ints."""
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise KVortexError(f"{name}={value!r} must be an int (the tensor-parallel {name} of this process)")
    if world_size < 1:
        raise KVortexError(f"world_size={world_size} must be >= 1 (the tensor-parallel size; 1 on one GPU)")
    if not 0 <= rank < world_size:
        raise KVortexError(f"rank={rank} must be in [0, world_size={world_size}); pass this process's "
                           "tensor-parallel rank")


def _cuda_index(kv_caches: Any) -> int | None:
    """The CUDA device index of the registered tensors (None on CPU)."""
    import torch

    first = kv_caches if isinstance(kv_caches, torch.Tensor) else next(
        iter(kv_caches.values() if isinstance(kv_caches, Mapping) else kv_caches))
    return first.device.index if first.device.type == "cuda" else None


def _shapes(kv_caches: Any) -> list[tuple[Any, ...]]:
    import torch

    if isinstance(kv_caches, torch.Tensor):
        return [tuple(kv_caches.shape)]
    values = kv_caches.values() if isinstance(kv_caches, Mapping) else kv_caches
    return [tuple(t.shape) for t in values]

