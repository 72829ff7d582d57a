"""Thin HTTP handlers for accounts: parse, call one service method, shape the answer."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from app import params
from app.access import ADMINS, PATIENTS, PUBLIC, STAFF_READERS, Viewer, only_roles
from app.accounts import reads
from app.accounts.models import Device, User
from app.accounts.schemas import (
    DependentIn,
    DependentOut,
    DeviceIn,
    DeviceOut,
    LogoutIn,
    MeOut,
    MePatch,
    OtpIn,
    OtpOut,
    PatientCardOut,
    RefreshIn,
    StaffIn,
    StaffPatch,
    TokenIn,
    TokenOut,
    UserOut,
)
from app.accounts.service import AccountService, Login, Me
from app.audit.service import audit_trail
from app.clientaddr import client_address
from app.consultations import card
from app.consultations.service import ConsultationService
from app.errors import Invalid
from app.notifications.models import STAFF_TOPICS, TOPICS
from app.schemas import Page
from app.services import accounts_for, consultations_for

Limit = Annotated[int, Parameter(ge=1, le=100, description="page size")]


async def provide_accounts(db_session: NamedDependency[AsyncSession], state: State) -> AccountService:
    return accounts_for(db_session, state)


def user_out(user: User) -> UserOut:
    return UserOut(id=user.id, phone=user.phone, full_name=user.full_name, roles=list(user.roles),
                   specialties=list(user.specialties), timezone=user.timezone, active=user.active)


def dependent_out(user: User) -> DependentOut:
    return DependentOut(id=user.id, full_name=user.full_name, birth_date=user.birth_date, sex=user.sex,
                        relation=user.relation, legal_basis=user.legal_basis)


def me_out(me: Me) -> MeOut:
    u = me.user
    return MeOut(id=u.id, phone=u.phone, full_name=u.full_name, roles=list(u.roles),
                 specialties=list(u.specialties), timezone=u.timezone, active=u.active, birth_date=u.birth_date,
                 sex=u.sex,
                 questionnaire=dict(u.questionnaire), dependents=[dependent_out(d) for d in me.dependents],
                 quiet_hours_start=u.quiet_hours_start, quiet_hours_end=u.quiet_hours_end,
                 push_topics=list(TOPICS if not u.is_staff else u.push_topics if u.push_topics is not None
                                  else STAFF_TOPICS))


def token_out(login: Login) -> TokenOut:
    return TokenOut(access_token=login.access_token, refresh_token=login.refresh_token,
                    expires_in=login.expires_in, user=user_out(login.user))


def device_out(device: Device) -> DeviceOut:
    return DeviceOut(id=device.id, platform=device.platform, has_voip=device.voip_token is not None,
                     created_at=device.created_at)


def parse_cursor(cursor: str | None) -> UUID | None:
    if cursor is None:
        return None
    try:
        return UUID(cursor)
    except ValueError as exc:
        raise Invalid("the cursor is not one this list gave out", "cursor_invalid") from exc


class AuthController(Controller):
    path = "/api/v1/auth"
    tags = ["accounts"]
    dependencies = {"accounts": Provide(provide_accounts)}

    @post("/otp", status_code=202, opt=PUBLIC)
    async def request_otp(self, request: Request[Any, Any, Any], accounts: NamedDependency[AccountService],
                          data: JSONBody[OtpIn]) -> OtpOut:
        client_ip = client_address(request, request.app.state.settings)
        return OtpOut(expires_in=await accounts.request_code(data.phone, client_ip))

    @post("/token", status_code=200, opt=PUBLIC)
    async def issue_tokens(self, accounts: NamedDependency[AccountService], data: JSONBody[TokenIn]) -> TokenOut:
        return token_out(await accounts.login(data.phone, data.code))

    @post("/refresh", status_code=200, opt=PUBLIC)
    async def refresh_tokens(self, accounts: NamedDependency[AccountService],
                             data: JSONBody[RefreshIn]) -> TokenOut:
        return token_out(await accounts.refresh(data.refresh_token))

    @post("/logout", status_code=204)
    async def logout(self, request: Request[Viewer, Any, Any], accounts: NamedDependency[AccountService],
                     data: JSONBody[LogoutIn | None] = None) -> None:
        await accounts.logout(request.user, data.refresh_token if data else None)


class MeController(Controller):
    path = "/api/v1/me"
    tags = ["accounts"]
    dependencies = {"accounts": Provide(provide_accounts)}

    @get("/")
    async def get_me(self, request: Request[Viewer, Any, Any]) -> MeOut:
        return await reads.me(request.app.state.database.reads, request.user)

    @patch("/")
    async def update_me(self, request: Request[Viewer, Any, Any], accounts: NamedDependency[AccountService],
                        data: JSONBody[MePatch]) -> MeOut:
        return me_out(await accounts.update_me(request.user, data))

    @post("/dependents", status_code=201, opt=only_roles(*PATIENTS))
    async def add_dependent(self, request: Request[Viewer, Any, Any], accounts: NamedDependency[AccountService],
                            data: JSONBody[DependentIn]) -> DependentOut:
        return dependent_out(await accounts.add_dependent(request.user, data))

    @get("/dependents", opt=only_roles(*PATIENTS))
    async def list_dependents(self, request: Request[Viewer, Any, Any]) -> Page[DependentOut]:
        return Page(items=await reads.dependents(request.app.state.database.reads, request.user))


class StaffController(Controller):
    path = "/api/v1/staff"
    tags = ["accounts"]
    dependencies = {"accounts": Provide(provide_accounts)}

    @post("/", status_code=201, opt=only_roles(*ADMINS))
    async def create_staff(self, accounts: NamedDependency[AccountService], data: JSONBody[StaffIn]) -> UserOut:
        return user_out(await accounts.create_staff(data))

    @get("/", opt=only_roles(*STAFF_READERS))
    async def list_staff(self, accounts: NamedDependency[AccountService], limit: FromQuery[Limit] = 50,
                         cursor: params.Cursor = None) -> Page[UserOut]:
        rows, last = await accounts.list_staff(limit, parse_cursor(cursor))
        return Page(items=[user_out(u) for u in rows], next_cursor=str(last) if last else None)

    @patch("/{staff_id:uuid}", opt=only_roles(*ADMINS))
    async def update_staff(self, request: Request[Viewer, Any, Any], accounts: NamedDependency[AccountService],
                           staff_id: FromPath[UUID], data: JSONBody[StaffPatch]) -> UserOut:
        return user_out(await accounts.update_staff(request.user, staff_id, data))


# not imported from app.consultations.controllers: that module imports this one (parse_cursor), a cycle
async def provide_consultations(db_session: NamedDependency[AsyncSession], state: State) -> ConsultationService:
    return consultations_for(db_session, state)


class PatientController(Controller):
    path = "/api/v1/patients"
    tags = ["accounts"]
    # the card's reader is the consultations service: whether a clinician may read it is a matter of care
    dependencies = {"consultations": Provide(provide_consultations)}

    @get("/{patient_id:uuid}")
    async def get_patient(self, request: Request[Viewer, Any, Any], patient_id: FromPath[UUID]) -> PatientCardOut:
        state = request.app.state
        return await card.patient_card(state.database.reads, request.user, patient_id,
                                       state.settings.care_after_days, audit_trail(request))


class DeviceController(Controller):
    path = "/api/v1/devices"
    tags = ["accounts"]
    dependencies = {"accounts": Provide(provide_accounts)}

    @post("/", status_code=201)
    async def register_device(self, request: Request[Viewer, Any, Any],
                              accounts: NamedDependency[AccountService], data: JSONBody[DeviceIn]) -> DeviceOut:
        return device_out(await accounts.register_device(request.user, data))

    @delete("/{device_id:uuid}", status_code=204)
    async def remove_device(self, request: Request[Viewer, Any, Any], accounts: NamedDependency[AccountService],
                            device_id: FromPath[UUID]) -> None:
        await accounts.remove_device(request.user, device_id)
