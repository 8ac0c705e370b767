"""Hostile review 12: the rtfix merge (sql/0042's broadcast budget, the realtime per-socket byte
bound with writes in pieces), attacked through the real API and a real realtime service with the
source in hand.

Each test asserts the SECURE behaviour. A hole still open is marked `xfail(strict=True)`; the
mark goes with the fix. The realtime service runs in this process on a real socket, with the
options `serve` gives it (`RealtimeService.ws_options`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from websockets.asyncio.server import serve as ws_serve

from fluxbase.config import load_settings
from fluxbase.devstack.procs import free_port
from fluxbase_realtime.server import RealtimeService
from support import Api

BOUND = 2 << 20


@contextlib.asynccontextmanager
async def served(instance: Any, **env: str) -> AsyncIterator[tuple[int, RealtimeService]]:
    service = RealtimeService(load_settings({**instance.env, **env}))
    await service.start()
    port = free_port()
    try:
        async with ws_serve(service.handler, "127.0.0.1", port, **service.ws_options()):
            yield port, service
    finally:
        await service.close()


async def _upgrade(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket client: the handshake by hand, and then nothing is ever read again (a
    small receive buffer, so the kernel takes little of what the server writes)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    nonce = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /?token={key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _ping_frames(n: int) -> bytes:
    """`n` masked ping frames of the largest control payload (125 bytes; mask 0: sent as is)."""
    return (b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125) * n


# -- 1. realtime: a peer that sends pings and reads nothing -----------------------------------------


async def test_a_socket_that_pings_and_never_reads_is_dropped_before_its_pongs_pile_up(
    api: Api, project: Any, instance: Any
) -> None:
    """websockets answers every ping frame at once with a pong of the same payload, written to
    the transport whether or not the peer reads; the per-socket byte bound (hub.Client) only
    counts what the hub sends and is only checked when an event is delivered. Before the fix a
    socket that subscribed to nothing and sent 16 MB of pings made the server hold 15 MB of pongs
    (every byte the peer sent, for as long as it kept the socket open); now its connection is
    dropped once its unsent bytes pass twice the bound."""
    async with served(instance, FLUXBASE_REALTIME_MAX_BUFFERED_BYTES=str(BOUND)) as (port, service):
        reader, writer = await _upgrade(port, project.admin_key)
        local = writer.get_extra_info("sockname")[1]
        client = None
        deadline = time.monotonic() + 10
        while client is None and time.monotonic() < deadline:
            client = next((c for c in service.clients if c.ws.remote_address[1] == local), None)
            await asyncio.sleep(0.01)
        assert client is not None
        most = 0
        chunk = _ping_frames(8000)  # 1 MB of pings
        dropped = False
        try:
            for _ in range(16):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 20)
                most = max(most, client.held())
        except (ConnectionError, TimeoutError):
            dropped = True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client in service.clients and client.ws.transport is not None:
            most = max(most, client.held())
            if client.ws.transport.is_closing():
                break
            await asyncio.sleep(0.05)
        held = (
            client.held() if client.ws.transport is not None and not client.ws.transport.is_closing() else 0
        )
        writer.close()
        assert most <= 2 * BOUND + (1 << 20), f"{most / 1e6:.1f} MB of pongs held (dropped: {dropped})"
        assert held == 0, f"the socket is still open holding {held / 1e6:.1f} MB"
