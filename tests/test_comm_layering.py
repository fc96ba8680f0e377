"""comm/ is the only package that talks to other ranks, and it imports nothing above it: every import of a
ds_grace module written anywhere in a comm/ file (module level or inside a function) stays in comm/ or
names a pure leaf module."""

from __future__ import annotations

import ast
from pathlib import Path

import ds_grace

PACKAGE = Path(ds_grace.__file__).resolve().parent
# modules that import no other ds_grace module: comm/ may use them
LEAF_MODULES = {"ds_grace.topology"}


def _ds_grace_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ds_grace import in `path`, relative imports resolved."""
    package = "ds_grace." + ".".join(path.relative_to(PACKAGE).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names = [f"{base}.{node.module}" if node.module else base]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "ds_grace" or name.startswith("ds_grace.")]
    return found


def test_leaf_modules_import_no_other_ds_grace_module():
    for module in LEAF_MODULES:
        path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
        assert _ds_grace_imports(path) == [], module


def test_comm_imports_nothing_above_it():
    files = sorted((PACKAGE / "comm").rglob("*.py"))
    assert len(files) > 5
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in files
        for line, name in _ds_grace_imports(path)
        if not name.startswith("ds_grace.comm") and name not in LEAF_MODULES
    ]
    assert upward == []


def test_the_check_sees_function_level_imports(tmp_path):
    comm = tmp_path / "ds_grace" / "comm"
    comm.mkdir(parents=True)
    probe = comm / "probe.py"
    probe.write_text("def f():\n    from ds_grace.fingerprint import x\n    from . import groups\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ds_grace"
    try:
        assert _ds_grace_imports(probe) == [(2, "ds_grace.fingerprint"), (3, "ds_grace.comm")]
    finally:
        PACKAGE = saved
