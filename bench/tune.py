"""`python -m bench.tune`: the tuning experiments behind bench/NOTES.md, rerunnable.

1. Server flag variants: our server, native raw (or `--input png|tensor`) inputs, closed loop at a few
   concurrencies, one fresh server per variant (same run, same machine, so variants compare to
   the baseline). "(patched)" variants change something that has no flag (bench/patched_serving.py).
2. onnxruntime session options in-process: thread spinning, memory arena, graph optimisation,
   IOBinding.
3. Per-image costs of the request path in-process: PNG decode, raw pixels (np.frombuffer) vs a
   copy, protobuf parse of a request.
Writes bench/results/tuning/tuning.md (+ tuning.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import timeit
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from bench import limit
from bench.endpoints import native_endpoint, png_bytes, cifar_test_images
from bench.loadgen import closed_loop
from bench.run import FP32_MODEL, MODEL_FILE, RESULTS, bench_repository, newest_version, training_running
from bench.servers import OurServer, PhaseTimes
from serving import images as imaging
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb

VARIANTS: dict[str, list[str]] = {
    "baseline (defaults)": [],
    "--access-log off": ["--access-log", "off"],
    "--max-batch-delay-ms 1": ["--max-batch-delay-ms", "1"],
    "--max-batch-delay-ms 3": ["--max-batch-delay-ms", "3"],
    "--max-batch-size 16": ["--max-batch-size", "16"],
    "--max-batch-size 128": ["--max-batch-size", "128", "--max-queue-size", "1024"],
    "--intra-op-threads 1": ["--intra-op-threads", "1"],
    "--graph-optimization basic": ["--graph-optimization", "basic"],
    "--event-loop asyncio": ["--event-loop", "asyncio"],
    "--max-concurrent-streams 1000": ["--max-concurrent-streams", "1000"],
    "onnxruntime spinning off (patched)": ["session.intra_op.allow_spinning=0", "--"],
    "GIL switch interval 0.5 ms (patched)": ["sys.switchinterval=0.0005", "--"],
    "GIL switch interval 0.1 ms (patched)": ["sys.switchinterval=0.0001", "--"],
    "gRPC optimization_target throughput (patched)": ["grpc_option.grpc.optimization_target=throughput", "--"],
    "gRPC optimization_target latency (patched)": ["grpc_option.grpc.optimization_target=latency", "--"],
    # Needs root (a negative nice); the batcher and onnxruntime threads inherit it from the scan.
    "batcher + onnxruntime threads at nice -5 (patched)": ["inference_nice=-5", "--"],
    "batcher + onnxruntime threads at nice 10 (patched)": ["inference_nice=10", "--"],
    "onnxruntime's worker thread only at nice 10 (patched)": ["worker_nice=10", "--"],
    "onnxruntime dynamic block base 4 (patched)": ["session.dynamic_block_base=4", "--"],
    # Meaningful with --input png: every encoded image decoded in a thread, not only large ones.
    "every PNG decoded in a thread (patched)": ["decode_inline_max_bytes=0", "--"],
    "spinning off (patched) + --intra-op-threads 1": ["session.intra_op.allow_spinning=0", "--",
                                                      "--intra-op-threads", "1"],
}
PATCHED_LAUNCHER = ["-m", "bench.patched_serving"]  # variants whose list holds "--": session entries before it
# Not our server: the same model and batcher with no per-request bookkeeping (bench/bare_server.py).
BARE_VARIANTS: dict[str, list[str]] = {
    "bare grpc.aio server on uvloop (no bookkeeping)": ["--mode", "aio"],
    "bare grpc.aio server on asyncio's loop (no bookkeeping)": ["--mode", "aio", "--event-loop", "asyncio"],
    "bare thread-pool server (80 threads; no bookkeeping)": ["--mode", "sync"],
}
BARE_LAUNCHER = ["-m", "bench.bare_server"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--concurrencies", default="1,16,64")
    parser.add_argument("--variants", default="", help="comma-separated subset of variant names (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", choices=("raw", "png", "tensor"), default="raw",
                        help="image form the server variants get (tensor: float32 in [0, 1])")
    parser.add_argument("--out", type=Path, default=RESULTS / "tuning")
    return parser.parse_args(argv)


def phase_times(server: OurServer) -> PhaseTimes:
    """The server's phase histograms; none for the bare servers, which have no metrics."""
    if server.launcher == BARE_LAUNCHER:
        return PhaseTimes({}, {})
    return server.phase_times()


