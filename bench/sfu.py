"""Benchmark of the SFU: N simultaneous 1:1 calls through our forwarding node, aiortc's MediaRelay, and Janus.

    python -m bench.sfu [--calls 5,10,20,40,60,80] [--relay-calls 1,2,5,10] [--window 6]
                        [--servers sfu,relay,janus] [--concurrency 3] [--no-audio] [--nice -10] [--janus-veth]

No harness needed: the node runs without Redis (REDIS_URL unset). Goals (issue 17):

  - N simultaneous 1:1 calls, each direction 640x480@30 VP8 at about 800 kbit/s plus Opus, for N = 5, 10, 20,
    40, 60 ... (a server's sweep stops once its fps collapses, or more than a tenth of its calls failed to set
    up), the server alone on one pinned core
    (`taskset -c 0`) and this load generator on the other (`taskset -c 1`);
  - a lean generator (bench/sfu_gen.py), or it saturates before the server does: publishers replay
    pre-encoded, pre-packetised RTP over each peer connection's DTLS-SRTP (no encoder), subscribers count
    frames from RTP marker bits without decoding. One generator process: a second one would share the same
    core. Its CPU is printed per N; a row where it passed 90 % of its core is marked `gen-saturated`, one
    where its publishers sent under 95 % of 30 fps `gen-behind` (their numbers then say as much about the
    generator as about the server);
  - per N: server CPU % of a core (utime+stime from /proc/<pid>/stat over the window), CPU % per forwarded
    stream, subscriber fps (mean, min), frames lost after the first keyframe, server RSS, setup time (the
    subscriber's createOffer → its first complete keyframe, p50/p95, with the p50 of each phase);
  - in the same run with the same generator: aiortc's `MediaRelay` (decode + re-encode, bench/sfu_relay.py)
    as the baseline, and Janus VideoRoom when the `janus` Debian package is installed (bench/sfu_janus.py);
  - goals: per forwarded stream no more CPU than Janus, >= 15x MediaRelay's streams per core, 0 frames lost
    after the first keyframe, setup p95 under 200 ms. The ratios are printed at the end.

A "stream" is one direction of a call: one participant's video (and Opus audio) forwarded to the other, so N
calls are 2N streams. "Streams per core" (str/core) is the number of 30 fps streams one core would carry at a
row's cost: streams x (mean fps / 30) / (CPU % / 100), the best row of a sweep (for a saturated server that is
what it delivered; for one with headroom, its CPU per stream extrapolated). "others%" is what other processes
took of the server's / the generator's core during the window (/proc/stat minus ours): on a shared machine a
busy neighbour shows there, and a server starved of its core collapses early whatever its own cost.

Each server gets one warm-up call first (not counted). Calls are then added on top of the ones already running
(N=10 adds 5 to the 5 of N=5), at most `--concurrency` setting up at once, so each setup is timed under the
load of the calls before it. Per N: all new subscribers' first frames (up to 5 s), 1 s to settle, then the
measuring window. A table per server, then the ratios, then one JSON line. Exit status 1 only when our SFU or
MediaRelay could not be measured at all (the numbers themselves are reported, not judged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from bench.common import CLK_TCK, free_port, percentile, proc_cpu_seconds, proc_memory_mib, self_cpu_seconds
from bench.sfu_gen import (
    FPS,
    Clip,
    FastPath,
    Inbound,
    LoopLag,
    Packetiser,
    Publisher,
    hook_receive,
    idle_track,
    load_clip,
    mid_extension,
    new_peer_connection,
    prefer_codecs,
    quiet_decoders,
    sdp_payload_types,
    use_host_addresses,
)

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, GENERATOR_CORE = 0, 1
FIRST_FRAME_TIMEOUT = 5.0
SETTLE_SECONDS = 1.0
COLLAPSED_FPS = 0.8 * FPS  # a mean below it ends a server's sweep
BACKLOG_FPS = 1.05 * FPS  # a mean above it: frames held back earlier are being drained
GEN_SATURATED = 90.0  # % of the generator's core
FAILED_SHARE = 0.1  # more calls than this share failing to set up ends a server's sweep too
SERVER_NICE = [0]  # --nice: the servers' and the generator's niceness (negative: ahead of a busy machine)


# --- one participant's media ---------------------------------------------------------------------


@dataclass
class Leg:
    """One participant as the generator plays it: its peer connection(s), what it receives, what it sends."""

    started: float  # monotonic, before its (first) createOffer
    pcs: list[Any] = field(default_factory=list)
    inbound: Inbound = field(default_factory=Inbound)
    publisher: Publisher | None = None
    feedback: Inbound | None = None  # where its publisher's RTCP lands when that is another connection
    failed: str | None = None
    marks: dict[str, float] = field(default_factory=dict)  # setup phase → monotonic time it ended

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.monotonic()

    @property
    def setup_seconds(self) -> float | None:
        first = self.inbound.video.first_frame_at
        return None if first is None else first - self.started

    async def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        await asyncio.gather(*(pc.close() for pc in self.pcs), return_exceptions=True)


async def connected(pc: Any, timeout: float = 10.0) -> None:
    """Wait for the peer connection to reach "connected" (ICE and DTLS done, SRTP keys in place)."""
    if pc.connectionState == "connected":
        return
    done = asyncio.get_running_loop().create_future()

    def changed() -> None:
        if pc.connectionState in ("connected", "failed", "closed") and not done.done():
            done.set_result(pc.connectionState)

    pc.on("connectionstatechange", changed)

    async with asyncio.timeout(timeout):
        state = await done
    if state != "connected":
        raise ConnectionError(f"peer connection {state}")


def start_publishing(leg: Leg, pc: Any, clip: Clip, answer_sdp: str, rng: random.Random, audio: bool,
                     inbound: Inbound | None = None) -> None:
    """Once `pc` is connected: the socket fast path for what it receives (into `inbound`, by default the leg's
    own), and the clip's replay on its senders; keyframe requests arriving there restart the clip."""
    if inbound is None:
        inbound = leg.inbound
    else:
        leg.feedback = inbound
    senders = {t.kind: t.sender for t in pc.getTransceivers() if t.sender is not None}
    mids = {t.kind: t.mid for t in pc.getTransceivers()}
    negotiated = sdp_payload_types(answer_sdp)
    dtls = senders["video"].transport
    path = FastPath(dtls, inbound)

    def extension(kind: str) -> bytes:
        mid = mids.get(kind)
        return mid_extension(negotiated["mid_ext"], mid) if "mid_ext" in negotiated and mid else b""

    video = Packetiser(negotiated["vp8"], senders["video"]._ssrc, extension("video"), rng)
    voice = None
    if audio and "opus" in negotiated and "audio" in senders:
        voice = Packetiser(negotiated["opus"], senders["audio"]._ssrc, extension("audio"), rng)
    leg.publisher = Publisher(clip, path, video, voice)
    inbound.on_keyframe_request = leg.publisher.request_keyframe


