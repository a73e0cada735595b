"""The base of every error manualgrad raises, so that a caller can catch the library's own refusals
apart from bugs: ``except manualgrad.ManualgradError``."""


class ManualgradError(Exception):
    """An input, file or setting that manualgrad refuses, said in one sentence that names the layer
    or command, the argument and what it expected. Subclasses keep the built-in type a caller would
    expect as a second base (a bad shape is still a ``ValueError``, a bad dtype a ``TypeError``)."""


class MissingExtraError(ManualgradError, ImportError):
    """An optional package that one command needs is not installed; the message names the extra
    that installs it."""
