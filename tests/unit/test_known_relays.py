"""An agent's memory of relays (natkit.net.certs.KnownRelays, trust on first use) and its
TLS client context: a damaged pin file is an error naming the file, never a silent reset."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from natkit.errors import NatkitError
from natkit.net.certs import KnownRelays, RelayTrustError, client_context, ensure_self_signed

FP1 = "sha256:" + "ab" * 32
FP2 = "sha256:" + "cd" * 32


def test_a_missing_file_pins_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "state" / "known_relays"
    known = KnownRelays(path)
    assert known.check("relay.example:7835", FP1) is True  # pinned just now
    assert json.loads(path.read_text()) == {"relay.example:7835": FP1}
    assert known.check("relay.example:7835", FP1) is False  # known, and the same
    assert known.check("other.example:7835", FP2) is True
    assert json.loads(path.read_text()) == {"relay.example:7835": FP1, "other.example:7835": FP2}
    assert not path.with_name("known_relays.tmp").exists()


def test_another_certificate_for_a_pinned_relay_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "known_relays"
    known = KnownRelays(path)
    known.check("relay.example:7835", FP1)
    with pytest.raises(RelayTrustError) as info:
        known.check("relay.example:7835", FP2)
    message = str(info.value)
    assert FP1 in message and FP2 in message and str(path) in message
    assert json.loads(path.read_text()) == {"relay.example:7835": FP1}  # the pin stays
    assert isinstance(info.value, NatkitError)


@pytest.mark.parametrize(
    "content",
    ["", "{", "not json", "[]", '["relay", "fp"]', "null", '{"relay": 1}', '{"relay": null}',
     '{"a": "fp", "b": ["fp"]}', "\x00\x01"],
)  # fmt: skip
def test_a_damaged_pin_file_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "known_relays"
    path.write_text(content)
    with pytest.raises(RelayTrustError, match="is damaged") as info:
        KnownRelays(path).check("relay.example:7835", FP1)
    assert str(path) in str(info.value)
    assert path.read_text() == content  # not overwritten: no pin is forgotten silently


def test_an_unreadable_pin_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "known_relays"
    path.mkdir()  # a directory where the file should be
    with pytest.raises(RelayTrustError, match="cannot read the pinned relays") as info:
        KnownRelays(path).check("relay.example:7835", FP1)
    assert str(path) in str(info.value)


def test_an_expected_fingerprint_is_checked_without_the_file(tmp_path: Path) -> None:
    path = tmp_path / "known_relays"
    known = KnownRelays(path)
    assert known.check("relay.example:7835", FP1, expected=FP1) is False
    with pytest.raises(RelayTrustError, match="not the expected"):
        known.check("relay.example:7835", FP2, expected=FP1)
    assert not path.exists()


def test_client_context_with_a_cafile_checks_the_chain_and_the_host_name(tmp_path: Path) -> None:
    cert, _ = ensure_self_signed(tmp_path, "relay.example")
    ctx = client_context(cert)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is True
    pinned = client_context(None)  # the fingerprint is checked by KnownRelays instead
    assert pinned.verify_mode == ssl.CERT_NONE and pinned.check_hostname is False
    assert pinned.minimum_version >= ssl.TLSVersion.TLSv1_2
