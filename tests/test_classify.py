"""The Classifier API on real CIFAR-10 images: every input form, top-k, batch, stream."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from serving.batching import BatchResult
from serving.metrics import ServingMetrics
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.repository import ServedVersion, VersionState
from serving.runtime import OnnxModel, RuntimeOptions
from serving.service import InferenceCore, InferenceOutcome
from tests.conftest import DEFAULT_MODEL, SHIPPED_MODELS, encode, png_image, raw_image
from training.data import CLASS_NAMES


def classify(server, image: pb.Image, **fields) -> pb.ClassifyResponse:
    return server.stub.Classify(pb.ClassifyRequest(image=image, **fields), timeout=10)


def probabilities(response: pb.ClassifyResponse) -> dict[int, float]:
    return {p.class_index: p.probability for p in response.predictions}


def test_classifies_real_test_images_with_the_model_card_accuracy(server, test_slice):
    images = test_slice.take(slice(0, 100))
    predicted = [classify(server, png_image(px)).predictions[0].class_index for px in images.images]
    assert np.mean(np.array(predicted) == images.labels) >= 0.80


def test_answer_names_the_model_and_version_that_answered(server, test_slice):
    response = classify(server, png_image(test_slice.images[0]))
    assert response.model_name == DEFAULT_MODEL
    assert response.model_version >= 1


def test_unset_top_k_returns_five_predictions_best_first(server, test_slice):
    response = classify(server, png_image(test_slice.images[0]))
    probs = [p.probability for p in response.predictions]
    assert len(probs) == 5
    assert probs == sorted(probs, reverse=True)
    assert all(p.label == CLASS_NAMES[p.class_index] for p in response.predictions)


def test_explicit_top_k_is_honoured(server, test_slice):
    response = classify(server, png_image(test_slice.images[0]), top_k=10)
    assert len(response.predictions) == 10
    assert sum(p.probability for p in response.predictions) == pytest.approx(1.0, abs=1e-4)


def test_raw_pixels_and_png_give_identical_answers(server, test_slice):
    pixels = test_slice.images[1]
    assert probabilities(classify(server, raw_image(pixels))) == probabilities(classify(server, png_image(pixels)))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_float_tensors_in_either_layout_match_raw_pixels(server, test_slice, layout):
    pixels = test_slice.images[2]
    values = pixels.astype(np.float32) / 255.0
    if layout == "NCHW":
        values, shape, enum = values.transpose(2, 0, 1), [3, 32, 32], pb.LAYOUT_NCHW
    else:
        shape, enum = [32, 32, 3], pb.LAYOUT_NHWC
    tensor = pb.FloatTensor(data=values.ravel().tolist(), shape=shape, layout=enum)
    assert probabilities(classify(server, pb.Image(tensor=tensor))) == pytest.approx(
        probabilities(classify(server, raw_image(pixels)))
    )


@pytest.mark.parametrize("fmt,options", [("JPEG", {"quality": 95}), ("BMP", {}), ("GIF", {})])
def test_other_encodings_are_decoded(server, test_slice, fmt, options):
    pixels = test_slice.images[3]
    response = classify(server, pb.Image(encoded=encode(pixels, fmt, **options)))
    assert len(response.predictions) == 5


def test_larger_images_are_resized_to_32x32(server, test_slice):
    big = np.kron(test_slice.images[4], np.ones((4, 4, 1), dtype=np.uint8))  # 128x128, same picture
    assert classify(server, png_image(big)).predictions[0].class_index == \
        classify(server, png_image(test_slice.images[4])).predictions[0].class_index


def test_grey_rgba_and_palette_images_are_converted_to_rgb(server, test_slice):
    from PIL import Image

    base = Image.fromarray(test_slice.images[5])
    for mode in ("L", "RGBA", "P", "I;16"):
        converted = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
        import io

        buffer = io.BytesIO()
        converted.save(buffer, format="PNG")
        assert len(classify(server, pb.Image(encoded=buffer.getvalue())).predictions) == 5, mode


def test_batch_answers_in_request_order(server, test_slice):
    images = test_slice.images[:16]
    request = pb.ClassifyBatchRequest(images=[raw_image(px) for px in images], top_k=1)
    response = server.stub.ClassifyBatch(request, timeout=10)
    singles = [classify(server, raw_image(px), top_k=1).predictions[0] for px in images]
    assert [r.predictions[0].class_index for r in response.results] == [s.class_index for s in singles]
    assert [r.predictions[0].probability for r in response.results] == pytest.approx([s.probability for s in singles])


def test_one_bad_image_fails_only_its_slot_of_a_batch(server, test_slice):
    images = [raw_image(test_slice.images[0]), pb.Image(encoded=b"not an image"), raw_image(test_slice.images[1])]
    response = server.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=images), timeout=10)
    assert [r.error.code for r in response.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "image 1" in response.results[1].error.message
    assert len(response.results[0].predictions) == 5 and len(response.results[2].predictions) == 5
    assert not response.results[1].predictions


def test_stream_answers_every_message_in_order(server, test_slice):
    images = test_slice.images[:40]
    requests = [pb.ClassifyRequest(image=raw_image(px), top_k=1, request_id=f"r{i}") for i, px in enumerate(images)]
    responses = list(server.stub.ClassifyStream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(40)]
    expected = [classify(server, raw_image(px), top_k=1).predictions[0].class_index for px in images]
    assert [r.response.predictions[0].class_index for r in responses] == expected


def test_a_bad_stream_message_gets_its_own_error_and_the_stream_goes_on(server, test_slice):
    requests = [
        pb.ClassifyRequest(image=raw_image(test_slice.images[0]), request_id="good-1"),
        pb.ClassifyRequest(image=pb.Image(encoded=b"\x89PNG garbage"), request_id="bad"),
        pb.ClassifyRequest(image=raw_image(test_slice.images[1]), top_k=0, request_id="bad-top-k"),
        pb.ClassifyRequest(image=raw_image(test_slice.images[1]), request_id="good-2"),
    ]
    responses = list(server.stub.ClassifyStream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == ["good-1", "bad", "bad-top-k", "good-2"]
    assert [r.error.code for r in responses] == [0, 3, 3, 0]
    assert "top_k" in responses[2].error.message
    assert len(responses[3].response.predictions) == 5


def test_request_id_is_echoed(server, test_slice):
    assert classify(server, raw_image(test_slice.images[0]), request_id="abc-123").request_id == "abc-123"


def test_request_id_comes_from_x_request_id_metadata_when_the_field_is_empty(server, test_slice):
    request = pb.ClassifyRequest(image=raw_image(test_slice.images[0]))
    reply = server.stub.Classify(request, metadata=[("x-request-id", "from-metadata")], timeout=10)
    assert reply.request_id == "from-metadata"


def test_a_request_without_an_id_gets_a_generated_one_of_its_own(server, test_slice):
    ids = {classify(server, raw_image(test_slice.images[0])).request_id for _ in range(20)}
    assert len(ids) == 20 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids), ids


def test_ranking_puts_the_lower_class_index_first_among_equal_probabilities():
    directory = SHIPPED_MODELS / DEFAULT_MODEL / "1"
    served = ServedVersion(DEFAULT_MODEL, 1, directory, VersionState.AVAILABLE,
                           model=OnnxModel(DEFAULT_MODEL, 1, directory, RuntimeOptions(intra_op_threads=1)))
    tied = np.array([[0.05, 0.3, 0.05, 0.3, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0],
                     [0.1] * 10], dtype=np.float32)
    outcome = InferenceOutcome(served, BatchResult((tied, np.zeros(len(tied), np.float32)), 0.0, 0.0, len(tied)))
    ranked = InferenceCore(None, ServingMetrics(CollectorRegistry())).top_k(outcome, 4)
    assert [[c.class_index for c in row] for row in ranked] == [[1, 3, 5, 0], [0, 1, 2, 3]]
    assert ranked[0][0].probability == float(np.float32(0.3)) and ranked[0][0].label == CLASS_NAMES[1]
