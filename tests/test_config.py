"""Configuration: one typed object from flags, env vars and defaults; JSON logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.config import ServerConfig, load_config
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.runtime import OnnxModel, RuntimeOptions
from tests.conftest import DEFAULT_MODEL, SHIPPED_MODELS, raw_image


def test_defaults_serve_the_shipped_repository_on_localhost():
    config = load_config([], environ={})
    assert config == ServerConfig()
    assert (config.host, config.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert config.model_repository == Path("models") and config.max_queue_size > 64


def test_env_vars_set_every_option_and_flags_win():
    env = {"CIFAR10_MAX_BATCH_SIZE": "8", "CIFAR10_REQUIRE_GPU": "true", "CIFAR10_PORT": "7000",
           "CIFAR10_PROVIDERS": "cpu", "CIFAR10_MAX_BATCH_DELAY_MS": "2.5"}
    config = load_config(["--port", "7001"], environ=env)
    assert (config.max_batch_size, config.require_gpu, config.port, config.providers, config.max_batch_delay_ms) == \
        (8, True, 7001, "cpu", 2.5)


@pytest.mark.parametrize("argv,env,words", [
    (["--max-batch-size", "0"], {}, "--max-batch-size must be >= 1"),
    (["--max-queue-size", "4", "--max-batch-size", "8"], {}, "--max-queue-size must be >= --max-batch-size"),
    ([], {"CIFAR10_PROVIDERS": "tpu"}, "choose from auto, cpu, cuda, tensorrt"),
    (["--event-loop", "trio"], {}, "choose from 'uvloop', 'asyncio'"),
    ([], {"CIFAR10_MAX_BATCH_SIZE": "lots"}, "CIFAR10_MAX_BATCH_SIZE='lots'"),
])
def test_invalid_settings_exit_with_a_message(argv, env, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(argv, environ=env)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_json_logs_carry_one_access_line_per_request(start_server):
    srv = start_server("--log-format", "json")
    pixels = np.zeros((32, 32, 3), np.uint8)
    srv.stub.Classify(pb.ClassifyRequest(image=raw_image(pixels), request_id="json-1"), timeout=10)
    srv.wait_until("the access line", lambda: '"json-1"' in srv.log(), timeout=5)  # written after the answer
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "json-1"]
    assert len(access) == 1
    assert access[0]["method"] == "Classify" and access[0]["status"] == "OK" and access[0]["model"] == "cifar10"
    assert access[0]["latency_ms"] > 0
    assert any("AVAILABLE" in line["message"] and "CPUExecutionProvider" in line["message"] for line in lines)


@pytest.mark.parametrize("spinning,entry", [(True, "1"), (False, "0")])
def test_intra_op_spinning_reaches_the_onnxruntime_session(spinning, entry):
    config = load_config(["--intra-op-spinning", str(spinning).lower()], environ={})
    model = OnnxModel(DEFAULT_MODEL, 1, SHIPPED_MODELS / DEFAULT_MODEL / "1",
                      RuntimeOptions(intra_op_threads=1, intra_op_spinning=config.intra_op_spinning))
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry


@pytest.mark.parametrize("flags,loop", [((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")])
def test_the_event_loop_is_uvloop_unless_asyncio_is_asked_for_and_the_log_says_which(start_server, flags, loop):
    srv = start_server(*flags)
    reply = srv.stub.Classify(pb.ClassifyRequest(image=raw_image(np.zeros((32, 32, 3), np.uint8))), timeout=10)
    assert len(reply.predictions) == 5
    assert f"event loop {loop} " in srv.log()
