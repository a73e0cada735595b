"""Gradescope autograder bundles: a zip that grades a submission's exercises with nothing fetched.

:func:`bundle` writes a zip with

* ``setup.sh``, which Gradescope runs once when it builds the grading image: it installs the
  bundled wheel of manualgrad (its dependencies, JAX and the rest, come from PyPI then);
* ``run_autograder``, which Gradescope runs for each submission: ``manualgrad grade --expect NAME
  ... --format gradescope`` (each NAME a rule or a network) on ``/autograder/submission/*.py``
  and ``*.ipynb``, each file in its own process under the time limit, into
  ``/autograder/results/results.json`` (the root is ``$AUTOGRADER_ROOT`` where that is set, for
  testing the bundle outside Gradescope);
* ``manualgrad-VERSION-py3-none-any.whl``, a wheel of the manualgrad that built the bundle
  (:func:`wheel`), so that grading runs the rules and checks the teacher ran;
* ``weights.json`` where weights are given.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import pathlib
import re
import shlex
import tomllib
import zipfile
from collections.abc import Sequence

import manualgrad
from manualgrad.errors import ManualgradError
from manualgrad.teach import results

WHEEL_TAG = "py3-none-any"
SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, building the image: Python and the bundled manualgrad wheel.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update && apt-get install -y python3 python3-pip
fi
python3 -m pip install ./{wheel} || python3 -m pip install --break-system-packages ./{wheel}
"""
RUN = """#!/usr/bin/env bash
# Gradescope runs this for each submission; it grades /autograder/submission into results.json.
# Grading runs the student's code: each file in its own process, killed after {timeout:g} s.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
RESULTS="$ROOT/results/results.json"
mkdir -p "$ROOT/results"
rm -f "$RESULTS"
cd "$ROOT/submission" || exit 1
shopt -s nullglob
python3 -m manualgrad grade --expect {rules} --format gradescope --out "$RESULTS" \\
    --timeout {timeout:g} --dtype {dtype}{weights} -- *.py *.ipynb
status=$?
if [ ! -f "$RESULTS" ]; then
    printf '{{"score": 0, "output": "the autograder stopped (status %s) before grading: tell your teacher"}}\\n' \\
        "$status" > "$RESULTS"
fi
exit 0
"""


class BundleError(ManualgradError, ValueError):
    """An autograder bundle that cannot be built."""


def bundle(
    rules: Sequence[str],
    out: str | pathlib.Path,
    *,
    weights: dict[str, float] | None = None,
    timeout: float = results.DEFAULT_TIMEOUT,
    dtype: str = "float64",
) -> list[str]:
    """Writes the autograder zip for the exercises of ``rules`` (rules' and networks' names) to
    ``out``; returns the names in it."""
    if not rules:
        raise BundleError("an autograder needs at least one RULE or --network NAME")
    if timeout <= 0:
        raise BundleError(f"the timeout must be a positive number of seconds, got {timeout:g}")
    wheel_name, wheel_bytes = wheel()
    weights_flag = ' --weights "$ROOT/source/weights.json"' if weights else ""
    run = RUN.format(rules=" ".join(map(shlex.quote, rules)), timeout=timeout, dtype=dtype, weights=weights_flag)
    files: dict[str, str | bytes] = {"setup.sh": SETUP.format(wheel=wheel_name), "run_autograder": run}
    if weights:
        files["weights.json"] = json.dumps(weights, indent=2) + "\n"
    files[wheel_name] = wheel_bytes
    with zipfile.ZipFile(out, "x", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100755 if name in ("setup.sh", "run_autograder") else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, content)
    return list(files)


def wheel() -> tuple[str, bytes]:
    """A wheel of the imported manualgrad package, built without a build backend: its Python files,
    and its metadata from the ``pyproject.toml`` beside it (a source checkout) or else from the
    installed distribution. Returns ``(file name, bytes)``."""
    package = pathlib.Path(manualgrad.__file__).resolve().parent
    metadata, version = _metadata(package.parent / "pyproject.toml")
    info = f"manualgrad-{version}.dist-info"
    entries = {
        f"manualgrad/{p.relative_to(package).as_posix()}": p.read_bytes()
        for p in sorted(package.rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    entries[f"{info}/METADATA"] = metadata.encode()
    entries[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: manualgrad autograder\nRoot-Is-Purelib: true\nTag: {WHEEL_TAG}\n"
    ).encode()
    entries[f"{info}/entry_points.txt"] = b"[console_scripts]\nmanualgrad = manualgrad.cli:main\n"
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in entries.items()]
    entries[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    return f"manualgrad-{version}-{WHEEL_TAG}.whl", _zip(entries)


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buffer.getvalue()


# A requirement of the teach extra in installed metadata, to be made unconditional.
_TEACH_EXTRA = r'^(Requires-Dist: [^;\n]+?)\s*;\s*extra == "teach"\s*$'


def _metadata(pyproject: pathlib.Path) -> tuple[str, str]:
    """``(METADATA text, version)``: from ``pyproject``'s ``[project]`` where it exists, else the
    installed one; the teach extra's requirements made unconditional either way."""
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        extras = project.get("optional-dependencies", {})
        lines = [
            "Metadata-Version: 2.1",
            f"Name: {project['name']}",
            f"Version: {project['version']}",
            f"Summary: {project.get('description', '')}",
            f"Requires-Python: {project.get('requires-python', '>=3')}",
            # The grader reads notebook submissions too: the teach extra's packages are its own.
            *(f"Requires-Dist: {d}" for d in [*project.get("dependencies", []), *extras.get("teach", [])]),
        ]
        return "\n".join(lines) + "\n", project["version"]
    try:
        distribution = importlib.metadata.distribution("manualgrad")
    except importlib.metadata.PackageNotFoundError:
        raise BundleError("manualgrad has neither a pyproject.toml beside it nor installed metadata") from None
    metadata = re.sub(_TEACH_EXTRA, r"\1", distribution.read_text("METADATA") or "", flags=re.M)
    return metadata, distribution.version
