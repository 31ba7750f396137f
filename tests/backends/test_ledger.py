"""The write ledger of the shared tiers: what a miss may forget, and what it must not."""

from __future__ import annotations

from kvortex_backends.ledger import WriteLedger


def test_a_miss_never_forgets_a_write_still_running_or_landed_after_the_read_was_sent() -> None:
    ledger = WriteLedger("redis", capacity=1000)
    before = ledger.stamp()
    put = ledger.reserve("k", 100)
    ledger.forget_missing(["k"], ledger.stamp())  # a read sent while the write runs
    assert ledger.used == 100 and "k" in ledger
    sent = ledger.stamp()
    ledger.landed(put)
    ledger.forget_missing(["k"], sent)  # sent before the write landed: it may have looked early
    ledger.forget_missing(["k"], before)
    assert ledger.used == 100
    ledger.forget_missing(["k"], ledger.stamp())  # sent after it landed: really gone
    assert ledger.used == 0 and "k" not in ledger


def test_a_landing_does_not_revive_a_charge_replaced_or_forgotten_meanwhile() -> None:
    ledger = WriteLedger("s3", capacity=1000)
    first = ledger.reserve("k", 100)
    second = ledger.reserve("k", 300)  # written again before the first landed
    ledger.landed(first)
    assert ledger.used == 300
    ledger.landed(second)
    ledger.forget(["k"])  # deleted
    ledger.landed(second)
    assert ledger.used == 0 and "k" not in ledger


def test_a_failed_rewrite_leaves_the_earlier_write_forgettable() -> None:
    """A write timed out and still running, a second write of the key fails: the ledger keeps
    the first one's charge, no longer pending (a pending entry is never forgotten by a miss,
    so its charge would stay for good once the value was gone)."""
    ledger = WriteLedger("s3", capacity=1000)
    first = ledger.reserve("k", 100)
    second = ledger.reserve("k", 100)
    ledger.landed(first)  # the late first write lands: replaced meanwhile, nothing to mark
    ledger.rollback(second)
    assert ledger.used == 100
    ledger.forget_missing(["k"], ledger.stamp())  # later found gone
    assert ledger.used == 0
