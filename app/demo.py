"""Demo clinic for the embedded profile: one account per staff role, two patients, a dependent child."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.access import Role
from app.accounts.models import User
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


async def load_demo(session: AsyncSession, timezone: str) -> list[tuple[str, str, str]] | None:
    """Create the demo accounts unless they exist; returns (phone, name, role) rows to print, or None."""
    if await session.scalar(select(User.id).where(User.phone == STAFF[0][0])) is not None:
        return None
    rows = []
    for phone, name, role, specialties in STAFF:
        session.add(User(phone=phone, full_name=name, roles=[role.value], specialties=[s.value for s in specialties],
                         is_staff=True, timezone=timezone))
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
