"""The client (serving.client, docs/client.md) against real servers: the API, blocking and
asyncio, one image and many; and the bulk CLI's rows, exit status and progress bar."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import AsyncClassifier, Classifier, RetryPolicy
from tests.conftest import REPO_ROOT, ServerProcess, encode, free_port

ROW_KEYS = ["path", "label", "probability", "unsure", "model", "version", "top_k"]
IMAGES = 24


@pytest.fixture(scope="module")
def png_files(tmp_path_factory, test_slice) -> list[Path]:
    """Real test images as PNG files, in a folder of their own."""
    folder = tmp_path_factory.mktemp("pngs")
    files = []
    for index, pixels in enumerate(test_slice.images[:IMAGES]):
        files.append(folder / f"{index:03d}.png")
        files[-1].write_bytes(encode(pixels))
    return files


@pytest.fixture(scope="module")
def tiny_queue_server():
    """One image at a time, one waiting: a burst of more fills the queue (RESOURCE_EXHAUSTED)."""
    proc = ServerProcess("--max-batch-size", "1", "--max-queue-size", "1")
    yield proc
    proc.stop()


def assert_waited_the_hint(retries) -> None:
    """Every retry had the server's hint and waited at least that long (the back-off alone is ~1 ms)."""
    (hint,) = {retry.retry_after_ms for retry in retries}
    assert hint > 0 and all(retry.delay_s >= hint / 1000 for retry in retries)


def top1_of_each(server, files) -> list[tuple[str, float]]:
    with Classifier(server.target) as classifier:
        return [(answer.label, answer.probability) for answer in map(classifier.classify, files)]


# ---- the API ------------------------------------------------------------------------------------

def test_one_image_as_a_path_bytes_an_array_or_a_pil_image_gets_the_same_answer(server, png_files):
    path = png_files[0]
    pixels = np.asarray(Image.open(path))
    with Classifier(server.target) as classifier:
        answers = [classifier.classify(image) for image in
                   (path, str(path), path.read_bytes(), pixels, Image.open(path))]
    first = answers[0]
    assert first.model == "cifar10" and first.version >= 1 and len(first.predictions) == 5
    assert [p.probability for p in first.predictions] == sorted((p.probability for p in first.predictions), reverse=True)
    assert first.label == first.predictions[0].label
    assert all(answer.predictions == first.predictions for answer in answers)


def test_the_asyncio_client_answers_as_the_blocking_one(server, png_files):
    async def classify() -> tuple[str, float]:
        async with AsyncClassifier(server.target, top_k=3) as classifier:
            answer = await classifier.classify(png_files[1])
        return answer.label, answer.probability

    assert asyncio.run(classify()) == top1_of_each(server, png_files[1:2])[0]


def test_many_images_come_back_one_result_each_in_input_order(server, png_files):
    images = png_files[::-1] + png_files[:5]  # any order, repeats included
    with Classifier(server.target) as classifier:
        results = list(classifier.classify_many(images, max_in_flight=8))
    assert [result.input for result in results] == images
    assert all(result.ok and result.attempts == 1 for result in results)
    assert [(r.classification.label, r.classification.probability) for r in results] == top1_of_each(server, images)


def test_asyncio_bulk_reads_an_async_iterable_and_keeps_its_order(server, png_files):
    async def images():
        for path in png_files:
            yield path.read_bytes()

    async def classify_all() -> list[tuple[str, float]]:
        async with AsyncClassifier(server.target) as classifier:
            return [(r.classification.label, r.classification.probability)
                    async for r in classifier.classify_many(images(), max_in_flight=4)]

    assert asyncio.run(classify_all()) == top1_of_each(server, png_files)


def test_in_bulk_a_bad_image_fails_alone_with_its_own_error(server, png_files, tmp_path):
    images = [png_files[0], b"not an image", tmp_path / "missing.png", np.zeros((5, 5, 7), np.uint8), png_files[1]]
    with Classifier(server.target) as classifier:
        results = list(classifier.classify_many(images))
    assert [result.ok for result in results] == [True, False, False, False, True]
    refused, missing, misshapen = (result.error for result in results[1:4])
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and "not a PNG, JPEG, BMP or GIF" in refused.message
    assert missing.code is None and "cannot read" in missing.message and missing.attempts == 0
    assert misshapen.code is None and "[height, width, 1|3|4]" in misshapen.message


def test_bulk_retries_a_full_queue_never_sooner_than_the_servers_hint(tiny_queue_server, png_files):
    retries = []
    policy = RetryPolicy(max_attempts=20, initial_backoff_s=0.001)  # the hint, not the back-off, sets the wait
    with Classifier(tiny_queue_server.target, retry=policy, on_retry=retries.append) as classifier:
        results = list(classifier.classify_many(png_files, max_in_flight=16))
    assert all(result.ok for result in results) and len(results) == len(png_files)
    assert retries and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in retries)
    assert_waited_the_hint(retries)  # the hint of the refused message's in-band RetryInfo
    assert max(result.attempts for result in results) > 1


def test_one_image_calls_retry_a_full_queue_by_the_retry_after_ms_metadata(tiny_queue_server, png_files):
    retries = []

    async def burst() -> list[str]:
        policy = RetryPolicy(max_attempts=20, initial_backoff_s=0.001)
        async with AsyncClassifier(tiny_queue_server.target, retry=policy, on_retry=retries.append) as classifier:
            return [a.label for a in await asyncio.gather(*(classifier.classify(p) for p in png_files[:12]))]

    assert len(asyncio.run(burst())) == 12
    assert retries
    assert_waited_the_hint(retries)


