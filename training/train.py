"""Train a CIFAR-10 recipe with per-epoch checkpoints (optimizer state included) and --resume.

    python -m training.train --recipe fast --run-dir runs/fast [--resume]

Backend-neutral Keras 3: KERAS_BACKEND=tensorflow (default here) or jax (GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from training import augment as augment_ops  # noqa: E402
from training import data as cifar  # noqa: E402
from training.models import (  # noqa: E402
    CIFAR10_MEAN, CIFAR10_STD, count_macs, resnet9, simple_cnn, whitened_net, whitening_kernel,
)
from training.optim import GroupedSGD, Lookahead, Triangular  # noqa: E402
from training.recipes import RECIPES, Recipe  # noqa: E402

CHECKPOINT = "checkpoint.keras"  # the last finished epoch, optimizer included
BEST = "best.keras"  # the best epoch by validation accuracy
STATE = "state.json"
LOOKAHEAD = "lookahead.npz"  # the slow weights of training.optim.Lookahead, saved each epoch
WHITENING_IMAGES = 5_000  # the first training images, un-augmented: the patch statistics
MEAN_COLOUR = np.round(CIFAR10_MEAN).astype(np.uint8)  # cutout fill: zero once normalised


@keras.saving.register_keras_serializable(package="cifar10")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to the peak, then linear decay to zero (Page's ResNet-9 schedule).

    Keyed on the optimizer's own step count, so a resumed run continues where it stopped.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = step / max(self.warmup_steps, 1)
        down = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * keras.ops.maximum(keras.ops.minimum(up, down), 0.0)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled batches with random crop (reflect padding of `translate` pixels), horizontal
    flip (random, or alternating by epoch) and, when the recipe asks, cutout (training/augment.py).

    The permutation and the crops of epoch e come from seed+e, so a resumed run sees exactly
    the batches the interrupted run would have seen.
    """

    def __init__(self, split: cifar.Split, batch_size: int, augment: bool, seed: int, epoch: int = 0,
                 cutout: int = 0, translate: int = augment_ops.PAD, flip: str = "random"):
        super().__init__()
        if flip not in ("random", "alternating"):
            raise ValueError(f"flip must be 'random' or 'alternating', not {flip!r}")
        self.cutout = cutout if augment else 0
        self.images = augment_ops.pad_for_crops(split.images, translate) if augment else split.images
        self.onehot = keras.utils.to_categorical(split.labels, 10).astype("float32")
        self.batch_size, self.augment, self.seed, self.flip = batch_size, augment, seed, flip
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rng = np.random.default_rng(self.seed + epoch)
        self.order = self.rng.permutation(len(self.onehot))
        self.flipped = augment_ops.alternating_flips(len(self.onehot), epoch, self.seed) \
            if self.flip == "alternating" else None

    def __len__(self) -> int:  # drop the remainder: static shapes keep XLA from recompiling
        return len(self.onehot) // self.batch_size

    def __getitem__(self, index: int):
        idx = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.images[idx]
        if self.augment:
            rng = np.random.default_rng((self.seed + self.epoch) * 100_003 + index)
            x = augment_ops.crop_and_flip(x, rng, flip=self.flipped is None)
            if self.flipped is not None:
                x = augment_ops.flip(x, self.flipped[idx])
            if self.cutout:
                x = augment_ops.cut_out(x, self.cutout, MEAN_COLOUR, rng)
        return x, self.onehot[idx]

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


class EpochState(keras.callbacks.Callback):
    """After each epoch: checkpoint (optimizer included), best-by-validation copy, state.json.

    Subclasses change what an epoch's end adds (`epoch_finished`) and its progress line.
    """

    def __init__(self, run_dir: Path, state: dict):
        super().__init__()
        self.run_dir, self.state = run_dir, state
        self.epoch_started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.epoch_started
        logs = {k: float(v) for k, v in (logs or {}).items()}
        entry = {"epoch": epoch + 1, "seconds": round(seconds, 1), **logs}
        self.epoch_finished(entry)
        self.state["history"].append(entry)
        self.state["train_seconds"] += seconds
        self.state["epochs_done"] = epoch + 1
        self.model.save(self.run_dir / (CHECKPOINT + ".tmp.keras"))
        os.replace(self.run_dir / (CHECKPOINT + ".tmp.keras"), self.run_dir / CHECKPOINT)
        write_json(self.run_dir / STATE, self.state)
        print(self.progress_line(entry, seconds), flush=True)

    def epoch_finished(self, entry: dict) -> None:
        if entry.get("val_accuracy", -1) > self.state.get("best_val_accuracy", -1):
            self.state["best_val_accuracy"] = entry["val_accuracy"]
            self.state["best_epoch"] = entry["epoch"]
            self.model.save(self.run_dir / BEST)

    def progress_line(self, entry: dict, seconds: float) -> str:
        return (f"epoch {entry['epoch']}: {seconds:.0f}s, loss {entry.get('loss', 0):.4f}, "
                f"val_accuracy {entry.get('val_accuracy', 0):.4f}")


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def build_model(recipe: Recipe, train_images: np.ndarray) -> keras.Model:
    """A fresh network for `recipe`; the whitened one takes its first layer from `train_images`."""
    if recipe.architecture == "simple":
        return simple_cnn()
    if recipe.architecture == "resnet9":
        return resnet9(width=recipe.width)
    if recipe.architecture == "whitened":
        model = whitened_net(recipe.widths, norm_momentum=recipe.norm_momentum)
        sample = train_images[:WHITENING_IMAGES].astype("float32")
        model.get_layer("whiten").set_kernel(whitening_kernel((sample - CIFAR10_MEAN) / CIFAR10_STD))
        return model
    raise ValueError(f"unknown architecture {recipe.architecture!r}")


