"""ICE servers for call clients: STUN, and TURN with coturn's REST-scheme credentials (use-auth-secret).

The username is `<expiry unix time>:<user id>` and the credential `base64(HMAC-SHA1(TURN_SECRET, username))`:
coturn recomputes it from its static-auth-secret and refuses it once the expiry has passed, so nothing is
stored and a credential handed out cannot be used for longer than TURN_CREDENTIAL_SECONDS. They are handed only to
a participant of a live call (`relay`): a relay is for the call's media to the SFU, not for any account's traffic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from uuid import UUID

from app.settings import Settings


@dataclass(frozen=True, slots=True)
class IceServer:
    urls: list[str]
    username: str | None = None
    credential: str | None = None


def url_list(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def turn_credential(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def ice_servers(settings: Settings, user_id: UUID, now: float | None = None, relay: bool = True) -> list[IceServer]:
    """STUN as configured; TURN only for `relay` (a live call's participant) and with a secret (without one a client
    could not authenticate anyway)."""
    servers = []
    if stun := url_list(settings.stun_urls):
        servers.append(IceServer(urls=stun))
    turn = url_list(settings.turn_urls)
    if relay and turn and settings.turn_secret:
        expiry = int(now if now is not None else time.time()) + settings.turn_credential_seconds
        username = f"{expiry}:{user_id}"
        servers.append(IceServer(urls=turn, username=username,
                                 credential=turn_credential(settings.turn_secret, username)))
    return servers
