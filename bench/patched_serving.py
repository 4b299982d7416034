"""`python -m bench.patched_serving KEY=VALUE ... -- [server flags]`: our server with a change
that has no flag (yet), for tuning experiments.

Keys: onnxruntime session config entries (`session.intra_op.allow_spinning=0`, ...) and these:
- `sys.switchinterval=SECONDS`: the GIL hand-off interval (Python's default 0.005);
- `grpc_option.NAME=VALUE`: an extra gRPC server channel argument (`grpc.optimization_target`);
- `inference_nice=N`: the batcher and onnxruntime threads at nice N (a negative N needs root);
- `worker_nice=N`: only onnxruntime's own intra-op worker threads at nice N (the batcher thread,
  which runs its share of each operator too, stays at 0);
- `decode_inline_max_bytes=N`: encoded images above N bytes decode in a thread (the default 64 KiB);
- `trust=off`: the batcher runs the graph's probabilities alone, as it did before calibration, the
  unsure score and the drift windows (serving/trust.py): the "before" side of the trust-cost row.

Used by bench/tune.py, and by bench/run.py's trust row for its "before" side only: it measures
what a change to serving/ buys or costs. Every patch applies to this process only.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import onnxruntime as ort


def session_entries(entries: dict[str, str]) -> None:
    original = ort.InferenceSession

    def session_with_entries(model, sess_options=None, *args, **kwargs):
        options = sess_options or ort.SessionOptions()
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        return original(model, sess_options=options, *args, **kwargs)

    ort.InferenceSession = session_with_entries  # type: ignore[misc]


def switch_interval(seconds: str) -> None:
    sys.setswitchinterval(float(seconds))


def grpc_option(name: str, value: str) -> None:
    from serving.server import ClassifierServer

    plain_options = ClassifierServer._grpc_options
    typed = int(value) if value.lstrip("-").isdigit() else value
    ClassifierServer._grpc_options = lambda self: [*plain_options(self), (name, typed)]  # type: ignore[method-assign]


def inference_nice(nice: str) -> None:
    from serving.repository import ModelRepository

    plain_scan = ModelRepository.scan

    def scan_at_nice(self, *args, **kwargs):  # threads created by a scan (batcher, onnxruntime) inherit it
        os.setpriority(os.PRIO_PROCESS, 0, int(nice))
        return plain_scan(self, *args, **kwargs)

    ModelRepository.scan = scan_at_nice  # type: ignore[method-assign]


def worker_nice(nice: str) -> None:
    """Only onnxruntime's own intra-op threads at nice N: the session is created in a
    short-lived thread at that nice, and the threads it spawns inherit it."""
    import threading

    plain_session = ort.InferenceSession

    def session_from_nice_thread(*args, **kwargs):
        made: dict = {}

        def create() -> None:
            os.setpriority(os.PRIO_PROCESS, 0, int(nice))
            try:
                made["session"] = plain_session(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                made["error"] = exc

        thread = threading.Thread(target=create)
        thread.start()
        thread.join()
        if "error" in made:
            raise made["error"]
        return made["session"]

    ort.InferenceSession = session_from_nice_thread  # type: ignore[misc]


def decode_inline_max_bytes(size: str) -> None:
    import serving.servicer

    serving.servicer.DECODE_INLINE_MAX_BYTES = int(size)


def trust(setting: str) -> None:
    if setting != "off":
        raise SystemExit(f"trust={setting}: only trust=off is a patch")
    import numpy as np

    from serving.trust import ScoredRunner

    def probabilities_only(self, images):
        return self._model.run(images), np.zeros(len(images), dtype=np.float32)

    ScoredRunner.__call__ = probabilities_only  # type: ignore[method-assign]


PATCHES: dict[str, Callable[[str], None]] = {
    "trust": trust,
    "sys.switchinterval": switch_interval,
    "inference_nice": inference_nice,
    "decode_inline_max_bytes": decode_inline_max_bytes,
    "worker_nice": worker_nice,
}
GRPC_OPTION = "grpc_option."


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    entries = dict(entry.split("=", 1) for entry in argv[:split])
    for key in list(entries):
        if key in PATCHES:
            PATCHES[key](entries.pop(key))
        elif key.startswith(GRPC_OPTION):
            grpc_option(key[len(GRPC_OPTION):], entries.pop(key))
    session_entries(entries)
    from serving.__main__ import main as serve

    return serve(argv[split + 1:])


if __name__ == "__main__":
    raise SystemExit(main())
