"""The cross-checker. From the bottom up: :mod:`~manualgrad.check.errors` (what it refuses),
:mod:`~manualgrad.check.tolerances` (what counts as agreement, the relative errors),
:mod:`~manualgrad.check.trees` (pytree helpers), :mod:`~manualgrad.check.report` (findings),
:mod:`~manualgrad.check.comparison`, :mod:`~manualgrad.check.finite_differences`,
:mod:`~manualgrad.check.adjoint`, :mod:`~manualgrad.check.generic_mistakes` (the mistakes any rule
can make), :mod:`~manualgrad.check.diagnose`, :mod:`~manualgrad.check.targets` (what to check),
:mod:`~manualgrad.check.golden` (FlashAttention's criterion against a float64 golden),
:mod:`~manualgrad.check.autodiff` (one side's values of the autodiff checks),
:mod:`~manualgrad.check.own_dtype` (a function in its own dtype against the golden) and,
on top, :mod:`~manualgrad.check.checker` (:func:`check`, running the samples), with
:mod:`~manualgrad.check.processes` (the command's rules in several processes),
:mod:`~manualgrad.check.cache` and :mod:`~manualgrad.check.timing` beside it;
:mod:`~manualgrad.check.audit` checks every call of a rule inside any function, its report naming
them by :mod:`~manualgrad.check.sources`."""

from manualgrad.check.checker import check
from manualgrad.check.report import Finding, Report
from manualgrad.check.tolerances import CHECKS, TOLERANCES

__all__ = ["CHECKS", "TOLERANCES", "Finding", "Report", "check"]
