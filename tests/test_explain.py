"""Explain: saliency heatmaps and feature maps of the shipped models, through the real server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from PIL import Image

from serving import explain as explain_core
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from tests.conftest import DEFAULT_MODEL, REPO_ROOT, encode, png_image
from tests.faithfulness import deletion_test
from tests.test_metadata import GRPCURL
from training.data import CLASS_NAMES

OCCLUSION, GRAD_CAM = pb.EXPLAIN_METHOD_OCCLUSION, pb.EXPLAIN_METHOD_GRAD_CAM
FAITHFULNESS_MARGIN = 0.10
GELU_MINIMUM = -0.1700  # the whitened net's blocks end in GELU, whose least value is -0.16997
# What each shipped version offers: its methods, and its two default layers with their shapes.
# v1 (a ResNet-9 ensemble) and the int8 copies have no explain graph, so occlusion only.
V1_LAYERS = {"relu1": [32, 32, 32], "relu6": [8, 8, 256]}  # the first conv block, a deeper one; after ReLU
V2_LAYERS = {"block1": [15, 15, 64], "block2": [7, 7, 256]}  # the first two blocks, after GELU and pooling
SHIPPED_EXPLAINERS = {("cifar10", 1): ([OCCLUSION], V1_LAYERS), ("cifar10-int8", 1): ([OCCLUSION], V1_LAYERS),
                      ("cifar10", 2): ([OCCLUSION, GRAD_CAM], V2_LAYERS), ("cifar10-int8", 2): ([OCCLUSION], V2_LAYERS)}


def explain(server, pixels: np.ndarray, **fields) -> pb.ExplainResponse:
    return server.stub.Explain(pb.ExplainRequest(image=png_image(pixels), **fields), timeout=30)


def refused(server, request: pb.ExplainRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Explain(request, timeout=30)
    return err.value


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_explains_the_top1_class_by_occlusion_with_a_unit_range_heatmap_and_an_overlay(server, test_slice):
    reply = explain(server, test_slice.images[0])
    assert reply.method == OCCLUSION and reply.model_name == DEFAULT_MODEL
    assert reply.target_class == reply.predictions[0].class_index
    assert reply.target_label == CLASS_NAMES[reply.target_class]
    assert len(reply.predictions) == 5
    heatmap = np.array(reply.heatmap)
    assert heatmap.shape == (1024,) and heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    assert png_size(reply.heatmap_png) == (256, 256)
    assert reply.forward_passes == 7 * 7 + 1 + 1  # the patches, the image, its feature maps


def test_the_prediction_is_the_one_classify_gives(server, test_slice):
    pixels = test_slice.images[4]
    classified = server.stub.Classify(pb.ClassifyRequest(image=png_image(pixels)), timeout=10)
    assert explain(server, pixels, omit_feature_maps=True).predictions == classified.predictions


def test_metadata_lists_the_methods_and_layers_of_each_shipped_version(start_server):
    srv = start_server("--version-policy", "all")
    for (name, version), (methods, default_layers) in SHIPPED_EXPLAINERS.items():
        meta = srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=name, model_version=version), timeout=30)
        assert list(meta.explain_methods) == methods, (name, version)
        layers = {layer.name: list(layer.shape) for layer in meta.explainable_layers}
        defaults = {layer.name: list(layer.shape) for layer in meta.explainable_layers if layer.is_default}
        assert defaults == default_layers and len(layers) > len(defaults), (name, version)


def test_default_feature_maps_are_the_default_layers_as_values_and_grids(server, test_slice):
    reply = explain(server, test_slice.images[1])
    assert [fm.layer for fm in reply.feature_maps] == list(V2_LAYERS)
    for fm in reply.feature_maps:
        assert len(fm.values) == int(np.prod(fm.shape)) and list(fm.shape) == V2_LAYERS[fm.layer]
        assert min(fm.values) >= GELU_MINIMUM
        width, height = png_size(fm.png)
        assert width >= fm.shape[1] * int(np.ceil(np.sqrt(fm.shape[2]))) and height >= fm.shape[0]


def test_explicit_target_layers_and_occlusion_grid_are_honoured(server, test_slice):
    reply = explain(server, test_slice.images[2], target_class=9, layers=["whiten_act", "block3"], top_k=2,
                    occlusion=pb.OcclusionOptions(patch_size=16, stride=8))
    assert reply.target_class == 9 and reply.target_label == "truck"
    assert len(reply.predictions) == 2
    assert [(fm.layer, list(fm.shape)) for fm in reply.feature_maps] == [("whiten_act", [31, 31, 24]),
                                                                         ("block3", [3, 3, 256])]
    assert reply.forward_passes == 3 * 3 + 1 + 1


def test_raw_values_only_when_images_and_feature_maps_are_omitted(server, test_slice):
    reply = explain(server, test_slice.images[3], omit_images=True, omit_feature_maps=True)
    assert reply.heatmap_png == b"" and len(reply.feature_maps) == 0 and len(reply.heatmap) == 1024
    assert reply.forward_passes == 7 * 7 + 1


def test_occlusion_saliency_is_the_mean_log_probability_fall_of_the_patches_covering_a_pixel():
    corners = explain_core.occlusion_corners(8, 4)
    assert len(corners) == 49 and corners[-1] == (24, 24)
    fallen = np.full(len(corners), 0.5)
    fallen[corners.index((0, 0))] = 0.05  # covering the top-left patch costs the target most of its probability
    heatmap = explain_core.occlusion_heatmap(0.5, fallen, corners, 8)
    # Pixels only that patch covers get the whole fall; one other patch covers them too: half; three: a quarter.
    assert heatmap[0, 0] == 1.0 and heatmap[0, 4] == pytest.approx(0.5) and heatmap[4, 4] == pytest.approx(0.25)
    assert np.all(heatmap[8:] == 0) and np.all(heatmap[:, 8:] == 0)


def test_grad_cam_cells_land_on_the_pixels_they_see():
    """A 3x3 map of the whitened net's last block: cell i is centred on pixel 8i + 4.5."""
    geometry = explain_core.CamGeometry("block3", stride=8.0, offset=4.5)
    activations = np.zeros((3, 3, 2), np.float32)
    activations[2, 0, 0] = 1.0  # bottom-left cell, channel 0
    gradient = np.ones((3, 3, 2), np.float32)
    heatmap = explain_core.grad_cam(activations, gradient, geometry)
    assert heatmap.shape == (32, 32) and heatmap.max() == 1.0
    assert np.all(heatmap[20:, :5] == 1.0)  # past the last centre: clamped to the edge cell
    assert heatmap[12, 4] == 0.0 and heatmap[16, 4] == pytest.approx(0.5)


