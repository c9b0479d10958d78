"""The one metrics sink every daemon uses: JSONL lines and a Prometheus endpoint.

`log(metrics, step=...)` appends one JSON object per call, `{"step", "time", **metrics}`, and sets a
gauge per numeric metric; `count(name)` increments a counter. Metric names follow docs/contributing.md
(`engine/...`, `trainer/...`, `envs/...`); on the Prometheus side `trainer/loss` is exposed as
`tidal_trainer_loss` and a counter `engine/rejected` as `tidal_engine_rejected_total`. The endpoint
binds 127.0.0.1 unless told otherwise (docs/architecture.md invariant 7); port 0 picks a free one, read back
from `prometheus_port`. Each sink has its own registry, so several can live in one process.

>>> with Telemetry() as tel:
...     tel.log({"trainer/loss": 0.5}, step=1)
...     tel.value("trainer/loss")
0.5
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["Telemetry", "prometheus_name"]

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(name: str, namespace: str = "tidal") -> str:
    """`trainer/loss` -> `tidal_trainer_loss`: every character Prometheus forbids becomes `_`."""
    return f"{namespace}_{_NOT_NAME.sub('_', name)}"


class Telemetry:
    """Metrics of one daemon. Thread-safe; `close` (or `with`) flushes the file and stops the server."""

    def __init__(
        self,
        jsonl: str | Path | None = None,
        *,
        prometheus_port: int | None = None,
        host: str = "127.0.0.1",
        namespace: str = "tidal",
    ) -> None:
        self.namespace = namespace
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        self._file = None
        if jsonl is not None:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(jsonl, "ab")  # closed in close()
        self._server = self._thread = None
        self.prometheus_port: int | None = None
        if prometheus_port is not None:
            self._server, self._thread = start_http_server(prometheus_port, addr=host, registry=self.registry)
            self.prometheus_port = self._server.server_address[1]
            self.prometheus_url = f"http://{host}:{self.prometheus_port}/metrics"

    def log(self, metrics: Mapping[str, float | int | bool | str], step: int | None = None) -> None:
        """Append one JSONL record and set a gauge for each numeric metric (strings go to JSONL only)."""
        record: dict = {"step": step, "time": time.time()}
        for name, value in metrics.items():
            if isinstance(value, str):
                record[name] = value
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {name!r}: expected a number or a string, got {type(value).__name__}") from None
            record[name] = number if math.isfinite(number) else None
            self._metric(self._gauges, Gauge, name).set(number)
        if self._file is not None:
            line = self._encoder.encode(record) + b"\n"
            with self._lock:
                self._file.write(line)
                self._file.flush()

    def count(self, name: str, n: float = 1) -> None:
        """Add `n` (>= 0) to the counter `name`."""
        self._metric(self._counters, Counter, name).inc(n)

    def value(self, name: str) -> float | None:
        """The current value of a gauge or counter (None if never set): what a scrape would show."""
        for suffix in ("", "_total"):
            found = self.registry.get_sample_value(prometheus_name(name, self.namespace) + suffix)
            if found is not None:
                return found
        return None

    def _metric(self, table: dict, kind: type, name: str):
        metric = table.get(name)
        if metric is None:
            with self._lock:
                metric = table.get(name)
                if metric is None:
                    other = self._counters if table is self._gauges else self._gauges
                    if name in other:
                        raise ValueError(f"metric {name!r} is already a {'counter' if other is self._counters else 'gauge'}")
                    metric = table[name] = kind(prometheus_name(name, self.namespace), name, registry=self.registry)
        return metric

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
