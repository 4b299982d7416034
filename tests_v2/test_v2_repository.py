"""The model repository extension, version labels in model_version, and readiness while a model cannot serve."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests_v2.conftest import MODEL, SHIPPED_MODELS, V2Server, expect_error, image_input


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    """A repository whose only model has one version, with a corrupt file: live, never ready."""
    repo = tmp_path_factory.mktemp("broken") / "models"
    shutil.copytree(SHIPPED_MODELS / MODEL / "1", repo / MODEL / "1")
    (repo / MODEL / "1" / "model.onnx").write_bytes(b"not an onnx file")
    proc = V2Server(repository=repo, wait_ready=False)
    try:
        proc.wait_until("the broken version UNAVAILABLE", lambda: any(
            m.state == "UNAVAILABLE" for m in proc.client.get_model_repository_index().models),
            retry_on=(InferenceServerException,))
        yield proc
    finally:
        proc.stop()


def test_server_is_live_but_not_ready_while_the_default_model_failed(broken_server):
    assert broken_server.client.is_server_live()
    assert not broken_server.client.is_server_ready()
    assert not broken_server.client.is_model_ready(MODEL)


def test_repository_index_reports_a_failed_version_as_unavailable_with_its_reason(broken_server):
    (entry,) = broken_server.client.get_model_repository_index().models
    assert (entry.name, entry.version, entry.state) == (MODEL, "1", "UNAVAILABLE")
    assert "sha256" in entry.reason or "onnxruntime" in entry.reason


def test_infer_on_a_model_that_cannot_serve_is_unavailable(broken_server):
    tensor = image_input("images", np.zeros((1, 32, 32, 3), np.uint8), "UINT8")
    expect_error("UNAVAILABLE", lambda: broken_server.client.infer(MODEL, [tensor]), f"'{MODEL}'", "FAILED")


def test_ready_only_index_leaves_out_versions_that_cannot_serve(broken_server):
    everything = broken_server.stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10)
    ready_only = broken_server.stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
    assert len(everything.models) == 1
    assert list(ready_only.models) == []


def test_load_picks_up_a_version_added_on_disk(start_server, model_repo):
    proc = start_server("--version-policy", "all", repository=model_repo)
    shutil.copytree(model_repo / MODEL / "1", model_repo / MODEL / "2")
    assert not proc.client.is_model_ready(MODEL, model_version="2")
    proc.client.load_model(MODEL)
    assert proc.client.is_model_ready(MODEL, model_version="2")
    states = {m.version: m.state for m in proc.client.get_model_repository_index().models if m.name == MODEL}
    assert states == {"1": "READY", "2": "READY"}


def test_load_of_a_model_that_fails_to_load_is_unavailable_with_the_reason(broken_server):
    expect_error("UNAVAILABLE", lambda: broken_server.client.load_model(MODEL), f"'{MODEL}'", "FAILED")


def test_load_of_a_model_missing_from_the_repository_is_not_found(server):
    expect_error("NOT_FOUND", lambda: server.client.load_model("resnet50"), "'resnet50'")


def test_load_with_config_parameters_is_unimplemented(server):
    expect_error("UNIMPLEMENTED", lambda: server.client.load_model(MODEL, config='{"max_batch_size": 8}'),
                 "config", "model repository")


def test_unload_is_unimplemented_and_says_how_to_unload(server):
    expect_error("UNIMPLEMENTED", lambda: server.client.unload_model(MODEL), "file-based", "RepositoryModelLoad")
    assert server.client.is_model_ready(MODEL)


def write_rollout(repo, rollout: dict) -> None:
    (repo / "repository.json").write_text(json.dumps({"models": {MODEL: rollout}}))


def test_a_version_label_in_model_version_picks_the_labelled_version(start_server, model_repo):
    shutil.copytree(model_repo / MODEL / "1", model_repo / MODEL / "2")
    write_rollout(model_repo, {"labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 100}})
    proc = start_server(repository=model_repo)
    tensor = image_input("images", np.zeros((1, 32, 32, 3), np.uint8), "UINT8")
    assert proc.client.infer(MODEL, [tensor], model_version="canary").get_response().model_version == "2"
    assert proc.client.infer(MODEL, [tensor]).get_response().model_version == "1"  # the traffic policy
    assert proc.client.is_model_ready(MODEL, model_version="stable")
    expect_error("NOT_FOUND", lambda: proc.client.infer(MODEL, [tensor], model_version="beta"),
                 "no version label 'beta'")


def test_load_after_a_bad_rollout_config_is_failed_precondition_and_the_old_labels_stay(start_server, model_repo):
    shutil.copytree(model_repo / MODEL / "1", model_repo / MODEL / "2")
    write_rollout(model_repo, {"labels": {"stable": 1, "canary": 2}})
    proc = start_server(repository=model_repo)
    write_rollout(model_repo, {"labels": {"stable": 1, "canary": 2}, "traffic": {"stable": 60, "canary": 30}})
    expect_error("FAILED_PRECONDITION", lambda: proc.client.load_model(MODEL), "sum to 90, not 100",
                 "the last good config stays in force")
    tensor = image_input("images", np.zeros((1, 32, 32, 3), np.uint8), "UINT8")
    assert proc.client.infer(MODEL, [tensor], model_version="canary").get_response().model_version == "2"
