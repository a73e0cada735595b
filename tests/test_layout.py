"""The package's house rules: subpackages by job, imports one way between them, no cycle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "manualgrad"

# What each part may import from manualgrad (besides itself); the README's layout section draws it.
# The foundation (errors, text, extras, validation) imports nothing of the package but errors, and
# every part may import it; runtime holds the process-wide settings that only the CLI applies.
FOUNDATION = {"errors", "text", "extras", "validation"}
ALLOWED = {
    "errors": set(),
    "text": set(),
    "extras": {"errors"},
    "validation": {"errors"},
    "runtime": {"errors"},
    "registry": FOUNDATION,
    "rules": {"registry"} | FOUNDATION,
    "check": {"rules", "registry"} | FOUNDATION,
    "teach": {"check", "rules", "registry"} | FOUNDATION,
    "nn": {"rules", "registry"} | FOUNDATION,
    "train": {"nn", "check", "rules", "registry"} | FOUNDATION,
    "bench": {"train", "nn", "check", "rules", "registry"} | FOUNDATION,
}
TOP_LEVEL = {
    "__init__.py",
    "__main__.py",
    "cli.py",
    "registry.py",
    *(f"{name}.py" for name in FOUNDATION),
    "runtime.py",
}


def _part(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: pathlib.Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if (
                pieces[0] == "manualgrad"
                and len(pieces) > 1
                and (PACKAGE / pieces[1]).is_dir() | (PACKAGE / f"{pieces[1]}.py").is_file()
            ):
                parts.add(pieces[1])
    return parts


def test_only_the_entry_points_and_the_registry_stay_at_the_top():
    assert {p.name for p in PACKAGE.glob("*.py")} <= TOP_LEVEL


def test_imports_run_one_way_between_the_parts():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        if part not in ALLOWED:  # __init__, __main__ and cli may import everything
            continue
        for imported in _imported_parts(path) - {part} - ALLOWED[part]:
            wrong.append(f"{path.relative_to(PACKAGE.parent)} imports manualgrad.{imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("manualgrad"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("manualgrad")}
        graph[name] = {t for t in targets if t in modules and t != name and not t.endswith("__init__")}
    graph = {n.removesuffix(".__init__"): {t.removesuffix(".__init__") for t in ts} for n, ts in graph.items()}

    def cycle_from(start, node, seen):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [start, node]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(start, nxt, seen)
                if found:
                    return found
        return None

    # Package __init__s re-export their modules; only cycles among the modules themselves count.
    modules_only = [n for n in graph if not (PACKAGE.parent / n.replace(".", "/")).is_dir()]
    cycles = [c for n in modules_only if (c := cycle_from(n, n, set()))]
    assert not cycles, cycles
