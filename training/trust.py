"""What makes an answer's probability honest and its `unsure` flag meaningful, fitted on the
validation split at export (numpy only, no TensorFlow):

- calibration: temperature scaling, or vector scaling where held-out validation says it is
  better (a per-class scale and shift of the log-probabilities), with ECE and NLL before and after;
- the unsure operating point: the threshold on the model's OOD score that flags at most
  `UNSURE_VALIDATION_RATE` of in-distribution validation images;
- the drift reference: the validation split's distribution of each signal the server watches.

The server applies all three from the model card (serving/trust.py, serving/drift.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
UNSURE_VALIDATION_RATE = 0.05  # at most this share of in-distribution validation images flagged
TINY = 1e-30  # log(0) guard: float32 softmax underflows to exactly 0 for far-off classes


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probabilities.astype(np.float64), TINY))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-log_probabilities(probabilities[np.arange(len(labels)), labels]).mean())


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 probability, equal-width bins (Guo et al., 2017)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


@dataclass(frozen=True)
class Calibration:
    """p -> softmax(scale * log p + shift): temperature scaling has scale = 1/T for every class
    and no shift; vector scaling one scale and one shift per class."""

    method: str  # "temperature" | "vector"
    scale: tuple[float, ...]
    shift: tuple[float, ...]

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        return softmax(log_probabilities(probabilities) * np.asarray(self.scale) + np.asarray(self.shift))

    def to_card(self) -> dict:
        if self.method == "temperature":
            return {"method": "temperature", "temperature": round(1.0 / self.scale[0], 6)}
        return {"method": "vector", "scale": [round(s, 6) for s in self.scale], "shift": [round(s, 6) for s in self.shift]}


def fit_temperature(log_p: np.ndarray, labels: np.ndarray) -> Calibration:
    """The temperature of least NLL, by golden-section search on log T (NLL is unimodal in it)."""
    def loss(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(axis=1))).mean())

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    t = float(np.exp((lo + hi) / 2))
    classes = log_p.shape[1]
    return Calibration("temperature", (1.0 / t,) * classes, (0.0,) * classes)


def fit_vector(log_p: np.ndarray, labels: np.ndarray, steps: int = 1500) -> Calibration:
    """Per-class scale and shift of least NLL (convex in them), by Newton-free full-batch
    gradient descent with Adam, started from the best temperature."""
    start = fit_temperature(log_p, labels)
    scale, shift = np.array(start.scale), np.zeros(log_p.shape[1])
    onehot = np.eye(log_p.shape[1])[labels]
    params = np.concatenate([scale, shift])
    m, v = np.zeros_like(params), np.zeros_like(params)
    for step in range(1, steps + 1):
        z = log_p * params[:len(scale)] + params[len(scale):]
        error = (softmax(z) - onehot) / len(labels)  # d NLL / d z
        grad = np.concatenate([(error * log_p).sum(axis=0), error.sum(axis=0)])
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        params -= 0.01 * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    k = len(scale)
    return Calibration("vector", tuple(map(float, params[:k])), tuple(map(float, params[k:])))


def choose_calibration(probabilities: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[Calibration, dict]:
    """Temperature or vector scaling, by held-out NLL in 2-fold cross-validation on the
    validation split; the chosen method is then refitted on all of it."""
    log_p = log_probabilities(probabilities)
    order = np.random.default_rng(seed).permutation(len(labels))
    folds = (order[: len(order) // 2], order[len(order) // 2:])
    held_out = {}
    for method, fit in (("temperature", fit_temperature), ("vector", fit_vector)):
        losses = []
        for fit_on, test_on in (folds, folds[::-1]):
            calibration = fit(log_p[fit_on], labels[fit_on])
            losses.append(nll(calibration.apply(probabilities[test_on]), labels[test_on]))
        held_out[method] = round(float(np.mean(losses)), 5)
    method = min(held_out, key=held_out.get)
    chosen = (fit_temperature if method == "temperature" else fit_vector)(log_p, labels)
    return chosen, {"cross_validated_nll": held_out}


def calibration_figures(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "ece_before": round(ece(raw, labels), 5), "ece_after": round(ece(calibrated, labels), 5),
        "nll_before": round(nll(raw, labels), 5), "nll_after": round(nll(calibrated, labels), 5),
        "mean_confidence_after": round(float(calibrated.max(axis=1).mean()), 4),
        "accuracy": round(float((raw.argmax(axis=1) == labels).mean()), 4),
    }


def unsure_threshold(validation_scores: np.ndarray, rate: float = UNSURE_VALIDATION_RATE) -> float:
    """The score above which at most `rate` of the validation images lie."""
    return float(np.quantile(validation_scores, 1.0 - rate, method="higher"))


def flag_rates(scores: np.ndarray, threshold: float) -> float:
    return float((scores > threshold).mean())


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an OOD image scores above an in-distribution one), ties counted half."""
    both = np.concatenate([in_scores, out_scores])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # tied values share their mean rank
    n_in, n_out = len(in_scores), len(out_scores)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))
