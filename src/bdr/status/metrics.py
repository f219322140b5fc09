"""The Prometheus endpoint of a daemon: ``/metrics`` over HTTP, each metric read from the same status snapshot
``bdr status`` shows (so a scrape and ``bdr status --json`` taken together agree).  ``prometheus_client`` is
imported only when an endpoint is opened: a daemon without ``--metrics-address`` starts without it."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .control import Board
from .schema import Spec

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import Collector

log = logging.getLogger("bdr.status")


def lookup(snap: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = snap
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def _collector(board: Board, specs: list[Spec], states: tuple[str, ...], prefix: str) -> Collector:
    """A collector that reads every metric from the board's snapshot at scrape time."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    class SnapshotCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            snap = board.get()
            for spec in specs:
                value = lookup(snap, spec.path)
                if value is None:
                    continue
                family = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
                yield family(f"{prefix}_{spec.name}", spec.help, value=value)
            state = GaugeMetricFamily(f"{prefix}_state", "1 for the daemon's current state", labels=["state"])
            for s in states:
                state.add_metric([s], 1.0 if snap.get("state") == s else 0.0)
            yield state

    return SnapshotCollector()


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (``:PORT`` alone listens on loopback; port 0: any free port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics address {text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsEndpoint:
    """``/metrics`` at ``address``, served from a thread of its own."""

    def __init__(
        self, address: str, board: Board, specs: list[Spec], states: tuple[str, ...], prefix: str
    ) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_collector(board, specs, states, prefix))
        self.server, self._thread = start_http_server(port, host, registry=registry)
        self.port = int(self.server.server_port)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"
        log.info("Prometheus metrics on %s", self.url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
