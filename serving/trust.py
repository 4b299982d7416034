"""What an answer is worth: calibrated probabilities and the unsure flag, as the model card
says to compute them. No gRPC here.

The card's `calibration` block (fitted on the validation split at export, training/trust.py)
maps the graph's probabilities p to softmax(scale * log p + shift): temperature scaling
(scale 1/T, no shift) or vector scaling (a scale and a shift per class). The calibrated value
replaces the raw one everywhere it is served.

The card's `unsure` block names the score (a graph output such as `unsure_score`, higher is
less like the training data, or `max_probability`: 1 - the calibrated top-1 probability) and
the threshold above which an answer is flagged, chosen on validation. A request may pass its
own threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.batching import Rows
from serving.drift import DriftWindow
from serving.errors import InvalidInput
from serving.runtime import OnnxModel

MAX_PROBABILITY = "max_probability"
# A card without an `unsure` block (a model exported before trust scores existed, a test
# model): unsure when the top-1 probability is below one half.
FALLBACK_THRESHOLD = 0.5
TINY = 1e-30  # log(0) guard: float32 softmax underflows to exactly 0 for far-off classes


class TrustCardError(ValueError):
    """The card's calibration or unsure block cannot be applied to this graph."""


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Calibration:
    """p -> softmax(scale * log p + shift); the identity when the card has no calibration."""

    method: str  # "none" | "temperature" | "vector"
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    @classmethod
    def from_card(cls, block: dict | None, classes: int) -> "Calibration":
        if not block:
            return cls("none")
        method = block.get("method")
        try:
            if method == "temperature":
                temperature = float(block["temperature"])
                if not temperature > 0:
                    raise ValueError(f"temperature {temperature} is not positive")
                return cls(method, np.full(classes, 1.0 / temperature), np.zeros(classes))
            if method == "vector":
                scale, shift = (np.asarray(block[key], dtype=np.float64) for key in ("scale", "shift"))
                if scale.shape != (classes,) or shift.shape != (classes,):
                    raise ValueError(f"scale and shift need {classes} values each")
                return cls(method, scale, shift)
        except (KeyError, TypeError, ValueError) as exc:
            raise TrustCardError(f"calibration block: {exc}") from None
        raise TrustCardError(f"calibration method {method!r}: expected temperature or vector")

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return probabilities
        log_p = np.log(np.maximum(probabilities.astype(np.float64), TINY))
        return softmax(log_p * self.scale + self.shift).astype(np.float32)


@dataclass(frozen=True)
class UnsureRule:
    score: str  # a graph output's name, or MAX_PROBABILITY
    threshold: float

    @classmethod
    def from_card(cls, block: dict | None, output_names: list[str]) -> "UnsureRule":
        if not block:
            return cls(MAX_PROBABILITY, 1.0 - FALLBACK_THRESHOLD)
        score, threshold = block.get("score"), block.get("threshold")
        if not isinstance(threshold, (int, float)):
            raise TrustCardError("unsure block: threshold is not a number")
        if score != MAX_PROBABILITY and score not in output_names[1:]:
            raise TrustCardError(f"unsure block: score {score!r} is neither {MAX_PROBABILITY!r} nor an output of "
                                 f"the graph ({', '.join(output_names)})")
        return cls(score, float(threshold))

    @property
    def graph_output(self) -> str | None:
        return None if self.score == MAX_PROBABILITY else self.score

    def scores(self, calibrated: np.ndarray, graph_score: np.ndarray | None) -> np.ndarray:
        if graph_score is None:
            return (1.0 - calibrated.max(axis=1)).astype(np.float32)
        return graph_score.reshape(len(calibrated)).astype(np.float32)


@dataclass(frozen=True)
class Trust:
    calibration: Calibration
    unsure: UnsureRule

    @classmethod
    def from_card(cls, card: dict, output_names: list[str], classes: int) -> "Trust":
        return cls(Calibration.from_card(card.get("calibration"), classes),
                   UnsureRule.from_card(card.get("unsure"), output_names))

    def apply(self, probabilities: np.ndarray, graph_score: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Raw graph outputs -> (calibrated probabilities, unsure scores), one row per image."""
        calibrated = self.calibration.apply(probabilities)
        return calibrated, self.unsure.scores(calibrated, graph_score)


class ScoredRunner:
    """The batcher's run for one version, on its worker thread: the graph's probabilities (and
    score output, if the card names one), calibrated and scored, then seen by the drift window.
    Vectorised per batch, so none of it runs on the event loop."""

    def __init__(self, model: OnnxModel, trust: Trust, window: DriftWindow, background: bool = False):
        self._model, self._trust, self._window, self._background = model, trust, window, background
        graph_output = trust.unsure.graph_output
        self._names = [model.output.name] + ([graph_output] if graph_output else [])

    def __call__(self, images: np.ndarray) -> Rows:
        outputs = self._model.run_outputs(images, self._names, background=self._background)
        calibrated, scores = self._trust.apply(outputs[0], outputs[1] if len(outputs) > 1 else None)
        self._window.observe(images, calibrated, scores, self._trust.unsure.threshold)
        return calibrated, scores


def check_threshold(threshold: float | None) -> float | None:
    """A request's own threshold: unset, or a finite number."""
    if threshold is None or np.isfinite(threshold):
        return threshold
    raise InvalidInput(f"unsure_threshold is {threshold}, expected a finite number (or unset for the model's)",
                       reason="bad_unsure_threshold")
