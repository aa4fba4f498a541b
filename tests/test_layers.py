"""The package layout is a stack of layers, each importing only the layers below it.

    dinfer/            the command line: knows the daemon and the provider node
    daemon/api/        HTTP routes, the admin API, the server
    daemon/nursery/    the supervisor and the per-request dispatch
    daemon/cluster/    several daemons sharing providers through Redis: a remote provider
                       is a ProviderLink the dispatch cannot tell from a local session
    daemon/routing/    registry, eligibility, breaker, admission queue, provider sessions
    daemon/config.py, daemon/store.py, daemon/serve_lock.py, daemon/accounts/
                       settings, the store and its directory's lock, the usage ledger,
                       beside every daemon layer
    protocol/          the wire protocol, shared by both sides
    hosting/           what the host gives a process (systemd's notify socket), shared too
    daemon/config_file.py
                       the TOML reader the settings use, knowing nothing of them

`provider/` (the reference node) stands on `protocol/` and `hosting/` alone. Imports under
`TYPE_CHECKING` count: a cycle hidden from the interpreter is still a cycle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dinfer", "daemon", "provider", "protocol", "hosting")

# Higher rank = higher layer. A module may import modules of its own layer or a lower rank.
RANK = {
    "protocol": 0,
    "hosting": 0,
    "daemon.config": 1,
    "daemon.config_file": 0,  # the TOML reader below the settings, knowing nothing of them
    "daemon.store": 1,
    "daemon.key_policy": 0,  # the limits a key carries, below the store and the limiter
    "daemon.accounts": 1,
    "daemon.serve_lock": 1,
    "daemon.metrics": 1,
    "daemon.log_format": 1,
    "daemon.routing": 2,
    "daemon.cluster": 3,
    "daemon.nursery": 4,
    "daemon.api": 5,
    "dinfer": 6,
    "provider": 1,
}
# The provider node and the coordinator never import each other; only `dinfer` knows both.
SEPARATE = {("provider", "daemon"), ("daemon", "provider")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _layer(module: str) -> str:
    for layer in sorted(RANK, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module.split(".")[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {imp for imp in _imports(path) if imp in modules and imp != name}
        for name, path in modules.items()
    }


def test_the_layout_has_every_layer() -> None:
    layers = {_layer(module) for module in _modules()}
    assert set(RANK) <= layers


def test_no_two_modules_import_each_other() -> None:
    graph = _graph()
    pairs = sorted(
        (a, b) for a, targets in graph.items() for b in targets if a < b and a in graph.get(b, ())
    )
    assert pairs == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_only_downward(module: str) -> None:
    own = _layer(module)
    upward = []
    for target in sorted(_graph()[module]):
        layer = _layer(target)
        if (own.split(".")[0], layer.split(".")[0]) in SEPARATE:
            upward.append(target)
        elif own != layer and RANK.get(layer, 0) >= RANK.get(own, 0):
            upward.append(target)
    assert upward == [], f"{module} ({own}) imports upward or across"
