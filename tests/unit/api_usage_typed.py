"""A user's program, checked by ``mypy --strict`` (tests/unit/test_api_surface.py): the
public API is typed end to end. Never run: it would touch the network."""

from __future__ import annotations

import asyncio

import natkit
from natkit import events


def on_event(event: events.Event) -> None:
    match event:
        case events.Lost(reason=reason):
            print("lost:", reason)
        case events.Ready(public_address=address, verified=verified, mapping_state=state):
            print("ready at", address, verified, state)
        case events.Switched(public_address=address, previous_address=previous):
            print("switched from", previous, "to", address)
        case events.LocalUnreachable(local_address=where, reason=why):
            print("nothing answers on", where, why)
        case _:
            print(event.name, event.to_json())


def blocking() -> None:
    with natkit.open_port(8080, via="upnp", on_event=on_event) as port:
        address: str = port.public_address
        port.on_event(on_event)
        print(address, port.mapping.external_port)
    tunnel = natkit.connect(8080, "http", relay="relay.example:7835", token="t")
    url: str = tunnel.public_url
    natkit.disconnect(url)
    with natkit.expose(8080, http=True, hostname="app", on_event=on_event) as exposed:
        method: str = exposed.method
        print(method, exposed.public_address, exposed.verified)
    for mapping in natkit.list_mappings(via="upnp"):
        print(natkit.delete_mapping(mapping.external_port, mapping.protocol))
    try:
        natkit.connect(addr="8080", proto="tcp")
    except (natkit.RelayAuthError, natkit.RelayTrustError, natkit.TunnelRefusedError) as exc:
        print(exc)
    except natkit.RelayError as exc:
        print(exc)


async def nonblocking() -> None:
    async with natkit.open_port_async(8080) as port:
        print(port.public_address)
    async with await natkit.open_port_async(8080) as port2:
        print(port2.method)
    async with natkit.expose_async(8080, relay="r:7835", token="t") as exposure:
        exposure.on_event(on_event)
    tunnel = await natkit.connect_async(8080, relay="r:7835", token="t")
    await tunnel.close()
    mappings = await natkit.list_mappings_async()
    print(len(mappings), await natkit.delete_mapping_async(8080, "udp"))
    conn = await natkit.p2p.connect(
        "room", relay="r:7835", token="t", secret=natkit.p2p.new_secret()
    )
    print(conn.path)


def run_directly() -> None:
    port: natkit.OpenPort = asyncio.run(natkit.open_port_async(8080))
    tunnel: natkit.RelayTunnel = asyncio.run(natkit.connect_async(8080, relay="r:7835", token="t"))
    exposure: natkit.Exposure = asyncio.run(natkit.expose_async(8080, ipv6=False))
    print(port.public_address, tunnel.public_url, exposure.public_address_v6)
    with natkit.expose(8080, ipv6=True) as exposed:
        v6: str = exposed.public_address_v6
        print(v6)


if __name__ == "__main__":
    blocking()
    asyncio.run(nonblocking())
    run_directly()
