"""Concurrent requests' images gathered into the engine's batch.

``Batcher`` owns the engines of one model (``beamvision.transforms.engines``:
each built for one fixed batch shape, as classify's workers build theirs; a
few shapes, so that a lone image is not computed as a padded full batch) and
one thread that runs them, each batch on the smallest shape it fits.
``submit`` queues an image and returns a ``concurrent.futures.Future`` of its
``Prediction``; the thread takes what is queued, waits at most
``max_wait_ms`` after the first image for the batch to fill, runs the batch,
and answers each future. Under load batches fill at once; a lone request
waits ``max_wait_ms`` at most. ``close`` answers everything queued before it,
then stops the thread: what SIGTERM's drain relies on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from beamvision.transforms.engines import Prediction

_STOP = object()  # queued by close: the thread answers what is before it, then ends

Engine = Callable[[Sequence[np.ndarray]], list[Prediction]]


def batch_shapes(batch_size: int) -> list[int]:
    """The batch shapes an engine is built for: the powers of two below ``batch_size``, and it.

    A batch runs on the smallest shape it fits, so at most half of what is
    computed is padding (with one shape, a lone image computed a whole batch).
    """
    shapes = [1]
    while shapes[-1] * 2 < batch_size:
        shapes.append(shapes[-1] * 2)
    return sorted({*shapes, batch_size})


class Batcher:
    """A model's engines by batch shape, one thread running them on batches of queued images."""

    def __init__(self, engines: dict[int, Engine], max_wait_ms: float):
        self._engines = dict(sorted(engines.items()))
        self._batch_size = max(engines)
        self._max_wait = max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0  # batches run, and the images in them: for the summary
        self.images = 0
        self._thread = threading.Thread(target=self._run, name="beamvision-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        """Queues one image (uint8 at the model's size); its future gets the Prediction or the error."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put((pixels, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Answers every image queued so far, then stops the thread (waits for it up to ``timeout``)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self._max_wait
            while len(batch) < self._batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._answer(batch)

    def _answer(self, batch: list) -> None:
        # A request cancelled while queued (its client gone, a shutdown's deadline) is not computed,
        # and answering it would raise: the thread must outlive every request.
        batch = [(pixels, future) for pixels, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            engine = next(engine for size, engine in self._engines.items() if size >= len(batch))
            predictions = engine([pixels for pixels, _ in batch])
            if len(predictions) != len(batch):
                raise RuntimeError(f"the engine answered {len(predictions)} of {len(batch)} images")
        except Exception as exc:  # the batch failed: each of its requests gets the error
            for _, future in batch:
                future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(batch)
        for (_, future), prediction in zip(batch, predictions, strict=True):
            future.set_result(prediction)
