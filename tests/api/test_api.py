"""The HTTP API over real HTTP: one `streamlit run server.py` per module (sign-in on), tokens of every role made with
core.auth against its data directory, a model trained the quick way; httpx as the client system."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from core import auth
from core.db import Database, close_all, open_database
from core.ml.training import run_training
from core.ml.versions import active_version
from core.schema import Image
from core.settings import Settings
from tests.core.training_helpers import add_job, dataset, store_images
from tests.imagegen import image_bytes
from tests.servers import ROOT, streamlit_server

pytestmark = pytest.mark.slow

ROLES = [role.value for role in auth.Role]
MAX_FILE_BYTES = 300_000  # the server's per-file cap here, small so a too-large file and request are cheap to send
NOT_AN_IMAGE = b"just some text, not a photo\n" * 4


def _png(category: str, index: int) -> bytes:
    return image_bytes(category, 1000 + index, size=40)


# Fresh pictures (not the training ones) classified by the API and by `core.cli predict`.
COMPARED = {f"{category.lower()}_{n}.png": _png(category, n) for category in ("Shoes", "Bags", "Hats") for n in (3, 4)}


@dataclass
class Api:
    base: str
    data_dir: Path
    db: Database
    tokens: dict[str, str]  # role -> secret
    version_id: int
    cli_predict: subprocess.Popen[str]  # `core.cli predict` over COMPARED, started while the server starts
    compared: dict[str, Path]
    http: httpx.Client  # generous timeout: the first prediction loads torch and the model in the server

    def url(self, path: str) -> str:
        return f"{self.base}/api/v1{path}"

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """`streamlit run server.py` on a free port with its own data directory and PRODCAT_AUTH=builtin; while it
    starts, this process adds an admin, a token per role and a quick-trained resnet18 (32 px) as the active model."""
    root = tmp_path_factory.mktemp("api")
    data_dir = root / "data"
    env = {
        **os.environ,
        "PRODCAT_DATA_DIR": str(data_dir),
        "PRODCAT_AUTH": "builtin",
        "PRODCAT_PRETRAINED": "none",  # never the network
        "PRODCAT_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
    }
    env.pop("PRODCAT_DATABASE_URL", None)
    settings = Settings(data_dir=data_dir, database_url=None, auth="builtin", pretrained="none", label_check_folds=0)
    db = open_database(settings)  # migrated here first, so the server finds the schema in place
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(streamlit_server(env, root / "server.log", wait=False))
        auth.add_account(db, "root", auth.Role.ADMIN, None, actor="")  # the first admin needs no one's permission
        tokens = {role: auth.create_token(db, f"{role}-system", role, actor="root")[1] for role in ROLES}
        store_images(db, dataset(["Shoes", "Bags", "Hats"], train=4, val=2, test=2))
        run_training(db, add_job(db), on_progress=lambda _: None, should_stop=lambda: False)
        version = active_version(db)
        assert version is not None
        compared = {}
        for name, data in COMPARED.items():
            compared[name] = root / name
            compared[name].write_bytes(data)
        cli_predict = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "predict", "--json", "--top-k", "2", *map(str, compared.values())],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        stack.callback(_stop, cli_predict)
        stack.callback(close_all)
        server.wait_until_healthy()
        http = stack.enter_context(httpx.Client(timeout=120))
        yield Api(server.base, data_dir, db, tokens, version.id, cli_predict, compared, http)


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=10)
    if process.poll() is None:
        process.kill()


def _files(named: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in named.items()]


def _image_count(db: Database) -> int:
    with db.read() as session:
        return session.query(Image).count()


# --- one address for people and systems -------------------------------------------------------------------------


def test_pages_streamlit_and_the_api_share_one_port_and_health_needs_no_token(api: Api) -> None:
    health = api.http.get(api.url("/health"))
    assert health.status_code == 200
    assert health.json() == {"ok": True, "database": True, "model_version": api.version_id, "error": None}
    assert api.http.get(f"{api.base}/_stcore/health").text.strip() == "ok"
    page = api.http.get(f"{api.base}/")
    assert page.status_code == 200 and "<noscript>" in page.text  # the Streamlit front end
    # The document describes the API where it is mounted, so a client generated from it calls /api/v1/...
    document = api.http.get(api.url("/openapi.json")).json()
    assert document["servers"] == [{"url": "/api/v1"}]
    assert set(document["paths"]) == {"/health", "/predict", "/images", "/categories", "/models"}
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # Streamlit's XSRF protection is still on: an upload to its own endpoint without the XSRF token is refused.
    upload = api.http.put(f"{api.base}/_stcore/upload_file/session/file", files={"file": ("a.png", b"x")})
    assert upload.status_code == 403


# --- tokens and roles -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_each_role_reads_and_predicts_and_only_labeller_and_up_import(api: Api, role: str) -> None:
    headers = api.auth(role)
    categories = api.http.get(api.url("/categories"), headers=headers)
    assert categories.status_code == 200
    assert {c["name"] for c in categories.json()["categories"]} >= {"Shoes", "Bags", "Hats"}
    models = api.http.get(api.url("/models"), headers=headers).json()
    assert models["active"] == api.version_id
    assert models["models"][0]["id"] == api.version_id and models["models"][0]["arch"] == "resnet18"
    predicted = api.http.post(api.url("/predict"), headers=headers, files=_files({"a.png": _png("Shoes", 1)}))
    assert predicted.status_code == 200 and predicted.json()["results"][0]["model_version"] == api.version_id

    before = _image_count(api.db)
    name = f"{role}.png"
    imported = api.http.post(
        api.url("/images"),
        headers=headers,
        files=_files({name: _png("Bags", ROLES.index(role))}),
        data={"category": "Bags"},
    )
    if role == "viewer":
        assert imported.status_code == 403
        assert "viewer" in imported.json()["error"] and "labeller" in imported.json()["error"]
        assert _image_count(api.db) == before
    else:
        assert imported.status_code == 200, imported.text
        report = imported.json()
        assert report["summary"] == "1 imported, 0 duplicates, 0 refused"
        [item] = report["imported"]
        assert (item["name"], item["category"]) == (name, "Bags")
        assert _image_count(api.db) == before + 1
        # The audit actor is the token, never free text.
        with api.db.read() as session:
            image = session.get(Image, item["image_id"])
            assert image is not None and image.uploaded_by == f"token:{role}-system"


def test_missing_wrong_and_revoked_tokens_are_refused_with_401_naming_the_problem(api: Api) -> None:
    _, secret = auth.create_token(api.db, "soon-revoked", auth.Role.ADMIN, actor="root")
    assert api.http.get(api.url("/models"), headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    auth.revoke_token(api.db, "soon-revoked", actor="root")
    cases = {
        "no bearer token": {},
        "unknown or revoked": {"Authorization": "Bearer pct_not-a-real-token"},
        "must be `Bearer <token>`": {"Authorization": f"Basic {secret}"},
    }
    for endpoint, method in (("/categories", "GET"), ("/models", "GET"), ("/predict", "POST"), ("/images", "POST")):
        files = _files({"a.png": _png("Shoes", 2)}) if method == "POST" else None
        for problem, headers in [*cases.items(), ("unknown or revoked", {"Authorization": f"Bearer {secret}"})]:
            response = api.http.request(method, api.url(endpoint), headers=headers, files=files)
            assert response.status_code == 401, (endpoint, problem, response.text)
            assert problem in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"


# --- predict ----------------------------------------------------------------------------------------------------------


def test_predictions_equal_the_cli_predict_for_the_same_files(api: Api) -> None:
    files, headers = _files(COMPARED), api.auth("viewer")
    response = api.http.post(api.url("/predict"), headers=headers, files=files, data={"top_k": "2"})
    assert response.status_code == 200
    body = response.json()
    out, err = api.cli_predict.communicate(timeout=120)
    assert api.cli_predict.returncode == 0, err
    expected = json.loads(out)
    assert [r["file"] for r in expected] == [str(p) for p in api.compared.values()]
    assert body["model_version"] == api.version_id
    assert [r["file"] for r in body["results"]] == list(COMPARED)
    for got, want in zip(body["results"], expected, strict=True):
        assert got["error"] is None and want["error"] is None
        assert got["model_version"] == want["model_version"] == api.version_id
        assert got["category"] == want["category"]
        assert [t["category"] for t in got["top_k"]] == [t["category"] for t in want["top_k"]]
        # The CLI prints 4 decimals; the API gives the full calibrated probability.
        assert got["confidence"] == pytest.approx(want["confidence"], abs=6e-5)
        assert [t["probability"] for t in got["top_k"]] == pytest.approx(
            [t["probability"] for t in want["top_k"]], abs=6e-5
        )
    # The model learnt the colours: most of these fresh pictures get their own category.
    assert sum(r["category"].lower() == r["file"].split("_")[0] for r in body["results"]) >= 4


def test_a_bad_file_gets_its_own_error_and_the_good_ones_still_go_through(api: Api) -> None:
    named = {
        "good-1.png": _png("Shoes", 5),
        "notes.png": NOT_AN_IMAGE,
        "huge.png": b"\x89PNG" + b"\0" * (MAX_FILE_BYTES + 1),
        "good-2.png": _png("Hats", 5),
    }
    predicted = api.http.post(api.url("/predict"), headers=api.auth("viewer"), files=_files(named))
    assert predicted.status_code == 200
    results = {r["file"]: r for r in predicted.json()["results"]}
    assert list(results) == list(named)
    assert results["good-1.png"]["category"] and results["good-2.png"]["category"]
    assert results["notes.png"]["category"] is None and "not an image" in results["notes.png"]["error"]
    assert f"larger than the limit of {MAX_FILE_BYTES:,} bytes" in results["huge.png"]["error"]

    before = _image_count(api.db)
    imported = api.http.post(api.url("/images"), headers=api.auth("labeller"), files=_files(named))
    assert imported.status_code == 200
    report = imported.json()
    assert report["summary"] == "2 imported, 0 duplicates, 2 refused"
    assert [i["name"] for i in report["imported"]] == ["good-1.png", "good-2.png"]
    refused = {r["name"]: r["reason"] for r in report["refused"]}
    assert "not an image" in refused["notes.png"] and "larger than the limit" in refused["huge.png"]
    assert _image_count(api.db) == before + 2  # nothing of the refused files was stored
    # The same bytes again: reported as duplicates, stored once.
    again = api.http.post(
        api.url("/images"), headers=api.auth("labeller"), files=_files({"copy.png": named["good-1.png"]})
    )
    assert again.json()["duplicates"][0]["existing_name"] == "good-1.png"
    assert _image_count(api.db) == before + 2


def test_limits_unknown_fields_and_bad_values_are_json_4xx_naming_them(api: Api) -> None:
    headers = api.auth("admin")

    def post(path: str, **kwargs: object) -> httpx.Response:
        return api.http.post(api.url(path), headers=headers, **kwargs)  # type: ignore[arg-type]

    one = _files({"a.png": _png("Shoes", 6)})
    cases = [
        (post("/predict", files=one, data={"top_k": "many"}), 422, "top_k"),
        (post("/predict", files=one, data={"top_k": "0"}), 422, "top_k"),
        (post("/predict", files=one, data={"topk": "2"}), 422, "topk: unknown field"),
        (post("/predict", data={"top_k": "2"}), 422, "files"),
        (api.http.get(api.url("/models?page=2"), headers=headers), 422, "page: unknown field"),
        (api.http.get(api.url("/labels"), headers=headers), 404, "no such endpoint: GET /api/v1/labels"),
        (post("/images", files=one, data={"category": "x" * 5000}), 400, "category name is 5000 characters long"),
        (post("/predict", files=[one[0]] * 65), 413, "65 files in one request: at most 64"),
        # More bytes than 64 files at the cap can hold: refused before the body is read, nothing stored.
        (post("/images", files=_files({"big.zip": b"\0" * (70 * MAX_FILE_BYTES)})), 413, "larger than the limit"),
    ]
    for response, status, named in cases:
        assert response.status_code == status, response.text
        assert named in response.json()["error"]


def test_fuzzing_the_openapi_document_finds_no_server_error(api: Api) -> None:
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.core.result import Ok

    schema = schemathesis.openapi.from_url(api.url("/openapi.json"))
    headers = api.auth("admin")
    seen: list[tuple[str, int]] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=5,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def call(case: schemathesis.Case) -> None:
                response = case.call(base_url=api.url(""), headers=headers, timeout=60)
                seen.append((case.operation.label, response.status_code))
                assert response.status_code < 500, f"{case.as_curl_command(headers=headers)} -> {response.text}"
                assert "error" in response.json() if response.status_code >= 400 else True

            try:
                call()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid request
    assert {label for label, _ in seen} == {
        "GET /health", "POST /predict", "POST /images", "GET /categories", "GET /models",
    }  # fmt: skip
    assert any(status == 422 for _, status in seen)  # the invalid requests were made, and refused as such


# --- without sign-in (PRODCAT_AUTH=none, a single-person laptop) ------------------------------------------------------


def test_without_sign_in_a_tokenless_call_acts_as_the_default_actor_but_never_cross_site(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.api import create_app

    monkeypatch.setenv("PRODCAT_DEFAULT_ACTOR", "laptop-owner")
    from core.settings import get_settings

    get_settings.cache_clear()
    client = TestClient(create_app(), base_url="http://localhost:8501")
    assert client.get("/categories").status_code == 200
    files = _files({"mine.png": _png("Shoes", 7)})
    cross_site = client.post("/images", files=files, headers={"Origin": "http://shop.example"})
    assert cross_site.status_code == 403 and "cross-site" in cross_site.json()["error"]
    assert _image_count(db) == 0
    same_site = client.post("/images", files=files, headers={"Origin": "http://localhost:8501"})
    assert same_site.status_code == 200, same_site.text
    with db.read() as session:
        assert session.query(Image).one().uploaded_by == "laptop-owner"
    assert client.post("/images", files=files).json()["summary"] == "0 imported, 1 duplicates, 0 refused"


def test_a_body_without_a_length_is_cut_off_at_the_cap_and_nothing_is_stored(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.api import create_app
    from core.settings import get_settings

    monkeypatch.setenv("PRODCAT_MAX_FILE_BYTES", "1000")  # the request cap: 64 files of 1,000 bytes + 1 MiB
    get_settings.cache_clear()
    client = TestClient(create_app())
    boundary = "prodcat-test"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'.encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server only knows the size as it reads
        yield head
        for _ in range(40):
            yield b"\0" * 65536

    response = client.post(
        "/images", content=chunked(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 413
    assert "larger than the limit of 1,112,576 bytes" in response.json()["error"]
    assert _image_count(db) == 0
