"""Training on small slices of the real data: loader, a short run that learns, export, int8."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import REPO_ROOT, SHIPPED_MODELS, ServerProcess
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from training import augment
from training import data as cifar

TRAIN_LIMIT, EPOCHS = 1536, 2


def run_python(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_python("-m", module, *args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A 2-epoch `simple` run on 1,536 images, exported and quantized into a temp repository."""
    root = tmp_path_factory.mktemp("training")
    run_dir, repo = root / "run", root / "models"
    run_module("training.train", "--recipe", "simple", "--epochs", str(EPOCHS), "--limit", str(TRAIN_LIMIT),
               "--run-dir", str(run_dir), "--data-dir", str(data_dir))
    run_module("training.export", "--run-dir", str(run_dir), "--repository", str(repo), "--name", "simple",
               "--version", "3", "--data-dir", str(data_dir))
    run_module("training.quantize", "--source", str(repo / "simple" / "3"), "--repository", str(repo),
               "--name", "simple-int8", "--version", "1", "--data-dir", str(data_dir))
    return run_dir, repo


# ---- loader ------------------------------------------------------------------------------

def test_loader_reads_every_split_with_valid_shapes_and_labels(data_dir):
    train, test = cifar.load_train(data_dir), cifar.load_test(data_dir)
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert train.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_validation_split_is_seeded_stratified_and_disjoint(data_dir):
    train = cifar.load_train(data_dir)
    fit, val = cifar.train_validation_split(train, 5000, seed=1)
    fit2, val2 = cifar.train_validation_split(train, 5000, seed=1)
    assert np.array_equal(val.labels, val2.labels) and np.array_equal(val.images, val2.images)
    assert len(fit) + len(val) == 50_000
    assert np.bincount(val.labels).tolist() == [500] * 10


def copy_batches(src, dst):
    dst.mkdir()
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE, "batches.meta"):
        shutil.copy(src / name, dst / name)
    return dst


def test_missing_batch_file_is_a_clear_error(data_dir, tmp_path):
    broken = copy_batches(data_dir, tmp_path / "cifar")
    (broken / "data_batch_3").unlink()
    with pytest.raises(cifar.DatasetError, match="missing CIFAR-10 batch file.*data_batch_3"):
        cifar.load_train(broken)