def server_variants(args: argparse.Namespace, images) -> list[dict]:
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()] or [*VARIANTS, *BARE_VARIANTS]
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    endpoint = native_endpoint(images, args.input)
    rows = []
    for name in wanted:
        # The variant's flags come last, so a variant's --intra-op-threads wins over the default.
        variant, launcher = VARIANTS.get(name), None
        if variant is None:
            variant, launcher = BARE_VARIANTS[name], BARE_LAUNCHER
        elif "--" in variant:
            split = variant.index("--")
            launcher, variant = [*PATCHED_LAUNCHER, *variant[:split + 1]], variant[split + 1:]
        flags = ["--intra-op-threads", str(args.threads), "--default-model", FP32_MODEL, *variant]
        server = OurServer(args.out / "raw" / "tune.log", flags, bench_repository(args.out / "raw", FP32_MODEL),
                           launcher).start()
        try:
            for concurrency in concurrencies:
                async def run():
                    async with grpc.aio.insecure_channel(server.target) as channel:
                        return await closed_loop(channel, endpoint, concurrency, args.seconds, 1.0,
                                                 label=f"{name} c={concurrency}", server_cpu=server.cpu_seconds)

                before = phase_times(server)
                result = asyncio.run(run())
                rows.append({"variant": name, "input": args.input, **result.summary(),
                             "server_ms": phase_times(server).minus(before).mean_ms()})
        finally:
            server.stop()
    return rows


def bound_runner(session: ort.InferenceSession, feed_name: str, output: str):
    """IOBinding with one output buffer per batch size, bound once and reused (no output allocation per run)."""
    bindings: dict[int, tuple[ort.IOBinding, ort.OrtValue]] = {}
    classes = session.get_outputs()[0].shape[-1]

    def run(batch: np.ndarray) -> np.ndarray:
        if len(batch) not in bindings:
            binding = session.io_binding()
            buffer = ort.OrtValue.ortvalue_from_shape_and_type([len(batch), classes], np.float32)
            binding.bind_ortvalue_output(output, buffer)
            bindings[len(batch)] = (binding, buffer)
        binding, buffer = bindings[len(batch)]
        binding.bind_cpu_input(feed_name, batch)
        session.run_with_iobinding(binding)
        return buffer.numpy()

    return run


def session_variants(threads: int, images: np.ndarray, seconds: float) -> list[dict]:
    path = newest_version(FP32_MODEL) / MODEL_FILE
    variants = {
        "defaults (spinning on, arena on, ORT_ENABLE_ALL)": {},
        "spinning off": {"config": {"session.intra_op.allow_spinning": "0"}},
        "arena off": {"arena": False},
        "ORT_ENABLE_BASIC": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC},
        "ORT_DISABLE_ALL": {"level": ort.GraphOptimizationLevel.ORT_DISABLE_ALL},
        "IOBinding, output buffer bound once per batch size": {"iobinding": True},
    }
    rows = []
    for name, variant in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = variant.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.enable_cpu_mem_arena = variant.get("arena", True)
        for key, value in variant.get("config", {}).items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        feed_name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
        if variant.get("iobinding"):
            run = bound_runner(session, feed_name, output)
        else:
            def run(batch: np.ndarray, session=session, feed_name=feed_name, output=output) -> np.ndarray:
                return session.run([output], {feed_name: batch})[0]
        row = {"variant": name}
        for size in (1, 64):
            batches = limit.batches_of(images, size)  # the same image mix as the limit and the servers
            run(batches[0])
            times, began = [], time.perf_counter()
            while time.perf_counter() - began < seconds:
                batch = batches[len(times) % len(batches)]
                t0 = time.perf_counter()
                run(batch)
                times.append(time.perf_counter() - t0)
            row[f"batch{size}_p50_ms"] = round(float(np.percentile(times, 50)) * 1000, 3)
            row[f"batch{size}_img_s"] = round(size * len(times) / sum(times), 1)
        rows.append(row)
        print(f"  session {name}: {row}", flush=True)
    return rows