def test_the_default_model_is_explained_by_grad_cam_in_one_pass_through_its_explain_graph(server, test_slice):
    reply = explain(server, test_slice.images[0], method=GRAD_CAM)
    assert (reply.model_name, reply.model_version, reply.method) == (DEFAULT_MODEL, 2, GRAD_CAM)
    heatmap = np.array(reply.heatmap)
    assert heatmap.shape == (1024,) and heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    assert reply.target_class == reply.predictions[0].class_index
    assert [fm.layer for fm in reply.feature_maps] == list(V2_LAYERS) and reply.forward_passes == 1


def test_the_int8_model_is_explained_by_occlusion_too(server, test_slice):
    reply = explain(server, test_slice.images[0], model_name="cifar10-int8")
    assert reply.model_name == "cifar10-int8" and reply.method == OCCLUSION
    assert len(reply.heatmap) == 1024 and [fm.layer for fm in reply.feature_maps] == list(V2_LAYERS)


def test_deletion_of_the_most_salient_pixels_beats_another_images_heatmap(server, data_dir):
    """The issue's faithfulness test: 100 test images, the default method and target."""
    from training import data as cifar

    images = cifar.read_batch(data_dir / cifar.TEST_FILE).images[:100]
    result = deletion_test(server.stub, images)
    print(json.dumps(result))  # the figures docs/explain.md quotes (pytest -s)
    drops = result["mean_drop"]
    assert drops["method"] - drops["mismatched"] >= FAITHFULNESS_MARGIN, result


@pytest.mark.parametrize("fields,status,words", [
    ({"method": GRAD_CAM, "model_name": "cifar10-int8"}, grpc.StatusCode.INVALID_ARGUMENT,
     "does not offer grad_cam explanations (it offers: occlusion)"),
    ({"method": 7}, grpc.StatusCode.INVALID_ARGUMENT, "method 7 is not an ExplainMethod"),
    ({"target_class": 10}, grpc.StatusCode.INVALID_ARGUMENT, "target_class is 10, expected 0..9"),
    ({"layers": ["conv9"]}, grpc.StatusCode.INVALID_ARGUMENT, "no layer 'conv9' in cifar10 v2 (layers: whiten_act, block1"),
    ({"occlusion": pb.OcclusionOptions(patch_size=33)}, grpc.StatusCode.INVALID_ARGUMENT, "patch_size is 33, expected 1..32"),
    ({"occlusion": pb.OcclusionOptions(patch_size=4, stride=8)}, grpc.StatusCode.INVALID_ARGUMENT, "stride is 8, expected 1..patch_size (4)"),
    ({"occlusion": pb.OcclusionOptions(patch_size=2, stride=1)}, grpc.StatusCode.INVALID_ARGUMENT, "needs 961 forward passes, over the limit of 256"),
    ({"top_k": 11}, grpc.StatusCode.INVALID_ARGUMENT, "top_k is 11"),
    ({"model_name": "nope"}, grpc.StatusCode.NOT_FOUND, "model 'nope' is not in the repository"),
    ({"version_label": "stable"}, grpc.StatusCode.NOT_FOUND, "has no version label 'stable'"),
])
def test_bad_explain_requests_say_what_was_wrong(server, test_slice, fields, status, words):
    error = refused(server, pb.ExplainRequest(image=png_image(test_slice.images[0]), **fields))
    assert error.code() == status and words in error.details(), error.details()


