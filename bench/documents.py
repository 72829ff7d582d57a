"""Document uploads: the streamed direct upload through the API against boto3 straight to the same SeaweedFS, and
the presigned path (which must move no file bytes through the app).

    python -m tests.harness python -m bench.documents [--sizes 1,20,100] [--repeat 3]

One server process (`python -m app serve`, real profile: PostgreSQL, Redis, SeaweedFS from the harness). For each
size (MB): the median of `--repeat` direct uploads (POST /api/v1/documents/upload, a multipart form streamed
from memory by httpx) and of as many boto3 `upload_fileobj` calls of the same bytes (its default transfer
config: 8 MiB parts, 10 threads), in MB/s, their ratio (goal >= 0.8), and the server's peak RSS above what it
held before each upload (goal: flat, < 64 MiB at 100 MB). Then the presigned path for the largest size: create,
PUT to the presigned URL, complete, with the bytes the server process read meanwhile (/proc/<pid>/io rchar:
sockets and files; the goal is nothing near the file's size). The files are JPEGs (real magic bytes, random
data): the direct path's PDF scan is a separate cost, measured once more as a PDF of the largest size. A small
size is uploaded more than `--repeat` times, enough to move MIN_MB_PER_SIZE each way: a 1 MB upload lasts tens
of milliseconds, where the shared machine's passing load weighs as much as the difference measured. The
conditions line (bench/conditions.py) heads the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import httpx
import msgspec
from boto3.s3.transfer import TransferConfig

from bench.common import (
    HOST,
    HttpxClient,
    SmsInbox,
    create_database,
    drop_database,
    free_port,
    proc_memory_mib,
    run_benchmark,
    server_log_lines,
    sign_in,
    start_server,
    stop_server,
    tail,
    wait_ready,
)
from bench.conditions import Conditions, describe

MB = 1000 * 1000
MiB = 1024 * 1024
# a size's uploads move at least this much each way: one 1 MB upload lasts some 30-50 ms, where a passing load on
# the shared machine weighs as much as the difference measured, so small sizes are repeated more (median)
MIN_MB_PER_SIZE = 30
BOUNDARY = "bench-documents-boundary"


def server_read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    except OSError:
        return False
    return True


def jpeg_payload(size: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + os.urandom(size - 4)


def pdf_payload(size: int) -> bytes:
    tail_ = b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    head = b"%PDF-1.4\n1 0 obj\n<< /Length 0000000000 >>\nstream\n"
    body = os.urandom(size - len(head) - len(tail_)).replace(b"endstream", b"endstreaX")
    return head.replace(b"0000000000", b"%010d" % len(body)) + body + tail_


def multipart(patient_id: str, data: bytes, content_type: str, filename: str) -> tuple[int, AsyncIterator[bytes]]:
    fields = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                      for k, v in (("patient_id", patient_id), ("kind", "image")))
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    end = f"\r\n--{BOUNDARY}--\r\n".encode()
    view = memoryview(data)

    async def body() -> AsyncIterator[bytes]:
        yield fields + head
        for i in range(0, len(data), 256 * 1024):
            yield bytes(view[i:i + 256 * 1024])
        yield end

    return len(fields) + len(head) + len(data) + len(end), body()


async def direct_upload(http: httpx.AsyncClient, token: str, patient_id: str, data: bytes, pid: int,
                        content_type: str = "image/jpeg", filename: str = "scan.jpg") -> dict[str, float]:
    length, body = multipart(patient_id, data, content_type, filename)
    before = proc_memory_mib(pid)["VmRSS"]
    reset = reset_peak(pid)
    t0 = time.perf_counter()
    answer = await http.post("/api/v1/documents/upload", content=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length)})
    seconds = time.perf_counter() - t0
    if answer.status_code != 201:
        raise RuntimeError(f"direct upload: {answer.status_code} {answer.text[:300]}")
    peak = proc_memory_mib(pid)["VmHWM"]
    return {"seconds": seconds, "rss_growth_mib": (peak - before) if reset else float("nan")}


def boto3_upload(client: Any, bucket: str, data: bytes) -> float:
    t0 = time.perf_counter()
    client.upload_fileobj(io.BytesIO(data), bucket, f"bench/{secrets.token_hex(8)}",
                          ExtraArgs={"ContentType": "image/jpeg", "ServerSideEncryption": "AES256"},
                          Config=TransferConfig())
    return time.perf_counter() - t0


async def presigned_path(http: httpx.AsyncClient, token: str, patient_id: str, data: bytes,
                         pid: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    read0 = server_read_bytes(pid)
    created = await http.post("/api/v1/documents", headers=headers, json={
        "patient_id": patient_id, "kind": "image", "filename": "scan.jpg", "content_type": "image/jpeg",
        "size": len(data)})
    if created.status_code != 201:
        raise RuntimeError(f"create: {created.status_code} {created.text[:300]}")
    upload = created.json()["upload"]
    read1 = server_read_bytes(pid)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as s3:
        put = await s3.put(upload["url"], content=data, headers=upload["headers"])
    put_s = time.perf_counter() - t0
    if put.status_code != 200:
        raise RuntimeError(f"presigned PUT: {put.status_code} {put.text[:300]}")
    read2 = server_read_bytes(pid)
    done = await http.post(f"/api/v1/documents/{created.json()['document']['id']}/complete", headers=headers)
    if done.status_code != 200 or done.json()["status"] != "ready":
        raise RuntimeError(f"complete: {done.status_code} {done.text[:300]}")
    read3 = server_read_bytes(pid)
    return {"size_mb": round(len(data) / MB), "put_mb_per_s": round(len(data) / MB / put_s, 1),
            "server_read_during_put_bytes": read2 - read1,
            "server_read_create_put_complete_bytes": read3 - read0}


def repeats(size_mb: int, repeat: int) -> int:
    """Uploads of each path for a size: `--repeat`, or more for a small size (MIN_MB_PER_SIZE)."""
    return max(repeat, -(-MIN_MB_PER_SIZE // size_mb))


async def run(args: argparse.Namespace, tmp: Path, loop_name: str) -> dict[str, Any]:
    postgres_url = os.environ["TEST_POSTGRES_URL"]
    db_name, db_url = await create_database(postgres_url)
    port = free_port()
    bucket = f"bench-{secrets.token_hex(4)}"
    biggest = max(args.sizes) * MB
    extra = {"S3_BUCKET": bucket, "DOCUMENT_MAX_BYTES": str(biggest + MiB)}
    proc = start_server(db_url, tmp, port, extra)
    inbox = SmsInbox(tmp / "sms.log")
    s3 = boto3.client("s3", endpoint_url=os.environ["TEST_S3_ENDPOINT_URL"],
                      aws_access_key_id=os.environ["TEST_S3_ACCESS_KEY"],
                      aws_secret_access_key=os.environ["TEST_S3_SECRET_KEY"], region_name="us-east-1")
    rows: list[dict[str, Any]] = []
    try:
        await wait_ready(proc, port, tmp / "server.log")
        idle_rss = proc_memory_mib(proc.pid)["VmRSS"]
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=300) as http:
            me = await sign_in(HttpxClient(http), inbox, f"+7916{secrets.randbelow(10**7):07d}")
            token, patient_id = me["access_token"], me["user"]["id"]
            await direct_upload(http, token, patient_id, jpeg_payload(MB), proc.pid)  # warm-up
            await asyncio.to_thread(boto3_upload, s3, bucket, jpeg_payload(MB))
            for size_mb in args.sizes:
                data = jpeg_payload(size_mb * MB)
                api, raw = [], []
                # interleaved, so a passing load on the machine hits both alike
                for _ in range(repeats(size_mb, args.repeat)):
                    api.append(await direct_upload(http, token, patient_id, data, proc.pid))
                    raw.append(await asyncio.to_thread(boto3_upload, s3, bucket, data))
                api_s = statistics.median(r["seconds"] for r in api)
                raw_s = statistics.median(raw)
                rows.append({"size_mb": size_mb, "uploads": len(api), "api_mb_per_s": round(size_mb / api_s, 1),
                             "boto3_mb_per_s": round(size_mb / raw_s, 1), "ratio": round(raw_s / api_s, 2),
                             "server_peak_rss_above_before_mib": round(max(r["rss_growth_mib"] for r in api), 1)})
                del data
            pdf = await direct_upload(http, token, patient_id, pdf_payload(biggest), proc.pid,
                                      "application/pdf", "scan.pdf")
            presigned = await presigned_path(http, token, patient_id, jpeg_payload(biggest), proc.pid)
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(tmp / 'server.log')}")
        final_rss = proc_memory_mib(proc.pid)["VmRSS"]
    finally:
        inbox.close()
        stop_server(proc)
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await drop_database(postgres_url, db_name)
    return {"config": {"sizes_mb": args.sizes, "repeat": args.repeat, "loop": loop_name, "cores": os.cpu_count(),
                       "s3_part_bytes": 8 * MiB, "sse": "AES256"},
            "server_idle_rss_mib": round(idle_rss, 1), "server_rss_after_mib": round(final_rss, 1),
            "direct": rows,
            "direct_pdf": {"size_mb": max(args.sizes), "mb_per_s": round(biggest / MB / pdf["seconds"], 1),
                           "server_peak_rss_above_before_mib": round(pdf["rss_growth_mib"], 1)},
            "presigned": presigned, "server_log": server_log_lines(tmp / "server.log")}


def print_table(result: dict[str, Any]) -> None:
    print(f"\nclinic documents benchmark: 1 server worker, SeaweedFS on loopback, {result['config']['cores']} cores, "
          f"median of {result['config']['repeat']} (at least {MIN_MB_PER_SIZE} MB moved per size and path)")
    print(describe(result.get("conditions", {})))
    print(f"{'size':>6}  {'uploads':>7}  {'API MB/s':>9}  {'boto3 MB/s':>10}  {'ratio':>6}  "
          f"{'server peak RSS +MiB':>21}")
    for r in result["direct"]:
        print(f"{r['size_mb']:>4}MB  {r['uploads']:>7}  {r['api_mb_per_s']:>9}  {r['boto3_mb_per_s']:>10}  "
              f"{r['ratio']:>6}  {r['server_peak_rss_above_before_mib']:>21}")
    p, d = result["presigned"], result["direct_pdf"]
    print(f"direct PDF {d['size_mb']} MB (scanned on the way): {d['mb_per_s']} MB/s, "
          f"server peak RSS +{d['server_peak_rss_above_before_mib']} MiB")
    print(f"presigned {p['size_mb']} MB: PUT {p['put_mb_per_s']} MB/s straight to S3; bytes the server read "
          f"during the PUT: {p['server_read_during_put_bytes']}, during create+PUT+complete: "
          f"{p['server_read_create_put_complete_bytes']}")
    print(f"server RSS idle {result['server_idle_rss_mib']} MiB, after the run {result['server_rss_after_mib']} MiB")
    for line in result["server_log"]:
        print(f"server log: {line}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.documents", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 100],
                   help="file sizes in MB (default 1,20,100)")
    p.add_argument("--repeat", type=int, default=3, help="uploads per size and path (default 3)")
    args = p.parse_args(argv)
    if not all(1 <= s <= 1000 for s in args.sizes) or not 1 <= args.repeat <= 20:
        p.error("--sizes 1..1000 MB each, --repeat 1..20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = Conditions.start()
    result = run_benchmark(lambda tmp, loop: run(args, tmp, loop))
    if result is None:
        return 2
    result["conditions"] = conditions.finish()
    print_table(result)
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