def media_offer_pc(kinds: Sequence[str]) -> Any:
    pc = new_peer_connection()
    for kind in kinds:
        pc.addTrack(idle_track(kind))
    prefer_codecs(pc)
    return pc


def watch_inbound(leg: Leg, pc: Any, local_sdp: str) -> None:
    types = sdp_payload_types(local_sdp)
    leg.inbound.video_pt = types.get("vp8")
    leg.inbound.rtx_pt = types.get("rtx")
    leg.inbound.audio_pt = types.get("opus")
    hook_receive(pc.getTransceivers()[0].receiver.transport, leg.inbound)


# --- servers -----------------------------------------------------------------------------------


class Driver(Protocol):
    name: str
    pid: int

    async def start(self) -> None: ...
    async def call(self, room: str, clip: Clip, rng: random.Random) -> list[Leg]: ...
    async def end(self, room: str, legs: list[Leg]) -> None: ...
    async def stop(self) -> None: ...
    async def health(self) -> dict[str, Any]: ...


class ControlDriver:
    """A server with the SFU node's control interface (our node, or the MediaRelay baseline): one sendrecv
    peer connection per participant, offered by the participant."""

    def __init__(self, name: str, module: list[str], audio: bool, log_dir: Path) -> None:
        self.name = name
        self.module = module
        self.audio = audio
        self.port = free_port()
        self.secret = secrets.token_urlsafe(16)
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        use_host_addresses(["127.0.0.1"])  # the node's RTC_HOST_ADDRESSES below
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
        low = 20_000 + random.randrange(0, 20) * 1000
        env.update(SFU_SECRET=self.secret, SFU_LISTEN=f"127.0.0.1:{self.port}", RTC_HOST_ADDRESSES="127.0.0.1",
                   RTC_UDP_PORTS=f"{low}-{low + 999}", LOG_LEVEL=env.get("LOG_LEVEL", "WARNING"))
        cmd = pinned([sys.executable, "-m", *self.module])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        renice_autogroup(self.pid)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=30.0,
                                      headers={"Authorization": f"Bearer {self.secret}"})
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/health")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no /health within 30 s: {tail(self.log)}")
            await asyncio.sleep(0.1)

    async def health(self) -> dict[str, Any]:
        assert self.http is not None
        return dict((await self.http.get("/health")).json())

    async def _join(self, room: str, participant: str, clip: Clip, rng: random.Random) -> Leg:
        assert self.http is not None
        leg = Leg(started=time.monotonic())
        pc = media_offer_pc(["audio", "video"] if self.audio else ["video"])
        leg.pcs.append(pc)
        try:
            await pc.setLocalDescription(await pc.createOffer())
            leg.mark("offer")
            local = pc.localDescription.sdp
            answer = await self.http.post(f"/rooms/{room}/participants/{participant}/offer",
                                          json={"sdp": local, "type": "offer"})
            if answer.status_code != 200:
                raise ConnectionError(f"offer answered {answer.status_code}: {answer.text[:200]}")
            leg.mark("answer")
            body = answer.json()
            from aiortc import RTCSessionDescription

            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
            watch_inbound(leg, pc, local)
            await connected(pc)
            leg.mark("connected")
            start_publishing(leg, pc, clip, body["sdp"], rng, self.audio)
        except (ConnectionError, TimeoutError, httpx.HTTPError, ValueError, KeyError) as exc:
            leg.failed = f"{type(exc).__name__}: {exc}"
        return leg

    async def call(self, room: str, clip: Clip, rng: random.Random) -> list[Leg]:
        return list(await asyncio.gather(self._join(room, "a", clip, rng), self._join(room, "b", clip, rng)))

    async def end(self, room: str, legs: list[Leg]) -> None:
        await asyncio.gather(*(leg.close() for leg in legs))
        if self.http is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(f"/rooms/{room}")

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 15)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


