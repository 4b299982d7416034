"""The asyncio event loop that runs gRPC and the handlers: uvloop by default, asyncio's own on request.

uvloop schedules callbacks and polls sockets for less CPU: +6% images/s at 16 clients on the
2-core benchmark machine, the same latency at 1 (bench/NOTES.md). grpc.aio runs on any asyncio loop.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from serving.errors import StartupError


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """For `asyncio.Runner(loop_factory=...)`; None means asyncio's own loop."""
    if event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise StartupError("--event-loop uvloop: uvloop is not installed (pip install uvloop, "
                           "or run with --event-loop asyncio)") from None
    return uvloop.new_event_loop


def running_loop_name() -> str:
    """What runs the current loop, for the start-up log line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
