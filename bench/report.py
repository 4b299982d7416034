"""Results -> targets (met / missed), a markdown table, PNG charts and the raw JSON."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

from bench.loadgen import STREAM_DEPTH
from bench.client_bulk import CLIENT_TARGET
from bench.shadow_cost import SHADOW_TARGET

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

FP32 = "cifar10"
INT8 = "cifar10-int8"
SATURATION_CONCURRENCY = 64  # the paired rounds' saturation point (bench/run.py PAIRED_POINTS)


def _scenarios(results: dict) -> dict[str, dict]:
    return {s["key"]: s for s in results.get("scenarios", [])}


def _closed(scenario: dict | None) -> list[dict]:
    return [r for r in (scenario or {}).get("runs", []) if r["mode"] == "closed"]


def _at(scenario: dict | None, concurrency: int) -> dict | None:
    return next((r for r in _closed(scenario) if r["concurrency"] == concurrency), None)


def saturation(scenario: dict | None) -> float:
    """The best closed-loop throughput of a row (images/s)."""
    return max((r["throughput"] for r in _closed(scenario)), default=float("nan"))


def _target(name: str, measured: str, met: bool | None, detail: str = "") -> dict:
    return {"target": name, "measured": measured, "met": met, "detail": detail}


def conservative_limit(results: dict) -> tuple[float, float, str] | None:
    """(best img/s, batch-1 p50 ms, how they were chosen) for the fp32 limit.

    The limit is timed before the load rows and again after ours (`limits_after_rows`, at batch
    1 and the best batch): the targets take the higher throughput and the lower p50 of the two,
    so a machine that slowed down during the run cannot flatter the ratios.
    """
    before = results.get("limits", {}).get(FP32)
    if not before:
        return None
    best, batch1 = before["best_throughput"], before["batch1_p50_ms"]
    after = results.get("limits_after_rows", {}).get(FP32)
    if not after:
        return best, batch1, f"limit at batch {before['best_batch']}"
    best_after = after["per_batch"][str(before["best_batch"])]["throughput"]
    batch1_after = after["batch1_p50_ms"]
    how = (f"limit at batch {before['best_batch']}: {best:.0f} img/s before the rows, {best_after:.0f} after; "
           f"batch-1 p50 {batch1:.2f} / {batch1_after:.2f} ms; the higher throughput and lower p50 are used")
    return max(best, best_after), min(batch1, batch1_after), how


def paired_points(results: dict) -> dict[tuple[str, int], list[dict]]:
    """The paired rounds (bench/run.py `Bench.paired`) by (row, concurrency), in the order run."""
    grouped: dict[tuple[str, int], list[dict]] = {}
    for pair in results.get("paired", {}).get("pairs", []):
        grouped.setdefault((pair["row"], pair["concurrency"]), []).append(pair)
    return grouped


def paired_shares(pairs: list[dict]) -> list[float]:
    """Per round: our images/s over the limit's, timed back to back."""
    return [p["ours"]["throughput"] / p["limit"]["throughput"] for p in pairs]


def paired_gaps_ms(pairs: list[dict]) -> list[float]:
    """Per round: our p50 minus the limit's batch-1 p50, timed back to back."""
    return [p["ours"]["p50_ms"] - p["limit"]["p50_ms"] for p in pairs]


def peer_pairs(results: dict) -> dict[int, list[dict]]:
    """The peer's paired rounds (bench/run.py `Bench.paired_peer`) by concurrency, in the order run."""
    grouped: dict[int, list[dict]] = {}
    for pair in results.get("paired_peer", {}).get("pairs", []):
        grouped.setdefault(pair["concurrency"], []).append(pair)
    return grouped


def _peer_target(ours_key: str, concurrency: int, ours: dict, peer: dict, pairs: list[dict] | None) -> dict:
    """≥ 1.5x the peer's throughput with p99 no worse: by the median of the same-minute pairs
    where the run has them (ours over the peer per round), else by the one pass."""
    ratio = ours["throughput"] / peer["throughput"] if peer["throughput"] else math.inf
    one_pass = (f"{ratio:.2f}x ({ours['throughput']:.0f} vs {peer['throughput']:.0f} img/s); "
                f"p99 {ours['p99_ms']:.1f} vs {peer['p99_ms']:.1f} ms")
    name = f"{ours_key} >= 1.5x MLServer throughput at c={concurrency}, p99 no worse"
    how = "protocol for protocol (V2 vs V2)" if ours_key == "ours-v2" else "our native API vs the peer's V2"
    if not pairs:
        return _target(name, one_pass, ratio >= 1.5 and ours["p99_ms"] <= peer["p99_ms"], how)
    ratios = [p["ours"]["throughput"] / p["peer"]["throughput"] for p in pairs]
    p99_ratios = [p["ours"]["p99_ms"] / p["peer"]["p99_ms"] for p in pairs]
    median, p99_median = statistics.median(ratios), statistics.median(p99_ratios)
    return _target(
        name, f"median of {len(ratios)} paired rounds {median:.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}), "
              f"p99 ours / peer {p99_median:.2f}; one pass {one_pass}",
        median >= 1.5 and p99_median <= 1.0, how)


