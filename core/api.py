"""The HTTP API for the shop's own systems, mounted at /api/v1 beside the pages (server.py): predict, import,
categories, models and health, JSON in and out, bearer tokens scoped to a role. It calls the same core functions as
the pages and the CLI, so a prediction or an import report here equals the CLI's for the same files.

Every error is JSON `{"error": "..."}` naming the file or value and the reason: a core refusal (`ProdcatError`) is a
4xx, a request that does not match the schema is a 422, and a request is refused before its body is read when its
token is missing or wrong (401) or it is larger than the cap (413).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.auth import Action, PermissionDenied, Principal, Role, authorize, token_principal
from core.catalog.ingest import ImportResult, RefusedItem, Upload, import_uploads
from core.catalog.labels import list_categories, usable_category_name
from core.db import Database, open_database
from core.errors import (
    CategoryError,
    CheckpointError,
    DatabaseBusy,
    ImageRefused,
    LabelConflict,
    NotFound,
    ProdcatError,
    TrainingRefused,
    as_storage_error,
)
from core.ml.predict import predict_uploads
from core.ml.versions import active_version, list_versions
from core.schema import VersionStatus
from core.settings import get_settings

MAX_FILES = 64  # files per request
MAX_REQUEST_BYTES = 1024**3  # a request body's bytes, whatever the per-file cap (settings.max_file_bytes) allows
MAX_TOP_K = 50
READ_CHUNK = 1024 * 1024  # uploads are read from their spooled temporary files this much at a time
IMPORT_BATCH_BYTES = 256 * 1024 * 1024  # bytes handed to one import_uploads call (it holds a call's files in memory)
# Paths anyone may call (inside the mount): the health check and the API's own description.
PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NEW_TOKEN_HINT = "create one with `python -m core.cli tokens create NAME --role ROLE`"  # noqa: S105 (a hint)

_bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer <token>`.")
_db_lock = threading.Lock()

log = logging.getLogger(__name__)


def database() -> Database:
    """The process's database handle (the same one the pages use: open_database keeps one per URL), migrated."""
    with _db_lock:  # the first requests may arrive together: migrate and memoize once
        return open_database(get_settings())


# --- response bodies (they are also the OpenAPI document's schemas) -----------------------------------------------


class ErrorOut(BaseModel):
    error: str = Field(description="What was refused and why, naming the file or value.")


class HealthOut(BaseModel):
    ok: bool
    database: bool = Field(description="The database answered a query.")
    model_version: int | None = Field(description="The active model version's id; null before the first training.")
    error: str | None = None


class TopKOut(BaseModel):
    category: str
    probability: float = Field(description="Calibrated probability (temperature fitted on the validation split).")


class FilePredictionOut(BaseModel):
    file: str
    category: str | None = Field(description="The most likely category; null when the file was refused.")
    confidence: float | None
    top_k: list[TopKOut]
    model_version: int | None
    error: str | None = Field(description="Why this file was refused (not an image we accept, too large...).")


class PredictOut(BaseModel):
    model_version: int | None = Field(description="The model version that predicted (null: every file refused).")
    results: list[FilePredictionOut] = Field(description="One per uploaded file, in upload order.")


class ImportedOut(BaseModel):
    name: str
    image_id: int
    category: str | None


class DuplicateOut(BaseModel):
    name: str
    image_id: int = Field(description="The catalogue image with the same bytes.")
    existing_name: str


class RefusedOut(BaseModel):
    name: str
    reason: str


class ImportOut(BaseModel):
    """The report `python -m core.cli import --json` prints."""

    summary: str
    imported: list[ImportedOut]
    duplicates: list[DuplicateOut]
    refused: list[RefusedOut]
    notes: list[str]


class CategoryOut(BaseModel):
    id: int
    name: str
    labelled: int = Field(description="Images labelled with this category now.")
    archived: bool
    merged_into: str | None


class CategoriesOut(BaseModel):
    categories: list[CategoryOut]


class ModelOut(BaseModel):
    id: int
    arch: str
    status: str = Field(description="candidate, active or retired.")
    image_size: int
    mode: str
    classes: list[str]
    test_accuracy: float | None = Field(description="Accuracy on its labelled test split, measured at training.")
    test_images: int = Field(description="How many test images test_accuracy was measured on.")
    macro_f1: float | None
    created_at: str
    activated_at: str | None


class ModelsOut(BaseModel):
    active: int | None
    models: list[ModelOut] = Field(description="Newest first.")


