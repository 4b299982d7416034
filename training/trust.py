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

from serving import trust as served
from serving.trust import softmax

ECE_BINS = 15
UNSURE_VALIDATION_RATE = 0.05  # at most this share of in-distribution validation images flagged


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probabilities.astype(np.float64), served.TINY))


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
        """What the server will serve: its own code, on the card's (rounded) parameters."""
        return served.Calibration.from_card(self.to_card(), len(self.scale)).apply(probabilities)

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


# ---- the feature-space distance behind `unsure_score` (models.FeatureDistance) ----------------

COVARIANCE_SHRINK = 1e-3  # of the mean variance, added to the diagonal: keeps the inverse stable


def fit_gaussian(features: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Centres (the class means with `labels`, else the overall mean) and a whitening matrix W
    with W W^T the inverse of the shared (within-class) covariance, shrunk towards a multiple
    of the identity."""
    x = features.astype(np.float64)
    if labels is None:
        centres = x.mean(axis=0, keepdims=True)
        residuals = x - centres
    else:
        centres = np.stack([x[labels == c].mean(axis=0) for c in range(int(labels.max()) + 1)])
        residuals = x - centres[labels]
    covariance = residuals.T @ residuals / len(x)
    covariance += COVARIANCE_SHRINK * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))
    return centres.astype(np.float32), whitening.astype(np.float32)


def squared_distance(features: np.ndarray, centres: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """min over centres of ||(f - c) W||^2, per row (what FeatureDistance computes in the graph)."""
    fw, cw = features.astype(np.float64) @ whitening, centres.astype(np.float64) @ whitening
    squared = (fw * fw).sum(axis=1, keepdims=True) - 2 * fw @ cw.T + (cw * cw).sum(axis=1)[None, :]
    return np.maximum(squared.min(axis=1), 1e-12)


def term_values(kind: str, features: np.ndarray, fitted: dict) -> np.ndarray:
    """One UnsureScore term before standardising: log Mahalanobis distance, or -||f||."""
    from training.models import MAHALANOBIS

    if kind == MAHALANOBIS:
        return np.log(squared_distance(features, fitted["centres"], fitted["whitening"]))
    return -np.linalg.norm(features.astype(np.float64), axis=1)


def fit_unsure_terms(terms: list[tuple[str, bool]], train_features: list[np.ndarray], train_labels: np.ndarray,
                     validation_features: list[np.ndarray]) -> list[dict]:
    """UnsureScore's parameters per input: for (kind, per_class) terms, the Gaussian of the
    training images (per class or overall) for Mahalanobis terms, and every term's mean and
    standard deviation on the validation images."""
    from training.models import MAHALANOBIS

    fitted = []
    for (kind, per_class), train, validation in zip(terms, train_features, validation_features):
        term: dict = {}
        if kind == MAHALANOBIS:
            term["centres"], term["whitening"] = fit_gaussian(train, train_labels if per_class else None)
        values = term_values(kind, validation, term)
        term["standardise"] = np.array([values.mean(), values.std()], dtype=np.float32)
        fitted.append(term)
    return fitted


def unsure_scores(terms: list[tuple[str, bool]], features: list[np.ndarray], fitted: list[dict]) -> np.ndarray:
    """What UnsureScore computes in the graph, in numpy (float64)."""
    return sum((term_values(kind, f, t) - t["standardise"][0]) / t["standardise"][1]
               for (kind, _), f, t in zip(terms, features, fitted))


# ---- the drift reference (serving/drift.py reads it) --------------------------------------------

DRIFT_BINS = 10


def drift_reference(images: np.ndarray, calibrated: np.ndarray, scores: np.ndarray) -> dict:
    """Each drift signal's distribution on the validation split: the predicted-class mix, and
    for the others `DRIFT_BINS` bins cut at validation quantiles (so each holds ~1/DRIFT_BINS)."""
    from serving.drift import PREDICTED_CLASS, bin_fractions, signal_values

    signals = {}
    for name, values in signal_values(images, calibrated, scores).items():
        if name == PREDICTED_CLASS:
            edges = np.arange(calibrated.shape[1] - 1) + 0.5
        else:
            edges = np.unique(np.quantile(values, np.arange(1, DRIFT_BINS) / DRIFT_BINS))
        fractions = bin_fractions(values, edges, len(edges) + 1)
        signals[name] = {"edges": [round(float(e), 6) for e in edges],
                         "fractions": [round(float(f), 6) for f in fractions / fractions.sum()]}
    return {"images": len(images), "split": "validation", "divergence": "jensen-shannon, base 2",
            "signals": signals}


# ---- everything the card says about trust, from the exported graph's own outputs -------------

OOD_IMAGES = 500  # per offline OOD family (training/ood.py)
OOD_SEED = 2026


def trust_card_blocks(run, validation, validation_outputs: dict, test, test_outputs: dict) -> dict:
    """The card's `calibration`, `unsure` and `drift_reference` blocks for a graph, fitted on
    the validation split; the test figures are an evaluation only. `run(images)` gives the
    graph's outputs by name (the OOD families are run through it)."""
    from serving.trust import MAX_PROBABILITY
    from training import ood

    probabilities, labels = validation_outputs["probabilities"], validation.labels
    calibration, selection = choose_calibration(probabilities, labels)
    calibrated = calibration.apply(probabilities)
    test_calibrated = calibration.apply(test_outputs["probabilities"])
    score = "unsure_score" if "unsure_score" in validation_outputs else MAX_PROBABILITY

    def scores(outputs: dict, calibrated_probabilities: np.ndarray) -> np.ndarray:
        if score == MAX_PROBABILITY:
            return 1.0 - calibrated_probabilities.max(axis=1)
        return outputs[score].astype(np.float64)

    validation_scores, test_scores = scores(validation_outputs, calibrated), scores(test_outputs, test_calibrated)
    threshold = unsure_threshold(validation_scores)
    families = {}
    for kind, group in (("development", ood.DEVELOPMENT), ("held_out", ood.HELD_OUT)):
        for family, images in ood.build(group, validation.images, OOD_IMAGES, OOD_SEED).items():
            outputs = run(images)
            family_scores = scores(outputs, calibration.apply(outputs["probabilities"]))
            families[family] = {"kind": kind, "flagged": round(flag_rates(family_scores, threshold), 4),
                                "auroc_against_test": round(auroc(test_scores, family_scores), 4)}
    return {
        "calibration": {
            **calibration.to_card(), "fitted_on": f"validation split ({len(labels)} images)",
            "selection": selection,
            "validation": calibration_figures(probabilities, calibrated, labels),
            "test": calibration_figures(test_outputs["probabilities"], test_calibrated, test.labels),
            "ece_bins": ECE_BINS,
        },
        "unsure": {
            "score": score, "threshold": round(threshold, 6),
            "higher_means": "less like the training data",
            "chosen_on": f"validation split: at most {UNSURE_VALIDATION_RATE:.0%} of its images above the threshold",
            "validation_flagged": round(flag_rates(validation_scores, threshold), 4),
            "test_flagged": round(flag_rates(test_scores, threshold), 4),
            "test_flagged_wrong": round(flag_rates(test_scores[test_calibrated.argmax(1) != test.labels], threshold), 4),
            "test_flagged_right": round(flag_rates(test_scores[test_calibrated.argmax(1) == test.labels], threshold), 4),
            "ood_families": families,
            "ood_images_per_family": OOD_IMAGES,
        },
        "drift_reference": drift_reference(validation.images, calibrated, validation_scores),
    }


def add_to_card(version_dir, data_dir) -> dict:
    """Fit the trust blocks for an already exported version (model.onnx untouched, so its sha256
    and bit-exact accuracy stand) and write them into its model_card.json. For versions exported
    before trust scores existed; new exports and quantizations fit them themselves."""
    import json
    from pathlib import Path

    from training import data as cifar
    from training.card import update_card
    from training.evaluate import ort_session, predict_outputs

    version_dir = Path(version_dir)
    card = json.loads((version_dir / "model_card.json").read_text())
    recipe = card["training"]["recipe"]
    _, validation = cifar.train_validation_split(cifar.load_train(data_dir), recipe["validation_size"], recipe["seed"])
    test = cifar.load_test(data_dir)
    session = ort_session(version_dir / "model.onnx")

    def run(images: np.ndarray) -> dict:
        return predict_outputs(session, images)

    blocks = trust_card_blocks(run, validation, run(validation.images), test, run(test.images))
    update_card(version_dir, blocks)
    return blocks


def main(argv: list[str] | None = None) -> int:
    """python -m training.trust models/cifar10/1 [models/cifar10-int8/1 ...]"""
    import argparse
    import json

    from training import data as cifar

    parser = argparse.ArgumentParser(description=add_to_card.__doc__)
    parser.add_argument("version_dirs", nargs="+")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    data_dir = cifar.data_dir_or_exit(args.data_dir)
    for version_dir in args.version_dirs:
        blocks = add_to_card(version_dir, data_dir)
        summary = {"calibration": {k: blocks["calibration"][k] for k in ("method", "validation", "test")},
                   "unsure": {k: v for k, v in blocks["unsure"].items() if k != "ood_families"},
                   "ood_flagged": {k: v["flagged"] for k, v in blocks["unsure"]["ood_families"].items()}}
        print(version_dir, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