def shadow_ratios(results: dict) -> list[float]:
    """Per round of the shadow row (bench/run.py `Bench.shadow`): p50 shadowed / p50 not."""
    return [pair["shadow"]["p50_ms"] / pair["none"]["p50_ms"] for pair in results.get("shadow_cost", {}).get("pairs", [])]


def _shadow_target(results: dict) -> dict | None:
    ratios = shadow_ratios(results)
    if not ratios:
        return None
    cost = results["shadow_cost"]
    compared = sum(pair["shadow"]["shadow_images"].get("compared", 0) for pair in cost["pairs"])
    dropped = sum(v for pair in cost["pairs"] for k, v in pair["shadow"]["shadow_images"].items() if k != "compared")
    median = statistics.median(ratios)
    return _target(
        f"shadowing {cost['percent']:g}% of traffic: p50 at c={cost['pairs'][0]['concurrency']} within "
        f"{SHADOW_TARGET - 1:.0%} of no shadow",
        f"median of {len(ratios)} paired rounds {median:.3f}x ({', '.join(f'{r:.3f}' for r in ratios)})",
        median <= SHADOW_TARGET, f"{compared:.0f} copies compared, {dropped:.0f} dropped on the shadowed sides")


TRUST_TARGET = 0.95  # throughput with trust / without, one image per call


def _trust_targets(results: dict) -> list[dict]:
    """Per concurrency of the trust row (bench/run.py `Bench.trust`): the median over its paired
    rounds of throughput with trust / without."""
    cost = results.get("trust_cost")
    if not cost:
        return []
    found = []
    for concurrency in sorted({pair["concurrency"] for pair in cost["pairs"]}):
        ratios = [p["trust"]["throughput"] / p["none"]["throughput"] for p in cost["pairs"] if p["concurrency"] == concurrency]
        median = statistics.median(ratios)
        found.append(_target(
            f"trust (calibration, unsure score, drift): one image per call at c={concurrency} within "
            f"{1 - TRUST_TARGET:.0%} of without",
            f"median of {len(ratios)} paired rounds {median:.3f}x ({', '.join(f'{r:.3f}' for r in ratios)})",
            median >= TRUST_TARGET, "throughput with trust / with it patched out (bench/patched_serving.py trust=off)"))
    return found


def client_shares(results: dict) -> list[float]:
    """Per round of the client-bulk row: the CLI's images/s end to end over the stream load's."""
    return [pair["cli"]["throughput"] / pair["stream"]["throughput"]
            for pair in results.get("client_bulk", {}).get("pairs", [])]


def _client_target(results: dict) -> dict | None:
    shares = client_shares(results)
    if not shares:
        return None
    bulk = results["client_bulk"]
    failed = sum(pair["cli"]["failed"] for pair in bulk["pairs"])
    median = statistics.median(shares)
    return _target(
        f"the bulk CLI on {bulk['images']:,} PNG files >= {CLIENT_TARGET:.0%} of ours-stream-png "
        f"c={bulk['concurrency']} images/s",
        f"median of {len(shares)} paired rounds {median:.0%} ({', '.join(f'{s:.0%}' for s in shares)})",
        median >= CLIENT_TARGET and failed == 0,
        f"end to end, process start to exit; {failed} images failed")


