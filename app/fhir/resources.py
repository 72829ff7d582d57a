"""FHIR R4 resources built from what the REST reads answer, after their masks: a field a mask hid (None) is
left out of the resource, never sent empty.

Terminology: HL7 code systems where one is standard (administrative gender is the resource's own code, encounter
classes from v3 ActCode, bundle links); the clinic's own codes (specialties, staff roles, document kinds,
consultation statuses) under `urn:clinic:` names, which say they are local.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

from app.access import Role
from app.specialties import TITLES, Specialty

SPECIALTY_SYSTEM = "urn:clinic:specialty"
STAFF_ROLE_SYSTEM = "urn:clinic:staff-role"
DOCUMENT_KIND_SYSTEM = "urn:clinic:document-kind"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# consultation status -> Appointment.status (http://hl7.org/fhir/appointmentstatus)
APPOINTMENT_STATUS = {"pending_confirmation": "pending", "confirmed": "booked", "in_progress": "arrived",
                      "completed": "fulfilled", "cancelled": "cancelled", "no_show": "noshow"}
# consultation status -> Encounter.status (http://hl7.org/fhir/encounter-status), for visits that began
ENCOUNTER_STATUS = {"in_progress": "in-progress", "completed": "finished"}
# consultation format -> Encounter.class (v3 ActCode): ambulatory in the clinic, or virtual
ENCOUNTER_CLASS = {"in_person": ("AMB", "ambulatory"), "online": ("VR", "virtual")}
# document status -> (DocumentReference.status, docStatus)
DOCUMENT_STATUS = {"ready": ("current", "final"), "pending": ("current", "preliminary"),
                   "rejected": ("entered-in-error", None)}
ROLE_TITLES = {Role.DOCTOR: "Doctor", Role.PSYCHOLOGIST: "Psychologist", Role.SONOGRAPHER: "Sonographer",
               Role.MASSAGE_THERAPIST: "Massage therapist"}
KIND_TITLES = {"analysis": "Analysis results", "conclusion": "Conclusion", "referral": "Referral",
               "image": "Image", "other": "Other document"}


def instant(at: dt.datetime) -> str:
    """An instant as FHIR writes it: with its offset, in UTC (many systems read it)."""
    return at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def reference(resource_type: str, ident: UUID, display: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"reference": f"{resource_type}/{ident}"}
    if display:
        found["display"] = display
    return found


def _pruned(resource: dict[str, Any]) -> dict[str, Any]:
    """No key with an empty value: FHIR forbids empty elements, and a masked field is simply not there."""
    return {k: v for k, v in resource.items() if v is not None and v != [] and v != {}}


def specialty_concept(code: str) -> dict[str, Any]:
    try:
        title: str | None = TITLES[Specialty(code)]
    except (ValueError, KeyError):  # a direction the clinic has dropped: its code alone
        title = None
    coding = _pruned({"system": SPECIALTY_SYSTEM, "code": code, "display": title})
    return _pruned({"coding": [coding], "text": title or code})


# --- people ---------------------------------------------------------------------------------------

def patient(card: Any) -> dict[str, Any]:
    """From a masked PatientCardOut: only the fields the mask let through."""
    names = []
    if card.full_name:
        names.append({"use": "official", "text": card.full_name})
    elif card.initials:  # a pseudonym for roles that may not see the name
        names.append({"use": "anonymous", "text": card.initials})
    telecom = [{"system": "phone", "value": card.phone, "use": "mobile"}] if card.phone else []
    return _pruned({
        "resourceType": "Patient", "id": str(card.id), "active": True, "name": names, "telecom": telecom,
        "gender": card.sex if card.sex in ("female", "male") else None,
        "birthDate": card.birth_date.isoformat() if card.birth_date else None,
    })


def patient_display(brief: Any) -> str | None:
    """A patient as a reference names them: the name the mask shows, else the initials, else nothing."""
    if brief is None:
        return None
    return brief.full_name or brief.initials  # type: ignore[no-any-return]


def practitioner(user: Any) -> dict[str, Any]:
    return _pruned({"resourceType": "Practitioner", "id": str(user.id), "active": bool(user.active),
                    "name": [{"text": user.full_name}] if user.full_name else []})


def practitioner_role(user: Any) -> dict[str, Any]:
    roles = [Role(r) for r in user.roles if r in ROLE_TITLES]
    return _pruned({
        "resourceType": "PractitionerRole", "id": str(user.id), "active": bool(user.active),
        "practitioner": reference("Practitioner", user.id, user.full_name or None),
        "code": [{"coding": [{"system": STAFF_ROLE_SYSTEM, "code": r.value, "display": ROLE_TITLES[r]}],
                  "text": ROLE_TITLES[r]} for r in roles],
        "specialty": [specialty_concept(s) for s in user.specialties],
    })


def schedule(plan: Any, specialist: Any) -> dict[str, Any]:
    """A specialist's working week: whose it is, their directions, and how far ahead slots are open."""
    now = dt.datetime.now(dt.UTC)
    return {
        "resourceType": "Schedule", "id": str(plan.id), "active": True,
        "specialty": [specialty_concept(s) for s in specialist.specialties],
        "actor": [reference("Practitioner", specialist.id, specialist.full_name or None)],
        "planningHorizon": {"start": instant(now), "end": instant(now + dt.timedelta(days=plan.horizon_days))},
        "comment": f"{plan.slot_minutes}-minute slots, in the {plan.timezone} zone",
    }


