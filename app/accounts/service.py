"""Accounts: phone login, token rotation, profiles, dependents, staff, patient cards, devices.

No HTTP here: controllers, the CLI and tests call these methods alike.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from msgspec import UNSET
from sqlalchemy import Table, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from app import access, writes
from app.access import Role, Viewer
from app.accounts.models import AccessRevocation, Device, OtpCode, RefreshToken, User
from app.accounts.phones import normalise_phone
from app.accounts.schemas import DependentIn, DeviceIn, MePatch, StaffIn, StaffPatch
from app.accounts.tokens import TokenIssuer, hash_refresh_token, new_refresh_token
from app.db import dialect_insert
from app.errors import Conflict, DomainError, Forbidden, Invalid, NotAuthenticated, NotVisible, TooMany
from app.limits import RateLimiter, Step
from app.notifications.sms import SmsSender
from app.revocation import Revocation
from app.settings import Settings
from app.specialties import Specialty

# The login path in Core statements on the tables, built once: no unit of work, identity map or per-call
# statement building on the way (the ORM's share of a login was most of its CPU).
OTP_CODES: Table = OtpCode.__table__  # type: ignore[assignment]
USERS: Table = User.__table__  # type: ignore[assignment]
REFRESH_TOKENS: Table = RefreshToken.__table__  # type: ignore[assignment]
# the right code, fresh and with tries left, is spent in one statement; the hash is keyed, so comparing it
# in SQL tells a guesser nothing (he cannot compute the hash of his own guess)
SPEND_CODE = (delete(OTP_CODES).where(OTP_CODES.c.phone == bindparam("for_phone"),
                                      OTP_CODES.c.code_hash == bindparam("guess_hash"),
                                      OTP_CODES.c.attempts < bindparam("max_attempts"),
                                      OTP_CODES.c.expires_at > bindparam("now"))
              .returning(OTP_CODES.c.id))
# counting a try and reading the code is one statement, so parallel guesses cannot exceed the limit
COUNT_TRY = (update(OTP_CODES).where(OTP_CODES.c.phone == bindparam("for_phone"),
                                     OTP_CODES.c.attempts < bindparam("max_attempts"))
             .values(attempts=OTP_CODES.c.attempts + 1)
             .returning(OTP_CODES.c.id, OTP_CODES.c.code_hash, OTP_CODES.c.expires_at, OTP_CODES.c.attempts))
SIGNING_IN = select(USERS.c.id, USERS.c.phone, USERS.c.full_name, USERS.c.roles, USERS.c.specialties,
                    USERS.c.timezone, USERS.c.active).where(USERS.c.phone == bindparam("phone"))
NEW_USER = USERS.insert()
NEW_REFRESH_TOKEN = REFRESH_TOKENS.insert()
_otp_upserts: dict[str, Any] = {}


def otp_upsert(session: AsyncSession) -> Any:
    """A phone's one live code replaced in one statement (the row is the phone's: a unique key)."""
    name = session.get_bind().dialect.name
    if name not in _otp_upserts:
        upsert = dialect_insert(session)(OTP_CODES)
        _otp_upserts[name] = upsert.on_conflict_do_update(
            index_elements=[OTP_CODES.c.phone],
            set_={c: upsert.excluded[c] for c in ("id", "code_hash", "expires_at", "attempts", "created_at",
                                                  "updated_at")})
    return _otp_upserts[name]


# the account and its dependents in one round trip; built once, it is the hottest read of all
ME_AND_DEPENDENTS = (select(User).where(or_(User.id == bindparam("uid"), User.guardian_id == bindparam("uid")))
                     .order_by(User.id))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Login:
    user: User
    access_token: str
    refresh_token: str
    expires_in: int


@dataclass(frozen=True, slots=True)
class Me:
    user: User
    dependents: list[User]


class AccountService:
    def __init__(self, session: AsyncSession, settings: Settings, tokens: TokenIssuer,
                 limiter: RateLimiter, sms: SmsSender) -> None:
        self.session = session
        self.settings = settings
        self.tokens = tokens
        self.limiter = limiter
        self.sms = sms

    # --- login by one-time code ----------------------------------------------------------------

    def _code_hash(self, phone: str, code: str) -> str:
        # keyed, so a leaked table does not give the codes away to a 10^6 brute force
        return hmac.new(self.settings.secret_key.encode(), f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()

    async def request_code(self, raw_phone: str, client_ip: str) -> int:
        phone = normalise_phone(raw_phone, self.settings.default_region)
        refused, wait = await self.limiter.hit_in_turn([  # one round trip for the three
            Step(f"otp:ip:{client_ip}", self.settings.otp_per_ip_per_hour, 3600),
            # a new code must not reopen a locked phone
            Step(f"otp:fail:{phone}", self.settings.otp_failures_per_phone_per_hour, 3600, counts=False),
            Step(f"otp:phone:{phone}", 1, self.settings.otp_resend_seconds)])
        if refused == 0:
            raise TooMany("too many codes were requested from this address: try again later", wait)
        if refused == 1:
            raise self._locked(wait)
        if refused == 2:
            raise TooMany("a code was sent to this phone moments ago", wait, "otp_resend_too_soon")
        code = f"{secrets.randbelow(10**self.settings.otp_length):0{self.settings.otp_length}d}"
        now = utcnow()
        async with writes.autocommit(self.session) as tx:  # the code is stored before it can reach the phone
            await tx.run(otp_upsert(self.session), id=uuid7(), phone=phone, code_hash=self._code_hash(phone, code),
                         attempts=0, expires_at=now + dt.timedelta(seconds=self.settings.otp_ttl_seconds),
                         created_at=now, updated_at=now)
        await self.sms.send(phone, f"Clinic login code: {code}. Do not share it with anyone.")
        return self.settings.otp_ttl_seconds

    async def login(self, raw_phone: str, code: str) -> Login:
        phone = normalise_phone(raw_phone, self.settings.default_region)
        if len(code) != self.settings.otp_length or not code.isascii() or not code.isdigit():
            raise Invalid(f"the code is {self.settings.otp_length} digits", "otp_malformed")
        # every guess is counted against the phone's budget before the code is compared, in one atomic step, so
        # parallel guesses cannot all slip in under the limit; a locked phone refuses every code alike, the right
        # one too, so the answer never tells a guesser that he has hit it
        failures = f"otp:fail:{phone}"  # per phone, across its codes: fresh codes bring no fresh guesses
        budget = self.settings.otp_failures_per_phone_per_hour
        wait = await self.limiter.hit(failures, budget, 3600)
        if wait:
            raise self._locked(wait)
        wrong = False
        try:
            return await self._use_code(phone, code, failures, budget)
        except DomainError as exc:
            wrong = exc.extra["reason"] in ("otp_invalid", "otp_locked")
            raise
        finally:
            if not wrong:  # signed in, or no guess at all (no code, an expired one): the budget is given back
                await self.limiter.give_back(failures)

    async def _use_code(self, phone: str, code: str, failures: str, budget: int) -> Login:
        code_hash, now, tries = self._code_hash(phone, code), utcnow(), self.settings.otp_max_attempts
        login: Login | None = None
        # each statement commits by itself: the code is spent first (a crash after it only costs a new code),
        # then the account read (made), then the refresh token written: no BEGIN and COMMIT round trips
        async with writes.autocommit(self.session) as tx:
            spent = await tx.one(SPEND_CODE, for_phone=phone, guess_hash=code_hash, max_attempts=tries, now=now)
            if spent is not None:
                login = await self._sign_in(tx, phone, now)
        if spent is None:  # a wrong, expired, used-up or missing code: count the try and say which
            await self._count_try(phone, code_hash, failures, budget, now)
            async with writes.transaction(self.session, own=False) as tx:  # with the session's spend
                login = await self._sign_in(tx, phone, now)
        if login is None:  # the code is spent all the same (committed above)
            raise inactive()
        return login

    async def _sign_in(self, tx: writes.Tx, phone: str, now: dt.datetime) -> Login | None:
        """The phone's account signed in (a new phone becomes a patient); None: it is deactivated."""
        account = await tx.one(SIGNING_IN, phone=phone)
        if account is None:  # a new phone becomes a patient
            user = User(id=uuid7(), phone=phone, full_name="", roles=[Role.PATIENT.value], specialties=[],
                        timezone=self.settings.clinic_timezone, active=True)
            await tx.run(NEW_USER, id=user.id, phone=phone, full_name="", roles=user.roles, specialties=[],
                         timezone=user.timezone, is_staff=False, active=True, questionnaire={}, created_at=now,
                         updated_at=now)
        elif not account["active"]:
            return None
        else:  # the fields a login answers with, not a loaded (identity-mapped) account
            user = User(id=account["id"], phone=account["phone"], full_name=account["full_name"],
                        roles=account["roles"], specialties=account["specialties"], timezone=account["timezone"],
                        active=account["active"])
        return await self._start_session(user, uuid4(), tx)

    async def _count_try(self, phone: str, code_hash: str, failures: str, budget: int, now: dt.datetime) -> None:
        """The code was not spent: count the try against it and refuse, saying why; returns only when the
        right code turns out to be there after all (issued in between), spent now."""
        row = (await self.session.execute(COUNT_TRY, {"for_phone": phone,
                                                      "max_attempts": self.settings.otp_max_attempts})).first()
        if row is None:
            if await self.session.scalar(select(OtpCode.id).where(OtpCode.phone == phone)) is not None:
                raise NotAuthenticated(f"all {self.settings.otp_max_attempts} tries of this code are used up: "
                                       "request a new code", "otp_attempts_exhausted")
            raise NotAuthenticated("no code is waiting for this phone: request a new one", "otp_missing")
        if row.expires_at <= now:
            await self._burn_code(row.id)
            raise NotAuthenticated("the code has expired: request a new one", "otp_expired")
        if not hmac.compare_digest(row.code_hash, code_hash):
            # an exhausted code stays (until a new one replaces it) so that the next try can say so
            await self.session.commit()  # the failed try counts even though we refuse
            used, left = await self.limiter.peek(failures)
            if used >= budget:  # that was the last guess of the hour
                raise self._locked(left)
            raise NotAuthenticated("the code does not match the one sent to this phone", "otp_invalid",
                                   attempts_left=self.settings.otp_max_attempts - row.attempts)
        spent = await self.session.execute(delete(OtpCode).where(OtpCode.id == row.id).returning(OtpCode.id))
        if spent.one_or_none() is None:  # a parallel request used this code first
            raise NotAuthenticated("no code is waiting for this phone: request a new one", "otp_missing")

    def _locked(self, wait: int) -> TooMany:
        return TooMany("too many wrong codes for this phone: every code is refused until Retry-After has passed",
                       wait, "otp_locked")

    async def _burn_code(self, code_id: UUID) -> None:
        await self.session.execute(delete(OtpCode).where(OtpCode.id == code_id))
        await self.session.commit()

    async def _start_session(self, user: User, family_id: UUID, tx: writes.Tx | None = None) -> Login:
        token, token_hash = new_refresh_token()
        now = utcnow()
        await (tx or writes.SessionTx(self.session)).run(
            NEW_REFRESH_TOKEN, id=uuid7(), user_id=user.id, family_id=family_id, token_hash=token_hash,
            expires_at=now + dt.timedelta(days=self.settings.refresh_token_days), used_at=None, revoked_at=None,
            created_at=now, updated_at=now)
        return Login(user=user, access_token=self.tokens.issue_access(user.id, user.roles, user.timezone,
                                                                      sid=family_id),
                     refresh_token=token, expires_in=self.tokens.access_seconds)

    # --- refresh rotation and logout -----------------------------------------------------------

    async def _lock_user(self, user_id: UUID) -> User | None:
        """Refresh, logout and staff changes of one user take turns: a refresh never issues roles a concurrent
        change has just revoked, and an "every login ends" never misses a refresh token being issued. On
        PostgreSQL a row lock (NO KEY UPDATE: rows referencing the user are not blocked); SQLite has one writer
        at a time, and each of these writes before it reads what it issues."""
        return await self.session.scalar(select(User).where(User.id == user_id)
                                         .with_for_update(key_share=True)
                                         .execution_options(populate_existing=True))

    async def refresh(self, refresh_token: str) -> Login:
        token_hash, now = hash_refresh_token(refresh_token), utcnow()
        owner = await self.session.scalar(select(RefreshToken.user_id).where(RefreshToken.token_hash == token_hash))
        if owner is None:
            raise NotAuthenticated("the refresh token is unknown or expired: sign in again", "refresh_invalid")
        await self._lock_user(owner)  # before the token row: logout locks in the same order
        spent = await self.session.execute(  # spending is one conditional update: one winner
            update(RefreshToken)
            .where(RefreshToken.token_hash == token_hash, RefreshToken.used_at.is_(None),
                   RefreshToken.revoked_at.is_(None), RefreshToken.expires_at > now)
            .values(used_at=now)
            .returning(RefreshToken.user_id, RefreshToken.family_id)
        )
        row = spent.one_or_none()
        if row is not None:  # read after the write: on SQLite the write lock is what serialises
            user = await self.session.get(User, row.user_id, populate_existing=True)
            if user is None:
                raise NotAuthenticated("the account no longer exists: sign in again", "refresh_invalid")
            if not user.active:
                raise inactive()
            return await self._start_session(user, family_id=row.family_id)
        known = await self.session.scalar(select(RefreshToken).where(RefreshToken.token_hash == token_hash))
        if known is not None and (known.used_at is not None or known.revoked_at is not None):
            if await self.session.scalar(select(User.active).where(User.id == known.user_id)) is False:
                raise inactive()  # its logins were ended by the deactivation, not by a thief
            # a spent token came back: someone holds a stolen copy, so the whole login ends, its access tokens too
            await self._revoke(RefreshToken.family_id == known.family_id)
            await self._end_access(known.user_id, sid=known.family_id)
            raise NotAuthenticated("refresh token reused: please sign in again", "refresh_reused")
        raise NotAuthenticated("the refresh token is unknown or expired: sign in again", "refresh_invalid")

    async def logout(self, viewer: Viewer, refresh_token: str | None) -> None:
        await self._lock_user(viewer.id)  # a refresh in flight commits its new token first, and is revoked here
        if refresh_token is None:  # no token named: end every session of this user
            await self._revoke(RefreshToken.user_id == viewer.id)
            await self._end_access(viewer.id)
            return
        family = await self.session.scalar(select(RefreshToken.family_id).where(
            RefreshToken.token_hash == hash_refresh_token(refresh_token), RefreshToken.user_id == viewer.id))
        if family is None and viewer.sid is not None:  # a token we do not know: the caller's own login ends
            family = viewer.sid
        if family is not None:
            await self._revoke(RefreshToken.family_id == family, RefreshToken.user_id == viewer.id)
            await self._end_access(viewer.id, sid=family)

    async def _revoke(self, *which: Any) -> None:
        await self.session.execute(
            update(RefreshToken).where(*which, RefreshToken.revoked_at.is_(None)).values(revoked_at=utcnow()))

    async def _end_access(self, user_id: UUID, sid: UUID | None = None) -> None:
        """End access tokens now, not at their expiry: one login's (sid), or every one the user holds.
        Persisted and committed first, then announced to every instance (which also closes the sockets)."""
        revocation = Revocation(user_id=user_id, sid=sid, at=time.time())
        self.session.add(AccessRevocation(user_id=user_id, family_id=sid,
                                          not_before=dt.datetime.fromtimestamp(revocation.at, dt.UTC)))
        await self.session.commit()
        await self.tokens.revocations.announce(revocation)

    # --- the caller's own account and dependents -----------------------------------------------

    async def me(self, viewer: Viewer) -> Me:
        rows = (await self.session.scalars(ME_AND_DEPENDENTS, {"uid": viewer.id})).all()
        user = next((u for u in rows if u.id == viewer.id), None)
        if user is None:
            raise NotAuthenticated("account no longer exists", "account_missing")
        return Me(user=user, dependents=[u for u in rows if u.id != viewer.id])

    async def update_me(self, viewer: Viewer, patch: MePatch) -> Me:
        me = await self.me(viewer)
        changes = {f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not UNSET}
        if "timezone" in changes:
            check_timezone(changes["timezone"])
        if "birth_date" in changes:
            check_birth_date(changes["birth_date"])
        if "full_name" in changes:
            changes["full_name"] = clean_name(changes["full_name"])
        if "sex" in changes:
            changes["sex"] = changes["sex"].value
        if "push_topics" in changes and not me.user.is_staff:
            raise Invalid("patients get every push; topics are chosen by staff", "push_topics_staff_only")
        if changes.get("push_topics") is not None:
            changes["push_topics"] = sorted(set(changes["push_topics"]))
        quiet = (changes.get("quiet_hours_start", me.user.quiet_hours_start),
                 changes.get("quiet_hours_end", me.user.quiet_hours_end))
        if (quiet[0] is None) != (quiet[1] is None):
            raise Invalid("quiet hours need both a start and an end", "quiet_hours_incomplete")
        for field, value in changes.items():
            setattr(me.user, field, value)
        await self.session.flush()
        return me

    async def add_dependent(self, viewer: Viewer, data: DependentIn) -> User:
        check_birth_date(data.birth_date)
        guardian = await self.session.get(User, viewer.id)
        if guardian is None or guardian.guardian_id is not None:
            raise NotVisible("guardian not found")
        count = await self.session.scalar(select(func.count()).select_from(User).where(User.guardian_id == viewer.id))
        if (count or 0) >= self.settings.dependents_per_guardian:  # a family never has this many; a script does
            raise Conflict(f"an account manages at most {self.settings.dependents_per_guardian} dependents",
                           "too_many_dependents", limit=self.settings.dependents_per_guardian)
        dependent = User(
            phone=None, full_name=clean_name(data.full_name), birth_date=data.birth_date,
            sex=data.sex.value if data.sex else None,
            roles=[Role.PATIENT.value], timezone=guardian.timezone, guardian_id=viewer.id,
            relation=data.relation.value, legal_basis=data.legal_basis.strip(),
        )
        self.session.add(dependent)
        await self.session.flush()
        return dependent

    async def acting_patient(self, viewer: Viewer, patient_id: UUID | None) -> UUID:
        """The patient a request acts for: the caller, or one of their dependents; anyone else is 404."""
        if patient_id is None or patient_id == viewer.id:
            return viewer.id
        ward = await self.session.scalar(
            select(User.id).where(User.id == patient_id, User.guardian_id == viewer.id))
        if ward is None:
            raise NotVisible("patient not found")
        return ward

    async def patients_acted_for(self, viewer: Viewer) -> list[UUID]:
        """The caller and their dependents: whose consultations, chats and results they see."""
        wards = (await self.session.scalars(select(User.id).where(User.guardian_id == viewer.id))).all()
        return [viewer.id, *wards]

    async def user(self, user_id: UUID) -> User | None:
        return await self.session.get(User, user_id)


    async def timezones(self, user_ids: list[UUID]) -> dict[UUID, str]:
        if not user_ids:
            return {}
        rows = await self.session.execute(select(User.id, User.timezone).where(User.id.in_(set(user_ids))))
        return {r.id: r.timezone for r in rows}

    async def specialist(self, user_id: UUID) -> User:
        user = await self.session.get(User, user_id)
        if user is None or not user.specialties or not set(user.roles) & access.SPECIALIST_ROLES:
            raise NotVisible("specialist not found")
        return user

    async def staff_with_role(self, role: Role) -> set[UUID]:
        """Everyone holding a staff role (a handful of rows: the filter runs here, the same on every database)."""
        rows = await self.session.execute(select(User.id, User.roles).where(User.is_staff.is_(True)))
        return {r.id for r in rows if role.value in r.roles}

    async def specialists(self, specialty: str | None = None) -> list[User]:
        rows = (await self.session.scalars(select(User).where(User.is_staff.is_(True)).order_by(User.full_name))).all()
        return [u for u in rows if u.specialties and set(u.roles) & access.SPECIALIST_ROLES
                and (specialty is None or specialty in u.specialties)]

    async def patient_for_front_desk(self, patient_id: UUID | None, phone: str | None, name: str | None,
                                     dependent_name: str | None) -> UUID:
        """The card a registrar books for: by id, or found by phone (and a dependent by name) so that a caller
        who already has a card never gets a second one; an unknown phone gets a new card."""
        if patient_id is not None:
            patient = await self.session.get(User, patient_id)
            if patient is None or patient.is_staff:
                raise NotVisible("patient not found")
            return patient.id
        if phone is None:
            raise Invalid("name the patient by patient_id or patient_phone", "patient_required")
        e164 = normalise_phone(phone, self.settings.default_region)
        holder = await self.session.scalar(select(User).where(User.phone == e164))
        if holder is None:
            holder = User(phone=e164, full_name=clean_name(name) if name else "", roles=[Role.PATIENT.value],
                          timezone=self.settings.clinic_timezone)
            self.session.add(holder)
            await self.session.flush()
        elif holder.is_staff and Role.PATIENT.value not in holder.roles:
            raise Conflict("this phone belongs to a staff account", "phone_taken")
        if dependent_name is None:
            return holder.id
        wanted = clean_name(dependent_name).casefold()
        wards = (await self.session.scalars(select(User).where(User.guardian_id == holder.id))).all()
        match = next((w for w in wards if w.full_name.casefold() == wanted), None)
        if match is None:  # a dependent needs the guardian's legal basis, which only the guardian records
            raise NotVisible("no dependent of that name under this phone", reason="dependent_not_found")
        return match.id

    async def fill_card(self, patient: User, birth_date: dt.date | None, sex: str | None) -> None:
        """Record a birth date or sex the card lacks (told at booking); what the card already says stays."""
        if birth_date is not None and patient.birth_date is None:
            check_birth_date(birth_date)
            patient.birth_date = birth_date
        if sex is not None and patient.sex is None:
            patient.sex = sex
        await self.session.flush()

    async def briefs(self, viewer: Viewer, patient_ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
        """Masked short cards (name, initials, age) of several patients in one query: calendars and lists."""
        if not patient_ids:
            return {}
        rows = await self.session.execute(select(User.id, User.full_name, User.birth_date, User.guardian_id)
                                          .where(User.id.in_(set(patient_ids))))
        today = dt.date.today()
        briefs = {}
        for row in rows:
            acts_for = [row.id] if row.guardian_id == viewer.id else []
            card = {"id": row.id, "full_name": row.full_name, "initials": initials(row.full_name),
                    "age": age_on(row.birth_date, today) if row.birth_date else None,
                    "is_dependent": row.guardian_id is not None}
            briefs[row.id] = access.mask_patient(card, access.visible_card_fields(viewer, row.id, acts_for))
        return briefs

    # --- patient cards, through the secrecy masks ----------------------------------------------

    # --- staff ---------------------------------------------------------------------------------

    async def create_staff(self, data: StaffIn) -> User:
        phone = normalise_phone(data.phone, self.settings.default_region)
        if data.role is Role.PATIENT:
            raise Invalid("staff accounts take a staff role", "role_invalid")
        check_staff_fit([data.role], data.specialties)
        if await self.session.scalar(select(User.id).where(User.phone == phone)) is not None:
            raise Conflict("an account with this phone exists", "phone_taken")
        user = User(phone=phone, full_name=clean_name(data.full_name), roles=[data.role.value],
                    specialties=sorted(s.value for s in data.specialties), is_staff=True,
                    timezone=self.settings.clinic_timezone)
        self.session.add(user)
        try:
            async with self.session.begin_nested():
                await self.session.flush()
        except IntegrityError as exc:  # the same phone created in parallel
            raise Conflict("an account with this phone exists", "phone_taken") from exc
        return user

    async def update_staff(self, viewer: Viewer, staff_id: UUID, patch: StaffPatch) -> User:
        """An admin deactivates (or reactivates) a staff account or changes its roles and specialties. The
        account's access tokens end at once on every instance, and its sockets close: its next token carries
        the new roles; a deactivated account gets none (its logins end too)."""
        user = await self._lock_user(staff_id)  # a refresh in flight issues either the old roles, or the new
        if user is None or not user.is_staff:
            raise NotVisible("staff member not found", reason="staff_not_found")
        roles = sorted({r.value for r in patch.roles}) if patch.roles is not UNSET else list(user.roles)
        specialties = (sorted({s.value for s in patch.specialties}) if patch.specialties is not UNSET
                       else list(user.specialties))
        active = patch.active if patch.active is not UNSET else user.active
        if Role.PATIENT.value in roles and Role.PATIENT.value not in user.roles:
            raise Invalid("staff accounts take staff roles; a patient role is not given here", "role_invalid")
        if not set(roles) - {Role.PATIENT.value}:
            raise Invalid("a staff account keeps at least one staff role", "role_invalid")
        if patch.roles is not UNSET or patch.specialties is not UNSET:  # (de)activating never fails on them
            check_staff_fit([Role(r) for r in roles], [Specialty(s) for s in specialties])
        if staff_id == viewer.id and (not active or Role.ADMIN.value not in roles):
            # the clinic must never be left without the admin making the change
            raise Conflict("an admin cannot deactivate themself or drop their own admin role", "self_lockout")
        changed = (set(roles) != set(user.roles) or set(specialties) != set(user.specialties)
                   or active != user.active)
        user.roles, user.specialties, user.active = roles, specialties, active
        await self.session.flush()
        if not active:
            await self._revoke(RefreshToken.user_id == user.id)  # no refresh brings a deactivated account back
        if changed:
            await self._end_access(user.id)
        return user

    async def list_staff(self, limit: int, cursor: UUID | None) -> tuple[list[User], UUID | None]:
        query = select(User).where(User.is_staff.is_(True)).order_by(User.id).limit(limit + 1)
        if cursor is not None:
            query = query.where(User.id > cursor)
        rows = list((await self.session.scalars(query)).all())
        return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)

    async def ensure_admin(self, raw_phone: str, full_name: str | None) -> User:
        """Make (or promote) an admin: the bootstrap step of a new installation."""
        phone = normalise_phone(raw_phone, self.settings.default_region)
        user = await self.session.scalar(select(User).where(User.phone == phone))
        if user is None:
            user = User(phone=phone, full_name=full_name or "", roles=[], timezone=self.settings.clinic_timezone)
            self.session.add(user)
        if Role.ADMIN.value not in user.roles:
            user.roles = [*user.roles, Role.ADMIN.value]
        user.is_staff = True
        user.active = True  # the way back in when every admin was deactivated
        if full_name:
            user.full_name = clean_name(full_name)
        await self.session.flush()
        return user

    # --- devices for push ----------------------------------------------------------------------

    async def register_device(self, viewer: Viewer, data: DeviceIn) -> Device:
        token_hash = hashlib.sha256(data.push_token.encode()).hexdigest()
        device = await self.session.scalar(select(Device).where(Device.push_token_hash == token_hash))
        if device is None:
            device = Device(user_id=viewer.id, platform=data.platform, push_token=data.push_token,
                            push_token_hash=token_hash, voip_token=data.voip_token)
            self.session.add(device)
        else:  # the install now belongs to whoever signed in on it last
            device.user_id, device.platform, device.voip_token = viewer.id, data.platform, data.voip_token
            device.updated_at = dt.datetime.now(dt.UTC)  # registered again: the most recent install
        await self.session.flush()
        # beyond DEVICES_PER_USER the least recently registered installs go rather than refusing the new one:
        # a reinstalled app or a replaced phone never unregisters, so refusing would leave the phone in hand
        # without pushes, while a stale token only fails at the push provider anyway
        newest = (select(Device.id).where(Device.user_id == viewer.id)
                  .order_by(Device.updated_at.desc(), Device.id.desc()).limit(self.settings.devices_per_user))
        await self.session.execute(delete(Device).where(Device.user_id == viewer.id, Device.id.not_in(newest)))
        return device

    async def with_devices(self, user_ids: list[UUID]) -> set[UUID]:
        """Those of these users with a device registered for pushes (whom a push can reach at all)."""
        if not user_ids:
            return set()
        return set((await self.session.scalars(
            select(Device.user_id).where(Device.user_id.in_(user_ids)).distinct())).all())

    async def remove_device(self, viewer: Viewer, device_id: UUID) -> None:
        gone = await self.session.execute(
            delete(Device).where(Device.id == device_id, Device.user_id == viewer.id).returning(Device.id))
        if gone.one_or_none() is None:
            raise NotVisible("device not found")