def one_cycle(recipe: Recipe, steps_per_epoch: int) -> OneCycle:
    total = recipe.epochs * steps_per_epoch
    return OneCycle(recipe.peak_learning_rate, total, int(total * recipe.warmup_fraction))


def triangular(recipe: Recipe, steps_per_epoch: int) -> Triangular:
    total = recipe.epochs * steps_per_epoch
    return Triangular(recipe.peak_learning_rate, total, int(total * recipe.warmup_fraction), recipe.warmup_start,
                      recipe.final_fraction)


def learning_rate_schedule(recipe: Recipe, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    return triangular(recipe, steps_per_epoch) if recipe.optimizer == "grouped" else one_cycle(recipe, steps_per_epoch)


def optimizer_for(recipe: Recipe, learning_rate, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Keras's SGD (Nesterov, decoupled weight decay), or training.optim.GroupedSGD."""
    if recipe.optimizer == "grouped":
        frozen = {"whiten/bias": recipe.whiten_bias_epochs * steps_per_epoch} if recipe.whiten_bias_epochs else {}
        return GroupedSGD(learning_rate, recipe.momentum, recipe.weight_decay, recipe.lr_scale, frozen_after=frozen)
    if recipe.optimizer != "keras":
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}")
    optimizer = keras.optimizers.SGD(
        learning_rate=learning_rate, momentum=recipe.momentum, nesterov=True,
        weight_decay=recipe.weight_decay or None,
    )
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


def compile_model(model: keras.Model, recipe: Recipe,
                  learning_rate: keras.optimizers.schedules.LearningRateSchedule, steps_per_epoch: int) -> None:
    """The recipe's optimizer and loss, on `learning_rate`."""
    optimizer = optimizer_for(recipe, learning_rate, steps_per_epoch)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
        jit_compile=keras.backend.backend() != "torch",
    )


def extra_callbacks(recipe: Recipe, run_dir: Path, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """Callbacks the recipe asks for; before EpochState, whose checkpoint must follow them."""
    if recipe.lookahead:
        return [Lookahead(recipe.epochs * steps_per_epoch, run_dir / LOOKAHEAD)]
    return []


def train(recipe: Recipe, data_dir: Path, run_dir: Path, resume: bool, limit: int | None = None,
          verbose: int = 2) -> dict:
    """Train (or resume) one run; returns its state. The best model is run_dir/best.keras."""
    keras.utils.set_random_seed(recipe.seed)
    train_all = cifar.load_train(data_dir)
    train_split, val_split = cifar.train_validation_split(train_all, recipe.validation_size, recipe.seed)
    if limit:  # small, seeded slices for tests and smoke runs
        train_split = train_split.take(slice(0, limit))
        val_split = val_split.take(slice(0, max(limit // 5, 100)))
    run_dir.mkdir(parents=True, exist_ok=True)
    batches = AugmentedBatches(train_split, recipe.batch_size, recipe.augment, recipe.seed, cutout=recipe.cutout,
                               translate=recipe.translate, flip=recipe.flip)
    state_path = run_dir / STATE
    if resume and (run_dir / CHECKPOINT).exists():
        state = json.loads(state_path.read_text())
        if Recipe.from_dict(state["recipe"]).to_dict() != recipe.to_dict():  # fields added later take their defaults
            raise SystemExit(f"--resume: {run_dir} holds a run of another recipe: {state['recipe']}")
        model = keras.saving.load_model(run_dir / CHECKPOINT)
        print(f"resuming {recipe.name} after epoch {state['epochs_done']}", flush=True)
    else:
        model = build_model(recipe, train_split.images)
        compile_model(model, recipe, learning_rate_schedule(recipe, len(batches)), len(batches))
        (run_dir / LOOKAHEAD).unlink(missing_ok=True)  # a fresh run starts a fresh slow copy
        state = {
            "recipe": recipe.to_dict(), "backend": keras.backend.backend(), "epochs_done": 0,
            "train_seconds": 0.0, "history": [], "train_images": len(train_split),
            "validation_images": len(val_split), "parameters": int(model.count_params()),
            "macs_per_image": count_macs(model),
        }
    start_epoch = state["epochs_done"]
    batches.set_epoch(start_epoch)
    if start_epoch < recipe.epochs:
        val_onehot = keras.utils.to_categorical(val_split.labels, 10).astype("float32")
        model.fit(
            batches, epochs=recipe.epochs, initial_epoch=start_epoch,
            validation_data=(val_split.images, val_onehot), validation_batch_size=500,
            callbacks=[*extra_callbacks(recipe, run_dir, len(batches)), EpochState(run_dir, state)], verbose=verbose,
        )
    images = state["train_images"] // recipe.batch_size * recipe.batch_size * state["epochs_done"]
    state["images_per_second"] = round(images / max(state["train_seconds"], 1e-9), 1)
    write_json(state_path, state)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 python batches (default: $CIFAR10_DIR, ../shared/data/...)")
    parser.add_argument("--run-dir", default=None, help="checkpoints and state (default: runs/<recipe>)")
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoint.keras")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    if args.epochs:
        recipe = Recipe.from_dict({**recipe.to_dict(), "epochs": args.epochs})
    data_dir = cifar.data_dir_or_exit(args.data_dir, allow_download=True)
    run_dir = Path(args.run_dir or f"runs/{recipe.name}")
    state = train(recipe, data_dir, run_dir, args.resume, args.limit)
    print(json.dumps({k: state[k] for k in ("epochs_done", "train_seconds", "images_per_second", "best_val_accuracy", "best_epoch") if k in state}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
