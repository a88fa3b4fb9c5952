"""Regenerate the import table and the layer diagram of docs/architecture.md from the source.

``python scripts/gen_architecture_imports.py`` rewrites both in place; ``tests/test_docs.py``
(whose import parser this reuses) fails when either is out of date. A module's layer is
1 + the highest layer of the package modules it imports (0: it imports none).
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_docs import _actual_imports  # noqa: E402

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def main() -> None:
    graph = _actual_imports()

    @cache
    def layer(module: str) -> int:
        return 1 + max((layer(dep) for dep in graph[module]), default=-1)

    table = "\n".join(
        ["| module | imports |", "| :--- | :--- |"]
        + [f"| `{m}.py` | {' '.join(f'`{d}`' for d in sorted(graph[m]))} |" for m in sorted(graph)]
    )
    top = max(layer(m) for m in graph)
    diagram = "\n".join(
        f"{n}  " + "   ".join(f"{m}.py" for m in sorted(graph) if layer(m) == n)
        for n in range(top, -1, -1)
    )
    text = ARCHITECTURE.read_text()
    marker = "<!-- import-table -->"
    before, _, after = text.split(marker)
    text = f"{before}{marker}\n{table}\n{marker}{after}"
    text = re.sub(
        r"(Layers \(a module imports only from layers below it[^\n]*\n\n```\n)(.*?)(\n```)",
        lambda m: m.group(1) + diagram + m.group(3), text, count=1, flags=re.S,
    )
    ARCHITECTURE.write_text(text)


if __name__ == "__main__":
    main()
