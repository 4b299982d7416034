"""Liveness, readiness and metadata through Triton's client, as a KServe V2 user sees them."""

from __future__ import annotations

from tests_v2.conftest import MODEL
from training.data import CLASS_NAMES


def test_server_is_live_and_ready_once_the_default_model_is_warm(server):
    assert server.client.is_server_live()
    assert server.client.is_server_ready()


def test_server_metadata_names_the_server_and_its_extensions(server):
    reply = server.client.get_server_metadata()
    assert reply.name == "cifar10-serving"
    assert reply.version
    assert {"classification", "model_repository"} <= set(reply.extensions)


def test_model_is_ready_by_name_and_by_explicit_version(server):
    assert server.client.is_model_ready(MODEL)
    assert server.client.is_model_ready(MODEL, model_version="2")


def test_model_ready_is_false_for_an_unknown_model_or_version(server):
    assert not server.client.is_model_ready("no-such-model")
    assert not server.client.is_model_ready(MODEL, model_version="99")


def test_model_metadata_reports_uint8_images_in_and_probabilities_and_unsure_out(metadata):
    assert metadata.name == MODEL
    assert metadata.platform == "onnxruntime_onnx"
    assert metadata.versions == ["2"]  # the newest; `make serve` loads only that one
    (tensor_in,) = metadata.inputs
    tensor_out, score, flag = metadata.outputs
    assert (tensor_in.datatype, list(tensor_in.shape)) == ("UINT8", [-1, 32, 32, 3])
    assert (tensor_out.datatype, list(tensor_out.shape)) == ("FP32", [-1, len(CLASS_NAMES)])
    assert tensor_in.name and tensor_out.name and tensor_in.name != tensor_out.name
    assert [(t.name, t.datatype, list(t.shape)) for t in (score, flag)] == [("unsure_score", "FP32", [-1]),
                                                                           ("unsure", "BOOL", [-1])]


def test_model_metadata_of_an_explicit_version_lists_only_that_version(start_server):
    both = start_server("--version-policy", "all")
    assert both.client.get_model_metadata(MODEL).versions == ["1", "2"]
    assert both.client.get_model_metadata(MODEL, model_version="1").versions == ["1"]


def test_repository_index_lists_every_version_with_its_state(server):
    index = server.client.get_model_repository_index()
    entries = {(m.name, m.version): m.state for m in index.models}
    assert entries[(MODEL, "2")] == "READY"
    assert all(version.isdigit() for _, version in entries)
    assert set(entries.values()) <= {"READY", "LOADING", "UNLOADING", "UNAVAILABLE"}
