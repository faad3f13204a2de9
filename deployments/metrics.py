"""Prometheus metrics of one ingress replica, served at /metrics in the text exposition format.

Each replica has its own registry (replicas are processes; with several ingress replicas, each one's
/metrics covers the requests it handled). Batch sizes are measured in the model replicas and sent
back with each answer; only the first request of a batch records it, so the histogram counts batches.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("neuronmap_serve_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("neuronmap_serve_request_duration_seconds", "Time to answer an HTTP request",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("neuronmap_serve_batch_requests", "Requests per model batch",
                                        ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_texts = Histogram("neuronmap_serve_batch_texts", "Texts per model batch",
                                     ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.texts = Counter("neuronmap_serve_extracted_texts", "Texts whose activations were returned",
                             ["model"], registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_extract(self, model: str, n_texts: int, batch_requests: int, batch_texts: int, first: bool) -> None:
        self.texts.labels(model).inc(n_texts)
        if first:
            self.batch_requests.labels(model).observe(batch_requests)
            self.batch_texts.labels(model).observe(batch_texts)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
