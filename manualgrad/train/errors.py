"""The errors of ``manualgrad train``, in the library's words.

A message that names a :class:`~manualgrad.train.config.Config` field is kept as a template over
the field names (:class:`ConfigError`, :class:`Diverged`,
:class:`~manualgrad.train.distributed.DistributedError`): ``str(error)`` spells them as the
fields (``lr must be a finite number > 0, got nan``), and the command line spells them as its
flags (``--lr must be …``) through :meth:`FieldMessage.spelled`. :func:`literal` keeps a
value's braces out of such a template; :mod:`manualgrad.text` phrases lists and counts.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from manualgrad.errors import ManualgradError


def literal(text: object) -> str:
    """``text`` as a part of a :class:`FieldMessage` template: its braces doubled, so that they are not fields."""
    return str(text).replace("{", "{{").replace("}", "}}")


class FieldMessage(ManualgradError):
    r"""A message whose ``{name}`` placeholders are :class:`~manualgrad.train.config.Config` fields,
    except those given as ``values``: ``FieldMessage("{lr} must be > 0, got {got:g}", got=-1.0)``.

    A field's format spec is what its value looks like, for a command line to show after the flag:
    ``{out:DIR}`` reads ``out`` in ``str(error)`` and ``--out DIR`` in :meth:`spelled`\ ``(flag, metavars=True)``.
    """

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        named = (name for _, name, _, _ in string.Formatter().parse(template) if name)
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(n for n in named if n not in values))
        super().__init__(self.spelled(str))

    @property
    def field(self) -> str | None:
        """The first field the message names (the one it is about), ``None`` if it names none."""
        return self.fields[0] if self.fields else None

    def spelled(self, name: Callable[[str], str], *, metavars: bool = False) -> str:
        """The message with each field spelled ``name(field)`` (e.g. as a command-line flag), followed
        by what its value looks like where the template says and ``metavars`` asks for it."""
        spelling = {f: _Spelling(name(f), metavars) for f in self.fields}
        return self.template.format(**spelling, **self.values)


class _Spelling:
    """A field's name in a template, with its value's look after it when asked (``--out DIR``)."""

    def __init__(self, name: str, metavars: bool) -> None:
        self.name, self.metavars = name, metavars

    def __format__(self, metavar: str) -> str:
        return f"{self.name} {metavar}" if metavar and self.metavars else self.name


class TrainError(ManualgradError, ValueError):
    """A training run that cannot start or go on."""


class DataError(ManualgradError, ValueError):
    """A dataset cannot be loaded or batched as asked."""


class ConfigError(FieldMessage, TrainError):
    """A configuration that cannot run, naming the fields at fault (:attr:`fields`)."""


class Diverged(FieldMessage, RuntimeError):
    """The loss, the parameters or the optimizer state stopped being finite; nothing of that state was saved."""


class Interrupted(ManualgradError):
    """Ctrl-C: training stopped between two steps after checkpointing the state reached.

    ``arguments`` are the run-defining fields that differ from their defaults: what resuming in
    ``directory`` needs besides ``resume``.
    """

    def __init__(self, step: int, path: Path, directory: Path, arguments: dict[str, Any]) -> None:
        given = "".join(f", {k}={v!r}" for k, v in arguments.items())
        super().__init__(
            f"interrupted at step {step}; checkpoint saved to {path}; resume with resume={str(directory)!r}{given}"
        )
        self.step, self.path, self.directory, self.arguments = step, path, directory, arguments
