"""natkit's modules import each other without cycles (type-checking imports included: a
cycle there is still two modules that cannot be understood apart), and peer-to-peer code
uses no relay internals."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
# What p2p may use of the relay package: the agent (its public client), the wire messages,
# and the sealed record path (seal, sealpump and its socket helpers), which the direct TCP
# path reuses as issue 16 asks (the relay's fastest encrypted path, not a second one).
P2P_MAY_USE = {
    "natkit.relay.agent",
    "natkit.relay.messages",
    "natkit.relay.seal",
    "natkit.relay.sealpump",
    "natkit.relay.sockframes",
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own modules
            if state.get(n) == 1:
                found.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_p2p_uses_no_relay_internals() -> None:
    graph = _graph()
    used = {
        (m, n) for m, deps in graph.items() if m.startswith("natkit.p2p")
        for n in deps if n.startswith("natkit.relay.") and n not in P2P_MAY_USE
    }  # fmt: skip
    assert used == set()
