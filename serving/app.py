"""The ASGI application of ``beamvision serve`` (Starlette): routes, the token, body limits, a log line each.

Routes:

- ``GET /health`` (and ``GET /``): ``{"status": "UP", ...}`` (Label Studio
  checks an ML backend here); never needs the token.
- ``POST /v1/classify``: an image's bytes as the body (``Content-Type:
  image/*`` or ``application/octet-stream``) -> one answer (``service.answer``);
  or a JSON body ``{"uris": [...]}`` naming files under ``--allow_uris`` -> a
  list of answers, each with its ``uri`` (a file that fails carries
  ``error_type`` and ``message`` instead).
- Label Studio's ML backend: ``POST /setup``, ``/predict``, ``/webhook``
  (``beamvision.serving.label_studio``).

Errors are JSON ``{"error_type", "message"}`` with the status
``service.ERROR_STATUS`` gives (413 over ``--max_body_mb``; 401 without the
token when one is set: ``Authorization: Bearer T``, ``Token T``, or HTTP Basic
with T as the password, which Label Studio's ML-backend settings send).
``_Guard`` wraps the application: the token, the declared body size, and one
INFO line per request (method, path, status, milliseconds).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import signal
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from beamvision.serving import label_studio
from beamvision.serving.service import RequestError, Service, read_body, read_json

LOG = logging.getLogger("beamvision.serve")
OPEN_PATHS = ("/", "/health")  # answered without the token: health checks carry none
WEBHOOK_PATH = "/webhook"
# Label Studio's ML backend webhook carries none of the backend's authentication settings.
WEBHOOK_WITHOUT_TOKEN = (
    "a webhook came without the token, and its annotations are not kept: Label Studio sends the "
    "webhook it made for this backend without credentials; give it the header (PATCH "
    '/api/webhooks/ID {"headers": {"Authorization": "Token T"}}, or the project\'s Webhooks settings)'
)


def create_app(service: Service):
    """The application for ``service``: Starlette's routes inside the guard."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "UP",
                "model_class": "beamvision",
                "model_name": service.manifest.name,
                "model_version": service.manifest.version,
                "labels": list(service.manifest.labels),
                "multi_label": service.manifest.multi_label,
            }
        )

    async def classify(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, service.config.max_body_bytes)
        if content_type == "application/json":
            return JSONResponse(await service.classify_uris(_uris(body)))
        if content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
            return JSONResponse(await service.classify_bytes(body))
        raise RequestError(
            "UnsupportedMediaType",
            f"Content-Type {content_type}: send an image (image/*) or JSON listing URIs (application/json)",
        )

    routes = [
        Route("/", health, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/classify", classify, methods=["POST"]),
        *label_studio.routes(service),
    ]
    handlers = {RequestError: _error_response, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return _Guard(app, service)


def _uris(body: bytes) -> list[str]:
    parsed = read_json(body)
    uris = parsed.get("uris") if isinstance(parsed, dict) else parsed
    if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
        raise RequestError("BadRequest", 'a JSON body lists URIs: {"uris": ["gs://bucket/a.jpg", ...]}')
    return uris


async def _error_response(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own answers (no such route: 404; wrong method: 405) as JSON errors too."""
    kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequest")
    return JSONResponse({"error_type": kind, "message": str(exc.detail)}, status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """What no route expected: logged with its traceback, answered as a JSON 500."""
    LOG.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
    message = f"{type(exc).__name__}: {exc}"
    return JSONResponse({"error_type": "ServerError", "message": message}, status_code=500)


class _Guard:
    """ASGI middleware: the token, the declared body size, and a log line per request."""

    def __init__(self, app, service: Service):
        self._app = app
        self._service = service
        token = service.config.token
        self._accepted = () if token is None else (f"Bearer {token}", f"Token {token}")
        self._warned_webhook = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        stats = self._service.stats

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        health_check = scope["path"] in OPEN_PATHS  # probes: logged with --verbose, not counted
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                response = JSONResponse(refusal.to_json(), status_code=refusal.status)
                await response(scope, receive, send_status)
            else:
                await self._app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            if not health_check:
                stats.record(status[0], seconds)
            level = logging.DEBUG if health_check else logging.INFO
            LOG.log(level, "%s %s %d %.1f ms", scope["method"], scope["path"], status[0], seconds * 1000)

    def _refusal(self, scope) -> RequestError | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self._accepted and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not any(_same(given, accepted) for accepted in self._accepted) and not (
                given.startswith("Basic ") and self._basic_password_matches(given)
            ):
                if scope["path"] == WEBHOOK_PATH and not self._warned_webhook:
                    self._warned_webhook = True
                    LOG.warning(WEBHOOK_WITHOUT_TOKEN)
                return RequestError("Unauthorized", "a token is needed: Authorization: Bearer TOKEN")
        declared = headers.get("content-length")
        limit = self._service.config.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            return RequestError(
                "BodyTooLarge",
                f"the body of {int(declared):,} bytes is over the limit of {limit:,} (--max_body_mb)",
            )
        return None

    def _basic_password_matches(self, given: str) -> bool:
        """HTTP Basic with the token as the password, any user name (Label Studio's auth settings)."""
        try:
            _, _, password = base64.b64decode(given[len("Basic ") :]).decode().partition(":")
        except ValueError:  # (UnicodeDecodeError too)
            return False
        return _same(password, self._service.config.token or "")


def _same(given: str, expected: str) -> bool:
    """A constant-time comparison of a header's text with a secret (any characters, as bytes)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def serve(app, listening: socket.socket, graceful_seconds: float) -> str | None:
    """Runs ``app`` on uvicorn on the bound socket until SIGINT or SIGTERM; returns the signal's name."""
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,  # beamvision's console shows what is logged
            access_log=False,  # (the guard logs each request: method, path, status, milliseconds)
            lifespan="off",
            timeout_graceful_shutdown=graceful_seconds,
        )
    )
    asyncio.run(server.serve(sockets=[listening]))
    return server.stopped_by


class _Server(uvicorn.Server):
    """uvicorn's server, whose drain on SIGINT or SIGTERM is the end: the signal is not raised again.

    uvicorn drains on either signal (no new connections; the requests in
    flight answered), then raises the signal again for the process's own
    handler; for ``beamvision serve`` the drain is the normal end (exit 0),
    so the signal is only recorded (``stopped_by``) for the summary.
    """

    stopped_by: str | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame):
        self.stopped_by = self.stopped_by or signal.Signals(sig).name
        super().handle_exit(sig, frame)
