"""Who may do what, and who sees which fields: the one source of roles, route rules and secrecy masks.

`only_roles` answers "may this role call this route" (the auth middleware checks it with the token). Masks
answer "which fields of a patient may this viewer see"; every way out of the system (REST, events, exports)
builds patient data through `mask_patient`, so nothing bypasses it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from uuid import UUID

from litestar.exceptions import PermissionDeniedException

from app.specialties import DOCTOR_SPECIALTIES, Specialty


class Role(StrEnum):
    PATIENT = "patient"
    DOCTOR = "doctor"
    PSYCHOLOGIST = "psychologist"
    SONOGRAPHER = "sonographer"
    MASSAGE_THERAPIST = "massage_therapist"
    METHODIST = "methodist"
    REGISTRAR = "registrar"
    ADMIN = "admin"


SPECIALIST_ROLES = frozenset({Role.DOCTOR, Role.PSYCHOLOGIST, Role.SONOGRAPHER, Role.MASSAGE_THERAPIST})

# Which specialties each clinician role may hold; other staff roles hold none.
SPECIALTIES_BY_ROLE: Mapping[Role, frozenset[Specialty]] = {
    Role.DOCTOR: DOCTOR_SPECIALTIES,
    Role.PSYCHOLOGIST: frozenset({Specialty.PSYCHOLOGY}),
    Role.SONOGRAPHER: frozenset({Specialty.ULTRASOUND}),
    Role.MASSAGE_THERAPIST: frozenset({Specialty.MASSAGE}),
}


@dataclass(frozen=True, slots=True)
class Viewer:
    """The authenticated caller, as the access token states it."""

    id: UUID
    roles: frozenset[Role] = field(default_factory=frozenset)
    timezone: str | None = None  # the zone the caller's answers speak in (from the token; None: the clinic's)
    sid: UUID | None = None  # the login (refresh family) the token belongs to: what a logout or revocation ends

    def has_any(self, roles: Iterable[Role]) -> bool:
        return not self.roles.isdisjoint(roles)


# A route that only some roles may call says so with opt=only_roles(...); the auth middleware checks it as it
# reads the token. (A Litestar guard would do the same at the cost of a copy of the route handler on every
# request, about a tenth of a cheap read.) Every route that is not PUBLIC needs a token, so "any signed-in user"
# needs no mark: the service decides what of the data is theirs.
ROLES_OPT = "roles"


def only_roles(*roles: Role) -> dict[str, Any]:
    return {ROLES_OPT: frozenset(roles)}


def check_roles(viewer: Viewer, opt: Mapping[str, Any]) -> None:
    allowed = opt.get(ROLES_OPT)
    if allowed is not None and viewer.roles.isdisjoint(allowed):
        raise PermissionDeniedException("not allowed for your role")


# Routes open to everyone say so with opt=PUBLIC (the auth middleware skips them).
PUBLIC: dict[str, Any] = {"exclude_from_auth": True}

# Who may act for patients (book, upload, chat as the patient): themselves and guardians.
PATIENTS = (Role.PATIENT,)
ADMINS = (Role.ADMIN,)
STAFF_READERS = (Role.ADMIN, Role.REGISTRAR)


# --- Secrecy masks -------------------------------------------------------------------------------

# The fields of a patient card, grouped by what they reveal.
IDENTITY = frozenset({"id", "full_name", "birth_date", "is_dependent"})
PSEUDONYM = frozenset({"id", "initials", "age", "is_dependent"})
CONTACTS = frozenset({"phone", "timezone", "guardian_id"})
MEDICAL = frozenset({"questionnaire", "sex"})  # sex: what a doctor needs, no business of the back office
CARD_FIELDS = IDENTITY | PSEUDONYM | CONTACTS | MEDICAL

# What each role sees of a patient who is not themselves or their dependent. A clinician sees a
# card only while in care of the patient (consultations.service.in_care), checked before masking.
VISIBLE_BY_ROLE: Mapping[Role, frozenset[str]] = {
    Role.PATIENT: frozenset(),  # another patient: nothing, and the service answers 404 anyway
    Role.DOCTOR: CARD_FIELDS,
    # medical secrecy: no full personal data, no doctors' medical content
    Role.PSYCHOLOGIST: PSEUDONYM | frozenset({"timezone"}),
    Role.SONOGRAPHER: PSEUDONYM,
    Role.MASSAGE_THERAPIST: PSEUDONYM,
    Role.METHODIST: IDENTITY,  # only what identifies the patient behind an analysis
    Role.REGISTRAR: IDENTITY | CONTACTS,  # contacts, nothing medical
    Role.ADMIN: IDENTITY | CONTACTS,
}


def visible_card_fields(viewer: Viewer, patient_id: UUID, acts_for: Iterable[UUID] = ()) -> frozenset[str]:
    """Fields of this patient's card the viewer may see; several roles: the union of what each allows."""
    if patient_id == viewer.id or patient_id in set(acts_for):
        return CARD_FIELDS
    seen: frozenset[str] = frozenset()
    for role in viewer.roles:
        seen |= VISIBLE_BY_ROLE.get(role, frozenset())  # an unknown role sees nothing
    return seen


def mask_patient(card: Mapping[str, Any], visible: frozenset[str]) -> dict[str, Any]:
    """The card with every field the viewer may not see set to None (the shape never changes)."""
    return {name: (value if name in visible else None) for name, value in card.items()}


def may_read_any_card(viewer: Viewer) -> bool:
    """Roles that read any card without a care relationship: the front desk (registrars, admins).

    Methodists read none by id: they are to see the cards of patients behind an analysis in their inbox, a
    grant the documents inbox gives per patient (app/consultations/card.py), never a role-wide one."""
    return viewer.has_any((Role.REGISTRAR, Role.ADMIN))


