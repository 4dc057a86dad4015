"""The ASGI app: OpenAI's routes over the Redis queue (`create_app`), and `serve` to run it."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..aio import REDIS_DOWN, AsyncClient
from ..openai_api import CHAT, COMPLETIONS, RequestError
from .batches import BatchManager
from .config import GatewayConfig
from .files_api import add_batch_routes
from .generate import Gateway, bad_request, error_response, generate
from .metrics import GatewayMetrics, GatewayMiddleware

log = logging.getLogger("pravaha.gateway")


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app; its Redis client opens at startup and closes at shutdown."""
    metrics = GatewayMetrics()
    state: dict[str, Gateway] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        client = AsyncClient(config.redis_url, stream=config.stream, prefix=config.prefix,
                             max_backlog=config.max_backlog)
        gw = state["gw"] = Gateway(config, client, metrics)
        gw.batches = BatchManager(config, client.names)
        gw.batches.start()
        log.info("gateway serving %s on http://%s:%d", config.stream, config.host, config.port)
        try:
            yield
        finally:
            gw.batches.stop()
            await client.aclose()

    app = FastAPI(title="Pravāha gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(GatewayMiddleware, api_keys=config.api_keys, metrics=metrics)
    _error_handlers(app)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await generate(state["gw"], request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await generate(state["gw"], request, CHAT)

    @app.get("/v1/models")
    async def models() -> dict:
        client = state["gw"].client
        names = await client.redis.zrangebyscore(client.names.models, time.time(), "+inf")
        return {"object": "list", "data": [{"id": n.decode(), "object": "model", "created": 0,
                                            "owned_by": "pravaha"} for n in sorted(names)]}

    @app.get("/health")
    async def health() -> Response:
        try:
            await state["gw"].client.redis.ping()
        except REDIS_DOWN as exc:
            return error_response(503, f"Redis unreachable: {exc}", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_batch_routes(app, lambda: state["gw"].batches)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(RequestError)
    async def _bad(_request, exc: RequestError):
        return bad_request(exc)

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), kind, code=code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return error_response(400, str(exc.errors()[:1]))

    @app.exception_handler(REDIS_DOWN[0])
    async def _redis_down(_request, exc):
        return error_response(503, f"Redis unreachable: {exc}", "server_error", code="redis_unavailable")


def serve(config: GatewayConfig) -> int:
    """Run the gateway with uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning",
                timeout_graceful_shutdown=30)
    return 0
