"""ARCHITECTURE.md: config, router and proxy/protocol are pure — no I/O modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "shardwire"
PURE = ["config", "router", "proxy/protocol"]
IO_MODULES = {"asyncio", "socket", "asyncpg", "uvloop", "psycopg", "ssl", "selectors"}


@pytest.mark.parametrize("path", sorted(p for d in PURE for p in (SRC / d).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_pure_layers_import_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert not imported & IO_MODULES
