"""Every bad request gets the status code a Triton/KServe client expects, naming the tensor."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

from tests_v2.conftest import MODEL, expect_error, image_input, png_bytes


def infer_call(server, metadata, values: np.ndarray, datatype: str = "UINT8", input_name: str | None = None,
               model: str = MODEL, **options):
    tensor = image_input(input_name or metadata.inputs[0].name, values, datatype)
    return lambda: server.client.infer(model, [tensor], **options)


@pytest.fixture(scope="module")
def pixels(test_slice) -> np.ndarray:
    return test_slice.images[:2]


def test_wrong_shape_is_invalid_argument_naming_the_input(server, metadata, pixels):
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, pixels.transpose(0, 3, 1, 2).copy()),
                 f"input '{metadata.inputs[0].name}'", "[2, 3, 32, 32]", "[-1, 32, 32, 3]")


def test_image_without_a_batch_dimension_is_invalid_argument(server, metadata, pixels):
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, pixels[0]), "[32, 32, 3]")


def test_unsupported_datatype_is_invalid_argument_naming_what_is_accepted(server, metadata, pixels):
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, pixels.astype(np.int32), "INT32"),
                 "'INT32'", "UINT8", "FP32", "BYTES")


def test_raw_contents_of_the_wrong_byte_length_are_invalid_argument(server, metadata, pixels):
    tensor = image_input(metadata.inputs[0].name, pixels[:1], "UINT8")
    tensor.set_shape([2, 32, 32, 3])  # one image's bytes for a declared batch of two
    expect_error("INVALID_ARGUMENT", lambda: server.client.infer(MODEL, [tensor]),
                 "holds 3072 bytes, expected 6144")


def test_typed_contents_with_too_few_values_are_invalid_argument(server, metadata, pixels):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name=metadata.inputs[0].name, datatype="UINT8", shape=[1, 32, 32, 3])
    tensor.contents.uint_contents.extend([0] * 100)
    with pytest.raises(grpc.RpcError) as caught:
        server.stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "uint_contents holds 100 values, expected 3072" in caught.value.details()


def test_unknown_input_name_is_invalid_argument_naming_both(server, metadata, pixels):
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, pixels, input_name="pixels"),
                 "'pixels'", f"'{metadata.inputs[0].name}'")


def test_unknown_output_name_is_invalid_argument(server, metadata, pixels):
    call = infer_call(server, metadata, pixels, outputs=[triton.InferRequestedOutput("logits")])
    expect_error("INVALID_ARGUMENT", call, "'logits'", f"'{metadata.outputs[0].name}'")


def test_classification_count_below_one_is_invalid_argument(server, metadata, pixels):
    output = triton.InferRequestedOutput(metadata.outputs[0].name, class_count=-2)
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, pixels, outputs=[output]), "classification count is -2")


@pytest.mark.parametrize("scale", [255.0, -1.0])
def test_fp32_pixels_outside_the_unit_range_are_invalid_argument(server, metadata, pixels, scale):
    values = pixels.astype(np.float32) / 255.0 * scale
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, values, "FP32"), "expected pixels scaled to [0, 1]")


def test_fp32_nan_is_invalid_argument(server, metadata, pixels):
    values = pixels.astype(np.float32) / 255.0
    values[1, 5, 5, 0] = np.nan
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, values, "FP32"), "NaN")


def test_undecodable_bytes_element_is_invalid_argument_naming_the_element(server, metadata):
    encoded = np.array([png_bytes(np.zeros((32, 32, 3), np.uint8)), b"not an image"], dtype=np.object_)
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, encoded, "BYTES"),
                 f"input '{metadata.inputs[0].name}' element 1", "not a PNG")


def test_batch_over_max_images_per_request_is_invalid_argument(start_server, metadata, test_slice):
    small = start_server("--max-images-per-request", "8")
    expect_error("INVALID_ARGUMENT", infer_call(small, metadata, test_slice.images[:9]),
                 "batch of 9 images", "--max-images-per-request")


def test_unknown_model_is_not_found(server, metadata, pixels):
    expect_error("NOT_FOUND", infer_call(server, metadata, pixels, model="resnet50"), "'resnet50'")


def test_unknown_version_is_not_found(server, metadata, pixels):
    expect_error("NOT_FOUND", infer_call(server, metadata, pixels, model_version="7"), "no version 7")


def test_a_version_that_is_neither_a_number_nor_a_label_is_invalid_argument(server, metadata, pixels):
    expect_error("INVALID_ARGUMENT", infer_call(server, metadata, pixels, model_version="1.5"), "'1.5'",
                 "neither a version number nor a version label")


def test_an_unknown_version_label_is_not_found(server, metadata, pixels):
    expect_error("NOT_FOUND", infer_call(server, metadata, pixels, model_version="latest"),
                 "no version label 'latest'")


def test_metadata_of_an_unknown_model_is_not_found(server):
    expect_error("NOT_FOUND", lambda: server.client.get_model_metadata("resnet50"), "'resnet50'")


def test_rejections_are_counted_under_protocol_v2(server, metadata, pixels):
    before = server.metric("classifier_rejected_requests_total", protocol="v2", reason="bad_shape")
    with pytest.raises(Exception):
        infer_call(server, metadata, pixels[0])()
    assert server.metric("classifier_rejected_requests_total", protocol="v2", reason="bad_shape") == before + 1
