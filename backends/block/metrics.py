"""Counters of one vbd (Blkback.stats): what a `top`-like view or a test reads."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class BlkStats:
    rd_reqs: int = 0              # READ requests completed OKAY
    wr_reqs: int = 0              # WRITE (and WRITE_BARRIER) requests completed OKAY
    rd_sectors: int = 0
    wr_sectors: int = 0
    flushes: int = 0              # FLUSH_DISKCACHE and barrier fdatasyncs
    discards: int = 0             # DISCARD requests completed OKAY
    discard_sectors: int = 0
    errors: int = 0               # requests answered BLKIF_RSP_ERROR
    bad_requests: int = 0         # of which: malformed / hostile (validation failed)
    bad_grants: int = 0           # of which: a segment grant could not be mapped
    ro_rejects: int = 0           # of which: a write to a read-only vbd
    io_errors: int = 0            # of which: the host I/O failed (errno)
    unsupported: int = 0          # requests answered BLKIF_RSP_EOPNOTSUPP
    batches: int = 0              # ring drains that found work
    yield_passes: int = 0         # passes run at the domain's slice ends (Domain.yield_drains)
    notifies: int = 0             # the frontend's notifications of past connections
    jobs: int = 0                 # thread-pool jobs submitted
    events_sent: int = 0          # notifications to the frontend (one per batch at most)
    max_inflight: int = 0
    bad_indices: int = 0          # ring-index violations (the device was disconnected)
    persistent_grants: int = 0    # grants mapped persistently now (feature-persistent)
    persistent_hits: int = 0      # segments served by an already mapped persistent grant
    persistent_purged: int = 0    # persistent grants unmapped by the LRU purge (bound, unused 60 s)
    indirect_reqs: int = 0        # BLKIF_OP_INDIRECT requests accepted
    uring_reqs: int = 0           # reads/writes submitted through io_uring (not the pool)
    io_ns: int = 0                # time spent in preadv/pwritev/fdatasync (all workers)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
