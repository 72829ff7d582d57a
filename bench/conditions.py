"""The conditions a benchmark ran in, measured by the benchmark itself, so a printed figure can be checked.

INTERFACE (kept stable; bench/reads.py, bench/chat.py and others import it):

    probe = Conditions.start()          # a fixed CPU-speed probe, /proc/stat counters, load average
    ...                                 # the benchmark
    report = probe.finish()             # the probe again, steal time, load: a dict of plain numbers
    print(describe(report))             # one line for the table's heading
    lateness.record(seconds_late)       # a load generator's lateness against its own timetable (Lateness)

What is measured:

  - the CPU-speed probe: a fixed pure-Python workload (integer arithmetic, dict stores, string joins; no I/O,
    no allocation that grows) timed PROBE_ROUNDS times with the collector off, before and after the run. The
    fastest round is the machine's speed for one Python thread, the median shows contention; each is also given
    as a ratio to REFERENCE_PROBE_MS (1.0 = as fast as the reference; 1.3 = 30 % slower);
  - from /proc/stat over the run: the share of all CPUs' time stolen by the hypervisor (steal), waiting for I/O
    (iowait) and busy (user, nice, system, irq, softirq);
  - the load average before and after, and the cores: online (os.cpu_count) and usable by this process;
  - a load generator's lateness (`Lateness`): how late each send left against its slot in an open-loop
    timetable. A late generator under-loads the server, so its figures must be read with it.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROBE_ROUNDS = 7
PROBE_ITERATIONS = 40_000
# The probe's fastest round on the reference machine: the project's 2-vCPU benchmark VM, CPython 3.11, with
# nothing else benchmarking (9.4-10.0 ms measured). A ratio near 1.0 elsewhere means the same per-thread speed.
REFERENCE_PROBE_MS = 10.0
LATE_MS = 10.0  # a send leaving more than this after its slot counts as late
PROC_STAT = Path("/proc/stat")


# --- the CPU-speed probe ---------------------------------------------------------------------


def probe_workload(iterations: int = PROBE_ITERATIONS) -> int:
    """A fixed amount of interpreter work; returns a checksum so it cannot be skipped."""
    acc = 0
    table: dict[int, int] = {}
    for i in range(iterations):
        k = (i * 2654435761) % 1_000_003
        table[k & 1023] = k
        acc ^= k + (acc >> 3)
    return acc ^ len("".join(str(v) for v in table.values()))


def cpu_probe(rounds: int = PROBE_ROUNDS) -> dict[str, float]:
    """The probe's fastest and median round (wall ms), and each against the reference."""
    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            probe_workload()
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        if enabled:
            gc.enable()
    return probe_summary(times)


def probe_summary(times_ms: list[float]) -> dict[str, float]:
    best, median = min(times_ms), statistics.median(times_ms)
    return {"best_ms": round(best, 2), "median_ms": round(median, 2),
            "best_ratio": round(best / REFERENCE_PROBE_MS, 2), "median_ratio": round(median / REFERENCE_PROBE_MS, 2)}


# --- /proc/stat ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """The all-CPU line of /proc/stat, in clock ticks."""

    user: int = 0
    nice: int = 0
    system: int = 0
    idle: int = 0
    iowait: int = 0
    irq: int = 0
    softirq: int = 0
    steal: int = 0

    @classmethod
    def parse(cls, text: str) -> CpuTimes:
        """From /proc/stat's text: its first "cpu " line (guest time is already inside user and nice)."""
        for line in text.splitlines():
            if line.startswith("cpu "):
                values = [int(v) for v in line.split()[1:9]]
                return cls(*values, *([0] * (8 - len(values))))
        raise ValueError("no 'cpu ' line in /proc/stat")

    @classmethod
    def read(cls) -> CpuTimes | None:
        """Now; None where there is no /proc/stat."""
        try:
            return cls.parse(PROC_STAT.read_text())
        except (OSError, ValueError):
            return None

    @property
    def total(self) -> int:
        return (self.user + self.nice + self.system + self.idle + self.iowait + self.irq + self.softirq
                + self.steal)

    @property
    def busy(self) -> int:
        return self.user + self.nice + self.system + self.irq + self.softirq


