"""The package's house rules: subpackages by job, imports one way between them, no cycle."""

import ast
import importlib
import inspect
import pathlib
import pkgutil

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "manualgrad"

# What each part may import from manualgrad (besides itself); the README's layout section draws it.
# The foundation (errors, text, extras, validation, user_code) imports nothing of the package but errors and text, and
# every part may import it; runtime holds the process-wide settings that only the CLI applies.
FOUNDATION = {"errors", "text", "extras", "validation", "user_code"}
ALLOWED = {
    "errors": set(),
    "text": set(),
    "extras": {"errors"},
    "validation": {"errors"},
    "user_code": {"errors", "text"},
    "runtime": {"errors"},
    "registry": FOUNDATION,
    "rules": {"registry"} | FOUNDATION,
    "check": {"rules", "registry"} | FOUNDATION,
    "teach": {"check", "rules", "registry"} | FOUNDATION,
    "nn": {"rules", "registry"} | FOUNDATION,
    "train": {"nn", "check", "rules", "registry"} | FOUNDATION,
    # the bench reports the process's runtime settings (which the CLI applies) beside its figures
    "bench": {"train", "nn", "check", "rules", "registry", "runtime"} | FOUNDATION,
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


def _modules():
    """Every module of the package, imported (``__main__`` runs the CLI, so it is left out)."""
    import manualgrad

    names = [m.name for m in pkgutil.walk_packages(manualgrad.__path__, "manualgrad.")]
    return [importlib.import_module(name) for name in names if not name.endswith("__main__")]


_PARTS = sorted({_part(path) for path in PACKAGE.rglob("*.py")} - {"__main__"})


@pytest.mark.parametrize("part", _PARTS)
def test_every_error_class_is_a_manualgrad_error(part):
    from manualgrad.errors import ManualgradError

    loose = [
        f"{cls.__module__}.{cls.__qualname__}"
        for module in _modules()
        if _part(pathlib.Path(module.__file__)) == part
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__
        if not issubclass(cls, ManualgradError)
    ]
    assert not loose, f"not manualgrad.ManualgradError subclasses: {loose}"


def test_the_public_rule_names_are_the_registrys():
    import manualgrad as mg
    from manualgrad import registry

    names = [rule.name for rule in registry.rules()]
    assert names and all(getattr(mg, name) is registry.get(name).fn for name in names)
    assert set(names) <= set(mg.__all__) and len(mg.__all__) == len(set(mg.__all__))
    public = {"check", "audit", "rules", "get", "Rule", "Sample", "register", "Report", "validation"}
    errors = {"ManualgradError", "MissingExtraError", "RuleInputError", "RuleDTypeError"}
    assert public | errors <= set(mg.__all__)
    assert all(hasattr(mg, name) for name in mg.__all__)
    assert issubclass(mg.RuleInputError, mg.ManualgradError) and issubclass(mg.RuleInputError, ValueError)
    assert issubclass(mg.RuleDTypeError, mg.ManualgradError) and issubclass(mg.RuleDTypeError, TypeError)
