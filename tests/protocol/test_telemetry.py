"""protocol/telemetry.py: JSONL records and a Prometheus endpoint scraped over real HTTP."""

import json
import urllib.request

import pytest
from tidal.protocol.telemetry import Telemetry, prometheus_name


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_names_map_to_prometheus():
    assert prometheus_name("trainer/loss") == "tidal_trainer_loss"
    assert prometheus_name("engine/tokens-per-s.p99") == "tidal_engine_tokens_per_s_p99"


def test_jsonl_and_prometheus_endpoint(tmp_path):
    path = tmp_path / "metrics" / "trainer.jsonl"
    with Telemetry(path, prometheus_port=0) as tel:
        assert tel.prometheus_port > 0
        assert tel.prometheus_url.startswith("http://127.0.0.1:")
        tel.log({"trainer/loss": 0.25, "trainer/phase": "warmup"}, step=1)
        tel.log({"trainer/loss": 0.125, "trainer/nan": float("nan")}, step=2)
        tel.count("engine/rejected")
        tel.count("engine/rejected", 2)
        samples = _scrape(tel.prometheus_url)
        assert samples["tidal_trainer_loss"] == 0.125  # a gauge shows the latest value
        assert samples["tidal_engine_rejected_total"] == 3
        assert "tidal_trainer_phase" not in samples  # strings are JSONL-only
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["trainer/loss"] == 0.25 and records[0]["trainer/phase"] == "warmup"
    assert records[1]["trainer/nan"] is None  # JSON has no NaN
    assert all(isinstance(r["time"], float) for r in records)
    with pytest.raises(OSError):  # closed: the endpoint is gone
        urllib.request.urlopen(tel.prometheus_url, timeout=2)


def test_bad_metrics_name_the_metric():
    with Telemetry() as tel:
        with pytest.raises(TypeError, match="trainer/loss"):
            tel.log({"trainer/loss": [1, 2]})
        tel.count("engine/turns")
        with pytest.raises(ValueError, match="engine/turns"):
            tel.log({"engine/turns": 1.0})
