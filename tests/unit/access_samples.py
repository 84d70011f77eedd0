"""Hypothesis strategies for relay access policies (natkit.relay.access), shared by the
protocol fuzzers and the access tests."""

from __future__ import annotations

import ipaddress
import string

from hypothesis import strategies as st

from natkit.relay import access as A

IPV4_NETS = st.builds(
    lambda addr, plen: str(ipaddress.IPv4Network((addr, plen), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
IPV6_NETS = st.builds(
    lambda addr, plen: str(ipaddress.IPv6Network((addr, plen), strict=False)),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
CIDRS = st.lists(IPV4_NETS | IPV6_NETS, max_size=A.MAX_CIDRS, unique=True).map(tuple)
CREDENTIALS = st.builds(
    A.Credential,
    st.binary(min_size=A.SALT_BYTES, max_size=A.SALT_BYTES).map(bytes.hex),
    st.binary(min_size=32, max_size=32).map(bytes.hex),
)
REALMS = st.text(
    alphabet=[c for c in string.printable if c.isprintable() and c not in '"\\'],
    min_size=1,
    max_size=A.MAX_REALM,
).filter(lambda r: bool(A._REALM.fullmatch(r)))
RATES = st.none() | st.builds(
    A.RateLimit,
    st.integers(1, A.MAX_RATE_COUNT),
    st.sampled_from([1.0, 60.0, 3600.0]) | st.floats(0.001, 86400),
)


@st.composite
def policies(draw: st.DrawFn, credentials: bool = True) -> A.AccessPolicy:
    creds = draw(st.lists(CREDENTIALS, max_size=A.MAX_CREDENTIALS)) if credentials else []
    return A.AccessPolicy(
        allow=draw(CIDRS),
        deny=draw(CIDRS),
        credentials=tuple(creds),
        realm=draw(st.just(A.DEFAULT_REALM) | REALMS),
        rate=draw(RATES),
    )
