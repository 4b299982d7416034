"""Safe rollouts through the real server: version labels, the weighted split (sticky per request
id), shadow traffic and its agreement metrics, and a config that is wrong never taking effect.

The module-wide servers run on a private copy of models/ as shipped: cifar10 v1 and v2. A test
that adds versions starts from v1 alone (the `model_repo` fixture) and publishes its own version 2:
a copy of v1, or, where the two must disagree, the int8 model's file (cifar10-int8 v1).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2

from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.inference import grpc_service_pb2 as v2
from serving.proto.inference import grpc_service_pb2_grpc as v2_grpc
from tests.conftest import (REPO_ROOT, SHIPPED_MODELS, ServerProcess, calibrated_as_served, copy_of_shipped_models,
                            encode, raw_image)
from tests.test_model_repository import PIXELS, Hammer, classify, publish, states, wait_for

INT8 = SHIPPED_MODELS / "cifar10-int8" / "1"
EXAMPLES = REPO_ROOT / "examples" / "rollouts"
STABLE_AND_CANARY = {"labels": {"stable": 1, "canary": 2}}


def write_config(repo: Path, **cifar10) -> None:
    (repo / "repository.json").write_text(json.dumps({"models": {"cifar10": cifar10}}, indent=2))


def reload(server) -> pb.ListModelsResponse:
    return server.stub.ReloadModels(pb.ReloadModelsRequest(), timeout=60)


def v2_infer(server, pixels: np.ndarray, model_version: str = "", request_id: str = "") -> v2.ModelInferResponse:
    request = v2.ModelInferRequest(model_name="cifar10", model_version=model_version, id=request_id)
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(pixels.tobytes())
    return v2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=10)


def metrics_text(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()


def versions_of(responses) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.model_version] = counts.get(response.model_version, 0) + 1
    return counts


@pytest.fixture(scope="module")
def two_version_repo(tmp_path_factory) -> Path:
    return copy_of_shipped_models(tmp_path_factory.mktemp("rollouts"))


@pytest.fixture(scope="module")
def labelled(two_version_repo):
    """stable=v1, canary=v2, requests naming neither split 50/50: read by the tests that only read."""
    write_config(two_version_repo, **STABLE_AND_CANARY, traffic={"stable": 50, "canary": 50})
    proc = ServerProcess(repository=two_version_repo)
    yield proc
    proc.stop()


# ---- defaults ----------------------------------------------------------------------------------

def test_without_a_config_every_request_goes_to_the_newest_version(start_server, model_repo):
    publish(model_repo, "cifar10", 2)
    srv = start_server("--version-policy", "all", repository=model_repo)
    answers = [classify(srv, request_id=f"plain-{i}") for i in range(20)]
    assert versions_of(answers) == {2: 20} and {a.version_label for a in answers} == {""}
    srv.wait_until("counted", lambda: srv.metric("classifier_routed_requests_total", route="newest") == 20, timeout=5)


def test_shadow_families_are_exported_with_help_text_even_without_a_shadow(server):
    text = metrics_text(server)
    for family in ("shadow_agreement_ratio", "shadow_confidence_shift", "shadow_compared_images_total",
                   "shadow_agreed_images_total", "shadow_duration_seconds", "shadow_dropped_images_total",
                   "routed_requests_total", "traffic_percent", "version_label", "repository_config_ok"):
        name = f"classifier_{family}".removesuffix("_total")
        assert f"# HELP {name}" in text, family


# ---- labels ------------------------------------------------------------------------------------

def test_a_version_label_names_its_version_on_the_native_api(labelled):
    canary = classify(labelled, version_label="canary")
    assert (canary.model_version, canary.version_label) == (2, "canary")
    batch = labelled.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 3,
                                                                version_label="stable"), timeout=10)
    assert (batch.model_version, batch.version_label, len(batch.results)) == (1, "stable", 3)
    (streamed,) = labelled.stub.ClassifyStream(iter([pb.ClassifyRequest(image=raw_image(PIXELS),
                                                                       version_label="canary")]), timeout=10)
    assert streamed.response.model_version == 2


def test_explain_routes_by_version_label_like_classify(labelled):
    request = pb.ExplainRequest(image=raw_image(PIXELS), version_label="canary", omit_images=True, omit_feature_maps=True)
    assert labelled.stub.Explain(request, timeout=30).model_version == 2
    request.version_label = "stable"
    assert labelled.stub.Explain(request, timeout=30).model_version == 1


def test_the_client_cli_names_a_label_and_prints_which_version_answered(labelled, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(encode(PIXELS))
    run = subprocess.run([sys.executable, "-m", "serving.client", str(image), "--target", labelled.target,
                          "--label", "canary", "--top-k", "1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().endswith("[cifar10 v2 canary]")


def test_a_version_label_travels_in_model_version_on_the_open_inference_protocol(labelled):
    assert v2_infer(labelled, PIXELS, "stable").model_version == "1"
    assert v2_infer(labelled, PIXELS, "canary").model_version == "2"
    stub = v2_grpc.GRPCInferenceServiceStub(labelled.channel)
    assert stub.ModelReady(v2.ModelReadyRequest(name="cifar10", version="canary"), timeout=5).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="cifar10", version="beta"), timeout=5).ready
    assert stub.ModelMetadata(v2.ModelMetadataRequest(name="cifar10", version="canary"), timeout=5).versions == ["2"]


def test_list_models_and_metadata_show_the_labels_the_split_and_the_policy(labelled):
    listing = labelled.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    by_version = {m.version: m for m in listing.models if m.name == "cifar10"}
    assert list(by_version[1].version_labels) == ["stable"] and by_version[1].traffic_percent == 50
    assert list(by_version[2].version_labels) == ["canary"] and by_version[2].traffic_percent == 50
    (rollout,) = listing.rollouts
    assert rollout.model_name == "cifar10" and dict(rollout.labels) == {"stable": 1, "canary": 2}
    assert [(s.version, s.label, s.percent) for s in rollout.traffic] == [(2, "canary", 50), (1, "stable", 50)]
    assert not rollout.HasField("shadow") and listing.config_error == ""
    meta = labelled.stub.GetModelMetadata(pb.GetModelMetadataRequest(model_version=2), timeout=5)
    assert list(meta.version_labels) == ["canary"] and meta.rollout == rollout


def test_the_config_in_force_is_exported_as_metrics(labelled):
    assert labelled.metric("classifier_version_label", model="cifar10", label="canary", version="2") == 1
    assert labelled.metric("classifier_traffic_percent", model="cifar10", version="1") == 50
    assert labelled.metric("classifier_repository_config_ok") == 1


def test_putting_a_config_in_force_is_logged_with_what_it_changed(labelled):
    assert "cifar10: rollout none (unnamed requests go to the newest version) -> labels canary=v2, stable=v1; " \
           "traffic canary(v2) 50%, stable(v1) 50%" in labelled.log()


# ---- the split ---------------------------------------------------------------------------------

def test_the_split_lands_within_3_points_of_the_configured_share_over_2000_requests(start_server, model_repo):
    publish(model_repo, "cifar10", 2)
    write_config(model_repo, **STABLE_AND_CANARY, traffic={"stable": 90, "canary": 10})
    srv = start_server(repository=model_repo)
    # No request ids: the server draws one per message, as it does for clients that send none.
    messages = (pb.ClassifyRequest(image=raw_image(PIXELS), top_k=1) for _ in range(2000))
    answers = [m.response for m in srv.stub.ClassifyStream(messages, timeout=120)]
    counts = versions_of(answers)
    assert sum(counts.values()) == 2000
    assert abs(counts.get(2, 0) / 2000 - 0.10) <= 0.03, counts
    assert {a.version_label for a in answers if a.model_version == 2} == {"canary"}
    assert srv.metric("classifier_routed_requests_total", route="split", version="2") == counts[2]


def test_a_request_id_lands_on_the_same_version_every_time(labelled):
    landed: dict[str, set[int]] = {}
    for i in range(40):
        request_id = f"user-{i}"
        answers = [classify(labelled, request_id=request_id).model_version,
                   labelled.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)], request_id=request_id),
                                               timeout=10).model_version,
                   int(v2_infer(labelled, PIXELS, request_id=request_id).model_version),
                   labelled.stub.Classify(pb.ClassifyRequest(image=raw_image(PIXELS)), timeout=10,
                                          metadata=(("x-request-id", request_id),)).model_version]
        landed[request_id] = set(answers)
    assert all(len(versions) == 1 for versions in landed.values()), landed
    assert set().union(*landed.values()) == {1, 2}  # 40 ids at 50/50: both sides get some


# ---- shadow ------------------------------------------------------------------------------------

def offline_top1(version_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and its served (calibrated, as the version's card says) probability per image,
    one image per run as the server's sequential calls were."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    probabilities = np.concatenate([session.run(None, {"images": images[i:i + 1]})[0] for i in range(len(images))])
    probabilities = calibrated_as_served(version_dir, probabilities)
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


def test_shadow_agreement_equals_an_offline_count_on_the_same_images(start_server, model_repo, test_slice):
    publish(model_repo, "cifar10", 2, source=INT8)  # the int8 model as candidate: it disagrees on some images
    write_config(model_repo, labels={"stable": 1, "candidate": 2}, traffic={"stable": 100},
                 shadow={"version": "candidate", "percent": 100})
    srv = start_server(repository=model_repo)
    images = test_slice.images
    answered = [srv.stub.Classify(pb.ClassifyRequest(image=raw_image(p)), timeout=10).model_version for p in images]
    assert set(answered) == {1}  # the shadow never answers
    pair = dict(model="cifar10", primary="1", shadow="2")
    srv.wait_until("every copy compared or dropped", lambda: srv.metric("classifier_shadow_compared_images_total", **pair)
                   + srv.metric("classifier_shadow_dropped_images_total") >= len(images), timeout=30)
    dropped = {dict(labels)["reason"]: value for (name, labels), value in srv.metrics().items()
               if name == "classifier_shadow_dropped_images_total" and value}
    assert dropped == {} and srv.metric("classifier_shadow_compared_images_total", **pair) == len(images)
    primary_top, primary_confidence = offline_top1(model_repo / "cifar10" / "1", images)
    shadow_top, shadow_confidence = offline_top1(model_repo / "cifar10" / "2", images)
    agreed = int((primary_top == shadow_top).sum())
    assert agreed < len(images)  # the two versions really disagree somewhere
    assert srv.metric("classifier_shadow_agreed_images_total", **pair) == agreed
    assert srv.metric("classifier_shadow_agreement_ratio", **pair) == pytest.approx(agreed / len(images), abs=1e-12)
    shift = float((shadow_confidence - primary_confidence).mean())
    assert srv.metric("classifier_shadow_confidence_shift", **pair) == pytest.approx(shift, abs=1e-5)
    assert srv.metric("classifier_shadow_duration_seconds_count", model="cifar10", shadow="2") == len(images)
    assert srv.metric("classifier_images_classified_total", version="2") == 0  # no answer came from it


@pytest.mark.parametrize("flags,reason", [
    (("--shadow-max-inflight-images", "1", "--shadow-drop-queue-images", "100000"), "budget"),
    ((), "load"),  # by default a copy goes only while the answering version is idle
])
def test_shadow_copies_are_dropped_over_the_budget_or_under_load_and_no_caller_notices(
        start_server, model_repo, flags, reason):
    publish(model_repo, "cifar10", 2)
    write_config(model_repo, **STABLE_AND_CANARY, traffic={"stable": 100}, shadow={"version": "canary", "percent": 100})
    srv = start_server(*flags, repository=model_repo)
    hammer = Hammer(srv, clients=8)
    try:
        srv.wait_until(f"a copy dropped for {reason}", lambda: srv.metric(
            "classifier_shadow_dropped_images_total", reason=reason) > 0, timeout=30)
        srv.wait_until("a copy compared", lambda: srv.metric("classifier_shadow_compared_images_total") > 0, timeout=30)
    finally:
        hammer.stop()
    assert hammer.errors == [] and set(hammer.versions) == {1}


def lowest_priority_threads(pid: int) -> dict[int, int]:
    """The process's threads at nice 19, each with the CPU time it has used (clock ticks)."""
    threads = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        utime, stime, nice = int(fields[11]), int(fields[12]), int(fields[16])
        if nice == 19:
            threads[int(stat.parent.name)] = utime + stime
    return threads