def test_without_retries_a_full_queue_fails_only_the_images_it_refused(tiny_queue_server, png_files):
    with Classifier(tiny_queue_server.target, retry=RetryPolicy(max_attempts=1)) as classifier:
        results = list(classifier.classify_many(png_files, max_in_flight=16))
    assert len(results) == len(png_files) and any(result.ok for result in results)
    refused = [result.error for result in results if not result.ok]
    assert refused and all(error.code == grpc.StatusCode.RESOURCE_EXHAUSTED for error in refused)


def test_a_server_that_is_not_there_fails_every_image_with_unavailable(png_files):
    with Classifier(f"127.0.0.1:{free_port()}", retry=RetryPolicy(initial_backoff_s=0.01)) as classifier:
        results = list(classifier.classify_many(png_files * 4))
    assert len(results) == 4 * len(png_files)
    assert {result.error.code for result in results} == {grpc.StatusCode.UNAVAILABLE}


def test_explain_through_the_api(server, png_files):
    with Classifier(server.target) as classifier:
        explanation = classifier.explain(png_files[0], method="occlusion")
        top1 = classifier.classify(png_files[0]).label
    assert explanation.method == "occlusion" and explanation.target_label == top1
    assert explanation.heatmap.shape == (32, 32) and 0 <= explanation.heatmap.min() <= explanation.heatmap.max() <= 1
    assert {fm.layer: fm.values.ndim for fm in explanation.feature_maps} == {"block1": 3, "block2": 3}
    assert explanation.heatmap_png.startswith(b"\x89PNG")


# ---- the CLI --------------------------------------------------------------------------------------

def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.client", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def folder_with_a_bad_file(png_files, tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in png_files[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    (folder / "notes.txt").write_text("not an image: directories give only their images")
    return folder


def test_cli_writes_one_json_line_per_image_with_the_keys_in_order(server, folder_with_a_bad_file, tmp_path):
    output = tmp_path / "rows.jsonl"
    run = run_cli(str(folder_with_a_bad_file), "--target", server.target, "--output", str(output), "--top-k", "3")
    assert run.returncode == 1, run.stderr  # one image failed
    assert run.stdout == ""
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = sorted(p for p in folder_with_a_bad_file.iterdir() if p.suffix == ".png")
    assert [row["path"] for row in rows] == [str(p) for p in expected]
    broken = next(row for row in rows if row["path"].endswith("broken.png"))
    assert list(broken) == ROW_KEYS + ["error"] and broken["error"].startswith("INVALID_ARGUMENT: ")
    for row in (row for row in rows if row is not broken):
        assert list(row) == ROW_KEYS
        assert row["model"] == "cifar10" and isinstance(row["unsure"], bool) and len(row["top_k"]) == 3
        assert [p["probability"] for p in row["top_k"]] == sorted((p["probability"] for p in row["top_k"]), reverse=True)
        assert (row["label"], row["probability"]) == (row["top_k"][0]["label"], row["top_k"][0]["probability"])
    assert "classified 6 of 7 images" in run.stderr and "INVALID_ARGUMENT 1" in run.stderr


def test_cli_writes_csv_with_one_header_and_one_row_per_image(server, png_files, tmp_path):
    output = tmp_path / "rows.csv"
    run = run_cli(*map(str, png_files[:5]), "--target", server.target, "--output", str(output))
    assert run.returncode == 0, run.stderr
    header, *rows = list(csv.reader(io.StringIO(output.read_text())))
    assert header == ROW_KEYS + ["error"]
    assert [row[0] for row in rows] == [str(p) for p in png_files[:5]]
    for row in rows:
        record = dict(zip(header, row))
        assert record["error"] == "" and record["unsure"] in ("true", "false")
        assert json.loads(record["top_k"])[0]["label"] == record["label"]


def test_cli_reads_globs_and_list_files_in_the_order_given(server, png_files, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in png_files[3:1:-1]) + "\n")
    output = tmp_path / "rows.jsonl"
    pattern = str(png_files[0].parent / "00[01].png")
    run = run_cli(f"@{listing}", pattern, "--target", server.target, "--output", str(output))
    assert run.returncode == 0, run.stderr
    paths = [json.loads(line)["path"] for line in output.read_text().splitlines()]
    assert paths == [str(png_files[3]), str(png_files[2]), str(png_files[0]), str(png_files[1])]


def test_cli_without_output_prints_a_line_per_image_and_a_progress_bar_on_stderr(server, png_files):
    run = run_cli(*map(str, png_files[:3]), "--target", server.target, "--progress", "on")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(p) for p in png_files[:3]]
    assert all(line.endswith("]") and "[cifar10 v" in line for line in lines)
    assert "3/3" in run.stderr and "classified 3 of 3 images" in run.stderr


@pytest.mark.parametrize("argv,words", [
    (["{missing}/*.png"], "no image files found"),
    (["{image}", "--output", "{tmp}/rows.txt"], "extension"),
    (["@{tmp}/no-such-list.txt"], "cannot read the list"),
])
def test_cli_usage_errors_exit_2_and_say_why(png_files, tmp_path, argv, words):
    values = {"missing": tmp_path / "missing", "image": png_files[0], "tmp": tmp_path}
    run = run_cli(*(arg.format(**values) for arg in argv), "--target", f"127.0.0.1:{free_port()}")
    assert run.returncode == 2 and words in run.stderr, run.stderr
