"""Demo clinic for the embedded profile: one account per staff role, two patients, a dependent child,
a service list for every direction and two weeks of working hours for every specialist."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Role
from app.accounts.models import User
from app.scheduling.schemas import ScheduleIn, ServiceIn, Stage, WorkingHours
from app.scheduling.service import SchedulingService
from app.settings import Settings
from app.specialties import Specialty

S = Specialty
STAFF: list[tuple[str, str, Role, list[Specialty]]] = [
    ("+79160000001", "Anna Admin", Role.ADMIN, []),
    ("+79160000002", "Elena Endocrinova", Role.DOCTOR, [S.ENDOCRINOLOGY, S.GYNECOLOGY]),
    ("+79160000003", "Pavel Pediatrov", Role.DOCTOR, [S.PEDIATRICS, S.ENT, S.UROLOGY]),
    ("+79160000004", "Polina Psychologina", Role.PSYCHOLOGIST, [S.PSYCHOLOGY]),
    ("+79160000005", "Sergei Sonografov", Role.SONOGRAPHER, [S.ULTRASOUND]),
    ("+79160000006", "Maria Massazhnaya", Role.MASSAGE_THERAPIST, [S.MASSAGE]),
    ("+79160000007", "Mikhail Metodistov", Role.METHODIST, []),
    ("+79160000008", "Regina Registratorova", Role.REGISTRAR, []),
]
PATIENTS = [("+79161110001", "Olga Patientova", dt.date(1990, 4, 12)),
            ("+79161110002", "Ivan Patientov", dt.date(1985, 9, 3))]
CHILD = ("Sasha Patientova", dt.date(2018, 6, 1))
SERVICES: list[tuple[Specialty, str, int, str, bool, Stage]] = [
    *[(spec, f"{spec.value.capitalize()}: first consultation", 30, "3500", False, Stage.FIRST)
      for spec in (S.ENDOCRINOLOGY, S.GYNECOLOGY, S.UROLOGY, S.ENT, S.PEDIATRICS)],
    *[(spec, f"{spec.value.capitalize()}: follow-up with analyses", 30, "2500", False, Stage.SECOND)
      for spec in (S.ENDOCRINOLOGY, S.GYNECOLOGY, S.UROLOGY, S.ENT, S.PEDIATRICS)],
    (S.PSYCHOLOGY, "Psychologist session", 60, "4000", False, Stage.SINGLE),
    (S.ULTRASOUND, "Pelvic ultrasound", 30, "2800", True, Stage.SINGLE),
    (S.MASSAGE, "Therapeutic massage", 60, "3000", True, Stage.SINGLE),
]
WORKDAYS = [WorkingHours(weekday=d, start="09:00", end="18:00") for d in range(5)]
LUNCH = [WorkingHours(weekday=d, start="13:00", end="14:00") for d in range(5)]


async def load_demo(session: AsyncSession, settings: Settings) -> list[tuple[str, str, str]] | None:
    """Create the demo accounts unless they exist; returns (phone, name, role) rows to print, or None."""
    if await session.scalar(select(User.id).where(User.phone == STAFF[0][0])) is not None:
        return None
    timezone = settings.clinic_timezone
    scheduling = SchedulingService(session, settings)
    for specialty, title, minutes, price, in_person_only, stage in SERVICES:
        await scheduling.create_service(ServiceIn(specialty=specialty, title=title, duration_minutes=minutes,
                                                  price=Decimal(price), in_person_only=in_person_only, stage=stage))
    rows = []
    for phone, name, role, specialties in STAFF:
        member = User(phone=phone, full_name=name, roles=[role.value], specialties=[s.value for s in specialties],
                      is_staff=True, timezone=timezone)
        session.add(member)
        if specialties:
            await session.flush()
            hour_long = role in (Role.PSYCHOLOGIST, Role.MASSAGE_THERAPIST)  # their services take an hour
            await scheduling.set_schedule(member, ScheduleIn(timezone=timezone, slot_minutes=60 if hour_long else 30,
                                                             horizon_days=14, weekly=WORKDAYS, breaks=LUNCH))
        rows.append((phone, name, role.value + (f" ({', '.join(specialties)})" if specialties else "")))
    mother = None
    for phone, name, born in PATIENTS:
        patient = User(phone=phone, full_name=name, birth_date=born, roles=[Role.PATIENT.value], timezone=timezone)
        session.add(patient)
        mother = mother or patient
        rows.append((phone, name, "patient"))
    await session.flush()
    assert mother is not None
    session.add(User(full_name=CHILD[0], birth_date=CHILD[1], roles=[Role.PATIENT.value], timezone=timezone,
                     guardian_id=mother.id, relation="child", legal_basis="birth certificate (demo)"))
    rows.append(("-", CHILD[0], f"dependent child of {mother.full_name}"))
    await session.commit()
    return rows
