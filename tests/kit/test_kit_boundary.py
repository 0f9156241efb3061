"""The kit is built on by the services and knows none of them: no module under
shared/runops/kit/ imports a `services` module or names one in a string (importlib, entry
points, `python -m` targets). The services list lives at `runops.registry`, outside the kit."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import runops.kit

KIT = Path(runops.kit.__file__).parent
# "services", "services.x" or "services/x" as a name (not "_services.x", not prose's "services.").
_NAMED = re.compile(r"^services$|(?<![\w.])services[./][A-Za-z_]")


def _service_references(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        found += [f"{path.name}:{node.lineno}: {n!r}" for n in names if _NAMED.search(n)]  # type: ignore[attr-defined]
    return found


def test_no_kit_module_imports_or_names_a_service_module() -> None:
    modules = sorted(KIT.rglob("*.py"))
    assert modules, f"no kit modules found under {KIT}"
    found = [ref for path in modules for ref in _service_references(path)]
    assert found == [], "the kit must not import or name services.*:\n" + "\n".join(found)


def test_the_check_catches_imports_and_names(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import services.mollifier\n"
        "from services.ingest import app\n"
        "x = importlib.import_module('services.runstore.settings')\n"
        "y = find_spec('services')\n"
        "self._services.append(1)\n"
        "z = 'grpc_services.x'\n"
        '"""Calls between services. Other services: none."""\n'
    )
    assert len(_service_references(sample)) == 4
