"""Turning a working week in a specialist's zone into UTC slot times (pure functions, no I/O)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from zoneinfo import ZoneInfo

UTC = dt.UTC


def minutes_of(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def day_intervals(weekly: Iterable[dict[str, object]], breaks: Iterable[dict[str, object]],
                  weekday: int) -> list[tuple[int, int]]:
    """Working minutes-of-day intervals for a weekday, breaks cut out, sorted and merged."""
    work = sorted((minutes_of(str(w["start"])), minutes_of(str(w["end"]))) for w in weekly if w["weekday"] == weekday)
    merged: list[list[int]] = []
    for start, end in work:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    cuts = [(minutes_of(str(b["start"])), minutes_of(str(b["end"]))) for b in breaks if b["weekday"] == weekday]
    result: list[tuple[int, int]] = []
    for start, end in merged:
        pieces = [(start, end)]
        for cut_start, cut_end in cuts:
            pieces = [part for s, e in pieces for part in ((s, min(e, cut_start)), (max(s, cut_end), e))
                      if part[0] < part[1]]
        result += pieces
    return result


def slot_times(timezone: str, weekly: list[dict[str, object]], breaks: list[dict[str, object]],
               slot_minutes: int, first_day: dt.date, days: int) -> Iterator[tuple[dt.datetime, dt.datetime]]:
    """Every slot (start, end) in UTC from first_day for `days` days, local wall-clock times in `timezone`.

    Local times that do not exist (a spring-forward gap) are skipped rather than shifted.
    """
    zone = ZoneInfo(timezone)
    for offset in range(days):
        day = first_day + dt.timedelta(days=offset)
        midnight = dt.datetime.combine(day, dt.time())
        for start, end in day_intervals(weekly, breaks, day.weekday()):
            for begin in range(start, end - slot_minutes + 1, slot_minutes):
                local = (midnight + dt.timedelta(minutes=begin)).replace(tzinfo=zone)
                utc_start = local.astimezone(UTC)
                if utc_start.astimezone(zone).replace(tzinfo=None) != local.replace(tzinfo=None):
                    continue  # in a DST gap
                yield utc_start, utc_start + dt.timedelta(minutes=slot_minutes)


def valid_hours(hours: Iterable[dict[str, object]]) -> bool:
    return all(minutes_of(str(h["start"])) < minutes_of(str(h["end"])) for h in hours)
