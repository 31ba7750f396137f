"""How many evenly spaced groups of layers ("runs") separate per-layer allocations form.

``python3 tests/gpu/runs_probe.py``: allocates the benchmark's per-layer caches (Llama-3.1-8B and
DeepSeek-V3 MLA, as ``kvortex bench transfer`` does at 8K-32K) and vLLM-style per-layer int8
buffers, and prints the address steps between layers and the run split of ``rows._runs``.
"""

from __future__ import annotations

import itertools

import torch
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.data.rows import _runs


def report(label: str, tensors: list[torch.Tensor]) -> None:
    ptrs = [t.data_ptr() for t in tensors]
    runs = _runs(ptrs)
    steps = sorted({b - a for a, b in itertools.pairwise(ptrs)})
    print(f"{label}: {len(tensors)} layers, {len(runs)} runs {[(a, b) for a, b, _ in runs][:12]}, "
          f"distinct steps (MiB) {[round(s / 2**20, 3) for s in steps][:8]}", flush=True)


def main() -> None:
    device = torch.device("cuda")
    for max_tokens in (32768, 65536):
        for shape in (tp.LLAMA_8B, tp.DEEPSEEK_V3):
            caches = tp.make_caches(shape, 2 * max_tokens // shape.block, device)
            report(f"bench {shape.name} max {max_tokens}", caches)
            del caches
            torch.cuda.empty_cache()
    for gib in (0.5, 1.0):
        bufs = [torch.zeros(int(gib * 2**30), dtype=torch.int8, device=device) for _ in range(61)]
        report(f"vllm-style int8 zeros {gib} GiB x 61", bufs)
        del bufs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
