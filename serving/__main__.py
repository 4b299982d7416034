"""`python -m serving [flags]`: run the server until SIGTERM/SIGINT (exit 0 after draining)."""

from __future__ import annotations

import asyncio
import sys

from serving.config import load_config
from serving.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_format, config.log_level)
    from serving.server import serve  # after logging is set up: imports onnxruntime

    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