def check_staff_fit(roles: list[Role], specialties: list[Specialty]) -> None:
    """Each specialty belongs to a role held, and each clinician role holds at least one of its own."""
    allowed = frozenset().union(*(access.SPECIALTIES_BY_ROLE.get(r, frozenset()) for r in roles))
    held = set(specialties)
    if not held <= allowed:
        raise Invalid(f"{' and '.join(roles)} take specialties from {', '.join(sorted(allowed)) or 'none'}",
                      "specialty_mismatch")
    for role in roles:
        own = access.SPECIALTIES_BY_ROLE.get(role, frozenset())
        if own and not held & own:
            raise Invalid(f"a {role} takes specialties from {', '.join(sorted(own))}", "specialty_mismatch")


def inactive() -> Forbidden:
    return Forbidden("this account is deactivated: ask the clinic's administrator", "account_inactive")


CARD_COLUMNS = ("id", "full_name", "birth_date", "sex", "guardian_id", "phone", "timezone", "questionnaire")


def card_from(row: Mapping[str, Any]) -> dict[str, Any]:
    """A patient's card, unmasked, from their account's CARD_COLUMNS."""
    born = row["birth_date"]
    return {
        "id": row["id"],
        "full_name": row["full_name"],
        "initials": initials(row["full_name"]),
        "birth_date": born,
        "age": age_on(born, dt.date.today()) if born else None,
        "sex": row["sex"],
        "is_dependent": row["guardian_id"] is not None,
        "phone": row["phone"],
        "timezone": row["timezone"],
        "guardian_id": row["guardian_id"],
        "questionnaire": row["questionnaire"],
    }


def initials(full_name: str) -> str | None:
    parts = full_name.split()
    return ".".join([part[0] for part in parts]) + "." if parts else None


def age_on(born: dt.date, today: dt.date) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def check_timezone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise Invalid("unknown time zone", "timezone_invalid") from exc


def check_birth_date(born: dt.date) -> None:
    today = dt.date.today()
    if born > today or age_on(born, today) > 130:
        raise Invalid("birth date out of range", "birth_date_invalid")


def clean_name(name: str) -> str:
    cleaned = " ".join(name.split())
    if not cleaned or not cleaned.isprintable():
        raise Invalid("a name needs printable characters", "name_invalid")
    return cleaned
