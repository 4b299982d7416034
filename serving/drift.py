"""Input drift: per served version, a sliding window of what the service saw, compared with the
validation split's profile in the model card (`drift_reference`, written at export by
training/trust.py with the functions below). No gRPC here.

Signals: the predicted-class mix, the calibrated top-1 confidence, the unsure score, and three
cheap input statistics (brightness, contrast, colourfulness). Each is binned on the reference's
own edges (validation deciles, so each reference bin holds ~10%), and scored by the
Jensen-Shannon divergence (base 2: 0 = the same mix, 1 = nothing in common) between the
window's bin fractions and the reference's. Scores are computed at scrape time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

PREDICTED_CLASS = "predicted_class"
INPUT_SIGNALS = ("brightness", "contrast", "colourfulness")
SIGNALS = (PREDICTED_CLASS, "confidence", "unsure_score", *INPUT_SIGNALS)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def input_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image of uint8 [N, H, W, 3], in [0, 1] units: brightness (mean luma), contrast (luma's
    standard deviation) and colourfulness (Hasler and Suesstrunk, 2003)."""
    x = images.reshape(len(images), -1, 3).astype(np.float32) * (1 / 255)
    luma = x @ LUMA
    red, green, blue = x[..., 0], x[..., 1], x[..., 2]
    rg, yb = red - green, 0.5 * (red + green) - blue
    colourfulness = np.hypot(rg.std(axis=1), yb.std(axis=1)) + 0.3 * np.hypot(rg.mean(axis=1), yb.mean(axis=1))
    return {"brightness": luma.mean(axis=1), "contrast": luma.std(axis=1), "colourfulness": colourfulness}


def signal_values(images: np.ndarray, probabilities: np.ndarray, unsure_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Every signal's value per image, from the input pixels and the served (calibrated) answers."""
    return {PREDICTED_CLASS: probabilities.argmax(axis=1).astype(np.float32),
            "confidence": probabilities.max(axis=1), "unsure_score": unsure_scores, **input_statistics(images)}


def bin_fractions(values: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    """Share of `values` in each bin; bin i holds edges[i-1] <= v < edges[i] (open at both ends)."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins)
    return counts / max(len(values), 1)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Base-2 Jensen-Shannon divergence of two distributions over the same bins, in [0, 1]."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        inside = a > 0
        return float((a[inside] * np.log2(a[inside] / m[inside])).sum())

    return max(0.0, min(1.0, (kl(p) + kl(q)) / 2))


@dataclass(frozen=True)
class SignalReference:
    edges: np.ndarray  # inner bin edges; empty for the predicted class (one bin per class)
    fractions: np.ndarray

    def score(self, values: np.ndarray) -> float:
        if not len(values):
            return 0.0  # nothing seen yet: no evidence of drift (never NaN)
        return jensen_shannon(bin_fractions(values, self.edges, len(self.fractions)), self.fractions)


class DriftReferenceError(ValueError):
    """The card's drift_reference block is malformed."""


def read_reference(block: dict | None) -> dict[str, SignalReference]:
    """The card's drift_reference block -> a reference per signal (none for an older card)."""
    if not block:
        return {}
    references = {}
    try:
        for name, spec in block["signals"].items():
            if name not in SIGNALS:
                continue  # a signal this server does not watch
            edges = np.asarray(spec.get("edges", []), dtype=np.float64)
            fractions = np.asarray(spec["fractions"], dtype=np.float64)
            if len(fractions) != len(edges) + 1 or not np.isclose(fractions.sum(), 1.0, atol=1e-3):
                raise ValueError(f"{name}: {len(fractions)} fractions for {len(edges)} edges, summing to {fractions.sum():.4f}")
            references[name] = SignalReference(edges, fractions)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise DriftReferenceError(f"drift_reference block: {exc}") from None
    return references


class DriftWindow:
    """The last `size` images one version served: each signal's values in a ring, plus the
    unsure flags at the model's own threshold. The batcher's worker writes, the scrape reads."""

    def __init__(self, references: dict[str, SignalReference], size: int):
        self.references, self.size = references, size
        self._values = {name: np.zeros(size, dtype=np.float32) for name in references}
        self._unsure = np.zeros(size, dtype=bool)
        self._next, self._filled = 0, 0
        self._lock = threading.Lock()

    def observe(self, images: np.ndarray, probabilities: np.ndarray, unsure_scores: np.ndarray,
                threshold: float) -> None:
        values = signal_values(images, probabilities, unsure_scores) if self.references else {}
        count = min(len(images), self.size)
        slots = (self._next + np.arange(count)) % self.size
        with self._lock:
            for name, ring in self._values.items():
                ring[slots] = values[name][-count:]
            self._unsure[slots] = unsure_scores[-count:] > threshold
            self._next = int((self._next + count) % self.size)
            self._filled = min(self.size, self._filled + count)

    def snapshot(self) -> tuple[int, float, dict[str, float]]:
        """(images in the window, their unsure share, a drift score per signal)."""
        with self._lock:
            filled = self._filled
            values = {name: ring[:filled].copy() for name, ring in self._values.items()}
            unsure = float(self._unsure[:filled].mean()) if filled else 0.0
        return filled, unsure, {name: self.references[name].score(v) for name, v in values.items()}
