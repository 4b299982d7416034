"""`python -m serving [flags]`: run the server until SIGTERM/SIGINT (exit 0 after draining)."""

from __future__ import annotations

import asyncio
import sys
from typing import Callable

from serving.config import load_config
from serving.errors import StartupError
from serving.logs import configure_logging


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """None: asyncio's own loop."""
    if event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise StartupError("--event-loop uvloop: uvloop is not installed (pip install uvloop, "
                           "or run with --event-loop asyncio)") from None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_format, config.log_level)
    from serving.server import serve  # after logging is set up: imports onnxruntime

    try:
        with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
            runner.run(serve(config))
    except StartupError as exc:
        print(f"python -m serving: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
