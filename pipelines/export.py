"""``beamvision export``: pack an architecture and its weights into a model artifact.

beamvision export --architecture mobilenet_v2 --weights imagenet --output gs://b/models/mnv2
"""

from __future__ import annotations

import tempfile
import time

from beamvision.models import create_model
from beamvision.models.artifact import Manifest, new_manifest, save_artifact
from beamvision.models.labels import imagenet_labels, numbered_labels, read_labels_file
from beamvision.pipelines import options
from beamvision.transforms.engines import engine_files


def run(argv: list[str] | None = None) -> Manifest:
    """Exports the artifact that ``argv`` describes and prints a summary.

    Returns:
        The manifest as written.
    """
    args = options.parse("beamvision export", __doc__.splitlines()[0], options.add_export_arguments, argv)
    config = options.ExportConfig.from_args(args)
    labels = _labels(config)
    started = time.monotonic()
    print(
        f"building {config.architecture} at {config.input_size}px, {len(labels)} classes, "
        f"weights {config.weights or 'none'} ...",
        flush=True,
    )
    model = create_model(config.architecture, len(labels), config.input_size, config.weights)
    weights = {None: "none", "imagenet": "imagenet"}.get(config.weights, f"file:{config.weights}")
    manifest = new_manifest(
        model, config.architecture, labels, weights, name=config.name, version=config.version
    )
    with tempfile.TemporaryDirectory() as converted:
        extra = engine_files(model, manifest, config.engines, converted)
        manifest = save_artifact(model, manifest, config.output, config.overwrite, extra_files=extra)
    megabytes = manifest.files["model.keras"]["bytes"] / 1e6
    print(
        f"exported {manifest.name} version {manifest.version}: {config.architecture}, "
        f"{model.count_params():,} parameters, {megabytes:.1f} MB, to {config.output} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return manifest


def _labels(config: options.ExportConfig) -> list[str]:
    if config.labels_source == "imagenet":
        return list(imagenet_labels())
    if config.labels_source is not None:
        try:
            return read_labels_file(config.labels_source)
        except ValueError as exc:
            raise options.UsageError(f"--labels {config.labels_source}: {exc}") from None
    return numbered_labels(config.num_classes)
