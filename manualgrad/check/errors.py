"""What the checker refuses or reports as a sentence, each a :class:`~manualgrad.errors.ManualgradError`."""

from manualgrad.errors import ManualgradError


class CheckError(ManualgradError, ValueError):
    """An argument of :func:`~manualgrad.check.check` or :func:`~manualgrad.check.audit.audit` that
    it cannot use (an unknown dtype or check, a count below one)."""


class CheckTypeError(CheckError, TypeError):
    """A target that :func:`~manualgrad.check.check` cannot check as given (a function without its
    reference and arguments)."""


class BackwardError(ManualgradError):
    """A hand backward broke its contract with ``custom_vjp`` in a way one plain sentence can say
    (it returned ``None``, used NumPy on a traced array, ...): reported as that sentence."""


class ReferenceFailed(ManualgradError):
    """A user's reference raised while being checked against; the message names it and the error."""