def renice_autogroup(pid: int) -> None:
    """With --nice, the niceness of the process's autogroup too: where the kernel groups tasks by session
    (sched_autogroup_enabled), a task's own niceness weighs only within its session, so against a busy
    neighbour's session only the group's counts. Servers start in a session of their own for the same reason:
    sharing the generator's, the two would split one session's share of the machine."""
    if SERVER_NICE[0]:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(str(SERVER_NICE[0]))


def pinned(cmd: list[str]) -> list[str]:
    """A server's command line: on the server's core, at --nice's niceness."""
    nice = ["nice", "-n", str(SERVER_NICE[0])] if SERVER_NICE[0] else []
    return ["taskset", "-c", str(SERVER_CORE), *nice, *cmd]


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- the sweep ---------------------------------------------------------------------------------


@dataclass
class Row:
    server: str
    calls: int
    streams: int
    failed_calls: int
    cpu_pct: float
    cpu_per_stream: float
    gen_cpu_pct: float
    gen_lag_ms: float  # the generator's worst event-loop lateness in the window
    queued_kib: tuple[float, float]  # unread in the server's / the generator's UDP sockets as the window ended
    udp_drops: tuple[int, int]  # datagrams their open UDP sockets dropped so far (a full receive buffer)
    machine_rcvbuf_errors: int  # the whole machine's UDP receive-buffer drops in the window (/proc/net/snmp)
    srtp_errors: int  # inbound datagrams the subscribers' SRTP sessions refused (replay, auth)
    others_pct: tuple[float, float]  # what other processes took of the server's and the generator's cores
    fps_mean: float
    fps_min: float
    lost_frames: int
    lost_packets: int
    rss_mib: float
    setup_p50_ms: float
    setup_p95_ms: float
    no_first_frame: int
    keyframe_requests: int
    gen_fps: float  # frames the generator's publishers sent per second, mean
    dropped: int  # legs whose connection went away during the run (ICE consent lost, closed)
    phases_p50_ms: dict[str, float] = field(default_factory=dict)  # the new legs' setup phases, from createOffer
    server_load: dict[str, Any] = field(default_factory=dict)  # what the server's /health said after the window

    @property
    def streams_per_core(self) -> float:
        if self.cpu_pct <= 0 or self.fps_mean <= 0:
            return 0.0
        return self.streams * min(1.0, self.fps_mean / FPS) / (self.cpu_pct / 100)

    @property
    def notes(self) -> str:
        out = []
        if self.gen_cpu_pct >= GEN_SATURATED:
            out.append("gen-saturated")
        if self.gen_fps < 0.95 * FPS:
            out.append("gen-behind")  # the generator did not get the CPU to send 30 fps
        if self.fps_mean < COLLAPSED_FPS:
            out.append("fps-collapsed")
        if self.fps_mean > BACKLOG_FPS:
            out.append("backlog")
        if self.failed_calls:
            out.append(f"{self.failed_calls}-failed")
        if self.dropped:
            out.append(f"{self.dropped}-dropped")
        return ",".join(out)


