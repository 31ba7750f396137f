"""Test-only vLLM platform plugin: resolve to vLLM's CPU platform when no GPU is present.

The PyPI vLLM wheel is a CUDA build, so on a CPU-only machine its platform detection ends at
"unspecified" and the scheduler cannot be built. vLLM calls every function registered under
the ``vllm.platform_plugins`` entry-point group; returning the qualified name of
``CpuPlatform`` activates it. On a machine with CUDA this returns None and changes nothing.
"""

from __future__ import annotations


def cpu_platform() -> str | None:
    """The CPU platform's qualified name, unless a CUDA device is available."""
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:  # pragma: no cover - vLLM always has torch
        return None
    return "vllm.platforms.cpu.CpuPlatform"
