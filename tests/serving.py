"""Running an app for real in a test: uvicorn on a free loopback port, in the test's event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


def free_socket(send_buffer: int | None = None) -> socket.socket:
    """A socket bound to a free port on 127.0.0.1. `send_buffer`: the accepted sockets get this send
    buffer (Linux copies it from the listening socket)."""
    sock = socket.socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def running(app: Any, options: dict[str, Any], sock: socket.socket) -> AsyncIterator[str]:
    """Serve `app` with uvicorn (`options`: uvicorn.Config's) on `sock`; yields "127.0.0.1:PORT" once it
    listens, and stops the server on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **options))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
