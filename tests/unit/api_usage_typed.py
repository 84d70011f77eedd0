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
        case events.Ready(public_address=address, verified=verified):
            print("ready at", address, verified)
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


if __name__ == "__main__":
    blocking()
    asyncio.run(nonblocking())