def test_a_bad_image_is_refused_like_classify_refuses_it(server):
    error = refused(server, pb.ExplainRequest(image=pb.Image(encoded=b"not an image")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a PNG, JPEG, BMP or GIF" in error.details()


def test_explain_calls_are_counted_and_logged_like_every_rpc(start_server, test_slice):
    srv = start_server()
    explain(srv, test_slice.images[0], request_id="explain-1", omit_feature_maps=True)
    srv.wait_until("the Explain request counted", lambda: srv.metric(
        "classifier_requests_total", method="Explain", code="OK", protocol="native", model=DEFAULT_MODEL) == 1)
    assert srv.metric("classifier_request_duration_seconds_count", method="Explain", code="OK") == 1
    assert srv.metric("classifier_phase_duration_seconds_count", phase="explain", model=DEFAULT_MODEL) == 1
    srv.wait_until("the access line", lambda: "native Explain model=cifar10 version=2 images=1 status=OK" in srv.log())
    assert "request_id=explain-1" in srv.log()


def test_a_full_explanation_queue_refuses_at_once_while_classify_still_answers(start_server, test_slice):
    srv = start_server("--max-concurrent-explanations", "1", "--max-queued-explanations", "0")
    srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=30)  # builds the explainer before the burst
    slow = pb.ExplainRequest(image=png_image(test_slice.images[0]), omit_feature_maps=True,
                             occlusion=pb.OcclusionOptions(patch_size=2, stride=2))  # 256 forward passes
    futures = [srv.stub.Explain.future(slow, timeout=60) for _ in range(4)]
    classified = srv.stub.Classify(pb.ClassifyRequest(image=png_image(test_slice.images[1])), timeout=10)
    assert len(classified.predictions) == 5
    codes = [f.code() for f in futures]
    assert codes.count(grpc.StatusCode.OK) >= 1 and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    full = next(f for f in futures if f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "explanation queue is full" in full.details()
    assert dict(full.trailing_metadata()).get("retry-after-ms") == "200"
    assert srv.metric("classifier_rejected_requests_total", reason="explain_queue_full") >= 1


def test_explain_can_be_turned_off(start_server, test_slice):
    srv = start_server("--explain", "false")
    error = refused(srv, pb.ExplainRequest(image=png_image(test_slice.images[0])))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED and "--explain=false" in error.details()
    meta = srv.stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=10)
    assert list(meta.explain_methods) == [] and list(meta.explainable_layers) == []


def test_grpcurl_explains_through_reflection(server, test_slice):
    body = json.dumps({"image": {"encoded": base64.b64encode(encode(test_slice.images[0])).decode()},
                       "omit_images": True, "omit_feature_maps": True})
    call = subprocess.run(
        [GRPCURL, "-plaintext", "-d", body, server.target, "cifar10.classifier.v1.Classifier/Explain"],
        capture_output=True, text=True, timeout=60,
    )
    assert call.returncode == 0, call.stderr
    reply = json.loads(call.stdout)
    assert len(reply["heatmap"]) == 1024 and reply["method"] == "EXPLAIN_METHOD_OCCLUSION"


def test_cli_writes_the_overlay_and_a_grid_per_layer_and_bare_paths_still_classify(server, test_slice, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(encode(test_slice.images[0]))
    output = tmp_path / "out" / "cat-explained.png"
    run = subprocess.run([sys.executable, "-m", "serving.client", "explain", str(image), "--output", str(output),
                          "--target", server.target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert png_size(output.read_bytes()) == (256, 256)
    for layer in V2_LAYERS:
        assert (tmp_path / "out" / f"cat-explained-{layer}.png").exists()
    assert "by occlusion, 51 forward passes" in run.stdout
    classify = subprocess.run([sys.executable, "-m", "serving.client", str(image), "--target", server.target],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert classify.returncode == 0 and "[cifar10 v2]" in classify.stdout, classify.stderr


def test_concurrent_explanations_all_get_their_own_answer(server, test_slice):
    """The default queue holds a small burst: each caller gets the explanation of its own image."""
    replies: dict[int, pb.ExplainResponse] = {}

    def one(index: int) -> None:
        replies[index] = explain(server, test_slice.images[index], omit_feature_maps=True, omit_images=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alone = explain(server, test_slice.images[2], omit_feature_maps=True, omit_images=True)
    assert replies[2].heatmap == pytest.approx(alone.heatmap, abs=1e-5)
