"""`python -m bench`: every row of the benchmark, one run, one machine; writes the table and charts.

Rows (each a separate server process; the load generator is this process):
  limit        raw onnxruntime in this process, best batch size (the ceiling)
  grpc-floor   our server's grpc.health.v1 Check: what one gRPC round trip costs, no inference
  ours-raw     our server, native Classify, raw uint8 pixels (closed loop + open loop)
  ours-png     our server, native Classify, PNG bytes
  ours-stream  our server, native ClassifyStream, raw pixels, one image per message (c = messages in flight)
  ours-stream-png  the same with PNG bytes
  ours-batch32 our server, native ClassifyBatch of 32 raw images per call (client-side batching)
  ours-v2      our server, V2 ModelInfer (only when the server offers inference.GRPCInferenceService)
  mlserver-v2  the peer: MLServer 1.7.1 + onnxruntime custom runtime, adaptive batching (closed + open loop);
               up at the same time as ours, its points interleaved with ours-v2's (AB, BA, ...)
  naive-raw    our server with --max-batch-size 1: one onnxruntime call per request
  int8-raw     our server on models/cifar10-int8 (only when present), against its own limit
  client-bulk  the bulk CLI (`python -m serving.client DIR --output rows.jsonl`) on 10,000 PNG files
               (quick: 1,000), end to end, beside ClassifyStream PNG load at c=64 on the same server, in
               paired rounds: the client's share of the stream's images/s (bench/client_bulk.py)
  shadow       our server, native Classify at c=16 with 10% of the answered requests shadowed by a
               second version of cifar10, beside the same server without the shadow (config switched
               by ReloadModels), in paired rounds: what shadowing costs the callers' p50
  trust        our server beside the same server with the trust work patched out (bench/patched_serving.py
               trust=off: no calibration, unsure score or drift window), native Classify one image per
               call at c=1 and c=16, in paired rounds: what trust costs the callers' throughput
  paired       the targets' points again (ours-raw and ours-stream at c=1, every one-image row at
               c=64), each timed right beside a fresh timing of the limit, leading in alternation,
               for a few rounds: the verdicts take the median of these same-minute ratios; and
               ours-v2 beside mlserver-v2 at c=16 and c=64 the same way, for the peer target
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import onnxruntime as ort

from bench import limit as raw_limit
from bench import client_bulk, report, shadow_cost, v2proto
from bench.endpoints import (Endpoint, cifar_test_images, health_check_endpoint, native_batch_endpoint, native_endpoint,
                             native_stream_endpoint, v2_endpoint)
from bench.loadgen import STREAM_DEPTH, LoadResult, closed_loop, open_loop
from bench.servers import MLSERVER_VENV, REPO_ROOT, MLServerPeer, OurServer

MODELS = REPO_ROOT / "models"
FP32_MODEL, INT8_MODEL = "cifar10", "cifar10-int8"
MODEL_FILE = "model.onnx"
RESULTS = REPO_ROOT / "bench" / "results"


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    duration_s: float
    limit_seconds_per_size: float
    startup_repeats: int
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    # ClassifyBatch calls of BATCH_ROW_IMAGES images each: 8 in flight already keep 256 images queued.
    batch_concurrencies: tuple[int, ...] = (1, 2, 4, 8)
    paired_rounds: int = 0
    paired_seconds: float = 0.0
    client_images: int = 1000  # PNG files the client-bulk row's CLI classifies per run


BATCH_ROW_IMAGES = 32
BATCH_ROW = f"ours-batch{BATCH_ROW_IMAGES}"

PLANS = {
    "quick": Plan(warmup_s=1.0, duration_s=3.0, limit_seconds_per_size=0.5, startup_repeats=1,
                  paired_rounds=1, paired_seconds=1.0, client_images=1000),
    "full": Plan(warmup_s=3.0, duration_s=15.0, limit_seconds_per_size=3.0, startup_repeats=5,
                 paired_rounds=4, paired_seconds=5.0, client_images=10_000),
}
# The points the targets judge, timed again beside the limit: (row, concurrency). The limit side
# runs batch 1 beside concurrency 1 and its best batch beside the saturation points.
PAIRED_POINTS: tuple[tuple[str, int], ...] = (
    ("ours-raw", 1), ("ours-stream", 1), ("ours-raw", 64), ("ours-png", 64), ("ours-stream", 64), ("ours-stream-png", 64))
PAIRED_WARMUP_S = 1.0
# The peer target's points, timed again ours-v2 beside mlserver-v2 (both servers up).
PEER_PAIRED_CONCURRENCIES: tuple[int, ...] = (16, 64)
TRUST_CONCURRENCIES: tuple[int, ...] = (1, 16)  # one image per call: the cost target


@dataclass
class Scenario:
    key: str
    title: str
    runs: list[LoadResult] = field(default_factory=list)
    batch_sizes: dict[str, dict] = field(default_factory=dict)  # run label -> distribution + mean


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(PLANS), default=os.environ.get("BENCH_MODE", "quick"))
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<mode>)")
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra-op threads for the server, the limit and the peer (default 2)")
    parser.add_argument("--open-rate", type=float, default=float(os.environ.get("BENCH_OPEN_RATE", 200)),
                        help="open-loop request rate, requests/s (default 200)")
    parser.add_argument("--images", type=int, default=1000, help="distinct test images cycled through (default 1000)")
    parser.add_argument("--server-flags", default=os.environ.get("BENCH_SERVER_FLAGS", ""),
                        help="extra flags for our server, e.g. '--access-log off'")
    parser.add_argument("--peer-batch-time-ms", type=float, default=2.0,
                        help="MLServer max_batch_time in ms (default 2)")
    parser.add_argument("--peer-workers", type=int, default=1, help="MLServer parallel_workers (default 1)")
    parser.add_argument("--skip", default="", help="comma-separated rows to skip (e.g. mlserver-v2,naive-raw)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def training_running() -> bool:
    """Timings taken while a training run holds the cores are not valid (a paused one, state T, is fine)."""
    found = subprocess.run(["pgrep", "-f", "training.train"], capture_output=True, text=True)
    for pid in found.stdout.split():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "Z"):
            return True
    return False


def newest_version(model: str) -> Path:
    """The version directory our server serves by default (its policy is latest:1)."""
    versions = sorted((int(p.name), p) for p in (MODELS / model).glob("*") if p.name.isdigit() and p.is_dir())
    return versions[-1][1] if versions else MODELS / model / "1"


_COPIED_THIS_RUN: set[Path] = set()


def bench_repository(work: Path, model: str) -> Path:
    """A repository holding a copy of just `model`, so RSS counts one model.

    A copy, not a link: the server refuses versions that point outside its repository. Made
    afresh by each run, so a model re-exported since the last run is the one measured.
    """
    repository = work / f"repository-{model}"
    if repository not in _COPIED_THIS_RUN:
        shutil.rmtree(repository, ignore_errors=True)
        shutil.copytree(MODELS / model, repository / model)
        _COPIED_THIS_RUN.add(repository)
    return repository


@dataclass(frozen=True)
class Row:
    """One row's load against one server: where its points go and whose batches they form."""

    scenario: Scenario
    server: OurServer | MLServerPeer
    endpoint: Endpoint
    batch_model: str | None  # our model whose classifier_batch_size to read (None: the peer)


