"""Prometheus metrics at `/metrics`: requests, jobs, tokens, and the engine's live state."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.auth import require_identity


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ember_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("ember_http_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.jobs = Counter("ember_jobs_total", "Finished jobs", ["model", "status"], registry=self.registry)
        self.tokens = Counter("ember_generated_tokens_total", "Completion tokens generated", ["model"],
                              registry=self.registry)
        self.running = Gauge("ember_jobs_running", "Jobs not yet finished", registry=self.registry)

    def job_finished(self, job) -> None:
        self.jobs.labels(job.model, job.status).inc()
        tokens = sum(c.completion_tokens for c in job.choices)
        if tokens:
            self.tokens.labels(job.model).inc(tokens)


def install(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def export(request: Request) -> Response:
        if request.app.state.settings.metrics_require_key:
            require_identity(request)
        engine = request.app.state.engine
        metrics.running.set(sum(not j.done for j in engine.jobs.values()))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
