"""The TFRecord example format with label sets: multi-hot reading, single-label files unchanged."""

from __future__ import annotations

import numpy as np

from beamvision.models.dataset import parse_example, serialize_example


def test_label_sets_read_as_multi_hot_and_single_labels_as_before(photo_batch):
    pixels = photo_batch(16)
    single = serialize_example(pixels[0], 2, "a.png")
    multi = serialize_example(pixels[1], [3, 0, 3], "b.png")

    image, label = parse_example(single, 16)
    assert int(label) == 2 and np.array_equal(image.numpy(), pixels[0])
    assert parse_example(single, 16, multi_hot_classes=4)[1].numpy().tolist() == [0, 0, 1, 0]
    image, hot = parse_example(multi, 16, multi_hot_classes=4)
    assert hot.numpy().tolist() == [1, 0, 0, 1] and np.array_equal(image.numpy(), pixels[1])
