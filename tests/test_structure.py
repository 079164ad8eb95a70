"""The package's shape: the library never touches the interface packages, functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cpl_cert"
INTERFACE = ("typer", "rich", "matplotlib", "click")
MAX_FUNCTION_LINES = 60
"""Lines of a function's body (docstring included, signature excluded)."""


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts)


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of every module imported anywhere in ``tree`` (inside functions too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_interface_package():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(imported_modules(ast.parse(path.read_text())) & set(INTERFACE))
        for path in library_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 30  # the scan did see the library


def test_library_never_prints():
    """Progress goes through callbacks (``certify(progress=)``, ``train(on_event=)``); only cli/ renders."""
    calls = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in library_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert calls == []


def test_library_imports_with_the_interface_packages_blocked():
    """Every library module imports with typer, rich, matplotlib and click unimportable, and pulls none of them in."""
    modules = [".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__") for p in library_files()]
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {INTERFACE!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import importlib
for name in {[m for m in modules if not m.endswith("__main__")]!r}:
    importlib.import_module(name)
assert not any(m.split(".")[0] in {INTERFACE!r} for m in sys.modules), sorted(sys.modules)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


ALLOWED_LONG: set[str] = set()
"""Functions allowed over the limit (none)."""


def long_functions(path: Path, root: Path = PACKAGE) -> list[str]:
    """``"file name (n lines)"`` for each function in ``path`` whose body exceeds the limit."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.body[0].lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(root)} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    found = [f for path in sorted(PACKAGE.rglob("*.py")) for f in long_functions(path)]
    assert [f for f in found if f.rsplit(" (", 1)[0] not in ALLOWED_LONG] == []


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    (tmp_path / "long.py").write_text(f"def f(\n    a,\n):\n    \"\"\"Doc.\"\"\"\n{body}\n")
    assert long_functions(tmp_path / "long.py", tmp_path) == ["long.py f (62 lines)"]
