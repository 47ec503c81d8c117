"""The one definition of every TokenCarve metric, and the recorder that batch actors and Serve
replicas (and library users outside Ray) call after each generate() batch.

Inside Ray, metrics go through Ray's metrics system (`ray.util.metrics`): every node exports them on
its metrics port and Prometheus finds the nodes through Ray's service-discovery file. Names get
Ray's `ray_` prefix and counters a `_total` suffix (`ray_tokencarve_images_processed_total`).
Outside Ray (a single process owns them), the same specs become `prometheus_client` objects.
Labels are low-cardinality only: model, method, keep (+ reason for failures).
"""

from __future__ import annotations

from dataclasses import dataclass

LABELS = ("model", "method", "keep")
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# visual tokens one row keeps: an adaptive budget's counts are multiples of 8 between its min and max
# (16-192 by default); the upper buckets hold fixed budgets of the any-resolution families
KEPT_TOKENS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 576, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "histogram" | "gauge"
    description: str
    labels: tuple[str, ...] = LABELS
    buckets: tuple[float, ...] = ()

    def exported(self, ray_prefix: bool = True) -> str:
        """The name Prometheus sees (histograms add _bucket/_sum/_count)."""
        name = f"ray_{self.name}" if ray_prefix else self.name
        return f"{name}_total" if self.kind == "counter" else name


METRICS = {
    spec.name: spec
    for spec in [
        MetricSpec("tokencarve_images_processed", "counter", "Images captioned successfully."),
        MetricSpec(
            "tokencarve_images_failed",
            "counter",
            "Images that got an error instead of a caption, by reason.",
            LABELS + ("reason",),
        ),
        MetricSpec("tokencarve_generated_tokens", "counter", "Tokens generated."),
        MetricSpec(
            "tokencarve_visual_tokens_in", "counter", "Visual tokens entering the language model (before carving)."
        ),
        MetricSpec("tokencarve_visual_tokens_kept", "counter", "Visual tokens kept after carving."),
        MetricSpec(
            "tokencarve_visual_tokens_kept_per_row",
            "histogram",
            "Visual tokens kept per row: the distribution an adaptive budget (auto:64) spreads over.",
            buckets=KEPT_TOKENS,
        ),
        MetricSpec(
            "tokencarve_kv_cache_bytes_held",
            "counter",
            "KV-cache bytes held per image at the end of generation, measured from the cache tensors.",
        ),
        MetricSpec(
            "tokencarve_kv_cache_bytes_uncompressed",
            "counter",
            "KV-cache bytes the same images would hold without carving.",
        ),
        MetricSpec("tokencarve_model_seconds", "counter", "Seconds spent in generate() (accelerator busy time)."),
        MetricSpec(
            "tokencarve_batch_size", "histogram", "Images per generate() call.", buckets=(1, 2, 4, 8, 16, 32, 64)
        ),
        MetricSpec(
            "tokencarve_prefill_seconds",
            "histogram",
            "Prefill latency per batch (vision tower + prompt).",
            buckets=SECONDS,
        ),
        MetricSpec(
            "tokencarve_decode_seconds",
            "histogram",
            "Decode latency per batch (all generated tokens).",
            buckets=SECONDS,
        ),
        MetricSpec(
            "tokencarve_carve_seconds",
            "histogram",
            "Time of the carve step itself per batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        ),
        # the static decode path's pool, per engine (tokencarve.decode.DecodeStats)
        MetricSpec(
            "tokencarve_decode_warmup_seconds",
            "gauge",
            "Seconds the engine's warm-up took before it took work (pool allocation, every compiled shape).",
        ),
        MetricSpec("tokencarve_decode_shapes_compiled", "gauge", "Decode-step shapes compiled by the engine."),
        MetricSpec(
            "tokencarve_decode_eager_fallbacks",
            "gauge",
            "Decode-step shapes that failed to compile (or hit a recompile limit) and run eagerly.",
        ),
        MetricSpec(
            "tokencarve_decode_pool_bytes", "gauge", "Bytes the engine's decode pool holds (KV cache and books)."
        ),
        MetricSpec(
            "tokencarve_decode_pool_budget_bytes", "gauge", "The KV-cache budget the decode pool is sized within."
        ),
    ]
}


def _ray_metric(spec: MetricSpec):
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.labels)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels)