def test_shadow_copies_run_on_a_thread_of_the_lowest_cpu_priority(start_server, model_repo, test_slice):
    """Shadow work takes only the CPU that the answering version leaves idle (docs/rollouts.md)."""
    publish(model_repo, "cifar10", 2)
    write_config(model_repo, **STABLE_AND_CANARY, traffic={"stable": 100}, shadow={"version": "canary", "percent": 100})
    srv = start_server(repository=model_repo)
    assert lowest_priority_threads(srv.process.pid) == {}  # none before the first copy
    for pixels in test_slice.images[:150]:
        srv.stub.Classify(pb.ClassifyRequest(image=raw_image(pixels)), timeout=10)
    # Compared or dropped: a copy that the kernel leaves waiting past its age limit is dropped as
    # stale, as it should be on a busy machine.
    srv.wait_until("every copy compared or dropped", lambda: srv.metric("classifier_shadow_compared_images_total")
                   + srv.metric("classifier_shadow_dropped_images_total") >= 150, timeout=30)
    assert srv.metric("classifier_shadow_compared_images_total") > 0
    (cpu_ticks,) = lowest_priority_threads(srv.process.pid).values()
    assert cpu_ticks > 0  # it is the thread that computed the copies


# ---- the walkthrough of docs/rollouts.md ----------------------------------------------------------

