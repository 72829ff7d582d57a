"""Optional OpenTelemetry tracing: with OTEL_EXPORTER_OTLP_ENDPOINT set, a span per HTTP request, sent over OTLP/HTTP.

Off by default (no endpoint: nothing is imported, nothing costs). The spans carry the route and status as the
ASGI instrumentation records them; URLs go through the same redaction as the logs (app/observability.py), so a
signed URL's signature, a socket ticket or a phone in a query never leaves the process in a span either.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType

from app.observability import redact
from app.settings import Settings

_URL_ATTRIBUTES = ("http.url", "http.target", "url.full", "url.query")


def _redact_urls(span: Any, scope: dict[str, Any]) -> None:
    """server_request_hook: the request's URL attributes without what the logs would not carry either."""
    attributes = getattr(span, "attributes", None) or {}
    for name in _URL_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str):
            span.set_attribute(name, redact(value))


class Tracing:
    """The tracer provider and the Litestar plugin that opens a span per request; `close` flushes what is queued."""

    def __init__(self, settings: Settings) -> None:
        from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        endpoint = (settings.otel_exporter_otlp_endpoint or "").rstrip("/")
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
        self.config = OpenTelemetryConfig(tracer_provider=self.provider, server_request_hook_handler=_redact_urls,
                                          scopes={ScopeType.HTTP}, exclude=["^/health", "^/metrics"])
        self.plugin = OpenTelemetryPlugin(self.config)

    def close(self) -> None:
        self.provider.shutdown()  # exports what the batch still holds (bounded by the exporter's timeout)


def tracing_of(settings: Settings) -> Tracing | None:
    return Tracing(settings) if settings.otel_exporter_otlp_endpoint else None