# --- errors --------------------------------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _status_of(exc: ProdcatError) -> int:
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, CheckpointError | LabelConflict | TrainingRefused):
        return 409
    if isinstance(exc, DatabaseBusy):
        return 503  # try again: another program held the database's write lock too long
    return 400


async def _prodcat_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProdcatError)
    return error_response(_status_of(exc), str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path} (see {_root(request)}/openapi.json)"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path} (see {_root(request)}/openapi.json)"
    return error_response(exc.status_code, message, dict(exc.headers or {}))


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "header"))
        given = error.get("input")
        got = f" (got {_shown(given)})" if isinstance(given, str | int | float | bool) else ""
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}{got}")
    return error_response(422, "; ".join(problems) or "the request does not match the API's schema")


async def _unexpected_error(_request: Request, exc: Exception) -> Response:
    storage = as_storage_error(exc)  # the database or disk failed (locked, read-only, full): say so, no SQL
    if storage is not None:
        log.error("API request failed: %s", exc, exc_info=exc)
        return error_response(503, str(storage))
    # A bug, not a refusal: logged with its traceback by the server; the client gets no traceback.
    return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


# --- who is calling ------------------------------------------------------------------------------------------------


def _route_path(scope: Scope) -> str:
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "")).rstrip("/")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _same_origin(headers: Headers) -> bool:
    """False for a browser request sent from another site's page (its Origin names another host)."""
    origin = headers.get("origin")
    if not origin:
        return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def authenticate(headers: Headers, method: str) -> tuple[Principal | None, int, str]:
    """(principal, 0, "") for a good bearer token (or no token when sign-in is off), else (None, status, why)."""
    settings = get_settings()
    given = headers.get("authorization")
    if given is None:
        if settings.auth != "none":
            return None, 401, f"no bearer token: send the header `Authorization: Bearer <token>` ({NEW_TOKEN_HINT})"
        if method in STATE_CHANGING and not _same_origin(headers):
            # Sign-in is off, so a tokenless request acts as an admin: never one a page on another site made.
            return None, 403, "cross-site request refused: with PRODCAT_AUTH=none only same-site pages or scripts may"
        return Principal(settings.default_actor, Role.ADMIN), 0, ""
    scheme, _, secret = given.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None, 401, f"the Authorization header must be `Bearer <token>`, not {_shown(scheme)}"
    principal = token_principal(database(), secret.strip())
    if principal is None:
        return None, 401, f"the bearer token is unknown or revoked: ask an admin for a new one ({NEW_TOKEN_HINT})"
    return principal, 0, ""


class Guard:
    """ASGI middleware in front of every endpoint: refuses a request whose body is over the cap (413) and, except on
    the public paths, one without a usable token (401), before a byte of its body is read. The caller is left in
    `request.state.principal`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        cap = self.max_body_bytes
        too_large = f"the request is larger than the limit of {cap:,} bytes: send fewer or smaller files per request"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            await error_response(413, too_large)(scope, receive, send)
            return
        principal: Principal | None = None
        if _route_path(scope) not in PUBLIC_PATHS:
            principal, status, why = await run_in_threadpool(authenticate, headers, scope["method"])
            if principal is None:
                challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                await error_response(status, why, challenge)(scope, receive, send)
                return
        scope.setdefault("state", {})["principal"] = principal
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:  # a body without (or with a false) Content-Length: stop reading it here
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)


def caller(request: Request, _token: Annotated[Any, Security(_bearer)] = None) -> Principal:
    """The principal the Guard authenticated (viewer and up may read)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # only public paths pass the Guard without one
        raise HTTPException(401, f"no bearer token ({NEW_TOKEN_HINT})", headers={"WWW-Authenticate": "Bearer"})
    return principal


Caller = Annotated[Principal, Depends(caller)]


