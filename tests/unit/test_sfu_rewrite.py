"""The SFU's header arithmetic (app/rtc/sfu/rewrite.py) and keyframe recognition (app/rtc/sfu/forward.py)."""

from __future__ import annotations

from app.rtc.sfu.forward import h264_keyframe_start, vp8_keyframe_start
from app.rtc.sfu.rewrite import StreamRewriter, seq_newer, ts_newer

VIDEO = 90000
FRAME = 3000  # 30 fps in a 90 kHz clock


def test_wraparound_comparisons() -> None:
    assert seq_newer(0, 0xFFFF)
    assert not seq_newer(0xFFFF, 0)
    assert seq_newer(5, 0xFFF0)
    assert seq_newer(0x8000 - 1, 0)
    assert not seq_newer(0x8000 + 1, 0)
    assert ts_newer(10, 0xFFFFFF00)
    assert not ts_newer(0xFFFFFF00, 10)
    assert not seq_newer(7, 7)
    assert not ts_newer(7, 7)


def test_the_first_packet_takes_the_streams_own_start_and_the_rest_keep_their_spacing() -> None:
    r = StreamRewriter(VIDEO, start_seq=1000, start_ts=5_000_000)
    assert r.rewrite(0xAAAA, 40000, 123456, now_ms=0) == (1000, 5_000_000)
    assert r.rewrite(0xAAAA, 40001, 123456, now_ms=1) == (1001, 5_000_000)
    assert r.rewrite(0xAAAA, 40002, 123456 + FRAME, now_ms=33) == (1002, 5_000_000 + FRAME)
    # reordering and a retransmission keep their place
    assert r.rewrite(0xAAAA, 40004, 123456 + 2 * FRAME, now_ms=66) == (1004, 5_000_000 + 2 * FRAME)
    assert r.rewrite(0xAAAA, 40003, 123456 + FRAME, now_ms=67) == (1003, 5_000_000 + FRAME)
    assert r.rewrite(0xAAAA, 40002, 123456 + FRAME, now_ms=90) == (1002, 5_000_000 + FRAME)
    assert r.last_seq == 1004


def test_incoming_wraparound_at_2_16_and_2_32_passes_through() -> None:
    r = StreamRewriter(VIDEO, start_seq=100, start_ts=200)
    ts = 0xFFFFFFFF - FRAME // 2
    assert r.rewrite(1, 0xFFFE, ts, now_ms=0) == (100, 200)
    assert r.rewrite(1, 0xFFFF, ts, now_ms=0) == (101, 200)
    assert r.rewrite(1, 0x0000, (ts + FRAME) & 0xFFFFFFFF, now_ms=33) == (102, 200 + FRAME)
    assert r.rewrite(1, 0x0001, (ts + 2 * FRAME) & 0xFFFFFFFF, now_ms=66) == (103, 200 + 2 * FRAME)


def test_outgoing_wraparound_at_2_16_and_2_32() -> None:
    r = StreamRewriter(VIDEO, start_seq=0xFFFE, start_ts=0xFFFFFFFF - 1000)
    assert r.rewrite(9, 10, 50, now_ms=0) == (0xFFFE, 0xFFFFFFFF - 1000)
    assert r.rewrite(9, 11, 50 + FRAME, now_ms=33) == (0xFFFF, (0xFFFFFFFF - 1000 + FRAME) & 0xFFFFFFFF)
    assert r.rewrite(9, 12, 50 + 2 * FRAME, now_ms=66) == (0, (0xFFFFFFFF - 1000 + 2 * FRAME) & 0xFFFFFFFF)
    assert r.last_seq == 0
    assert r.last_ts == (0xFFFFFFFF - 1000 + 2 * FRAME) & 0xFFFFFFFF


