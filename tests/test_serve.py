"""beamvision serve: a real server on 127.0.0.1, a real HTTP client, a model trained on real photos.

One server (started with a token, a small body limit and pixel limit, and the
photos as the URIs it may read) answers most tests; the SIGTERM test starts
its own. Label Studio's requests are built as its ML-backend API sends them
(label_studio/ml/api_connector.py: setup, predict; webhooks' event payloads).
"""

from __future__ import annotations

import asyncio
import base64
import glob
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from beamvision.models.artifact import load_manifest
from beamvision.pipelines.cli import main
from beamvision.serving.batcher import Batcher, batch_shapes
from beamvision.serving.label_studio import choices_control, merge_event, prediction
from beamvision.serving.service import RequestError, answer
from beamvision.transforms.engines import Prediction

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY_MB = 1
MAX_PIXELS = 1_000_000
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="label" toName="image" choice="single">'
    '<Choice value="astronaut"/><Choice value="cat"/><Choice value="china"/><Choice value="coffee"/>'
    '<Choice value="flower"/><Choice value="hubble"/><Choice value="rocket"/></Choices></View>'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``beamvision serve`` in its own process, as a user starts it; its output kept line by line."""

    def __init__(self, *flags: str, cwd: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "beamvision", "serve", "--port", str(self.port), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not any(line.startswith("serving ") for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.2)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def logged(self, wanted, timeout: float = 10) -> bool:
        """Whether a line for which ``wanted(line)`` is true comes within ``timeout`` seconds.

        The server writes a request's log line as it answers it: the line may reach the reader
        thread after the response reached the test.
        """
        deadline = time.monotonic() + timeout
        while not any(wanted(line) for line in self.lines):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        time.sleep(0.2)  # the reader thread takes the last lines
        return code


@pytest.fixture(scope="module")
def server(trained_photos, tmp_path_factory):
    _, photos, _, model = trained_photos
    labels_file = tmp_path_factory.mktemp("serve") / "labels.json"
    running = Server(
        "--model",
        model,
        "--token",
        TOKEN,
        "--max_body_mb",
        str(MAX_BODY_MB),
        "--max_pixels",
        str(MAX_PIXELS),
        "--allow_uris",
        photos,
        "--labels_file",
        str(labels_file),
    )
    running.labels_file = labels_file
    yield running
    running.stop()


def _post(server, body: bytes, content_type="image/jpeg", headers=AUTH, path="/v1/classify"):
    return httpx.post(server.url + path, content=body, headers={"Content-Type": content_type, **headers})


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _json(path: str):
    with open(path) as f:
        return json.load(f)


def _photo_files(photos: str) -> list[str]:
    return sorted(glob.glob(os.path.join(photos, "*", "*.jpg")))


@pytest.mark.slow
def test_labels_and_scores_equal_classify_for_the_same_files(server, trained_photos, tmp_path):
    _, photos, _, model = trained_photos
    output = str(tmp_path / "out")
    assert main(["classify", "--input", photos, "--model", model, "--output", output, "--quiet"]) == 0
    rows = pd.concat(pd.read_parquet(p) for p in glob.glob(f"{output}/results-*.parquet"))
    by_name = {
        os.path.relpath(uri, photos): row for uri, row in zip(rows.image_uri, rows.itertuples(), strict=True)
    }
    files = _photo_files(photos)[::7]  # 40 files, every class
    for path in files:
        with open(path, "rb") as f:
            response = _post(server, f.read())
        assert response.status_code == 200, response.text
        got, row = response.json(), by_name[os.path.relpath(path, photos)]
        assert got["label"] == row.label
        assert got["score"] == pytest.approx(row.score, abs=1e-4)
        assert [item["label"] for item in got["top_k"]] == list(row.top_k_labels)
        manifest = load_manifest(model)
        assert (got["model_name"], got["model_version"]) == (manifest.name, manifest.version)
    # The model learnt the photos: the answers are mostly each file's class (its folder).
    right = sum(_post(server, _bytes(p)).json()["label"] == p.split(os.sep)[-2] for p in files)
    assert right >= 0.8 * len(files)


def test_a_json_body_names_files_the_server_may_read(server, trained_photos):
    _, photos, _, _ = trained_photos
    first = _photo_files(photos)[0]
    relative_escape = os.path.join(photos, "..", "..", "etc", "passwd")
    response = _post(
        server,
        json.dumps(
            {"uris": [first, os.path.join(photos, "missing.jpg"), "/etc/passwd", relative_escape]}
        ).encode(),
        "application/json",
    )
    assert response.status_code == 200
    found, missing, outside, escaped = response.json()
    assert found["uri"] == first and found["label"] == _post(server, _bytes(first)).json()["label"]
    assert missing["error_type"] == "FileNotFound"
    assert outside["error_type"] == "NotAllowed" and escaped["error_type"] == "NotAllowed"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body, content_type, status, error_type",
    [
        (b"", "image/jpeg", 400, "EmptyFile"),
        (b"this is not an image", "image/jpeg", 415, "NotAnImage"),
        (_png(64, 64)[:80], "image/png", 422, "CorruptImage"),
        (_png(1200, 1000), "image/png", 422, "DecompressionBomb"),  # 1.2 MP over --max_pixels 1 MP
        (b"%PDF-1.4", "text/plain", 415, "UnsupportedMediaType"),
        (b"{not json", "application/json", 400, "BadRequest"),
        (b'{"uris": "a.jpg"}', "application/json", 400, "BadRequest"),
    ],
    ids=["empty", "not-an-image", "truncated", "bomb", "wrong-type", "bad-json", "uris-not-a-list"],
)
def test_bad_bodies_are_json_errors_with_classify_error_types(server, body, content_type, status, error_type):
    response = _post(server, body, content_type)
    assert response.status_code == status
    assert response.json()["error_type"] == error_type and response.json()["message"]


def test_a_body_over_the_limit_is_refused_whether_declared_or_streamed(server):
    big = os.urandom(MAX_BODY_MB * 1024 * 1024 + 1)
    declared = _post(server, big)
    assert declared.status_code == 413 and declared.json()["error_type"] == "BodyTooLarge"

    def chunks():  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = httpx.post(
        server.url + "/v1/classify", content=chunks(), headers={**AUTH, "Content-Type": "image/jpeg"}
    )
    assert streamed.status_code == 413


def test_without_the_right_token_requests_are_refused_but_health_answers(server, trained_photos):
    _, photos, _, _ = trained_photos
    image = _bytes(_photo_files(photos)[0])
    assert _post(server, image, headers={}).status_code == 401
    assert _post(server, image, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(server, image, headers={"Authorization": f"Token {TOKEN}"}).status_code == 200
    basic = base64.b64encode(f"label-studio:{TOKEN}".encode()).decode()
    assert _post(server, image, headers={"Authorization": f"Basic {basic}"}).status_code == 200
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert _post(server, b"{}", "application/json", headers={}, path="/predict").status_code == 401


def test_64_concurrent_requests_are_all_answered_as_one_at_a_time(server, trained_photos):
    _, photos, _, _ = trained_photos
    files = _photo_files(photos)[:64]
    bodies = [_bytes(path) for path in files]
    alone = [_post(server, body).json() for body in bodies]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/classify", content=b, headers={"Content-Type": "image/jpeg"})
                    for b in bodies
                )
            )

    responses = asyncio.run(together())
    assert [r.status_code for r in responses] == [200] * 64
    # Batched with the others (padded to a batch shape), each answer is the one it gets alone.
    for response, single in zip(responses, alone, strict=True):
        assert response.json()["label"] == single["label"]
        assert response.json()["score"] == pytest.approx(single["score"], abs=1e-4)
    # One log line per request: method, path, status, milliseconds.
    assert sum(" POST /v1/classify 200 " in line for line in server.lines) >= 128


def test_odd_requests_get_json_errors_never_a_traceback(server, trained_photos):
    _, photos, _, _ = trained_photos
    not_ascii = _post(server, b"x", headers={"Authorization": "Bearer été".encode()})
    assert not_ascii.status_code == 401
    folder = _post(server, json.dumps({"uris": [os.path.join(photos, "cat")]}).encode(), "application/json")
    assert folder.status_code == 200 and folder.json()[0]["error_type"] == "FileNotFound"
    sibling = photos.rstrip("/") + "-other/a.jpg"  # a prefix of the allowed folder's name is not in it
    outside = _post(server, json.dumps({"uris": [sibling]}).encode(), "application/json")
    assert outside.json()[0]["error_type"] == "NotAllowed"
    missing = httpx.get(server.url + "/v2/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"
    wrong_method = httpx.get(server.url + "/v1/classify", headers=AUTH)
    assert wrong_method.status_code == 405 and wrong_method.json()["error_type"] == "MethodNotAllowed"
    for path, body in [("/setup", b"[1]"), ("/predict", b'{"tasks": [{"data": 3}], "label_config": 7}')]:
        response = _post(server, body, "application/json", path=path)
        assert response.status_code == 400 and response.json()["error_type"] == "BadRequest"
    assert not any("Traceback" in line for line in server.lines)


# --- Label Studio's ML backend -------------------------------------------------------------------


PERSONAL_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"  # a JWT's shape
ACCESS_TOKEN = "short-lived-access"


class _LabelStudioFiles(http.server.BaseHTTPRequestHandler):
    """Label Studio on loopback: /data/upload/ files only with its legacy token, or a personal access
    token's access token (``Bearer``, from ``POST /api/token/refresh/``, as Label Studio 1.23 issues it)."""

    root = ""
    token = ""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/api/token/refresh/" or body.get("refresh") != PERSONAL_TOKEN:
            self.send_error(401)
            return
        data = json.dumps({"access": ACCESS_TOKEN}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.headers.get("Authorization") not in (f"Token {self.token}", f"Bearer {ACCESS_TOKEN}"):
            self.send_error(401)
            return
        path = os.path.join(self.root, os.path.basename(self.path.split("?")[0]))
        if not os.path.exists(path):
            self.send_error(404)
            return
        data = _bytes(path)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def label_studio_host(trained_photos):
    _, photos, _, _ = trained_photos
    handler = type("Files", (_LabelStudioFiles,), {"root": os.path.join(photos, "cat"), "token": "ls-token"})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _setup(server, label_studio_host: str, token: str) -> httpx.Response:
    """What Label Studio sends when the backend is connected (ml/api_connector.py: setup)."""
    setup = {
        "project": "1.1796400000",
        "schema": CONFIG,
        "hostname": label_studio_host,
        "access_token": token,
        "model_version": None,
    }
    return _post(server, json.dumps(setup).encode(), "application/json", path="/setup")


def _predict(server, tasks: list[dict]) -> httpx.Response:
    """What Label Studio sends for predictions (ml/api_connector.py: make_predictions)."""
    request = {
        "tasks": tasks,
        "model_version": None,
        "project": "1.1796400000",
        "label_config": CONFIG,
        "params": {"login": None, "password": None, "context": None},
    }
    return _post(server, json.dumps(request).encode(), "application/json", path="/predict")


def test_label_studio_setup_and_predict_answer_choices_for_its_tasks(
    server, trained_photos, label_studio_host
):
    _, photos, _, model = trained_photos
    response = _setup(server, label_studio_host, "ls-token")
    manifest = load_manifest(model)
    assert response.status_code == 200
    assert response.json()["model_version"] == f"{manifest.name}-{manifest.version}"
    versions = httpx.get(server.url + "/versions", headers=AUTH).json()
    assert versions == {"versions": [f"{manifest.name}-{manifest.version}"]}
    local = _photo_files(photos)[0]
    uploaded = sorted(os.listdir(os.path.join(photos, "cat")))[0]
    tasks = [
        {"id": 1, "data": {"image": local}, "meta": {}, "project": 1},
        {"id": 2, "data": {"image": f"/data/upload/1/{uploaded}"}, "project": 1},
        {"id": 3, "data": {"image": "/data/upload/1/gone.jpg"}, "project": 1},
    ]
    response = _predict(server, tasks)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3
    for result, path in zip(results[:2], [local, os.path.join(photos, "cat", uploaded)], strict=True):
        direct = _post(server, _bytes(path)).json()
        (choice,) = result["result"]
        assert choice["from_name"] == "label" and choice["to_name"] == "image" and choice["type"] == "choices"
        assert choice["value"] == {"choices": [direct["label"]]}
        assert result["score"] == pytest.approx(direct["score"], abs=1e-5)
        assert result["model_version"] == f"{manifest.name}-{manifest.version}"
    assert results[2]["result"] == []  # its image is gone: no prediction, the others still made

    # A personal access token is exchanged for an access token; a refused token fails the request
    # whole (Label Studio would keep empty predictions and never ask again).
    assert _setup(server, label_studio_host, PERSONAL_TOKEN).status_code == 200
    assert _predict(server, tasks[1:2]).json()["results"][0]["result"]
    assert _setup(server, label_studio_host, "revoked").status_code == 200
    refused = _predict(server, tasks[1:2])
    assert refused.status_code == 502 and refused.json()["error_type"] == "LabelStudioRefused"
    assert _setup(server, label_studio_host, "ls-token").status_code == 200

    # An absolute URL on another host (a task anyone may import) is not fetched with the token.
    elsewhere = label_studio_host.replace("127.0.0.1", "localhost") + f"/data/upload/1/{uploaded}"
    foreign = _predict(server, [{"id": 5, "data": {"image": elsewhere}}]).json()["results"]
    assert foreign[0]["result"] == []
    assert server.logged(lambda line: "NotAllowed" in line and elsewhere in line)


def test_label_studio_annotations_reach_a_labels_file_that_prepare_reads(
    server, trained_photos, label_studio_host, tmp_path
):
    _, photos, _, _ = trained_photos
    assert _setup(server, label_studio_host, "ls-token").status_code == 200
    files = _photo_files(photos)
    uploaded = sorted(os.listdir(os.path.join(photos, "cat")))[1]
    events = [
        _annotation_event("ANNOTATION_CREATED", task_id=1, annotation_id=10, image=files[0], choice="rocket"),
        _annotation_event("ANNOTATION_CREATED", task_id=2, annotation_id=11, image=files[50], choice="cat"),
        _annotation_event(
            "ANNOTATION_UPDATED", task_id=2, annotation_id=11, image=files[50], choice="coffee"
        ),
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 10}], "project": {"id": 1}},
        _annotation_event(
            "ANNOTATION_CREATED", task_id=3, annotation_id=12, image=files[100], choice="china"
        ),
        # An upload: only Label Studio has the file, which the server keeps beside the labels file.
        _annotation_event(
            "ANNOTATION_CREATED",
            task_id=4,
            annotation_id=13,
            image=f"/data/upload/1/{uploaded}",
            choice="cat",
        ),
    ]
    for event in events:
        response = _post(server, json.dumps(event).encode(), "application/json", path="/webhook")
        assert response.status_code == 201, response.text
    exported = json.loads(server.labels_file.read_text())
    assert {task["id"]: len(task["annotations"]) for task in exported} == {1: 0, 2: 1, 3: 1, 4: 1}
    copy = next(task for task in exported if task["id"] == 4)["data"]["source_uri"]
    assert _bytes(copy) == _bytes(os.path.join(photos, "cat", uploaded))
    # A task "number" that is a path writes nothing anywhere.
    crafted = _annotation_event(
        "ANNOTATION_CREATED", task_id=5, annotation_id=14, image=f"/data/upload/1/{uploaded}", choice="cat"
    )
    crafted["task"]["id"] = "../../escaped"
    response = _post(server, json.dumps(crafted).encode(), "application/json", path="/webhook")
    assert response.status_code == 400
    assert not glob.glob(os.path.join(os.path.dirname(str(server.labels_file)), "..", "**", "*escaped*"))
    output = str(tmp_path / "prepared")
    argv = ["prepare", "--input", photos, "--labels", str(server.labels_file), "--output", output]
    assert main([*argv, "--image_size", "64", "--quiet"]) == 0
    stats = _json(os.path.join(output, "stats.json"))
    assert sum(stats["totals"].values()) == 3  # task 1's annotation was deleted: 3 labelled images
    # Every class of the project's config, chosen or not.
    assert _json(os.path.join(output, "labels.json")) == sorted(load_manifest(trained_photos[3]).labels)


