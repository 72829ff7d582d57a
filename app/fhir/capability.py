"""What the FHIR API implements, as data: the CapabilityStatement is written from it and searches are checked
against it, so the statement never claims more (or less) than the server does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.errors import NotVisible


@dataclass(frozen=True, slots=True)
class Supported:
    read: bool
    search: Mapping[str, tuple[str, str]] | None  # parameter -> (FHIR search type, what it matches); None: no search


SUPPORTED: Mapping[str, Supported] = {
    "Patient": Supported(read=True, search=None),  # a card is read by id, as in REST
    "Practitioner": Supported(read=True, search={}),
    "PractitionerRole": Supported(read=True, search={
        "practitioner": ("reference", "the practitioner"),
        "specialty": ("token", "a specialty code (urn:clinic:specialty)")}),
    "Schedule": Supported(read=True, search={"actor": ("reference", "the practitioner whose schedule it is")}),
    "Slot": Supported(read=False, search={
        "schedule": ("reference", "the schedule (required)"),
        "start": ("date", "the slot's start (ge, gt, lt, le, eq)"),
        "status": ("token", "free (only free slots are published)")}),
    "Appointment": Supported(read=True, search={
        "patient": ("reference", "the patient"),
        "date": ("date", "the appointment's start (ge, gt, lt, le, eq)"),
        "status": ("token", "pending | booked | arrived | fulfilled | cancelled | noshow")}),
    "Encounter": Supported(read=True, search={
        "patient": ("reference", "the patient"),
        "date": ("date", "the planned start of the visit (ge, gt, lt, le, eq)"),
        "status": ("token", "in-progress | finished")}),
    "DocumentReference": Supported(read=True, search={
        "patient": ("reference", "the patient"),
        "date": ("date", "when the document was created (ge, gt, lt, le, eq)"),
        "status": ("token", "current | entered-in-error")}),
    "DiagnosticReport": Supported(read=True, search={  # the analyses among the documents
        "patient": ("reference", "the patient"),
        "date": ("date", "when the analysis was uploaded (ge, gt, lt, le, eq)"),
        "status": ("token", "final | registered | entered-in-error")}),
    "Communication": Supported(read=False, search={
        "encounter": ("reference", "an encounter: the messages of its patient's conversation with its specialist, "
                                   "which spans all their visits (required)")}),
}


def search_parameters(resource_type: str) -> frozenset[str]:
    supported = SUPPORTED.get(resource_type)
    if supported is None or supported.search is None:
        raise NotVisible(f"this server does not search {resource_type} resources", reason="search_unsupported")
    return frozenset(supported.search)


def statement(base_url: str) -> dict[str, object]:
    resources = []
    for name, supported in SUPPORTED.items():
        interactions = ([{"code": "read"}] if supported.read else []) + (
            [{"code": "search-type"}] if supported.search is not None else [])
        entry: dict[str, object] = {"type": name, "interaction": interactions}
        if supported.search:
            entry["searchParam"] = [{"name": param, "type": kind, "documentation": about}
                                    for param, (kind, about) in supported.search.items()]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": "2026-01-01", "kind": "instance",
        "publisher": "the clinic", "fhirVersion": "4.0.1", "format": ["application/fhir+json"],
        "implementation": {"description": "The clinic's read-only FHIR API", "url": base_url},
        "rest": [{
            "mode": "server",
            "documentation": "Read-only. Searches are paged with _count (1 to 100, 20 by default) and the "
                             "next link; an unsupported parameter is refused (400).",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "OAuth", "display": "OAuth"}]}],
                "description": "A bearer access token of a clinic account (POST /api/v1/auth/token); every "
                               "resource is shown through the same access rules and masks as the REST API, and "
                               "staff reads of patient data are audited."},
            "resource": resources,
        }],
    }