def targets(results: dict) -> list[dict]:
    """Met or missed. Where the run has paired rounds, a target's verdict is the median of its
    same-minute pairs; the one-pass figure (against the conservative limit) is shown beside it."""
    rows = _scenarios(results)
    limit = conservative_limit(results)
    paired = paired_points(results)
    found = []
    if limit:
        best, batch1, how = limit
        # One image per unary call (the reading); one image per message of ClassifyStream
        # (no per-call setup); the same raw pixels sent 32 per ClassifyBatch call: together they
        # show what per-call gRPC cost takes away on 2 shared cores.
        for key, share in (("ours-raw", 0.8), ("ours-png", 0.7), ("ours-stream", 0.8), ("ours-stream-png", 0.7),
                           ("ours-batch32", 0.8)):
            if key not in rows:
                continue
            name = f"{key} saturation >= {share:.0%} of raw onnxruntime's best"
            ratio = saturation(rows[key]) / best
            one_pass = f"{saturation(rows[key]):.0f} / {best:.0f} img/s = {ratio:.0%}"
            pairs = paired.get((key, SATURATION_CONCURRENCY))
            if pairs:
                shares = paired_shares(pairs)
                median = statistics.median(shares)
                found.append(_target(
                    name, f"median of {len(shares)} paired rounds at c={SATURATION_CONCURRENCY} {median:.0%} "
                          f"({', '.join(f'{s:.0%}' for s in shares)}); one pass {one_pass}", median >= share,
                    f"one pass against the {how}"))
            else:
                found.append(_target(name, one_pass, ratio >= share, how))
        floor = _at(rows.get("grpc-floor"), 1)
        floor_note = f"a health Check round trip alone takes {floor['p50_ms']:.2f} ms" if floor else ""
        # Unary (the reading) and one message at a time on a stream (no call set up per image).
        for key in ("ours-raw", "ours-stream"):
            first, pairs = _at(rows.get(key), 1), paired.get((key, 1))
            name = f"{key} p50 at concurrency 1 <= raw onnxruntime batch-1 p50 + 1 ms"
            one_pass = f"{first['p50_ms']:.2f} ms vs {batch1:.2f} + 1 ms" if first else "not run"
            if pairs:
                gaps = paired_gaps_ms(pairs)
                median = statistics.median(gaps)
                found.append(_target(
                    name, f"median gap of {len(gaps)} paired rounds {median:+.2f} ms "
                          f"({', '.join(f'{g:+.2f}' for g in gaps)}); one pass {one_pass}", median <= 1.0, floor_note))
            elif first:
                found.append(_target(name, one_pass, first["p50_ms"] <= batch1 + 1.0, floor_note))
    ours_key = "ours-v2" if "ours-v2" in rows else "ours-raw"
    if "mlserver-v2" in rows and ours_key in rows:
        by_concurrency = peer_pairs(results) if ours_key == "ours-v2" else {}
        for concurrency in (16, 64):
            ours, peer = _at(rows[ours_key], concurrency), _at(rows["mlserver-v2"], concurrency)
            if ours and peer:
                found.append(_peer_target(ours_key, concurrency, ours, peer, by_concurrency.get(concurrency)))
    if "ours-v2" in rows and "ours-raw" in rows:  # the V2 face must not be a slow second path
        v2, native = saturation(rows["ours-v2"]), saturation(rows["ours-raw"])
        found.append(_target("ours-v2 saturation within 10% of ours-raw (same server, raw pixels)",
                             f"{v2:.0f} vs {native:.0f} img/s = {v2 / native:.0%}", v2 >= 0.9 * native))
    for extra in (_shadow_target(results), _client_target(results)):
        if extra:
            found.append(extra)
    found.extend(_trust_targets(results))
    startup = results.get("servers", {}).get("ours-startup")
    if startup:
        found.append(_target("startup (process start -> health SERVING) <= 2 s", f"{startup['startup_s']:.2f} s",
                             startup["startup_s"] <= 2.0))
    ours = results.get("servers", {}).get("ours", {})
    rss = max([v for k, v in ours.items() if "rss" in k] or [float("nan")])
    if not math.isnan(rss):
        found.append(_target("serving RSS <= 300 MB (after the load runs)", f"{rss:.0f} MB", rss <= 300))
    return found


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def paired_table(results: dict) -> list[str]:
    paired = results.get("paired", {}).get("pairs", [])
    if not paired:
        return []
    lines = ["", "## Paired rounds: each target's point timed beside the limit", "",
             f"{results['paired']['rounds']} rounds; per pair the limit (batch 1 beside c=1, its best batch "
             f"beside c={SATURATION_CONCURRENCY}) and our point, {results['paired']['seconds']:g} s each, back to "
             "back, the side that goes first alternating. The targets take the median over the rounds.", "",
             "| row | c | round | first | limit batch | limit img/s | limit p50 ms | ours img/s | ours p50 ms "
             "| ours / limit | p50 gap ms | errors |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for pair in paired:
        ours, lim = pair["ours"], pair["limit"]
        errors = ", ".join(f"{k} {v}" for k, v in ours["errors"].items()) or "0"
        lines.append(
            f"| {pair['row']} | {pair['concurrency']} | {pair['round']} | "
            f"{'limit' if pair['limit_first'] else 'ours'} | {pair['limit_batch']} | {_fmt(lim['throughput'])} | "
            f"{_fmt(lim['p50_ms'], 2)} | {_fmt(ours['throughput'])} | {_fmt(ours['p50_ms'], 2)} | "
            f"{ours['throughput'] / lim['throughput']:.0%} | {ours['p50_ms'] - lim['p50_ms']:+.2f} | {errors} |")
    return lines


def paired_peer_table(results: dict) -> list[str]:
    pairs = results.get("paired_peer", {}).get("pairs", [])
    if not pairs:
        return []
    lines = ["", "## Paired rounds: ours-v2 beside the peer", "",
             f"{results['paired_peer']['rounds']} rounds; per pair ours-v2 and mlserver-v2 (both up), "
             f"{results['paired_peer']['seconds']:g} s each, back to back, the side that goes first alternating. "
             "The peer target takes the median over the rounds.", "",
             "| c | round | first | ours img/s | ours p99 ms | peer img/s | peer p99 ms | ours / peer | errors |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for pair in pairs:
        ours, peer = pair["ours"], pair["peer"]
        errors = ", ".join(f"{side} {k} {v}" for side, point in (("ours", ours), ("peer", peer))
                           for k, v in point["errors"].items()) or "0"
        lines.append(
            f"| {pair['concurrency']} | {pair['round']} | {'ours' if pair['ours_first'] else 'peer'} | "
            f"{_fmt(ours['throughput'])} | {_fmt(ours['p99_ms'])} | {_fmt(peer['throughput'])} | "
            f"{_fmt(peer['p99_ms'])} | {ours['throughput'] / peer['throughput']:.2f}x | {errors} |")
    return lines


def shadow_table(results: dict) -> list[str]:
    cost = results.get("shadow_cost", {})
    if not cost.get("pairs"):
        return []
    lines = ["", "## Paired rounds: the callers' cost of shadow traffic", "",
             f"{cost['rounds']} rounds; per pair the same server answering native Classify from v{cost['stable']} "
             f"with {cost['percent']:g}% of the answered requests shadowed by v{cost['candidate']}, and without the "
             f"shadow (repository.json switched by ReloadModels), {cost['seconds']:g} s each, back to back, the side "
             "that goes first alternating. Copies count the warm-up too.", "",
             "| c | round | first | shadowed p50 ms | plain p50 ms | ratio | shadowed img/s | plain img/s "
             "| copies compared | copies dropped | errors |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for pair in cost["pairs"]:
        shadowed, plain = pair["shadow"], pair["none"]
        copies = shadowed["shadow_images"]
        dropped = ", ".join(f"{k.removeprefix('dropped_')} {v:.0f}" for k, v in copies.items()
                            if k != "compared" and v) or "0"
        errors = ", ".join(f"{side} {k} {v}" for side, point in (("shadowed", shadowed), ("plain", plain))
                           for k, v in point["errors"].items()) or "0"
        lines.append(
            f"| {pair['concurrency']} | {pair['round']} | {'shadowed' if pair['shadow_first'] else 'plain'} | "
            f"{_fmt(shadowed['p50_ms'], 2)} | {_fmt(plain['p50_ms'], 2)} | "
            f"{shadowed['p50_ms'] / plain['p50_ms']:.3f} | {_fmt(shadowed['throughput'])} | "
            f"{_fmt(plain['throughput'])} | {copies.get('compared', 0):.0f} | {dropped} | {errors} |")
    return lines


def client_table(results: dict) -> list[str]:
    bulk = results.get("client_bulk", {})
    if not bulk.get("pairs"):
        return []
    lines = ["", "## Paired rounds: the bulk CLI beside ClassifyStream PNG load", "",
             f"{bulk['rounds']} rounds; per pair `python -m serving.client DIR --output rows.jsonl` on "
             f"{bulk['images']:,} PNG files (CIFAR-10 test images), timed from process start to exit, and the "
             f"load generator's ClassifyStream PNG at c={bulk['concurrency']} on the same images and server "
             f"({bulk['stream_seconds']:g} s measured), back to back, the side that goes first alternating.", "",
             "| round | first | CLI s | CLI img/s | CLI failed | CLI CPU ms/img | CLI top-1 | stream img/s "
             "| CLI / stream | stream errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for pair in bulk["pairs"]:
        cli, stream = pair["cli"], pair["stream"]
        errors = ", ".join(f"{k} {v}" for k, v in stream["errors"].items()) or "0"
        lines.append(
            f"| {pair['round']} | {'CLI' if pair['cli_first'] else 'stream'} | {_fmt(cli['seconds'], 2)} | "
            f"{_fmt(cli['throughput'])} | {cli['failed']} | {_fmt(cli['client_cpu_ms_per_image'], 3)} | "
            f"{_fmt(cli['accuracy'] * 100, 1)}% | {_fmt(stream['throughput'])} | "
            f"{cli['throughput'] / stream['throughput']:.0%} | {errors} |")
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Benchmark results ({results['mode']} mode)", ""]
    if not results.get("valid", False):
        lines += ["**NOT VALID: a training run was using the CPU during this run; numbers only show that the "
                  "harness works.**", ""]
    lines += [
        f"{env['date_utc']} UTC, {env['cpu']}, {env['cores']} cores, Python {env['python']}, "
        f"onnxruntime {env['onnxruntime']}, grpcio {env['grpcio']}. onnxruntime intra-op threads: "
        f"{results['threads']} (server, limit and peer). Each point: {results['plan']['warmup_s']:g} s warm-up, "
        f"{results['plan']['duration_s']:g} s measured. Command: `{env['command']}`.", "",
    ]
    for model, limit in results.get("limits", {}).items():
        lines += [f"## Limit: raw onnxruntime in-process, `{model}`", "",
                  "| batch | img/s | p50 ms | p99 ms |", "|---:|---:|---:|---:|"]
        for batch, row in limit["per_batch"].items():
            mark = " **best**" if int(batch) == limit["best_batch"] else ""
            lines.append(f"| {batch}{mark} | {_fmt(row['throughput'])} | {_fmt(row['p50_ms'], 2)} | {_fmt(row['p99_ms'], 2)} |")
        lines.append("")
        after = results.get("limits_after_rows", {}).get(model)
        if after:
            lines += ["Timed again after our load rows (the targets use the higher throughput and the lower p50): " +
                      ", ".join(f"batch {batch} {_fmt(row['throughput'])} img/s, p50 {_fmt(row['p50_ms'], 2)} ms"
                                for batch, row in after["per_batch"].items()) + ".", ""]
    lines += ["## Load runs", "",
              "Closed loop: `c` clients each with one request in flight. Open loop: a fixed request rate, latency "
              "from the scheduled send time. One image per request, except `ours-batch32` (32 per "
              "ClassifyBatch call; img/s counts images, latency is per call) and `grpc-floor` (a health Check, "
              "no image: its img/s are calls/s). `ours-stream` rows: `c` messages in flight on ClassifyStream "
              f"streams that each keep up to {STREAM_DEPTH} outstanding (c=64: {64 // STREAM_DEPTH} streams), one "
              "image per message, latency per message.", "",
              "| row | load | img/s | p50 ms | p95 ms | p99 ms | max ms | errors | mean batch | server CPU ms/img "
              "| client CPU ms/img | top-1 (sample) |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for scenario in results.get("scenarios", []):
        for run in scenario["runs"]:
            load = f"c={run['concurrency']}" if run["mode"] == "closed" else f"open {run['target_rate']:g}/s"
            errors = ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "0"
            lines.append(
                f"| {scenario['key']} | {load} | {_fmt(run['throughput'])} | {_fmt(run['p50_ms'], 2)} | "
                f"{_fmt(run['p95_ms'], 2)} | {_fmt(run['p99_ms'], 2)} | {_fmt(run['max_ms'], 2)} | {errors} | "
                f"{_fmt(run.get('mean_batch'), 1)} | {_fmt(run.get('server_cpu_ms_per_image'), 2)} | "
                f"{_fmt(run['client_cpu_s'] * 1000 / run.get('images', run['ok']) if run['ok'] else None, 2)} | "
                f"{_fmt(run['accuracy'] * 100 if run['accuracy'] == run['accuracy'] else None, 0)}% |")
    lines += ["", "Rows: " + "; ".join(f"`{s['key']}`: {s['title']}" for s in results.get("scenarios", [])), ""]
    lines += ["## Batch sizes the server formed (classifier_batch_size, per run incl. warm-up)", "",
              "| run | mean | batches by size |", "|---|---:|---|"]
    for scenario in results.get("scenarios", []):
        for label, formed in scenario.get("batch_sizes", {}).items():
            spread = ", ".join(f"{size}: {count}" for size, count in formed["batches"].items())
            lines.append(f"| {label} | {_fmt(formed['mean'], 1)} | {spread} |")
    lines += ["", "## Servers", "", "| server | startup s | idle RSS MB | RSS after load MB |", "|---|---:|---:|---:|"]
    for name, server in results.get("servers", {}).items():
        lines.append(f"| {name} | {_fmt(server.get('startup_s'), 2)} | {_fmt(server.get('idle_rss_mb'), 0)} | "
                     f"{_fmt(server.get('rss_after_load_mb'), 0)} |")
    rows = _scenarios(results)
    if "int8-raw" in rows and "ours-raw" in rows:
        limits = results.get("limits", {})
        lines += ["", "## int8 vs fp32", "",
                  f"Served saturation: int8 {saturation(rows['int8-raw']):.0f} vs fp32 {saturation(rows['ours-raw']):.0f} "
                  f"img/s ({saturation(rows['int8-raw']) / saturation(rows['ours-raw']):.2f}x)."]
        if INT8 in limits and FP32 in limits:
            lines.append(f"Raw onnxruntime: int8 {limits[INT8]['best_throughput']:.0f} vs fp32 "
                         f"{limits[FP32]['best_throughput']:.0f} img/s "
                         f"({limits[INT8]['best_throughput'] / limits[FP32]['best_throughput']:.2f}x).")
    lines += paired_table(results)
    lines += paired_peer_table(results)
    lines += shadow_table(results)
    lines += client_table(results)
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target in results.get("targets", []):
        verdict = "met" if target["met"] else "**missed**"
        detail = f" ({target['detail']})" if target["detail"] else ""
        lines.append(f"| {target['target']} | {target['measured']}{detail} | {verdict} |")
    examples = {code: detail for s in results.get("scenarios", []) for r in s["runs"]
                for code, detail in r.get("error_examples", {}).items()}
    if examples:
        lines += ["", "## Errors seen", ""] + [f"- `{code}`: {detail}" for code, detail in examples.items()]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def throughput_chart(results: dict, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 5))
    for scenario in results.get("scenarios", []):
        runs = _closed(scenario)
        if runs and scenario["key"] != "grpc-floor":  # calls/s, not images/s
            axes.plot([r["concurrency"] for r in runs], [r["throughput"] for r in runs], marker="o", label=scenario["key"])
    for model, limit in results.get("limits", {}).items():
        axes.axhline(limit["best_throughput"], linestyle="--", color="grey" if model == FP32 else "silver",
                     label=f"raw onnxruntime {model} (batch {limit['best_batch']})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("concurrent clients (closed loop)")
    axes.set_ylabel("images / s")
    axes.set_title("Throughput vs concurrency" + ("" if results.get("valid") else " (NOT VALID: CPU busy)"))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latency_chart(results: dict, path: Path) -> None:
    concurrencies = results["plan"]["concurrencies"]
    scenarios = [s for s in results.get("scenarios", []) if _closed(s)]
    figure, axes = plt.subplots(1, len(concurrencies), figsize=(4 * len(concurrencies), 4.5), sharey=True)
    width = 0.8 / max(1, len(scenarios))
    for ax, concurrency in zip(axes, concurrencies):
        for i, scenario in enumerate(scenarios):
            run = _at(scenario, concurrency)
            if run:
                values = [run["p50_ms"], run["p95_ms"], run["p99_ms"]]
                ax.bar([x + i * width for x in range(3)], values, width, label=scenario["key"])
        ax.set_xticks([x + width * (len(scenarios) - 1) / 2 for x in range(3)], ["p50", "p95", "p99"])
        ax.set_title(f"c={concurrency}")
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("latency, ms (log)")
    axes[-1].legend(fontsize=7)
    figure.suptitle("Latency percentiles" + ("" if results.get("valid") else " (NOT VALID: CPU busy)"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "throughput_vs_concurrency.png", out / "latency_percentiles.png"]
    paths[0].write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(results))
    throughput_chart(results, paths[2])
    latency_chart(results, paths[3])
    return paths
