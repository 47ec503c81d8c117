"""A batch job's run-level summary as Prometheus metrics, pushed to a Pushgateway when configured.

The job driver is the single process that owns these numbers, so plain `prometheus_client` is right
here (per-actor metrics go through Ray's metrics system instead, see `monitoring.metrics`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

SUMMARY_GAUGES = {
    "rows_ok": "Rows captioned in the output after this run.",
    "rows_failed": "Rows with an error reason in the output after this run.",
    "rows_this_run": "Rows written by this run.",
    "rows_per_s": "Rows per second in this run.",
    "visual_tokens_kept_pct": "Visual tokens kept, percent of those entering the model.",
    "visual_tokens_kept_mean": "Visual tokens kept per captioned row, mean.",
    "visual_tokens_kept_p50": "Visual tokens kept per captioned row, median.",
    "visual_tokens_kept_p95": "Visual tokens kept per captioned row, 95th percentile.",
    "kv_bytes_saved": "KV-cache bytes saved over all captioned rows.",
    "kv_saved_pct": "KV-cache bytes saved, percent of the uncompressed cache.",
    "seconds": "Wall time of this run.",
}


def summary_registry(summary: dict) -> CollectorRegistry:
    registry = CollectorRegistry()
    labels = {
        "model": str(summary["model"]).rstrip("/").split("/")[-1],
        "method": summary["method"],
        "keep": "none" if summary["keep"] is None else str(summary["keep"]),
    }
    for key, description in SUMMARY_GAUGES.items():
        gauge = Gauge(f"tokencarve_job_{key}", description, list(labels), registry=registry)
        gauge.labels(**labels).set(summary[key] or 0)
    return registry


def push_summary(summary: dict, gateway: str, job: str = "tokencarve_caption_corpus") -> None:
    push_to_gateway(gateway, job=job, registry=summary_registry(summary))