def interleaved(points: list, rows: list) -> list[tuple]:
    """Every point for every row, the rows' order alternating point by point (AB, BA, AB, ...)."""
    return [(point, row) for i, point in enumerate(points) for row in (rows if i % 2 == 0 else rows[::-1])]


def paired_order(rounds: int, points: list) -> list[tuple[int, object, bool]]:
    """(round, point, limit_first) for every point of every round: within a round consecutive
    pairs alternate which side goes first, and each point alternates from round to round, so
    neither the limit nor the server always gets the later minute of a target's pairs (with an
    even number of points, alternating by position alone gave each point the same first side in
    every round)."""
    return [(round_index, point, (round_index + index) % 2 == 0)
            for round_index in range(rounds) for index, point in enumerate(points)]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.plan = PLANS[args.mode]
        self.out = (args.out or RESULTS / args.mode).resolve()  # servers run with other cwds
        self.work = self.out / "raw"
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        self.images = cifar_test_images(args.images)
        self.scenarios: list[Scenario] = []
        self.results: dict = {"mode": args.mode, "plan": self.plan.__dict__, "threads": args.threads,
                              "open_rate": args.open_rate, "environment": environment(), "servers": {},
                              "limits": {}, "notes": []}

    # --- drivers -------------------------------------------------------------------------------

    def _points(self, open_rate: float | None, concurrencies: tuple[int, ...] | None) -> list[tuple[str, int | float]]:
        points: list[tuple[str, int | float]] = [("closed", c) for c in (concurrencies or self.plan.concurrencies)]
        if open_rate:
            points.append(("open", open_rate))
        return points

    def drive(self, scenario: Scenario, server, endpoint: Endpoint, open_rate: float | None = None,
              batch_model: str | None = None, concurrencies: tuple[int, ...] | None = None) -> None:
        """Closed loop at every concurrency (and open loop at open_rate) against one server."""
        row = Row(scenario, server, endpoint, batch_model)
        for mode, value in self._points(open_rate, concurrencies):
            self._drive_point(row, mode, value)

    def drive_side_by_side(self, rows: list[Row], open_rate: float | None = None) -> None:
        """The same points against servers that are all up at once, interleaved point by point."""
        for (mode, value), row in interleaved(self._points(open_rate, None), rows):
            self._drive_point(row, mode, value)

    def _drive_point(self, row: Row, mode: str, value: int | float) -> None:
        scenario, server = row.scenario, row.server
        label = f"{scenario.key} c={value}" if mode == "closed" else f"{scenario.key} open {value:g}/s"
        before = server.batch_sizes(row.batch_model) if row.batch_model else None
        result = asyncio.run(self._one_run(server, row.endpoint, mode, value, label))
        if before is not None:
            formed = server.batch_sizes(row.batch_model).minus(before)
            scenario.batch_sizes[label] = {"mean": round(formed.mean, 2), "batches": formed.distribution()}
            result.extra["mean_batch"] = round(formed.mean, 2)
        result.extra["server_rss_mb"] = round(server.rss_bytes() / 2**20, 1)
        scenario.runs.append(result)

    async def _one_run(self, server, endpoint: Endpoint, mode: str, value, label: str,
                       duration_s: float | None = None, warmup_s: float | None = None) -> LoadResult:
        options = [("grpc.max_receive_message_length", 64 * 2**20)]
        async with grpc.aio.insecure_channel(server.target, options=options) as channel:
            common = dict(duration_s=duration_s or self.plan.duration_s, warmup_s=warmup_s or self.plan.warmup_s,
                          label=label, progress=not self.args.no_progress, server_cpu=server.cpu_seconds)
            if mode == "closed":
                return await closed_loop(channel, endpoint, int(value), **common)
            return await open_loop(channel, endpoint, float(value), **common)

    def our_server(self, name: str, model: str, *flags: str, launcher: list[str] | None = None) -> OurServer:
        extra = self.args.server_flags.split() if self.args.server_flags else []
        server = OurServer(self.work / f"{name}.log",
                           ["--intra-op-threads", str(self.args.threads), "--default-model", model, *flags, *extra],
                           bench_repository(self.work, model), launcher)
        return server.start()

    # --- rows ----------------------------------------------------------------------------------

    def limits(self) -> None:
        for model in (FP32_MODEL, INT8_MODEL):
            path = newest_version(model) / MODEL_FILE
            if not path.exists():
                continue
            result = raw_limit.measure(path, self.images.images, self.args.threads,
                                       self.plan.limit_seconds_per_size, label=model)
            self.results["limits"][model] = result.summary()

    def limit_after_rows(self) -> None:
        """The fp32 limit again, at batch 1 and its best batch, once our rows have run: a 2-core
        machine's speed drifts over a run, and the targets take the better of the two limits."""
        before = self.results["limits"].get(FP32_MODEL)
        path = newest_version(FP32_MODEL) / MODEL_FILE
        if not before or not path.exists():
            return
        sizes = tuple(sorted({1, before["best_batch"]}))
        result = raw_limit.measure(path, self.images.images, self.args.threads, self.plan.limit_seconds_per_size,
                                   batch_sizes=sizes, label=f"{FP32_MODEL} after the rows")
        self.results.setdefault("limits_after_rows", {})[FP32_MODEL] = result.summary()

    def startup(self) -> None:
        """Process start -> health SERVING, fresh processes, median of `startup_repeats`; RSS when idle."""
        times, rss = [], []
        for attempt in range(self.plan.startup_repeats):
            server = self.our_server(f"startup-{attempt}", FP32_MODEL)
            try:
                times.append(server.startup_s)
                time.sleep(0.5)
                rss.append(server.rss_bytes() / 2**20)
            finally:
                server.stop()
        times.sort()
        self.results["servers"]["ours-startup"] = {
            "startup_s": round(times[len(times) // 2], 3), "startup_all_s": [round(t, 3) for t in times],
            "idle_rss_mb": round(max(rss), 1),
        }
        print(f"  startup: {times[len(times) // 2]:.2f} s to SERVING (median of {len(times)}), "
              f"idle RSS {max(rss):.0f} MB", flush=True)

    def ours(self) -> None:
        server = self.our_server("ours", FP32_MODEL)
        self._record_server("ours", server)
        try:
            if "grpc-floor" not in self.skip:
                scenario = self._scenario("grpc-floor", "ours, grpc.health.v1 Check: the per-call floor, no inference")
                self.drive(scenario, server, health_check_endpoint(), None, None, (1, 64))
            raw, png = native_endpoint(self.images, "raw"), native_endpoint(self.images, "png")
            rows = [("ours-raw", "ours, native, raw pixels", raw, self.args.open_rate),
                    ("ours-png", "ours, native, PNG", png, None),
                    ("ours-stream", f"ours, native ClassifyStream, raw pixels, one image per message, streams of "
                                    f"{STREAM_DEPTH} in flight", native_stream_endpoint(raw), None),
                    ("ours-stream-png", "ours, native ClassifyStream, PNG, as ours-stream", native_stream_endpoint(png), None)]
            driven: dict[str, Endpoint] = {}
            for key, title, endpoint, rate in rows:
                if key in self.skip:
                    continue
                scenario = self._scenario(key, title)
                self.drive(scenario, server, endpoint, rate, FP32_MODEL)
                driven[key] = endpoint
            if BATCH_ROW not in self.skip:
                scenario = self._scenario(BATCH_ROW, f"ours, native ClassifyBatch of {BATCH_ROW_IMAGES} raw images")
                self.drive(scenario, server, native_batch_endpoint(self.images, BATCH_ROW_IMAGES), None, FP32_MODEL,
                           self.plan.batch_concurrencies)
            self._v2_rows(server)
            if "paired" not in self.skip:
                self.paired(server, driven)
        finally:
            self._record_server("ours", server, final=True)
            server.stop()

    def paired(self, server: OurServer, endpoints: dict[str, Endpoint]) -> None:
        """The targets' points again, each timed right beside the limit, for `paired_rounds` rounds.

        One pass compares points that lie minutes apart, and this machine's speed drifts by 10-15%
        within minutes; a pair timed back to back shares its minute, and the median over the
        rounds is what the targets judge (report.targets).
        """
        limit = self.results["limits"].get(FP32_MODEL)
        path = newest_version(FP32_MODEL) / MODEL_FILE
        points = [point for point in PAIRED_POINTS if point[0] in endpoints]
        if not (limit and path.exists() and points and self.plan.paired_rounds):
            return
        print(f"== paired: {len(points)} points x {self.plan.paired_rounds} rounds, each beside the limit", flush=True)
        timer = raw_limit.LimitTimer(path, self.images.images, self.args.threads)
        seconds = self.plan.paired_seconds
        pairs = []
        for round_index, (key, concurrency), limit_first in paired_order(self.plan.paired_rounds, points):
            size = 1 if concurrency == 1 else limit["best_batch"]

            def time_ours(key: str = key, concurrency: int = concurrency) -> dict:
                return self._paired_point(server, endpoints[key], concurrency, f"paired {key} c={concurrency}")

            if limit_first:
                limit_side, ours_side = timer.time(size, seconds), time_ours()
            else:
                ours_side, limit_side = time_ours(), timer.time(size, seconds)
            pairs.append({"round": round_index, "row": key, "concurrency": concurrency, "limit_batch": size,
                          "limit_first": limit_first, "ours": ours_side,
                          "limit": {k: round(v, 3) for k, v in limit_side.items()}})
            print(f"  paired round {round_index} {key} c={concurrency}: ours {ours_side['throughput']:.0f} img/s "
                  f"p50 {ours_side['p50_ms']:.2f} ms; limit batch {size} {limit_side['throughput']:.0f} img/s "
                  f"p50 {limit_side['p50_ms']:.2f} ms", flush=True)
        self.results["paired"] = {"rounds": self.plan.paired_rounds, "seconds": seconds, "pairs": pairs}

    def paired_peer(self, ours: Row, peer: Row) -> None:
        """The peer target's points again: ours-v2 and the peer back to back, for `paired_rounds`
        rounds, the side that goes first alternating. Even interleaved, one pass compares a single
        point of each side, on a machine whose speed moves by 10-15% within minutes; the peer
        target takes the median of these same-minute ratios (report.targets).
        """
        print(f"== paired peer: c={PEER_PAIRED_CONCURRENCIES} x {self.plan.paired_rounds} rounds, "
              f"{ours.scenario.key} beside {peer.scenario.key}", flush=True)
        pairs = []
        for round_index, concurrency, ours_first in paired_order(self.plan.paired_rounds, list(PEER_PAIRED_CONCURRENCIES)):
            sides = {}
            for row in ((ours, peer) if ours_first else (peer, ours)):
                sides[row.scenario.key] = self._paired_point(row.server, row.endpoint, concurrency,
                                                             f"paired {row.scenario.key} c={concurrency}")
            ours_side, peer_side = sides[ours.scenario.key], sides[peer.scenario.key]
            pairs.append({"round": round_index, "concurrency": concurrency, "ours_first": ours_first,
                          "ours": ours_side, "peer": peer_side})
            print(f"  paired peer round {round_index} c={concurrency}: ours {ours_side['throughput']:.0f} img/s "
                  f"p99 {ours_side['p99_ms']:.1f} ms; peer {peer_side['throughput']:.0f} img/s "
                  f"p99 {peer_side['p99_ms']:.1f} ms", flush=True)
        self.results["paired_peer"] = {"rounds": self.plan.paired_rounds, "seconds": self.plan.paired_seconds,
                                       "pairs": pairs}

    def _paired_point(self, server, endpoint: Endpoint, concurrency: int, label: str) -> dict:
        result = asyncio.run(self._one_run(server, endpoint, "closed", concurrency, label,
                                           self.plan.paired_seconds, PAIRED_WARMUP_S))
        return {"throughput": round(result.throughput, 1), "p50_ms": round(result.percentile_ms(50), 3),
                "p99_ms": round(result.percentile_ms(99), 3), "errors": dict(result.errors)}

    def _v2_rows(self, ours: OurServer) -> None:
        """ours-v2 and the peer side by side: both servers up, their points interleaved, so the
        peer ratio compares the same minutes of a machine whose speed drifts (bench/NOTES.md)."""
        want_ours, want_peer = "ours-v2" not in self.skip, "mlserver-v2" not in self.skip
        if not (want_ours or want_peer):
            return
        v2 = self._v2_messages()
        rows = []
        if want_ours:
            with grpc.insecure_channel(ours.target) as channel:
                try:
                    endpoint = v2_endpoint(self.images, channel, FP32_MODEL, v2)
                    rows.append(Row(self._scenario("ours-v2", "ours, V2 ModelInfer, raw"), ours, endpoint, FP32_MODEL))
                except grpc.RpcError as exc:
                    note = (f"ours-v2 skipped: our server does not answer {v2proto.SERVICE} "
                            f"({exc.code().name}); the row appears once serving/v2_servicer.py is registered")
                    print("  " + note, flush=True)
                    self.results["notes"].append(note)
        peer = self._start_peer() if want_peer else None
        try:
            if peer is not None:
                with grpc.insecure_channel(peer.target) as channel:
                    endpoint = v2_endpoint(self.images, channel, FP32_MODEL, v2)
                scenario = self._scenario("mlserver-v2", "MLServer 1.7.1, V2 ModelInfer, raw (adaptive batching)")
                rows.append(Row(scenario, peer, endpoint, None))
            self.drive_side_by_side(rows, self.args.open_rate)
            if len(rows) == 2 and "paired" not in self.skip and self.plan.paired_rounds:
                self.paired_peer(*rows)
        finally:
            if peer is not None:
                self._record_server("mlserver", peer, final=True)
                peer.stop()

    def _start_peer(self) -> MLServerPeer:
        if not (MLSERVER_VENV / "bin" / "mlserver").exists():
            raise SystemExit(f"MLServer is not installed in {MLSERVER_VENV}: run `make bench-venvs` (or --skip mlserver-v2)")
        peer = MLServerPeer(self.work / "mlserver.log", newest_version(FP32_MODEL), self.work,
                            intra_op_threads=self.args.threads, max_batch_time_s=self.args.peer_batch_time_ms / 1000,
                            parallel_workers=self.args.peer_workers)
        peer.start()
        self._record_server("mlserver", peer)
        print(f"  mlserver: ready in {peer.startup_s:.2f} s", flush=True)
        return peer

    def naive(self) -> None:
        server = self.our_server("naive", FP32_MODEL, "--max-batch-size", "1")
        try:
            scenario = self._scenario("naive-raw", "naive: ours with --max-batch-size 1, raw")
            self.drive(scenario, server, native_endpoint(self.images, "raw"), None, FP32_MODEL)
            self._record_server("naive", server, final=True)
        finally:
            server.stop()

    def int8(self) -> None:
        if not (newest_version(INT8_MODEL) / MODEL_FILE).exists():
            note = f"int8 row skipped: models/{INT8_MODEL}/ holds no {MODEL_FILE}"
            print("  " + note, flush=True)
            self.results["notes"].append(note)
            return
        server = self.our_server("int8", INT8_MODEL)
        try:
            scenario = self._scenario("int8-raw", "ours, int8 model, native, raw")
            self.drive(scenario, server, native_endpoint(self.images, "raw", INT8_MODEL), None, INT8_MODEL)
            self._record_server("int8", server, final=True)
        finally:
            server.stop()

    def shadow(self) -> None:
        """The callers' p50 at c=16 with SHADOW_PERCENT% of their requests shadowed, paired with no
        shadow on the same server, for `paired_rounds` rounds, the side that goes first alternating;
        each side records how many copies were compared and dropped (bench/shadow_cost.py)."""
        rounds = self.plan.paired_rounds
        if not rounds:
            return
        repository = shadow_cost.shadow_repository(self.work, MODELS)
        extra = self.args.server_flags.split() if self.args.server_flags else []
        server = OurServer(self.work / "shadow.log", ["--intra-op-threads", str(self.args.threads), *extra],
                           repository.path).start()
        endpoint = native_endpoint(self.images, "raw")
        concurrency, percent = shadow_cost.SHADOW_CONCURRENCY, shadow_cost.SHADOW_PERCENT
        print(f"== shadow: c={concurrency} x {rounds} rounds, v{repository.stable} answering, "
              f"{percent:g}% shadowed by v{repository.candidate} beside no shadow", flush=True)
        pairs = []
        try:
            # A fresh server's first point runs slower than the next (connections, allocator): not
            # inside a pair, where it would count against whichever side goes first.
            self._paired_point(server, endpoint, concurrency, f"shadow warm-up c={concurrency}")
            for round_index, _, shadow_first in paired_order(rounds, [concurrency]):
                sides = {}
                for side in (("shadow", "none") if shadow_first else ("none", "shadow")):
                    repository.configure(percent if side == "shadow" else 0)
                    shadow_cost.reload(server)
                    before = shadow_cost.shadow_images(server)
                    sides[side] = self._paired_point(server, endpoint, concurrency, f"shadow {side} c={concurrency}")
                    sides[side]["shadow_images"] = shadow_cost.minus(shadow_cost.shadow_images(server), before)
                pairs.append({"round": round_index, "concurrency": concurrency, "shadow_first": shadow_first,
                              "shadow": sides["shadow"], "none": sides["none"]})
                print(f"  shadow round {round_index}: p50 {sides['shadow']['p50_ms']:.2f} ms shadowed vs "
                      f"{sides['none']['p50_ms']:.2f} ms not; copies {sides['shadow']['shadow_images']}", flush=True)
        finally:
            self._record_server("shadow", server, final=True)
            server.stop()
        self.results["shadow_cost"] = {"rounds": rounds, "seconds": self.plan.paired_seconds, "percent": percent,
                                       "stable": repository.stable, "candidate": repository.candidate, "pairs": pairs}

    def trust(self) -> None:
        """Throughput of one image per Classify call with trust (calibration, unsure score, drift
        windows) and without it (patched out: what the server did before), two servers up, their
        points back to back for `paired_rounds` rounds, the side that goes first alternating."""
        with_trust = self.our_server("trust", FP32_MODEL)
        without = self.our_server("no-trust", FP32_MODEL, launcher=["-m", "bench.patched_serving", "trust=off", "--"])
        try:
            endpoint = native_endpoint(self.images, "raw")
            rounds = max(self.plan.paired_rounds, 1)
            print(f"== trust: c={TRUST_CONCURRENCIES} x {rounds} rounds, with trust beside trust patched out", flush=True)
            pairs = []
            for round_index, concurrency, trust_first in paired_order(rounds, list(TRUST_CONCURRENCIES)):
                sides = {}
                for side, server in (("trust", with_trust), ("none", without))[::1 if trust_first else -1]:
                    sides[side] = self._paired_point(server, endpoint, concurrency, f"trust {side} c={concurrency}")
                pairs.append({"round": round_index, "concurrency": concurrency, "trust_first": trust_first, **sides})
                print(f"  trust round {round_index} c={concurrency}: {sides['trust']['throughput']:.0f} img/s with, "
                      f"{sides['none']['throughput']:.0f} without", flush=True)
            self.results["trust_cost"] = {"rounds": rounds, "seconds": self.plan.paired_seconds, "pairs": pairs}
        finally:
            for name, server in (("trust", with_trust), ("no-trust", without)):
                self._record_server(name, server, final=True)
                server.stop()

    def client_bulk(self) -> None:
        """The bulk CLI on `client_images` PNG files, end to end, paired with ClassifyStream PNG load
        (c=64, the same images) on the same server, for `paired_rounds` rounds, the side that goes
        first alternating; the target takes the median of the CLI's share (bench/client_bulk.py)."""
        rounds, count = self.plan.paired_rounds, self.plan.client_images
        if not rounds:
            return
        images = cifar_test_images(count)
        endpoint = native_stream_endpoint(native_endpoint(images, "png"))
        concurrency = client_bulk.CLIENT_CONCURRENCY
        server = self.our_server("client-bulk", FP32_MODEL)
        print(f"== client-bulk: the CLI on {count:,} PNG files beside ours-stream-png c={concurrency}, "
              f"{rounds} rounds", flush=True)
        pairs = []
        try:
            with tempfile.TemporaryDirectory(prefix="bench-client-") as scratch:
                folder = client_bulk.write_pngs(images, Path(scratch) / "pngs")
                self._paired_point(server, endpoint, concurrency, "client-bulk warm-up")  # not inside a pair
                for round_index, _, cli_first in paired_order(rounds, [concurrency]):
                    sides = {}
                    for side in (("cli", "stream") if cli_first else ("stream", "cli")):
                        if side == "cli":
                            rows = Path(scratch) / f"rows-{round_index}.jsonl"
                            sides["cli"] = client_bulk.run_cli(server.target, folder, images.labels, rows)
                        else:
                            result = asyncio.run(self._one_run(server, endpoint, "closed", concurrency,
                                                               f"client-bulk stream c={concurrency}"))
                            sides["stream"] = {"throughput": round(result.throughput, 1),
                                               "p50_ms": round(result.percentile_ms(50), 3),
                                               "errors": dict(result.errors), "accuracy": result.accuracy}
                    pairs.append({"round": round_index, "cli_first": cli_first, **sides})
                    cli, stream = sides["cli"], sides["stream"]
                    print(f"  client-bulk round {round_index}: CLI {cli['throughput']:.0f} img/s "
                          f"({cli['images']:,} in {cli['seconds']:.1f} s, {cli['failed']} failed, exit "
                          f"{cli['exit_code']}); stream {stream['throughput']:.0f} img/s: "
                          f"{cli['throughput'] / stream['throughput']:.0%}", flush=True)
        finally:
            self._record_server("client-bulk", server, final=True)
            server.stop()
        self.results["client_bulk"] = {"rounds": rounds, "images": count, "concurrency": concurrency,
                                       "stream_seconds": self.plan.duration_s, "pairs": pairs}

    # --- bookkeeping ---------------------------------------------------------------------------

    def _v2_messages(self):
        messages = v2proto.load(MLSERVER_VENV)
        self.results["v2_proto"] = messages.source
        return messages

    def _scenario(self, key: str, title: str) -> Scenario:
        print(f"{key}: {title}", flush=True)
        scenario = Scenario(key, title)
        self.scenarios.append(scenario)
        return scenario

    def _record_server(self, name: str, server, final: bool = False) -> None:
        entry = self.results["servers"].setdefault(name, {"startup_s": round(server.startup_s, 3)})
        rss = round(server.rss_bytes() / 2**20, 1)
        entry["rss_after_load_mb" if final else "idle_rss_mb"] = rss

    def run(self) -> int:
        if self.out.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results["training_running_at_start"] = training_running()
        if self.results["training_running_at_start"]:
            print("WARNING: a training run (training.train) is using the CPU: these timings are NOT valid", flush=True)
        began = time.perf_counter()
        steps = [("limit", self.limits), ("startup", self.startup), ("ours", self.ours),
                 ("limit-after-rows", self.limit_after_rows), ("naive-raw", self.naive), ("int8-raw", self.int8),
                 ("shadow", self.shadow), ("trust", self.trust), ("client-bulk", self.client_bulk)]
        for name, step in steps:
            if name not in self.skip:
                print(f"== {name}", flush=True)
                step()
        self.results["training_running_at_end"] = training_running()
        self.results["valid"] = not (self.results["training_running_at_start"] or self.results["training_running_at_end"])
        self.results["elapsed_s"] = round(time.perf_counter() - began, 1)
        self.results["scenarios"] = [
            {"key": s.key, "title": s.title, "runs": [r.summary() for r in s.runs], "batch_sizes": s.batch_sizes}
            for s in self.scenarios
        ]
        self.results["targets"] = report.targets(self.results)
        written = report.write(self.results, self.out)
        print(f"wrote {', '.join(os.path.relpath(p, REPO_ROOT) for p in written)} in {self.results['elapsed_s']:.0f} s")
        return 0


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "grpcio": grpc.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "command": " ".join(sys.argv)}


def main(argv: list[str] | None = None) -> int:
    return Bench(parse_args(argv)).run()
