"""``ThreadPoolDoFn``: per-element work on a thread pool, a bounded number of elements ahead.

Reading from object stores is latency-bound and image decoding releases the
GIL, so both gain from threads: while the bundle's thread runs inference on
one batch, the pool already reads and decodes the next elements. At most
``depth`` elements are in flight, so memory stays bounded whatever the size of
the collection.

Beam metrics are kept per thread, so subclasses return their outputs from
``work`` (on a pool thread) and the outputs are counted and emitted on the
bundle's own thread. Elements must be in the global window (batch pipelines).
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from beamvision.transforms.rows import METRICS_NAMESPACE


class ThreadPoolDoFn(beam.DoFn):
    """Runs ``work(element)`` on ``threads`` threads, keeping up to ``depth`` elements in flight.

    ``work`` returns the element's outputs: values for the main output and
    ``beam.pvalue.TaggedOutput`` for others. Main outputs are counted in the
    counter ``ok_counter``, tagged ones in ``failed_counter``.
    """

    def __init__(self, threads: int, depth: int, ok_counter: str, failed_counter: str):
        self._threads = threads
        self._depth = depth
        self._ok = Metrics.counter(METRICS_NAMESPACE, ok_counter)
        self._failed = Metrics.counter(METRICS_NAMESPACE, failed_counter)

    def work(self, element) -> list:
        raise NotImplementedError

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._threads, thread_name_prefix=type(self).__name__
        )

    def start_bundle(self):
        self._pending = collections.deque()

    def process(self, element) -> Iterable:
        self._pending.append(self._pool.submit(self.work, element))
        while len(self._pending) > self._depth:
            yield from self._emit(self._pending.popleft().result())

    def finish_bundle(self) -> Iterable:
        while self._pending:
            for output in self._emit(self._pending.popleft().result()):
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
                else:
                    yield GlobalWindows.windowed_value(output)

    def teardown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _emit(self, outputs: list) -> Iterable:
        for output in outputs:
            (self._failed if isinstance(output, beam.pvalue.TaggedOutput) else self._ok).inc()
            yield output
