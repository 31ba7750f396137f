"""Synthetic request traces: multi-turn chat, long-document QA, and a Zipf-skewed mix.

A trace is a list of :class:`Request` sorted by timestamp. Each request carries either token
ids (synthetic traces, JSONL token traces) or per-block hash ids (Mooncake-style traces). All
generators are seeded with ``numpy.random.default_rng(seed)``: the same seed gives the same
trace on every machine. Token ids of distinct segments are drawn at random from a 128K vocab,
so two segments share KV only where the generator reuses them on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

VOCAB = 128_000


@dataclass
class Request:
    """One prompt: token ids, or hash ids of fixed-size blocks (``block_tokens`` each)."""

    timestamp: float
    tokens: np.ndarray | None = None
    block_hashes: list[int] | None = None
    block_tokens: int = 0
    num_tokens: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if not self.num_tokens:
            if self.tokens is not None:
                self.num_tokens = len(self.tokens)
            elif self.block_hashes is not None:
                self.num_tokens = len(self.block_hashes) * self.block_tokens


def _segment(rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    n = int(rng.integers(lo, hi + 1))
    return rng.integers(0, VOCAB, size=n, dtype=np.uint32)


def _zipf_ranks(rng: np.random.Generator, n_items: int, size: int, a: float) -> np.ndarray:
    """``size`` draws of item indices 0..n_items-1 with P(rank k) ~ 1/k^a (a may be <= 1)."""
    weights = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** a
    return rng.choice(n_items, size=size, p=weights / weights.sum())


def chat_sessions(
    seed: int = 0,
    *,
    sessions: int = 150,
    system_prompts: int = 6,
    system_tokens: tuple[int, int] = (1024, 4096),
    turns: tuple[int, int] = (2, 12),
    user_tokens: tuple[int, int] = (40, 400),
    reply_tokens: tuple[int, int] = (100, 600),
    arrival_s: float = 2.0,
    think_s: float = 30.0,
) -> list[Request]:
    """Multi-turn chats: shared system prompts, each turn resends the growing history."""
    rng = np.random.default_rng(seed)
    prompts = [_segment(rng, *system_tokens) for _ in range(system_prompts)]
    out: list[Request] = []
    start = 0.0
    for s in range(sessions):
        start += float(rng.exponential(arrival_s))
        history = [prompts[int(rng.integers(system_prompts))]]
        t = start
        for _ in range(int(rng.integers(turns[0], turns[1] + 1))):
            history.append(_segment(rng, *user_tokens))
            out.append(Request(t, np.concatenate(history), label=f"chat{s}"))
            history.append(_segment(rng, *reply_tokens))
            t += float(rng.exponential(think_s))
    return _sorted(out)


def document_qa(
    seed: int = 0,
    *,
    documents: int = 40,
    requests: int = 500,
    doc_tokens: tuple[int, int] = (4096, 16384),
    question_tokens: tuple[int, int] = (20, 200),
    instruction_tokens: int = 300,
    zipf_a: float = 1.0,
    arrival_s: float = 1.0,
) -> list[Request]:
    """Questions about long documents; popular documents are asked about again and again."""
    rng = np.random.default_rng(seed)
    instruction = rng.integers(0, VOCAB, size=instruction_tokens, dtype=np.uint32)
    docs = [_segment(rng, *doc_tokens) for _ in range(documents)]
    picks = _zipf_ranks(rng, documents, requests, zipf_a)
    out, t = [], 0.0
    for i, d in enumerate(picks):
        t += float(rng.exponential(arrival_s))
        tokens = np.concatenate([instruction, docs[int(d)], _segment(rng, *question_tokens)])
        out.append(Request(t, tokens, label=f"doc{int(d)}/{i}"))
    return out


def zipf_mix(
    seed: int = 0,
    *,
    requests: int = 1200,
    contexts: int = 200,
    context_tokens: tuple[int, int] = (512, 8192),
    suffix_tokens: tuple[int, int] = (50, 500),
    one_off_fraction: float = 0.3,
    one_off_tokens: tuple[int, int] = (512, 6144),
    zipf_a: float = 0.9,
    arrival_s: float = 0.5,
) -> list[Request]:
    """Shared contexts with Zipf popularity plus one-off prompts that are never reused.

    The one-off prompts are the scan traffic that pushes a recency-only cache to throw out
    popular contexts; a good policy keeps the popular heads.
    """
    rng = np.random.default_rng(seed)
    ctx = [_segment(rng, *context_tokens) for _ in range(contexts)]
    picks = _zipf_ranks(rng, contexts, requests, zipf_a)
    one_off = rng.random(requests) < one_off_fraction
    out, t = [], 0.0
    for i in range(requests):
        t += float(rng.exponential(arrival_s))
        if one_off[i]:
            out.append(Request(t, _segment(rng, *one_off_tokens), label=f"once/{i}"))
        else:
            c = int(picks[i])
            tokens = np.concatenate([ctx[c], _segment(rng, *suffix_tokens)])
            out.append(Request(t, tokens, label=f"ctx{c}/{i}"))
    return out


def _sorted(requests: Sequence[Request]) -> list[Request]:
    return sorted(requests, key=lambda r: r.timestamp)


#: Workload names accepted by ``kvortex bench simulate --workload``.
WORKLOADS: dict[str, Callable[[int], list[Request]]] = {
    "chat": chat_sessions,
    "docqa": document_qa,
    "zipf": zipf_mix,
}