def test_a_publishers_reconnect_continues_the_numbering_without_a_hole() -> None:
    r = StreamRewriter(VIDEO, start_seq=0xFFFD, start_ts=0xFFFFF000)
    for i in range(3):  # the old source: out 0xFFFD, 0xFFFE, 0xFFFF
        r.rewrite(0x1111, 500 + i, 7000 + i * FRAME, now_ms=i * 33)
    last_ts = r.last_ts
    # the new connection: new SSRC, its own random numbers, 500 ms later
    first = r.rewrite(0x2222, 31000, 99_000_000, now_ms=2 * 33 + 500)
    assert first == (0x0000, (last_ts + 500 * VIDEO // 1000) & 0xFFFFFFFF)
    assert r.rewrite(0x2222, 31001, 99_000_000 + FRAME, now_ms=2 * 33 + 533) == (
        0x0001, (last_ts + 500 * VIDEO // 1000 + FRAME) & 0xFFFFFFFF)
    # a straggler of the old connection is dropped, not taken for another switch
    assert r.rewrite(0x1111, 503, 7000 + 3 * FRAME, now_ms=600) is None
    assert r.source == 0x2222
    # and a packet of the new source from before its first forwarded one (held back) is dropped too
    assert r.rewrite(0x2222, 30999, 99_000_000 - FRAME, now_ms=601) is None


def test_a_switch_advances_the_timestamp_at_least_one_tick() -> None:
    r = StreamRewriter(48000, start_seq=0, start_ts=0)
    r.rewrite(1, 10, 960, now_ms=1000)
    assert r.rewrite(2, 77, 5, now_ms=1000) == (1, 1)


def test_packets_held_back_leave_no_hole_after_resync() -> None:
    r = StreamRewriter(VIDEO, start_seq=10, start_ts=0)
    assert r.rewrite(5, 100, 0, now_ms=0) == (10, 0)
    r.resync()  # packets 101..149 were skipped (waiting for a keyframe)
    assert r.rewrite(5, 150, 50 * FRAME, now_ms=1650) == (11, 1650 * VIDEO // 1000)
    assert r.rewrite(5, 151, 51 * FRAME, now_ms=1683) == (12, 1650 * VIDEO // 1000 + FRAME)
    assert r.rewrite(5, 120, 20 * FRAME, now_ms=1690) is None  # from the skipped stretch


def test_a_long_epoch_stops_comparing_with_its_start() -> None:
    r = StreamRewriter(VIDEO, start_seq=0, start_ts=0)
    for seq in range(0, 40000, 1000):
        assert r.rewrite(1, seq & 0xFFFF, seq * 10, now_ms=seq) is not None
    # 40000 packets in: the epoch's first sequence number looks "newer" again in 16-bit terms, yet nothing drops
    for seq in range(40000, 70000, 1000):
        assert r.rewrite(1, seq & 0xFFFF, seq * 10, now_ms=seq) == (seq & 0xFFFF, (seq * 10) & 0xFFFFFFFF)


def test_nacked_sequence_numbers_translate_back_to_the_current_source() -> None:
    r = StreamRewriter(VIDEO, start_seq=0xFFF0, start_ts=0)
    assert r.to_incoming_seq(5) is None  # nothing sent yet
    r.rewrite(3, 20, 0, now_ms=0)
    r.rewrite(3, 21, 0, now_ms=0)
    assert r.to_incoming_seq(0xFFF1) == 21
    assert r.to_incoming_seq((0xFFF0 + 30) & 0xFFFF) == 50  # not sent yet, across the wrap
    assert r.to_incoming_seq(0xFFE0) is None  # before this epoch: no packet of this source stands behind it


def test_vp8_keyframe_start() -> None:
    key = bytes([0x10, 0x00, 0x9D, 0x01, 0x2A])  # S=1, PID=0, frame header with P=0 (+ the keyframe start code)
    delta = bytes([0x10, 0x01])
    assert vp8_keyframe_start(key)
    assert not vp8_keyframe_start(delta)
    # with X, I (15-bit picture id), L, T/K: as aiortc and Chrome send it
    assert vp8_keyframe_start(bytes([0x90, 0xE0, 0x80, 0x05, 0x01, 0x20, 0x00, 0x9D]))
    assert not vp8_keyframe_start(bytes([0x90, 0xE0, 0x80, 0x05, 0x01, 0x20, 0x01, 0x9D]))
    assert vp8_keyframe_start(bytes([0x90, 0x80, 0x05, 0x00]))  # 7-bit picture id
    assert not vp8_keyframe_start(bytes([0x00, 0x00]))  # a continuation of a frame
    assert not vp8_keyframe_start(bytes([0x11, 0x00]))  # partition 1
    assert not vp8_keyframe_start(bytes([0x90, 0x80]))  # truncated
    assert not vp8_keyframe_start(b"")


def test_h264_keyframe_start() -> None:
    assert h264_keyframe_start(bytes([0x65, 0x88]))  # IDR slice
    assert h264_keyframe_start(bytes([0x67, 0x42]))  # SPS
    assert not h264_keyframe_start(bytes([0x41, 0x9A]))  # non-IDR slice
    stap = bytes([0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xCE, 0x00, 0x02, 0x65, 0x88])
    assert h264_keyframe_start(stap)
    assert not h264_keyframe_start(bytes([0x78, 0x00, 0x02, 0x41, 0x9A]))
    assert h264_keyframe_start(bytes([0x7C, 0x85, 0x88]))  # FU-A, start of an IDR
    assert not h264_keyframe_start(bytes([0x7C, 0x05, 0x88]))  # FU-A, middle of an IDR
    assert not h264_keyframe_start(b"")
