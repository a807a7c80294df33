"""Label Studio's ML-backend protocol on the serving ``Service``: pre-annotations and annotations back.

Label Studio calls an ML backend at (its ``label_studio_ml`` package's API):

- ``GET /health``: ``{"status": "UP"}`` (``app``);
- ``POST /setup`` ``{project, schema, hostname, access_token, ...}`` when the
  backend is connected: answered ``{"model_version"}``; the hostname and
  token are kept to fetch the tasks' images (``--label_studio_url`` and
  ``--label_studio_token`` replace them);
- ``POST /predict`` ``{tasks, label_config, project, params}``: answered
  ``{"results": [...], "model_version"}``, one prediction per task, in order:
  a ``choices`` result (``from_name``/``to_name`` from the labelling config's
  ``<Choices>``; a multi-label model's label set), ``score`` and
  ``model_version``, as ``export-labels`` writes predictions;
- ``POST /webhook`` ``{"action", "annotation", "task", "project"}`` (an
  annotation created, updated or deleted): with ``--labels_file``, kept in a
  Label Studio JSON export there (one task per annotated task, its latest
  annotations) that ``prepare --labels FILE`` reads; rewritten whole on each
  event, atomically.

A task's image is its data field that the config's object tag names
(``<Image value="$image"/>``): a local path or a ``gs://`` URI under
``--allow_uris``, read as ``/v1/classify`` reads URIs, or a Label Studio URL
(``/data/upload/...``, ``/data/local-files/?d=...``, or a URL on its host),
fetched from that host only, with its token (``Authorization: Token T``, or a
personal access token's access token).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from beamvision.serving.service import MAX_URIS, RequestError, Service, read_body, read_json

LOG = logging.getLogger("beamvision.serve")
# Webhook actions that change a task's annotations, and the one that removes them.
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETION_EVENT = "ANNOTATIONS_DELETED"
FETCH_TIMEOUT_SECONDS = 30
# Label Studio refused or could not be reached: a predict request fails whole (502), not task by task.
LABEL_STUDIO_ERRORS = ("LabelStudioRefused", "LabelStudioUnreachable")
REFRESH_PATH = "/api/token/refresh/"  # a personal access token (a JWT) is exchanged here for an access token


def routes(service: Service) -> list[Route]:
    """The ML-backend routes of ``service``."""
    backend = _Backend(service)
    return [
        Route("/setup", backend.setup, methods=["POST"]),
        Route("/predict", backend.predict, methods=["POST"]),
        Route("/webhook", backend.webhook, methods=["POST"]),
        Route("/versions", backend.versions, methods=["GET"]),
    ]


def choices_control(label_config: str) -> tuple[str, str, str]:
    """(from_name, to_name, data key) of a labelling config's first ``<Choices>`` and the tag it labels.

    Raises:
        RequestError: the config is not XML, has no ``<Choices>``, or its
            object tag reads no ``$field`` of the task's data.
    """
    if not isinstance(label_config, str):
        raise RequestError("BadRequest", "the labelling config is not text")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise RequestError("BadRequest", f"the labelling config is not XML: {exc}") from None
    control = next(root.iter("Choices"), None)
    if control is None or not control.get("name") or not control.get("toName"):
        raise RequestError("BadRequest", "the labelling config has no <Choices name=... toName=...>")
    to_name = control.get("toName").split(",")[0]
    target = next((tag for tag in root.iter() if tag.get("name") == to_name and tag is not control), None)
    value = (target.get("value") or "") if target is not None else ""
    if not value.startswith("$"):
        raise RequestError("BadRequest", f"the labelling config's {to_name} reads no $field of the tasks")
    return control.get("name"), to_name, value[1:]


def config_classes(label_config: str) -> list[str]:
    """The ``<Choice value>`` names of a labelling config (none for a config that is not XML)."""
    try:
        root = ET.fromstring(label_config)
    except (ET.ParseError, TypeError):
        return []
    return [choice.get("value") for choice in root.iter("Choice") if choice.get("value")]


def prediction(
    answer: dict[str, Any], from_name: str, to_name: str, model_version: str, choices: list[str] | None = None
) -> dict[str, Any]:
    """One task's prediction from a ``/v1/classify`` answer: a choices result, the score, the version.

    ``choices``: the config's ``<Choice>`` values; the prediction names only
    those (a single-label model's best class among them, in its top k; none
    if its top k holds none). None or empty: any class.
    """
    if "labels" in answer:
        chosen = [label for label in answer["labels"] if not choices or label in choices]
        score = answer["score"]
    else:
        ranked = [item for item in answer["top_k"] if not choices or item["label"] in choices][:1]
        chosen, score = [item["label"] for item in ranked], (ranked[0]["score"] if ranked else 0.0)
    result = [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": chosen}}]
    return {"result": result if chosen else [], "score": score, "model_version": model_version}


def merge_event(tasks: dict[str, dict], event: dict[str, Any]) -> bool:
    """Applies one webhook event to ``tasks`` (task id -> exported task); whether anything changed."""
    action = event.get("action")
    if action in ANNOTATION_EVENTS:
        task, annotation = event.get("task"), event.get("annotation")
        if (
            not isinstance(task, dict)
            or not isinstance(annotation, dict)
            or not isinstance(task.get("data"), dict)
        ):
            raise RequestError("BadRequest", f"{action}: the event has no task with data, or no annotation")
        key = str(task.get("id", annotation.get("task")))
        kept = tasks.get(key, {}).get("annotations", [])
        others = [a for a in kept if a.get("id") != annotation.get("id")]
        data = dict(task["data"])
        config = _project_config(event)
        # Every class of the project, chosen or not (as export-labels records them): prepare's classes.
        classes = config_classes(config)
        if classes and "classes" not in data:
            data["classes"] = classes
        field = _image_field(config)
        if field != "image" and "source_uri" not in data and isinstance(data.get(field), str):
            data["source_uri"] = data[field]  # prepare reads source_uri, else image
        tasks[key] = {**task, "data": data, "annotations": [*others, annotation]}
        return True
    if action == DELETION_EVENT:
        removed = {a.get("id") for a in event.get("annotations") or [] if isinstance(a, dict)}
        changed = False
        for key, task in list(tasks.items()):
            left = [a for a in task.get("annotations", []) if a.get("id") not in removed]
            if len(left) != len(task.get("annotations", [])):
                changed = True
                tasks[key] = {**task, "annotations": left}
        return changed
    return False


def check_labels_file(path: str) -> None:
    """Refuses (UsageError) a ``--labels_file`` that exists but is not a Label Studio JSON export."""
    from beamvision.pipelines.flags import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--labels_file {path}: not a JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise UsageError(f"--labels_file {path}: not a Label Studio JSON export (a list of tasks)")


def served_by_label_studio(uri: str) -> bool:
    """Whether a task's image is a URL Label Studio serves (an upload, a local file, its own host)."""
    return uri.startswith(("/data/", "http://", "https://"))