def test_the_walkthrough_takes_v2_from_shadow_to_canary_to_stable_and_back(start_server, model_repo, tmp_path):
    publish(model_repo, "cifar10", 2, source=INT8)
    live = tmp_path / "repository.json"  # outside the repository, as the walkthrough keeps it

    def step(example: str) -> None:
        shutil.copy(EXAMPLES / example, live)
        reload(srv)

    shutil.copy(EXAMPLES / "1-stable.json", live)
    srv = start_server("--repository-config", str(live), repository=model_repo)
    assert {classify(srv, request_id=f"a-{i}").model_version for i in range(10)} == {1}  # v2 is newer, not stable
    step("2-shadow.json")
    assert {classify(srv).model_version for _ in range(20)} == {1}
    srv.wait_until("the copies compared", lambda: srv.metric("classifier_shadow_compared_images_total") == 20)
    step("3-canary.json")
    assert "classifier_shadow_agreement_ratio" not in {name for name, _ in srv.metrics()}  # no stale ratio left
    split = versions_of(classify(srv, request_id=f"user-{i}") for i in range(200))
    assert set(split) == {1, 2} and split[2] < 50, split  # 10% of 200 ids
    assert classify(srv, version_label="canary").model_version == 2
    step("4-promote.json")
    assert (classify(srv).model_version, classify(srv).version_label) == (2, "stable")
    assert states(srv)[("cifar10", 1)][0] == pb.AVAILABLE  # `previous` keeps v1 loaded for a rollback
    step("1-stable.json")
    assert (classify(srv).model_version, classify(srv).version_label) == (1, "stable")


