"""The Files and Batches routes: /v1/files and /v1/batches, as OpenAI documents them."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from ..openai_api import CHAT, COMPLETIONS, RequestError
from .batches import BatchManager

WINDOWS = ("24h",)


def add_batch_routes(app: FastAPI, manager: Callable[[], BatchManager]) -> None:
    """Register the routes; `manager()` gives the running app's BatchManager. The handlers
    are plain functions: FastAPI runs them in its thread pool (file and Redis I/O block)."""

    @app.post("/v1/files")
    def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:
        if purpose != "batch":
            raise RequestError(f"purpose: only 'batch' is supported, got {purpose!r}", "purpose")
        return manager().files.save(file.file, file.filename or "upload.jsonl", purpose)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict:
        return _file(manager(), file_id)

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> FileResponse:
        meta = _file(manager(), file_id)
        return FileResponse(manager().files.path(file_id), media_type="application/jsonl",
                            filename=meta["filename"])

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict:
        try:
            body = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return await _create(manager(), body)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str) -> dict:
        return _batch(manager(), batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str) -> dict:
        m = manager()
        _batch(m, batch_id)
        if not m.batches.transition(batch_id, ("validating",), "cancelled"):
            m.batches.transition(batch_id, ("in_progress",), "cancelling")
        return _batch(m, batch_id)

    @app.get("/v1/batches")
    def list_batches(after: str | None = None, limit: int = 20) -> dict:
        if not 1 <= limit <= 100:
            raise RequestError("limit: must be in [1, 100]", "limit")
        data = manager().batches.list(after, limit + 1)
        page = data[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}


async def _create(m: BatchManager, body: dict) -> dict:
    from starlette.concurrency import run_in_threadpool

    input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    window, metadata = body.get("completion_window"), body.get("metadata")
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
    if unknown:
        raise RequestError(f"{unknown[0]}: not supported", unknown[0])
    if endpoint not in (COMPLETIONS, CHAT):
        raise RequestError(f"endpoint: must be {COMPLETIONS} or {CHAT}, got {endpoint!r}", "endpoint")
    if window not in WINDOWS:
        raise RequestError(f"completion_window: must be one of {WINDOWS}, got {window!r}", "completion_window")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise RequestError("metadata: must be an object of string values", "metadata")
    meta = await run_in_threadpool(_file, m, input_file_id if isinstance(input_file_id, str) else "")
    if meta["purpose"] != "batch":
        raise RequestError(f"input_file_id: {input_file_id} was not uploaded with purpose 'batch'", "input_file_id")
    batch = await run_in_threadpool(m.batches.create, input_file_id, endpoint, window, metadata)
    await run_in_threadpool(m.poke)
    return batch


def _file(m: BatchManager, file_id: str) -> dict:
    try:
        meta = m.files.get(file_id) if m.files.path(file_id) else None
    except KeyError:
        meta = None
    if meta is None:
        raise HTTPException(404, f"No such File object: {file_id}")
    return meta


def _batch(m: BatchManager, batch_id: str) -> dict:
    batch = m.batches.get(batch_id) if batch_id.startswith("batch_") else None
    if batch is None:
        raise HTTPException(404, f"No such Batch object: {batch_id}")
    return batch
