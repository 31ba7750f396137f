"""Host-side cost of each step of a save/load on this machine (us, median of 50).

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/host_costs.py
"""

from __future__ import annotations

import time

import torch

from kvortex_core import engine as E
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.control.keys import rank_keys
from kvortex_core.data.layouts import detect_layout


def t(name, fn, n=50):
    fn()
    ts = []
    for _ in range(n):
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    print(f"{name:34s} {sorted(ts)[n // 2] * 1e6:8.1f} us", flush=True)


def main() -> None:
    dev = torch.device("cuda")
    tokens = 8192
    caches = tp.make_caches(tp.LLAMA_8B, 2 * tokens // 16, dev, unified=True)
    layout = detect_layout(caches)
    eng = make_engine(caches, layout, tokens, 64 << 20, None)
    reg = eng._reg
    te = reg.transfer
    chunks = tp.random_chunks(layout.num_blocks, tokens, 16, 256, 1)
    blocks = [b for c in chunks for b in c]
    seq = _sequence(tokens, 3)
    s = torch.cuda.Stream()
    small = [list(c) for c in chunks]
    host = torch.tensor(small, dtype=torch.int64)
    pinned = host.pin_memory()
    x = torch.empty(1, device=dev)
    t("empty launch (x.add_(1))", lambda: x.add_(1))
    t("stream context enter/exit", lambda: torch.cuda.stream(s).__enter__() and None)
    def ctx():
        with torch.cuda.stream(s):
            pass
    t("with torch.cuda.stream(s)", ctx)
    t("torch.cuda.Event()+record", lambda: torch.cuda.Event().record(s))
    t("torch.tensor(32x16 list)", lambda: torch.tensor(small, dtype=torch.int64))
    t("pin_memory(32x16)", lambda: host.pin_memory())
    t("to(cuda, non_blocking)", lambda: pinned.to(dev, non_blocking=True))
    t("te._index_tensors", lambda: te._index_tensors(small, te._save.streams))
    arr = E._tokens(seq)
    t("_tokens(list)", lambda: E._tokens(seq))
    t("_blocks", lambda: E._blocks(blocks, tokens, layout))
    t("hasher.keys", lambda: reg.hasher.keys(arr))
    keys = rank_keys(reg.hasher.keys(arr), 0)
    bufs = [reg.tiers._payload_view(i) for i in range(32)]
    t("te._check", lambda: te._check(small, bufs, "x"))
    t("te._units (cached)", lambda: te._units(small, range(32), layer_major=False))

    def bs():
        leases = reg.tiers.begin_save(keys)
        reg.tiers.abort_save(leases)
    t("begin_save+abort", bs)
    eng.save(seq, blocks)
    eng.contains(keys)

    def bl():
        leases = reg.tiers.begin_load(keys, timeout=5)
        reg.tiers.end_load(leases)
    t("begin_load+end", bl)
    t("lookup", lambda: eng.lookup(seq))
    ev = torch.cuda.Event()
    ev.record()
    torch.cuda.synchronize()
    from kvortex_core.data.streams import _WAITER, event_wait
    t("event_wait(done, timeout)", lambda: event_wait(ev, 5.0, "x"))

    def waiter_roundtrip():
        e = torch.cuda.Event()
        torch.cuda._sleep(20000)
        e.record()
        _WAITER.wait(e, 5.0)
    t("waiter round trip after 20k-cycle sleep", waiter_roundtrip, 20)

    def sync_roundtrip():
        e = torch.cuda.Event()
        torch.cuda._sleep(20000)
        e.record()
        e.synchronize()
    t("synchronize after 20k-cycle sleep", sync_roundtrip, 20)
    eng.close()


if __name__ == "__main__":
    main()
