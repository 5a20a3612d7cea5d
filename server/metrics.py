"""Prometheus metrics at `/metrics`: requests, jobs, tokens, and the engine's live state: model
loads, wakes, sleeps and evictions with their durations, and each version's bytes per device."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.auth import identity_of


LIFECYCLE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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
        self.loads = Counter("ember_model_loads_total", "Versions loaded from their weights", ["model"],
                             registry=self.registry)
        self.wakes = Counter("ember_model_wakes_total", "Sleeping versions woken", ["model"],
                             registry=self.registry)
        self.sleeps = Counter("ember_model_sleeps_total", "Versions put to sleep", ["model", "reason"],
                              registry=self.registry)
        self.unloads = Counter("ember_model_unloads_total", "Versions unloaded", ["model", "reason"],
                               registry=self.registry)
        self.evictions = Counter("ember_model_evictions_total", "Idle versions moved out to make room",
                                 ["model", "action"], registry=self.registry)
        self.load_failures = Counter("ember_model_load_failures_total", "Failed loads, wakes and sleeps",
                                     ["model"], registry=self.registry)
        self.load_seconds = Histogram("ember_model_load_seconds", "Time to load a version", ["model"],
                                      registry=self.registry, buckets=LIFECYCLE_BUCKETS)
        self.wake_seconds = Histogram("ember_model_wake_seconds", "Time to wake a sleeping version", ["model"],
                                      registry=self.registry, buckets=LIFECYCLE_BUCKETS)
        self.memory = Gauge("ember_model_memory_bytes", "Bytes a version holds on a device",
                            ["model", "version", "device", "status"], registry=self.registry)
        self.budget = Gauge("ember_device_budget_bytes", "Memory budget of a device", ["device"],
                            registry=self.registry)

    def pool_event(self, event) -> None:
        """Count one finished lifecycle transition (an engine.loading.PoolEvent)."""
        model = event.version.model
        if event.kind == "load":
            self.loads.labels(model).inc()
            self.load_seconds.labels(model).observe(event.seconds)
        elif event.kind == "wake":
            self.wakes.labels(model).inc()
            self.wake_seconds.labels(model).observe(event.seconds)
        elif event.kind == "fail":
            self.load_failures.labels(model).inc()
        elif event.kind in ("sleep", "unload"):
            (self.sleeps if event.kind == "sleep" else self.unloads).labels(model, event.reason).inc()
            if event.reason == "evict":
                self.evictions.labels(model, event.kind).inc()

    def pool_state(self, engine) -> None:
        """Set the memory gauges from the pool as it is now (versions that left drop out)."""
        self.memory.clear()
        for version in engine.registry.versions():
            state = engine.pool.state(version)
            for device, size in state.memory.items():
                self.memory.labels(version.model, version.id, device, state.status).set(size)
        for device, size in engine.pool.budgets.items():
            self.budget.labels(device).set(size)

    def job_finished(self, job) -> None:
        self.jobs.labels(job.model, job.status).inc()
        tokens = sum(c.completion_tokens for c in job.choices)
        if tokens:
            self.tokens.labels(job.model).inc(tokens)


class RequestMetrics:
    """Counts each HTTP request by route and status and times it to the start of its response.

    A plain ASGI middleware: a streamed body passes straight through. Starlette's
    `BaseHTTPMiddleware` relays every chunk of a streamed response through a memory stream and a
    task group, which made it the largest single cost of a token's SSE chunk in the server."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                path = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(scope["method"], path, str(message["status"])).inc()
                self.metrics.latency.labels(path).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_counted)


def install(app: FastAPI, metrics: Metrics) -> None:
    async def follow_pool(app: FastAPI) -> None:
        app.state.engine.pool.listeners.append(metrics.pool_event)

    app.state.startup_hooks.append(follow_pool)

    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def export(request: Request) -> Response:
        if request.app.state.settings.metrics_require_key:
            identity_of(request)
        engine = request.app.state.engine
        metrics.running.set(sum(not j.done for j in engine.jobs.values()))
        metrics.pool_state(engine)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
