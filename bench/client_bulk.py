"""The client-bulk row: the bulk CLI on a folder of PNGs, end to end, beside ClassifyStream PNG load.

    python -m serving.client FOLDER --output rows.jsonl --progress off

on 10,000 CIFAR-10 test images written as PNG files (full mode; quick: 1,000), timed from the
process start to its exit (interpreter start, reading the files, the stream, writing the rows),
against the same server that the bench's own `ours-stream-png` load (c=64, the same images
pre-serialized) is timed on right beside it. Issue 26's goal: the CLI's images/s >= 90% of that
load's, judged on the median over the paired rounds (bench/run.py `Bench.client_bulk`).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.endpoints import png_bytes
from training import data as cifar

CLIENT_TARGET = 0.90  # of the ClassifyStream PNG load's images/s
CLIENT_CONCURRENCY = 64  # the load's messages in flight; the CLI's default --max-in-flight is the same


def write_pngs(images: cifar.Split, folder: Path) -> Path:
    """One PNG per image, named by its index in the test set (the rows' paths say which label is right)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, pixels in enumerate(images.images):
        (folder / f"{index:05d}.png").write_bytes(png_bytes(pixels))
    return folder


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(target: str, folder: Path, labels, rows_path: Path, extra_args: tuple[str, ...] = ()) -> dict:
    """One timed run of the CLI on `folder`: images/s end to end, failures, top-1 against the labels."""
    argv = [sys.executable, "-m", "serving.client", str(folder), "--target", target, "--output", str(rows_path),
            "--progress", "off", *extra_args]
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    client_cpu_s = _children_cpu_s() - cpu_before
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    answered = [row for row in rows if "error" not in row]
    hits = sum(row["label"] == cifar.CLASS_NAMES[int(labels[int(Path(row["path"]).stem)])] for row in answered)
    return {
        "images": len(rows), "seconds": round(seconds, 3),
        "throughput": round(len(answered) / seconds, 1) if seconds > 0 else 0.0,
        "failed": len(rows) - len(answered), "exit_code": run.returncode,
        "accuracy": hits / len(answered) if answered else float("nan"),
        "client_cpu_ms_per_image": round(client_cpu_s * 1000 / len(rows), 3) if rows else float("nan"),
        "summary": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "",
    }