def request_path_costs(images: np.ndarray) -> list[dict]:
    """Microseconds per image for each step a request's pixels go through before the batcher."""
    pixels = images[0]
    encoded = png_bytes(pixels)
    raw = pixels.tobytes()
    request = pb.ClassifyRequest(image=pb.Image(raw=pb.RawPixels(data=raw, height=32, width=32, channels=3)))
    wire = request.SerializeToString()
    steps = {
        "PNG decode + RGB (imaging.decode_encoded)": lambda: imaging.decode_encoded(encoded, 1 << 24),
        "raw pixels, zero-copy (imaging.from_raw_pixels: np.frombuffer)": lambda: imaging.from_raw_pixels(raw, 32, 32, 3, 1 << 24),
        "raw pixels, copied (np.array(bytearray(...)))": lambda: np.array(bytearray(raw), dtype=np.uint8).reshape(32, 32, 3),
        "protobuf parse of a raw ClassifyRequest": lambda: pb.ClassifyRequest.FromString(wire),
        "stack 64 images into a batch (np.concatenate; per batch, not per image)": lambda: np.concatenate([images[:1]] * 64),
    }
    rows = []
    for name, step in steps.items():
        number = 2000
        seconds = min(timeit.repeat(step, number=number, repeat=3)) / number
        rows.append({"step": name, "us": round(seconds * 1e6, 2)})
    return rows


def markdown(result: dict) -> str:
    lines = [f"# Tuning experiments ({result['date_utc']} UTC)", ""]
    if result["training_running"]:
        lines += ["**NOT VALID: a training run was using the CPU; differences below are indicative only.**", ""]
    lines += [f"## Server flags (native, {result.get('input', 'raw')} inputs, closed loop)", "",
              "Server-side means come from the server's own histograms over the same window: the whole "
              "handler, and within it the queue wait (the hand-off to the batcher thread included), "
              "onnxruntime, decode + post-processing.", "",
              "| variant | c | img/s | p50 ms | p99 ms | errors | server CPU ms/img "
              "| handler ms | queue ms | inference ms | decode + post ms |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for row in result["server"]:
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0"
        phases = row.get("server_ms", {})
        lines.append(f"| {row['variant']} | {row['concurrency']} | {row['throughput']:.1f} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {errors} | {row.get('server_cpu_ms_per_image', nan):.2f} | "
                     f"{phases.get('handler', nan):.3f} | {phases.get('queue_wait', nan):.3f} | "
                     f"{phases.get('inference', nan):.3f} | "
                     f"{phases.get('decode', nan) + phases.get('postprocess', nan):.3f} |")
    lines += ["", "## onnxruntime session options (in-process)", "",
              "| variant | batch 1 p50 ms | batch 1 img/s | batch 64 img/s |", "|---|---:|---:|---:|"]
    for row in result["session"]:
        lines.append(f"| {row['variant']} | {row['batch1_p50_ms']:.3f} | {row['batch1_img_s']:.0f} | {row['batch64_img_s']:.0f} |")
    lines += ["", "## Request path, per image (in-process)", "", "| step | µs |", "|---|---:|"]
    lines += [f"| {row['step']} | {row['us']:.1f} |" for row in result["request_path"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = cifar_test_images(1000)
    result = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "training_running": training_running(),
              "input": args.input}
    result["request_path"] = request_path_costs(images.images)
    result["session"] = session_variants(args.threads, images.images, max(1.0, args.seconds / 4))
    result["server"] = server_variants(args, images)
    result["training_running"] = result["training_running"] or training_running()
    (args.out / "tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "tuning.md").write_text(markdown(result))
    print(f"wrote {args.out / 'tuning.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