# ---- safety ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server whose config each test breaks, then restores: stable=v1, canary=v2, 90/10."""
    repo = copy_of_shipped_models(tmp_path_factory.mktemp("guarded"))
    good = dict(**STABLE_AND_CANARY, traffic={"stable": 90, "canary": 10})
    write_config(repo, **good)
    proc = ServerProcess(repository=repo)
    proc.repo, proc.good = repo, good
    yield proc
    proc.stop()


@pytest.mark.parametrize("breakage,words", [
    ({"labels": {"stable": 1, "canary": 7}}, "models.cifar10.labels.canary: version 7 is not in the repository"),
    ({"traffic": {"stable": 90, "canary": 5}}, "models.cifar10.traffic: the percents sum to 95, not 100"),
    ({"model": "cifar11"}, "models.cifar11: unknown model"),
    ({"text": '{"models": {"cifar10": {"labels": {"stable": 2,}}}}'}, "not valid JSON"),
    ({"trafic": {"stable": 100}}, "unknown key(s) 'trafic'"),
])
def test_a_bad_config_is_rejected_and_the_last_good_one_stays_in_force(guarded, breakage, words):
    config = guarded.repo / "repository.json"
    if "text" in breakage:
        config.write_text(breakage["text"])
    elif "model" in breakage:
        config.write_text(json.dumps({"models": {breakage["model"]: {"labels": {"stable": 1}}}}))
    else:
        write_config(guarded.repo, **{**guarded.good, **breakage})
    with pytest.raises(grpc.RpcError) as error:
        reload(guarded)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert words in error.value.details() and "the last good config stays in force" in error.value.details()
    assert words in guarded.stub.ListModels(pb.ListModelsRequest(), timeout=5).config_error
    assert classify(guarded, version_label="canary").model_version == 2  # the old labels still route
    assert guarded.metric("classifier_traffic_percent", model="cifar10", version="2") == 10
    assert guarded.metric("classifier_repository_config_ok") == 0
    assert words in guarded.log()
    write_config(guarded.repo, **guarded.good)
    assert reload(guarded).config_error == ""
    assert guarded.metric("classifier_repository_config_ok") == 1


