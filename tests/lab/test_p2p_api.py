"""The Python API of natkit's peer to peer: ``natkit.p2p.listen``/``connect`` on two LAN
hosts behind their own real routers, meeting through a real relay on the Internet host:
streams both ways (with half-close), datagrams, authentication by the shared secret."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import natkit.p2p
from natkit.lab import Lab
from natkit.lab import config as C
from natkit.p2p.errors import P2PError
from tests.conftest import IN_CI, run_in_node
from tests.lab.relay_helpers import start_relay

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not IN_CI, reason="the lab needs root")

TOKEN = "p2p-api-token-0123456789abcdef"
SECRET = "p2p-api-secret-0123456789"  # the peers' own (issue 16: never the token)
RELAY = f"{C.WAN_IPS[0]}:7835"


@pytest.fixture
def two_lans(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab("p2papi", second_lan=True)


def _both(lab: Lab, listen: Callable[[], Any], connect: Callable[[], Any]) -> tuple[Any, Any]:
    """Run the two peers at once, each on its own thread inside its own LAN's namespace."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a = pool.submit(run_in_node, lab, "lan2", listen)
        b = pool.submit(run_in_node, lab, "lan", connect)
        return a.result(timeout=60), b.result(timeout=60)


def test_streams_and_datagrams_between_two_lans(two_lans: Lab, tmp_path: Path) -> None:
    blob = os.urandom(4 << 20)
    state = {"NATKIT_STATE_DIR": str(tmp_path / "state")}
    os.environ.update(state)  # the agents pin the relay's certificate there
    with start_relay(two_lans, tmp_path / "relay", token=TOKEN, http_port=None, https_port=None):

        async def listen() -> dict[str, Any]:
            conn = await natkit.p2p.listen("api", relay=RELAY, token=TOKEN, secret=SECRET)
            try:
                stream = await conn.accept_stream()
                got = await stream.read(-1)  # to the peer's end of stream (half-close)
                stream.write(hashlib.sha256(got).digest())
                stream.write_eof()
                await stream.drain()
                datagram = await conn.recv_datagram()
                conn.send_datagram(datagram.upper())
                while True:  # echo every ping until the client says it is done
                    done = asyncio.ensure_future(conn.accept_stream())
                    ping = asyncio.ensure_future(conn.recv_datagram())
                    await asyncio.wait({done, ping}, return_when=asyncio.FIRST_COMPLETED)
                    if done.done():
                        ping.cancel()
                        break
                    done.cancel()
                    conn.send_datagram(ping.result().upper())
                return {"path": conn.path, "got": len(got)}
            finally:
                await conn.close()

        async def connect() -> dict[str, Any]:
            conn = await natkit.p2p.connect("api", relay=RELAY, token=TOKEN, secret=SECRET)
            try:
                stream = await conn.open_stream()
                stream.write(blob)
                stream.write_eof()
                await stream.drain()
                digest = await stream.read(-1)
                echo = b""
                for _ in range(20):  # datagrams may be lost: ask again until one comes back
                    conn.send_datagram(b"ping")
                    try:
                        echo = await asyncio.wait_for(conn.recv_datagram(), 0.5)
                        break
                    except asyncio.TimeoutError:
                        continue
                bye = await conn.open_stream()
                bye.write_eof()
                await bye.drain()
                return {"path": conn.path, "digest": digest, "echo": echo,
                        "elapsed": conn.elapsed}  # fmt: skip
            finally:
                await conn.close()

        server, client = _both(two_lans, listen, connect)
    assert server["got"] == len(blob)
    assert client["digest"] == hashlib.sha256(blob).digest()
    assert client["echo"] == b"PING"
    assert client["path"] in ("direct", "port-mapped") and server["path"] in (
        "direct",
        "port-mapped",
    )


def test_peers_with_different_secrets_never_meet(two_lans: Lab, tmp_path: Path) -> None:
    # The room the relay sees is an HMAC of its name under the secret (issue 16): a peer
    # with another secret waits in another room, and learns nothing of this one.
    os.environ["NATKIT_STATE_DIR"] = str(tmp_path / "state")
    with start_relay(two_lans, tmp_path / "relay", token=TOKEN, http_port=None, https_port=None):

        def peer(kind: str, secret: str) -> Callable[[], Any]:
            async def run() -> str:
                call = natkit.p2p.listen if kind == "listen" else natkit.p2p.connect
                try:
                    conn = await call("wrong", relay=RELAY, token=TOKEN, secret=secret,
                                      peer_timeout=5)  # fmt: skip
                except P2PError as exc:
                    return f"refused: {exc}"
                await conn.close()
                return "connected"

            return run

        server, client = _both(two_lans, peer("listen", "one" * 6), peer("connect", "two" * 6))
    for outcome in (server, client):
        assert outcome.startswith("refused: no peer came"), (server, client)
