"""What the patch-whitened recipe trains with, besides Keras's own parts: PyTorch-style Nesterov
SGD with per-group learning rates, a triangular schedule, and Lookahead.

Backend-neutral Keras 3 (keras.ops only), registered for `.keras` checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="cifar10")
class Triangular(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from `start` x peak up to the peak at `warmup_steps`, then linear down to `end` x
    peak at `total_steps` (and held there). Keyed on the optimizer's step count, so a resumed run
    continues in place."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, start: float = 0.2, end: float = 0.0):
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up = self.start + (1.0 - self.start) * step / max(self.warmup_steps, 1)
        done = ops.minimum(step - self.warmup_steps, self.total_steps - self.warmup_steps)
        down = 1.0 - (1.0 - self.end) * done / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * ops.where(step < self.warmup_steps, up, down)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "start": self.start, "end": self.end}


@keras.saving.register_keras_serializable(package="cifar10")
class GroupedSGD(keras.optimizers.Optimizer):
    """SGD as PyTorch runs it (Nesterov; L2 weight decay added to the gradient, so it goes
    through momentum), with two learning-rate groups and a freeze:

    - a variable whose path ends in one of `scaled_suffixes` (BatchNorm's `beta`: the network's
      only biases but the whitening one) steps `lr_scale` times faster; its L2 coefficient is
      divided by the same factor, so every variable decays by the same lr x decay per step;
    - a variable whose path is in `frozen_after` stops moving after that many steps (the
      whitening bias: it settles early, then holds still).

    `weight_decay` is the L2 coefficient at scale 1 (gradient of the *mean* loss + wd x w).
    """

    def __init__(self, learning_rate=0.01, momentum: float = 0.9, weight_decay: float = 0.0,
                 lr_scale: float = 1.0, scaled_suffixes: tuple[str, ...] = ("beta",),
                 frozen_after: dict[str, int] | None = None, name: str = "grouped_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.l2 = float(momentum), float(weight_decay)
        self.lr_scale, self.scaled_suffixes = float(lr_scale), tuple(scaled_suffixes)
        self.frozen_after = dict(frozen_after or {})

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = [self.add_variable_from_reference(v, "velocity") for v in variables]
        # By index: on some backends update_step sees the backend's variable, which has no path.
        self._scales = [self.lr_scale if v.path.endswith(self.scaled_suffixes) else 1.0 for v in variables]
        self._frozen_at = [self.frozen_after.get(v.path) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        scale, frozen_at, velocity = self._scales[index], self._frozen_at[index], self.velocities[index]
        gradient = ops.add(gradient, ops.multiply(self.l2 / scale, variable))
        self.assign(velocity, ops.add(ops.multiply(self.momentum, velocity), gradient))
        step = ops.add(gradient, ops.multiply(self.momentum, velocity))  # Nesterov's look-ahead step
        rate = ops.multiply(ops.cast(learning_rate, variable.dtype), scale)
        if frozen_at is not None:
            moving = ops.cast(ops.less(self.iterations, frozen_at), variable.dtype)
            rate = ops.multiply(rate, moving)
        self.assign_sub(variable, ops.multiply(rate, step))

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum, "weight_decay": self.l2,
                "lr_scale": self.lr_scale, "scaled_suffixes": list(self.scaled_suffixes),
                "frozen_after": self.frozen_after}


class Lookahead(keras.callbacks.Callback):
    """Lookahead (Zhang et al., 2019) with a growing pull: every `every` steps the slow copy of
    all weights (BatchNorm statistics included) moves towards the fast weights,
    slow = d x slow + (1 - d) x fast with d = `decay` x (step / total)^3, and the fast weights
    restart from it. Early on d is ~0 (plain SGD); at the end it averages over the last steps.
    After the last step the network is the slow copy.

    Its state is saved beside the checkpoint each epoch (`state_path`), so --resume continues it.
    """

    def __init__(self, total_steps: int, state_path: Path, every: int = 5, decay: float = 0.95 ** 5):
        super().__init__()
        self.total_steps, self.state_path, self.every, self.decay = total_steps, Path(state_path), every, decay
        self.slow: list[np.ndarray] | None = None

    def _floats(self) -> list:
        return [w for w in self.model.weights if "float" in str(w.dtype)]

    def on_train_begin(self, logs=None):
        if self.state_path.exists():
            with np.load(self.state_path) as saved:
                self.slow = [saved[f"w{i}"] for i in range(len(saved.files))]
        else:
            self.slow = [np.array(w) for w in self._floats()]

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        if step % self.every and step != self.total_steps:
            return
        d = 1.0 if step >= self.total_steps else self.decay * (step / self.total_steps) ** 3
        for i, weight in enumerate(self._floats()):
            self.slow[i] = d * self.slow[i] + (1.0 - d) * np.array(weight)
            weight.assign(self.slow[i])

    def on_epoch_end(self, epoch, logs=None):
        tmp = self.state_path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"w{i}": w for i, w in enumerate(self.slow)})
        tmp.replace(self.state_path)