def only_fields(*allowed: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing query parameters and form fields the endpoint does not take (422), so a misspelt
    `topk` or `categry` is an error instead of being silently ignored."""

    async def check(request: Request) -> None:
        given = list(request.query_params.keys())
        if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form")):
            given += list((await request.form()).keys())  # already parsed for the endpoint: Starlette keeps it
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            known = ", ".join(allowed) or "none"
            raise RequestValidationError(
                [{"loc": (name,), "msg": f"unknown field (this endpoint takes: {known})", "type": "extra_forbidden"}
                 for name in unknown]
            )  # fmt: skip

    return check


# --- reading uploads -----------------------------------------------------------------------------------------------


def _name(upload: UploadFile, position: int) -> str:
    return (upload.filename or "").strip() or f"file {position + 1}"


def read_upload(upload: UploadFile, name: str, max_bytes: int) -> bytes:
    """An uploaded file's bytes, read from its spooled temporary file a chunk at a time; ImageRefused (naming the
    file) when it is larger than `max_bytes`, before reading past the limit."""
    if upload.size is not None and upload.size > max_bytes:
        raise ImageRefused(name, f"file is {upload.size:,} bytes, larger than the limit of {max_bytes:,} bytes")
    upload.file.seek(0)
    chunks, size = [], 0
    while chunk := upload.file.read(READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise ImageRefused(name, f"file is larger than the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _LazyUpload:
    """An upload predict_uploads reads when it gets to it (so one file's bytes are in memory at a time)."""

    def __init__(self, upload: UploadFile, name: str, max_bytes: int) -> None:
        self.upload, self.name, self.max_bytes = upload, name, max_bytes

    def read(self) -> bytes:
        return read_upload(self.upload, self.name, self.max_bytes)


def _check_count(files: list[UploadFile]) -> None:
    if len(files) > MAX_FILES:
        raise HTTPException(413, f"{len(files)} files in one request: at most {MAX_FILES}; send the rest in another")


def _check_category(db: Database, category: str) -> str:
    """The cleaned category name, or a CategoryError before any file is read (too long, archived)."""
    try:
        return usable_category_name(db, category)
    except CategoryError as exc:
        raise CategoryError(f"nothing was imported: {exc}") from None


def _import_batches(uploads: list[UploadFile], max_bytes: int) -> Iterator[list[Upload] | RefusedItem]:
    """The uploads as batches of at most IMPORT_BATCH_BYTES (import_uploads holds a call's files in memory), and a
    RefusedItem for each file over the size cap (its bytes are never kept)."""
    batch: list[Upload] = []
    held = 0
    for position, upload in enumerate(uploads):
        name = _name(upload, position)
        try:
            data = read_upload(upload, name, max_bytes)
        except ImageRefused as exc:
            yield RefusedItem(name, exc.reason)
            continue
        if batch and held + len(data) > IMPORT_BATCH_BYTES:
            yield batch
            batch, held = [], 0
        batch.append(Upload(name, data))
        held += len(data)
    if batch:
        yield batch


# --- the app -------------------------------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text_}
    for code, text_ in (
        (401, "No token, or an unknown or revoked one."),
        (403, "The token's role may not do this."),
        (413, "Too many or too large files."),
        (422, "A field is missing, unknown or of the wrong type."),
    )
}
SIGNED_IN: dict[int | str, dict[str, Any]] = {401: ERRORS[401], 413: ERRORS[413], 422: ERRORS[422]}


router = APIRouter()


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
def health() -> Any:
    """Whether the service and its database answer, and the active model version (no token needed)."""
    try:
        db = database()
        with db.read() as session:
            session.execute(text("SELECT 1"))
        version = active_version(db)
    except (SQLAlchemyError, OSError) as exc:
        body = HealthOut(ok=False, database=False, model_version=None, error=f"database unreachable: {exc}")
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthOut(ok=True, database=True, model_version=version.id if version else None)


@router.post(
    "/predict",
    response_model=PredictOut,
    responses={**SIGNED_IN, 409: {"model": ErrorOut, "description": "No active model yet, or it is unusable."}},
    dependencies=[Depends(only_fields("files", "top_k"))],
)
def predict(
    principal: Caller,
    files: Annotated[list[UploadFile], File(description=f"Image files (at most {MAX_FILES}).")],
    top_k: Annotated[int, Form(ge=1, le=MAX_TOP_K, description="How many likely categories per file.")] = 3,
) -> Any:
    """Classify image files with the active model without importing them: per file its top-k categories with
    calibrated probabilities, or why it was refused. Any role. Equal to `python -m core.cli predict`."""
    _check_count(files)
    db = database()
    max_bytes = db.settings.max_file_bytes
    try:
        results = predict_uploads(
            db, [_LazyUpload(f, _name(f, n), max_bytes) for n, f in enumerate(files)], top_k=top_k
        )
    except NotFound as exc:  # no active model: a state to fix, not a missing resource of the request
        raise HTTPException(409, str(exc)) from exc
    rows = [
        FilePredictionOut(
            file=r.name,
            category=r.category,
            confidence=r.confidence,
            top_k=[TopKOut(category=t.category, probability=t.probability) for t in r.top_k],
            model_version=r.model_version_id,
            error=r.error,
        )
        for r in results
    ]
    version = next((r.model_version for r in rows if r.model_version is not None), None)
    return PredictOut(model_version=version, results=rows)


