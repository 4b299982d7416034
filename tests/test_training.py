"""Training on small slices of the real data: loader, a short run that learns, export, int8."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import SHIPPED_MODELS, ServerProcess, run_module, run_python
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from training import augment
from training import data as cifar

TRAIN_LIMIT, EPOCHS = 1536, 2


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


def test_alternating_flips_mirror_each_image_in_exactly_one_of_two_consecutive_epochs():
    epochs = [augment.alternating_flips(1000, epoch, seed=3) for epoch in range(4)]
    assert 400 < epochs[0].sum() < 600  # a random half first
    for before, after in zip(epochs, epochs[1:]):
        assert np.array_equal(before, ~after)
    assert np.array_equal(epochs[0], augment.alternating_flips(1000, 0, seed=3))  # seeded: the same after --resume


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


def trainable_weight_sums(*model_paths) -> list[float]:
    """Sum of |w| over each saved Keras model's trainable weights (in a child: no TensorFlow here)."""
    script = ("import sys, numpy as np, keras\n"
              "for path in sys.argv[1:]:\n"
              "    model = keras.saving.load_model(path, compile=False)\n"
              "    print(sum(float(np.abs(np.asarray(w)).sum()) for w in model.trainable_weights))")
    return [float(line) for line in run_python("-c", script, *map(str, model_paths)).stdout.split()]


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


# ---- the default's network and training (the `fast` recipe, tiny) --------------------------------

WHITENED_OUTPUTS = ["probabilities", "features", "logits", "unsure_score"]


