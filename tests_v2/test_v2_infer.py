"""ModelInfer and ModelStreamInfer with numpy batches, raw and typed, through Triton's client."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

from tests_v2.conftest import MODEL, image_input, png_bytes
from training.data import CLASS_NAMES


def infer(server, metadata, values: np.ndarray, datatype: str = "UINT8", outputs=None, **options):
    tensor = image_input(metadata.inputs[0].name, values, datatype)
    return server.client.infer(MODEL, [tensor], outputs=outputs, **options)


def probabilities(server, metadata, values: np.ndarray, datatype: str = "UINT8") -> np.ndarray:
    return infer(server, metadata, values, datatype).as_numpy(metadata.outputs[0].name)


def typed_request(metadata, pixels: np.ndarray) -> service_pb2.ModelInferRequest:
    """A UINT8 request with typed contents (uint_contents), which tritonclient never sends."""
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name=metadata.inputs[0].name, datatype="UINT8", shape=pixels.shape)
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    return request


def test_raw_uint8_batch_returns_one_probability_row_per_image(server, metadata, test_slice):
    result = probabilities(server, metadata, test_slice.images[:16])
    assert result.shape == (16, len(CLASS_NAMES))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result.sum(axis=1), 1.0, atol=1e-4)


def test_raw_request_gets_raw_output_contents_for_every_output(server, metadata, test_slice):
    response = infer(server, metadata, test_slice.images[:2]).get_response()
    assert [len(raw) for raw in response.raw_output_contents] == [2 * len(CLASS_NAMES) * 4, 2 * 4, 2]
    assert not any(output.HasField("contents") for output in response.outputs)


def test_typed_uint8_contents_give_typed_outputs_equal_to_raw(server, metadata, test_slice):
    pixels = test_slice.images[:3]
    response = server.stub.ModelInfer(typed_request(metadata, pixels), timeout=10)
    assert not response.raw_output_contents
    output = response.outputs[0]
    assert (output.datatype, list(output.shape)) == ("FP32", [3, len(CLASS_NAMES)])
    typed = np.array(output.contents.fp32_contents, dtype=np.float32).reshape(3, -1)
    np.testing.assert_array_equal(typed, probabilities(server, metadata, pixels))


def test_fp32_pixels_scaled_to_unit_range_match_uint8(server, metadata, test_slice):
    pixels = test_slice.images[:4]
    as_float = probabilities(server, metadata, pixels.astype(np.float32) / 255.0, "FP32")
    np.testing.assert_array_equal(as_float, probabilities(server, metadata, pixels))


def test_bytes_input_of_encoded_pngs_matches_uint8(server, metadata, test_slice):
    pixels = test_slice.images[:4]
    encoded = np.array([png_bytes(p) for p in pixels], dtype=np.object_)
    np.testing.assert_array_equal(
        probabilities(server, metadata, encoded, "BYTES"), probabilities(server, metadata, pixels)
    )


def test_classification_extension_returns_top_k_score_index_label_best_first(server, metadata, test_slice):
    name = metadata.outputs[0].name
    pixels = test_slice.images[:5]
    full = probabilities(server, metadata, pixels)
    result = infer(server, metadata, pixels, outputs=[triton.InferRequestedOutput(name, class_count=3)])
    classes = result.as_numpy(name)
    assert classes.shape == (5, 3)
    for row, expected in zip(classes, full):
        entries = [entry.decode().split(":") for entry in row]
        indices = [int(index) for _, index, _ in entries]
        assert indices == list(np.argsort(-expected, kind="stable")[:3])
        assert [label for _, _, label in entries] == [CLASS_NAMES[i] for i in indices]
        assert [float(score) for score, _, _ in entries] == pytest.approx(expected[indices], abs=1e-6)


def test_classification_count_above_the_class_count_returns_every_class(server, metadata, test_slice):
    name = metadata.outputs[0].name
    result = infer(server, metadata, test_slice.images[:1], outputs=[triton.InferRequestedOutput(name, class_count=50)])
    assert result.as_numpy(name).shape == (1, len(CLASS_NAMES))


def test_batch_of_max_images_per_request_is_classified_in_one_call(start_server, metadata, test_slice):
    small = start_server("--max-images-per-request", "8")
    assert probabilities(small, metadata, test_slice.images[:8]).shape == (8, len(CLASS_NAMES))


def test_answer_echoes_the_request_id_and_names_the_version(server, metadata, test_slice):
    response = infer(server, metadata, test_slice.images[:1], request_id="req-42").get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-42", MODEL, "2")  # the newest


def test_an_explicit_model_version_is_served_beside_the_newest(start_server, metadata, test_slice):
    both = start_server("--version-policy", "all")
    assert infer(both, metadata, test_slice.images[:1], model_version="1").get_response().model_version == "1"
    assert infer(both, metadata, test_slice.images[:1]).get_response().model_version == "2"


class StreamResults:
    """Collects ModelStreamInfer callbacks in arrival order."""

    def __init__(self, server):
        self.client = server.client
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def take(self, count: int) -> list:
        answers = [self.answers.get(timeout=20) for _ in range(count)]
        self.client.stop_stream()
        return answers


def test_stream_answers_every_request_in_order(server, metadata, test_slice):
    stream = StreamResults(server)
    for index in range(6):
        tensor = image_input(metadata.inputs[0].name, test_slice.images[index:index + 2], "UINT8")
        server.client.async_stream_infer(MODEL, [tensor], request_id=f"s{index}")
    answers = stream.take(6)
    assert [error for _, error in answers] == [None] * 6
    assert [result.get_response().id for result, _ in answers] == [f"s{i}" for i in range(6)]
    expected = probabilities(server, metadata, test_slice.images[3:5])
    np.testing.assert_array_equal(answers[3][0].as_numpy(metadata.outputs[0].name), expected)


def test_stream_reports_a_bad_request_in_band_and_goes_on(server, metadata, test_slice):
    stream = StreamResults(server)
    bad = image_input(metadata.inputs[0].name, test_slice.images[:1, :16], "UINT8")  # 16 rows, not 32
    good = image_input(metadata.inputs[0].name, test_slice.images[:1], "UINT8")
    server.client.async_stream_infer(MODEL, [bad], request_id="bad")
    server.client.async_stream_infer(MODEL, [good], request_id="good")
    (_, error), (result, after) = stream.take(2)
    assert error is not None and "shape [1, 16, 32, 3]" in error.message()
    assert after is None and result.get_response().id == "good"


def test_v2_calls_are_counted_under_protocol_v2(server, metadata, test_slice):
    before = server.metric("classifier_requests_total", method="ModelInfer", protocol="v2", code="OK")
    images_before = server.metric("classifier_images_classified_total", model=MODEL)
    infer(server, metadata, test_slice.images[:3])
    counted = lambda: server.metric("classifier_requests_total", method="ModelInfer", protocol="v2", code="OK")  # noqa: E731
    server.wait_until("the call counted", lambda: counted() > before, timeout=5)  # just after its answer
    assert counted() == before + 1
    assert server.metric("classifier_images_classified_total", model=MODEL) == images_before + 3