def is_clinician(viewer: Viewer) -> bool:
    return viewer.has_any(SPECIALIST_ROLES)


# --- Consultations and conclusions -----------------------------------------------------------------

BOOKERS_FOR_OTHERS = (Role.REGISTRAR, Role.ADMIN)  # book for any patient, confirm, see every calendar


def conclusion_visible(viewer: Viewer, *, author_id: UUID, author_role: str, own_patient: bool,
                       in_care: bool) -> bool:
    """Medical secrecy for conclusions.

    The patient (or guardian) and the author always read it. A doctor in care of the patient (with a
    consultation of their own) reads doctors' and psychologists' conclusions; a psychologist in care reads only
    psychologists' ones; sonographers and massage therapists only their own; back-office roles none.
    """
    if own_patient or viewer.id == author_id:
        return True
    if not in_care:
        return False
    if Role.DOCTOR in viewer.roles:
        return author_role in (Role.DOCTOR, Role.PSYCHOLOGIST)
    if Role.PSYCHOLOGIST in viewer.roles:
        return author_role == Role.PSYCHOLOGIST
    return False


# --- Documents -------------------------------------------------------------------------------------

class Ground(StrEnum):
    """Why a viewer stands in relation to a document: computed by the documents service, once per request."""

    OWN = "own"  # the viewer is the patient, or the patient's guardian
    AUTHOR = "author"  # the viewer wrote or uploaded it
    IN_CARE = "in_care"  # the patient is in the viewer's care now (consultations.service.caring)
    CONSULTATION = "consultation"  # it belongs to a consultation of the viewer's
    SHARED = "shared"  # a methodist forwarded it to the viewer
    INBOX = "inbox"  # an analysis in the methodists' inbox


@dataclass(frozen=True, slots=True)
class DocumentGrant:
    """One way to see documents: a ground, narrowed to some author roles and kinds (None: any)."""

    ground: Ground
    authors: frozenset[str] | None = None
    kinds: frozenset[str] | None = None


_PATIENT_SIDE = frozenset({Role.PATIENT.value})
# medical secrecy: a psychologist never sees what doctors (or other clinicians) wrote
_PSYCHOLOGIST_READS = frozenset({Role.PATIENT.value, Role.PSYCHOLOGIST.value})
_EVERYONE = (DocumentGrant(Ground.AUTHOR), DocumentGrant(Ground.OWN))

# The document mask: which documents each role sees, as data. Several roles: the union of their grants. The
# documents service applies it twice from this one table: as a SQL clause for lists and the inbox, and as
# `document_visible` for single reads, downloads, chat attachments and events.
DOCUMENT_GRANTS: Mapping[Role, tuple[DocumentGrant, ...]] = {
    Role.PATIENT: _EVERYONE,  # their own and their dependents', every kind and author
    Role.DOCTOR: (*_EVERYONE, DocumentGrant(Ground.IN_CARE), DocumentGrant(Ground.SHARED)),
    Role.PSYCHOLOGIST: (*_EVERYONE, DocumentGrant(Ground.IN_CARE, _PSYCHOLOGIST_READS),
                        DocumentGrant(Ground.SHARED, _PSYCHOLOGIST_READS)),
    # in-clinic specialists: what they wrote, and what the patient brought to their own visits
    Role.SONOGRAPHER: (*_EVERYONE, DocumentGrant(Ground.CONSULTATION, _PATIENT_SIDE),
                       DocumentGrant(Ground.SHARED, _PATIENT_SIDE)),
    Role.MASSAGE_THERAPIST: (*_EVERYONE, DocumentGrant(Ground.CONSULTATION, _PATIENT_SIDE),
                             DocumentGrant(Ground.SHARED, _PATIENT_SIDE)),
    Role.METHODIST: (DocumentGrant(Ground.INBOX, _PATIENT_SIDE, frozenset({"analysis"})),),
    Role.REGISTRAR: (),  # the back office sees no medical content
    Role.ADMIN: (),
}


def document_grants(viewer: Viewer) -> tuple[DocumentGrant, ...]:
    """Every grant the viewer's roles give (an unknown role gives none)."""
    return grants_of(viewer.roles)


@functools.lru_cache(maxsize=256)
def grants_of(roles: frozenset[Role]) -> tuple[DocumentGrant, ...]:
    seen: dict[DocumentGrant, None] = {}
    for role in sorted(roles):
        seen.update(dict.fromkeys(DOCUMENT_GRANTS.get(role, ())))
    return tuple(seen)


def document_visible(viewer: Viewer, *, kind: str, author_id: UUID, author_role: str, ready: bool,
                     relationship: frozenset[Ground]) -> bool:
    """Whether the viewer may see this document: the one decision behind every way a document leaves the system.

    A document not yet checked (pending, rejected) is its author's alone."""
    if not ready:
        return author_id == viewer.id and Ground.AUTHOR in relationship
    return any(g.ground in relationship and (g.authors is None or author_role in g.authors)
               and (g.kinds is None or kind in g.kinds) for g in document_grants(viewer))


# Who uploads what: patients and guardians these kinds, for themselves or a dependent; clinicians any kind, for
# patients in their care; every other role nothing.
PATIENT_UPLOAD_KINDS = frozenset({"analysis", "image", "other"})
UPLOADERS = frozenset({Role.PATIENT, *SPECIALIST_ROLES})
# the roles that work the methodists' inbox (doctors and psychologists use the methodist workspace too)
INBOX_ROLES = (Role.METHODIST, Role.DOCTOR, Role.PSYCHOLOGIST)