def test_the_whitened_recipe_saves_its_lookahead_state_and_resumes_from_it(whitened, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(whitened[0], run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epochs_done"] == 2 and state["recipe"]["lookahead"] and (run_dir / "lookahead.npz").exists()
    result = run_module("training.train", "--recipe", "fast", "--epochs", "2", "--limit", "1024",
                        "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--resume")
    assert "resuming fast after epoch 2" in result.stdout
    assert json.loads((run_dir / "state.json").read_text())["history"] == state["history"]


def test_the_whitened_export_gives_probabilities_first_then_features_logits_and_the_unsure_score(whitened, test_slice):
    version_dir = whitened[1] / "tiny" / "2"
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == WHITENED_OUTPUTS
    probabilities, features, logits, score = session.run(None, {"images": test_slice.images[:8]})
    assert probabilities.shape == logits.shape == (8, 10) and features.shape == (8, 256) and score.shape == (8,)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities, exp / exp.sum(axis=1, keepdims=True), atol=1e-6)
    card = json.loads((version_dir / "model_card.json").read_text())
    assert [o["name"] for o in card["outputs"]] == WHITENED_OUTPUTS
    assert set(card["parity"]["max_relative_diff_other_outputs"]) == set(WHITENED_OUTPUTS[1:])
    assert card["test_time_augmentation"] == "none" and card["training"]["recipe"]["architecture"] == "whitened"


@pytest.mark.parametrize("name", ["tiny", "tiny-int8"])
def test_the_export_fits_calibration_the_unsure_threshold_and_the_drift_reference_on_validation(whitened, name):
    card = json.loads((whitened[1] / name / "2" / "model_card.json").read_text())
    calibration = card["calibration"]["validation"]
    assert card["calibration"]["method"] in ("temperature", "vector")
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-4  # fitted on these very images
    unsure = card["unsure"]
    assert unsure["score"] == "unsure_score" and unsure["validation_flagged"] <= 0.05
    assert set(unsure["ood_families"]) >= {"uniform_noise", "blank", "pixel_shuffle", "gaussian_noise"}
    signals = card["drift_reference"]["signals"]
    assert set(signals) == {"predicted_class", "confidence", "unsure_score", "brightness", "contrast", "colourfulness"}
    for signal in signals.values():
        assert len(signal["fractions"]) == len(signal["edges"]) + 1 and abs(sum(signal["fractions"]) - 1) < 1e-3


def test_the_unsure_score_layer_computes_what_the_numpy_reference_does():
    """models.UnsureScore (in the graph) against training.trust's numpy reference, on random features."""
    script = ("import numpy as np, keras\n"
              "from training.models import UnsureScore\n"
              "from training import trust\n"
              "rng = np.random.default_rng(0)\n"
              "terms = [('negative_norm', False), ('mahalanobis', True), ('mahalanobis', False)]\n"
              "train = [rng.normal(size=(500, 5)), rng.normal(size=(500, 6)) * [1, 2, 3, 1, 1, 5], rng.normal(size=(500, 4))]\n"
              "labels = rng.integers(0, 10, 500)\n"
              "val = [rng.normal(size=(50, d)) for d in (5, 6, 4)]\n"
              "fitted = trust.fit_unsure_terms(terms, train, labels, val)\n"
              "layer = UnsureScore([('negative_norm', 1, 5), ('mahalanobis', 10, 6), ('mahalanobis', 1, 4)])\n"
              "layer.build([(None, 5), (None, 6), (None, 4)])\n"
              "layer.set_fitted(fitted)\n"
              "query = [rng.normal(size=(7, d)) * 3 for d in (5, 6, 4)]\n"
              "graph = np.asarray(layer([q.astype('float32') for q in query]))\n"
              "print(float(np.abs(graph - trust.unsure_scores(terms, query, fitted)).max()))")
    assert float(run_python("-c", script).stdout.split()[-1]) < 1e-3


# (model, version, the floor it shipped at, on all 10,000 test images): v1's is issue 3's target;
# v2's is 0.90, below issue 22's 93% floor, which it misses (docs/training.md says so).
SHIPPED = [("cifar10", 1, 0.91), ("cifar10-int8", 1, 0.91), ("cifar10", 2, 0.90), ("cifar10-int8", 2, 0.90)]


@pytest.mark.parametrize("model, version, floor", SHIPPED)
def test_shipped_models_reproduce_their_cards_bit_exact_accuracy(model, version, floor, data_dir):
    """What `models/` ships is what its card says: the bit-exact test rows give the card's figure."""
    version_dir = SHIPPED_MODELS / model / str(version)
    card = json.loads((version_dir / "model_card.json").read_text())
    exact = cifar.read_batch(data_dir / cifar.TEST_FILE).take(slice(0, cifar.BIT_EXACT_TEST_ROWS))
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    probabilities = np.concatenate([session.run(["probabilities"], {"images": exact.images[i:i + 256]})[0]
                                    for i in range(0, len(exact.images), 256)])
    accuracy = float((probabilities.argmax(axis=1) == exact.labels).mean())
    assert round(accuracy, 4) == card["test_accuracy"]["bit_exact_0_1016"]
    assert card["test_accuracy"]["all_10000"] >= floor


def test_the_default_model_v2_costs_no_more_than_v1_and_its_int8_twin_keeps_its_accuracy():
    """Issue 22's caps, from the cards: the cost ratio to the ResNet-20 reference within ~5% of
    v1's (measured in the same run, training.cost), int8 within 0.3 points of fp32 and faster."""
    cards = {(m, v): json.loads((SHIPPED_MODELS / m / str(v) / "model_card.json").read_text())
             for m, v, _ in SHIPPED}
    v1, v2, int8 = cards[("cifar10", 1)], cards[("cifar10", 2)], cards[("cifar10-int8", 2)]
    assert v2["cost"]["measured"] == v1["cost"]["measured"]  # the same run
    assert v2["cost"]["ratio_to_reference"] <= 1.05 * v1["cost"]["ratio_to_reference"]
    assert v2["test_time_augmentation"] == "none"
    drop = v2["test_accuracy"]["all_10000"] - int8["test_accuracy"]["all_10000"]
    assert drop <= 0.003 and int8["quantization"]["cpu_speedup_batch64"] > 1.0


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
    assert card["calibration"]["validation"]["accuracy"] == card["validation_accuracy"]  # refitted on the int8 file
    assert card["calibration"] is not fp32_card["calibration"] and card["unsure"]["validation_flagged"] <= 0.05
    assert 0 < card["validation_accuracy"] <= 1  # measured on the int8 file itself
    server = ServerProcess("--default-model", "simple", repository=trained[1])
    try:
        pixels = np.zeros((32, 32, 3), np.uint8)
        image = pb.Image(raw=pb.RawPixels(data=pixels.tobytes(), height=32, width=32, channels=3))
        reply = server.stub.Classify(pb.ClassifyRequest(image=image, model_name="simple-int8"), timeout=10)
        assert (reply.model_name, reply.model_version) == ("simple-int8", 1)
    finally:
        server.stop()
