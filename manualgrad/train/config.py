"""The configuration of a training run: its fields and defaults (:class:`Config`), the model's
defaults for the fields left out (:func:`resolved`), and the refusal of values that cannot run
(:func:`validate`), in the fields' names (:class:`~manualgrad.train.errors.ConfigError`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manualgrad.nn import recurrent
from manualgrad.text import either
from manualgrad.train import data
from manualgrad.train import distributed as multiprocess  # `distributed` is also a Config field
from manualgrad.train.errors import ConfigError, literal
from manualgrad.train.models import DEFAULT_GROUPS, MODELS, NORMS, SEQUENCE_MODELS
from manualgrad.train.step import GRADS, OPTIMIZERS

DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 3e-3, "adamw": 1e-2}  # adamw: tuned on the GPT
# The fields left out (None) take the model's values; a model not named here takes "*"'s.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {"optimizer": "adam", "batch_size": 32, "epochs": 10},
    "gpt": {"optimizer": "adamw", "batch_size": 64, "epochs": 10},
    **{
        kind: {"optimizer": d.optimizer, "batch_size": d.batch_size, "lr": d.lr, "clip": d.clip, "epochs": d.epochs}
        for kind, d in recurrent.DEFAULTS.items()
    },
}
DTYPES = ("float32", "float64")
# The fields that must match for a resumed run to continue the same run.
RUN_DEFINING = (
    "model",
    "dataset",
    "optimizer",
    "lr",
    "batch_size",
    "seed",
    "dtype",
    "grad",
    "norm",
    "dropout",
    "groups",
    "clip",
)
# What every process of a multi-process run must agree on (multiprocess.agree), besides the step.
AGREED = (*RUN_DEFINING, "epochs", "devices", "checkpoint_every", "cross_check_batches")
ADDED_LATER = ("norm", "dropout", "groups", "clip")  # runs saved before these existed had their defaults
KEY_RANGE = 2**32  # the seeds jax.random.PRNGKey takes as they are: it wraps larger ones around silently
RUNS = Path("runs")  # where runs without an out folder get theirs, relative to the working directory


@dataclasses.dataclass(frozen=True)
class Config:
    """The arguments of ``manualgrad train``; see ``manualgrad train --help``."""

    model: str = "cnn"
    dataset: str = "digits"
    optimizer: str | None = None  # None: the model's (MODEL_DEFAULTS), as batch_size and epochs
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    seed: int = 0
    dtype: str = "float32"
    grad: str = "manual"
    norm: str = "none"
    dropout: float = 0.0
    groups: int | None = None
    clip: float | None = None
    out: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 0
    resume: str | None = None
    devices: int | None = None
    cross_check_batches: int = 3
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: str | None = None
    process_timeout: float = multiprocess.DEFAULT_TIMEOUT

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def resolved(config: Config) -> Config:
    """``config`` with the fields left out (``None``) set to the model's :data:`MODEL_DEFAULTS`."""
    defaults = MODEL_DEFAULTS.get(config.model, MODEL_DEFAULTS["*"])
    return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def acting(values: dict[str, Any], key: str) -> Any:
    """Field ``key`` of ``values`` (a :class:`Config` as a dict) as it acts: ``lr`` with its default
    filled in, ``groups`` too under group norm."""
    if key == "lr" and values["lr"] is None:
        return DEFAULT_LR[values["optimizer"]]
    if key == "groups" and values["groups"] is None and values["norm"] == "group":
        return DEFAULT_GROUPS
    return values[key]


def arguments(values: dict[str, Any], keys: Sequence[str]) -> dict[str, str]:
    """The fields ``keys`` of ``values`` as they act, as text (``lr`` ``"0.003"``); those that do not act
    (``groups`` without group norm) left out."""
    spelled = ((k, acting(values, k)) for k in keys)
    return {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in spelled if v is not None}


def described(values: dict[str, Any], keys: Sequence[str]) -> str:
    """:func:`arguments` as a part of a :class:`~manualgrad.train.errors.FieldMessage` template:
    ``{model} mlp {lr} 0.003``, which reads ``--model mlp --lr 0.003`` on the command line."""
    return " ".join(f"{{{k}}} {literal(v)}" for k, v in arguments(values, keys).items())


