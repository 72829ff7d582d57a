"""A FHIR R4 read API over the clinic's data (docs/fhir.md), through the REST API's own access rules."""
