"""The model repository: versions, policies, hot reload with zero failed requests, bad versions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import SHIPPED_MODELS, raw_image

PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
SOURCE = SHIPPED_MODELS / "cifar10" / "1"


def publish(repo: Path, name: str, version: int, source: Path = SOURCE) -> Path:
    """The safe way to publish: copy into a hidden temp dir, then rename into place."""
    staging = repo / name / f".{version}.tmp"
    shutil.copytree(source, staging)
    target = repo / name / str(version)
    os.replace(staging, target)
    return target


def states(server) -> dict[tuple[str, int], tuple[int, str]]:
    listing = server.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    return {(m.name, m.version): (m.state, m.error) for m in listing.models}


def classify(server, **fields) -> pb.ClassifyResponse:
    return server.stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS), **fields), timeout=10)


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tiny_onnx(path: Path, input_shape: list, dtype=TensorProto.FLOAT) -> None:
    """A valid ONNX model with the wrong signature (an Identity)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "wrong",
        [helper.make_tensor_value_info("x", dtype, input_shape)],
        [helper.make_tensor_value_info("y", dtype, input_shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


class Hammer:
    """Clients classifying in a loop until stopped; every outcome recorded."""

    def __init__(self, server, clients: int = 4, **fields):
        self.server, self.fields = server, fields
        self.versions: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.versions.append(classify(self.server, **self.fields).model_version)
            except grpc.RpcError as err:
                self.errors.append(f"{err.code().name}: {err.details()}")

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()


def test_a_new_version_takes_traffic_with_zero_failed_requests(start_server, model_repo):
    srv = start_server("--poll-interval-s", "0.2", repository=model_repo)
    hammer = Hammer(srv)
    try:
        time.sleep(0.5)
        publish(model_repo, "cifar10", 2)
        wait_for(lambda: hammer.versions[-20:].count(2) == 20, what="answers from v2")
    finally:
        hammer.stop()
    assert hammer.errors == []
    assert 1 in hammer.versions and hammer.versions[-1] == 2
    first_v2 = hammer.versions.index(2)
    assert set(hammer.versions[first_v2 + 8:]) == {2}  # after the swap, only v2 (a few were in flight)
    wait_for(lambda: ("cifar10", 1) not in states(srv), what="v1 unloaded (policy latest:1)")


def test_changed_files_of_a_version_are_swapped_in_after_warm_up(start_server, model_repo):
    srv = start_server("--poll-interval-s", "0.2", repository=model_repo)
    before = srv.metric("classifier_model_loads_total", model="cifar10")
    hammer = Hammer(srv)
    try:
        replacement = model_repo / "cifar10" / ".1.new"
        shutil.copytree(SOURCE, replacement)
        shutil.rmtree(model_repo / "cifar10" / "1")
        os.replace(replacement, model_repo / "cifar10" / "1")
        wait_for(lambda: srv.metric("classifier_model_loads_total", model="cifar10") == before + 1, what="reload")
        time.sleep(0.3)
    finally:
        hammer.stop()
    assert hammer.errors == []


def test_removing_a_version_unloads_it_and_the_rest_keep_serving(start_server, model_repo):
    publish(model_repo, "cifar10", 2)
    srv = start_server("--version-policy", "all", repository=model_repo)
    assert classify(srv, model_version=2).model_version == 2
    shutil.rmtree(model_repo / "cifar10" / "2")
    srv.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
    assert ("cifar10", 2) not in states(srv)
    with pytest.raises(grpc.RpcError) as err:
        classify(srv, model_version=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert classify(srv).model_version == 1
    assert srv.metric("classifier_model_info", model="cifar10", version="2") == 0


@pytest.mark.parametrize("breakage,error_words", [
    ("corrupt", "cannot load"),
    ("half_written", "does not match the model card"),
    ("missing_card", "missing model_card.json"),
    ("wrong_input", "expected uint8 [N, 32, 32, 3]"),
])
def test_a_broken_new_version_leaves_the_previous_one_serving(start_server, model_repo, breakage, error_words):
    srv = start_server(repository=model_repo)
    broken = model_repo / "cifar10" / ".2.tmp"
    shutil.copytree(SOURCE, broken)
    model = broken / "model.onnx"
    if breakage == "corrupt":
        model.write_bytes(b"this is not an onnx file" * 100)
        card = json.loads((broken / "model_card.json").read_text())
        card.pop("sha256")
        (broken / "model_card.json").write_text(json.dumps(card))
    elif breakage == "half_written":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif breakage == "missing_card":
        (broken / "model_card.json").unlink()
    else:
        tiny_onnx(model, ["N", 10])
        card = json.loads((broken / "model_card.json").read_text())
        card.pop("sha256")
        (broken / "model_card.json").write_text(json.dumps(card))
    os.replace(broken, model_repo / "cifar10" / "2")
    srv.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
    state, error = states(srv)[("cifar10", 2)]
    assert state == pb.FAILED and error_words in error
    assert classify(srv).model_version == 1
    assert srv.metric("classifier_model_load_failures_total", model="cifar10") == 1
    assert "failed to load" in srv.log()


def test_a_version_replaced_by_a_corrupt_file_keeps_serving_the_loaded_copy(start_server, model_repo):
    srv = start_server(repository=model_repo)
    (model_repo / "cifar10" / "1" / "model.onnx").write_bytes(b"\0" * 1000)
    srv.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
    state, error = states(srv)[("cifar10", 1)]
    assert state == pb.AVAILABLE and "reload failed" in error
    assert classify(srv).model_version == 1


def test_two_models_are_served_side_by_side(start_server, model_repo):
    publish(model_repo, "other", 7)
    srv = start_server(repository=model_repo)
    assert classify(srv, model_name="other").model_version == 7
    assert classify(srv).model_name == "cifar10"
    assert {("cifar10", 1), ("other", 7)} <= set(states(srv))


def test_version_policy_latest_n_and_per_model_config(start_server, model_repo):
    for version in (2, 3):
        publish(model_repo, "cifar10", version)
    publish(model_repo, "other", 1)
    publish(model_repo, "other", 2)
    (model_repo / "repository.json").write_text(json.dumps({"models": {"other": {"version_policy": "specific:1"}}}))
    srv = start_server("--version-policy", "latest:2", repository=model_repo)
    loaded = set(states(srv))
    assert {("cifar10", 2), ("cifar10", 3), ("other", 1)} <= loaded
    assert ("cifar10", 1) not in loaded and ("other", 2) not in loaded
    assert classify(srv).model_version == 3  # no version given: the newest


def test_sighup_rescans_the_repository(start_server, model_repo):
    srv = start_server(repository=model_repo)
    publish(model_repo, "cifar10", 2)
    srv.signal(signal.SIGHUP)
    wait_for(lambda: classify(srv).model_version == 2, what="v2 after SIGHUP")


def test_names_and_links_cannot_escape_the_repository(start_server, model_repo, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(SOURCE, outside)
    (model_repo / "escape").mkdir()
    (model_repo / "escape" / "1").symlink_to(outside, target_is_directory=True)
    srv = start_server(repository=model_repo)
    assert ("escape", 1) not in states(srv)
    assert "points outside the repository" in srv.log()
    for name in ("../models/cifar10", "cifar10/../cifar10", "/etc/passwd", ".."):
        with pytest.raises(grpc.RpcError) as err:
            classify(srv, model_name=name)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name


def test_the_fp32_and_int8_variants_are_served_together(server):
    fp32 = classify(server, top_k=1)
    int8 = classify(server, model_name="cifar10-int8", top_k=1)
    assert (fp32.model_name, int8.model_name) == ("cifar10", "cifar10-int8")
    assert (fp32.model_version, int8.model_version) == (2, 2)
    listing = states(server)
    assert listing[("cifar10", 2)][0] == pb.AVAILABLE
    assert listing[("cifar10-int8", 2)][0] == pb.AVAILABLE


def test_load_unload_cycles_do_not_grow_memory(start_server, model_repo):
    """A session kept alive after unload would cost at least its weights on every cycle.

    RSS steps by 10-25 MB now and then as the allocator keeps or returns arenas, so the test fits
    a line through 18 cycles (after the first ones have sized the allocator) and bounds its slope
    at one model file per cycle. A session kept alive on purpose grows RSS by ~45 MB per cycle
    (its weights, optimised graph and warmed arenas); allocator steps give slopes under 2 MB.
    """
    srv = start_server(repository=model_repo, wait_ready=True)
    process = psutil.Process(srv.process.pid)
    rss = []
    for cycle in range(20):
        publish(model_repo, "cycle", 1)
        srv.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        assert classify(srv, model_name="cycle").model_name == "cycle"
        shutil.rmtree(model_repo / "cycle")
        srv.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        rss.append(process.memory_info().rss)
    settled = np.array(rss[2:], dtype=np.float64)
    slope_per_cycle = np.polyfit(np.arange(settled.size), settled, 1)[0]
    weights = (SOURCE / "model.onnx").stat().st_size
    assert slope_per_cycle < weights, [r // 2**20 for r in rss]
