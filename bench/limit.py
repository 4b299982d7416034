"""The limit: raw onnxruntime in this process on the same model file, no server, no network.

Same session settings as the server (intra-op threads, one inter-op thread, sequential, full
graph optimisation), fed the same real test images as the servers, cycled through; every batch
size is timed and the best is the throughput ceiling the servers are measured against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class LimitResult:
    model: str
    intra_op_threads: int
    per_batch: dict[int, dict[str, float]]  # batch size -> {"throughput", "p50_ms", "p99_ms"}

    @property
    def best_batch(self) -> int:
        return max(self.per_batch, key=lambda b: self.per_batch[b]["throughput"])

    @property
    def best_throughput(self) -> float:
        return self.per_batch[self.best_batch]["throughput"]

    @property
    def batch1_p50_ms(self) -> float:
        return self.per_batch[1]["p50_ms"]

    def summary(self) -> dict:
        return {"model": self.model, "intra_op_threads": self.intra_op_threads, "best_batch": self.best_batch,
                "best_throughput": round(self.best_throughput, 1), "batch1_p50_ms": round(self.batch1_p50_ms, 3),
                "per_batch": {str(b): {k: round(v, 3) for k, v in r.items()} for b, r in self.per_batch.items()}}


def session(model_path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def batches_of(images: np.ndarray, size: int) -> list[np.ndarray]:
    """Contiguous batches of `size` that together cover every image (the last one wraps around).

    The servers cycle through the same images; a model whose cost depends on the image (the
    gated ensemble runs extra passes for unsure ones) must be timed on the same mix, not on
    the first `size` images over and over.
    """
    count = len(images)
    cycled = np.concatenate([images] * (1 + -(-size // count)))
    return [np.ascontiguousarray(cycled[start:start + size]) for start in range(0, count, size)]


class LimitTimer:
    """One session over the image set, kept open so that a batch size can be timed more than once
    (the paired rounds time it again beside each server point)."""

    def __init__(self, model_path: Path, images: np.ndarray, intra_op_threads: int):
        self.runner = session(model_path, intra_op_threads)
        self.images = images
        self.input_name, self.output_name = self.runner.get_inputs()[0].name, self.runner.get_outputs()[0].name

    def time(self, size: int, seconds: float) -> dict[str, float]:
        """Back-to-back runs of batch `size` for `seconds` (at least 5): img/s, p50 and p99 per run."""
        batches = batches_of(self.images, size)
        for batch in batches[:3]:  # warm-up: first runs of a shape allocate
            self.runner.run([self.output_name], {self.input_name: batch})
        times = []
        began = time.perf_counter()
        while time.perf_counter() - began < seconds or len(times) < 5:
            batch = batches[len(times) % len(batches)]
            t0 = time.perf_counter()
            self.runner.run([self.output_name], {self.input_name: batch})
            times.append(time.perf_counter() - t0)
        elapsed = np.asarray(times)
        return {"throughput": size * len(elapsed) / elapsed.sum(),
                "p50_ms": float(np.percentile(elapsed, 50) * 1000),
                "p99_ms": float(np.percentile(elapsed, 99) * 1000)}


def measure(model_path: Path, images: np.ndarray, intra_op_threads: int, seconds_per_size: float,
            batch_sizes: tuple[int, ...] = BATCH_SIZES, label: str = "") -> LimitResult:
    timer = LimitTimer(model_path, images, intra_op_threads)
    per_batch = {}
    for size in batch_sizes:
        per_batch[size] = timer.time(size, seconds_per_size)
        print(f"  limit {label or model_path}: batch {size:4d}: {per_batch[size]['throughput']:8.1f} img/s  "
              f"p50 {per_batch[size]['p50_ms']:7.2f} ms", flush=True)
    return LimitResult(str(model_path), intra_op_threads, per_batch)
