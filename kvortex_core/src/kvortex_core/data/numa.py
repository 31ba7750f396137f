"""NUMA placement of the host pool: find the GPU's node, put the pool's pages on it.

On a multi-socket host a GPU hangs off one socket's PCIe root; DMA from memory on the other
socket crosses the inter-socket link, which costs bandwidth and latency. The node comes from
sysfs (``/sys/bus/pci/devices/<bus id>/numa_node``). Pages are placed with libnuma
(``numa_tonode_memory``, an ``mbind``) when the library is present, else by running the first
touch (``cudaHostRegister`` faults every page in) on the node's CPUs via
``os.sched_setaffinity``: Linux places a page on the node of the CPU that first touches it.
On a single-node host (or without sysfs) everything here is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

_SYS_NODES = Path("/sys/devices/system/node")
_SYS_PCI = Path("/sys/bus/pci/devices")


def parse_cpulist(text: str) -> set[int]:
    """``"0-3,8,10-11"`` -> ``{0, 1, 2, 3, 8, 10, 11}``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def num_nodes() -> int:
    """NUMA nodes of this host (1 when sysfs says nothing)."""
    try:
        return max(1, sum(1 for p in _SYS_NODES.glob("node[0-9]*")))
    except OSError:
        return 1


def node_cpus(node: int) -> set[int]:
    """The CPUs of ``node`` (empty when unknown)."""
    try:
        return parse_cpulist((_SYS_NODES / f"node{node}" / "cpulist").read_text())
    except OSError:
        return set()


def pci_numa_node(bus_id: str) -> int | None:
    """The node of a PCI device (``"0000:1b:00.0"``); None when unknown or not NUMA."""
    try:
        node = int((_SYS_PCI / bus_id.lower() / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def gpu_bus_id(device: int) -> str | None:
    """The PCI bus id of CUDA ``device`` (``"0000:1b:00.0"``), or None without CUDA."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device)
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except Exception:  # noqa: BLE001 - no CUDA, old torch: placement is best effort
        return None


def gpu_numa_node(device: int) -> int | None:
    """The NUMA node the GPU ``device`` is attached to, None when unknown or single-node."""
    bus_id = gpu_bus_id(device)
    if bus_id is None or num_nodes() < 2:
        return None
    return pci_numa_node(bus_id)


@cache
def _libnuma() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("numa")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        if lib.numa_available() < 0:
            return None
        lib.numa_tonode_memory.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.numa_tonode_memory.restype = None
        return lib
    except (OSError, AttributeError):
        return None


def bind_memory(ptr: int, size: int, node: int) -> bool:
    """Bind ``[ptr, ptr+size)`` to ``node`` with libnuma before first touch; False if no libnuma."""
    lib = _libnuma()
    if lib is None:
        return False
    lib.numa_tonode_memory(ctypes.c_void_p(ptr), ctypes.c_size_t(size), ctypes.c_int(node))
    return True


@contextmanager
def run_on_node(node: int | None) -> Iterator[bool]:
    """Run the body on ``node``'s CPUs (restoring the affinity after); yields whether it did."""
    cpus = node_cpus(node) if node is not None else set()
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield False
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a cgroup may forbid those CPUs
        log.info("cannot run on NUMA node %s CPUs: %s", node, exc)
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setaffinity(0, before)
