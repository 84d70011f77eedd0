"""QUIC libraries for natkit's peer-to-peer path: aioquic against qh3 (issue 16), and
natkit's own session layer on qh3 (``natkit``: P2PSession and P2PStream, with natkit's
authentication, stream credit and path switch, over an in-memory path pair on asyncio).

No network at all: a client and a server connection object of one library, in one process,
hand each other their datagrams in memory (no loss, no delay). What is left is what each
library costs per handshake, per byte of a stream and per datagram — the CPU that bounds
natkit's direct P2P path (18 MB/s through ``p2p connect --forward`` with aioquic). Each
sample is a new process, so its peak RSS is its own.

    .venv/bin/python bench/run.py quic
"""

from __future__ import annotations

import importlib
import json
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    Benchmark,
    CaseResult,
    Options,
    Report,
    Sample,
    Section,
    machine_info,
    now,
    ratio,
)

from natkit.lab import Lab

NAME = "quic"
LIBS = ("aioquic", "qh3", "natkit")
#: natkit's session layer has no datagram case here (it drops datagrams beyond its queue).
CASES = {"natkit": ("handshake", "stream")}
STREAM_BYTES = 64 * 1024 * 1024
CHUNK = 64 * 1024
DATAGRAMS = 20_000
DATAGRAM_SIZE = 1_000
CLIENT, SERVER = ("10.0.0.1", 4433), ("10.0.0.2", 4433)
KINDS = {
    "handshake": "handshake (client hello → both complete)",
    "stream": f"one stream of {STREAM_BYTES >> 20} MiB, client → server",
    "datagrams": f"{DATAGRAMS:,} datagrams of {DATAGRAM_SIZE} B, client → server",
}


# ---- the child: one case of one library --------------------------------------------------


def _certificate(directory: Path) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    from natkit.net.certs import self_signed

    certificate, private_key = self_signed("natkit-bench", days=1)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))  # fmt: skip
    return str(cert), str(key)


class Pair:
    """A client and a server of ``lib``, joined in memory."""

    def __init__(self, lib: str, certfile: str, keyfile: str) -> None:
        conf = importlib.import_module(f"{lib}.quic.configuration")
        conn = importlib.import_module(f"{lib}.quic.connection")
        self.events = importlib.import_module(f"{lib}.quic.events")
        common: dict[str, Any] = {"alpn_protocols": ["natkit-bench"],
                                  "max_datagram_frame_size": 65536}  # fmt: skip
        server_conf = conf.QuicConfiguration(is_client=False, **common)
        server_conf.load_cert_chain(certfile, keyfile)
        client_conf = conf.QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, **common)
        self.client = conn.QuicConnection(configuration=client_conf)
        self.server = conn.QuicConnection(
            configuration=server_conf,
            original_destination_connection_id=self.client.original_destination_connection_id,
        )
        self.client.connect(SERVER, now=time.time())

    def pump(self) -> int:
        """Deliver what both sides have to send (and due timers); the datagrams moved."""
        moved = 0
        t = time.time()
        for side, other, source in ((self.client, self.server, CLIENT),
                                    (self.server, self.client, SERVER)):  # fmt: skip
            timer = side.get_timer()
            if timer is not None and timer <= t:
                side.handle_timer(now=t)
            for data, _ in side.datagrams_to_send(now=t):
                other.receive_datagram(data, source, now=t)
                moved += 1
        return moved

    def drain(self, side: Any) -> list[Any]:
        found = []
        while (event := side.next_event()) is not None:
            found.append(event)
        return found


def _handshake(pair: Pair) -> None:
    done = {"client": False, "server": False}
    while not all(done.values()):
        if not pair.pump():
            time.sleep(0)
        for name, side in (("client", pair.client), ("server", pair.server)):
            for e in pair.drain(side):
                if isinstance(e, pair.events.HandshakeCompleted):
                    done[name] = True


class _MemoryPath:
    """Half of an in-memory datagram path between two natkit sessions (no loss)."""

    @staticmethod
    def pair() -> tuple[Any, Any]:
        import asyncio

        from natkit.p2p.paths import BasePath

        class MemoryPath(BasePath):
            peer: MemoryPath

            def send(self, data: bytes) -> None:
                self.sent += 1
                asyncio.get_running_loop().call_soon(self.peer._deliver, data)

        a, b = MemoryPath("direct"), MemoryPath("direct")
        a.peer, b.peer = b, a
        return a, b


