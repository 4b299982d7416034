"""`python -m bench.patched_serving KEY=VALUE ... -- [server flags]`: our server with extra
onnxruntime session config entries (and `sys.switchinterval=SECONDS`, the GIL hand-off
interval), for tuning experiments that have no server flag (yet).

Used only by bench/tune.py, never for a benchmark row: it measures what a change to
serving/runtime.py would buy before anyone makes it. The patch wraps
onnxruntime.InferenceSession in this process only.
"""

from __future__ import annotations

import sys

import onnxruntime as ort


def install(entries: dict[str, str]) -> None:
    original = ort.InferenceSession

    def session_with_entries(model, sess_options=None, *args, **kwargs):
        options = sess_options or ort.SessionOptions()
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        return original(model, sess_options=options, *args, **kwargs)

    ort.InferenceSession = session_with_entries  # type: ignore[misc]


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    entries = dict(entry.split("=", 1) for entry in argv[:split])
    if "sys.switchinterval" in entries:  # the GIL hand-off interval, seconds (Python's default 0.005)
        sys.setswitchinterval(float(entries.pop("sys.switchinterval")))
    install(entries)
    from serving.__main__ import main as serve

    return serve(argv[split + 1:])


if __name__ == "__main__":
    raise SystemExit(main())
