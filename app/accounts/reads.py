"""The accounts' hot reads (app/reads.py): who am I, and my dependents, each one statement without the ORM."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import bindparam, or_, select

from app.access import Viewer
from app.accounts.models import User
from app.accounts.schemas import DependentOut, MeOut
from app.errors import NotAuthenticated
from app.notifications.models import STAFF_TOPICS, TOPICS
from app.reads import Reads, Row

_DEPENDENT = (User.id, User.full_name, User.birth_date, User.sex, User.relation, User.legal_basis)

# the caller and the accounts they manage, in one statement; the caller's own row is the one with their id
ME_AND_DEPENDENTS = select(
    *_DEPENDENT, User.phone, User.roles, User.specialties, User.timezone, User.active, User.is_staff,
    User.questionnaire, User.quiet_hours_start, User.quiet_hours_end, User.push_topics,
).where(or_(User.id == bindparam("uid"), User.guardian_id == bindparam("uid"))).order_by(User.id)

TIMEZONE_OF = select(User.timezone).where(User.id == bindparam("uid"))
DEPENDENTS = select(*_DEPENDENT).where(User.guardian_id == bindparam("uid")).order_by(User.id)


def dependent(row: Row) -> DependentOut:
    return DependentOut(id=row["id"], full_name=row["full_name"], birth_date=row["birth_date"], sex=row["sex"],
                        relation=row["relation"], legal_basis=row["legal_basis"])


async def me(reads: Reads, viewer: Viewer) -> MeOut:
    rows = await reads.all(ME_AND_DEPENDENTS, uid=viewer.id)
    own = next((r for r in rows if r["id"] == viewer.id), None)
    if own is None:
        raise NotAuthenticated("account no longer exists", "account_missing")
    staff_topics = own["push_topics"] if own["push_topics"] is not None else STAFF_TOPICS
    return MeOut(id=own["id"], phone=own["phone"], full_name=own["full_name"], roles=list(own["roles"]),
                 specialties=list(own["specialties"]), timezone=own["timezone"], active=own["active"],
                 birth_date=own["birth_date"], sex=own["sex"], questionnaire=dict(own["questionnaire"]),
                 dependents=[dependent(r) for r in rows if r["id"] != viewer.id],
                 quiet_hours_start=own["quiet_hours_start"], quiet_hours_end=own["quiet_hours_end"],
                 push_topics=list(staff_topics if own["is_staff"] else TOPICS))


async def dependents(reads: Reads, viewer: Viewer) -> list[DependentOut]:
    return [dependent(r) for r in await reads.all(DEPENDENTS, uid=viewer.id)]


async def timezone_of(reads: Reads, user_id: UUID, clinic_timezone: str) -> str:
    """The caller's stored zone (it may have changed since their token was issued)."""
    row = await reads.one(TIMEZONE_OF, uid=user_id)
    return (row["timezone"] if row else None) or clinic_timezone
