"""Hit-rate simulation of the control plane: trace generators, a JSONL loader, the simulator.

The simulator imports the real :mod:`kvortex_core.control` code lazily (``simulator`` module),
so generating or loading traces needs only numpy.
"""

from __future__ import annotations

from kvortex_core.sim.loader import TraceError, load_jsonl
from kvortex_core.sim.trace import WORKLOADS, Request, chat_sessions, document_qa, zipf_mix

__all__ = [
    "WORKLOADS",
    "Request",
    "TraceError",
    "chat_sessions",
    "document_qa",
    "load_jsonl",
    "zipf_mix",
]