def free_slot(slot: Any, schedule_id: UUID) -> dict[str, Any]:
    """A free slot (taken and held ones are never published, as in REST)."""
    return {"resourceType": "Slot", "id": str(slot.id), "schedule": reference("Schedule", schedule_id),
            "status": "free", "start": instant(slot.starts_at), "end": instant(slot.ends_at)}


# --- consultations --------------------------------------------------------------------------------

def appointment(visit: Mapping[str, Any], patient_name: str | None) -> dict[str, Any]:
    """A consultation as an Appointment (`visit`: its columns, from a row or the model)."""
    return _pruned({
        "resourceType": "Appointment", "id": str(visit["id"]),
        "status": APPOINTMENT_STATUS[visit["status"]],
        "specialty": [specialty_concept(visit["specialty"])],
        "start": instant(visit["starts_at"]), "end": instant(visit["ends_at"]),
        "minutesDuration": max(1, int((visit["ends_at"] - visit["starts_at"]).total_seconds() // 60)),
        "slot": [reference("Slot", visit["slot_id"])],
        "participant": [
            {"actor": reference("Patient", visit["patient_id"], patient_name), "required": "required",
             "status": "accepted"},
            {"actor": reference("Practitioner", visit["specialist_id"]), "required": "required",
             "status": "accepted"},
        ],
    })


def encounter(visit: Mapping[str, Any], patient_name: str | None) -> dict[str, Any]:
    """A consultation that began, as an Encounter: its period is when it started and ended."""
    code, display = ENCOUNTER_CLASS[visit["format"]]
    started, ended = visit.get("started_at"), visit.get("completed_at")
    period = _pruned({"start": instant(started) if started else instant(visit["starts_at"]),
                      "end": instant(ended) if ended else None})
    return _pruned({
        "resourceType": "Encounter", "id": str(visit["id"]), "status": ENCOUNTER_STATUS[visit["status"]],
        "class": {"system": ACT_CODE_SYSTEM, "code": code, "display": display},
        "serviceType": specialty_concept(visit["specialty"]),
        "subject": reference("Patient", visit["patient_id"], patient_name),
        "participant": [{"individual": reference("Practitioner", visit["specialist_id"])}],
        "appointment": [reference("Appointment", visit["id"])],
        "period": period,
    })


def model_columns(model: Any, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(model, name) for name in names}


# --- documents and chat ---------------------------------------------------------------------------

def _author(author_id: UUID, author_role: str) -> dict[str, Any]:
    return reference("Patient" if author_role == Role.PATIENT else "Practitioner", author_id)


def document_reference(doc: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    """The attachment's url is the app's own download route (which checks the mask again and audits), never
    the object store's address."""
    status, doc_status = DOCUMENT_STATUS.get(doc["status"], ("current", None))
    kind = doc["kind"]
    return _pruned({
        "resourceType": "DocumentReference", "id": str(doc["id"]), "status": status, "docStatus": doc_status,
        "type": {"coding": [{"system": DOCUMENT_KIND_SYSTEM, "code": kind, "display": KIND_TITLES.get(kind)}],
                 "text": KIND_TITLES.get(kind, kind)},
        "subject": reference("Patient", doc["patient_id"]),
        "date": instant(doc["created_at"]),
        "author": [_author(doc["author_id"], doc["author_role"])],
        "content": [{"attachment": {
            "contentType": doc["content_type"], "size": int(doc["size"]), "title": doc["filename"],
            "url": f"{base_url}/api/v1/documents/{doc['id']}/download",
            "creation": instant(doc["created_at"])}}],
    })


# document status -> DiagnosticReport.status
REPORT_STATUS = {"ready": "final", "pending": "registered", "rejected": "entered-in-error"}


def diagnostic_report(doc: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    """An analysis as the laboratory's report it is: the file as its presented form (results come as the lab's
    PDF or a photo of it, not as coded values, so there are no Observations to point at)."""
    return _pruned({
        "resourceType": "DiagnosticReport", "id": str(doc["id"]), "status": REPORT_STATUS.get(doc["status"]),
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB",
                                  "display": "Laboratory"}]}],
        "code": {"coding": [{"system": DOCUMENT_KIND_SYSTEM, "code": "analysis",
                             "display": KIND_TITLES["analysis"]}], "text": KIND_TITLES["analysis"]},
        "subject": reference("Patient", doc["patient_id"]),
        "issued": instant(doc["created_at"]),
        "performer": [_author(doc["author_id"], doc["author_role"])],
        "presentedForm": [{"contentType": doc["content_type"], "size": int(doc["size"]), "title": doc["filename"],
                           "url": f"{base_url}/api/v1/documents/{doc['id']}/download",
                           "creation": instant(doc["created_at"])}],
    })


