"""Generate the Grafana dashboard (JSON) from code: `python -m monitoring.dashboards`.

The checked-in file monitoring/grafana/dashboards/tokencarve.json is this module's output (a test
checks it), and a test runs every panel's PromQL against a real Prometheus scraping a real Ray cluster.

Cost panels use two dashboard variables: `gpu_hour_price` ($ per GPU-hour) and `speedup` (stock
time / TokenCarve time for the same work, from the A/B benchmark: benchmarks/bench_pipeline.py).
GPU-hours are the actors' / replicas' time inside generate(), one GPU each (docs/MONITORING.md).
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).parent / "grafana" / "dashboards" / "tokencarve.json"
RATE = "$__rate_interval"
RANGE = "$__range"
DEFAULT_PRICE = 2.50  # $/GPU-hour; set yours in the dashboard
DEFAULT_SPEEDUP = 1.23  # the paper's LLaVA-1.5-7B figure at 128 tokens; replace with your benchmark's


def _rate(metric: str, by: str = "method, keep", extra: str = "") -> str:
    return f"sum by ({by}) (rate(ray_tokencarve_{metric}{extra}[{RATE}]))"


def _quantile(q: float, metric: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate(ray_tokencarve_{metric}_bucket[{RATE}])))"


GPU_HOURS = f"sum(increase(ray_tokencarve_model_seconds_total[{RANGE}])) / 3600"
CARVED_GPU_HOURS = f'sum(increase(ray_tokencarve_model_seconds_total{{method!="none"}}[{RANGE}])) / 3600'

# (title, unit, panel type, [(legend, expr), ...]) in dashboard order, 3 per row.
PANELS = [
    ("Images / s", "ops", "timeseries", [("{{method}} keep={{keep}}", _rate("images_processed_total"))]),
    ("Generated tokens / s", "ops", "timeseries", [("{{method}} keep={{keep}}", _rate("generated_tokens_total"))]),
    (
        "Visual tokens kept",
        "percent",
        "timeseries",
        [
            (
                "{{method}} keep={{keep}}",
                f"100 * {_rate('visual_tokens_kept_total')} / {_rate('visual_tokens_in_total')}",
            )
        ],
    ),
    (
        "Visual tokens kept per row (p50, p95, mean)",
        "none",
        "timeseries",
        [
            ("p50 {{method}} keep={{keep}}", _quantile(0.5, "visual_tokens_kept_per_row", "le, method, keep")),
            ("p95 {{method}} keep={{keep}}", _quantile(0.95, "visual_tokens_kept_per_row", "le, method, keep")),
            (
                "mean {{method}} keep={{keep}}",
                f"{_rate('visual_tokens_kept_per_row_sum')} / {_rate('visual_tokens_kept_per_row_count')}",
            ),
        ],
    ),
    (
        "Rows by visual tokens kept (range, cumulative: rows with <= le)",
        "none",
        "bargauge",
        [("<= {{le}}", f"sum by (le) (increase(ray_tokencarve_visual_tokens_kept_per_row_bucket[{RANGE}]))")],
    ),
    (
        "KV-cache bytes saved (range)",
        "bytes",
        "stat",
        [
            (
                "saved",
                f"sum(increase(ray_tokencarve_kv_cache_bytes_uncompressed_total[{RANGE}]))"
                f" - sum(increase(ray_tokencarve_kv_cache_bytes_held_total[{RANGE}]))",
            )
        ],
    ),
    (
        "KV cache saved",
        "percent",
        "timeseries",
        [
            (
                "{{method}} keep={{keep}}",
                f"100 * (1 - {_rate('kv_cache_bytes_held_total')} / {_rate('kv_cache_bytes_uncompressed_total')})",
            )
        ],
    ),
    ("GPU-hours used (range)", "h", "stat", [("GPU-hours", GPU_HOURS)]),
    ("Estimated GPU-hours saved (range)", "h", "stat", [("saved", f"{CARVED_GPU_HOURS} * ($speedup - 1)")]),
    (
        "Estimated cost saved (range)",
        "currencyUSD",
        "stat",
        [("saved", f"{CARVED_GPU_HOURS} * ($speedup - 1) * $gpu_hour_price")],
    ),
    ("Errors / s by reason", "ops", "timeseries", [("{{reason}}", _rate("images_failed_total", by="reason"))]),
    (
        "Prefill latency per batch",
        "s",
        "timeseries",
        [("p50", _quantile(0.5, "prefill_seconds")), ("p99", _quantile(0.99, "prefill_seconds"))],
    ),
    (
        "Decode latency per batch",
        "s",
        "timeseries",
        [("p50", _quantile(0.5, "decode_seconds")), ("p99", _quantile(0.99, "decode_seconds"))],
    ),
    (
        "Carve step per batch",
        "s",
        "timeseries",
        [("p50", _quantile(0.5, "carve_seconds")), ("p99", _quantile(0.99, "carve_seconds"))],
    ),
    (
        "Batch size (mean)",
        "none",
        "timeseries",
        [
            (
                "mean",
                f"sum(rate(ray_tokencarve_batch_size_sum[{RATE}])) / sum(rate(ray_tokencarve_batch_size_count[{RATE}]))",
            )
        ],
    ),
    (
        "Serve replicas (healthy)",
        "none",
        "timeseries",
        [("{{deployment}}", "sum by (deployment) (ray_serve_deployment_replica_healthy)")],
    ),
    (
        "Serve queue and ongoing requests",
        "none",
        "timeseries",
        [
            ("queued {{deployment}}", "sum by (deployment) (ray_serve_deployment_queued_queries)"),
            ("ongoing {{deployment}}", "sum by (deployment) (ray_serve_num_ongoing_requests_at_replicas)"),
        ],
    ),
]


def _panel(index: int, title: str, unit: str, kind: str, targets) -> dict:
    return {
        "id": index + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": (index % 3) * 8, "y": (index // 3) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}} if kind == "stat" else {},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def _textbox(name: str, label: str, default) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "textbox",
        "query": str(default),
        "current": {"text": str(default), "value": str(default)},
        "hide": 0,
    }


def dashboard() -> dict:
    return {
        "uid": "tokencarve",
        "title": "TokenCarve: throughput and cost savings",
        "tags": ["tokencarve", "ray"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "hide": 0},
                _textbox("gpu_hour_price", "$ per GPU-hour", DEFAULT_PRICE),
                _textbox("speedup", "Speedup vs stock (A/B benchmark)", DEFAULT_SPEEDUP),
            ]
        },
        "panels": [_panel(i, *panel) for i, panel in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
