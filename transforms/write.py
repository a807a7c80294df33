"""``WriteResults`` and ``WriteErrors``: Parquet result and error shards, then summary.json.

Layout under the output directory (names from ``beamvision.transforms.outputs``)::

    results-SSSSS-of-NNNNN.parquet   one row per classified image (RESULT_FIELDS)
    errors-SSSSS-of-NNNNN.parquet    one row per input that could not be classified
    summary.json                     written last, after every shard is in place

classify's rows go to parts in its partial folder first and become these
shards only when every input has its row (``beamvision.transforms.resume``);
prepare writes its error rows with ``WriteErrors``, Beam's own sink.

The row schemas are in ``beamvision.transforms.rows``; what a run prints of
its summary is ``beamvision.pipelines.reports``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import apache_beam as beam

from beamvision import storage
from beamvision.transforms.outputs import ERRORS_PREFIX, RESULTS_PREFIX, SUMMARY_FILE
from beamvision.transforms.read import unmatched_patterns
from beamvision.transforms.resume import WriteParts, commit_run, remove_partial
from beamvision.transforms.rows import ERROR_SCHEMA, result_schema

TOP_LABELS_IN_SUMMARY = 20


def build_summary(
    inputs: int,
    results: int,
    errors: int,
    skipped: int,
    seconds: float,
    model: dict[str, Any],
    top_labels: list[tuple[str, int]],
    output: str,
    unmatched: list[str] | None = None,
    not_images: int = 0,
    error_groups: list[dict[str, Any]] | None = None,
    resumed: int = 0,
) -> dict[str, Any]:
    """The content of summary.json.

    ``unmatched``: --input patterns that matched no file; ``not_images``:
    archive members passed over because their names are not images;
    ``error_groups``: ``SummarizeErrors``' output; ``resumed``: rows (among
    ``results`` and ``errors``) kept from an interrupted run, not made again.
    """
    return {
        "inputs": inputs,
        "results": results,
        "errors": errors,
        "skipped": skipped,
        "resumed": resumed,
        "complete": inputs == results + errors + skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(inputs / seconds, 2) if seconds > 0 else None,
        "model": model,
        "top_labels": [{"label": label, "count": count} for label, count in top_labels],
        "error_groups": list(error_groups or []),
        "unmatched_patterns": list(unmatched or []),
        "archive_members_not_images": not_images,
        "output": output,
    }


def merge_error_groups(values) -> tuple[int, str, str]:
    """(count, sample URI, its message) of one (stage, error type) merged: counts add, the first URI stays."""
    count, sample = 0, None
    for n, uri, message in values:
        count += n
        if sample is None or uri < sample[0]:
            sample = (uri, message)
    return count, *sample


class SummarizeErrors(beam.PTransform):
    """Error rows to one list (one element): a group per (stage, error type), most frequent first.

    Each group is ``{stage, error_type, count, sample_uri, sample_message}``;
    the sample is the group's first URI in sort order, so reruns agree.
    """

    def expand(self, errors):
        return (
            errors
            | "StageAndType"
            >> beam.Map(lambda r: ((r["stage"], r["error_type"]), (1, r["image_uri"], r["message"])))
            | "PerStageAndType" >> beam.CombinePerKey(merge_error_groups)
            | "AsGroups"
            >> beam.MapTuple(
                lambda key, merged: {
                    "stage": key[0],
                    "error_type": key[1],
                    "count": merged[0],
                    "sample_uri": merged[1],
                    "sample_message": merged[2],
                }
            )
            | "Gathered" >> beam.combiners.ToList()
            | "MostFirst" >> beam.Map(sorted, key=lambda g: (-g["count"], g["stage"], g["error_type"]))
        )


class WriteErrors(beam.PTransform):
    """Writes error rows as ``errors-SSSSS-of-NNNNN.parquet`` under ``output``; yields the file names."""

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, errors):
        return errors | "WriteParquet" >> beam.io.WriteToParquet(
            storage.join(self._output, ERRORS_PREFIX), ERROR_SCHEMA, file_name_suffix=".parquet"
        )


class WriteResults(beam.PTransform):
    """Writes result and error rows as parts, then commits them as Parquet shards and writes summary.json.

    Input: a dict with PCollections ``results`` and ``errors`` (row dicts;
    ``errors`` may be a dict of PCollections by source, each written as it comes),
    ``inputs`` (one element per input file, counted for the summary) and
    ``patterns`` ((pattern, files matched) from ``MatchInputs``), optionally
    ``not_images`` (counts of archive members passed over), in an
    incremental run ``skipped`` (files an earlier run classified), and in a
    resumed run ``kept_results`` and ``kept_errors`` (rows an interrupted run
    made: written and counted as this run's).
    """

    def __init__(
        self,
        output: str,
        partial: str,
        embeddings: bool,
        model: dict[str, Any],
        started_at: float,
        checkpoint_seconds: float,
        multi_label: bool = False,
    ):
        super().__init__()
        self._output = output
        self._partial = partial
        self._embeddings = embeddings
        self._multi_label = multi_label
        self._model = model
        self._started_at = started_at
        self._seconds = checkpoint_seconds

    def expand(self, pcolls):
        inputs = pcolls["inputs"]
        nothing = inputs.pipeline | "Nothing" >> beam.Create([])
        skipped = pcolls.get("skipped", nothing)
        not_images = pcolls.get("not_images", nothing)
        # Each source of rows is written by its own step: after a Flatten of several stages a
        # direct runner would hold the rows until every stage ends, and flush no part before.
        result_sources = {"Results": pcolls["results"], "KeptResults": pcolls.get("kept_results", nothing)}
        error_sources = (
            dict(pcolls["errors"]) if isinstance(pcolls["errors"], dict) else {"": pcolls["errors"]}
        )
        error_sources["kept"] = pcolls.get("kept_errors", nothing)
        schema = result_schema(self._embeddings, self._multi_label)
        result_parts = [
            rows | f"Write{name}Parts" >> WriteParts(self._partial, RESULTS_PREFIX, schema, self._seconds)
            for name, rows in result_sources.items()
        ]
        error_parts = [
            rows
            | f"Write{name.title()}ErrorParts"
            >> WriteParts(self._partial, ERRORS_PREFIX, ERROR_SCHEMA, self._seconds)
            for name, rows in error_sources.items()
        ]
        results = list(result_sources.values()) | "AllResults" >> beam.Flatten()
        errors = list(error_sources.values()) | "AllErrors" >> beam.Flatten()
        result_parts = result_parts | "ResultParts" >> beam.Flatten()
        error_parts = error_parts | "ErrorParts" >> beam.Flatten()
        count = beam.combiners.Count
        top_labels = (
            results
            | "Labels" >> beam.Map(lambda row: row["label"])
            | "CountLabels" >> count.PerElement()
            | "TopLabels" >> beam.combiners.Top.Of(TOP_LABELS_IN_SUMMARY, key=lambda kv: (kv[1], kv[0]))
        )
        resumed = (result_sources["KeptResults"], error_sources["kept"]) | "KeptRows" >> beam.Flatten()
        return (
            inputs.pipeline
            | "SummaryTrigger" >> beam.Create([None])
            | "CommitAndSummarize"
            >> beam.ParDo(
                _CommitFn(
                    self._output,
                    self._partial,
                    self._embeddings,
                    self._model,
                    self._started_at,
                    self._multi_label,
                ),
                inputs=beam.pvalue.AsSingleton(inputs | "CountInputs" >> count.Globally()),
                results=beam.pvalue.AsSingleton(results | "CountResults" >> count.Globally()),
                errors=beam.pvalue.AsSingleton(errors | "CountErrors" >> count.Globally()),
                skipped=beam.pvalue.AsSingleton(skipped | "CountSkipped" >> count.Globally()),
                resumed=beam.pvalue.AsSingleton(resumed | "CountResumed" >> count.Globally()),
                not_images=beam.pvalue.AsSingleton(not_images | "SumNotImages" >> beam.CombineGlobally(sum)),
                top_labels=beam.pvalue.AsSingleton(top_labels),
                error_groups=beam.pvalue.AsSingleton(errors | "SummarizeErrors" >> SummarizeErrors()),
                patterns=beam.pvalue.AsList(pcolls["patterns"]),
                # Side inputs are complete before the step runs: the commit
                # starts only after every part has been written.
                result_parts=beam.pvalue.AsList(result_parts),
                error_parts=beam.pvalue.AsList(error_parts),
            )
        )


class _CommitFn(beam.DoFn):
    def __init__(
        self,
        output: str,
        partial: str,
        embeddings: bool,
        model: dict[str, Any],
        started_at: float,
        multi_label: bool = False,
    ):
        self._multi_label = multi_label
        self._output = output
        self._partial = partial
        self._embeddings = embeddings
        self._model = model
        self._started_at = started_at

    def process(
        self,
        _,
        inputs,
        results,
        errors,
        skipped,
        resumed,
        not_images,
        top_labels,
        error_groups,
        patterns,
        result_parts,
        error_parts,
    ):
        commit_run(self._output, result_parts, error_parts, self._embeddings, self._multi_label)
        seconds = time.time() - self._started_at
        summary = build_summary(
            inputs,
            results,
            errors,
            skipped,
            seconds,
            self._model,
            top_labels,
            self._output,
            unmatched_patterns(patterns),
            not_images,
            error_groups,
            resumed,
        )
        storage.write_atomic(
            storage.join(self._output, SUMMARY_FILE), json.dumps(summary, indent=2).encode("utf-8")
        )
        remove_partial(self._partial)  # after the commit point: the parts of every attempt
        yield summary