def _project_config(event: dict[str, Any]) -> str:
    project = event.get("project")
    config = project.get("label_config") if isinstance(project, dict) else None
    return config if isinstance(config, str) else ""


def _image_field(config: str) -> str:
    """The task data field a labelling config shows (``image`` where the config says none)."""
    try:
        return choices_control(config)[2]
    except RequestError:
        return "image"


def _safe_name(text: str) -> str:
    """A file name of letters, digits, ``.``, ``-`` and ``_`` only (never a path)."""
    name = re.sub(r"[^\w.-]", "_", os.path.basename(text)).lstrip(".")
    return name[:120] or "image"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Label Studio's images are fetched from its own host only: a redirect elsewhere is refused."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(newurl, code, f"redirected to {newurl}", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirects)


class _Backend:
    """The ML-backend endpoints, with what ``/setup`` told of Label Studio and the labels file's lock."""

    def __init__(self, service: Service):
        self._service = service
        self._hostname = service.config.label_studio_url
        self._token = service.config.label_studio_token
        self._access: str | None = None  # a personal access token's current access token
        self._access_lock = threading.Lock()
        self._lock = threading.Lock()  # the labels file's

    async def _json(self, request: Request) -> dict[str, Any]:
        body = read_json(await read_body(request, self._service.config.max_body_bytes))
        if not isinstance(body, dict):
            raise RequestError("BadRequest", f"{request.url.path}: the body is not a JSON object")
        return body

    async def setup(self, request: Request) -> JSONResponse:
        body = await self._json(request)
        hostname, token = body.get("hostname"), body.get("access_token")
        if not self._service.config.label_studio_url and isinstance(hostname, str) and hostname:
            self._set_label_studio(hostname, self._token)
        if not self._service.config.label_studio_token and isinstance(token, str) and token:
            self._set_label_studio(self._hostname, token)
        if body.get("schema"):
            choices_control(body["schema"])  # a config it cannot predict for is refused now, not per task
        return JSONResponse({"model_version": self._service.model_version})

    def _set_label_studio(self, hostname: str | None, token: str | None) -> None:
        if hostname and not hostname.startswith(("http://", "https://")):
            raise RequestError("BadRequest", f"hostname {hostname}: not an http:// or https:// URL")
        with self._access_lock:
            if (hostname, token) != (self._hostname, self._token):
                self._hostname, self._token, self._access = hostname, token, None

    async def predict(self, request: Request) -> JSONResponse:
        body = await self._json(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RequestError(
                "BadRequest", 'a predict request has tasks: {"tasks": [...], "label_config": ...}'
            )
        if len(tasks) > MAX_URIS:
            raise RequestError("BadRequest", f"{len(tasks):,} tasks in one request; at most {MAX_URIS:,}")
        config = body.get("label_config") or ""
        from_name, to_name, field = choices_control(config)
        choices = config_classes(config)  # the prediction names only these
        results = await asyncio.gather(
            *(self._predict_task(task, field, from_name, to_name, choices) for task in tasks)
        )
        return JSONResponse({"results": list(results), "model_version": self._service.model_version})

    async def _predict_task(
        self, task: Any, field: str, from_name: str, to_name: str, choices: list[str]
    ) -> dict[str, Any]:
        """One task's prediction; a task whose image cannot be classified gets an empty one (logged)."""
        version = self._service.model_version
        task = task if isinstance(task, dict) else {}
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        try:
            image = await self._image(data.get(field))
            return prediction(await self._service.classify_bytes(image), from_name, to_name, version, choices)
        except RequestError as exc:
            if exc.error_type in LABEL_STUDIO_ERRORS:
                # Label Studio would store an empty prediction and never ask again: fail the request.
                raise
            LOG.warning("task %s: %s: %s", task.get("id"), exc.error_type, exc)  # only it goes without
            return {"result": [], "score": 0.0, "model_version": version}

    async def versions(self, request: Request) -> JSONResponse:
        return JSONResponse({"versions": [self._service.model_version]})

    async def webhook(self, request: Request) -> JSONResponse:
        event = await self._json(request)
        if "action" not in event:
            raise RequestError(
                "BadRequest", 'a webhook event has an action: {"action": "ANNOTATION_CREATED", ...}'
            )
        path = self._service.config.labels_file
        if path is None:
            return JSONResponse({"status": "ignored", "action": event["action"]}, status_code=201)
        if event["action"] in ANNOTATION_EVENTS:
            await self._keep_served_image(event, path)
        count = await asyncio.to_thread(self._merge, path, event)  # (file work off the event loop)
        return JSONResponse({"status": "ok", "action": event["action"], "tasks": count}, status_code=201)

    def _merge(self, path: str, event: dict[str, Any]) -> int:
        with self._lock:
            tasks = _read_tasks(path)
            if merge_event(tasks, event):
                _write_tasks(path, tasks)
            return len(tasks)

    async def _keep_served_image(self, event: dict[str, Any], labels_file: str) -> None:
        """An image only Label Studio has (an upload) copied beside the labels file, as the task's source_uri.

        prepare reads the task's ``source_uri`` first: the copy, where the
        image itself is a Label Studio URL no other program can open. The
        copy's name is the task's number and the image's own name, made safe.
        """
        task = event.get("task")
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or data.get("source_uri"):
            return
        uri = data.get(_image_field(_project_config(event)))
        if not isinstance(uri, str) or not served_by_label_studio(uri):
            return
        try:
            number = int(task.get("id"))
            image = await asyncio.to_thread(self._fetch, uri)
        except (TypeError, ValueError):
            raise RequestError("BadRequest", "the event's task has no number (id)") from None
        except RequestError as exc:  # the annotation is still kept, naming the image as Label Studio does
            LOG.warning("task %s: its image was not copied: %s: %s", task.get("id"), exc.error_type, exc)
            return
        split = urllib.parse.urlsplit(uri)
        name = urllib.parse.parse_qs(split.query).get("d", [split.path])[0]  # a local-files URL's is in d
        folder = os.path.splitext(os.path.abspath(labels_file))[0] + "-images"
        copy = os.path.join(folder, f"{number}-{_safe_name(name)}")
        await asyncio.to_thread(_write_file, copy, image)
        task["data"] = {**data, "source_uri": copy}

    async def _image(self, uri: Any) -> bytes:
        if not isinstance(uri, str) or not uri:
            raise RequestError("BadRequest", "the task names no image")
        if served_by_label_studio(uri):
            return await asyncio.to_thread(self._fetch, uri)
        return await self._service.read_uri(uri)

    def _label_studio_url(self, url: str) -> str:
        """A task's image URL on the Label Studio that connected: relative ones joined to it, others refused.

        The token goes only to Label Studio's own host: an absolute URL
        elsewhere (a task anyone may import) is not fetched with it.
        """
        if not self._hostname:
            raise RequestError(
                "FileNotFound",
                f"{url}: a Label Studio URL, and the server knows no Label Studio (--label_studio_url)",
            )
        base = urllib.parse.urlsplit(self._hostname)
        if not url.startswith(("http://", "https://")):
            return urllib.parse.urljoin(self._hostname.rstrip("/") + "/", url.lstrip("/"))
        given = urllib.parse.urlsplit(url)
        if (given.scheme, given.netloc) != (base.scheme, base.netloc):
            raise RequestError("NotAllowed", f"{url}: not on Label Studio's host {base.netloc}")
        return url

    def _fetch(self, url: str) -> bytes:
        """An image Label Studio serves, fetched from its host with its token (``_label_studio_url``)."""
        url = self._label_studio_url(url)
        limit = self._service.config.max_body_bytes
        for attempt in range(2):  # a second time with a fresh access token, if the first one expired
            headers = {"Authorization": self._authorization(refresh=attempt > 0)} if self._token else {}
            try:
                with _OPENER.open(
                    urllib.request.Request(url, headers=headers), timeout=FETCH_TIMEOUT_SECONDS
                ) as response:
                    data = response.read(limit + 1)
                break
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403) and attempt == 0 and _is_jwt(self._token):
                    continue
                if exc.code in (401, 403):
                    raise RequestError(
                        "LabelStudioRefused",
                        f"{url}: Label Studio answered {exc.code}: its token is refused (a legacy API token "
                        "needs legacy tokens enabled; or pass a personal access token, --label_studio_token)",
                    ) from None
                raise RequestError("FileNotFound", f"{url}: Label Studio answered {exc.code}") from None
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
                raise RequestError("LabelStudioUnreachable", f"{url}: cannot be fetched ({exc})") from None
        if len(data) > limit:
            raise RequestError("BodyTooLarge", f"{url}: over the limit of {limit:,} bytes")
        return data

    def _authorization(self, refresh: bool = False) -> str:
        """The Authorization header for Label Studio: ``Token T`` (legacy), or a personal access token's
        short-lived access token (``Bearer``), exchanged at ``REFRESH_PATH`` and again when refused."""
        if not _is_jwt(self._token):
            return f"Token {self._token}"
        with self._access_lock:
            if refresh or self._access is None:
                url = urllib.parse.urljoin((self._hostname or "").rstrip("/") + "/", REFRESH_PATH.lstrip("/"))
                body = json.dumps({"refresh": self._token}).encode()
                request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                try:
                    with _OPENER.open(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
                        self._access = json.loads(response.read())["access"]
                except (
                    urllib.error.URLError,
                    OSError,
                    ValueError,
                    KeyError,
                    http.client.HTTPException,
                ) as exc:
                    raise RequestError(
                        "LabelStudioRefused", f"{url}: the personal access token was not exchanged ({exc})"
                    ) from None
            return f"Bearer {self._access}"


def _is_jwt(token: str | None) -> bool:
    """Whether a token is a JWT (a personal access token), not a legacy API token (40 hex digits)."""
    return bool(token) and token.count(".") == 2


def _read_tasks(path: str) -> dict[str, dict]:
    """The labels file's tasks by id (none yet: empty)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {str(task.get("id", index)): task for index, task in enumerate(json.load(f))}


def _write_tasks(path: str, tasks: dict[str, dict]) -> None:
    """The tasks as a Label Studio JSON export, replacing ``path`` at once (a reader sees old or new)."""
    _write_file(path, json.dumps(list(tasks.values()), indent=1).encode("utf-8"))


def _write_file(path: str, data: bytes) -> None:
    """``data`` at ``path``, written beside it first and renamed: never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=folder, delete=False, suffix=".tmp") as f:
        f.write(data)
    os.replace(f.name, path)