def test_corrupt_batch_file_is_a_clear_error(data_dir, tmp_path):
    broken = copy_batches(data_dir, tmp_path / "cifar")
    (broken / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(cifar.DatasetError, match="corrupt CIFAR-10 batch"):
        cifar.load_test(broken)


def rewrite_test_batch(data_dir, tmp_path, mutate):
    """A copy of the data directory whose test batch went through `mutate(raw_dict)`."""
    broken = copy_batches(data_dir, tmp_path / "cifar")
    with open(data_dir / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    mutate(raw)
    with open(broken / "test_batch", "wb") as f:
        pickle.dump(raw, f)
    return broken


def test_partial_batch_is_a_clear_error(data_dir, tmp_path):
    def truncate(raw):
        raw[b"data"], raw[b"labels"] = raw[b"data"][:5000], raw[b"labels"][:5000]

    with pytest.raises(cifar.DatasetError, match="partial CIFAR-10 test batch"):
        cifar.load_test(rewrite_test_batch(data_dir, tmp_path, truncate))


def test_labels_out_of_range_are_a_clear_error(data_dir, tmp_path):
    def bad_label(raw):
        raw[b"labels"] = [12] + list(raw[b"labels"][1:])

    with pytest.raises(cifar.DatasetError, match="labels outside 0..9"):
        cifar.load_test(rewrite_test_batch(data_dir, tmp_path, bad_label))


# ---- training, export, quantization --------------------------------------------------------

def test_crops_and_flips_are_seeded_crops_of_the_padded_image():
    images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    padded = augment.pad_for_crops(images)
    first = augment.crop_and_flip(padded, np.random.default_rng(1))
    again = augment.crop_and_flip(padded, np.random.default_rng(1))
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    for crop, source in zip(first, padded):  # each output is a 32x32 window of its padded input, maybe mirrored
        windows = {(y, x, flip) for y in range(9) for x in range(9) for flip in (False, True)
                   if np.array_equal(crop[:, ::-1] if flip else crop, source[y:y + 32, x:x + 32])}
        assert windows


def test_cutout_fills_one_square_clipped_at_the_border_with_the_fill_colour():
    fill = np.array([125, 123, 114], dtype=np.uint8)
    x = np.zeros((200, 32, 32, 3), dtype=np.uint8)
    out = augment.cut_out(x, 8, fill, np.random.default_rng(2))
    filled = np.all(out == fill, axis=-1)
    assert np.all(out[~filled] == 0)
    sizes = filled.sum(axis=(1, 2))
    assert sizes.max() == 64 and sizes.min() >= 16  # a whole 8x8 square, or a corner's 4x4 at least
    for mask in filled:  # one solid rectangle per image
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and mask.sum() == len(rows) * len(cols)


def test_a_short_run_learns_above_chance_on_held_out_images(trained):
    state = json.loads((trained[0] / "state.json").read_text())
    assert state["epochs_done"] == EPOCHS
    assert state["best_val_accuracy"] > 0.15  # chance is 0.10; held-out images, never trained on


def test_resume_continues_an_interrupted_run_from_its_checkpoint(trained, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    result = run_module("training.train", "--recipe", "simple", "--epochs", str(EPOCHS), "--limit",
                        str(TRAIN_LIMIT), "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--resume")
    assert f"resuming simple after epoch {EPOCHS}" in result.stdout
    assert json.loads((run_dir / "state.json").read_text())["history"] == state["history"]


def test_export_writes_a_verified_model_with_its_card_in_the_metadata(trained):
    version_dir = trained[1] / "simple" / "3"
    card = json.loads((version_dir / "model_card.json").read_text())
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert out.name == "probabilities" and out.shape[1] == 10
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["class_names"]) == list(cifar.CLASS_NAMES)
    assert json.loads(metadata["test_accuracy"]) == card["test_accuracy"]
    assert "sha256" not in metadata  # it lives beside the file, not inside it
    assert card["parity"]["top1_mismatches"] == 0 and card["parity"]["max_abs_probability_diff"] < 1e-4
    assert card["parity"]["images"] >= 1000
    for key in ("per_class_accuracy", "training", "data_provenance", "parameters", "flops_per_image",
                "source_commit", "preprocessing"):
        assert key in card, key
    assert set(card["test_accuracy"]) == {"all_10000", "bit_exact_0_1016"}
    training = card["training"]
    assert len(training["epoch_seconds"]) == training["epochs"] and training["median_epoch_seconds"] > 0
    assert (version_dir / "confusion_matrix.png").stat().st_size > 0


def test_mirror_averaged_export_averages_each_image_with_its_mirror(trained, data_dir, test_slice):
    run_dir, repo = trained
    run_module("training.export", "--run-dir", str(run_dir), "--repository", str(repo), "--name", "simple-tta",
               "--version", "1", "--data-dir", str(data_dir), "--mirror-average")
    plain_dir, averaged_dir = repo / "simple" / "3", repo / "simple-tta" / "1"
    plain, averaged = (ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
                       for d in (plain_dir, averaged_dir))
    images = test_slice.images[:5]
    (expected_left,), (expected_right,) = (plain.run(None, {"images": x}) for x in (images, images[:, :, ::-1].copy()))
    (probs,) = averaged.run(None, {"images": images})
    assert probs.shape == (5, 10)
    assert np.allclose(probs, (expected_left + expected_right) / 2, atol=1e-6)
    card, plain_card = (json.loads((d / "model_card.json").read_text()) for d in (averaged_dir, plain_dir))
    assert "mirror" in card["test_time_augmentation"] and plain_card["test_time_augmentation"] == "none"
    assert card["flops_per_image"] == 2 * plain_card["flops_per_image"]
    assert card["parity"]["top1_mismatches"] == 0


def trainable_weight_sums(*model_paths) -> list[float]:
    """Sum of |w| over each saved Keras model's trainable weights (in a child: no TensorFlow here)."""
    script = ("import sys, numpy as np, keras\n"
              "for path in sys.argv[1:]:\n"
              "    model = keras.saving.load_model(path, compile=False)\n"
              "    print(sum(float(np.abs(np.asarray(w)).sum()) for w in model.trainable_weights))")
    return [float(line) for line in run_python("-c", script, *map(str, model_paths)).stdout.split()]


def test_gated_mirror_export_mirrors_only_the_images_the_model_is_unsure_of(trained, data_dir, test_slice):
    run_dir, repo = trained
    plain_dir = repo / "simple" / "3"
    plain = ort.InferenceSession(str(plain_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    images = test_slice.images[:16]
    (left,), (right,) = (plain.run(None, {"images": x}) for x in (images, images[:, :, ::-1].copy()))
    below = float(np.median(left.max(axis=1)))  # half the images on each side of the gate
    run_module("training.export", "--run-dir", str(run_dir), "--repository", str(repo), "--name", "simple-gated",
               "--version", "1", "--data-dir", str(data_dir), "--mirror-average", "--average-below", str(below))
    gated_dir = repo / "simple-gated" / "1"
    gated = ort.InferenceSession(str(gated_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    unsure = left.max(axis=1) < below
    assert 0 < unsure.sum() < len(images)
    (probs,) = gated.run(None, {"images": images})
    assert np.allclose(probs[unsure], (left[unsure] + right[unsure]) / 2, atol=1e-6)
    assert np.allclose(probs[~unsure], left[~unsure], atol=1e-6)
    for subset in (images[~unsure][:1], images[unsure][:1], images[:0]):  # no image mirrored, one, an empty batch
        assert gated.run(None, {"images": subset})[0].shape == (len(subset), 10)
    card, plain_card = (json.loads((d / "model_card.json").read_text()) for d in (gated_dir, plain_dir))
    assert f"below {below}" in card["test_time_augmentation"] and 0 < card["averaged_fraction"] < 1
    assert plain_card["flops_per_image"] < card["flops_per_image"] < 2 * plain_card["flops_per_image"]
    assert card["parity"]["top1_mismatches"] == 0


def test_ensemble_export_averages_the_networks(trained, data_dir, test_slice, tmp_path):
    run_dir, repo = trained
    partner = tmp_path / "partner"
    run_module("training.train", "--recipe", "simple", "--epochs", "1", "--limit", "512", "--run-dir", str(partner),
               "--data-dir", str(data_dir))
    for source, name, extra in ((partner, "partner", ()), (run_dir, "simple-ensemble", ("--ensemble-with", str(partner)))):
        run_module("training.export", "--run-dir", str(source), "--repository", str(repo), "--name", name,
                   "--version", "1", "--data-dir", str(data_dir), *extra)
    dirs = {name: repo / name / version for name, version in
            (("simple", "3"), ("partner", "1"), ("simple-ensemble", "1"))}
    sessions = {name: ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
                for name, d in dirs.items()}
    images = test_slice.images[:8]
    probs = {name: session.run(None, {"images": images})[0] for name, session in sessions.items()}
    assert np.allclose(probs["simple-ensemble"], (probs["simple"] + probs["partner"]) / 2, atol=1e-6)
    cards = {name: json.loads((d / "model_card.json").read_text()) for name, d in dirs.items()}
    assert cards["simple-ensemble"]["parameters"] == cards["simple"]["parameters"] + cards["partner"]["parameters"]
    assert cards["simple-ensemble"]["ensemble"][0]["run"] == "partner"
    assert cards["simple-ensemble"]["flops_per_image"] == 2 * cards["simple"]["flops_per_image"]


def test_averaging_below_a_confidence_with_nothing_to_average_is_refused(trained, data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.export", "--run-dir", str(trained[0]), "--repository", str(tmp_path),
         "--data-dir", str(data_dir), "--average-below", "0.7"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 1 and "nothing to average" in result.stderr
    assert not any(tmp_path.iterdir())


def test_weight_averaging_continues_a_run_and_exports_the_average(trained, data_dir, tmp_path):
    parent, repo = trained
    run_dir = tmp_path / "averaged"
    args = ("--parent", str(parent), "--run-dir", str(run_dir), "--cycles", "2", "--cycle-epochs", "1",
            "--limit", str(TRAIN_LIMIT), "--data-dir", str(data_dir))
    run_module("training.average", *args)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["averaged"] == 2 and state["epochs_done"] == 2
    assert all(0.1 < entry["averaged_val_accuracy"] <= 1 for entry in state["history"])
    stored = np.load(run_dir / "average.npz")
    averaged_sum, last_sum = trainable_weight_sums(run_dir / "best.keras", run_dir / "checkpoint.keras")
    assert averaged_sum == pytest.approx(sum(float(np.abs(stored[k]).sum()) for k in stored.files), rel=1e-5)
    assert averaged_sum != pytest.approx(last_sum, rel=1e-6)  # the average, not the last cycle's weights
    resumed = run_module("training.average", *args, "--resume")
    assert "resuming weight averaging after epoch 2" in resumed.stdout
    assert json.loads((run_dir / "state.json").read_text())["history"] == state["history"]
    run_module("training.export", "--run-dir", str(run_dir), "--repository", str(repo), "--name", "simple-swa",
               "--version", "1", "--data-dir", str(data_dir))
    training = json.loads((repo / "simple-swa" / "1" / "model_card.json").read_text())["training"]
    assert training["epochs"] == EPOCHS + 2 and len(training["epoch_seconds"]) == EPOCHS + 2
    assert training["weight_averaging"]["cycles"] == 2


@pytest.mark.parametrize("model", ["cifar10", "cifar10-int8"])
def test_shipped_models_reproduce_their_cards_bit_exact_accuracy(model, data_dir):
    """What `models/` ships is what its card says: the bit-exact test rows give the card's figure."""
    version_dir = SHIPPED_MODELS / model / "1"
    card = json.loads((version_dir / "model_card.json").read_text())
    exact = cifar.read_batch(data_dir / cifar.TEST_FILE).take(slice(0, cifar.BIT_EXACT_TEST_ROWS))
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    probabilities = np.concatenate([session.run(None, {"images": exact.images[i:i + 256]})[0]
                                    for i in range(0, len(exact.images), 256)])
    accuracy = float((probabilities.argmax(axis=1) == exact.labels).mean())
    assert round(accuracy, 4) == card["test_accuracy"]["bit_exact_0_1016"]
    assert card["test_accuracy"]["all_10000"] >= 0.91  # issue 3's target for the default model and its int8 twin


def test_exported_probabilities_sum_to_one(trained, test_slice):
    session = ort.InferenceSession(str(trained[1] / "simple" / "3" / "model.onnx"), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"images": test_slice.images[:8]})
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_evaluate_reports_both_test_accuracies(trained, data_dir):
    result = run_module("training.evaluate", str(trained[1] / "simple" / "3" / "model.onnx"), "--data-dir", str(data_dir))
    report = json.loads(result.stdout)
    card = json.loads((trained[1] / "simple" / "3" / "model_card.json").read_text())
    assert report["test_accuracy"] == card["test_accuracy"]


def test_int8_variant_is_loadable_accurate_and_served_under_its_own_name(trained):
    card = json.loads((trained[1] / "simple-int8" / "1" / "model_card.json").read_text())
    assert card["quantization"]["accuracy_drop_points"] < 3
    assert "QDQ" in card["quantization"]["method"]
    metadata = ort.InferenceSession(str(trained[1] / "simple-int8" / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(metadata["test_accuracy"]) == card["test_accuracy"]  # the int8 figures, not fp32's
    assert json.loads(metadata["quantization"]) == card["quantization"] and "sha256" not in metadata
    fp32_card = json.loads((trained[1] / "simple" / "3" / "model_card.json").read_text())
    assert "averaged_fraction" in fp32_card and "averaged_fraction" not in card  # the fp32 graph's gate statistic
    assert 0 < card["validation_accuracy"] <= 1  # measured on the int8 file itself
    server = ServerProcess("--default-model", "simple", repository=trained[1])
    try:
        pixels = np.zeros((32, 32, 3), np.uint8)
        image = pb.Image(raw=pb.RawPixels(data=pixels.tobytes(), height=32, width=32, channels=3))
        reply = server.stub.Classify(pb.ClassifyRequest(image=image, model_name="simple-int8"), timeout=10)
        assert (reply.model_name, reply.model_version) == ("simple-int8", 1)
    finally:
        server.stop()
