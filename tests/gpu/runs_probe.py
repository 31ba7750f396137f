"""How many evenly spaced groups of layers ("runs") separate per-layer allocations form.

``python3 tests/gpu/runs_probe.py``: allocates the benchmark's per-layer caches (Llama-3.1-8B and
DeepSeek-V3 MLA, as ``kvortex bench transfer`` does at 8K-32K) and vLLM-style per-layer int8
buffers, and prints the address steps between layers and the run split of ``rows._runs``.
"""

from __future__ import annotations

import itertools

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.rows import _runs
from kvortex_core.data.transfer import TransferEngine


def report(label: str, tensors: list[torch.Tensor]) -> None:
    ptrs = [t.data_ptr() for t in tensors]
    runs = _runs(ptrs)
    steps = sorted({b - a for a, b in itertools.pairwise(ptrs)})
    print(f"{label}: {len(tensors)} layers, {len(runs)} runs {[(a, b) for a, b, _ in runs][:12]}, "
          f"distinct steps (MiB) {[round(s / 2**20, 3) for s in steps][:8]}", flush=True)


def gather_mode(tensors: list[torch.Tensor]) -> str:
    """The plan "auto" picks for these layers (int8 buffers: viewed as MLA ``[B, 64, 576]`` bf16)."""
    if tensors[0].dtype == torch.int8:
        page = 64 * 576 * 2
        tensors = [t[: t.numel() // page * page].view(torch.bfloat16).view(-1, 64, 576) for t in tensors]
    te = TransferEngine(tensors, detect_layout(tensors), chunk_tokens=256, staging_bytes=64 << 20)
    runs = [(r.first, r.end, r.reversed) for r in te._strided.runs] if te._strided is not None else None
    mode = f"{te.gather_mode} runs={runs}"
    if te._rows is not None:
        mode += f" row_bytes={te._rows.row_bytes} step_bytes={te._rows.alias.stride(0) * te._rows.alias.element_size()}"
    te.close()
    return mode


def main() -> None:
    device = torch.device("cuda")
    for max_tokens in (8192, 32768, 65536):
        for shape in (tp.LLAMA_8B, tp.DEEPSEEK_V3):
            caches = tp.make_caches(shape, 2 * max_tokens // shape.block, device)
            report(f"bench {shape.name} max {max_tokens}", caches)
            print("  gather auto:", gather_mode(caches), flush=True)
            del caches
            torch.cuda.empty_cache()
    for gib in (0.5, 1.0):
        bufs = [torch.zeros(int(gib * 2**30), dtype=torch.int8, device=device) for _ in range(61)]
        report(f"vllm-style int8 zeros {gib} GiB x 61", bufs)
        print("  gather auto:", gather_mode(bufs), flush=True)
        del bufs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