def _natkit_case(kind: str) -> dict[str, float]:
    import asyncio

    from natkit.p2p.auth import PeerIdentity
    from natkit.p2p.paths import PathSwitch
    from natkit.p2p.session import P2PSession

    async def main() -> tuple[float, float]:
        ident_c, ident_s = PeerIdentity.generate("c"), PeerIdentity.generate("s")
        path_c, path_s = _MemoryPath.pair()
        started, cpu = time.perf_counter(), time.process_time()
        client, server = await asyncio.gather(
            P2PSession.connect(PathSwitch(path_c), role="client", identity=ident_c,
                               peer_fingerprint=ident_s.fingerprint, secret="bench"),
            P2PSession.connect(PathSwitch(path_s), role="server", identity=ident_s,
                               peer_fingerprint=ident_c.fingerprint, secret="bench"),
        )  # fmt: skip
        if kind == "stream":
            started, cpu = time.perf_counter(), time.process_time()

            async def send() -> None:
                stream = await client.open_stream()
                block = b"x" * CHUNK
                for _ in range(STREAM_BYTES // CHUNK):
                    stream.write(block)
                    await stream.drain()
                stream.write_eof()

            async def receive() -> int:
                stream, got = await server.accept_stream(), 0
                while chunk := await stream.read(1 << 20):
                    got += len(chunk)
                return got

            _, received = await asyncio.gather(send(), receive())
            assert received == STREAM_BYTES, received
        wall, used = time.perf_counter() - started, time.process_time() - cpu
        await client.close()
        await server.close()
        return wall, used

    wall, cpu = asyncio.run(main())
    return {"wall": wall, "cpu": cpu,
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}  # fmt: skip


def run_case(lib: str, kind: str) -> dict[str, float]:
    if lib == "natkit":
        return _natkit_case(kind)
    with tempfile.TemporaryDirectory() as d:
        certfile, keyfile = _certificate(Path(d))
        started = time.perf_counter()
        cpu = time.process_time()
        pair = Pair(lib, certfile, keyfile)
        _handshake(pair)
        if kind == "stream":
            sid = pair.client.get_next_available_stream_id()
            started, cpu = time.perf_counter(), time.process_time()
            block = b"x" * CHUNK
            for _ in range(STREAM_BYTES // CHUNK - 1):
                pair.client.send_stream_data(sid, block)
            pair.client.send_stream_data(sid, block, end_stream=True)
            received, ended = 0, False
            while not ended:
                pair.pump()
                for e in pair.drain(pair.server):
                    if isinstance(e, pair.events.StreamDataReceived):
                        received += len(e.data)
                        ended = ended or e.end_stream
                pair.drain(pair.client)
            assert received == STREAM_BYTES, received
        elif kind == "datagrams":
            started, cpu = time.perf_counter(), time.process_time()
            payload = b"d" * DATAGRAM_SIZE
            got = 0
            for i in range(DATAGRAMS):
                pair.client.send_datagram_frame(payload)
                if i % 64 == 63:  # as a sender would: a batch, then the socket
                    pair.pump()
                    got += sum(isinstance(e, pair.events.DatagramFrameReceived)
                               for e in pair.drain(pair.server))  # fmt: skip
            idle = 0
            while got < DATAGRAMS and idle < 1000:
                idle = 0 if pair.pump() else idle + 1
                got += sum(isinstance(e, pair.events.DatagramFrameReceived)
                           for e in pair.drain(pair.server))  # fmt: skip
            assert got == DATAGRAMS, got
        wall = time.perf_counter() - started
        return {"wall": wall, "cpu": time.process_time() - cpu,
                "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}  # fmt: skip


# ---- the parent: samples, interleaved -----------------------------------------------------


def _sample(lib: str, kind: str) -> Sample:
    argv = [sys.executable, __file__, "--child", lib, kind]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    out = json.loads(proc.stdout)
    return Sample(out["wall"], {"cpu": out["cpu"]}, {"maxrss_kb": out["maxrss_kb"]})


def run(lab: Lab | None, opts: Options) -> Report:
    started, t0 = now(), time.monotonic()
    versions = {lib: importlib.import_module(lib).__version__ for lib in LIBS}
    versions["natkit"] = f"session on qh3 {versions['qh3']}"
    # aioquic: natkit's before; qh3 alone; natkit's session layer on qh3 (its after).
    role = {"aioquic": "subject", "qh3": "reference", "natkit": "reference"}
    results = {
        (lib, kind): CaseResult(f"{kind}_{lib}", f"{lib} {versions[lib]}: {label}", role[lib])
        for kind, label in KINDS.items()
        for lib in LIBS
        if kind in CASES.get(lib, KINDS)
    }
    for rnd in range(opts.warmup + opts.iterations):
        order = list(results) if rnd % 2 == 0 else list(reversed(results))
        print(f"  round {rnd + 1}:", end="", flush=True)
        for key in order:
            res = results[key]
            try:
                sample = _sample(*key)
            except Exception as exc:
                res.failures.append(str(exc))
                print(f" {res.key}=FAIL", end="", flush=True)
                continue
            (res.warmup if rnd < opts.warmup else res.samples).append(sample)
            print(f" {res.key}={sample.total * 1000:.0f}", end="", flush=True)
        print(flush=True)
    by_key = {r.key: r for r in results.values()}
    ratios = [ratio(by_key, f"{kind}: aioquic / qh3 (time)", f"{kind}_aioquic", f"{kind}_qh3")
              for kind in KINDS]  # fmt: skip
    ratios += [ratio(by_key, f"{kind}: natkit session on qh3 / qh3 alone (time)",
                     f"{kind}_natkit", f"{kind}_qh3") for kind in CASES["natkit"]]  # fmt: skip
    notes = []
    for (lib, kind), res in results.items():
        if not res.samples:
            continue
        med = sorted(res.samples, key=lambda s: s.total)[len(res.samples) // 2]
        rss = max(s.info["maxrss_kb"] for s in res.samples) / 1024
        rate = ""
        if kind == "stream":
            rate = f"{STREAM_BYTES / med.total / 1e6:.1f} MB/s, "
        elif kind == "datagrams":
            rate = f"{DATAGRAMS / med.total:,.0f} datagrams/s, "
        notes.append(f"{lib} {kind}: {rate}CPU {med.phases['cpu'] * 1000:.0f} ms of "
                     f"{med.total * 1000:.0f} ms, peak RSS {rss:.0f} MiB")  # fmt: skip
    notes.append("aioquic and qh3 alone over the same in-memory pair (no sockets, no loss), "
                 "each sample a new process: each library's cost alone. natkit: two "
                 "P2PSessions (handshake includes natkit's authentication) over an in-memory "
                 "path pair on one asyncio loop, the stream written with write()+drain() and "
                 "read with read(): natkit's stream credit, batching and path switch in the "
                 "way, both peers in one process.")  # fmt: skip
    report = Report(
        name=NAME, title="QUIC libraries for the P2P path: aioquic vs qh3, in memory",
        started=started, machine=machine_info(),
        config={"iterations": opts.iterations, "stream_bytes": STREAM_BYTES,
                "datagrams": DATAGRAMS, "versions": versions},
        cases=[results[lib, "handshake"] for lib in LIBS], ratios=ratios, goals=[], notes=notes,
        sections=[Section(kind, KINDS[kind], [results[lib, kind] for lib in LIBS
                                              if (lib, kind) in results])
                  for kind in KINDS if kind != "handshake"],
        clients=", ".join(f"{lib} {v}" for lib, v in versions.items()),
    )  # fmt: skip
    report.elapsed = time.monotonic() - t0
    return report


BENCHMARK = Benchmark(
    name=NAME,
    description="QUIC in memory: aioquic vs qh3 (handshake, stream, datagrams), natkit's session on qh3",
    lab_config=None,
    run=run,
    iterations=5,
    default=False,
)

if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(json.dumps(run_case(sys.argv[2], sys.argv[3])))
