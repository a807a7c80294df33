"""The architecture registry: reference parameter counts, small-size forward passes, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras.applications import imagenet_utils

from beamvision.models import ArchitectureSpec, ModelError, create_model, get_spec, list_models, register
from beamvision.models.alexnet import AdaptivePool
from beamvision.models.preprocessing import PREPROCESSING_MODES, Preprocess
from beamvision.models.small_inputs import MIN_FEATURE_SIDE, downsampling_stages, final_side

# Published parameter counts at the default input size with 1,000 classes
# (Keras applications' documentation; torchvision for AlexNet and SqueezeNet 1.1).
REFERENCE_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet50": 25_636_712,
    "inception_v3": 23_851_784,
    "densenet121": 8_062_504,
    "xception": 22_910_480,
    "mobilenet_v1": 4_253_864,
    "mobilenet_v2": 3_538_984,
    "squeezenet": 1_235_496,
}


def test_the_nine_seed_architectures_are_registered():
    assert set(REFERENCE_PARAMS) <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_reference(name):
    spec = get_spec(name)
    model = create_model(name)
    assert model.input_shape == (None, spec.default_input_size, spec.default_input_size, 3)
    assert model.count_params() == REFERENCE_PARAMS[name]
    assert spec.params == REFERENCE_PARAMS[name]
    keras.backend.clear_session()


@pytest.mark.parametrize("name", list_models())
def test_forward_pass_at_minimum_size_gives_probabilities(name, photo_batch):
    spec = get_spec(name)
    model = create_model(name, num_classes=7, input_size=spec.min_input_size)
    images = photo_batch(spec.min_input_size)
    assert model.inputs[0].dtype == "uint8"
    probs = model.predict(images, verbose=0)
    assert probs.shape == (len(images), 7)
    assert probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The embedding rule: the classifier's input, pooled, is a flat feature vector.
    assert model.get_layer(spec.classifier_layer).input.shape[-1] > 7
    # Even at its smallest size, the network pools a feature map, not a single pixel.
    assert final_side(model) >= MIN_FEATURE_SIDE
    keras.backend.clear_session()


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "densenet121", "squeezenet", "alexnet"])
def test_a_small_input_halves_the_first_strides_and_keeps_every_weight(name, photo_batch):
    spec = get_spec(name)
    size = max(spec.min_input_size, 32)
    stock = spec.builder(keras.Input((size, size, 3)), 5, None)
    model = create_model(name, 5, size)
    assert final_side(stock) < MIN_FEATURE_SIDE <= final_side(model)
    # Strides hold no weights: the same layers, names and shapes; the first stages read a larger map.
    assert [(w.path, w.shape) for w in model.weights] == [(w.path, w.shape) for w in stock.weights]
    first, last = downsampling_stages(stock)[0], downsampling_stages(stock)[-1]
    assert all(max(model.get_layer(n).strides) < max(stock.get_layer(n).strides) for n in first)
    assert all(model.get_layer(n).strides == stock.get_layer(n).strides for n in last)
    model.set_weights(stock.get_weights())  # a stock network's weights load as they are
    probs = model.predict(photo_batch(size), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    keras.backend.clear_session()


def test_a_network_at_its_own_size_is_the_stock_network():
    stock = keras.applications.MobileNetV2(weights=None, input_shape=(128, 128, 3), classes=5)
    model = create_model("mobilenet_v2", 5, 128)
    assert final_side(model) == final_side(stock) == MIN_FEATURE_SIDE
    assert [layer.get_config().get("strides") for layer in model.layers[2:]] == [
        layer.get_config().get("strides") for layer in stock.layers[1:]
    ]
    keras.backend.clear_session()


@pytest.mark.parametrize("name", list_models())
def test_below_minimum_input_size_is_refused(name):
    spec = get_spec(name)
    with pytest.raises(ModelError, match=f"input_size {spec.min_input_size - 1}: {name} needs at least"):
        create_model(name, input_size=spec.min_input_size - 1)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ModelError) as excinfo:
        get_spec("resnet9000")
    message = str(excinfo.value)
    assert "resnet9000" in message
    assert all(name in message for name in list_models())


def test_bad_arguments_are_refused():
    with pytest.raises(ModelError, match="num_classes 0: must be a positive integer"):
        create_model("squeezenet", num_classes=0, input_size=32)
    with pytest.raises(ModelError, match="no ImageNet weights are published for alexnet"):
        create_model("alexnet", weights="imagenet")
    with pytest.raises(
        ModelError, match="num_classes 10: ImageNet weights for mobilenet_v2 have 1000 classes"
    ):
        create_model("mobilenet_v2", num_classes=10, weights="imagenet")
    with pytest.raises(ModelError, match="input_size 96: ImageNet weights for mobilenet_v2 need 224"):
        create_model("mobilenet_v2", input_size=96, weights="imagenet")
    with pytest.raises(ModelError, match="weights file not found"):
        create_model("squeezenet", input_size=32, weights="/nonexistent/w.weights.h5")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register(get_spec("vgg16"))


def test_spec_validates_its_fields():
    spec = get_spec("vgg16")
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        ArchitectureSpec(**{**spec.__dict__, "name": "x", "preprocessing": "bgr"})
    with pytest.raises(ValueError, match="min_input_size must be positive"):
        ArchitectureSpec(**{**spec.__dict__, "name": "x", "min_input_size": 500})


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch"])
def test_in_graph_preprocessing_equals_keras_preprocess_input(mode, photo_batch):
    images = photo_batch(48)
    ours = keras.ops.convert_to_numpy(Preprocess(mode)(images))
    reference = imagenet_utils.preprocess_input(images.astype("float32"), mode=mode)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)


def test_imported_models_preprocessing_modes_scale_pixels(photo_batch):
    images = photo_batch(48)
    assert {"tf", "caffe", "torch", "unit", "none"} <= set(PREPROCESSING_MODES)
    assert all(PREPROCESSING_MODES.values())  # each mode is described
    np.testing.assert_allclose(keras.ops.convert_to_numpy(Preprocess("none")(images)), images)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(Preprocess("unit")(images)), images / 255.0, rtol=1e-6
    )


def test_adaptive_pool_equals_keras_where_keras_can_pool(photo_batch):
    features = photo_batch(13).astype("float32")
    ours = keras.ops.convert_to_numpy(AdaptivePool(6)(features))
    theirs = keras.ops.convert_to_numpy(keras.layers.AdaptiveAveragePooling2D(6)(features))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_adaptive_pool_enlarges_small_maps_like_torch():
    # torch.nn.functional.adaptive_avg_pool2d(2x2 -> 6x6) repeats each cell 3x3.
    grid = np.arange(4, dtype="float32").reshape(1, 2, 2, 1)
    out = keras.ops.convert_to_numpy(AdaptivePool(6)(grid))[0, :, :, 0]
    np.testing.assert_array_equal(out, np.kron(grid[0, :, :, 0], np.ones((3, 3))))


def test_squeezenet_pools_with_torchvision_ceil_mode():
    model = create_model("squeezenet")
    # torchvision squeezenet1_1 feature maps at 224 px: 111 -> 55 -> 27 -> 13.
    assert [model.get_layer(f"pool{i}").output.shape[1] for i in (1, 2, 3)] == [55, 27, 13]


def test_a_multi_label_head_scores_each_class_on_its_own(photo_batch):
    """with_new_head(multi_label=True) ends in sigmoid (scores need not sum to 1); softmax is the default."""
    from beamvision.models.training import with_new_head

    base = create_model("squeezenet", num_classes=3, input_size=48)
    spec = get_spec("squeezenet")
    images = photo_batch(48)
    single = with_new_head(base, spec.classifier_layer, 3).predict(images, verbose=0)
    multi = with_new_head(base, spec.classifier_layer, 3, multi_label=True)
    scores = multi.predict(images, verbose=0)
    assert np.allclose(single.sum(axis=1), 1.0, atol=1e-5)
    assert multi.get_layer(spec.classifier_layer).get_config()["activation"] == "sigmoid"
    assert not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    assert np.all((scores > 0) & (scores < 1))


def test_a_new_head_replaces_an_earlier_new_head_whole(photo_batch):
    """A model trained from an artifact (or multi-label) already ends in with_new_head's layers.

    Round two of a labelling loop starts from it: the new head replaces that
    one (Keras refuses a model with two layers of one name).
    """
    from beamvision.models.training import HEAD_DROPOUT, HEAD_POOL, with_new_head

    spec = get_spec("squeezenet")
    first = with_new_head(create_model("squeezenet", 3, 48), spec.classifier_layer, 3, multi_label=True)
    second = with_new_head(first, spec.classifier_layer, 2)
    names = [layer.name for layer in second.layers]
    assert names.count(HEAD_DROPOUT) == 1 and names.count(HEAD_POOL) == 1
    assert second.output_shape == (None, 2)
    scores = second.predict(photo_batch(48), verbose=0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
