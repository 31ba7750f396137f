"""KVortex connector for vLLM. Importing this package does not import vLLM."""

from __future__ import annotations

__version__ = "0.1.0"