def validate(config: Config) -> None:
    """Raises :class:`~manualgrad.train.errors.ConfigError` naming the first field of ``config``
    (:func:`resolved`) whose value cannot run, or :class:`~manualgrad.train.distributed.DistributedError`."""
    _validate_choices(config)
    if config.epochs < 1 or config.batch_size < 1 or config.checkpoint_every < 0:
        raise ConfigError(
            "{epochs} and {batch_size} must be ≥ 1 and {checkpoint_every} ≥ 0 (got {e}, {b}, {c})",
            e=config.epochs,
            b=config.batch_size,
            c=config.checkpoint_every,
        )
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError("{lr} must be a finite number > 0, got {got:g}", got=config.lr)
    if not 0 <= config.seed < KEY_RANGE:
        raise ConfigError("{seed} must be an integer from 0 to {last}, got {got}", last=KEY_RANGE - 1, got=config.seed)
    if config.cross_check_batches < 0:
        raise ConfigError(
            "{cross_check_batches} must be ≥ 0 (0: no cross-check), got {got}", got=config.cross_check_batches
        )
    if config.clip is not None and not (math.isfinite(config.clip) and config.clip > 0):
        raise ConfigError(
            "{clip} must be a finite number > 0, the largest global gradient norm, got {got:g}", got=config.clip
        )
    _validate_regularisers(config)
    _validate_task(config)
    multiprocess.validate(config)
    if multiprocess.requested(config) and config.out is None and config.resume is None:
        raise ConfigError(
            "a multi-process run needs {out:DIR} (or {resume:DIR}), a folder every process sees at the same "
            "path: the default {runs}/<start time> would differ between processes",
            runs=RUNS,
        )


def _validate_choices(config: Config) -> None:
    """The fields that name one of a few choices: model, optimizer, grad, dtype, norm."""
    for field, choices in (
        ("model", MODELS),
        ("optimizer", OPTIMIZERS),
        ("grad", GRADS),
        ("dtype", DTYPES),
        ("norm", NORMS),
    ):
        value = getattr(config, field)
        if value not in choices:
            raise ConfigError(f"{{{field}}} must be {either(tuple(choices))}, got {{got!r}}", got=value)


def _is_sequence_spec(spec: str) -> bool:
    return spec == "words" or spec.startswith("text:")


def _validate_task(config: Config) -> None:
    """A sequence model on sequence data without norm or dropout, any other model on the other data."""
    if config.model in SEQUENCE_MODELS:
        if not _is_sequence_spec(config.dataset):
            raise ConfigError(
                "{model} {name} is a sequence model and needs {dataset} {specs}, got {got!r}",
                name=config.model,
                specs=either(data.SEQUENCE_SPECS),
                got=config.dataset,
            )
        if config.norm != "none" or config.dropout:
            raise ConfigError(
                "{norm} and {dropout} act on the hidden layers of cnn and mlp; {model} {name} takes neither"
                "{own}: drop them (got {norm} {n} {dropout} {d:g})",
                name=config.model,
                own=" (it has its own layer norms)" if config.model == "gpt" else "",
                n=config.norm,
                d=config.dropout,
            )
    elif _is_sequence_spec(config.dataset):
        raise ConfigError(
            "{dataset} {spec} is token sequences for a sequence model ({models}); {model} {name} classifies "
            "images or feature vectors",
            spec=config.dataset,
            models=either(tuple(SEQUENCE_MODELS)),
            name=config.model,
        )


def _validate_regularisers(config: Config) -> None:
    """Norm, groups and dropout: each in range, and only where it acts."""
    if not (math.isfinite(config.dropout) and 0 <= config.dropout < 1):
        raise ConfigError(
            "{dropout} must be a number in [0, 1), the probability of dropping a hidden unit, got {got:g}",
            got=config.dropout,
        )
    if config.groups is not None and config.norm != "group":
        raise ConfigError(
            "{groups} is the number of channel groups of {norm} group, and this run has {norm} {got}: "
            "drop {groups}, or give {norm} group",
            got=config.norm,
        )
    if config.groups is not None and config.groups < 1:
        raise ConfigError("{groups} must be ≥ 1, got {got}", got=config.groups)
    if config.norm == "batch" and config.batch_size < 2:
        raise ConfigError(
            "{norm} batch normalises every unit over the batch and needs {batch_size} ≥ 2, got {got}",
            got=config.batch_size,
        )
