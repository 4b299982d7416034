"""`python -m bench.profile`: where our server's CPU goes under load (py-spy, sampling, no code changes).

Starts the server, drives it with the closed-loop load generator, records it with py-spy for
the measured window (all threads; --native adds C frames: onnxruntime, gRPC core) and writes
bench/results/profile/<input>.svg (flame graph) plus profile.md: the share of CPU samples
per function (self time) and per thread (event loop, batcher, gRPC pollers).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench.endpoints import native_endpoint, cifar_test_images
from bench.loadgen import closed_loop
from bench.run import FP32_MODEL, RESULTS, bench_repository
from bench.servers import OurServer

PY_SPY = Path(sys.executable).parent / "py-spy"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--inputs", default="raw,png", help="comma-separated: raw, png")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include native frames (slower sampling)")
    parser.add_argument("--server-flags", default="", help="extra flags for our server")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile")
    return parser.parse_args(argv)


def collapsed_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def frame_name(frame: str) -> str:
    """'function (path/to/file.py:123)' -> 'function (file.py)'."""
    function, _, where = frame.partition(" (")
    source = where.rstrip(")").rsplit(":", 1)[0]
    return f"{function} ({Path(source).name})" if source else function


def summarize(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    total = sum(count for _, count in stacks) or 1
    by_leaf: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        by_thread[thread.split(" (")[0] if thread.startswith("process") else thread] += count
        by_leaf[frame_name(frames[-1])] += count
        for name in {frame_name(f) for f in frames[1:]}:
            inclusive[name] += count
    lines = [f"{total} samples.", "", "| thread | share |", "|---|---:|"]
    lines += [f"| `{name}` | {count / total:.1%} |" for name, count in by_thread.most_common(10)]
    lines += ["", "| self time: function | share |", "|---|---:|"]
    lines += [f"| `{name}` | {count / total:.1%} |" for name, count in by_leaf.most_common(top)]
    lines += ["", "| inclusive: function | share |", "|---|---:|"]
    lines += [f"| `{name}` | {count / total:.1%} |" for name, count in inclusive.most_common(top)]
    return "\n".join(lines)


def profile_one(args: argparse.Namespace, input_form: str, images) -> str:
    work = args.out / "raw"
    flags = ["--intra-op-threads", str(args.threads), "--default-model", FP32_MODEL, *args.server_flags.split()]
    server = OurServer(work / f"profile-{input_form}.log", flags, bench_repository(work, FP32_MODEL)).start()
    endpoint = native_endpoint(images, input_form)
    warmup_s = 2.0
    collapsed, svg = work / f"{input_form}.txt", args.out / f"{input_form}.svg"
    try:
        async def load():
            async with grpc.aio.insecure_channel(server.target) as channel:
                return await closed_loop(channel, endpoint, args.concurrency, args.seconds, warmup_s,
                                         label=f"profile {input_form} c={args.concurrency}")

        def record(fmt: str, path: Path) -> subprocess.Popen:
            command = [str(PY_SPY), "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)),
                       "--rate", str(args.rate), "--threads", "--format", fmt, "--output", str(path)]
            # Native unwinding must pause the process per sample; Python-only sampling need not.
            command.append("--native" if args.native else "--nonblocking")
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        async def main():
            task = asyncio.ensure_future(load())
            await asyncio.sleep(warmup_s)
            recorders = [record("raw", collapsed), record("flamegraph", svg)]
            result = await task
            for recorder in recorders:
                _, err = recorder.communicate(timeout=60)
                if recorder.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {err.decode()[-500:]}")
            return result

        result = asyncio.run(main())
    finally:
        server.stop()
    header = (f"## {input_form} inputs, closed loop c={args.concurrency}, {args.seconds:g} s: "
              f"{result.throughput:.0f} img/s, p50 {result.percentile_ms(50):.1f} ms\n\nFlame graph: `{svg.name}`.\n")
    return header + "\n" + summarize(collapsed_stacks(collapsed)) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = cifar_test_images(1000)
    sections = [f"# Server profile (py-spy, {args.rate} Hz, {'with' if args.native else 'without'} native frames)",
                "", f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. Shares are of CPU samples of the server "
                "process (idle threads not sampled).", ""]
    for input_form in args.inputs.split(","):
        sections.append(profile_one(args, input_form.strip(), images))
    (args.out / "profile.md").write_text("\n".join(sections))
    print(f"wrote {args.out / 'profile.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
