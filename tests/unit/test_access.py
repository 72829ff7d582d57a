"""The secrecy masks as data: each role sees exactly its fields; several roles see the union."""

from __future__ import annotations

import uuid

import pytest

from app.access import (
    CARD_FIELDS,
    CONTACTS,
    IDENTITY,
    MEDICAL,
    PSEUDONYM,
    VISIBLE_BY_ROLE,
    Role,
    Viewer,
    mask_patient,
    visible_card_fields,
)

PATIENT_ID = uuid.uuid4()
CARD = {name: f"value of {name}" for name in CARD_FIELDS}


def seen_by(*roles: Role) -> set[str]:
    viewer = Viewer(id=uuid.uuid4(), roles=frozenset(roles))
    masked = mask_patient(CARD, visible_card_fields(viewer, PATIENT_ID))
    assert set(masked) == CARD_FIELDS
    return {k for k, v in masked.items() if v is not None}


@pytest.mark.parametrize(("role", "expected"), [
    (Role.PATIENT, set()),
    (Role.DOCTOR, CARD_FIELDS),
    (Role.PSYCHOLOGIST, PSEUDONYM | {"timezone"}),
    (Role.SONOGRAPHER, PSEUDONYM),
    (Role.MASSAGE_THERAPIST, PSEUDONYM),
    (Role.METHODIST, IDENTITY),
    (Role.REGISTRAR, IDENTITY | CONTACTS),
    (Role.ADMIN, IDENTITY | CONTACTS),
])
def test_each_role_sees_exactly_its_mask(role: Role, expected: set[str]) -> None:
    assert seen_by(role) == expected


def test_every_role_has_a_mask() -> None:
    assert set(VISIBLE_BY_ROLE) == set(Role)


def test_no_non_doctor_sees_medical_content() -> None:
    for role in set(Role) - {Role.DOCTOR}:
        assert not seen_by(role) & MEDICAL, role


def test_roles_the_law_keeps_from_full_personal_data() -> None:
    for role in (Role.PSYCHOLOGIST, Role.SONOGRAPHER, Role.MASSAGE_THERAPIST):
        assert not seen_by(role) & {"full_name", "birth_date", "phone"}


def test_several_roles_see_the_union() -> None:
    assert seen_by(Role.METHODIST, Role.PSYCHOLOGIST) == IDENTITY | PSEUDONYM | {"timezone"}


def test_the_patient_and_guardian_see_everything() -> None:
    me = Viewer(id=PATIENT_ID, roles=frozenset({Role.PATIENT}))
    assert visible_card_fields(me, PATIENT_ID) == CARD_FIELDS
    guardian = Viewer(id=uuid.uuid4(), roles=frozenset({Role.PATIENT}))
    assert visible_card_fields(guardian, PATIENT_ID, acts_for=[PATIENT_ID]) == CARD_FIELDS
