"""OpenTelemetry tracing (app/tracing.py): with OTEL_EXPORTER_OTLP_ENDPOINT set, each request's span reaches an
OTLP/HTTP collector (a local one speaking the protocol: protobuf ExportTraceServiceRequest on /v1/traces), with
its route and status, and with the query's secrets redacted as in the logs; without it nothing is traced."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from app.settings import Settings
from tests.conftest import running


class Collector:
    """Receives OTLP/HTTP trace exports and keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.paths.append(self.path)
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    service = next(a.value.string_value for a in resource_spans.resource.attributes
                                   if a.key == "service.name")
                    for scope_spans in resource_spans.scope_spans:
                        collector.spans.extend((service, span) for span in scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    thread = threading.Thread(target=c.server.serve_forever, daemon=True)
    thread.start()
    yield c
    c.server.shutdown()
    c.server.server_close()


def attributes(span: Any) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


async def test_each_request_is_a_span_at_the_collector_without_the_querys_secrets(
    test_settings: Settings, collector: Collector,
) -> None:
    settings = msgspec.structs.replace(test_settings, otel_exporter_otlp_endpoint=collector.url,
                                       otel_service_name="clinic-test")
    async with running(settings) as client:
        token = client.app.state.tokens.issue_access(uuid.uuid4(), ["patient"])
        answer = await client.get("/api/v1/me/dependents", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert (await client.get("/api/v1/objects/x?signature=s3cr3t-sig&expires=1")).status_code in (403, 404)
        assert (await client.get("/health/live")).status_code == 200
    # the app's shutdown flushed the batch
    assert collector.paths
    assert set(collector.paths) == {"/v1/traces"}
    services = {service for service, _ in collector.spans}
    assert services == {"clinic-test"}
    servers = [s for _, s in collector.spans if s.kind == s.SPAN_KIND_SERVER]
    routes = {(s.name, attributes(s).get("http.status_code")) for s in servers}
    assert ("GET /api/v1/me/dependents", 200) in routes
    assert not any("/health" in name for name, _ in routes)  # probes are not traced
    every_value = " ".join(str(v) for s in (s for _, s in collector.spans) for v in attributes(s).values())
    assert "s3cr3t-sig" not in every_value
    assert token not in every_value


async def test_without_an_endpoint_nothing_is_traced(test_settings: Settings, collector: Collector) -> None:
    assert test_settings.otel_exporter_otlp_endpoint is None
    async with running(test_settings) as client:
        assert not any(type(p).__name__ == "OpenTelemetryPlugin" for p in client.app.plugins)
        assert (await client.get("/health/live")).status_code == 200
    assert collector.paths == []
