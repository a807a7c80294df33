"""ThreadPoolDoFn: outputs in input order, a bounded number in flight, failures surfaced, none left."""

from __future__ import annotations

import random
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline as beam_testing
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow

from beamvision.transforms.concurrency import PROCESS_BYTES, ByteBudget, ThreadPoolDoFn


class _Square(ThreadPoolDoFn):
    """Squares numbers after a random pause (so threads finish out of order); odd ones above 90 fail."""

    def __init__(self, depth: int = 4):
        super().__init__(threads=8, depth=depth, ok_counter="test_ok", failed_counter="test_failed")
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def work(self, element) -> list:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(random.random() / 500)
        with self._lock:
            self.in_flight -= 1
        if element == "boom":
            raise ValueError("work failed")
        if element % 2 and element > 90:
            return [beam.pvalue.TaggedOutput("odd", element)]
        return [element * element]


def _run_bundle(fn: ThreadPoolDoFn, elements) -> list:
    """process() every element, then finish_bundle(), as a runner does; unwraps finish_bundle's values."""
    fn.setup()
    fn.start_bundle()
    try:
        out = [x for element in elements for x in fn.process(element)]
        for value in fn.finish_bundle():
            tagged = isinstance(value, beam.pvalue.TaggedOutput)
            windowed = value.value if tagged else value
            assert list(windowed.windows) == [GlobalWindow()]
            out.append(beam.pvalue.TaggedOutput(value.tag, windowed.value) if tagged else windowed.value)
        return out
    finally:
        fn.teardown()


def test_outputs_keep_input_order_and_at_most_depth_elements_wait():
    fn = _Square(depth=4)
    out = _run_bundle(fn, list(range(90)))
    assert out == [x * x for x in range(90)]
    assert fn.most_in_flight <= 5  # depth waiting, plus the one just submitted


def test_tagged_outputs_pass_through_in_order():
    out = _run_bundle(_Square(), [90, 91, 92, 93])
    assert [(o.tag, o.value) if isinstance(o, beam.pvalue.TaggedOutput) else o for o in out] == [
        8100,
        ("odd", 91),
        8464,
        ("odd", 93),
    ]


@pytest.mark.parametrize("where", [0, 50, 89])  # emitted in process() or left for finish_bundle()
def test_an_exception_in_work_fails_the_bundle(where):
    elements = list(range(90))
    elements[where] = "boom"
    with pytest.raises(ValueError, match="work failed"):
        _run_bundle(_Square(), elements)


def test_in_a_pipeline_every_element_arrives_once():
    with beam_testing.TestPipeline() as p:
        out = p | beam.Create(range(200)) | beam.ParDo(_Square(depth=8)).with_outputs("odd", main="squares")
        assert_that(
            out.squares, equal_to([x * x for x in range(200) if not (x % 2 and x > 90)]), label="Main"
        )
        assert_that(out.odd, equal_to([x for x in range(91, 200, 2)]), label="Odd")


class _Sized(ThreadPoolDoFn):
    """Elements are byte counts; work notes how many bytes are held (in PROCESS_BYTES) while it runs."""

    def __init__(self, budget: int, release_when_done: bool = False):
        super().__init__(
            threads=8,
            depth=64,
            ok_counter="test_ok",
            failed_counter="test_failed",
            budget=budget,
            release_when_done=release_when_done,
        )
        self.held = []

    def cost(self, element) -> int:
        return element

    def work(self, element) -> list:
        self.held.append(PROCESS_BYTES.used)
        time.sleep(random.random() / 500)
        if element == 13:
            raise ValueError("unlucky")
        return [element]


def test_bytes_in_flight_stay_within_the_budget_and_a_larger_element_runs_alone():
    sizes = (
        [random.choice([1, 5, 20, 30]) for _ in range(300)]
        + [500]
        + [random.choice([2, 7]) for _ in range(50)]
    )
    fn = _Sized(budget=100)
    assert _run_bundle(fn, sizes) == sizes
    assert max(fn.held) <= 500
    held_by_small = [h for h in fn.held if h != 500]
    assert max(held_by_small) <= 100
    assert 500 in fn.held  # the large element ran, and nothing else was held meanwhile
    assert PROCESS_BYTES.used == 0


def test_bytes_released_when_done_free_the_budget_before_emission():
    # Each element costs the whole budget: every one is admitted once the one before is done.
    fn = _Sized(budget=10, release_when_done=True)
    assert _run_bundle(fn, [10] * 40) == [10] * 40
    assert max(fn.held) == 10
    assert PROCESS_BYTES.used == 0


def test_a_failed_bundle_leaves_nothing_held():
    with pytest.raises(ValueError, match="unlucky"):
        _run_bundle(_Sized(budget=100), [20] * 10 + [13] + [20] * 10)
    assert PROCESS_BYTES.used == 0


def test_byte_budget_grants_an_oversized_hold_alone():
    budget = ByteBudget(100)
    order = []

    def hold(name, nbytes, pause):
        with budget.hold(nbytes):
            order.append((name, budget.used))
            time.sleep(pause)

    small = threading.Thread(target=hold, args=("small", 60, 0.2))
    small.start()
    time.sleep(0.05)
    large = threading.Thread(target=hold, args=("large", 250, 0))
    large.start()
    small.join()
    large.join()
    assert order == [("small", 60), ("large", 250)]  # the large one waited for the small one, then ran
    assert budget.used == 0
