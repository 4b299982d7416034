"""One ONNX model version in an onnxruntime session. No gRPC here.

Loads the file (never unpickles anything), picks execution providers, reads the model card
and the ONNX metadata, warms up every batch size the batcher can form, and runs batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.errors import InferenceFailed

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "model_card.json"
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_FLAGS = {
    "auto": PROVIDER_ORDER,
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(Exception):
    """The version cannot be served; the message says why (logged and listed, never raised to clients)."""


@dataclass(frozen=True)
class RuntimeOptions:
    providers: str = "auto"
    require_gpu: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    intra_op_spinning: bool = True


@dataclass
class ModelCard:
    """What the server needs of model_card.json (the rest is passed through as JSON)."""

    class_names: list[str]
    sha256: str | None
    test_accuracy: float
    test_accuracy_bit_exact: float
    preprocessing: str
    raw: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "ModelCard":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"missing {CARD_FILE}") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"unreadable {CARD_FILE}: {exc}") from None
        names = raw.get("class_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ModelLoadError(f"{CARD_FILE} has no class_names list")
        accuracy = raw.get("test_accuracy", {}) or {}
        return cls(
            class_names=names,
            sha256=raw.get("sha256"),
            test_accuracy=float(accuracy.get("all_10000", 0.0)),
            test_accuracy_bit_exact=float(accuracy.get("bit_exact_0_1016", 0.0)),
            preprocessing=str(raw.get("preprocessing", "")),
            raw=raw,
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def choose_providers(flag: str) -> list[str]:
    """The wanted providers, best first, among those this onnxruntime build has."""
    available = set(ort.get_available_providers())
    chosen = [p for p in PROVIDER_FLAGS[flag] if p in available]
    return chosen or ["CPUExecutionProvider"]


def create_session(model_bytes: bytes, options: RuntimeOptions, file_name: str = MODEL_FILE) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = OPTIMIZATION[options.graph_optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.intra_op_spinning else "0")
    try:
        return ort.InferenceSession(model_bytes, sess_options=so, providers=choose_providers(options.providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types for bad files
        raise ModelLoadError(f"onnxruntime cannot load {file_name}: {str(exc).splitlines()[0][:300]}") from None


class OnnxModel:
    """A loaded, verified, warmed-up model version. `run` is thread-compatible, not reentrant."""

    def __init__(self, name: str, version: int, directory: Path, options: RuntimeOptions):
        self.name, self.version, self.directory = name, version, directory
        self.card = ModelCard.read(directory / CARD_FILE)
        model_bytes = self._read_model_file()
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        if self.card.sha256 and self.card.sha256 != self.sha256:
            raise ModelLoadError(
                f"{MODEL_FILE} sha256 {self.sha256[:12]}... does not match the model card's "
                f"{self.card.sha256[:12]}... (corrupt or half-written file?)"
            )
        self.session = create_session(model_bytes, options)
        self._options = options
        self._background_session: ort.InferenceSession | None = None
        self._background_lock = threading.Lock()
        self.providers: list[str] = self.session.get_providers()
        if options.require_gpu and not GPU_PROVIDERS.intersection(self.providers):
            raise ModelLoadError(
                f"--require-gpu: onnxruntime gave {self.providers}, no GPU provider "
                f"(available in this build: {ort.get_available_providers()})"
            )
        self._check_signature()
        meta = self.session.get_modelmeta()
        self.metadata: dict[str, str] = dict(meta.custom_metadata_map)
        self.class_names = self.card.class_names

    def _read_model_file(self) -> bytes:
        try:
            return (self.directory / MODEL_FILE).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {MODEL_FILE}: {exc.strerror}") from None

    def _check_signature(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(f"expected one input and at least one output, got {len(inputs)} and {len(outputs)}")
        # Output 0 is the class probabilities; others (features, logits, an unsure score) may follow.
        self.input, self.output = inputs[0], outputs[0]
        self.output_names: list[str] = [o.name for o in outputs]
        shape = list(self.input.shape)
        if self.input.type != "tensor(uint8)" or len(shape) != 4 or [int(d) if isinstance(d, int) else -1 for d in shape[1:]] != [32, 32, 3]:
            raise ModelLoadError(f"input {self.input.name!r} is {self.input.type} {shape}, expected uint8 [N, 32, 32, 3]")
        out_shape = list(self.output.shape)
        if len(out_shape) != 2 or out_shape[1] != len(self.card.class_names):
            raise ModelLoadError(
                f"output {self.output.name!r} has shape {out_shape}, expected [N, {len(self.card.class_names)}] "
                "(one probability per class of the model card)"
            )

    @property
    def input_shape(self) -> list[int]:
        return [-1, 32, 32, 3]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def on_gpu(self) -> bool:
        return bool(GPU_PROVIDERS.intersection(self.providers))

    def warm_up(self, max_batch_size: int) -> list[int]:
        """Run every power-of-two batch size up to the max (and the max), so first requests are fast."""
        sizes, size = [], 1
        while size < max_batch_size:
            sizes.append(size)
            size *= 2
        sizes.append(max_batch_size)
        for size in sizes:
            self.run(np.zeros((size, 32, 32, 3), dtype=np.uint8))
        return sizes

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, 32, 32, 3] -> float32 probabilities [N, classes], as the graph computes them."""
        return self.run_outputs(batch, [self.output.name])[0]

    def run_outputs(self, batch: np.ndarray, names: list[str], background: bool = False) -> list[np.ndarray]:
        """uint8 [N, 32, 32, 3] -> the named outputs (only those are computed and copied).
        `background` (shadow copies): on a session of its own that never spin-waits."""
        try:
            session = self._background() if background else self.session
            return session.run(names, {self.input.name: batch})
        except ModelLoadError as exc:
            log.error("no background session for %s v%s: %s", self.name, self.version, exc)
            raise InferenceFailed(f"the background session could not be created: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            log.exception("inference failed in %s v%s", self.name, self.version)
            raise InferenceFailed("inference failed inside the model runtime; see the server log") from exc

    def _background(self) -> ort.InferenceSession:
        """The background session, created at the first background run (most versions never get
        one): one thread, the caller's (the batcher's background thread, at the lowest priority:
        onnxruntime's pool threads would run at normal priority), and no spin-waiting."""
        with self._background_lock:
            if self._background_session is None:
                model_bytes = self._read_model_file()
                if hashlib.sha256(model_bytes).hexdigest() != self.sha256:
                    raise ModelLoadError(f"{MODEL_FILE} changed on disk since the version was loaded")
                self._background_session = create_session(model_bytes, replace(self._options, intra_op_threads=1, intra_op_spinning=False))
            return self._background_session

    def close(self) -> None:
        # Dropping the last reference frees the session's arena (checked by the RSS test).
        self.session = None  # type: ignore[assignment]
        self._background_session = None
