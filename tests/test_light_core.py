"""The light core: ``import manualgrad``, every rule, ``check`` and ``audit`` need none of the extras.

Each test runs a fresh interpreter in which the extras' packages cannot be imported (as on a
machine with ``pip install manualgrad`` alone), so a module that imports one at its top fails here.
"""

import subprocess
import sys
import textwrap

EXTRAS = ("matplotlib", "tqdm", "sklearn", "nbformat", "torch")

BLOCK = f"""
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, _NotInstalled())
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(script), *args], capture_output=True, text=True, timeout=300
    )


def test_the_rules_check_and_audit_run_without_any_extra():
    done = _run(
        """
        import jax, jax.numpy as jnp
        import manualgrad as mg

        rules = [r.name for r in mg.rules()]
        report = mg.check("dense")
        x = jnp.ones((2, 3)); w = jnp.ones((3, 4)) / 3
        audited = mg.audit(lambda x, w: jnp.sum(mg.relu(mg.dense(x, w))), x, w)
        loaded = sorted({m.split(".")[0] for m in sys.modules} & set(EXTRAS))
        print(len(rules), report.passed, audited.passed, loaded)
        """.replace("EXTRAS", repr(EXTRAS))
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, checked, audited, loaded = done.stdout.split(maxsplit=3)
    assert int(count) >= 31 and checked == "True" and audited == "True"
    assert loaded.strip() == "[]"
