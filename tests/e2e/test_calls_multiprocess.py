"""Calls across processes: API instances placing rooms on an SFU node process (SFU_URLS) and proxying offers to
it; media between two aiortc peers through that node; the node killed, the call ends `failed` on both sides.

The real profile runs two API processes on PostgreSQL and Redis (the node in Redis's registry, the doctor on one
instance, the patient on the other); the embedded one a single API process that asks the node directly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import websockets
from aiortc import RTCSessionDescription
from websockets.asyncio.client import ClientConnection

from app.rtc.sfu.ice import loopback_candidates
from app.settings import Settings
from tests.conftest import PROFILE, Session
from tests.e2e.browser import Peer
from tests.e2e.conftest import servers
from tests.e2e.test_gateway import frames_until, nothing_pending, ws_url
from tests.harness import free_port
from tests.integration.conftest import visit_until  # noqa: F401  (a shared fixture)
from tests.sfu_nodes import SECRET, node_process, node_server

WAIT = 20.0  # seconds media or an event may take before the test fails (a busy two-core machine)
FRAMES = 20  # frames of each kind each side must receive
HEARTBEAT = "1"  # the node's (the default); its registration lives three of them


def ended(frame: dict[str, Any], call_id: str) -> bool:
    return frame["type"] == "call.ended" and frame["data"]["call_id"] == call_id


async def call_event(socket: ClientConnection, kind: str, call_id: str) -> dict[str, Any]:
    """The data of the first `kind` event of this call on the socket."""
    frames = await frames_until(socket, lambda f: f["type"] == kind and f["data"].get("call_id") == call_id)
    data: dict[str, Any] = frames[-1]["data"]
    return data


async def frames(who: str, peer: Peer, kind: str) -> None:
    """Until the peer has received FRAMES frames of this kind."""
    try:
        await asyncio.wait_for(peer.received.reached(kind, FRAMES), WAIT)
    except TimeoutError:
        raise AssertionError(f"the {who} received {peer.received.counts} in {WAIT}s "
                             f"(connection {peer.pc.connectionState})") from None


async def offer_through(api: httpx.AsyncClient, call_id: str, peer: Peer) -> None:
    offer = await peer.offer()
    answer = await api.post(f"/api/v1/calls/{call_id}/rtc/offer", json={"sdp": offer.sdp, "type": offer.type})
    assert answer.status_code == 200, answer.text
    await peer.pc.setRemoteDescription(RTCSessionDescription(**answer.json()))


async def test_a_call_across_instances_through_an_sfu_node_fails_when_the_node_dies(
    test_settings: Settings, patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any],  # noqa: F811
) -> None:
    doctor, visit_type = await specialist(), await service()
    await visit_until(patient, doctor, visit_type, "completed", nth=1)  # online visits follow an in-person one
    visit = await visit_until(patient, doctor, visit_type, nth=2, fmt="online")
    async with node_process(test_settings, SFU_HEARTBEAT_SECONDS=HEARTBEAT) as node, \
            servers(test_settings, 2 if PROFILE == "real" else 1, SFU_URLS=node.url, SFU_SECRET=SECRET,
                    SFU_HEARTBEAT_SECONDS=HEARTBEAT, CALL_NODE_CHECK_SECONDS=HEARTBEAT) as urls:
        base_a, base_b = urls[0], urls[-1]
        doctor_peer, patient_peer = Peer(), Peer()
        with loopback_candidates():
            async with httpx.AsyncClient(base_url=base_a, headers=doctor.headers) as api_a, \
                    httpx.AsyncClient(base_url=base_b, headers=patient.headers) as api_b, \
                    websockets.connect(ws_url(base_a, doctor)) as doctor_ws, \
                    websockets.connect(ws_url(base_b, patient)) as patient_ws:
                try:
                    await nothing_pending(doctor_ws)  # both sockets registered before the call starts
                    await nothing_pending(patient_ws)
                    started = await api_a.post(f"/api/v1/consultations/{visit['id']}/calls")
                    assert started.status_code == 201, started.text
                    call_id = started.json()["id"]
                    assert (await call_event(patient_ws, "call.incoming", call_id))["state"] == "ringing"

                    doctor_up, patient_up = doctor_peer.connected(), patient_peer.connected()
                    await offer_through(api_a, call_id, doctor_peer)  # the doctor offers while it rings
                    accepted = await api_b.post(f"/api/v1/calls/{call_id}/accept")
                    assert accepted.status_code == 200, accepted.text
                    assert (await call_event(doctor_ws, "call.accepted", call_id))["state"] == "active"
                    await offer_through(api_b, call_id, patient_peer)
                    await asyncio.wait_for(asyncio.gather(doctor_up, patient_up), WAIT)
                    for who, peer in (("doctor", doctor_peer), ("patient", patient_peer)):
                        for kind in ("video", "audio"):  # each receives the other's video and audio
                            await frames(who, peer, kind)
                    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SECRET}"}) as control:
                        load = (await control.get(f"{node.url}/health")).json()
                    assert (load["rooms"], load["participants"]) == (1, 2)  # the room is on the node

                    node.kill()  # no goodbye: its registration just stops being refreshed
                    for socket in (doctor_ws, patient_ws):
                        frame = (await asyncio.wait_for(frames_until(socket, lambda f: ended(f, call_id)),
                                                        WAIT))[-1]
                        assert frame["data"]["end_reason"] == "failed"
                    for api in (api_a, api_b):
                        call = (await api.get(f"/api/v1/calls/{call_id}")).json()
                        assert (call["state"], call["end_reason"]) == ("ended", "failed")
                finally:
                    await doctor_peer.close()
                    await patient_peer.close()


async def test_an_offer_to_a_dead_node_is_503_sfu_unavailable(
    test_settings: Settings, patient: Session, specialist: Callable[..., Any], service: Callable[..., Any],
    visit_until: Callable[..., Any],  # noqa: F811
) -> None:
    """A node that dies between the call's start and an offer: the offer is a clear 503 at once, not a hang."""
    doctor, visit_type = await specialist(), await service()
    await visit_until(patient, doctor, visit_type, "completed", nth=1)
    visit = await visit_until(patient, doctor, visit_type, nth=2, fmt="online")
    port = free_port()
    # the node watch looks rarely here, so the call is still live when the offer comes
    async with servers(test_settings, 1, SFU_URLS=f"http://127.0.0.1:{port}", SFU_SECRET=SECRET,
                       SFU_HEARTBEAT_SECONDS=HEARTBEAT, CALL_NODE_CHECK_SECONDS="600") as [base], \
            httpx.AsyncClient(base_url=base, headers=doctor.headers) as api:
        async with node_server(test_settings, port, sfu_heartbeat_seconds=float(HEARTBEAT)):
            started = await api.post(f"/api/v1/consultations/{visit['id']}/calls")
            assert started.status_code == 201, started.text
        call_id = started.json()["id"]  # its node is gone now
        answer = await api.post(f"/api/v1/calls/{call_id}/rtc/offer", json={"sdp": "v=0\r\n", "type": "offer"})
        assert answer.status_code == 503, answer.text
        assert answer.json()["extra"]["reason"] == "sfu_unavailable"
        with_no_node = await api.post(f"/api/v1/calls/{call_id}/end")
        assert with_no_node.status_code == 200, with_no_node.text  # ending needs no node
