"""Access tokens (short JWTs, verified without the database) and opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
from uuid import UUID

import jwt

from app.access import Role, Viewer
from app.errors import NotAuthenticated
from app.revocation import Revocations
from app.settings import Settings

ALGORITHM = "HS256"
REQUIRED_CLAIMS = ["exp", "iat", "sub", "typ"]
VERIFIED_CACHE = 20_000  # tokens whose signature was checked: clients reuse one for 15 minutes


class TokenIssuer:
    def __init__(self, settings: Settings, revocations: Revocations | None = None) -> None:
        keys = settings.signing_keys
        self._signing_kid, self._signing_secret = keys[0]
        self._verifying = dict(keys)  # old keys keep verifying during a rotation overlap
        self.access_seconds = settings.access_token_seconds
        self.revocations = revocations or Revocations(settings.access_token_seconds)
        self._verified: dict[str, tuple[Viewer, float, float]] = {}  # token -> viewer, expiry, issued at

    def issue_access(self, user_id: UUID, roles: list[str], timezone: str | None = None,
                     sid: UUID | None = None) -> str:
        now = time.time()
        # iat to the millisecond: a revocation and a token issued just after it fall in the same second
        claims: dict[str, object] = {"sub": str(user_id), "typ": "access", "iat": round(now, 3),
                                     "exp": int(now) + self.access_seconds, "roles": roles}
        if timezone:
            claims["tz"] = timezone
        if sid is not None:
            claims["sid"] = str(sid)
        return jwt.encode(claims, self._signing_secret, algorithm=ALGORITHM, headers={"kid": self._signing_kid})

    def viewer_from(self, token: str) -> Viewer:
        """The caller a token names; a token verified before is not verified again until it expires, but
        whether its access was revoked since is asked every time (memory only: no I/O)."""
        known = self._verified.get(token)
        if known is None or known[1] <= time.time():
            known = self._verify(token)
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()  # crude but bounded; a busy process refills it within seconds
            self._verified[token] = known
        viewer, _, issued_at = known
        if not self.revocations.allows(viewer.id, viewer.sid, issued_at):
            raise NotAuthenticated("this access was revoked (signed out, deactivated or changed): sign in again",
                                   "token_revoked")
        return viewer

    def _verify(self, token: str) -> tuple[Viewer, float, float]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            secret = self._verifying.get(kid) if isinstance(kid, str) else None
            if secret is None:
                raise NotAuthenticated("unknown signing key", "token_invalid")
            claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError as exc:
            raise NotAuthenticated("access token expired", "token_expired") from exc
        except jwt.PyJWTError as exc:
            raise NotAuthenticated("invalid access token", "token_invalid") from exc
        if claims["typ"] != "access":
            raise NotAuthenticated("not an access token", "token_invalid")
        try:
            zone, sid = claims.get("tz"), claims.get("sid")
            viewer = Viewer(id=UUID(claims["sub"]), roles=frozenset(Role(r) for r in claims.get("roles", [])),
                            timezone=zone if isinstance(zone, str) else None,
                            sid=UUID(sid) if isinstance(sid, str) else None)
            return viewer, float(claims["exp"]), float(claims["iat"])
        except (ValueError, TypeError) as exc:
            raise NotAuthenticated("invalid access token", "token_invalid") from exc


def new_refresh_token() -> tuple[str, str]:
    """(token for the client, hash to store). 256 random bits need no slow hash."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
