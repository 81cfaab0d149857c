"""The Files and Batches routes of OpenAI's Batch API (`/v1/files`, `/v1/batches`), thin over the service.

Every object belongs to whoever created it: a named key of the keys file by its name (`key:<name>`, so a key
rotated under the same name keeps its files and batches), an `API_KEYS` key by a digest of the key
(`app.batch.store.owner_of`); another owner's id is a 404, as an unknown id is. Uploaded names are kept as
metadata only (directories stripped); bytes are stored under
the service's own id. Limits (lines, bytes) are 400s naming the limit.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from app.api.errors import error_response
from app.batch.service import BatchService
from app.batch.shapes import Batch, BatchCreate, FileDeleted, FileObject, Page
from app.batch.store import new_batch_id, new_file_id, now, owner_of
from app.batch.validation import count_lines
from app.tenants.gate import TenantGate, tenant_of
from app.tenants.registry import ANONYMOUS

router = APIRouter(prefix="/v1")
health_router = APIRouter()
_CHUNK = 1024 * 1024


def _service(request: Request) -> BatchService:
    service: BatchService = request.app.state.batch
    return service


def _owner(request: Request) -> str:
    gate: TenantGate = request.app.state.tenants
    if not gate.enabled:
        return ""
    tenant = tenant_of(request.scope)
    if tenant is not None and tenant.name != ANONYMOUS:
        return f"key:{tenant.name}"
    _, _, token = request.headers.get("authorization", "").partition(" ")
    return owner_of(token.strip())


def _not_found(kind: str, object_id: str) -> JSONResponse:
    return error_response(f"No such {kind} object: {object_id}", 404, err_type="invalid_request_error",
                          param="id", code="not_found")


def clean_filename(name: str | None) -> str:
    """The client's file name without directories or control characters (metadata only, never a path)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()
    return base[:255] if base not in ("", ".", "..") else "upload.jsonl"


# ------------------------------------------------------------------------------------------------- files


def _save_upload(src: BinaryIO, path: Path, limit: int) -> int:
    """Copy an upload to `path`, stopping past `limit` bytes; returns the bytes seen (> limit: too big)."""
    size = 0
    with open(path, "wb") as out:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                break
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


@router.post("/files")
async def create_file(request: Request, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> Response:
    service = _service(request)
    if purpose != "batch":
        return error_response(f"purpose {purpose!r} is not supported here: this server takes purpose 'batch'", 400,
                              param="purpose", code="invalid_value")
    file_id = new_file_id()
    path = service.store.file_path(file_id)
    limit = service.limits.max_file_bytes
    size = await asyncio.to_thread(_save_upload, file.file, path, limit)
    if size > limit:
        path.unlink(missing_ok=True)
        return error_response(f"file is larger than {limit} bytes (the limit per batch input file)", 400,
                              param="file", code="file_too_large")
    if size == 0:
        path.unlink(missing_ok=True)
        return error_response("file is empty", 400, param="file", code="empty_file")
    lines = await asyncio.to_thread(count_lines, path)
    if lines > service.limits.max_lines:
        path.unlink(missing_ok=True)
        return error_response(f"file has {lines} lines; a batch input file has at most {service.limits.max_lines}",
                              400, param="file", code="too_many_lines")
    obj = FileObject(id=file_id, bytes=size, created_at=now(), filename=clean_filename(file.filename),
                     purpose="batch")
    service.store.add_file(_owner(request), obj)
    return JSONResponse(obj.model_dump())


def _page(data: Sequence[FileObject] | Sequence[Batch], more: bool) -> Page:
    """OpenAI's cursor page: the objects, the first and last ids (the next page's `after`), whether more follow."""
    return Page(data=[d.model_dump() for d in data], first_id=data[0].id if data else None,
                last_id=data[-1].id if data else None, has_more=more)


@router.get("/files")
async def list_files(request: Request, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> Page:
    return _page(*_service(request).store.list_files(_owner(request), after=after, limit=limit, purpose=purpose,
                                                     ascending=order == "asc"))


@router.get("/files/{file_id}", response_model=None)
async def get_file(request: Request, file_id: str) -> FileObject | JSONResponse:
    obj = _service(request).store.get_file(_owner(request), file_id)
    return obj if obj is not None else _not_found("File", file_id)


@router.get("/files/{file_id}/content", response_model=None)
async def file_content(request: Request, file_id: str) -> Response:
    service = _service(request)
    obj = service.store.get_file(_owner(request), file_id)
    if obj is None:
        return _not_found("File", file_id)
    return FileResponse(service.store.file_path(obj.id), media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=None)
async def delete_file(request: Request, file_id: str) -> FileDeleted | JSONResponse:
    if not _service(request).store.delete_file(_owner(request), file_id):
        return _not_found("File", file_id)
    return FileDeleted(id=file_id)


# ----------------------------------------------------------------------------------------------- batches


@router.post("/batches", response_model=None)
async def create_batch(request: Request, body: BatchCreate) -> Batch | JSONResponse:
    service = _service(request)
    owner = _owner(request)
    source = service.store.get_file(owner, body.input_file_id)
    if source is None:
        return error_response(f"No such File object: {body.input_file_id}", 404, err_type="invalid_request_error",
                              param="input_file_id", code="not_found")
    if source.purpose != "batch":
        return error_response(f"file {source.id} has purpose {source.purpose!r}; a batch reads a 'batch' file",
                              400, param="input_file_id", code="invalid_value")
    created = now()
    batch = Batch(id=new_batch_id(), endpoint=body.endpoint, input_file_id=source.id,
                  completion_window=body.completion_window, status="validating", created_at=created,
                  expires_at=created + round(service.limits.window_of(body.completion_window)),
                  metadata=body.metadata)
    service.store.add_batch(owner, batch)
    service.runner.schedule(batch.id)
    return batch


@router.get("/batches")
async def list_batches(request: Request, after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Page:
    return _page(*_service(request).store.list_batches(_owner(request), after=after, limit=limit))


@router.get("/batches/{batch_id}", response_model=None)
async def get_batch(request: Request, batch_id: str) -> Batch | JSONResponse:
    batch = _service(request).store.get_batch(_owner(request), batch_id)
    return batch if batch is not None else _not_found("Batch", batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=None)
async def cancel_batch(request: Request, batch_id: str) -> Batch | JSONResponse:
    service = _service(request)
    batch = service.store.get_batch(_owner(request), batch_id)
    if batch is None:
        return _not_found("Batch", batch_id)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if batch.status not in ("validating", "in_progress"):
        return error_response(f"batch {batch_id} is {batch.status}: only a validating or in_progress batch can be "
                              "cancelled", 400, param="batch_id", code="batch_not_cancellable")
    batch.status, batch.cancelling_at = "cancelling", now()
    if not service.store.save_batch(batch, only_if=("validating", "in_progress")):
        current = service.store.get_batch(None, batch_id)
        assert current is not None
        return current
    service.runner.cancel(batch_id)
    return batch


# -------------------------------------------------------------------- health and metrics (batch-server only)


@health_router.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
@health_router.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    _service(request).publish()
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
