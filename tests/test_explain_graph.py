"""The explain graph of a whitened net (training/explain_graph.py): exported beside model.onnx,
checked against TensorFlow's own gradient, carried into the int8 copy's card, and served."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import WHITENED_INT8 as INT8
from tests.conftest import WHITENED_NAME as NAME
from tests.conftest import WHITENED_VERSION as VERSION
from tests.conftest import png_image

LAYERS = {"whiten_act": [31, 31, 24], "block1": [15, 15, 64], "block2": [7, 7, 256], "block3": [3, 3, 256]}


@pytest.fixture(scope="module")
def keras_model(whitened):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    import training.models  # noqa: F401 - registers the custom layers best.keras names
    from training.train import BEST

    return keras.saving.load_model(whitened[0] / BEST, compile=False)


def explain_session(repo) -> ort.InferenceSession:
    return ort.InferenceSession(str(repo / NAME / str(VERSION) / "explain.onnx"), providers=["CPUExecutionProvider"])


def test_the_explain_graphs_gradient_is_tensorflows_gradient_of_the_target_logit(whitened, keras_model, test_slice):
    import tensorflow as tf

    images = test_slice.images[:16]
    head = [keras_model.get_layer(name) for name in ("features", "head", "logits")]
    for target in (keras_model.predict(images, verbose=0).argmax(axis=1), np.arange(16) % 10):
        block3, gradient = explain_session(whitened[1]).run(["block3", "gradient"],
                                                            {"images": images, "target": target.astype(np.int32)})
        # TensorFlow's gradient at the explain graph's own activations (a channel's maximum is
        # where the gradient goes: at the same activations, it must be at the same cell).
        activations = tf.constant(block3)
        with tf.GradientTape() as tape:
            tape.watch(activations)
            logits = activations
            for layer in head:
                logits = layer(logits)
            score = tf.reduce_sum(tf.gather(logits, target, axis=1, batch_dims=1))
        expected = tape.gradient(score, activations).numpy()
        assert np.count_nonzero(expected) > 0
        np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-7)


def test_the_explain_graph_computes_what_the_model_and_its_layers_compute(whitened, keras_model, test_slice):
    import keras

    images = test_slice.images[:8]
    session = explain_session(whitened[1])
    outputs = ["probabilities", *LAYERS]
    got = dict(zip(outputs, session.run(outputs, {"images": images, "target": np.zeros(8, np.int32)})))
    model = ort.InferenceSession(str(whitened[1] / NAME / str(VERSION) / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got["probabilities"], model.run(["probabilities"], {"images": images})[0], atol=1e-5)
    taps = keras.Model(keras_model.inputs, [keras_model.get_layer(name).output for name in LAYERS])
    for name, expected in zip(LAYERS, taps.predict(images, verbose=0)):
        assert list(got[name].shape[1:]) == LAYERS[name]
        np.testing.assert_allclose(got[name], expected, atol=1e-4)


def test_the_card_describes_the_explain_graph_and_the_int8_card_offers_occlusion_only(whitened):
    repo = whitened[1]
    card = json.loads((repo / NAME / str(VERSION) / "model_card.json").read_text())["explain"]
    assert card["methods"] == ["occlusion", "grad_cam"] and card["graph"] == "explain.onnx"
    assert card["grad_cam_layer"] == "block3" and card["grad_cam_cell"] == {"stride": 8.0, "offset": 4.5}
    assert {layer["name"]: layer["shape"] for layer in card["layers"]} == LAYERS
    assert all(layer["model_tensor"] for layer in card["layers"])
    int8 = json.loads((repo / INT8 / str(VERSION) / "model_card.json").read_text())["explain"]
    assert int8["methods"] == ["occlusion"] and "graph" not in int8
    assert not (repo / INT8 / str(VERSION) / "explain.onnx").exists()


def test_a_whitened_model_is_explained_by_grad_cam_in_one_forward_pass(whitened, start_server, test_slice):
    srv = start_server("--default-model", NAME, repository=whitened[1])
    meta = srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=30)
    assert list(meta.explain_methods) == [pb.EXPLAIN_METHOD_OCCLUSION, pb.EXPLAIN_METHOD_GRAD_CAM]
    assert {layer.name: list(layer.shape) for layer in meta.explainable_layers} == LAYERS
    assert [layer.name for layer in meta.explainable_layers if layer.is_default] == ["block1", "block2"]
    reply = srv.stub.Explain(pb.ExplainRequest(image=png_image(test_slice.images[0]), target_class=3,
                                               method=pb.EXPLAIN_METHOD_GRAD_CAM, layers=list(LAYERS)), timeout=30)
    assert reply.method == pb.EXPLAIN_METHOD_GRAD_CAM and reply.forward_passes == 1 and reply.target_class == 3
    heatmap = np.array(reply.heatmap)
    assert heatmap.shape == (1024,) and heatmap.min() >= 0 and heatmap.max() <= 1
    assert {fm.layer: list(fm.shape) for fm in reply.feature_maps} == LAYERS
    expected = explain_session(whitened[1]).run(["block2"], {"images": test_slice.images[:1], "target": np.array([3], np.int32)})[0]
    block2 = next(fm for fm in reply.feature_maps if fm.layer == "block2")
    np.testing.assert_allclose(np.array(block2.values).reshape(7, 7, 256), expected[0], atol=1e-5)


def test_the_int8_copy_explains_by_occlusion_with_the_same_layers(whitened, start_server, test_slice):
    srv = start_server("--default-model", INT8, repository=whitened[1])
    meta = srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=30)
    assert list(meta.explain_methods) == [pb.EXPLAIN_METHOD_OCCLUSION]
    assert {layer.name: list(layer.shape) for layer in meta.explainable_layers} == LAYERS
    reply = srv.stub.Explain(pb.ExplainRequest(image=png_image(test_slice.images[0]), layers=list(LAYERS)), timeout=30)
    assert reply.method == pb.EXPLAIN_METHOD_OCCLUSION and len(reply.heatmap) == 1024
    assert {fm.layer: list(fm.shape) for fm in reply.feature_maps} == LAYERS
