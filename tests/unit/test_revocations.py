"""What one process remembers of ended access, and when it tells its sockets."""

from __future__ import annotations

import time
from uuid import uuid4

from app.revocation import Revocation, Revocations


def test_a_user_revocation_ends_older_tokens_only_and_a_login_revocation_that_login_only() -> None:
    revocations, user, login, other = Revocations(900), uuid4(), uuid4(), uuid4()
    now = time.time()
    revocations.apply(Revocation(user_id=user, at=now))
    assert not revocations.allows(user, login, now - 0.001)  # issued a moment before: ended
    assert revocations.allows(user, login, now)  # issued after (a refresh following a role change)
    assert revocations.allows(uuid4(), login, now - 60)  # another user: untouched
    revocations.apply(Revocation(user_id=user, at=now, sid=login))
    assert not revocations.allows(user, login, now + 60)  # that login, whenever its token was issued
    assert revocations.allows(user, other, now + 60)


def test_each_revocation_reaches_the_listeners_once_and_stale_ones_never() -> None:
    revocations, heard = Revocations(900), []
    revocations.on_revocation(heard.append)
    fresh = Revocation(user_id=uuid4(), at=time.time())
    for _ in range(3):  # from this process, the bus, a reload: the same revocation
        revocations.apply(fresh)
    revocations.apply(Revocation(user_id=uuid4(), at=time.time() - 3600))  # every token it could end is gone
    assert heard == [fresh]