async def add_calls(driver: Driver, calls: dict[str, list[Leg]], target: int, clip: Clip, rng: random.Random,
                    concurrency: int, run_id: str) -> list[Leg]:
    """Start calls until `target` run; the new ones' legs, once each has its first frame (or timed out)."""
    gate = asyncio.Semaphore(concurrency)
    new: list[Leg] = []

    async def one(room: str) -> None:
        async with gate:
            legs = await driver.call(room, clip, rng)
        calls[room] = legs
        new.extend(legs)

    await asyncio.gather(*(one(f"bench-{run_id}-{i}") for i in range(len(calls), target)))
    deadline = time.monotonic() + FIRST_FRAME_TIMEOUT
    while time.monotonic() < deadline and any(
            leg.failed is None and leg.inbound.video.first_frame_at is None for leg in new):
        await asyncio.sleep(0.05)
    return new


async def measure(driver: Driver, calls: dict[str, list[Leg]], new: list[Leg], window: float) -> Row:
    legs = [leg for legs in calls.values() for leg in legs if leg.failed is None]
    await asyncio.sleep(SETTLE_SECONDS)
    frames0 = {id(leg): leg.inbound.video.frames for leg in legs}
    sent0 = {id(leg): leg.publisher.frames_sent if leg.publisher else 0 for leg in legs}
    lag = LoopLag()
    cores0, snmp0 = core_busy_seconds(), udp_errors()
    cpu0, gen0, t0 = proc_cpu_seconds(driver.pid), self_cpu_seconds(), time.monotonic()
    await asyncio.sleep(window)
    cpu1, gen1, t1 = proc_cpu_seconds(driver.pid), self_cpu_seconds(), time.monotonic()
    cores1, snmp1 = core_busy_seconds(), udp_errors()
    lag.close()
    backlog = (udp_backlog(driver.pid), udp_backlog(os.getpid()))
    elapsed = t1 - t0
    fps = [(leg.inbound.video.frames - frames0[id(leg)]) / elapsed for leg in legs] or [0.0]
    gen_fps = [((leg.publisher.frames_sent if leg.publisher else 0) - sent0[id(leg)]) / elapsed for leg in legs]
    setups = sorted(s * 1000 for leg in new if (s := leg.setup_seconds) is not None)
    failed_calls = sum(1 for legs in calls.values() if any(leg.failed for leg in legs))
    streams = len(legs)
    cpu_pct = 100 * (cpu1 - cpu0) / elapsed
    return Row(
        server=driver.name, calls=len(calls), streams=streams, failed_calls=failed_calls,
        cpu_pct=round(cpu_pct, 1), cpu_per_stream=round(cpu_pct / streams, 2) if streams else 0.0,
        gen_cpu_pct=round(100 * (gen1 - gen0) / elapsed, 1),
        gen_lag_ms=round(lag.take() * 1000, 1),
        queued_kib=(backlog[0][0], backlog[1][0]),
        udp_drops=(backlog[0][1], backlog[1][1]),
        machine_rcvbuf_errors=snmp1 - snmp0,
        srtp_errors=sum(leg.inbound.srtp_errors for leg in legs),
        others_pct=(round(max(0.0, 100 * (cores1[0] - cores0[0] - (cpu1 - cpu0)) / elapsed), 1),
                    round(max(0.0, 100 * (cores1[1] - cores0[1] - (gen1 - gen0)) / elapsed), 1)),
        fps_mean=round(sum(fps) / len(fps), 1), fps_min=round(min(fps), 1),
        lost_frames=sum(leg.inbound.video.lost_frames for leg in legs),
        lost_packets=sum(leg.inbound.video.lost_packets for leg in legs),
        rss_mib=round(proc_memory_mib(driver.pid).get("VmRSS", 0.0), 1),
        setup_p50_ms=round(percentile(setups, 50), 1), setup_p95_ms=round(percentile(setups, 95), 1),
        no_first_frame=sum(1 for leg in new if leg.failed is None and leg.setup_seconds is None),
        keyframe_requests=sum(leg.inbound.keyframe_requests + (leg.feedback.keyframe_requests if leg.feedback else 0)
                              for leg in legs),
        gen_fps=round(sum(gen_fps) / len(gen_fps), 1) if gen_fps else 0.0,
        phases_p50_ms=phases(new),
        dropped=sum(1 for leg in legs if leg.publisher is not None and leg.publisher.dropped),
    )


