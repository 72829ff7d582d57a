"""The benchmark conditions: /proc/stat parsing and shares, the lateness summary, the probe and the one-line report."""

from __future__ import annotations

import pytest

from bench.conditions import (
    LATE_MS,
    REFERENCE_PROBE_MS,
    Conditions,
    CpuTimes,
    Lateness,
    cpu_probe,
    cpu_shares,
    describe,
    probe_summary,
    probe_workload,
)

PROC_STAT = """cpu  38048 153 9663 36873 447 0 792 1854 0 0
cpu0 17592 37 4543 20414 72 0 370 926 0 0
cpu1 20456 115 5119 16458 375 0 421 928 0 0
intr 123456 0 0
ctxt 987654
"""


def test_the_all_cpu_line_is_read_field_by_field() -> None:
    times = CpuTimes.parse(PROC_STAT)
    assert times == CpuTimes(user=38048, nice=153, system=9663, idle=36873, iowait=447, irq=0, softirq=792,
                             steal=1854)
    assert times.total == 38048 + 153 + 9663 + 36873 + 447 + 792 + 1854
    assert times.busy == 38048 + 153 + 9663 + 792


def test_an_old_kernel_without_the_steal_column_reads_as_none_stolen() -> None:
    assert CpuTimes.parse("cpu  10 0 5 100 1 0 0\n").steal == 0


def test_a_text_without_the_all_cpu_line_is_refused() -> None:
    with pytest.raises(ValueError, match="no 'cpu ' line"):
        CpuTimes.parse("cpu0 1 2 3 4 5 6 7 8\n")


def test_shares_are_of_all_cpus_time_between_two_readings() -> None:
    before = CpuTimes(user=1000, idle=1000, steal=100, iowait=10)
    after = CpuTimes(user=1500, system=100, idle=1300, steal=170, iowait=40, softirq=10)
    # 1010 ticks passed: 610 busy (500 user, 100 system, 10 softirq), 70 stolen, 30 iowait, 300 idle
    total = after.total - before.total
    assert total == 1000 + 10
    shares = cpu_shares(before, after)
    assert shares == {"steal_pct": round(100 * 70 / total, 1), "iowait_pct": round(100 * 30 / total, 1),
                      "busy_pct": round(100 * 610 / total, 1)}


def test_no_time_passed_gives_zero_shares() -> None:
    same = CpuTimes(user=5, idle=5)
    assert cpu_shares(same, same) == {"steal_pct": 0.0, "iowait_pct": 0.0, "busy_pct": 0.0}


def test_lateness_summary_in_ms_with_the_late_share() -> None:
    lateness = Lateness()
    for ms in [0.1] * 194 + [5.0] * 2 + [12.0] * 3 + [40.0]:
        lateness.record(ms / 1000)
    summary = lateness.summary()
    assert summary == {"sends": 200, "p50_ms": 0.1, "p99_ms": 12.0, "max_ms": 40.0, "late_pct": 2.0}


def test_early_sends_count_as_on_time_and_the_threshold_is_exclusive() -> None:
    lateness = Lateness()
    lateness.record(-0.002)
    lateness.record(-0.001)
    lateness.record(LATE_MS / 1000)
    summary = lateness.summary()
    assert summary["p50_ms"] == 0.0
    assert summary["max_ms"] == LATE_MS
    assert summary["late_pct"] == 0.0


def test_an_empty_timetable_summarises_to_zeros() -> None:
    assert Lateness().summary() == {"sends": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "late_pct": 0.0}


def test_the_probe_workload_is_fixed() -> None:
    assert probe_workload(1000) == probe_workload(1000)
    assert probe_workload(1000) != probe_workload(1001)


def test_the_probe_summary_takes_the_fastest_and_the_median_against_the_reference() -> None:
    summary = probe_summary([REFERENCE_PROBE_MS * 2, REFERENCE_PROBE_MS, REFERENCE_PROBE_MS * 1.5])
    assert summary["best_ms"] == REFERENCE_PROBE_MS
    assert summary["median_ms"] == REFERENCE_PROBE_MS * 1.5
    assert summary["best_ratio"] == 1.0
    assert summary["median_ratio"] == 1.5


def test_a_real_probe_times_every_round() -> None:
    summary = cpu_probe(rounds=2)
    assert 0 < summary["best_ms"] <= summary["median_ms"]


def test_a_run_reports_plain_numbers_and_one_line() -> None:
    lateness = Lateness()
    lateness.record(0.020)
    report = Conditions.start().finish(lateness)
    assert report["cores_online"] >= report["cores_usable"] >= 1
    assert report["steal_pct"] is not None
    assert 0 <= report["steal_pct"] <= 100
    assert report["lateness"]["late_pct"] == 100.0
    line = describe(report)
    assert line.startswith("conditions: ")
    for part in ("cores", "CPU probe", "steal", "iowait", "load", "generator late", "> 10 ms"):
        assert part in line


def test_a_missing_report_says_so() -> None:
    assert describe({}) == "conditions: not measured"
