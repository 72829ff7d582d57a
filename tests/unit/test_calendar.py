"""Working weeks become UTC slots, with DST handled in the specialist's zone."""

from __future__ import annotations

import datetime as dt

from app.scheduling.calendar import day_intervals, slot_times

UTC = dt.UTC
MORNING = [{"weekday": d, "start": "09:00", "end": "10:00"} for d in range(7)]


def test_breaks_are_cut_out_and_overlaps_merged() -> None:
    weekly = [{"weekday": 0, "start": "09:00", "end": "13:00"}, {"weekday": 0, "start": "12:00", "end": "18:00"}]
    breaks = [{"weekday": 0, "start": "13:00", "end": "14:00"}]
    assert day_intervals(weekly, breaks, 0) == [(540, 780), (840, 1080)]
    assert day_intervals(weekly, breaks, 1) == []


def test_moscow_has_no_dst() -> None:
    starts = [s for s, _ in slot_times("Europe/Moscow", MORNING, [], 30, dt.date(2026, 3, 28), 3)]
    assert [s.hour for s in starts] == [6, 6, 6, 6, 6, 6]  # 09:00 MSK is 06:00 UTC all year


def test_berlin_moves_by_an_hour_across_spring_forward() -> None:
    starts = [s for s, _ in slot_times("Europe/Berlin", MORNING, [], 60, dt.date(2026, 3, 28), 2)]
    assert starts == [dt.datetime(2026, 3, 28, 8, tzinfo=UTC), dt.datetime(2026, 3, 29, 7, tzinfo=UTC)]


def test_local_times_in_the_dst_gap_are_skipped() -> None:
    night = [{"weekday": 6, "start": "01:00", "end": "04:00"}]  # 2026-03-29 is a Sunday
    starts = [s.astimezone(dt.timezone(dt.timedelta(hours=1))).hour
              for s, _ in slot_times("Europe/Berlin", night, [], 60, dt.date(2026, 3, 29), 1)]
    assert len(starts) == 2  # 01:00 and 03:00 local; 02:00 does not exist that night


def test_slots_fit_inside_the_working_hours() -> None:
    odd = [{"weekday": 0, "start": "09:00", "end": "10:10"}]
    slots = list(slot_times("UTC", odd, [], 30, dt.date(2026, 11, 30), 1))
    assert [(s.strftime("%H:%M"), e.strftime("%H:%M")) for s, e in slots] == [("09:00", "09:30"), ("09:30", "10:00")]
