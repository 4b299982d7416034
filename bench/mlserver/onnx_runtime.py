"""The peer: a minimal MLServer 1.7.1 custom runtime around onnxruntime (runs in .venv-mlserver).

It does what our server's runtime does per batch and nothing more, so the comparison measures
the servers, not the models: one onnxruntime session (intra-op threads from the model
settings, sequential execution, full graph optimisation), uint8 NHWC in, probabilities out.
MLServer's adaptive batcher merges concurrent requests into one `predict` call.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 2))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model_path = os.path.join(self.settings.parameters.uri, "model.onnx")
        self._session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        # Same warm-up as our server (every power of two up to the max batch), so neither is cold.
        size = 1
        while size <= max(1, self.settings.max_batch_size):
            self._session.run([self._output], {self._input: np.zeros((size, 32, 32, 3), np.uint8)})
            size *= 2
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0]).astype(np.uint8, copy=False)
        (probabilities,) = self._session.run([self._output], {self._input: images})
        return InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[NumpyCodec.encode_output(self._output, probabilities)],
        )
