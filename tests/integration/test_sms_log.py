"""The log SMS backend: many messages at once land whole, in the order they were sent, each in the file by
the time its send returns (a code is read from it straight after the request)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from app.notifications.sms import LogSms


async def test_parallel_sends_land_whole_and_in_order(tmp_path: Path) -> None:
    sms = LogSms(tmp_path / "deep" / "sms.log")
    seen: list[int] = []

    async def send(i: int) -> None:
        await sms.send(f"+7916{i:07d}", f"Clinic login code: {i:06d}. Do not share it with anyone.")
        lines = (tmp_path / "deep" / "sms.log").read_text().splitlines()
        seen.append(len(lines))
        assert any(json.loads(line)["to"] == f"+7916{i:07d}" for line in lines)  # written when send returns

    await asyncio.gather(*(send(i) for i in range(300)))
    lines = (tmp_path / "deep" / "sms.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["to"] for e in entries] == [f"+7916{i:07d}" for i in range(300)]  # send order
    assert all(set(e) == {"to", "text", "sent_at"} for e in entries)
    assert max(seen) == 300
    await sms.aclose()


async def test_a_failed_write_fails_its_senders_and_the_next_batch_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    broken = LogSms(blocker / "sms.log")  # its directory cannot be made
    results = await asyncio.gather(*(broken.send("+79160000001", "x") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    blocker.unlink()
    await broken.send("+79160000002", "y")  # the writer recovers once the path can be written
    assert json.loads((blocker / "sms.log").read_text())["to"] == "+79160000002"
    await broken.aclose()