@router.post(
    "/images",
    response_model=ImportOut,
    responses={**SIGNED_IN, 403: ERRORS[403], 400: {"model": ErrorOut, "description": "The category is refused."}},
    dependencies=[Depends(only_fields("files", "category", "labels_from_folders"))],
)
def import_images(
    principal: Caller,
    files: Annotated[list[UploadFile], File(description=f"Images and .zip archives (at most {MAX_FILES}).")],
    category: Annotated[str | None, Form(description="Label every imported image with this category.")] = None,
    labels_from_folders: Annotated[
        bool, Form(description="A zipped ImageFolder tree: each image's first folder is its category.")
    ] = False,
) -> Any:
    """Import images and zip archives into the catalogue, optionally labelled; returns the report `python -m
    core.cli import --json` prints. Duplicates are stored once; refused files are listed with the reason and
    the others still go in. Labeller and up."""
    db = database()
    authorize(db, principal.actor, Action.UPLOAD)  # 403 before any file is read
    _check_count(files)
    category = category.strip() if category and category.strip() else None
    if category is not None and labels_from_folders:
        raise HTTPException(422, "choose one way to label: category and labels_from_folders were both given")
    if category is not None:
        category = _check_category(db, category)
    result = ImportResult()
    oversized: list[RefusedItem] = []
    for batch in _import_batches(files, db.settings.max_file_bytes):
        if isinstance(batch, RefusedItem):
            oversized.append(batch)
            continue
        part = import_uploads(
            db,
            batch,
            category=category,
            labels_from_folders=labels_from_folders,
            actor=principal.actor,
            source="api",
        )
        result.imported += part.imported
        result.duplicates += part.duplicates
        result.refused += part.refused
        result.notes += [n for n in part.notes if n not in result.notes]
    result.refused[:0] = oversized  # as the CLI lists files it could not read before the others
    return {"summary": result.summary(), **_plain(result)}


@router.get("/categories", response_model=CategoriesOut, responses=SIGNED_IN, dependencies=[Depends(only_fields())])
def categories(principal: Caller) -> Any:
    """Every category (archived and merged ones too) with how many images are labelled with it. Any role."""
    rows = list_categories(database(), include_archived=True)
    return CategoriesOut(
        categories=[
            CategoryOut(id=r.id, name=r.name, labelled=r.labelled, archived=r.archived, merged_into=r.merged_into)
            for r in rows
        ]
    )


@router.get("/models", response_model=ModelsOut, responses=SIGNED_IN, dependencies=[Depends(only_fields())])
def models(principal: Caller) -> Any:
    """Every model version, newest first, with its test accuracy; `active` is the one serving predictions."""
    versions = list_versions(database())
    return ModelsOut(
        active=next((v.id for v in versions if v.status == VersionStatus.ACTIVE), None),
        models=[
            ModelOut(
                id=v.id,
                arch=v.arch,
                status=v.status,
                image_size=v.image_size,
                mode=v.mode,
                classes=v.class_names,
                test_accuracy=v.test_accuracy,
                test_images=v.test_images,
                macro_f1=v.macro_f1,
                created_at=v.created_at.isoformat(),
                activated_at=v.activated_at.isoformat() if v.activated_at else None,
            )
            for v in versions
        ],
    )


def create_app() -> FastAPI:
    """The API app; server.py mounts it at /api/v1 (its OpenAPI document is then at /api/v1/openapi.json)."""
    settings = get_settings()
    api = FastAPI(
        title="prodcat API",
        version="1",
        summary="Classify product photos, import them into the catalogue, read categories and model versions.",
        openapi_url="/openapi.json",
        docs_url=None,  # Swagger UI would load its scripts from a CDN: the document itself is enough
        redoc_url=None,
        exception_handlers={
            ProdcatError: _prodcat_error,
            HTTPException: _http_error,
            RequestValidationError: _validation_error,
            Exception: _unexpected_error,
        },
    )
    api.add_middleware(Guard, max_body_bytes=min(MAX_REQUEST_BYTES, MAX_FILES * settings.max_file_bytes + READ_CHUNK))
    api.include_router(router)
    return api


def _plain(result: ImportResult) -> dict[str, Any]:
    return {key: [asdict(item) if not isinstance(item, str) else item for item in items]
            for key, items in vars(result).items()}  # fmt: skip


app = create_app()
