"""The base of the links the API writes into its answers (FHIR references and paging, the local store's signed
URLs): PUBLIC_BASE_URL when set, since behind a TLS-terminating proxy the request says `http://` and maybe an
internal host; else the request's own scheme and Host."""

from __future__ import annotations

from typing import Any

from litestar import Request


def public_base(request: Request[Any, Any, Any]) -> str:
    configured: str = request.app.state.settings.public_base_url
    return configured.rstrip("/") if configured else str(request.base_url).rstrip("/")