def _annotation_event(action: str, task_id: int, annotation_id: int, image: str, choice: str) -> dict:
    """A webhook event as Label Studio sends it (action, annotation, task, project)."""
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}]
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": result,
            "was_cancelled": False,
            "task": task_id,
            "updated_at": f"2026-12-04T10:00:{annotation_id:02d}Z",
        },
        "task": {"id": task_id, "data": {"image": image}, "project": 1},
        "project": {"id": 1, "title": "photos", "label_config": CONFIG},
    }


def test_label_studio_config_and_prediction_shapes():
    assert choices_control(CONFIG) == ("label", "image", "image")
    with pytest.raises(RequestError, match="no <Choices") as refused:
        choices_control('<View><Image name="image" value="$image"/></View>')
    assert refused.value.status == 400
    single = {"label": "cat", "score": 0.9, "top_k": [{"label": "cat", "score": 0.9}]}
    multi = {"label": "cat", "score": 0.9, "labels": ["cat", "coffee"]}
    assert prediction(single, "label", "image", "m-1")["result"][0]["value"] == {"choices": ["cat"]}
    assert prediction(multi, "label", "image", "m-1")["result"][0]["value"] == {"choices": ["cat", "coffee"]}
    assert prediction({**multi, "labels": []}, "label", "image", "m-1")["result"] == []
    # Only the config's choices: the best of them in the top k, or none.
    ranked = {
        "label": "china",
        "score": 0.5,
        "top_k": [{"label": "china", "score": 0.5}, {"label": "cat", "score": 0.3}],
    }
    limited = prediction(ranked, "label", "image", "m-1", choices=["cat", "rocket"])
    assert limited["result"][0]["value"] == {"choices": ["cat"]} and limited["score"] == 0.3
    assert prediction(ranked, "label", "image", "m-1", choices=["rocket"])["result"] == []
    assert prediction(multi, "label", "image", "m-1", choices=["coffee"])["result"][0]["value"] == {
        "choices": ["coffee"]
    }
    tasks = {}
    assert not merge_event(tasks, {"action": "PROJECT_UPDATED"}) and tasks == {}