def test_a_config_naming_a_version_that_fails_to_load_is_rejected(guarded):
    broken = guarded.repo / "cifar10" / "3"
    shutil.copytree(SHIPPED_MODELS / "cifar10" / "1", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    try:
        write_config(guarded.repo, labels={"stable": 1, "canary": 3}, traffic={"stable": 90, "canary": 10})
        with pytest.raises(grpc.RpcError) as error:
            reload(guarded)
        assert "models.cifar10: version 3 is FAILED" in error.value.details()
        assert classify(guarded, version_label="canary").model_version == 2
    finally:
        shutil.rmtree(broken)
        write_config(guarded.repo, **guarded.good)
        reload(guarded)


@pytest.mark.parametrize("where,words", [
    ("repository.json", "the percents sum to 50"),
    ("elsewhere.json", "no such file (--repository-config)"),  # a mistyped path must not mean "no rollout"
])
def test_a_bad_config_at_start_keeps_the_server_not_serving_until_it_is_fixed(start_server, model_repo, where, words):
    if where == "repository.json":
        write_config(model_repo, labels={"stable": 1}, traffic={"stable": 50})
        srv = start_server(repository=model_repo, wait_ready=False)
    else:
        srv = start_server("--repository-config", str(model_repo / where), repository=model_repo, wait_ready=False)
    srv.wait_until("the rejection logged", lambda: "rejected" in srv.log())
    assert words in srv.log() and "no config is in force, so the server stays NOT_SERVING" in srv.log()
    status = srv.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    (model_repo / where).write_text(json.dumps({"models": {"cifar10": {"labels": {"stable": 1},
                                                                        "traffic": {"stable": 100}}}}))
    srv.signal(signal.SIGHUP)
    srv.wait_serving()
    assert classify(srv).version_label == "stable"


def test_removing_a_version_a_label_points_to_is_refused_until_the_label_moves(start_server, model_repo):
    publish(model_repo, "cifar10", 2)
    write_config(model_repo, **STABLE_AND_CANARY, traffic={"stable": 90, "canary": 10})
    srv = start_server(repository=model_repo)
    shutil.rmtree(model_repo / "cifar10" / "2")
    with pytest.raises(grpc.RpcError) as error:
        reload(srv)
    assert "labels.canary: version 2 is not in the repository" in error.value.details()
    state, note = states(srv)[("cifar10", 2)]
    assert state == pb.AVAILABLE and "removed from disk, kept loaded" in note
    assert classify(srv, version_label="canary").model_version == 2  # its session still serves
    write_config(model_repo, labels={"stable": 1}, traffic={"stable": 100})
    reload(srv)
    assert ("cifar10", 2) not in states(srv)


def test_a_relabel_under_load_drops_no_request(start_server, model_repo):
    """stable moves 1 -> 2 -> 1 -> 2 under load. With the default policy (latest:1) v1 is loaded only
    while a label names it, so each move also loads or unloads a version."""
    publish(model_repo, "cifar10", 2)
    on_v1 = dict(labels={"stable": 1}, traffic={"stable": 100})
    on_v2 = dict(labels={"stable": 2}, traffic={"stable": 100})
    write_config(model_repo, **on_v1)
    srv = start_server(repository=model_repo)
    unnamed, by_label = Hammer(srv, clients=3), Hammer(srv, clients=2, version_label="stable")
    try:
        for config, version in ((on_v2, 2), (on_v1, 1), (on_v2, 2)):
            write_config(model_repo, **config)
            reload(srv)
            for hammer in (unnamed, by_label):
                seen = len(hammer.versions)
                wait_for(lambda: len(hammer.versions) > seen + 10, what="answers after the move")
                assert set(hammer.versions[seen + 5:]) == {version}  # a few were in flight across the move
    finally:
        unnamed.stop()
        by_label.stop()
    assert unnamed.errors == [] and by_label.errors == []
    assert ("cifar10", 1) not in states(srv)  # unloaded once no label named it
