"""The folders show the data flow and every import points down it (issue 13)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lower rank = earlier in the data flow. A module may import its own rank or lower, never higher.
RANKS = {
    "kernels": 0,
    "farm.errors": 1, "farm.render": 1,
    "farm.measure": 2,
    "farm.cluster": 3, "farm.tables": 3, "farm.zoo": 3,
    "farm.sweep": 4,
    "farm.nightly": 5,
    "farm.bench": 6,
    "farm.cli": 7, "farm": 7,
    "jobs": 8,
}


def _rank(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return RANKS[".".join(parts[:n])]
    return None


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from farm.measure import stats" imports farm.measure.stats
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def upward_imports(root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for top in ("kernels", "farm", "jobs"):
        for path in sorted((root / top).rglob("*.py")):
            module = _module_name(path, root)
            own = _rank(module)
            for lineno, target in _imports(path, module):
                theirs = _rank(target)
                if theirs is not None and own is not None and theirs > own:
                    bad.append(f"{path.relative_to(root)}:{lineno} {module} imports {target}")
    return bad


def test_no_module_imports_up_the_data_flow():
    assert upward_imports() == []


def test_every_farm_module_is_in_a_stage():
    loose = [p.name for p in (ROOT / "farm").glob("*.py")
             if p.stem not in ("__init__", "cli", "errors", "render")]
    assert loose == []


def test_the_check_sees_upward_imports(tmp_path):
    for rel, src in {"kernels/table.py": "from farm.measure import store\n",
                     "farm/measure/store.py": "from ..sweep import spec\n",
                     "farm/sweep/spec.py": "import jobs.sweep\n",
                     "farm/tables/aggregate.py": "from farm.measure.store import host_name\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(src)
    assert [line.split()[0] for line in upward_imports(tmp_path)] == [
        "kernels/table.py:1", "farm/measure/store.py:1", "farm/sweep/spec.py:1"]
