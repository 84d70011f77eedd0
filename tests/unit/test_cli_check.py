"""``natkit check``'s table says what natkit saw of each port-mapping protocol: an answer
(with or without an address) or none within its second; never "offered" for "answered"."""

from __future__ import annotations

from rich.console import Console

from natkit.check.report import CheckReport, PortMapOffer
from natkit.cli.check import render


def test_each_protocol_is_answered_or_silent() -> None:
    report = CheckReport(gateway="192.168.77.1")
    report.port_mapping["upnp"] = PortMapOffer(external_ip="100.200.0.1", public=True)
    report.port_mapping["natpmp"] = PortMapOffer(external_ip=None, public=False)
    console = Console(record=True, width=120)
    render(report, console)
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in text.splitlines() if line.count("│") == 3}  # fmt: skip
    assert rows["UPnP IGD"] == "100.200.0.1 (public)"
    assert rows["NAT-PMP"] == "answered, no external address"
    assert rows["PCP"] == "no answer"
    assert "offered" not in text
