"""The cross-checker (:mod:`~manualgrad.check.checker`) and the diagnoses of a wrong backward
(:mod:`~manualgrad.check.diagnose`)."""

from manualgrad.check.checker import CHECKS, TOLERANCES, Finding, Report, check

__all__ = ["CHECKS", "TOLERANCES", "Finding", "Report", "check"]
