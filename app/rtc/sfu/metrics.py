"""The SFU's Prometheus metrics, read at scrape time.

The packet path counts in plain integers on its own objects (`Egress.packets`, `Ingress.keyframe_requests`, ...):
a prometheus_client counter's `inc()` takes a lock, several times the cost of an integer add, on every packet.
A scrape sums those integers per engine, adds what the participants that have left had counted (`Traffic`, kept
by the engine as each closes, so the counters never go back), and counts the rooms, publishers and subscribers.
Every series carries the engine's node name (`node`): an SFU node's, or `local#<id>` for the SFU inside an API
process. A node serves them at `GET /metrics` on its control interface (app/rtc/sfu/node.py), the API process with
its own metrics.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from app.rtc.sfu.engine import Sfu
    from app.rtc.sfu.forward import Egress, Ingress

MEDIA_KINDS = ("audio", "video")


class Traffic:
    """Counts of what an engine forwarded and the feedback it handled, summed over streams."""

    __slots__ = ("nacks_received", "nacks_relayed", "packets", "payload_bytes", "plis_received", "plis_sent",
                 "retransmitted")

    def __init__(self) -> None:
        self.packets = dict.fromkeys(MEDIA_KINDS, 0)  # RTP packets sent to subscribers, by kind
        self.payload_bytes = dict.fromkeys(MEDIA_KINDS, 0)  # their payloads (headers are rewritten per leg)
        self.retransmitted = 0  # packets resent from a subscriber's buffer, answering its NACKs
        self.nacks_received = 0  # NACKs from subscribers
        self.nacks_relayed = 0  # NACKs sent on to publishers, for packets no longer in the buffer
        self.plis_received = 0  # PLIs and FIRs from subscribers
        self.plis_sent = 0  # PLIs to publishers: relayed, or asked for a subscriber waiting for a keyframe

    def copy(self) -> Traffic:
        other = Traffic()
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(other, name, dict(value) if isinstance(value, dict) else value)
        return other

    def add(self, ingress: Iterable[Ingress], egress: Iterable[Egress]) -> None:
        for sent in egress:
            self.packets[sent.kind] = self.packets.get(sent.kind, 0) + sent.packets
            self.payload_bytes[sent.kind] = self.payload_bytes.get(sent.kind, 0) + sent.octets
            self.retransmitted += sent.retransmitted
            self.nacks_received += sent.nacks_received
            self.plis_received += sent.keyframe_requests_received
        for received in ingress:
            self.plis_sent += received.keyframe_requests
            self.nacks_relayed += received.nacks_sent


def _families() -> tuple[dict[str, CounterMetricFamily], dict[str, GaugeMetricFamily]]:
    def counter(name: str, documentation: str, *labels: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, documentation, labels=["node", *labels])

    def gauge(name: str, documentation: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, labels=["node"])

    counters = {
        "packets": counter("clinic_sfu_rtp_packets_forwarded_total", "RTP packets the SFU sent to subscribers",
                           "kind"),
        "payload_bytes": counter("clinic_sfu_rtp_payload_bytes_forwarded_total",
                                 "Payload bytes of the RTP packets the SFU sent to subscribers", "kind"),
        "retransmitted": counter("clinic_sfu_retransmissions_total",
                                 "Packets resent from the SFU's buffer in answer to subscribers' NACKs"),
        "nacks_received": counter("clinic_sfu_nacks_received_total", "NACKs subscribers sent the SFU"),
        "nacks_relayed": counter("clinic_sfu_nacks_relayed_total",
                                 "NACKs the SFU sent on to publishers (packets no longer in its buffer)"),
        "plis_received": counter("clinic_sfu_plis_received_total", "PLIs and FIRs subscribers sent the SFU"),
        "plis_sent": counter("clinic_sfu_plis_sent_total",
                             "PLIs the SFU sent publishers (relayed, or for a subscriber waiting for a keyframe)"),
    }
    gauges = {
        "rooms": gauge("clinic_sfu_rooms", "Rooms (calls) on the SFU"),
        "participants": gauge("clinic_sfu_participants", "Participants connected to the SFU's rooms"),
        "publishers": gauge("clinic_sfu_publishers", "Participants whose media reaches the SFU"),
        "subscribers": gauge("clinic_sfu_subscribers", "Participants the SFU forwards another's media to"),
        "streams": gauge("clinic_sfu_streams", "Streams (one participant's audio or video) being forwarded"),
    }
    return counters, gauges


class SfuMetrics(Collector):
    """The engines of this process and their node names; a scrape reads each."""

    def __init__(self) -> None:
        self.engines: weakref.WeakKeyDictionary[Sfu, str] = weakref.WeakKeyDictionary()

    def watch(self, sfu: Sfu, node: str) -> None:
        self.engines[sfu] = node

    def unwatch(self, sfu: Sfu) -> None:
        self.engines.pop(sfu, None)

    def describe(self) -> Iterator[Metric]:
        counters, gauges = _families()
        yield from counters.values()
        yield from gauges.values()

    def collect(self) -> Iterator[Metric]:
        counters, gauges = _families()
        for sfu, node in list(self.engines.items()):
            traffic = sfu.traffic()
            for kind in MEDIA_KINDS:
                counters["packets"].add_metric([node, kind], traffic.packets.get(kind, 0))
                counters["payload_bytes"].add_metric([node, kind], traffic.payload_bytes.get(kind, 0))
            for name in ("retransmitted", "nacks_received", "nacks_relayed", "plis_received", "plis_sent"):
                counters[name].add_metric([node], getattr(traffic, name))
            occupancy = sfu.occupancy()
            for name, family in gauges.items():
                family.add_metric([node], getattr(occupancy, name))
        yield from counters.values()
        yield from gauges.values()


SFU_METRICS = SfuMetrics()
REGISTRY.register(SFU_METRICS)
