"""Names of the tiering counters (each recorded per tier in :class:`~kvortex_core.control.stats.Stats`)."""

from __future__ import annotations

BYTES_WRITTEN = "tier_bytes_written"
BYTES_READ = "tier_bytes_read"
CHECKSUM_FAILURES = "checksum_failures"
WRITE_BEHIND_SKIPPED = "write_behind_skipped"
SAVE_SKIPPED = "save_skipped_pool_full"
#: Connector saves not made because a timed-out lower-tier read may still write their slot.
SAVE_SKIPPED_SLOT_BUSY = "save_skipped_slot_busy"
#: Connector chunks computed over a failed load's blocks: not saved, or dropped where stored.
CHUNKS_DROPPED = "chunks_dropped_after_failed_load"
#: vLLM blocks a failed load left with garbage that vLLM's prefix cache then handed to a request
#: as computed (its loader preempted or aborted before recomputing them): reported to vLLM as
#: failed loads, so it rolls that request back and recomputes them.
STALE_BLOCKS_REPORTED = "stale_blocks_reported"
#: The vLLM scheduler's looks at a local tier's files given up on (a stat that did not return
#: within ``timeouts.remote_lookup_s``: a hung mount); the chunks counted as not stored.
FILE_CHECKS_GIVEN_UP = "file_checks_given_up"
PROMOTIONS = "promotions"
DEMOTIONS = "demotions"
DEMOTIONS_SKIPPED = "demotions_skipped"
BREAKER_TRANSITIONS = "breaker_transitions"
LOAD_MISSES = "load_misses"
TIER_ERRORS = "tier_errors"
TIER_TIMEOUTS = "tier_timeouts"
#: Writes the store refused for want of room (a full Redis with ``noeviction``): the tier
#: answered, so no breaker failure, but the value was not stored.
TIER_WRITES_REFUSED = "tier_writes_refused"
TIER_CALLS_SKIPPED = "tier_calls_skipped"
TIER_IN_SERVICE = "tier_in_service"  # a gauge: 1 = breaker closed
BREAKER_STATE = "breaker_state"  # a gauge: 0 closed, 1 open, 2 half-open
#: A gauge: writes that timed out and still run (each holds a cpu slot until it ends).
TIER_LATE_WRITES = "tier_late_writes"
#: Histogram of one lower-tier operation's latency, per tier (``op``: get, put, delete, contains).
TIER_OP_SECONDS = "tier_{op}"  # served as kvortex_tier_<op>_seconds

#: Counters each lower tier starts at zero (``Stats.declare``: a scrape shows them before their
#: first event), and its operation histograms.
LOWER_TIER_COUNTERS = (BYTES_WRITTEN, BYTES_READ, CHECKSUM_FAILURES, WRITE_BEHIND_SKIPPED, PROMOTIONS,
                       DEMOTIONS, DEMOTIONS_SKIPPED, BREAKER_TRANSITIONS, LOAD_MISSES, TIER_ERRORS,
                       TIER_TIMEOUTS, TIER_WRITES_REFUSED, TIER_CALLS_SKIPPED)
LOWER_TIER_HISTOGRAMS = tuple(TIER_OP_SECONDS.format(op=op) for op in ("get", "put", "delete", "contains", "open"))
