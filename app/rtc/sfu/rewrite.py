"""The header arithmetic of forwarding: one outgoing stream's sequence numbers and timestamps, kept continuous
whatever happens upstream (a publisher that reconnects starts a new SSRC with random numbers; packets held back
until a keyframe leave a hole). Pure and synchronous: the packet path calls it once per forwarded packet.
"""

from __future__ import annotations

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32
_SEQ_HALF = SEQ_MOD >> 1
_TS_HALF = TS_MOD >> 1
# a late packet older than the current epoch's first one is dropped (it belongs to what came before the switch);
# past this many packets into an epoch the comparison with its first one would wrap, so it is no longer made
_EPOCH_GUARD = 1 << 14


def seq_newer(a: int, b: int) -> bool:
    """a comes after b in 16-bit sequence space (RFC 3550 wraparound)."""
    return a != b and ((a - b) & 0xFFFF) < _SEQ_HALF


def ts_newer(a: int, b: int) -> bool:
    """a comes after b in 32-bit timestamp space."""
    return a != b and ((a - b) & 0xFFFFFFFF) < _TS_HALF


class StreamRewriter:
    """Maps (ssrc, sequence number, timestamp) of whichever source feeds an outgoing stream to that stream's own
    numbering. Within one epoch (a source, continuous) the mapping is a constant offset, so reordering and
    retransmissions keep their relative positions. A new epoch starts when the source's SSRC changes or after
    `resync()`: its first packet follows the last one sent (sequence + 1, timestamp + the wall-clock time since,
    in the codec's clock), so the receiver sees one continuous stream with no gap to ask retransmission for."""

    __slots__ = (
        "_start_seq",
        "_start_ts",
        "clock_rate",
        "epoch_fresh",
        "epoch_seq",
        "last_ms",
        "last_seq",
        "last_ts",
        "resync_pending",
        "retired",
        "seq_offset",
        "source",
        "ts_offset",
    )

    def __init__(self, clock_rate: int, start_seq: int, start_ts: int) -> None:
        self.clock_rate = clock_rate
        self.source: int | None = None  # the SSRC of the epoch
        self.retired: int | None = None  # the SSRC before it: its stragglers are dropped, not taken for a switch
        self.resync_pending = False
        self.seq_offset = 0
        self.ts_offset = 0
        self.epoch_seq = 0  # the incoming sequence number the epoch started at
        self.epoch_fresh = True  # still young enough to compare sequence numbers with epoch_seq
        self.last_seq: int | None = None  # the newest outgoing sequence number / timestamp, and when it went out
        self.last_ts = 0
        self.last_ms = 0
        self._start_seq = start_seq & 0xFFFF
        self._start_ts = start_ts & 0xFFFFFFFF

    def resync(self) -> None:
        """The next packet forwarded starts a new epoch (packets were skipped: no hole must show downstream)."""
        self.resync_pending = True

    def rewrite(self, ssrc: int, seq: int, ts: int, now_ms: int) -> tuple[int, int] | None:
        """The outgoing (sequence number, timestamp) for this incoming packet, or None to drop it."""
        if ssrc != self.source or self.resync_pending:
            if ssrc == self.retired:
                return None
            self._anchor(ssrc, seq, ts, now_ms)
        elif self.epoch_fresh:
            delta = (seq - self.epoch_seq) & 0xFFFF
            if delta >= _SEQ_HALF:  # from before this epoch began
                return None
            if delta >= _EPOCH_GUARD:
                self.epoch_fresh = False
        out_seq = (seq + self.seq_offset) & 0xFFFF
        out_ts = (ts + self.ts_offset) & 0xFFFFFFFF
        last = self.last_seq
        if last is None or seq_newer(out_seq, last):
            self.last_seq = out_seq
            self.last_ms = now_ms
            if ts_newer(out_ts, self.last_ts):
                self.last_ts = out_ts
        return out_seq, out_ts

    def _anchor(self, ssrc: int, seq: int, ts: int, now_ms: int) -> None:
        if self.last_seq is None:
            out_seq, out_ts = self._start_seq, self._start_ts
        else:
            out_seq = (self.last_seq + 1) & 0xFFFF
            # at least one tick, so the receiver never sees two frames with one timestamp
            elapsed = max(1, (now_ms - self.last_ms) * self.clock_rate // 1000)
            out_ts = (self.last_ts + elapsed) & 0xFFFFFFFF
        if self.source is not None and ssrc != self.source:
            self.retired = self.source
        self.source = ssrc
        self.resync_pending = False
        self.seq_offset = (out_seq - seq) & 0xFFFF
        self.ts_offset = (out_ts - ts) & 0xFFFFFFFF
        self.epoch_seq = seq
        self.epoch_fresh = True
        # force the first packet of the epoch to count as the newest (its timestamp may be "older" in raw terms)
        self.last_seq = (out_seq - 1) & 0xFFFF
        self.last_ts = (out_ts - 1) & 0xFFFFFFFF

    def to_incoming_seq(self, out_seq: int) -> int | None:
        """The current source's sequence number behind an outgoing one (to relay a NACK upstream), or None when
        it was sent before this epoch."""
        if self.source is None or self.last_seq is None:
            return None
        seq = (out_seq - self.seq_offset) & 0xFFFF
        if self.epoch_fresh and ((seq - self.epoch_seq) & 0xFFFF) >= _SEQ_HALF:
            return None
        return seq
