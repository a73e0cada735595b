"""manualgrad: hand-derived backpropagation rules as ``jax.custom_vjp`` functions.

Every public rule is registered in :mod:`manualgrad.registry`; :func:`check` cross-checks
them against ``jax.grad`` of plain-``jnp`` references and against finite differences.

The rules are public here by their registered names (``mg.dense``, ``from manualgrad import
dense``): this module reads them from the registry, which is the one list of rules.
"""

# Importing manualgrad.rules registers every family, in the order of the registry and the README.
# The functions check and rules are imported after the subpackages of the same names: from here
# on, mg.check and mg.rules are the functions (import the subpackages' modules with
# ``from manualgrad.check import checker``, ``from manualgrad.rules import linear``).
import manualgrad.rules  # noqa: F401  # isort: skip
from manualgrad import registry, validation  # isort: skip
from manualgrad.check import Report, check  # isort: skip
from manualgrad.check.audit import audit  # isort: skip
from manualgrad.errors import ManualgradError, MissingExtraError  # isort: skip
from manualgrad.registry import Rule, Sample, get, register, rules  # isort: skip
from manualgrad.validation import RuleDTypeError, RuleInputError  # isort: skip

# What exercise files and notebooks call, public so that a file written today runs after an upgrade.
from manualgrad.teach.networks import values as network_values  # isort: skip
from manualgrad.teach.notebook import grade_here, grade_network_here  # isort: skip

globals().update({rule.name: rule.fn for rule in registry.rules()})

__all__ = [
    "ManualgradError",
    "MissingExtraError",
    "Report",
    "Rule",
    "RuleDTypeError",
    "RuleInputError",
    "Sample",
    "audit",
    "check",
    "get",
    "grade_here",
    "grade_network_here",
    "network_values",
    "register",
    "registry",
    "rules",
    "validation",
    *(rule.name for rule in registry.rules()),
]
