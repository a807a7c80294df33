"""``ThreadPoolDoFn`` and ``ByteBudget``: work on threads, bounded in elements and in bytes.

Reading from object stores is latency-bound and image decoding releases the
GIL, so both gain from threads: while the bundle's thread runs inference on
one batch, the pool already reads and decodes the next elements. What is in
flight is bounded twice: at most ``depth`` elements, and at most ``budget``
bytes of their ``cost`` (file sizes, for reads), so memory stays bounded
whatever the size of the collection and of its files. An element that alone
costs more than the budget still runs, alone: nothing is ever refused.

Beam metrics are kept per thread, so subclasses return their outputs from
``work`` (on a pool thread) and the outputs are counted and emitted on the
bundle's own thread. Elements must be in the global window (batch pipelines).
The most bytes the process held at once is the Beam distribution
``BYTES_HELD_METRIC`` (reported as each bundle finishes).

A process has one pool per kind of DoFn, shared by the DoFn's instances (a
runner may run several bundles of a stage at once, each with its own
instance): the thread counts of ``beamvision.transforms.sizing`` hold per
process, however many bundle threads there are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from beamvision.transforms.rows import METRICS_NAMESPACE

MB = 2**20
# --buffer_mb: reads wait while file bytes and pixels held by the process's reads
# and decodes exceed it; decodes wait while pixels being decoded exceed it. So a
# worker process holds at most about twice this much, and in practice about it.
DEFAULT_BUFFER_MB = 384


class ByteBudget:
    """Bytes held by threads against a limit.

    ``acquire(room, cost)`` waits until ``room`` more bytes fit (or nothing is
    held: a request larger than the whole budget proceeds alone, so every
    request is eventually granted), then counts ``cost``, in one step under
    one lock; ``release`` uncounts. ``charge`` counts without waiting (for
    memory a caller already holds). ``hold`` is acquire-and-release around a
    block, also charged to ``counted_in`` if given. A wait longer than
    ``WAIT_WARNING_S`` logs a warning and proceeds: a budget never hangs a job.
    ``take_most_held`` says the most it held at once since it was last asked.
    """

    def __init__(self, limit: int | None = None, counted_in: ByteBudget | None = None):
        self.limit = limit
        self._counted_in = counted_in
        self.used = 0
        self._most = 0
        self._changed = threading.Condition()

    def acquire(self, room: int, cost: int, limit: int | None = None) -> None:
        limit = self.limit if limit is None else limit
        with self._changed:
            fits = self._changed.wait_for(
                lambda: self.used == 0 or limit is None or self.used + room <= limit, timeout=WAIT_WARNING_S
            )
            if not fits:
                logging.getLogger(__name__).warning(
                    "waited %ds for %d bytes of a %d-byte budget holding %d; going ahead",
                    WAIT_WARNING_S,
                    room,
                    limit,
                    self.used,
                )
            self.used += cost
            self._most = max(self._most, self.used)

    def charge(self, nbytes: int) -> None:
        self.acquire(0, nbytes, limit=None)

    def release(self, nbytes: int) -> None:
        with self._changed:
            self.used -= nbytes
            self._changed.notify_all()

    def take_most_held(self) -> int:
        """The most bytes held at once since the last call; the next span starts at what is held now."""
        with self._changed:
            most, self._most = self._most, self.used
            return most

    def fits(self, nbytes: int, limit: int | None = None) -> bool:
        limit = self.limit if limit is None else limit
        return limit is None or self.used + nbytes <= limit

    @contextlib.contextmanager
    def hold(self, nbytes: int, limit: int | None = None) -> Iterator[None]:
        self.acquire(nbytes, nbytes, limit)
        if self._counted_in is not None:
            self._counted_in.charge(nbytes)
        try:
            yield
        finally:
            if self._counted_in is not None:
                self._counted_in.release(nbytes)
            self.release(nbytes)


WAIT_WARNING_S = 300

# What the reads and decodes of this process hold now: file bytes read ahead,
# files waiting for or in decoding, and their full-resolution pixels. Reads
# wait for room in it (``ThreadPoolDoFn(..., budget=...)``); decodes only count,
# so every wait ends as decodes finish, whatever the runner fused.
PROCESS_BYTES = ByteBudget()
# Full-resolution pixels being decoded in this process, by every decode thread of
# every bundle: a decode waits for room here (only other decodes hold it).
PIXEL_BYTES = ByteBudget(counted_in=PROCESS_BYTES)
# The Beam distribution of the most bytes PROCESS_BYTES held at once: its max is
# the most a worker process held for its reads and decodes (bounded by --buffer_mb).
BYTES_HELD_METRIC = "process_bytes_held"


class _SharedPools:
    """Thread pools shared by the DoFn instances of a process, by name and size; shut down when unused."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, int], list] = {}  # (name, threads) -> [executor, users]

    def acquire(self, name: str, threads: int) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            entry = self._pools.get((name, threads))
            if entry is None:
                executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
                entry = self._pools[name, threads] = [executor, 0]
            entry[1] += 1
            return entry[0]

    def release(self, name: str, threads: int) -> None:
        with self._lock:
            entry = self._pools[name, threads]
            entry[1] -= 1
            if entry[1]:
                return
            del self._pools[name, threads]
        entry[0].shutdown(wait=True, cancel_futures=True)


