"""The package's shape: the library never touches the interface packages, functions stay short."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
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
    """Progress goes through callbacks (``certify(on_progress=)``, ``train(on_event=)``); only cli/ renders."""
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


# --- module names and the package facade ------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    """Dotted name of ``path`` under ``root``'s parent (``cpl_cert.cli.common``; a package's ``__init__`` is the package)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exported_names(tree: ast.Module) -> set[str]:
    """Public functions and classes a module defines at its top level, and the names of its ``__all__``."""
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names |= {elt.value for elt in getattr(node.value, "elts", []) if isinstance(elt, ast.Constant)}
    return {name for name in names if not name.startswith("_")}


def modules_named_after_exports(root: Path = PACKAGE) -> list[str]:
    """``"module: name"`` where a module exports a function or class under its own name (``certify.py`` exporting
    ``certify``: ``import pkg.certify`` would then mean two things), or a package exports a name that is also one
    of its submodules (``pkg.certify`` the function or the module, whichever was bound last)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        names = exported_names(ast.parse(path.read_text()))
        if path.name == "__init__.py":
            found += [f"{module_name(path, root)}: {name}" for name in sorted(names & submodule_names(path.parent))]
        elif path.stem in names:
            found.append(f"{module_name(path, root)}: {path.stem}")
    return found


def test_no_module_is_named_after_a_function_it_exports():
    assert modules_named_after_exports() == []


def test_the_module_name_check_sees_a_module_named_after_its_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "certify.py").write_text("def certify():\n    pass\n")
    (package / "predict.py").write_text("__all__ = ['predict']\nfrom .other import predict\n")
    (package / "result.py").write_text("def certify():\n    pass\n")  # not named after it: fine
    (package / "__init__.py").write_text("__all__ = ['result', 'sub', 'certify']\n")
    (package / "sub" / "__init__.py").write_text("")
    assert modules_named_after_exports(package) == [
        "pkg: certify", "pkg: result", "pkg: sub", "pkg.certify: certify", "pkg.predict: predict",
    ]


def submodule_names(folder: Path) -> set[str]:
    """The modules and subpackages directly inside ``folder``."""
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}


def resolved_imports(path: Path, root: Path) -> Iterator[tuple[int, list[list[str]], list[str]]]:
    """``(line, modules, names)`` for every import statement of ``path``: the modules it imports as absolute name
    parts (relative imports resolved against ``path``'s package) and the names a ``from`` import takes from them."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node.lineno, [alias.name.split(".") for alias in node.names], []
        elif isinstance(node, ast.ImportFrom):
            base = [] if node.level == 0 else package[: len(package) - node.level + 1]
            yield node.lineno, [[*base, *filter(None, (node.module or "").split("."))]], [alias.name for alias in node.names]


def facade_imports(root: Path = PACKAGE) -> list[str]:
    """``"module:line"`` for every import, inside the package, of a name the package facade (``root/__init__.py``)
    defines (``__version__``, a public name it loads lazily) or of the facade itself (``import cpl_cert``). Importing a
    submodule through it (``from . import conv64``) is importing that submodule, not the facade."""
    top, submodules = root.name, submodule_names(root)
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "__init__.py":
            continue
        for line, modules, names in resolved_imports(path, root):
            if [top] in modules and (not names or any(name not in submodules for name in names)):
                found.append(f"{module_name(path, root)}:{line}")
    return found


def test_nothing_inside_the_package_imports_the_package_facade():
    """The facade (``cpl_cert/__init__.py``) loads names lazily for users; code inside the package imports the module
    that defines a name (``from .version import __version__``), so that no import goes through it and none cycles back."""
    assert facade_imports() == []


def test_the_facade_check_sees_an_import_of_the_facade(tmp_path):
    package = tmp_path / "pkg"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '1'\n")
    (package / "conv.py").write_text("")
    (package / "a.py").write_text("from . import __version__\nfrom . import conv\nfrom .conv import x\n")
    (package / "cli" / "__init__.py").write_text("")
    (package / "cli" / "b.py").write_text("from .. import __version__\nfrom ..conv import x\nfrom . import c\n")
    (package / "cli" / "c.py").write_text("import pkg\nfrom pkg import certify\nfrom pkg.conv import y\nimport pkg.conv\n")
    assert facade_imports(package) == ["pkg.a:1", "pkg.cli.b:1", "pkg.cli.c:1", "pkg.cli.c:2"]


def test_public_names_are_the_functions_and_modules_are_modules():
    """DESIGN.md section 7's names are functions of the package (loaded lazily), and importing a module never rebinds them."""
    script = """
import importlib, inspect, sys, types
import cpl_cert
assert "torch" not in sys.modules  # the facade loads nothing until a name is used
for name in cpl_cert.__all__:
    getattr(cpl_cert, name)
for module in ("certification", "prediction", "freezing", "eps", "version"):
    assert isinstance(importlib.import_module("cpl_cert." + module), types.ModuleType)
for name in ("certify", "predict", "freeze", "parse_eps", "lipschitz_bounds", "load_checkpoint", "build_model", "save_checkpoint"):
    assert inspect.isfunction(getattr(cpl_cert, name)), name
assert cpl_cert.__version__ == importlib.import_module("cpl_cert.version").__version__
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def cli_imports(root: Path = PACKAGE) -> list[str]:
    """``"module:line"`` for every import of the command line (``root/cli``) by a library module: the library's numbers
    must not need the interface that prints them. ``__main__.py`` (``python -m cpl_cert``) is the command line's door."""
    cli = [root.name, "cli"]
    found = []
    for path in sorted(root.rglob("*.py")):
        if "cli" in path.relative_to(root).parts or path == root / "__main__.py":
            continue
        for line, modules, names in resolved_imports(path, root):
            targets = modules + [[*module, name] for module in modules for name in names]
            if any(target[:2] == cli for target in targets):
                found.append(f"{module_name(path, root)}:{line}")
    return found


def test_no_library_module_imports_the_command_line():
    assert cli_imports() == []


def test_the_command_line_check_sees_a_library_import_of_it(tmp_path):
    package = tmp_path / "pkg"
    (package / "cli").mkdir(parents=True)
    (package / "attacks").mkdir()
    for path in ("__init__.py", "cli/__init__.py", "cli/report.py", "attacks/__init__.py"):
        (package / path).write_text("")
    (package / "cli" / "c.py").write_text("from .report import x\nfrom .. import conv\n")  # the command line may import itself
    (package / "a.py").write_text("from .cli.report import rows\nfrom . import cli\nfrom .clinic import y\nimport pkg.cli\n")
    (package / "attacks" / "b.py").write_text("from ..cli import report\nfrom .. import conv\nfrom pkg.cli.report import z\n")
    assert cli_imports(package) == ["pkg.a:1", "pkg.a:2", "pkg.a:4", "pkg.attacks.b:1", "pkg.attacks.b:3"]


def stdlib_shadows(root: Path = PACKAGE) -> list[str]:
    """Modules named like a standard-library module (``io.py``, ``inspect.py``): a reader, or a tool run from the
    folder, takes one for the other."""
    return [module_name(path, root) for path in sorted(root.rglob("*.py")) if path.stem in sys.stdlib_module_names]


def test_no_module_shadows_the_standard_library():
    assert stdlib_shadows() == []


def test_the_shadow_check_sees_a_module_named_like_the_standard_library(tmp_path):
    package = tmp_path / "pkg"
    (package / "cli").mkdir(parents=True)
    for path in ("__init__.py", "io.py", "files.py", "cli/__init__.py", "cli/inspect.py", "cli/info.py"):
        (package / path).write_text("")
    assert stdlib_shadows(package) == ["pkg.cli.inspect", "pkg.io"]


# --- the map from modules to tests (tests/README.md) ----------------------------------------------------------
TESTS = Path(__file__).resolve().parent


def map_gaps(readme: Path = TESTS / "README.md", root: Path = PACKAGE) -> tuple[list[str], list[str]]:
    """Modules of ``root`` without a row in the map, and test files the map names that do not exist."""
    text = readme.read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    modules = {path.relative_to(root.parent).as_posix() for path in root.rglob("*.py")}
    named = set(re.findall(r"`(test_\w+\.py)`", text))
    return sorted(modules - rows), sorted(name for name in named if not (readme.parent / name).exists())


def test_every_module_has_a_row_in_the_test_map():
    assert map_gaps() == ([], [])


def test_the_map_check_sees_a_missing_module_and_a_missing_test(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for path in ("__init__.py", "a.py", "sub/__init__.py", "sub/b.py"):
        (package / path).write_text("")
    (tmp_path / "test_a.py").write_text("")
    readme = tmp_path / "README.md"
    readme.write_text("| module | tests |\n|---|---|\n| `pkg/__init__.py` | `test_a.py` |\n| `pkg/a.py` | `test_a.py`, `test_gone.py` |\n"
                      "| `pkg/sub/__init__.py` | `test_a.py` |\n")
    assert map_gaps(readme, package) == (["pkg/sub/b.py"], ["test_gone.py"])


def benchmark_imports(tests: Path = TESTS) -> list[str]:
    """Test files that reach into ``benchmarks/`` (a path to it put on ``sys.path``): tests exercise the package."""
    return sorted(
        path.name for path in tests.glob("*.py")
        if path != Path(__file__).resolve()
        and any(isinstance(node, ast.Constant) and node.value == "benchmarks" for node in ast.walk(ast.parse(path.read_text())))
    )


ALLOWED_BENCHMARK_IMPORTS = {"test_violation_campaign.py"}
"""Tests of a benchmark script itself (its resumption and exit code), not of the package."""


def test_tests_do_not_import_the_benchmarks():
    assert set(benchmark_imports()) - ALLOWED_BENCHMARK_IMPORTS == set()


def test_the_benchmark_check_sees_a_test_importing_a_benchmark(tmp_path):
    (tmp_path / "test_x.py").write_text('sys.path.insert(0, str(ROOT / "benchmarks"))\n')
    (tmp_path / "test_y.py").write_text('"""benchmarks/run.py does the same."""\n')
    assert benchmark_imports(tmp_path) == ["test_x.py"]
