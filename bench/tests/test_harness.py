"""The benchmark harness against a real server (python -m serving) and, when installed, the MLServer peer.

Run with `make bench-test` (not part of `make test`: they time things and the peer needs its venv).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from pathlib import Path

import grpc
import pytest

from bench import limit, report, v2proto
from bench.endpoints import (Endpoint, cifar_test_images, native_batch_endpoint, native_endpoint,
                             native_stream_endpoint, v2_endpoint)
from bench.loadgen import closed_loop, open_loop, stream_depths
from bench.run import FP32_MODEL, Bench, bench_repository, interleaved, newest_version, paired_order, parse_args
from bench.servers import MLSERVER_VENV, BatchSizes, MLServerPeer, OurServer, REPO_ROOT

IMAGES = 64


@pytest.fixture(scope="module")
def images():
    return cifar_test_images(IMAGES)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    proc = OurServer(work / "server.log", ["--intra-op-threads", "1", "--access-log", "off"],
                     bench_repository(work, FP32_MODEL)).start()
    yield proc
    proc.stop()


def drive(target: str, coroutine_factory):
    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            return await coroutine_factory(channel)

    return asyncio.run(run())


def test_closed_loop_counts_answers_and_the_server_formed_batches_for_them(server, images):
    before = server.batch_sizes(FP32_MODEL)
    result = drive(server.target, lambda ch: closed_loop(ch, native_endpoint(images, "raw"), 4, 1.5, 0.3, progress=False))
    formed = server.batch_sizes(FP32_MODEL).minus(before)
    assert result.ok > 10 and result.errors == {}
    assert formed.total >= result.ok  # every measured image went through a batch (warm-up ones too)
    assert 1 <= formed.mean <= 4  # at most one image per client in flight
    assert 0 < result.percentile_ms(50) <= result.percentile_ms(99)


def test_batch_endpoint_counts_every_image_of_a_call_and_the_server_batches_them_together(server, images):
    before = server.batch_sizes(FP32_MODEL)
    endpoint = native_batch_endpoint(images, 16)
    result = drive(server.target, lambda ch: closed_loop(ch, endpoint, 1, 1.5, 0.3, progress=False))
    formed = server.batch_sizes(FP32_MODEL).minus(before)
    assert result.errors == {} and result.ok > 2
    assert result.throughput == pytest.approx(result.ok * 16 / result.duration_s)
    assert formed.mean >= 16  # one call's images go through onnxruntime as one batch
    assert result.accuracy > 0.5  # the first image's answer matches its label


def test_stream_closed_loop_counts_every_answered_message_and_the_server_batches_them(server, images):
    before = server.batch_sizes(FP32_MODEL)
    endpoint = native_stream_endpoint(native_endpoint(images, "raw"))
    result = drive(server.target, lambda ch: closed_loop(ch, endpoint, 8, 1.5, 0.3, progress=False))
    formed = server.batch_sizes(FP32_MODEL).minus(before)
    assert result.ok > 10 and result.errors == {}
    assert formed.total >= result.ok
    assert 1 < formed.mean <= 8  # two streams of 4 outstanding messages: the server batches across them
    assert result.accuracy > 0.5


def test_stream_messages_answered_with_an_in_band_error_count_as_errors_of_that_code(server, images):
    good = native_stream_endpoint(native_endpoint(images, "raw"))
    bad = Endpoint("native", "raw", good.method, [b"\x0a\x04\x12\x02\x0a\x00"], good.labels, good.top1_of,
                   streaming=True, error_of=good.error_of)  # empty raw pixels
    result = drive(server.target, lambda ch: closed_loop(ch, bad, 4, 0.5, 0.1, progress=False))
    assert result.ok == 0 and result.errors.get("INVALID_ARGUMENT", 0) > 10
    assert "INVALID_ARGUMENT" in result.extra["error_examples"]


def test_streams_carry_the_concurrency_in_groups_of_four():
    assert stream_depths(1) == [1]
    assert stream_depths(6) == [4, 2]
    assert stream_depths(64) == [4] * 16


def test_open_loop_sends_at_the_requested_rate(server, images):
    result = drive(server.target, lambda ch: open_loop(ch, native_endpoint(images, "png"), 40, 2.0, 0.5, progress=False))
    assert result.errors == {}
    assert 70 <= result.ok <= 90  # 40/s over a 2 s window


def test_failed_calls_are_counted_by_status_code_not_as_latencies(server, images):
    good = native_endpoint(images, "raw")
    bad = Endpoint("native", "raw", good.method, [b"\x0a\x04\x12\x02\x0a\x00"], good.labels, good.top1_of)  # empty raw
    result = drive(server.target, lambda ch: closed_loop(ch, bad, 2, 0.5, 0.1, progress=False))
    assert result.ok == 0 and result.errors.get("INVALID_ARGUMENT", 0) > 0
    assert "INVALID_ARGUMENT" in result.extra["error_examples"]


def test_v2_endpoint_asks_the_server_for_the_input_tensor_and_gets_the_native_answers(server, images):
    v2 = v2proto.load(MLSERVER_VENV)
    with grpc.insecure_channel(server.target) as channel:
        endpoint = v2_endpoint(images, channel, FP32_MODEL, v2)
        call = channel.unary_unary(endpoint.method)
        v2_top1 = [endpoint.top1_of(call(endpoint.requests[i], timeout=10)) for i in range(8)]
        native = native_endpoint(images, "raw")
        native_call = channel.unary_unary(native.method)
        native_top1 = [native.top1_of(native_call(native.requests[i], timeout=10)) for i in range(8)]
    assert v2_top1 == native_top1


@pytest.mark.parametrize("size", [1, 4, 64, 128])
def test_the_limit_is_timed_on_every_image_the_servers_get_not_the_first_few(images, size):
    batches = limit.batches_of(images.images, size)
    assert all(batch.shape == (size, 32, 32, 3) and batch.flags["C_CONTIGUOUS"] for batch in batches)
    seen = {batch[row].tobytes() for batch in batches for row in range(size)}
    assert seen == {image.tobytes() for image in images.images}


def test_patched_server_entries_reach_the_server_and_onnxruntime(monkeypatch):
    import serving.servicer
    from bench import patched_serving
    from serving.config import load_config
    from serving.server import ClassifierServer

    for owner, name in ((ClassifierServer, "_grpc_options"), (serving.servicer, "DECODE_INLINE_MAX_BYTES")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    captured = {}
    monkeypatch.setattr(patched_serving, "session_entries", captured.update)

    def serve(argv):
        captured["argv"] = argv
        return 0

    monkeypatch.setattr("serving.__main__.main", serve)
    monkeypatch.setattr("sys.argv", ["patched", "grpc_option.grpc.optimization_target=throughput",
                                     "decode_inline_max_bytes=0", "session.intra_op.allow_spinning=0",
                                     "--", "--port", "0"])

    assert patched_serving.main() == 0
    assert captured == {"session.intra_op.allow_spinning": "0", "argv": ["--port", "0"]}
    server = ClassifierServer.__new__(ClassifierServer)  # _grpc_options reads nothing but the config
    server.config = load_config([])
    assert ("grpc.optimization_target", "throughput") in server._grpc_options()
    assert serving.servicer.DECODE_INLINE_MAX_BYTES == 0


def _thread_nices() -> dict[str, int]:
    nices = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as stat:
            nices[tid] = int(stat.read().rsplit(")", 1)[1].split()[16])
    return nices


def test_worker_nice_lowers_only_the_threads_the_session_spawns(monkeypatch):
    import onnxruntime as ort

    from bench import patched_serving
    from bench.run import MODEL_FILE, newest_version

    monkeypatch.setattr(ort, "InferenceSession", ort.InferenceSession)  # restored after the test
    before = _thread_nices()
    patched_serving.worker_nice("7")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(newest_version(FP32_MODEL) / MODEL_FILE), options,
                                   providers=["CPUExecutionProvider"])
    spawned = {tid: nice for tid, nice in _thread_nices().items() if tid not in before}

    assert session.get_inputs()
    assert spawned and set(spawned.values()) == {7}  # onnxruntime's worker, at the given nice
    assert os.getpriority(os.PRIO_PROCESS, 0) == before[str(os.getpid())] == 0  # not the caller's thread


def test_side_by_side_rows_take_turns_point_by_point_leading_in_alternation():
    points = [("closed", 1), ("closed", 16), ("closed", 64), ("open", 200)]
    order = interleaved(points, ["ours-v2", "mlserver-v2"])
    assert order == [(("closed", 1), "ours-v2"), (("closed", 1), "mlserver-v2"),
                     (("closed", 16), "mlserver-v2"), (("closed", 16), "ours-v2"),
                     (("closed", 64), "ours-v2"), (("closed", 64), "mlserver-v2"),
                     (("open", 200), "mlserver-v2"), (("open", 200), "ours-v2")]


def test_batch_size_distribution_is_per_bucket_not_cumulative():
    sizes = BatchSizes({1.0: 3, 2.0: 3, 4.0: 10, 8.0: 12, float("inf"): 12}, total=60, count=12)
    assert sizes.distribution() == {"1": 3, "3-4": 7, "5-8": 2}
    assert sizes.mean == 5


def run(concurrency: int, throughput: float, p99: float, p50: float = 1.0) -> dict:
    """One closed-loop point, as a results file holds it."""
    return {"mode": "closed", "concurrency": concurrency, "throughput": throughput, "p50_ms": p50, "p99_ms": p99}


def test_targets_report_a_server_below_the_limit_share_as_missed():
    results = {
        "limits": {FP32_MODEL: {"best_throughput": 1000.0, "best_batch": 64, "batch1_p50_ms": 2.0}},
        "scenarios": [
            {"key": "ours-raw", "runs": [run(1, 300, 3), run(64, 790, 50)]},
            {"key": "ours-png", "runs": [run(64, 710, 60)]},
            {"key": "ours-stream", "runs": [run(16, 780, 30), run(64, 810, 60)]},
            {"key": "ours-v2", "runs": [run(16, 600, 20), run(64, 700, 90)]},
            {"key": "mlserver-v2", "runs": [run(16, 300, 30), run(64, 500, 80)]},
        ],
        "servers": {"ours-startup": {"startup_s": 1.2}, "ours": {"idle_rss_mb": 150.0, "rss_after_load_mb": 310.0}},
    }
    verdicts = [(t["target"], t["met"]) for t in report.targets(results)]
    # raw 79% (missed), png 71% (met), stream 81% (met), c=1 p50 1.0 <= 3.0 (met), c=16 2x & p99 better (met),
    # c=64 1.4x (missed), V2 700 vs native 790 = 89% (missed), startup (met), RSS 310 (missed)
    assert [met for _, met in verdicts] == [False, True, True, True, True, False, False, True, False], verdicts


def test_targets_take_the_better_of_the_limits_timed_before_and_after_the_rows():
    results = {
        "limits": {FP32_MODEL: {"best_throughput": 900.0, "best_batch": 64, "batch1_p50_ms": 2.0}},
        "limits_after_rows": {FP32_MODEL: {"batch1_p50_ms": 1.5, "per_batch": {
            "1": {"throughput": 600.0, "p50_ms": 1.5}, "64": {"throughput": 1000.0, "p50_ms": 60.0}}}},
        "scenarios": [{"key": "ours-raw", "runs": [run(1, 350, 3.0, p50=2.6), run(64, 750, 50)]}],
    }
    saturation, first = report.targets(results)
    # Against the limit before the rows alone both would be met: 750 / 900 = 83%, 2.6 <= 2.0 + 1 ms.
    assert (saturation["met"], saturation["measured"]) == (False, "750 / 1000 img/s = 75%")
    assert (first["met"], first["measured"]) == (False, "2.60 ms vs 1.50 + 1 ms")
    assert "900 img/s before the rows, 1000 after" in saturation["detail"]


def test_paired_rounds_alternate_which_side_goes_first_across_points_and_rounds():
    order = paired_order(2, [("ours-raw", 1), ("ours-raw", 64), ("ours-png", 64)])
    assert [(r, point, first) for r, point, first in order] == [
        (0, ("ours-raw", 1), True), (0, ("ours-raw", 64), False), (0, ("ours-png", 64), True),
        (1, ("ours-raw", 1), False), (1, ("ours-raw", 64), True), (1, ("ours-png", 64), False)]


def test_with_an_even_number_of_points_each_point_still_alternates_its_first_side_round_by_round():
    order = paired_order(4, [16, 64])
    assert [first for _, point, first in order if point == 16] == [True, False, True, False]
    assert [first for _, point, first in order if point == 64] == [False, True, False, True]
    assert [first for _, _, first in order][:2] == [True, False]  # and consecutive pairs differ


def test_the_limit_timer_times_a_batch_size_again_on_the_same_open_session(images):
    timer = limit.LimitTimer(newest_version(FP32_MODEL) / "model.onnx", images.images, 1)
    first, again = timer.time(4, 0.05), timer.time(4, 0.05)
    for timing in (first, again):
        assert timing["throughput"] > 0 and 0 < timing["p50_ms"] <= timing["p99_ms"]


def pair(row: str, concurrency: int, ours: tuple[float, float], limit_side: tuple[float, float]) -> dict:
    """One paired round as a results file holds it: (img/s, p50 ms) for each side."""
    return {"row": row, "concurrency": concurrency, "round": 0, "limit_first": True, "limit_batch": 64,
            "ours": {"throughput": ours[0], "p50_ms": ours[1], "errors": {}},
            "limit": {"throughput": limit_side[0], "p50_ms": limit_side[1], "p99_ms": limit_side[1]}}


def test_paired_rounds_decide_a_target_by_their_median_not_by_the_one_pass_ratio():
    results = {
        "limits": {FP32_MODEL: {"best_throughput": 1000.0, "best_batch": 64, "batch1_p50_ms": 1.0}},
        "scenarios": [{"key": "ours-raw", "runs": [run(1, 300, 3, p50=1.9), run(64, 700, 50)]},
                      {"key": "ours-stream", "runs": [run(64, 850, 50)]}],
        "paired": {"rounds": 3, "seconds": 5.0, "pairs": [
            # ours-raw c=64: 82%, 79%, 85% -> median 82%, met although one pass says 70%
            pair("ours-raw", 64, (820, 50), (1000, 60)), pair("ours-raw", 64, (790, 50), (1000, 60)),
            pair("ours-raw", 64, (850, 50), (1000, 60)),
            # ours-stream c=64: 75%, 90%, 78% -> median 78%, missed although one pass says 85%
            pair("ours-stream", 64, (750, 50), (1000, 60)), pair("ours-stream", 64, (900, 50), (1000, 60)),
            pair("ours-stream", 64, (780, 50), (1000, 60)),
            # c=1: gaps +1.2, +0.8, +1.1 -> median +1.1 ms, missed although one pass says 1.9 vs 1.0 + 1
            pair("ours-raw", 1, (300, 2.2), (600, 1.0)), pair("ours-raw", 1, (300, 1.8), (600, 1.0)),
            pair("ours-raw", 1, (300, 2.1), (600, 1.0)),
            # ours-stream c=1: gaps +0.6, +1.4, +0.9 -> median +0.9 ms, met
            pair("ours-stream", 1, (400, 1.6), (600, 1.0)), pair("ours-stream", 1, (400, 2.4), (600, 1.0)),
            pair("ours-stream", 1, (400, 1.9), (600, 1.0)),
        ]},
    }
    raw, stream, first, stream_first = report.targets(results)
    assert raw["met"] and raw["measured"].startswith("median of 3 paired rounds at c=64 82% (82%, 79%, 85%)")
    assert "one pass 700 / 1000 img/s = 70%" in raw["measured"]
    assert not stream["met"] and "78%" in stream["measured"].split("(")[0]
    assert not first["met"] and first["measured"].startswith("median gap of 3 paired rounds +1.10 ms")
    assert first["measured"].endswith("one pass 1.90 ms vs 1.00 + 1 ms")
    assert stream_first["met"] and stream_first["target"].startswith("ours-stream p50 at concurrency 1")
    assert stream_first["measured"].startswith("median gap of 3 paired rounds +0.90 ms (+0.60, +1.40, +0.90)")
    assert "| ours-raw | 64 | 0 | limit | 64 | 1,000.0 | 60.00 | 820.0 | 50.00 | 82% | -10.00 | 0 |" in \
        report.paired_table(results)


def peer_pair(concurrency: int, ours: tuple[float, float], peer: tuple[float, float]) -> dict:
    """One paired round of ours-v2 beside the peer: (img/s, p99 ms) for each side."""
    return {"concurrency": concurrency, "round": 0, "ours_first": True,
            "ours": {"throughput": ours[0], "p50_ms": 1.0, "p99_ms": ours[1], "errors": {}},
            "peer": {"throughput": peer[0], "p50_ms": 1.0, "p99_ms": peer[1], "errors": {"UNAVAILABLE": 2}}}


def test_peer_rounds_decide_the_peer_target_by_their_median_throughput_and_p99_ratios():
    results = {
        "scenarios": [{"key": "ours-v2", "runs": [run(16, 420, 50), run(64, 600, 100)]},
                      {"key": "mlserver-v2", "runs": [run(16, 300, 90), run(64, 300, 200)]}],
        "paired_peer": {"rounds": 3, "seconds": 5.0, "pairs": [
            # c=16: 1.60x, 1.45x, 1.70x -> median 1.60x, p99 better in every round: met (one pass 1.40x)
            peer_pair(16, (480, 50), (300, 90)), peer_pair(16, (435, 50), (300, 90)), peer_pair(16, (510, 50), (300, 90)),
            # c=64: 2.0x every round, but p99 worse in two of three (ratios 1.1, 0.5, 1.2): missed (one pass met)
            peer_pair(64, (600, 220), (300, 200)), peer_pair(64, (600, 100), (300, 200)),
            peer_pair(64, (600, 240), (300, 200)),
        ]},
    }
    c16, c64 = [t for t in report.targets(results) if "MLServer" in t["target"]]
    assert c16["met"] and c16["measured"].startswith("median of 3 paired rounds 1.60x (1.60, 1.45, 1.70), p99 ours / peer 0.56")
    assert c16["measured"].endswith("one pass 1.40x (420 vs 300 img/s); p99 50.0 vs 90.0 ms")
    assert not c64["met"] and "p99 ours / peer 1.10" in c64["measured"]
    assert "| 16 | 0 | ours | 480.0 | 50.0 | 300.0 | 90.0 | 1.60x | peer UNAVAILABLE 2 |" in report.paired_peer_table(results)


@pytest.mark.skipif(not (MLSERVER_VENV / "bin" / "mlserver").exists(), reason="make bench-venvs installs the peer")
def test_mlserver_peer_serves_the_same_model_through_v2(tmp_path, images):
    relative_work_dir = Path(os.path.relpath(tmp_path))  # as `--out` gives it; MLServer runs with another cwd
    peer = MLServerPeer(tmp_path / "mlserver.log", REPO_ROOT / "models" / FP32_MODEL / "1", relative_work_dir).start()
    try:
        assert 0 < peer.startup_s < 60
        with grpc.insecure_channel(peer.target) as channel:
            endpoint = v2_endpoint(images, channel, FP32_MODEL, v2proto.load(MLSERVER_VENV))
        result = drive(peer.target, lambda ch: closed_loop(ch, endpoint, 4, 1.0, 0.3, progress=False))
        assert result.ok > 0 and result.errors == {}
        assert not math.isnan(result.accuracy)
    finally:
        peer.stop()


def test_the_shadow_row_shadows_one_side_of_each_pair_only(tmp_path):
    bench = Bench(parse_args(["--mode", "quick", "--out", str(tmp_path), "--images", str(IMAGES), "--threads", "1",
                              "--no-progress"]))
    bench.work.mkdir(parents=True)
    bench.shadow()
    cost = bench.results["shadow_cost"]
    (pair,) = cost["pairs"]  # quick mode: one round
    assert (cost["percent"], pair["concurrency"], cost["candidate"]) == (10.0, 16, cost["stable"] + 1)
    offered = pair["shadow"]["shadow_images"]
    assert sum(offered.values()) > 0  # copies were made (compared, or dropped under this load)
    assert sum(pair["none"]["shadow_images"].values()) == 0
    assert pair["shadow"]["errors"] == pair["none"]["errors"] == {}


def shadow_pair(shadowed_p50: float, plain_p50: float, compared: float = 40, dropped: float = 10) -> dict:
    side = {"throughput": 500.0, "p99_ms": 90.0, "errors": {}}
    return {"concurrency": 16, "round": 0, "shadow_first": True,
            "shadow": {**side, "p50_ms": shadowed_p50, "shadow_images": {"compared": compared, "dropped_load": dropped}},
            "none": {**side, "p50_ms": plain_p50, "shadow_images": {"compared": 0}}}


def test_the_shadow_target_is_the_median_of_the_paired_p50_ratios():
    results = {"shadow_cost": {"rounds": 3, "seconds": 5.0, "percent": 10.0, "stable": 1, "candidate": 2, "pairs": [
        shadow_pair(21.0, 20.0), shadow_pair(23.0, 20.0), shadow_pair(20.6, 20.0)]}}  # 1.05, 1.15, 1.03
    (target,) = report.targets(results)
    assert target["met"] and target["measured"].startswith("median of 3 paired rounds 1.050x (1.050, 1.150, 1.030)")
    assert target["detail"] == "120 copies compared, 30 dropped on the shadowed sides"
    results["shadow_cost"]["pairs"][0] = shadow_pair(22.0, 20.0)  # 1.10, 1.15, 1.03 -> median 1.10
    assert not report.targets(results)[0]["met"]
    assert "| 16 | 0 | shadowed | 22.00 | 20.00 | 1.100 | 500.0 | 500.0 | 40 | load 10 | 0 |" in \
        report.shadow_table(results)


def test_the_client_bulk_row_runs_the_cli_on_png_files_beside_the_stream_load(tmp_path):
    bench = Bench(parse_args(["--mode", "quick", "--out", str(tmp_path), "--threads", "1", "--no-progress"]))
    bench.plan = dataclasses.replace(bench.plan, client_images=IMAGES, duration_s=1.0)
    bench.work.mkdir(parents=True)
    bench.client_bulk()
    bulk = bench.results["client_bulk"]
    (pair,) = bulk["pairs"]  # quick mode: one round
    assert (bulk["images"], bulk["concurrency"]) == (IMAGES, 64)
    cli, stream = pair["cli"], pair["stream"]
    assert (cli["images"], cli["failed"], cli["exit_code"]) == (IMAGES, 0, 0)
    assert cli["accuracy"] > 0.5 and cli["throughput"] > 0 and cli["client_cpu_ms_per_image"] > 0
    assert stream["errors"] == {} and stream["throughput"] > 0


def client_pair(cli_throughput: float, failed: int = 0) -> dict:
    return {"round": 0, "cli_first": True,
            "cli": {"images": 10_000, "seconds": 20.0, "throughput": cli_throughput, "failed": failed, "exit_code": 0,
                    "accuracy": 0.9, "client_cpu_ms_per_image": 0.4},
            "stream": {"throughput": 500.0, "p50_ms": 100.0, "errors": {}, "accuracy": 0.9}}


def test_the_client_target_is_the_median_share_of_the_stream_load_with_no_image_failed():
    results = {"client_bulk": {"rounds": 3, "images": 10_000, "concurrency": 64, "stream_seconds": 15.0,
                               "pairs": [client_pair(460.0), client_pair(430.0), client_pair(470.0)]}}  # 92, 86, 94%
    (target,) = report.targets(results)
    assert target["met"] and target["measured"] == "median of 3 paired rounds 92% (92%, 86%, 94%)"
    results["client_bulk"]["pairs"][0] = client_pair(440.0)  # 88, 86, 94% -> 88%
    assert not report.targets(results)[0]["met"]
    results["client_bulk"]["pairs"][0] = client_pair(480.0, failed=1)  # fast, but one image failed
    assert not report.targets(results)[0]["met"]
    assert "| 0 | CLI | 20.00 | 480.0 | 1 | 0.400 | 90.0% | 500.0 | 96% | 0 |" in report.client_table(results)
