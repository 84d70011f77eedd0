"""A tiny HTTP server for lab hosts: ``python -m natkit.lab.webserver HOST PORT [TEXT]``.

Python's ``http.server`` resolves its own name at start-up, which stalls for seconds in a
namespace without DNS; this one answers every request with TEXT at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def serve(host: str, port: int, text: str) -> None:
    body = text.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            OSError,
        ):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    text = sys.argv[3] if len(sys.argv) > 3 else f"hello from {host}:{port}\n"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, text))


if __name__ == "__main__":
    main()