def test_a_multi_label_answer_lists_its_label_set(multilabel):
    manifest = load_manifest(str(multilabel / "model"))
    chosen = Prediction(labels=list(manifest.labels[:2]), scores=[0.9, 0.7], chosen=list(manifest.labels[:2]))
    got = answer(chosen, manifest)
    assert got["labels"] == list(manifest.labels[:2]) and got["label"] == manifest.labels[0]
    assert "labels" not in answer(
        Prediction(labels=["a"], scores=[1.0]), load_manifest(str(multilabel / "single"))
    )


# --- batching and shutdown -----------------------------------------------------------------------


def test_the_batcher_fills_batches_under_load_and_answers_everything_queued_when_closed():
    seen = []

    def engine(size):
        def run(images):
            seen.append((size, len(images)))
            time.sleep(0.01)
            return [Prediction(labels=[str(int(image[0, 0, 0]))], scores=[1.0]) for image in images]

        return run

    shapes = batch_shapes(16)
    assert shapes == [1, 2, 4, 8, 16] and batch_shapes(24) == [1, 2, 4, 8, 16, 24]
    batcher = Batcher({size: engine(size) for size in shapes}, max_wait_ms=50)
    images = [np.full((2, 2, 3), i, np.uint8) for i in range(40)]
    futures = [batcher.submit(image) for image in images]
    batcher.close(timeout=10)
    assert [future.result(0).labels[0] for future in futures] == [str(i) for i in range(40)]
    assert max(count for _, count in seen) == 16 and len(seen) < 40
    assert all(size >= count and (size == 1 or size // 2 < count) for size, count in seen)
    with pytest.raises(RuntimeError):
        batcher.submit(images[0])


def test_a_request_cancelled_while_queued_does_not_stop_the_batcher():
    release = threading.Event()

    def engine(images):
        release.wait(5)
        return [Prediction(labels=["x"], scores=[1.0]) for _ in images]

    batcher = Batcher({1: engine}, max_wait_ms=1)  # one image a batch: the second waits its turn
    first = batcher.submit(np.zeros((2, 2, 3), np.uint8))
    time.sleep(0.1)  # the first is computing, held by the engine
    queued = batcher.submit(np.zeros((2, 2, 3), np.uint8))
    assert queued.cancel()
    release.set()
    assert first.result(5).labels == ["x"]
    assert batcher.submit(np.zeros((2, 2, 3), np.uint8)).result(5).labels == ["x"]
    batcher.close(5)


def test_served_connections_send_each_response_at_once():
    """TCP_NODELAY on accepted connections: without it each response waits ~40 ms for a delayed ACK."""
    from beamvision.pipelines.serve import _bind

    listening = _bind("127.0.0.1", 0)

    async def accepted_nodelay():
        seen = asyncio.get_running_loop().create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Protocol, sock=listening)
        _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
        value = await asyncio.wait_for(seen, 5)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) == 1


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_then_exits_0_with_a_summary(trained_photos):
    _, photos, _, model = trained_photos
    running = Server("--model", model, "--max_wait_ms", "50")
    bodies = [_bytes(path) for path in _photo_files(photos)[:48]]

    async def in_flight():
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            sent = [
                asyncio.ensure_future(
                    client.post("/v1/classify", content=b, headers={"Content-Type": "image/jpeg"})
                )
                for b in bodies
            ]
            await asyncio.sleep(0.3)  # the requests are on their way or queued
            running.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent, return_exceptions=True)

    responses = asyncio.run(in_flight())
    code = running.proc.wait(60)
    time.sleep(0.2)
    answered = [r for r in responses if isinstance(r, httpx.Response)]
    assert code == 0, "\n".join(running.lines)
    # Every request sent before the signal is answered, none fails half-way: at most a connection
    # opened after the server stopped listening is refused.
    failed = [r for r in responses if not isinstance(r, httpx.Response | httpx.ConnectError)]
    assert not failed, failed
    assert answered and all(r.status_code == 200 for r in answered)
    summary = running.lines[-1]
    assert summary.startswith("stopped by SIGTERM") and "every request in flight answered" in summary
    assert re.search(rf"\({len(answered)} images? classified in", summary), summary


def test_a_port_in_use_and_bad_flags_are_one_line_errors(trained_photos, capsys):
    _, _, _, model = trained_photos
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", model, "--port", str(port)]) == 2
    assert main(["serve", "--model", model, "--port", "70000"]) == 2
    assert main(["serve", "--model", model, "--batch_size", "0"]) == 2
    assert main(["serve", "--model", "no/such/model"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("beamvision serve") for line in lines)
    assert f"--port {port}: cannot listen there" in lines[0] and "--port 70000" in lines[1]