_POOLS = _SharedPools()


class ThreadPoolDoFn(beam.DoFn):
    """Runs ``work(element)`` on ``threads`` threads, up to ``depth`` elements ahead.

    ``threads`` is a count, or a function that gives it on the worker (worker
    sizing follows the worker's cores); the pool is the process's for this class.

    ``work`` returns the element's outputs: values for the main output and
    ``beam.pvalue.TaggedOutput`` for others. Main outputs are counted in the
    counter ``ok_counter``, tagged ones in ``failed_counter``.

    ``cost(element)`` (0 unless overridden) is the memory an element holds; it
    is counted in ``PROCESS_BYTES`` from admission until the element's outputs
    are emitted, or, with ``release_when_done``, until ``work`` returns (when
    the outputs are small: pixels decoded from a file). With a ``budget``, an
    element is admitted only when it fits in ``PROCESS_BYTES`` (the DoFn first
    emits what it holds, then waits for other holders to finish); one that
    alone exceeds the budget runs when nothing else is held. ``room(element)``
    (its cost, unless overridden) is what admission asks for: a file read
    for decoding needs room for its pixels too.
    """

    def __init__(
        self,
        threads: int | Callable[[], int],
        depth: int,
        ok_counter: str,
        failed_counter: str,
        budget: int | None = None,
        release_when_done: bool = False,
    ):
        self._threads = threads
        self._depth = depth
        self._budget = budget
        self._release_when_done = release_when_done
        self._ok = Metrics.counter(METRICS_NAMESPACE, ok_counter)
        self._failed = Metrics.counter(METRICS_NAMESPACE, failed_counter)
        self._held = Metrics.distribution(METRICS_NAMESPACE, BYTES_HELD_METRIC)

    def work(self, element) -> list:
        raise NotImplementedError

    def cost(self, element) -> int:
        return 0

    def setup(self):
        self._pool_key = (type(self).__name__, self._threads() if callable(self._threads) else self._threads)
        self._pool = _POOLS.acquire(*self._pool_key)
        self._pending = collections.deque()

    def start_bundle(self):
        self._abandon_pending()  # left by a bundle that failed

    def room(self, element) -> int:
        """The room an element needs to be admitted: its cost, unless more is known to follow."""
        return self.cost(element)

    def process(self, element) -> Iterable:
        cost, room = self.cost(element), self.room(element)
        while self._pending and (
            len(self._pending) >= self._depth
            or (self._budget is not None and not PROCESS_BYTES.fits(room, self._budget))
        ):
            yield from self._emit_oldest()
        PROCESS_BYTES.acquire(room if self._budget is not None else 0, cost, self._budget)
        try:
            future = self._pool.submit(self.work, element)
        except BaseException:
            PROCESS_BYTES.release(cost)
            raise
        if self._release_when_done:
            future.add_done_callback(lambda _, held=cost: PROCESS_BYTES.release(held))
        self._pending.append((future, 0 if self._release_when_done else cost))

    def finish_bundle(self) -> Iterable:
        for output in self.emit_pending():
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)
        # Here, on the bundle's thread: metrics updated on the pool's threads would be lost.
        self._held.update(PROCESS_BYTES.take_most_held())

    def teardown(self):
        self._abandon_pending()
        _POOLS.release(*self._pool_key)

    def emit_pending(self) -> Iterable:
        """Emits every element in flight, oldest first (waiting for each)."""
        while self._pending:
            yield from self._emit_oldest()

    def _emit_oldest(self) -> Iterable:
        future, cost = self._pending.popleft()
        try:
            outputs = future.result()
        finally:
            PROCESS_BYTES.release(cost)
        for output in outputs:
            (self._failed if isinstance(output, beam.pvalue.TaggedOutput) else self._ok).inc()
            yield output

    def _abandon_pending(self) -> None:
        while self._pending:
            future, cost = self._pending.popleft()
            future.cancel()
            PROCESS_BYTES.release(cost)