def cpu_shares(before: CpuTimes, after: CpuTimes) -> dict[str, float]:
    """Steal, iowait and busy as % of all CPUs' time between two readings."""
    total = after.total - before.total
    if total <= 0:
        return {"steal_pct": 0.0, "iowait_pct": 0.0, "busy_pct": 0.0}

    def pct(ticks: int) -> float:
        return round(100 * ticks / total, 1)

    return {"steal_pct": pct(after.steal - before.steal), "iowait_pct": pct(after.iowait - before.iowait),
            "busy_pct": pct(after.busy - before.busy)}


# --- the generator's lateness ------------------------------------------------------------------


@dataclass
class Lateness:
    """How late a load generator's sends left against their slots (seconds); summarised by `summary()`."""

    samples: list[float] = field(default_factory=list)

    def record(self, seconds_late: float) -> None:
        self.samples.append(seconds_late)

    def summary(self) -> dict[str, float]:
        """p50/p99/max ms late (early counts as 0), and the % of sends late by more than LATE_MS."""
        ms = sorted(max(0.0, s) * 1000 for s in self.samples)
        if not ms:
            return {"sends": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "late_pct": 0.0}
        late = sum(1 for v in ms if v > LATE_MS)
        return {"sends": len(ms), "p50_ms": round(_rank(ms, 50), 2), "p99_ms": round(_rank(ms, 99), 2),
                "max_ms": round(ms[-1], 2), "late_pct": round(100 * late / len(ms), 2)}


def _rank(ascending: list[float], q: float) -> float:
    """Nearest-rank percentile (the same rule as bench.common.percentile)."""
    rank = max(1, min(len(ascending), round(q / 100 * len(ascending) + 0.5)))
    return ascending[rank - 1]


# --- before and after --------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


@dataclass
class Conditions:
    started: dict[str, Any]

    @classmethod
    def start(cls) -> Conditions:
        """The probe, the load and the /proc/stat counters now (the probe takes about PROBE_ROUNDS x 10 ms)."""
        probe = cpu_probe()
        return cls(started={"probe": probe, "load": load_average(), "cpu": CpuTimes.read(),
                            "wall": time.monotonic()})

    def finish(self, lateness: Lateness | None = None) -> dict[str, Any]:
        """The run's conditions: plain numbers, ready for JSON (with the generator's lateness, if given)."""
        cpu_after = CpuTimes.read()
        before = self.started["cpu"]
        report: dict[str, Any] = {
            "cores_online": os.cpu_count() or 1, "cores_usable": usable_cores(),
            "wall_s": round(time.monotonic() - self.started["wall"], 1),
            "probe_reference_ms": REFERENCE_PROBE_MS,
            "probe_before": self.started["probe"], "probe_after": cpu_probe(),
            "load_before": self.started["load"], "load_after": load_average(),
            **(cpu_shares(before, cpu_after) if before is not None and cpu_after is not None
               else {"steal_pct": None, "iowait_pct": None, "busy_pct": None}),
        }
        if lateness is not None:
            report["lateness"] = lateness.summary()
        return report


def describe(report: dict[str, Any]) -> str:
    """One line: cores, the probe before/after against the reference, steal, iowait, busy, load, lateness."""
    if not report:
        return "conditions: not measured"
    before, after = report["probe_before"], report["probe_after"]

    def share(key: str) -> str:
        value = report.get(key)
        return "n/a" if value is None else f"{value}%"

    def load(values: list[float]) -> str:
        return "/".join(f"{v:g}" for v in values) if values else "n/a"

    parts = [
        f"{report['cores_online']} cores ({report['cores_usable']} usable)",
        f"CPU probe {before['best_ms']} -> {after['best_ms']} ms best, {before['median_ms']} -> "
        f"{after['median_ms']} ms median (x{before['best_ratio']} -> x{after['best_ratio']} of the "
        f"{report['probe_reference_ms']:g} ms reference)",
        f"steal {share('steal_pct')}, iowait {share('iowait_pct')}, busy {share('busy_pct')} "
        f"over {report['wall_s']} s",
        f"load {load(report['load_before'])} -> {load(report['load_after'])}",
    ]
    late = report.get("lateness")
    if late is not None:
        parts.append(f"generator late p50 {late['p50_ms']} / p99 {late['p99_ms']} / max {late['max_ms']} ms, "
                     f"{late['late_pct']}% of {late['sends']} sends > {LATE_MS:g} ms")
    return "conditions: " + "; ".join(parts)