def _prometheus_metric(spec: MetricSpec, registry):
    import prometheus_client

    if spec.kind == "counter":
        return prometheus_client.Counter(spec.name, spec.description, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return prometheus_client.Gauge(spec.name, spec.description, spec.labels, registry=registry)
    return prometheus_client.Histogram(
        spec.name, spec.description, spec.labels, buckets=spec.buckets, registry=registry
    )


class _Emitter:
    """Adds and observes values on either backend with one call shape."""

    def __init__(self, metric, backend: str):
        self.metric, self.backend = metric, backend

    def add(self, value: float, tags: dict) -> None:
        if self.backend == "ray":
            self.metric.inc(value, tags=tags)
        else:
            self.metric.labels(**tags).inc(value)

    def observe(self, value: float, tags: dict) -> None:
        if self.backend == "ray":
            self.metric.observe(value, tags=tags)
        else:
            self.metric.labels(**tags).observe(value)

    def set(self, value: float, tags: dict) -> None:
        if self.backend == "ray":
            self.metric.set(value, tags=tags)
        else:
            self.metric.labels(**tags).set(value)


class MetricsRecorder:
    """Records engine batches. backend="ray" inside Ray actors/replicas, "prometheus" elsewhere
    (pass a `prometheus_client.CollectorRegistry`, or the default registry is used)."""

    def __init__(self, model: str, method: str, keep, backend: str = "ray", registry=None):
        if backend == "prometheus" and registry is None:
            import prometheus_client

            registry = prometheus_client.REGISTRY
        make = _ray_metric if backend == "ray" else (lambda spec: _prometheus_metric(spec, registry))
        self._metrics = {name: _Emitter(make(spec), backend) for name, spec in METRICS.items()}
        self.tags = {
            "model": model,
            "method": method,
            "keep": "none" if keep is None or method == "none" else str(keep),
        }

    def batch(self, captions, timing, method: str | None = None, keep=None) -> None:
        """One generate() batch: `captions` are tokencarve.engine.Caption, `timing` its BatchTiming;
        method / keep: a per-request override of the recorder's labels."""
        m, tags = self._metrics, self.tags
        if method is not None:
            tags = {**tags, "method": method, "keep": "none" if method == "none" else str(keep)}
        m["tokencarve_images_processed"].add(len(captions), tags)
        for name, field in [
            ("tokencarve_generated_tokens", "generated_tokens"),
            ("tokencarve_visual_tokens_in", "visual_tokens_in"),
            ("tokencarve_visual_tokens_kept", "visual_tokens_kept"),
            ("tokencarve_kv_cache_bytes_held", "kv_bytes_held"),
            ("tokencarve_kv_cache_bytes_uncompressed", "kv_bytes_uncompressed"),
        ]:
            m[name].add(sum(getattr(c, field) for c in captions), tags)
        m["tokencarve_model_seconds"].add(timing.prefill_seconds + timing.decode_seconds, tags)
        for caption in captions:
            m["tokencarve_visual_tokens_kept_per_row"].observe(caption.visual_tokens_kept, tags)
        m["tokencarve_batch_size"].observe(len(captions), tags)
        m["tokencarve_prefill_seconds"].observe(timing.prefill_seconds, tags)
        m["tokencarve_decode_seconds"].observe(timing.decode_seconds, tags)
        m["tokencarve_carve_seconds"].observe(timing.carve_seconds, tags)

    def decoder(self, decoder) -> None:
        """An engine's static decode pool (its `decoder`, a tokencarve.decode.StaticDecoder; None, the
        generate() path, has none): after warm-up and each batch."""
        if decoder is None:
            return
        stats = decoder.stats
        for name, value in [
            ("tokencarve_decode_warmup_seconds", stats.warmup_seconds),
            ("tokencarve_decode_shapes_compiled", stats.shapes_compiled),
            ("tokencarve_decode_eager_fallbacks", stats.eager_fallbacks),
            ("tokencarve_decode_pool_bytes", stats.pool_bytes),
            ("tokencarve_decode_pool_budget_bytes", stats.budget_bytes),
        ]:
            self._metrics[name].set(value, self.tags)

    def failed(self, reason: str, count: int = 1) -> None:
        self._metrics["tokencarve_images_failed"].add(count, {**self.tags, "reason": reason})
