"""The clinic's directions, and which staff role may practise which."""

from __future__ import annotations

from enum import StrEnum


class Specialty(StrEnum):
    ENDOCRINOLOGY = "endocrinology"
    GYNECOLOGY = "gynecology"
    UROLOGY = "urology"
    ENT = "ent"
    PEDIATRICS = "pediatrics"
    PSYCHOLOGY = "psychology"
    ULTRASOUND = "ultrasound"
    MASSAGE = "massage"


TITLES: dict[Specialty, str] = {
    Specialty.ENDOCRINOLOGY: "Endocrinology",
    Specialty.GYNECOLOGY: "Gynecology",
    Specialty.UROLOGY: "Urology",
    Specialty.ENT: "ENT (otorhinolaryngology)",
    Specialty.PEDIATRICS: "Pediatrics",
    Specialty.PSYCHOLOGY: "Psychology",
    Specialty.ULTRASOUND: "Ultrasound diagnostics",
    Specialty.MASSAGE: "Massage",
}

DOCTOR_SPECIALTIES = frozenset(
    {Specialty.ENDOCRINOLOGY, Specialty.GYNECOLOGY, Specialty.UROLOGY, Specialty.ENT, Specialty.PEDIATRICS}
)
