"""The hot-read benchmark's pure parts: goals against the ceiling of the same run, the answer checks it trusts,
how connections are dealt to the generators, and the tables it prints."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from bench.common import RawConnection
from bench.reads import (
    Expect,
    Route,
    answer_check,
    connection_plan,
    format_table,
    goal_for,
    goal_met,
    judge,
    per_answer_ms,
    route_table,
    scaling_rows,
    scaling_table,
    share,
)


def row(route: str, kind: str, rps: float, p99: float = 10.0, errors: int = 0, **more: Any) -> dict[str, Any]:
    return {"route": route, "kind": kind, "requests_per_s": rps, "p50_ms": p99 / 2, "p99_ms": p99,
            "errors": errors, "server_cpu_ms_per_answer": 0.3, "postgres_cpu_ms_per_answer": 0.1,
            "postgres_measured": True, "generator_share": 0.2, "server_share": 0.9, "machine_busy_pct": 80.0,
            **more}


def test_a_hot_read_needs_2500_per_second_or_half_the_ceiling_whichever_is_lower() -> None:
    slow_ceiling = goal_for("hot", 3000.0)
    assert slow_ceiling.min_rps == 1500.0
    assert slow_ceiling.max_p99_ms == 50.0
    fast_ceiling = goal_for("hot", 9000.0)
    assert fast_ceiling.min_rps == 2500.0
    assert fast_ceiling.text == ">= 2,500/s, p99 < 50 ms"
    assert goal_met(fast_ceiling, 2500.0, 49.9, 0.28) is True
    assert goal_met(fast_ceiling, 2499.0, 10.0, 0.28) is False
    assert goal_met(fast_ceiling, 4000.0, 50.0, 0.44) is False  # p99 must stay under 50 ms


def test_the_signed_in_floor_is_judged_by_its_ratio_and_the_ceiling_by_nothing() -> None:
    floor = goal_for("floor", 5000.0)
    assert floor.min_ratio == 0.6
    assert goal_met(floor, 3000.0, 500.0, 0.6) is True
    assert goal_met(floor, 2990.0, 1.0, 0.598) is False
    assert goal_met(goal_for("ceiling", 5000.0), 5000.0, 1.0, 1.0) is None
    with pytest.raises(ValueError, match="kind"):
        goal_for("warm", 1.0)


def test_judge_takes_the_ratio_to_the_ceiling_of_the_same_rows() -> None:
    judged = judge([row("live", "ceiling", 4000.0), row("floor", "floor", 2500.0), row("calendar", "hot", 2100.0),
                    row("chats", "hot", 2200.0, p99=80.0), row("wrong", "hot", 3000.0, errors=1)])
    by = {r["route"]: r for r in judged}
    assert by["live"]["ratio"] == 1.0
    assert by["live"]["met"] is None
    assert by["floor"]["ratio"] == 0.625
    assert by["floor"]["met"] is True
    assert by["calendar"]["goal"] == ">= 2,000/s, p99 < 50 ms"  # half of this run's ceiling is lower
    assert by["calendar"]["met"] is True
    assert by["chats"]["met"] is False
    assert by["wrong"]["met"] is False  # a fast route with a wrong answer meets no goal
    cpu = judge([row("live", "ceiling", 4000.0, server_cpu_ms_per_answer=0.1),
                 row("calendar", "hot", 900.0, server_cpu_ms_per_answer=0.4),
                 row("nothing", "hot", 0.0, server_cpu_ms_per_answer=0.0)])
    assert [r["cpu_ratio"] for r in cpu] == [1.0, 0.25, 0.0]


def test_cpu_per_answer_and_shares() -> None:
    assert per_answer_ms(1.5, 3000) == 0.5
    assert per_answer_ms(1.5, 0) == 0.0
    assert share(4.5, 5.0) == 0.9
    assert share(1.0, 0.0) == 0.0


def raw() -> RawConnection:
    return RawConnection(1)


def test_answers_are_checked_for_status_count_length_and_id() -> None:
    page = msgspec.json.encode({"items": [{"id": "a"}, {"id": "b"}], "next_cursor": None})
    assert answer_check(Expect(items=2), None)(raw(), 200, page) is None
    assert answer_check(Expect(items=3), None)(raw(), 200, page) == "2 items, not 3"
    assert answer_check(Expect(items=2), None)(raw(), 401, page) == "status 401"
    assert answer_check(Expect(length=len(page)), None)(raw(), 200, page) is None
    longer = len(page) + 1
    assert answer_check(Expect(length=longer), None)(raw(), 200, page) == f"{len(page)} bytes, not {longer}"
    me = msgspec.json.encode({"id": "u1", "phone": "+79150000001"})
    assert answer_check(Expect(), "u1")(raw(), 200, me) is None
    assert answer_check(Expect(), "u2")(raw(), 200, me) == "id u1, not u2"
    problem = answer_check(Expect(items=0), None)(raw(), 200, b"<html>")
    assert problem is not None
    assert problem.startswith("body:")


def test_connections_are_dealt_to_generators_with_each_tokens_own_id() -> None:
    route = Route("me", "hot", "/api/v1/me", ("t0", "t1", "t2"), Expect(ids=("u0", "u1", "u2")))
    plan = connection_plan(route, 7, 2)
    assert [len(tokens) for tokens, _ in plan] == [4, 3]
    pairs = [pair for tokens, ids in plan for pair in zip(tokens, ids, strict=True)]
    assert sorted(pairs) == sorted([(f"t{i % 3}", f"u{i % 3}") for i in range(7)])
    assert connection_plan(Route("live", "ceiling", "/health/live", (None,)), 3, 1) == [((None,) * 3, (None,) * 3)]


def test_the_table_aligns_its_columns_under_a_rule() -> None:
    lines = format_table(["route", "req/s"], [["GET /me", "3,000"], ["a longer route", "12"]])
    assert lines == ["route           req/s", "--------------  -----", "GET /me         3,000",
                     "a longer route     12"]
    table = route_table(judge([row("GET /health/live (ceiling)", "ceiling", 4000.0),
                               row("GET /me", "hot", 1000.0, p99=70.0, postgres_measured=False)]))
    assert table[0].split()[:3] == ["route", "req/s", "p50"]
    assert "NOT MET" in table[3]
    assert "n/a" in table[3]  # no PostgreSQL measured: no database CPU
    assert "0.25" in table[3]  # the req/s ratio
    assert len({len(line) for line in table[:2]}) == 1


def test_workers_scale_against_the_one_worker_row_of_the_same_route() -> None:
    scaled = scaling_rows([row("GET /me", "hot", 2000.0), row("day calendar (40)", "hot", 1000.0)],
                          [row("GET /me", "hot", 3300.0, generator_share=0.5, server_share=1.6),
                           row("day calendar (40)", "hot", 1500.0)])
    assert [(r["route"], r["scale"], r["met"]) for r in scaled] == [("GET /me", 1.65, True),
                                                                    ("day calendar (40)", 1.5, False)]
    assert scaled[0]["generator_share_two"] == 0.5
    table = scaling_table(scaled)
    assert "1.65x" in table[2]
    assert "0.20/0.50" in table[2]  # the generators' cores, one worker then two
