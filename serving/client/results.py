"""What the client API returns: plain Python values read out of the protos, and its one error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Prediction:
    label: str
    class_index: int
    probability: float  # calibrated (docs/trust.md)


def predictions_of(predictions) -> tuple[Prediction, ...]:
    return tuple(Prediction(p.label, p.class_index, p.probability) for p in predictions)


@dataclass(frozen=True)
class Classification:
    """One image's answer: the top-k predictions, highest first, and who answered."""

    predictions: tuple[Prediction, ...]
    model: str
    version: int
    version_label: str  # the label that chose `version` (e.g. "stable"); "" when none did
    unsure: bool  # the image does not look like the training data: the top-1 is not worth its probability
    unsure_score: float
    request_id: str

    @property
    def label(self) -> str:
        return self.predictions[0].label

    @property
    def class_index(self) -> int:
        return self.predictions[0].class_index

    @property
    def probability(self) -> float:
        return self.predictions[0].probability

    @classmethod
    def from_response(cls, response: pb.ClassifyResponse) -> Classification:
        return cls(predictions_of(response.predictions), response.model_name, response.model_version,
                   response.version_label, response.unsure, response.unsure_score, response.request_id)


class RequestError(Exception):
    """A request that failed: the gRPC status (`code`, `message`) once the retries were spent.

    `code` is None when the client could not even send it (an unreadable file, an array that
    is no image, a message over the size limit); `message` then says why.
    """

    def __init__(self, code: grpc.StatusCode | None, message: str, retry_after_ms: int | None = None,
                 attempts: int = 0):
        super().__init__(code, message)
        self.code, self.message = code, message
        self.retry_after_ms = retry_after_ms  # the server's back-off hint, when it gave one
        self.attempts = attempts  # calls made for it (0: never sent)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.code is not None else self.message

    @classmethod
    def of_status(cls, code: int, message: str, retry_after_ms: int | None = None) -> RequestError:
        return cls(STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN), message, retry_after_ms)


@dataclass(frozen=True)
class Result:
    """One image of classify_many, in input order: its classification, or the error that ended it."""

    input: Any  # the item as given: a path, bytes, an array...
    classification: Classification | None = None
    error: RequestError | None = None
    attempts: int = 0  # messages sent for it (more than 1 after retries; 0 if it never left)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FeatureMap:
    layer: str
    values: np.ndarray  # float32 [height, width, channels]
    png: bytes  # one tile per channel (empty when images were omitted)


@dataclass(frozen=True)
class Explanation:
    """What Explain answers (docs/explain.md): the predictions, a heatmap for one class, feature maps."""

    predictions: tuple[Prediction, ...]
    target_class: int
    target_label: str
    method: str  # "occlusion" or "grad_cam"
    heatmap: np.ndarray  # float32 [32, 32] in [0, 1]: each pixel's saliency for the target class
    heatmap_png: bytes  # the image upscaled x8 with the heatmap overlaid (empty when images were omitted)
    feature_maps: tuple[FeatureMap, ...]
    forward_passes: int
    model: str
    version: int
    request_id: str

    @classmethod
    def from_response(cls, response: pb.ExplainResponse) -> Explanation:
        side = int(round(len(response.heatmap) ** 0.5))
        maps = tuple(FeatureMap(fm.layer, np.asarray(fm.values, dtype=np.float32).reshape(tuple(fm.shape)), fm.png)
                     for fm in response.feature_maps)
        return cls(
            predictions_of(response.predictions), response.target_class, response.target_label,
            pb.ExplainMethod.Name(response.method).removeprefix("EXPLAIN_METHOD_").lower(),
            np.asarray(response.heatmap, dtype=np.float32).reshape(side, side), response.heatmap_png, maps,
            response.forward_passes, response.model_name, response.model_version, response.request_id,
        )