def udp_errors() -> int:
    """The machine's UDP RcvbufErrors so far (/proc/net/snmp)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    if len(lines) < 2 or "RcvbufErrors" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("RcvbufErrors")])


def core_busy_seconds() -> tuple[float, float]:
    """Busy seconds so far of the server's and the generator's cores (/proc/stat): what others took of them is
    that minus ours (the machine may be shared; a busy neighbour shows here)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in (f"cpu{SERVER_CORE}", f"cpu{GENERATOR_CORE}"):
            ticks = [int(v) for v in values[:8]]
            busy[name] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return busy[f"cpu{SERVER_CORE}"], busy[f"cpu{GENERATOR_CORE}"]


def udp_backlog(pid: int) -> tuple[float, int]:
    """(KiB waiting unread, datagrams dropped so far) in a process's UDP sockets (/proc/net/udp rx_queue and
    drops, by socket inode): where a backlog sits when fps falls without loss, and where a loss happened, the
    generator's side or the server's."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    queued = drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 12 and fields[9] in inodes:
                    queued += int(fields[4].split(":")[1], 16)
                    drops += int(fields[12])
    return round(queued / 1024, 1), drops


def phases(legs: list[Leg]) -> dict[str, float]:
    """p50 of each setup phase's end, in ms from the leg's createOffer, in the order the phases come."""
    names: dict[str, None] = {}
    for leg in legs:
        names.update(dict.fromkeys(leg.marks))
    out = {}
    for name in names:
        values = sorted((leg.marks[name] - leg.started) * 1000 for leg in legs if name in leg.marks)
        out[name] = round(percentile(values, 50), 1)
    firsts = sorted(s * 1000 for leg in legs if (s := leg.setup_seconds) is not None)
    out["first_frame"] = round(percentile(firsts, 50), 1)
    return out


async def sweep(driver: Driver, ns: list[int], clip: Clip, window: float, concurrency: int) -> list[Row]:
    rng = random.Random(23)
    run_id = secrets.token_hex(3)
    calls: dict[str, list[Leg]] = {}
    rows: list[Row] = []
    warm: dict[str, list[Leg]] = {}  # one call first, not counted: imports and first-use costs on both sides
    await add_calls(driver, warm, 1, clip, rng, 1, f"{run_id}-warm")
    await asyncio.gather(*(driver.end(room, legs) for room, legs in warm.items()))
    try:
        for n in ns:
            new = await add_calls(driver, calls, n, clip, rng, concurrency, run_id)
            failures = [leg.failed for leg in new if leg.failed]
            if failures:
                print(f"  {driver.name} N={n}: {len(failures)} legs failed, e.g. {failures[0]}", flush=True)
            row = await measure(driver, calls, new, window)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                row.server_load = await driver.health()
            rows.append(row)
            print("  " + format_row(row), flush=True)
            print("    setup p50 by phase (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in row.phases_p50_ms.items())
                  + f"; generator sent {row.gen_fps:.1f} fps/publisher, loop lag max {row.gen_lag_ms:.0f} ms"
                  + f"; UDP unread KiB server/generator {row.queued_kib[0]}/{row.queued_kib[1]}, dropped "
                  f"{row.udp_drops[0]}/{row.udp_drops[1]} (machine, in the window: {row.machine_rcvbuf_errors}); "
                  f"SRTP refused {row.srtp_errors}"
                  + (f"; server says {row.server_load}" if row.server_load else ""), flush=True)
            if row.fps_mean < COLLAPSED_FPS or row.streams == 0 or row.failed_calls > FAILED_SHARE * row.calls:
                break
    finally:
        await asyncio.gather(*(driver.end(room, legs) for room, legs in calls.items()), return_exceptions=True)
    return rows


# --- output ------------------------------------------------------------------------------------

HEADER = (f"{'server':<10} {'N':>3} {'streams':>7} {'cpu%':>6} {'%/strm':>6} {'gen%':>5} {'fps':>5} "
          f"{'fpsmin':>6} {'lost':>5} {'pktlost':>7} {'rssMiB':>7} {'setup50':>7} {'setup95':>7} {'nofrm':>5} "
          f"{'str/core':>8} {'others%':>9}  notes")


def format_row(r: Row) -> str:
    return (f"{r.server:<10} {r.calls:>3} {r.streams:>7} {r.cpu_pct:>6.1f} {r.cpu_per_stream:>6.2f} "
            f"{r.gen_cpu_pct:>5.1f} {r.fps_mean:>5.1f} {r.fps_min:>6.1f} {r.lost_frames:>5} {r.lost_packets:>7} "
            f"{r.rss_mib:>7.1f} {r.setup_p50_ms:>7.1f} {r.setup_p95_ms:>7.1f} {r.no_first_frame:>5} "
            f"{r.streams_per_core:>8.1f} {r.others_pct[0]:>4.0f}/{r.others_pct[1]:<4.0f}  {r.notes}")


def best(rows: list[Row]) -> Row | None:
    """The row with the most streams per core among those that held 30 fps; among all rows when none did (a
    server that collapses at the first N: what it delivered per core)."""
    usable = [r for r in held(rows) if r.cpu_pct > 0] or [r for r in rows if r.streams and r.cpu_pct > 0]
    return max(usable, key=lambda r: r.streams_per_core) if usable else None


def held(rows: list[Row]) -> list[Row]:
    """Rows where the server kept about 30 fps: not collapsed, not draining a backlog (over 31.5 fps), nothing
    failed or dropped. Per-stream cost is compared on these."""
    return [r for r in rows if COLLAPSED_FPS <= r.fps_mean <= BACKLOG_FPS and r.streams and not r.failed_calls
            and not r.dropped]


def ratios(results: dict[str, list[Row]], skipped: dict[str, str]) -> dict[str, Any]:
    """The goals' numbers. CPU per stream falls as N grows (fixed costs spread), so each server's is taken at
    its largest N that held 30 fps, and the comparison with Janus at the largest N both held."""
    out: dict[str, Any] = {}
    lines = []
    for name, rows in results.items():
        ok = held(rows)
        top = ok[-1] if ok else None
        fastest = best(rows)
        out[name] = {
            "held_up_to_calls": top.calls if top else 0,
            "cpu_per_stream_pct": top.cpu_per_stream if top else None,
            "streams_per_core": round(fastest.streams_per_core, 1) if fastest else None,
            "frames_lost": sum(r.lost_frames for r in rows),
            "frames_lost_held": sum(r.lost_frames for r in ok),
            "setup_p95_ms_worst_held": max((r.setup_p95_ms for r in ok), default=None),
        }
        o = out[name]
        cost = f"{o['cpu_per_stream_pct']:.2f} % of a core at N={top.calls}" if top else "no row held 30 fps"
        lines.append(f"{name}: held 30 fps up to N={o['held_up_to_calls']}; CPU per stream {cost}; streams per "
                     f"core {o['streams_per_core']}; frames lost after the first keyframe {o['frames_lost_held']} "
                     f"in rows that held ({o['frames_lost']} in all); setup p95 worst held row "
                     f"{o['setup_p95_ms_worst_held']} ms")
    sfu, janus = held(results.get("sfu", [])), held(results.get("janus", []))
    common = sorted({r.calls for r in sfu} & {r.calls for r in janus})
    if common:
        n = common[-1]
        ours = next(r for r in sfu if r.calls == n)
        theirs = next(r for r in janus if r.calls == n)
        ratio = round(ours.cpu_per_stream / theirs.cpu_per_stream, 2) if theirs.cpu_per_stream else None
        out["cpu_per_stream_vs_janus"] = {"calls": n, "sfu": ours.cpu_per_stream, "janus": theirs.cpu_per_stream,
                                          "ratio": ratio}
        lines.append(f"CPU per stream vs Janus at N={n}: {ours.cpu_per_stream:.2f} / {theirs.cpu_per_stream:.2f} = "
                     f"{ratio}x (goal <= 1)")
    if "sfu" in results and "janus" in results:
        pairs = []
        for mine in results["sfu"]:
            other = next((r for r in results["janus"] if r.calls == mine.calls), None)
            if other and min(mine.fps_mean, other.fps_mean) >= COLLAPSED_FPS and other.cpu_per_stream:
                note = f" ({other.failed_calls} janus calls failed)" if other.failed_calls else ""
                pairs.append(f"N={mine.calls} {mine.cpu_per_stream:.2f}/{other.cpu_per_stream:.2f} = "
                             f"{mine.cpu_per_stream / other.cpu_per_stream:.2f}x{note}")
        if pairs:
            lines.append("CPU per stream sfu/janus at each N both kept 24+ fps: " + "; ".join(pairs))
        if not common:
            lines.append("CPU per stream vs Janus: no N at which both held 30 fps with every call up")
    if "janus" in skipped:
        lines.append(f"CPU per stream vs Janus: janus not measured ({skipped['janus']})")
    sb, rb = best(results.get("sfu", [])), best(results.get("relay", []))
    if sb and rb and rb.streams_per_core:
        ratio = round(sb.streams_per_core / rb.streams_per_core, 1)
        out["streams_per_core_vs_relay"] = ratio
        lines.append(f"streams per core vs MediaRelay: {sb.streams_per_core:.1f} / {rb.streams_per_core:.1f} = "
                     f"{ratio}x (goal >= 15x)")
    if "sfu" in results:
        o = out["sfu"]
        lines.append(f"sfu goals: frames lost {o['frames_lost_held']} (goal 0); setup p95 "
                     f"{o['setup_p95_ms_worst_held']} ms (goal < 200 ms)")
    for name, reason in skipped.items():
        lines.append(f"{name}: not measured ({reason})")
    out["lines"] = lines
    return out


# --- main --------------------------------------------------------------------------------------


def pin_generator() -> str | None:
    """This process (and its threads to come) on the generator's core; None, or why not."""
    cores = os.sched_getaffinity(0)
    if not {SERVER_CORE, GENERATOR_CORE} <= cores:
        return f"needs cores {SERVER_CORE} and {GENERATOR_CORE}, has {sorted(cores)}"
    if shutil.which("taskset") is None:
        return "taskset (util-linux) is missing"
    os.sched_setaffinity(0, {GENERATOR_CORE})
    return None


