"""Load request traces from JSONL files: token-id lists or per-block hash ids.

One JSON value per line, any of:

- ``[1, 2, 3, ...]``: the prompt's token ids;
- ``{"tokens": [...]}`` (or ``"token_ids"``), optional ``"timestamp"``;
- ``{"hash_ids": [...]}`` (or ``"block_hashes"``), optional ``"timestamp"`` and
  ``"input_length"``: the public Mooncake traces, where each id names one block of
  ``block_tokens`` tokens (512 there) and equal ids mean equal prefixes.

Requests are returned sorted by timestamp (stable, so lines without one keep file order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvortex_core.errors import KVortexError
from kvortex_core.sim.trace import Request

_TOKEN_FIELDS = ("tokens", "token_ids", "prompt_token_ids")
_HASH_FIELDS = ("hash_ids", "block_hashes")
MOONCAKE_BLOCK_TOKENS = 512


class TraceError(KVortexError, ValueError):
    """A trace file line is not a request this loader understands."""


def load_jsonl(
    path: str | Path, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS, limit: int | None = None
) -> list[Request]:
    """Read ``path`` (see the module docstring for the accepted lines)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace file {str(path)!r}: {exc}") from None
    out: list[Request] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(
                f"{path}:{lineno}: not JSON ({exc.msg}); one request per line"
            ) from None
        out.append(
            parse_request(
                value,
                block_tokens=block_tokens,
                where=f"{path}:{lineno}",
                default_ts=float(len(out)),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return sorted(out, key=lambda r: r.timestamp)


def parse_request(
    value: Any,
    *,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    where: str = "",
    default_ts: float = 0.0,
) -> Request:
    """One decoded JSON line as a :class:`Request`."""
    if isinstance(value, list):
        return Request(default_ts, _ids(value, where, "token ids"))
    if not isinstance(value, dict):
        raise TraceError(
            f"{where}: expected a list of token ids or an object, got {type(value).__name__}"
        )
    ts = float(value.get("timestamp", default_ts))
    for name in _TOKEN_FIELDS:
        if name in value:
            return Request(ts, _ids(value[name], where, name))
    for name in _HASH_FIELDS:
        if name in value:
            hashes = [int(h) for h in _ids(value[name], where, name)]
            n_tokens = int(value.get("input_length") or len(hashes) * block_tokens)
            return Request(ts, block_hashes=hashes, block_tokens=block_tokens, num_tokens=n_tokens)
    raise TraceError(
        f"{where}: no token or block-hash field; expected one of "
        f"{', '.join(_TOKEN_FIELDS + _HASH_FIELDS)}, got keys {sorted(value)}"
    )


def _ids(value: Any, where: str, name: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise TraceError(f"{where}: {name!r} must be a list of non-negative integers")
    try:
        return np.asarray(value, dtype=np.uint32)
    except OverflowError:
        raise TraceError(f"{where}: {name!r} holds ids above 2**32-1") from None
