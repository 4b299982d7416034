"""Classify images with a running server, any number of them, over ClassifyStream.

    python -m serving.client PATHS... [--output FILE.jsonl|FILE.csv] [--target HOST:PORT] [--model NAME]
    python -m serving.client explain IMAGE --output OVERLAY.png      (serving/client/explain_cli.py)

PATHS: image files; directories (every .png .jpg .jpeg .bmp .gif below them, sorted); glob
patterns, quoted so that the shell leaves them ('photos/**/*.jpg'); @LIST, a text file naming
one such PATH per line (@- reads them from standard input).

Without --output, one line per image on stdout. With --output, one row per image in FILE,
JSON Lines (.jsonl) or CSV (.csv) by its extension (docs/client.md). A progress bar and the
summary go to stderr. RESOURCE_EXHAUSTED and UNAVAILABLE are retried with back-off, never
sooner than the server's retry-after hint. Exit status: 0 when every image was classified,
1 when any failed (its row says why), 2 for bad usage (no image found, an unknown --output
extension, an unreadable @LIST).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import glob
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from serving.client.aio import DEFAULT_MAX_IN_FLIGHT, AsyncClassifier
from serving.client.connection import add_call_arguments
from serving.client.results import Result
from serving.client.retry import Retry, RetryPolicy
from serving.client.rows import RowWriter, format_of, open_rows, row_of

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
GLOB_CHARACTERS = frozenset("*?[")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def expand(spec: str) -> list[Path]:
    """The image files one PATH names: itself, a directory's images, or a glob's matches (maybe none)."""
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if path.exists() or not GLOB_CHARACTERS & set(spec):
        return [path]  # a file, or a name that reads as one: its row will say if it cannot be read
    return sorted(Path(match) for match in glob.glob(spec, recursive=True) if os.path.isfile(match))


def image_files(specs: list[str], stdin=sys.stdin) -> tuple[list[Path], list[str]]:
    """(every image file, in order; the PATHs that matched none). @LIST expands to its lines."""
    files: list[Path] = []
    unmatched: list[str] = []
    for spec in specs:
        if spec.startswith("@"):
            source = stdin.read() if spec == "@-" else Path(spec[1:]).read_text(encoding="utf-8")
            names = [line.strip() for line in source.splitlines() if line.strip()]
        else:
            names = [spec]
        for name in names:
            found = expand(name)
            files.extend(found)
            if not found:
                unmatched.append(name)
    return files, unmatched


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, directories, globs or @LIST files")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="write one row per image here: JSON Lines (.jsonl) or CSV (.csv); "
                             "without it, one line per image on stdout")
    add_call_arguments(parser, timeout=10.0)
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                        help=f"images on their way at once (default {DEFAULT_MAX_IN_FLIGHT})")
    parser.add_argument("--attempts", type=int, default=RetryPolicy.max_attempts,
                        help=f"tries per image for RESOURCE_EXHAUSTED and UNAVAILABLE "
                             f"(default {RetryPolicy.max_attempts}; 1: no retries)")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="the progress bar on stderr (auto: when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.output is not None:
        try:
            format_of(args.output)
        except ValueError as exc:
            parser.error(str(exc))
    if args.version and args.label:
        parser.error("name --version or --label, not both")
    if args.max_in_flight < 1 or args.attempts < 1:
        parser.error("--max-in-flight and --attempts must be >= 1")
    return args


def human_line(path: str, result: Result) -> str:
    """What the CLI prints per image without --output (as it always has)."""
    if result.classification is None:
        return f"{path}: {result.error}"
    answer = result.classification
    ranked = ", ".join(f"{p.label} {p.probability:.3f}" for p in answer.predictions)
    label = f" {answer.version_label}" if answer.version_label else ""
    unsure = " (unsure)" if answer.unsure else ""
    return f"{path}: {ranked}{unsure}  [{answer.model} v{answer.version}{label}]"


@dataclass
class Tally:
    images: int = 0
    failed: collections.Counter = field(default_factory=collections.Counter)  # by status code name
    retried_images: int = 0
    seconds: float = 0.0

    def count(self, result: Result) -> None:
        self.images += 1
        if result.error is not None:
            code = result.error.code
            self.failed[code.name if code is not None else "unreadable"] += 1

    def heard(self, retry: Retry) -> None:
        self.retried_images += retry.images

    def summary(self, output: Path | None) -> str:
        failed = sum(self.failed.values())
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        parts = [f"classified {self.images - failed:,} of {self.images:,} images in {self.seconds:.3g} s "
                 f"({rate:,.0f} img/s)"]
        if failed:
            parts.append(f"{failed:,} failed: " + ", ".join(f"{code} {n:,}" for code, n in self.failed.most_common()))
        if self.retried_images:
            parts.append(f"{self.retried_images:,} retries")
        if output is not None:
            parts.append(f"rows in {output}")
        return "; ".join(parts)


async def classify_files(args: argparse.Namespace, files: list[Path], emit: Callable[[str, Result], None],
                         tally: Tally) -> None:
    progress = tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True,
                    disable={"auto": None, "on": False, "off": True}[args.progress])
    started = time.perf_counter()
    classifier = AsyncClassifier(
        args.target, model=args.model, version=args.version, label=args.label, top_k=args.top_k, token=args.token,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout,
        retry=RetryPolicy(max_attempts=args.attempts), on_retry=tally.heard)
    try:
        async with classifier:
            async for result in classifier.classify_many(files, max_in_flight=args.max_in_flight):
                emit(str(result.input), result)
                tally.count(result)
                progress.update(1)
    finally:
        tally.seconds = time.perf_counter() - started
        progress.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["explain"]:  # the subcommand; a file named explain is ./explain
        from serving.client import explain_cli

        return explain_cli.main(argv[1:])
    args = parse_args(argv)
    try:
        files, unmatched = image_files(args.paths)
    except OSError as exc:
        print(f"cannot read the list {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    for spec in unmatched:
        print(f"{spec}: matches no file", file=sys.stderr)
    if not files:
        print("no image files found", file=sys.stderr)
        return EXIT_USAGE
    rows: RowWriter | None = open_rows(args.output) if args.output is not None else None

    def emit(path: str, result: Result) -> None:
        if rows is not None:
            rows.write(row_of(path, result))
        else:
            tqdm.write(human_line(path, result), file=sys.stdout)

    tally = Tally()
    try:
        asyncio.run(classify_files(args, files, emit, tally))
    except KeyboardInterrupt:
        print(f"interrupted after {tally.images:,} of {len(files):,} images", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout went away (| head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        if rows is not None:
            rows.close()
    print(tally.summary(args.output), file=sys.stderr)
    return EXIT_FAILED if tally.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
