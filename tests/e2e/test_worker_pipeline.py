"""The outbox worker's passes overlap: while one waits for the provider's answers, the next claims, sends and
records other rows; the held row is still delivered once its answer comes."""

from __future__ import annotations

import asyncio

from app.settings import Settings
from tests.e2e.test_worker_process import (
    Maker,
    dispatched,
    eventually,
    notices,
    people_with_devices,
    worker_process,
    world,
)
from tests.standins.fixtures import FcmFixture

__all__ = ["world"]  # the fixture, used by the test below


async def test_a_pass_waiting_for_fcm_does_not_hold_back_the_next(
    world: tuple[Settings, Maker], fcm_standin: FcmFixture,
) -> None:
    settings, maker = world
    [(first_user, first_token), (second_user, second_token)] = await people_with_devices(maker, 2)
    hold = fcm_standin.hold_sends()
    # a long lease and FCM timeout: the held pass waits far longer than this test
    async with worker_process(settings, fcm_standin, OUTBOX_LEASE_SECONDS="600", FCM_TIMEOUT_SECONDS="300"):
        [held] = await notices(maker, [first_user])
        await asyncio.to_thread(hold.wait_arrived, 1, 90.0)  # its pass is sending, the answer not back
        fcm_standin.hold_no_more()
        [later] = await notices(maker, [second_user])

        async def later_delivered() -> bool:
            return await dispatched(maker, [later]) == 1

        await eventually(later_delivered, "a row committed while another pass waits is delivered")
        assert await dispatched(maker, [held]) == 0  # still waiting for its answer
        hold.release()

        async def held_delivered() -> bool:
            return await dispatched(maker, [held]) == 1

        await eventually(held_delivered, "the held row is delivered once answered")
    tokens = [r.token for r in fcm_standin.requests]
    assert tokens.count(first_token) == 1
    assert tokens.count(second_token) == 1
