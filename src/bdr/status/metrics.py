"""The Prometheus endpoint of a daemon: ``/metrics`` over HTTP, each metric read from the same status snapshot
``bdr status`` shows (so a scrape and ``bdr status --json`` taken together agree)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .control import Board
from .schema import Spec

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


class _SnapshotCollector(Collector):
    def __init__(self, board: Board, specs: list[Spec], states: tuple[str, ...], prefix: str) -> None:
        self.board, self.specs, self.states, self.prefix = board, specs, states, prefix

    def collect(self) -> Iterator[Metric]:
        snap = self.board.get()
        for spec in self.specs:
            value = lookup(snap, spec.path)
            if value is None:
                continue
            family = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            yield family(f"{self.prefix}_{spec.name}", spec.help, value=value)
        state = GaugeMetricFamily(
            f"{self.prefix}_state", "1 for the daemon's current state", labels=["state"]
        )
        for s in self.states:
            state.add_metric([s], 1.0 if snap.get("state") == s else 0.0)
        yield state


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
        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(board, specs, states, prefix))
        self.server, self._thread = start_http_server(port, host, registry=registry)
        self.port = int(self.server.server_port)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"
        log.info("Prometheus metrics on %s", self.url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
