"""Stochastic weight averaging (Izmailov et al., 2018) on top of a finished run.

    python -m training.average --parent runs/long --run-dir runs/long-swa [--resume]

Continues the parent's best model with short cyclic learning-rate cycles (linear from the peak
down to zero), averages the weights at the end of each cycle, recomputes the batch-norm
statistics of the averaged network on training images, and writes it as run-dir/best.keras with
a state.json that `training.export --run-dir` reads like any other run. The averaged network has
the parent's architecture, so serving cost does not change.

Checkpoints every epoch (optimizer, running average and count included); `--resume` continues.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from training import data as cifar  # noqa: E402
from training.evaluate import top1_accuracy  # noqa: E402
from training.recipes import Recipe  # noqa: E402
from training.train import BEST, CHECKPOINT, STATE, AugmentedBatches, EpochState, compile_model, write_json  # noqa: E402

AVERAGE = "average.npz"  # the running average of the trainable weights and how many it holds
# Training images that re-estimate batch-norm statistics, augmented as in training: on the
# validation split that beat un-augmented images (long + averaging: 91.3% vs 90.8%).
BN_IMAGES = 10_240


@keras.saving.register_keras_serializable(package="cifar10")
class CyclicDecay(keras.optimizers.schedules.LearningRateSchedule):
    """In each cycle of `cycle_steps`: linear from `peak` down to zero (the cycle's end is
    where the weights are averaged, so each sample is an annealed network)."""

    def __init__(self, peak: float, cycle_steps: int):
        self.peak, self.cycle_steps = float(peak), int(cycle_steps)

    def __call__(self, step):
        position = keras.ops.mod(keras.ops.cast(step, "float32"), float(self.cycle_steps))
        return self.peak * (1.0 - (position + 1.0) / self.cycle_steps)

    def get_config(self) -> dict:
        return {"peak": self.peak, "cycle_steps": self.cycle_steps}


def recompute_batch_norm(model: keras.Model, images: np.ndarray, batch_size: int) -> None:
    """Exact batch-norm statistics over `images`: the running average with weight 1/(k+1) for
    batch k is the plain mean of the per-batch statistics."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in norms]
    try:
        for k, start in enumerate(range(0, len(images) - batch_size + 1, batch_size)):
            for layer in norms:
                layer.momentum = k / (k + 1)
            model(images[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(norms, saved):
            layer.momentum = momentum


def batch_norm_images(split: cifar.Split, recipe: Recipe) -> np.ndarray:
    """The first BN_IMAGES training images as a training epoch sees them (crop, flip, cutout):
    the statistics the network's layers were trained under."""
    batches = AugmentedBatches(split.take(slice(0, BN_IMAGES)), recipe.batch_size, recipe.augment,
                               recipe.seed + 1, cutout=recipe.cutout)
    return np.concatenate([batches[i][0] for i in range(len(batches))])


def accuracy(model: keras.Model, split: cifar.Split) -> float:
    return top1_accuracy(model.predict(split.images, batch_size=500, verbose=0), split.labels)


class Averaging(EpochState):
    """Epoch ends as in training (checkpoint, state.json), except that there is no best-epoch
    copy: at a cycle's end the weights are folded into the average (saved with the checkpoint)
    and the averaged network's validation accuracy is reported."""

    def __init__(self, run_dir: Path, state: dict, cycle_epochs: int, average: list[np.ndarray] | None,
                 bn_images: np.ndarray, val_split: cifar.Split, batch_size: int):
        super().__init__(run_dir, state)
        self.cycle_epochs = cycle_epochs
        self.average, self.bn_images, self.val_split, self.batch_size = average, bn_images, val_split, batch_size

    def epoch_finished(self, entry: dict) -> None:
        if entry["epoch"] % self.cycle_epochs:
            return
        weights = [np.asarray(w) for w in self.model.trainable_weights]
        count = self.state["averaged"]
        self.average = weights if self.average is None else [
            a + (w - a) / (count + 1) for a, w in zip(self.average, weights)]
        self.state["averaged"] = count + 1
        entry["averaged_val_accuracy"] = accuracy(
            averaged_network(self.model, self.average, self.bn_images, self.batch_size), self.val_split)
        np.savez(self.run_dir / (AVERAGE + ".tmp.npz"), *self.average)
        os.replace(self.run_dir / (AVERAGE + ".tmp.npz"), self.run_dir / AVERAGE)

    def progress_line(self, entry: dict, seconds: float) -> str:
        return (f"{super().progress_line(entry, seconds)}, averaged {self.state['averaged']}: "
                f"{entry.get('averaged_val_accuracy', float('nan')):.4f}")


def averaged_network(model: keras.Model, average: list[np.ndarray], bn_images: np.ndarray,
                     batch_size: int) -> keras.Model:
    """A copy of `model` holding the averaged weights, batch-norm statistics recomputed."""
    averaged = keras.models.clone_model(model)
    averaged.set_weights(model.get_weights())
    for variable, value in zip(averaged.trainable_weights, average):
        variable.assign(value)
    recompute_batch_norm(averaged, bn_images, batch_size)
    return averaged


def average(parent: Path, run_dir: Path, data_dir: Path, cycles: int, cycle_epochs: int, peak: float,
            resume: bool, limit: int | None = None, verbose: int = 2) -> dict:
    parent_state = json.loads((parent / STATE).read_text())
    recipe = Recipe.from_dict(parent_state["recipe"])
    keras.utils.set_random_seed(recipe.seed + parent_state["epochs_done"])
    train_split, val_split = cifar.train_validation_split(cifar.load_train(data_dir), recipe.validation_size, recipe.seed)
    if limit:
        train_split = train_split.take(slice(0, limit))
        val_split = val_split.take(slice(0, max(limit // 5, 100)))
    run_dir.mkdir(parents=True, exist_ok=True)
    batches = AugmentedBatches(train_split, recipe.batch_size, recipe.augment, recipe.seed, cutout=recipe.cutout)
    averaging = {"method": "stochastic weight averaging (Izmailov et al., 2018)", "parent": str(parent),
                 "parent_epochs": parent_state["epochs_done"], "cycles": cycles, "cycle_epochs": cycle_epochs,
                 "cycle_learning_rate": f"linear {peak} -> 0 in each cycle, weights averaged at each cycle's end"}
    batch_norm = f"statistics recomputed on {BN_IMAGES} training images, augmented as in training"
    if resume and (run_dir / CHECKPOINT).exists():
        state = json.loads((run_dir / STATE).read_text())
        if {k: v for k, v in state["weight_averaging"].items() if k != "batch_norm"} != averaging:
            raise SystemExit(f"--resume: {run_dir} holds another averaging run: {state['weight_averaging']}")
        model = keras.saving.load_model(run_dir / CHECKPOINT)
        stored = np.load(run_dir / AVERAGE) if (run_dir / AVERAGE).exists() else None
        running = [stored[f"arr_{i}"] for i in range(len(stored.files))] if stored is not None else None
        print(f"resuming weight averaging after epoch {state['epochs_done']}", flush=True)
    else:
        model = keras.saving.load_model(parent / BEST)
        compile_model(model, recipe, CyclicDecay(peak, cycle_epochs * len(batches)), len(batches))  # fresh optimizer state
        running = None
        state = {key: parent_state[key] for key in ("recipe", "backend", "train_images", "validation_images",
                                                     "parameters", "macs_per_image")}
        state.update(parent_train_seconds=parent_state["train_seconds"],
                     parent_history=parent_state.get("history", []), epochs_done=0, train_seconds=0.0,
                     averaged=0, history=[])
    state["weight_averaging"] = {**averaging, "batch_norm": batch_norm}
    total_epochs = cycles * cycle_epochs
    bn_images = batch_norm_images(train_split, recipe)
    callback = Averaging(run_dir, state, cycle_epochs, running, bn_images, val_split, recipe.batch_size)
    # Epoch numbering goes on from the parent's, so the augmentation draws new crops and orders.
    offset = parent_state["epochs_done"]
    batches.set_epoch(offset + state["epochs_done"])
    if state["epochs_done"] < total_epochs:
        val_onehot = keras.utils.to_categorical(val_split.labels, 10).astype("float32")
        model.fit(batches, epochs=total_epochs, initial_epoch=state["epochs_done"],
                  validation_data=(val_split.images, val_onehot), validation_batch_size=500,
                  callbacks=[callback], verbose=verbose)
    averaged = averaged_network(model, callback.average, bn_images, recipe.batch_size)
    averaged.save(run_dir / BEST)
    state["best_val_accuracy"] = accuracy(averaged, val_split)
    state["best_epoch"] = None
    images = state["train_images"] // recipe.batch_size * recipe.batch_size * state["epochs_done"]
    state["images_per_second"] = round(images / max(state["train_seconds"], 1e-9), 1)
    write_json(run_dir / STATE, state)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", type=Path, required=True, help="a finished run directory (best.keras, state.json)")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--cycle-epochs", type=int, default=2)
    parser.add_argument("--peak-learning-rate", type=float, default=0.05)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    args = parser.parse_args(argv)
    data_dir = cifar.data_dir_or_exit(args.data_dir, allow_download=True)
    state = average(args.parent, args.run_dir, data_dir, args.cycles, args.cycle_epochs,
                    args.peak_learning_rate, args.resume, args.limit)
    print(json.dumps({k: state[k] for k in ("epochs_done", "train_seconds", "averaged", "best_val_accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
