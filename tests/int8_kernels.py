"""An INT8 OpenVINO model two ways: on this CPU's INT8 kernels, and in its exact arithmetic.

With the CPU plugin's low-precision transformations off (``EXACT``: the
plugin's own, undocumented switch), every FakeQuantize is computed in float
and no convolution runs on INT8 kernels: the model's exact arithmetic, as a
CPU with VNNI or AMX computes it, with no 16-bit sum to saturate. The tests
and ``benchmarks/int8.py`` compare the two.
"""

from __future__ import annotations

import numpy as np

EXACT = {"LP_TRANSFORMS_MODE": "NO"}
BATCH = 32


def compiled(model, config: dict):
    """``model`` (an ``ov.Model`` or an IR path) compiled for the CPU at fp32 with ``config``, and how
    many of its convolutions run on INT8 kernels (none, with ``EXACT``: the check that the switch took)."""
    import openvino as ov

    result = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **config})
    integer = 0
    for op in result.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, precision = (
            info[key].astype(str) if key in info else "" for key in ("layerType", "runtimePrecision")
        )
        integer += kind == "Convolution" and precision in ("u8", "i8")
    return result, integer


def probabilities(model, images: np.ndarray, config: dict) -> np.ndarray:
    """The model's ``probabilities`` on uint8 ``images``, compiled with ``config``."""
    from beamvision.models.artifact import PROBABILITIES

    ready, _ = compiled(model, config)
    output = ready.output(PROBABILITIES)
    return np.concatenate([ready(images[i : i + BATCH])[output] for i in range(0, len(images), BATCH)])
