"""`python -m serving [flags]`: run the server until SIGTERM/SIGINT (exit 0 after draining)."""

from __future__ import annotations

import asyncio
import sys

from serving.config import load_config
from serving.errors import StartupError
from serving.event_loop import loop_factory
from serving.logs import configure_logging


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