def communication(message: Any, *, patient_id: UUID, specialist_id: UUID,
                  base_url: str) -> dict[str, Any]:
    """A chat message: from its author to the conversation's other side; a deleted one keeps no payload."""
    if message.author_id is None:
        sender = None
    elif message.author_id == specialist_id:
        sender = reference("Practitioner", specialist_id)
    else:  # the patient or their guardian
        sender = reference("Patient", message.author_id)
    recipient = (reference("Patient", patient_id) if message.author_id == specialist_id
                 else reference("Practitioner", specialist_id))
    payload: list[dict[str, Any]] = []
    if not message.deleted:
        if message.text:
            payload.append({"contentString": message.text})
        payload += [{"contentAttachment": {
            "contentType": d.content_type, "size": int(d.size), "title": d.filename,
            "url": f"{base_url}/api/v1/documents/{d.id}/download"}} for d in message.documents]
    return _pruned({
        "resourceType": "Communication", "id": str(message.id),
        "status": "entered-in-error" if message.deleted else "completed",
        "subject": reference("Patient", patient_id),
        "sent": instant(message.created_at),
        "sender": sender, "recipient": [recipient], "payload": payload,
    })


# --- bundles and outcomes -------------------------------------------------------------------------

def searchset(entries: list[dict[str, Any]], total: int | None, self_url: str, next_url: str | None,
              base_url: str) -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    counted = {"total": total} if total is not None else {}  # a later page of a long search leaves it out
    return {"resourceType": "Bundle", "type": "searchset", **counted, "link": links,
            "entry": [{"fullUrl": f"{base_url}/{e['resourceType']}/{e['id']}", "resource": e,
                       "search": {"mode": "match"}} for e in entries]}


ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               409: "conflict", 413: "too-long", 429: "throttled"}


def operation_outcome(status: int, detail: str, reason: str | None) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error" if status < 500 else "fatal",
                             "code": ISSUE_CODES.get(status, "processing" if status < 500 else "exception"),
                             "diagnostics": detail}
    if reason:
        issue["details"] = {"coding": [{"system": "urn:clinic:error-reason", "code": reason}], "text": reason}
    return {"resourceType": "OperationOutcome", "issue": [issue]}
