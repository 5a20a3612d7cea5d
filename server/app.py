"""The FastAPI app factory: engine, store and auth on app.state; three dialect routers on top."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from engine.engine import Engine, EngineOptions, demo_registry
from engine.files import FileStore
from server import (embeddings, errors, flowise, metrics, models_api, openai, playground, replicas, replicate,
                    responses)
from server.auth import Authenticator, JWTPolicy, is_authorized, require_identity
from server.guard import Limits, RequestGuard
from server.openapi_docs import error_responses
from server.jobs import JobService
from server.settings import Settings
from server.store import Store, StoreUnavailable, database_url, redacted

log = logging.getLogger("ember.server")



def public_base(settings: Settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


EngineFactory = Callable[..., Engine]  # (registry, files, options) -> Engine


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = Engine) -> FastAPI:
    """The app over one Engine. `engine_factory` picks where models run: in this process (the
    default), or behind Ray Serve deployment handles (server.ray_serve)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        base = public_base(settings)
        registry = await asyncio.to_thread(demo_registry, settings.home, settings.models)
        files = FileStore(settings.files_dir, ttl_hours=settings.file_ttl_hours)
        engine = engine_factory(registry, files, EngineOptions(
            allow_http_inputs=settings.allow_http_inputs, allow_private_urls=settings.allow_private_urls,
            max_running_jobs=settings.max_queue,
            memory_budgets=settings.memory_budget_bytes(),
            file_url=lambda file_id: f"{base}/v1/files/{file_id}/content"))
        try:
            store = await asyncio.to_thread(Store, settings.database, settings.max_sessions_per_key)
        except (SQLAlchemyError, StoreUnavailable) as exc:
            reason = exc.__cause__ or exc
            raise RuntimeError(f"cannot open the store {redacted(database_url(settings.database))}: {reason}") from None
        app.state.settings = settings
        app.state.engine = engine
        app.state.files = files
        app.state.store = store
        app.state.auth = Authenticator(settings.all_api_keys(), settings.jwt_secret,
                                       JWTPolicy(settings.jwt_max_lifetime_s, settings.jwt_audience,
                                                 settings.jwt_issuer))
        app.state.jobs = JobService(engine, store, app.state.metrics, base)
        app.state.replica = replicas.new_state(store)
        store.heartbeat()
        # A SQLite store has one server (the state folder's lock): what it left unfinished was
        # interrupted. On a shared store only the predictions of replicas gone silent are.
        app.state.requeue = app.state.jobs.adopt_orphans(settings.requeue_interrupted, settings.replica_lease_s,
                                                         alone=store.backend == "sqlite")
        for hook in app.state.startup_hooks:
            await hook(app)
        await engine.start()
        background = [asyncio.create_task(_sweep(store, files, settings)),
                      asyncio.create_task(replicas.keep_alive(app))]
        try:
            yield
        finally:
            app.state.replica.stopping = True
            for task in background:
                task.cancel()
            app.state.jobs.stop_recording_ends()
            await engine.close()
            app.state.jobs.close()
            try:
                store.leave()
            finally:
                store.close()

    app = FastAPI(title="ember", version=_version(), lifespan=lifespan,
                  description="Versioned models on GPUs behind the Replicate, OpenAI and Flowise APIs.")
    app.state.metrics = metrics.Metrics()
    app.state.startup_hooks = []  # routers add coroutines run once the engine exists
    app.add_middleware(RequestGuard, limits=Limits(
        max_json_bytes=settings.max_json_bytes, max_upload_bytes=settings.max_upload_bytes,
        max_json_depth=settings.max_json_depth, body_timeout_s=settings.body_timeout_s))
    errors.install(app)
    metrics.install(app, app.state.metrics)

    @app.get("/health", tags=["health"])
    async def health(request: Request) -> JSONResponse:
        """Whether this replica serves, for everyone (and load balancers): 200 `ok`, or 503
        `unavailable` while its store cannot be reached or it is stopping. Callers with a key
        (when the server has keys) also get the replica's state (store backend, heartbeat, the
        live replicas) and the models, their versions and load errors."""
        serving, replica = await replicas.health(request.app)
        status, code = ("ok", 200) if serving else ("unavailable", 503)
        if not is_authorized(request):
            return JSONResponse({"status": status}, status_code=code)
        engine: Engine = request.app.state.engine
        models = [models_api.lifecycle(engine.pool, version) for version in engine.registry.versions()]
        budgets = engine.pool.budgets
        used = {device: engine.pool.used(device) for device in budgets}
        return JSONResponse({"status": status, "replica": replica, "models": models,
                             "memory": {"budgets": budgets, "used": used}}, status_code=code)

    @app.get("/v1/whoami", tags=["health"])
    async def whoami(identity: str = Depends(require_identity)) -> dict:
        return {"identity": identity}

    app.include_router(models_api.router, tags=["models"], responses=error_responses("shared"))
    app.include_router(openai.router, tags=["openai"], responses=error_responses("openai"))
    app.include_router(responses.router, tags=["openai"], responses=error_responses("openai"))
    app.include_router(embeddings.router, tags=["openai"], responses=error_responses("openai"))
    app.include_router(replicate.router, tags=["replicate"], responses=error_responses("replicate"))
    app.include_router(flowise.router, tags=["flowise"], responses=error_responses("flowise"))
    app.include_router(playground.router)
    for router_module in (openai, replicate, flowise):
        hook = getattr(router_module, "on_startup", None)
        if hook is not None:
            app.state.startup_hooks.append(hook)
    return app


async def _sweep(store: Store, files: FileStore, settings: Settings) -> None:
    """Delete idle sessions and expired files, forever."""
    while True:
        try:
            await asyncio.to_thread(store.expire_sessions, settings.session_ttl_hours)
            await asyncio.to_thread(files.delete_expired)
        except Exception:  # noqa: BLE001 - the sweep must never stop the server
            log.exception("sweep of sessions and files failed")
        await asyncio.sleep(settings.sweep_interval_s)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ember")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.1.0"