def make_driver(name: str, audio: bool, log_dir: Path, janus_veth: bool = False) -> Driver:
    if name == "sfu":
        return ControlDriver("sfu", ["app", "sfu"], audio, log_dir)
    if name == "relay":
        return ControlDriver("relay", ["bench.sfu_relay"], audio, log_dir)
    if name == "janus":
        from bench.sfu_janus import JanusDriver

        return JanusDriver(audio, log_dir, veth=janus_veth)
    raise ValueError(name)


def janus_unavailable() -> str | None:
    from bench.sfu_janus import unavailable

    return unavailable()


async def run(args: argparse.Namespace) -> int:
    why = pin_generator()
    if why:
        print(f"cannot pin: {why}", file=sys.stderr)
        return 1
    if args.nice:
        SERVER_NICE[0] = args.nice
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        renice_autogroup(os.getpid())
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    skipped: dict[str, str] = {}
    if "janus" in servers:
        reason = janus_unavailable()
        if reason:
            skipped["janus"] = reason
            servers.remove("janus")
            print(f"janus: not measured ({reason})", flush=True)
    quiet_decoders()
    started = time.monotonic()
    clip = load_clip()
    print(f"clip: {len(clip.video)} frames of {640}x{480} VP8, {clip.bitrate() / 1000:.0f} kbit/s, keyframe "
          f"{sum(len(p) for p in clip.video[0])} B; Opus {len(clip.audio)} B / 20 ms; audio "
          f"{'on' if args.audio else 'off'}", flush=True)
    calls = [int(n) for n in args.calls.split(",")]
    relay_calls = [int(n) for n in args.relay_calls.split(",")]
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Row]] = {}
    print(HEADER, flush=True)
    for name in servers:
        driver = make_driver(name, args.audio, log_dir, args.janus_veth)
        try:
            await driver.start()
            results[name] = await sweep(driver, relay_calls if name == "relay" else calls, clip, args.window,
                                        args.concurrency)
        except Exception as exc:  # one server failing must not hide the others' numbers
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: not measured ({skipped[name]})", flush=True)
        finally:
            await driver.stop()
    titles = {"sfu": "our SFU node (python -m app sfu): packet forwarding", "relay": "aiortc MediaRelay: decode + "
              "re-encode (bench/sfu_relay.py)", "janus": "Janus VideoRoom (one event loop)"}
    for name, rows in results.items():
        print(f"\n{titles.get(name, name)}")
        print(HEADER)
        for r in rows:
            print(format_row(r))
    summary = ratios(results, skipped)
    print()
    for line in summary.pop("lines"):
        print(line)
    print(f"whole run: {time.monotonic() - started:.0f} s")
    print(json.dumps({"rows": {k: [r.__dict__ | {"streams_per_core": round(r.streams_per_core, 1)} for r in v]
                               for k, v in results.items()}, "ratios": summary, "skipped": skipped}))
    return 1 if any(name not in results for name in args.servers.split(",") if name != "janus") else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", default="5,10,20,40,60,80", help="N for our SFU and Janus")
    parser.add_argument("--relay-calls", default="1,2,5,10", help="N for MediaRelay (it collapses early)")
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured per N")
    parser.add_argument("--concurrency", type=int, default=3, help="calls setting up at once")
    parser.add_argument("--servers", default="sfu,relay,janus")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness of the servers and the generator (e.g. -10 as root on a shared machine)")
    parser.add_argument("--janus-veth", action="store_true",
                        help="give Janus a veth pair's 10.77.0.1 even when the host has another address")
    parser.add_argument("--no-audio", dest="audio", action="store_false", help="video only")
    parser.add_argument("--log-dir", default=str(ROOT / "var" / "bench-sfu"))
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
