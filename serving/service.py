"""What a request asks of the model: decode an image (or read one a URI names), classify it, answer.

``Service`` holds the loaded model (an engine behind a ``Batcher``), the pool
of threads that decode, and the limits; ``ServeConfig`` what ``beamvision
serve`` was given. Decoding is classify's own (``decode_image``: the same
formats, ``--max_pixels``, error types), so an image gets the same label from
the server as from a batch run. What cannot be answered is a
``RequestError``: an HTTP status, classify's error type, one line of message.
``answer`` is the JSON of one classified image, ``read_body`` a request's
body within the limit; ``Stats`` counts what was
served, for the log and the summary at shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from beamvision import storage
from beamvision.models.artifact import Manifest, load_manifest
from beamvision.serving.batcher import Batcher, batch_shapes
from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB, MB, PIXEL_BYTES
from beamvision.transforms.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from beamvision.transforms.engines import DEFAULT_ENGINE, Prediction, build_classifier, load_for_engine
from beamvision.transforms.sizing import DEFAULT_SIZING, READ_THREADS, WorkerSizing

if TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_BODY_MB = 32
MAX_URIS = 1000  # files one JSON request may name (their answers come back in one response)
LATENCIES_KEPT = 100_000  # the summary's percentiles are over the latest this many requests

# classify's error types (``decode_image``, reading) -> the HTTP status of a request that hits one.
ERROR_STATUS = {
    "EmptyFile": 400,
    "NotAnImage": 415,
    "UnsupportedFormat": 415,
    "CorruptImage": 422,
    "DecompressionBomb": 422,
    "OutOfMemory": 503,
    "FileNotFound": 404,
    "NotAllowed": 403,
    "BadRequest": 400,
    "Unauthorized": 401,
    "BodyTooLarge": 413,
    "UnsupportedMediaType": 415,
    "ShuttingDown": 503,
    "InferenceError": 500,
    "StorageUnreachable": 502,
    "ServerError": 500,
    "LabelStudioRefused": 502,  # the Label Studio that serves a task's image refused its token
    "LabelStudioUnreachable": 502,
}


class RequestError(Exception):
    """A request that cannot be answered: its status, classify's error type, one line of message."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.status = ERROR_STATUS.get(error_type, 400)

    def to_json(self) -> dict[str, str]:
        return {"error_type": self.error_type, "message": str(self)}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What ``beamvision serve`` was given (the flags' values; see ``pipelines/serve.py``)."""

    model: str
    engine: str = DEFAULT_ENGINE
    precision: str = "fp32"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    top_k: int = DEFAULT_TOP_K
    max_pixels: int = DEFAULT_MAX_PIXELS
    buffer_mb: int = DEFAULT_BUFFER_MB  # file bytes and full-size pixels decoding may hold at once
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    allow_uris: tuple[str, ...] = ()
    token: str | None = None
    threshold: float | None = None
    sizing: WorkerSizing = DEFAULT_SIZING
    labels_file: str | None = None  # the Label Studio webhook's annotations, for prepare --labels
    label_studio_url: str | None = None
    label_studio_token: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb * 1024 * 1024


class Stats:
    """Requests served, by status, and their latencies (the latest ``LATENCIES_KEPT``): log and summary."""

    def __init__(self):
        self._lock = threading.Lock()
        self.by_status: collections.Counter = collections.Counter()
        self.images = 0
        self._latencies: collections.deque = collections.deque(maxlen=LATENCIES_KEPT)

    def record(self, status: int, seconds: float) -> None:
        with self._lock:
            self.by_status[status] += 1
            self._latencies.append(seconds)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile of the kept latencies, in milliseconds (None before any request)."""
        with self._lock:
            kept = np.asarray(self._latencies)
        return float(np.percentile(kept, q) * 1000) if len(kept) else None

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())


class Service:
    """The model, its batcher and the decode pool: classifies an image's bytes or the file a URI names."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.manifest: Manifest = load_manifest(config.model)
        threads = config.sizing.resolve()
        artifact = load_for_engine(config.model, config.engine, threads.inference)
        engines = {
            size: build_classifier(
                config.engine,
                artifact,
                size,
                config.top_k,
                embeddings=False,
                precision=config.precision,
                threads=threads.inference,
                threshold=config.threshold,
            )
            for size in batch_shapes(config.batch_size)
        }
        blank = np.zeros((self.manifest.input_size, self.manifest.input_size, 3), np.uint8)
        for engine in engines.values():  # traced and compiled now, not on the first requests
            engine([blank])
        self.batcher = Batcher(engines, config.max_wait_ms)
        self._decode = ThreadPoolExecutor(threads.decode, thread_name_prefix="beamvision-decode")
        self._read = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="beamvision-read")
        self._allowed = tuple(_allowed_root(prefix) for prefix in config.allow_uris)
        self._hold_pixels = functools.partial(PIXEL_BYTES.hold, limit=config.buffer_mb * MB)
        # Files of one request read and waiting to decode at once: their bytes are held meanwhile.
        self._reading = asyncio.Semaphore(READ_THREADS)
        self.stats = Stats()
        self.started = time.monotonic()

    @property
    def model_version(self) -> str:
        return f"{self.manifest.name}-{self.manifest.version}"

    async def classify_bytes(self, data: bytes) -> dict[str, Any]:
        """The answer for one image's bytes; a ``RequestError`` when it does not decode."""
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self._decode, self._pixels, data)
        try:
            queued = self.batcher.submit(pixels)
        except RuntimeError:  # closed: the server is stopping
            raise RequestError("ShuttingDown", "the server is shutting down") from None
        try:
            prediction = await asyncio.wrap_future(queued)
        except Exception as exc:  # the engine failed on the batch
            raise RequestError("InferenceError", f"{type(exc).__name__}: {exc}") from None
        self.stats.images += 1
        return answer(prediction, self.manifest)

    async def classify_uris(self, uris: list[str]) -> list[dict[str, Any]]:
        """The answers for the files ``uris`` name, in order, computed together (they share batches)."""
        if len(uris) > MAX_URIS:
            raise RequestError("BadRequest", f"{len(uris):,} URIs in one request; at most {MAX_URIS:,}")
        return list(await asyncio.gather(*(self.classify_uri(uri) for uri in uris)))

    async def classify_uri(self, uri: str) -> dict[str, Any]:
        """The answer for the file ``uri`` names (under ``--allow_uris``), with ``uri``; errors as fields."""
        try:
            async with self._reading:
                data = await self.read_uri(uri)
                return {"uri": uri, **(await self.classify_bytes(data))}
        except RequestError as exc:
            return {"uri": uri, **exc.to_json()}

    async def read_uri(self, uri: str) -> bytes:
        """The bytes of a file under one of ``--allow_uris``; RequestError when it is not, or is missing."""
        if not isinstance(uri, str) or not uri:
            raise RequestError("BadRequest", f"not a URI: {uri!r}")
        named = _allowed_root(uri)
        if not any(named == root or named.startswith(root.rstrip("/") + "/") for root in self._allowed):
            allowed = ", ".join(self.config.allow_uris) or "none (start the server with --allow_uris PREFIX)"
            raise RequestError("NotAllowed", f"{uri}: not under the URIs this server may read: {allowed}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read, _read, named, uri, self.config.max_body_bytes)

    def _pixels(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(
                data, self.manifest.input_size, self.config.max_pixels, self._hold_pixels
            ).pixels
        except DecodeError as exc:
            raise RequestError(exc.error_type, str(exc)) from None

    def close(self, timeout: float | None = 30) -> None:
        """Answers what is queued, then stops the batcher and the pools."""
        self.batcher.close(timeout)
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._read.shutdown(wait=False, cancel_futures=True)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it grows over ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                "BodyTooLarge", f"the body is over the limit of {limit:,} bytes (--max_body_mb)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def read_json(body: bytes) -> Any:
    """A JSON body; RequestError (400) when it is not JSON."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError("BadRequest", f"the body is not JSON: {exc}") from None


def answer(prediction: Prediction, manifest: Manifest) -> dict[str, Any]:
    """One classified image as JSON: classify's row fields (a multi-label model's ``labels`` too)."""
    result = {
        "label": prediction.labels[0],
        "score": round(prediction.scores[0], 6),
        "top_k": [
            {"label": label, "score": round(score, 6)}
            for label, score in zip(prediction.labels, prediction.scores, strict=True)
        ],
        "model_name": manifest.name,
        "model_version": manifest.version,
    }
    if prediction.chosen is not None:
        result["labels"] = prediction.chosen
    return result


def _allowed_root(uri: str) -> str:
    """A URI as compared with ``--allow_uris``: a local path absolute, its links and ``..`` resolved."""
    if storage.is_local(uri):
        return os.path.realpath(os.path.expanduser(uri))
    return uri


def _read(path: str, uri: str, limit: int) -> bytes:
    """The file's bytes (``path``: the resolved ``uri``); RequestError when missing or over ``limit``."""
    if storage.is_local(path) and os.path.isdir(path):
        raise RequestError("FileNotFound", f"{uri}: a folder, not a file")
    try:
        size = storage.size(path)
        if size > limit:
            raise RequestError("BodyTooLarge", f"{uri}: {size:,} bytes is over the limit of {limit:,}")
        return storage.read_bytes(path)
    except storage.StorageUnreachable as exc:
        raise RequestError("StorageUnreachable", f"{uri}: {exc}") from None
    except RequestError:
        raise
    except Exception:  # no such file, or not readable: Beam's filesystems raise several types
        raise RequestError("FileNotFound", f"{uri}: no such file") from None
