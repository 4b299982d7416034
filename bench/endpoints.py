"""What the load generators send: real CIFAR-10 test images as pre-serialized gRPC requests.

Requests are serialized once, before the clock starts, and responses are left as bytes while
measuring (a sample is decoded afterwards to check the answers), so the load generator spends
its CPU on gRPC, not protobuf: on a 2-core machine the client shares the cores with the server.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
from PIL import Image

from bench import v2proto
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from training import data as cifar

NATIVE_CLASSIFY = "/cifar10.classifier.v1.Classifier/Classify"
NATIVE_CLASSIFY_BATCH = "/cifar10.classifier.v1.Classifier/ClassifyBatch"
NATIVE_CLASSIFY_STREAM = "/cifar10.classifier.v1.Classifier/ClassifyStream"
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class Endpoint:
    """One API method with its request payloads (cycled) and how to read a response's top-1 class."""

    protocol: str  # "native" | "v2"
    input_form: str  # "raw" | "png"
    method: str
    requests: list[bytes]
    labels: np.ndarray  # true class of requests[i] (of its first image, for batch requests)
    top1_of: Callable[[bytes], int]  # of the first image, for batch requests
    images_per_request: int = 1
    # Streaming methods: requests are messages of long-lived streams, and a message that fails
    # answers in-band; error_of reads (status code name, message) from such an answer, or None.
    streaming: bool = False
    error_of: Callable[[bytes], tuple[str, str] | None] | None = None

    def accuracy(self, responses: list[tuple[int, bytes]]) -> float:
        """Top-1 agreement with the labels over (request index, response bytes) samples."""
        if not responses:
            return float("nan")
        hits = sum(self.top1_of(body) == int(self.labels[i % len(self.labels)]) for i, body in responses)
        return hits / len(responses)


def cifar_test_images(count: int, data_dir: Path | None = None) -> cifar.Split:
    """The first `count` CIFAR-10 test images (rows 0..1016 are bit-exact pixels)."""
    directory = data_dir or cifar.default_data_dir()
    if directory is None:
        raise SystemExit("CIFAR-10 not found: set CIFAR10_DIR or place it at ../shared/data/cifar-10-batches-py")
    return cifar.read_batch(Path(directory) / cifar.TEST_FILE).take(slice(0, count))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(pixels: np.ndarray, input_form: str) -> pb.Image:
    """`raw` (uint8 HWC, the model's own input), `png`, or `tensor` (float32 in [0, 1], NHWC)."""
    if input_form == "png":
        return pb.Image(encoded=png_bytes(pixels))
    if input_form == "tensor":
        return pb.Image(tensor=pb.FloatTensor(data=(pixels.astype(np.float32) / 255.0).ravel(),
                                              shape=list(pixels.shape), layout=pb.LAYOUT_NHWC))
    height, width, channels = pixels.shape
    return pb.Image(raw=pb.RawPixels(data=pixels.tobytes(), height=height, width=width, channels=channels))


def native_endpoint(images: cifar.Split, input_form: str, model_name: str = "") -> Endpoint:
    requests = [pb.ClassifyRequest(image=image_message(p, input_form), model_name=model_name).SerializeToString()
                for p in images.images]

    def top1_of(body: bytes) -> int:
        return pb.ClassifyResponse.FromString(body).predictions[0].class_index

    return Endpoint("native", input_form, NATIVE_CLASSIFY, requests, images.labels, top1_of)


def native_stream_endpoint(unary: Endpoint) -> Endpoint:
    """ClassifyStream with the very ClassifyRequest messages of a native Classify endpoint, sent on
    long-lived streams (the load generator keeps a few in flight per stream); a bad message answers
    in-band."""

    def top1_of(body: bytes) -> int:
        return pb.ClassifyStreamResponse.FromString(body).response.predictions[0].class_index

    def error_of(body: bytes) -> tuple[str, str] | None:
        answer = pb.ClassifyStreamResponse.FromString(body)
        if not answer.error.code:
            return None
        return STATUS_NAMES.get(answer.error.code, str(answer.error.code)), answer.error.message

    return replace(unary, method=NATIVE_CLASSIFY_STREAM, top1_of=top1_of, streaming=True, error_of=error_of)


def health_check_endpoint() -> Endpoint:
    """grpc.health.v1 Check: a round trip through the same client, channel and server with no
    image and no inference, i.e. the floor that per-call gRPC costs put under every latency."""
    return Endpoint("grpc", "none", "/grpc.health.v1.Health/Check", [b""], np.zeros(1, dtype=np.int64), lambda body: 0)


def native_batch_endpoint(images: cifar.Split, images_per_request: int, model_name: str = "") -> Endpoint:
    """ClassifyBatch with `images_per_request` consecutive raw images per call (client-side batching)."""
    starts = range(0, len(images.images) - images_per_request + 1, images_per_request)
    requests = [pb.ClassifyBatchRequest(
        images=[image_message(p, "raw") for p in images.images[start:start + images_per_request]],
        model_name=model_name, top_k=1,
    ).SerializeToString() for start in starts]

    def top1_of(body: bytes) -> int:
        return pb.ClassifyBatchResponse.FromString(body).results[0].predictions[0].class_index

    labels = np.asarray([images.labels[start] for start in starts])
    return Endpoint("native", "raw", NATIVE_CLASSIFY_BATCH, requests, labels, top1_of, images_per_request)


def v2_endpoint(images: cifar.Split, channel: grpc.Channel, model_name: str, v2) -> Endpoint:
    """ModelInfer with one uint8 [1, 32, 32, 3] image in raw_input_contents (both servers accept it).

    The input's name and datatype come from the server's ModelMetadata, as a V2 client would do.
    """
    metadata_call = channel.unary_unary(
        v2proto.method("ModelMetadata"), request_serializer=v2.ModelMetadataRequest.SerializeToString,
        response_deserializer=v2.ModelMetadataResponse.FromString,
    )
    metadata = metadata_call(v2.ModelMetadataRequest(name=model_name), timeout=10)
    tensor = metadata.inputs[0] if metadata.inputs else None
    input_name = tensor.name if tensor and tensor.name else "images"
    datatype = tensor.datatype if tensor and tensor.datatype else "UINT8"
    requests = []
    for pixels in images.images:
        values = pixels if datatype == "UINT8" else (pixels.astype(np.float32) / 255.0)
        request = v2.ModelInferRequest(model_name=model_name)
        request.inputs.add(name=input_name, datatype=datatype, shape=[1, *pixels.shape])
        request.raw_input_contents.append(np.ascontiguousarray(values).tobytes())
        requests.append(request.SerializeToString())

    def top1_of(body: bytes) -> int:
        response = v2.ModelInferResponse.FromString(body)
        if response.raw_output_contents:
            scores = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        else:
            scores = np.asarray(response.outputs[0].contents.fp32_contents, dtype=np.float32)
        return int(np.argmax(scores))

    return Endpoint("v2", "raw", v2proto.method("ModelInfer"), requests, images.labels, top1_of)
