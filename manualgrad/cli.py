"""The ``manualgrad`` command line: ``check``, ``audit``, ``explain``, ``exercise``, ``grade``,
``autograder``, ``train``, ``launch`` and ``bench`` (``manualgrad COMMAND --help`` describes each).

The only module that speaks of flags: a library error names a setting in the library's words, and
:func:`main` prints it as one line, the setting spelled as its flag. Exit status: 0 when everything
passed, 1 when a check, grade or audit failed (or training diverged), 2 for input a command cannot
use, 130 after Ctrl-C, and 141 (as if killed by SIGPIPE) for output into a pipe whose reader has
closed (``manualgrad check --json | head -1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import manualgrad
from manualgrad import registry, runtime, user_code
from manualgrad.bench import bench
from manualgrad.check import cache, checker, processes
from manualgrad.errors import ManualgradError
from manualgrad.text import counted, either, first_line, plain
from manualgrad.train import config, data, distributed, errors, loop, models, step
from manualgrad.train.errors import FieldMessage


def _refuse(command: str, message: str) -> int:
    """Prints ``manualgrad COMMAND: MESSAGE`` on stderr; returns 2, the status of a refused command line."""
    print(f"manualgrad {command}: {message}", file=sys.stderr)
    return 2


def _refuse_unknown_rules(command: str, names: Sequence[str], what: str = "rule", networks: Sequence[str] = ()) -> bool:
    """Prints ``manualgrad COMMAND: unknown WHAT NAMES; registered: ...``; True if a name is not a
    registered rule (nor one of ``networks``, where given)."""
    known = [r.name for r in registry.rules()]
    unknown = [n for n in names if n not in known and n not in networks]
    if unknown:
        also = f"; networks: {', '.join(networks)}" if networks else ""
        print(
            f"manualgrad {command}: unknown {what} {', '.join(unknown)}; registered: {', '.join(known)}{also}",
            file=sys.stderr,
        )
    return bool(unknown)


def _refuse_unknown_networks(command: str, names: Sequence[str]) -> bool:
    """Prints ``manualgrad COMMAND: unknown network NAMES; known: ...``; True if a name is not a network."""
    from manualgrad.teach import networks

    unknown = [n for n in names if n not in networks.NETWORKS]
    if unknown:
        print(
            f"manualgrad {command}: unknown network {', '.join(unknown)}; known: {', '.join(networks.NETWORKS)}",
            file=sys.stderr,
        )
    return bool(unknown)


def _check(args: argparse.Namespace) -> int:
    if args.rules and ":" in args.rules[0]:
        return _check_function(args)
    if args.reference or args.args:
        return _refuse("check", "--reference and --args go with a FILE.py:FUNCTION to check, not with rules")
    names = args.rules or [r.name for r in registry.rules()]
    if _refuse_unknown_rules("check", names, "rule(s)"):
        return 2
    dtype = args.dtype or "float64"
    with cache.command_settings(not args.no_cache) as cached_in:
        report = processes.check(names, dtype=dtype, cache_dir=cached_in)
    where = f"programs cached in {cached_in}" if cached_in else "no compilation cache"
    heading = f"manualgrad check: {counted(len(names), 'rule')}, dtype {dtype}, {where}; worst relative error per check"
    return _print_check(args, report, heading)


def _check_function(args: argparse.Namespace) -> int:
    """``manualgrad check FILE.py:FN --reference FILE.py:REF --args FILE.py:ARGS``: FN against REF at ARGS()."""
    if len(args.rules) > 1:
        return _refuse("check", f"give one FILE.py:FUNCTION to check, got {len(args.rules)}: {' '.join(args.rules)}")
    if not args.reference or not args.args:
        return _refuse("check", "a FILE.py:FUNCTION needs --reference FILE.py:REFERENCE and --args FILE.py:ARGUMENTS")
    modules: dict[str, Any] = {}
    try:
        fn = user_code.function(args.rules[0], "to check", modules)[1]
        reference = user_code.function(args.reference, "as the reference (--reference)", modules)[1]
        make = user_code.function(args.args, f"returning the arguments of {args.rules[0]} (--args)", modules)[1]
    except user_code.UserCodeError as error:
        return _refuse("check", str(error))
    try:
        values = user_code.arguments(make, args.rules[0])
    except Exception as error:  # the user's code: its error in one line, the check never began
        return _refuse("check", f"{args.args}(): {type(error).__name__}: {first_line(error)}")
    report = manualgrad.check(fn, reference=reference, args=values, dtype=args.dtype)
    return _print_check(
        args, report, f"manualgrad check: {args.rules[0]} against {args.reference}, dtype {report.dtype}"
    )


def _print_check(args: argparse.Namespace, report: Any, heading: str) -> int:
    """The report as JSON records or as text; exit 0 if it passed, 1 if not."""
    lines = [json.dumps(record) for record in report.records()] if args.json else [report.text(heading)]
    print("\n".join(lines))
    return 0 if report.passed else 1


def _bench(args: argparse.Namespace) -> int:
    settings = bench.QUICK if args.quick else bench.Settings()
    chosen = {"repeats": args.repeats, "compile_repeats": args.compile_repeats, "matmul_size": args.matmul_size}
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    if args.models:
        settings = dataclasses.replace(settings, models=tuple(m for m in args.models.split(",") if m))
    if args.no_peers:
        settings = dataclasses.replace(settings, peers=False)
    if args.check_rules is not None:
        settings = dataclasses.replace(settings, check_rules=tuple(args.check_rules))
    if args.no_check:
        settings = dataclasses.replace(settings, check_rules=None)
    unknown = [m for m in settings.models if m not in bench.MODELS]
    if unknown or not settings.models:
        print(
            f"manualgrad bench: --models: unknown model(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(bench.MODELS)}",
            file=sys.stderr,
        )
        return 2
    if settings.check_rules and _refuse_unknown_rules("bench: --check-rules", settings.check_rules, "rule(s)"):
        return 2
    if min(settings.repeats, settings.compile_repeats, settings.matmul_n()) < 1:
        return _refuse("bench", "--repeats, --compile-repeats and --matmul-size must be ≥ 1")
    progress = None if args.json else (lambda line: print(f"  measuring {line}", file=sys.stderr, flush=True))
    result = bench.run(settings, progress)
    print(bench.to_json(result) if args.json else bench.table(result))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from manualgrad.teach import explain

    if args.list:
        print(explain.rule_list())
        return 0
    if args.rule is None:
        return _refuse("explain", "give a RULE or --list")
    if _refuse_unknown_rules("explain", [args.rule]):
        return 2
    print(explain.explain(args.rule))
    return 0


def _exercise(args: argparse.Namespace) -> int:
    from manualgrad.teach import exercise, networks, notebook

    if (args.rule is None) == (args.network is None):
        return _refuse("exercise", "give a RULE or --network NAME (one of them)")
    if (
        _refuse_unknown_rules("exercise", [args.rule])
        if args.rule
        else _refuse_unknown_networks("exercise", [args.network])
    ):
        return 2
    name = args.rule or args.network
    out = pathlib.Path(args.out or f"{name}_exercise.{'ipynb' if args.notebook else 'py'}")
    if out.exists():
        return _refuse("exercise", f"{out} exists; remove it or choose another --out FILE")
    try:
        if args.notebook:
            (notebook.write_network if args.network else notebook.write)(name, out)
        else:
            out.write_text(networks.exercise_text(name) if args.network else exercise.exercise(name))
    except OSError as error:
        return _refuse("exercise", f"cannot write {out}: {error.strerror}")
    then = "run its last cell, or" if args.notebook else "then run"
    print(f"wrote {out}: write its backward, {then} `manualgrad grade {out}`")
    return 0


def _grade_settings(args: argparse.Namespace) -> dict[str, float] | None:
    """The weights, after refusing a bad command line with one line on stderr (``None``)."""
    from manualgrad.teach import grading, networks, results

    def refuse(message: str) -> None:
        print(f"manualgrad grade: {message}", file=sys.stderr)

    if not args.files and not args.expect:
        return refuse("give the FILEs to grade (or --expect RULE ... for an autograder run)")
    if args.expect and _refuse_unknown_rules("grade: --expect", args.expect, networks=list(networks.NETWORKS)):
        return None
    if args.in_process and args.timeout is not None:
        return refuse("--in-process grades without a time limit: give --timeout or --in-process, not both")
    if args.timeout is not None and args.timeout <= 0:
        return refuse(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.out and args.format == "text":
        return refuse("--out writes a document: give --format gradescope, json or junit")
    if args.out and pathlib.Path(args.out).exists():
        return refuse(f"{args.out} exists; remove it or choose another --out FILE")
    try:
        weights = results.load_weights(args.weights) if args.weights else {}
    except results.WeightsError as error:
        return refuse(f"--weights: {error}")
    unknown = sorted(set(weights) - grading.test_names())
    if unknown:
        return refuse(
            f"--weights: {', '.join(map(repr, unknown))} name no rule, network or test of one "
            "(RULE: CHECK, NETWORK: dNAME)"
        )
    return weights


def _grade(args: argparse.Namespace) -> int:
    from manualgrad.teach import grading, results

    weights = _grade_settings(args)
    if weights is None:
        return 2
    files = args.files
    if args.expect:
        files = [f for f in args.files if grading.rule_name(f) in args.expect]
        for f in sorted(set(args.files) - set(files)):
            print(f"ignored {f}: not an exercise for {', '.join(args.expect)}")
    if args.in_process:
        graded = [grading.grade_file(f, args.dtype) for f in files]
    else:
        graded = grading.grade_files(files, args.dtype, args.timeout or results.DEFAULT_TIMEOUT)
    graded += [grading.missing(rule) for rule in args.expect if rule not in {r.rule for r in graded}]
    if args.format == "text" or args.out:
        for result in graded:
            if result.status == results.ERROR and not args.expect:
                print(f"manualgrad grade: {result.rows[0].output}", file=sys.stderr)
            else:
                print(result.report)
        if len(graded) > 1:
            print(results.summary(graded, weights))
    if args.format != "text":
        document = results.document(graded, args.format, weights, args.dtype)
        if not args.out:
            print(document, end="")
        else:
            try:
                pathlib.Path(args.out).write_text(document)
            except OSError as error:
                return _refuse("grade", f"cannot write {args.out}: {error.strerror}")
            print(f"wrote {args.out} ({args.format})")
    if any(r.status == results.ERROR for r in graded) and not args.expect:
        return 2
    return 0 if all(r.passed for r in graded) else 1


def _autograder(args: argparse.Namespace) -> int:
    from manualgrad.teach import autograder, results

    if not args.rules and not args.networks:
        return _refuse("autograder", "give the RULEs (or --network NAME) a submission must contain")
    if _refuse_unknown_rules("autograder", args.rules) or _refuse_unknown_networks("autograder", args.networks):
        return 2
    out = pathlib.Path(args.out)
    if out.exists():
        return _refuse("autograder", f"{out} exists; remove it or choose another --out FILE")
    try:
        weights = results.load_weights(args.weights) if args.weights else None
        exercises = [*args.rules, *args.networks]
        names = autograder.bundle(exercises, out, weights=weights, timeout=args.timeout, dtype=args.dtype)
    except (results.WeightsError, autograder.BundleError) as error:
        return _refuse("autograder", str(error))
    except OSError as error:
        return _refuse("autograder", f"cannot write {out}: {error.strerror}")
    print(f"wrote {out}: {', '.join(names)}; upload it as a Gradescope autograder (Ubuntu, Python 3)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    try:
        module, fn = user_code.function(args.target, "to audit", {})
    except user_code.UserCodeError as error:
        return _refuse("audit", str(error))
    file, name = args.target.rpartition(":")[::2]
    make, given = getattr(module, args.args, None), getattr(module, args.references or "audit_references", None)
    if not callable(make):
        return _refuse("audit", f"{file} defines no function {args.args} returning the arguments of {name} (--args)")
    if args.references and not callable(given):
        return _refuse("audit", f"{file} defines no function {args.references} returning references (--references)")
    try:
        references = given() if callable(given) else None
        report = manualgrad.audit(fn, *user_code.arguments(make, name), seed=args.seed, references=references)
    except Exception as error:  # the user's code: its error in one line, the audit never began
        return _refuse("audit", f"{file}:{name} with {args.args}(): {type(error).__name__}: {first_line(error)}")
    print(report.text())
    return 0 if report.passed else 1


def _train(args: argparse.Namespace) -> int:
    configuration = config.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config.Config)})
    try:
        summary = loop.train(configuration)
    except errors.Diverged as error:
        print(f"manualgrad train: {_refusal(error)}", file=sys.stderr)
        return 1
    except errors.Interrupted as error:
        given = "".join(f" {_flag(k)} {v}" for k, v in error.arguments.items())
        print(
            f"manualgrad train: interrupted at step {error.step}; checkpoint saved to {error.path}; "
            f"resume with --resume {error.directory}{given}",
            file=sys.stderr,
        )
        return INTERRUPTED
    except KeyboardInterrupt:  # outside the steps (loading, compiling, plot, cross-check) or a second Ctrl-C
        print("manualgrad train: interrupted; the checkpoints written so far are kept", file=sys.stderr)
        return INTERRUPTED
    if summary["process"] != distributed.WRITER:
        print(f"process {summary['process']} of {summary['processes']} done; process 0 wrote the run's files")
        return 0
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    """What ``manualgrad train`` prints once the run is done."""
    on = f"{counted(summary['devices'], 'device')} of {counted(summary['processes'], 'process', 'processes')}"
    print(
        f"test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f} after "
        f"{counted(int(summary['epoch']), 'epoch')} ({counted(summary['steps'], 'step')} on {on}) "
        f"in {summary['seconds']:.1f} s ({summary['steps_per_second']:.1f} steps/s)"
    )
    error, batches = summary["cross_check_max_relative_error"], summary["cross_check_batches"]
    if error is None:
        print("no cross-check of the hand-rule gradient (--cross-check-batches 0)")
    else:
        where = f"on {counted(batches, 'batch', 'batches')}: max relative error {error:.1e}"
        nan = "" if math.isfinite(error) else " (a gradient has NaN or ∞ entries)"
        print(f"hand-rule gradient vs jax.grad of the references {where}{nan}")
    if summary["samples"] is not None:
        print(f"{counted(len(summary['samples']), 'sample')} from the model: {' '.join(summary['samples'])}")
    latest = f"; {summary['latest']} names {summary['directory']}" if summary["latest"] else ""
    samples = f", {pathlib.Path(summary['directory']) / 'samples.txt'}" if summary["samples"] is not None else ""
    print(f"wrote {summary['metrics']}, {summary['curves']}{samples}, {summary['checkpoint']}{latest}")


def _launch(args: argparse.Namespace) -> int:
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    return distributed.launch(args.processes, arguments)


class _Formatter(argparse.HelpFormatter):
    """argparse's help with reST markup shown plainly (:func:`manualgrad.text.plain`)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))


class _Parser(argparse.ArgumentParser):
    """A parser whose refusals are one line, ``manualgrad COMMAND: --flag must be …``, exit 2, no usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            flag = "/".join(action.option_strings) or action.metavar or action.dest
            choices = either([str(c) for c in action.choices])
            raise argparse.ArgumentError(None, f"{flag} must be {choices}, got {value!r}")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


Option = tuple[tuple[str, ...], dict[str, Any]]  # add_argument's names and keywords


def _option(*names: str, help: str | None = None, **keywords: Any) -> Option:
    """``parser.add_argument(*names, help=help, **keywords)``, to be added by :func:`_add_options`."""
    return names, {"help": help, **keywords}


def _command(commands: argparse._SubParsersAction, run: Callable, help: str, *options: Option) -> _Parser:
    """The sub-parser of the command that ``run`` (``_NAME``) runs, with ``options``."""
    parser = commands.add_parser(run.__name__.strip("_"), help=help, description=help)
    _add_options(parser, *options)
    parser.set_defaults(run=run)
    return parser


def _add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *options: Option) -> None:
    for names, keywords in options:
        parser.add_argument(*names, **keywords)


_DTYPE = _option("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
_POINTS = 'JSON points: {"RULE": points, "RULE: CHECK": points, "NETWORK: dNAME": points} (default 1 a test)'


def _add_teaching(commands: argparse._SubParsersAction) -> None:
    """explain, exercise, grade and autograder."""
    from manualgrad.teach import networks, results

    whole = f"a whole network instead, the gradient of every intermediate: {', '.join(networks.NETWORKS)}"
    trusted = "grade in this process, one file after another, with no time limit: only for code you trust"
    expect = "grade the FILEs for these rules or networks only; one with no file fails (autograder runs)"
    timeout = f"a submission still running after this fails (default {results.DEFAULT_TIMEOUT:g})"
    where = "where to write it (default: NAME_exercise.py or .ipynb)"
    _command(commands, _explain, "a rule's derivation, its seed, and a live numeric check",
             _option("rule", nargs="?", metavar="RULE", help="the rule to explain"),
             _option("--list", action="store_true", help="list the rules"))  # fmt: skip
    _command(commands, _exercise, "write a rule's exercise: forward, derivation up to the result, empty backward",
             _option("rule", nargs="?", metavar="RULE", help="the rule to practise"),
             _option("--network", metavar="NAME", help=whole),
             _option("--notebook", action="store_true", help="write a Jupyter notebook (.ipynb) that grades in place"),
             _option("--out", metavar="FILE", help=where))  # fmt: skip
    _command(commands, _grade, "grade exercise files' backwards with every check, each in its own process, and "
             "diagnose them",
             _option("files", nargs="*", metavar="FILE", help="files or notebooks written by `manualgrad exercise`"),
             _DTYPE,
             _option("--format", choices=results.FORMATS, default="text", help="text, or a document (see --out)"),
             _option("--out", metavar="FILE", help="write the --format document here (default: stdout)"),
             _option("--weights", metavar="FILE", help=_POINTS),
             _option("--timeout", type=float, metavar="SECONDS", help=timeout),
             _option("--in-process", action="store_true", help=trusted),
             _option("--expect", nargs="+", default=[], metavar="NAME", help=expect))  # fmt: skip
    _command(commands, _autograder, "build a Gradescope autograder bundle (.zip) for rules' and networks' exercises",
             _option("rules", nargs="*", metavar="RULE", help="the rule exercises a submission must contain"),
             _option("--network", dest="networks", action="append", default=[], metavar="NAME",
                     help="a network exercise a submission must contain (repeat for more)"),
             _option("--out", metavar="FILE", default="autograder.zip", help="the bundle (default: autograder.zip)"),
             _option("--weights", metavar="FILE", help="JSON points, as for `manualgrad grade`"),
             _option("--timeout", type=float, default=results.DEFAULT_TIMEOUT, metavar="SECONDS"),
             _DTYPE)  # fmt: skip


def _add_checking(commands: argparse._SubParsersAction) -> None:
    """check and audit."""
    no_cache = f"compile every program afresh: no persistent compilation cache (also {cache.OFF_VARIABLE}=1)"
    returns = "the function in FILE that returns FUNCTION's arguments as a tuple (default: audit_args)"
    own = (
        "float64 or float32: cast to it, in 64-bit mode (default for rules: float64; for a FILE.py:FUNCTION: its "
        "arguments' own dtypes, judged against a float64 golden of the reference)"
    )
    _command(commands, _check, "cross-check hand rules against jax.grad and finite differences, or a function (a "
             "kernel) against its reference in its own dtype",
             _option("rules", nargs="*", metavar="RULE", help="rules to check (default: all), or one FILE.py:FUNCTION"),
             _option("--reference", metavar="FILE.py:REFERENCE", help="the plain reference of FILE.py:FUNCTION"),
             _option("--args", metavar="FILE.py:ARGUMENTS", help="a function returning FILE.py:FUNCTION's arguments "
                     "as a tuple"),
             _option("--dtype", choices=sorted(checker.TOLERANCES), help=own),
             _option("--json", action="store_true", help="one JSON record per rule and check (a function's: both "
                     "errors and their ratio per argument)"),
             _option("--no-cache", action="store_true", help=no_cache))  # fmt: skip
    _command(commands, _audit, "check every custom_vjp inside a function at the values it receives there (no "
             "reference needed)",
             _option("target", metavar="FILE:FUNCTION", help="the function to audit, e.g. model.py:loss"),
             _option("--args", default="audit_args", metavar="NAME", help=returns),
             _option("--references", metavar="NAME", help="the function in FILE that returns {custom_vjp function or "
                     "its name: its plain reference}, those call sites judged against a float64 golden in their own "
                     "dtype (default: audit_references, where FILE defines it)"),
             _option("--seed", type=int, default=0, help="the random output cotangents"))  # fmt: skip


_TRAIN_DEFAULTS = config.Config()
_BY_MODEL = "default: the model's (see --optimizer)"
_MODEL_DEFAULTS = "; ".join(
    f"{'other models' if name == '*' else name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in given.items())
    for name, given in config.MODEL_DEFAULTS.items()
)


def _field(flag: str, help: str | None = None, **keywords: Any) -> Option:
    """A training flag, whose default is its :class:`~manualgrad.train.config.Config` field's."""
    default = getattr(_TRAIN_DEFAULTS, flag.removeprefix("--").replace("-", "_"))
    return _option(flag, help=help, **({} if "action" in keywords else {"default": default}), **keywords)


_TRAIN_OPTIONS = (
    _field("--model", choices=tuple(models.MODELS)),
    _field("--dataset", metavar="|".join((*data.SPECS, *data.SEQUENCE_SPECS))),
    _field("--optimizer", f"default: the model's ({_MODEL_DEFAULTS}); adamw warms up, then decays as a cosine over "
           "the run", choices=tuple(step.OPTIMIZERS)),
    _field("--lr", "learning rate (default: sgd 0.1, momentum 0.05, adam 3e-3, adamw 1e-2, its peak)", type=float),
    _field("--batch-size", _BY_MODEL, type=int),
    _field("--epochs", _BY_MODEL, type=int),
    _field("--clip", "scale each gradient down to global norm NORM if larger (optax.clip_by_global_norm; default: "
           "the model's, see --optimizer; none for the others)", type=float, metavar="NORM"),
    _field("--seed", "initialisation, split and data order", type=int),
    _field("--dtype", choices=config.DTYPES),
    _field("--grad", "hand rules, or jax.grad of the same model built from the references", choices=step.GRADS),
    _field("--norm", "normalisation after every hidden conv and dense layer, before its ReLU (batch: running "
           "statistics)", choices=tuple(models.NORMS)),
    _field("--groups", f"channel groups of --norm group (default {models.DEFAULT_GROUPS}; must divide every width)",
           type=int, metavar="G"),
    _field("--dropout", "inverted dropout after every dense hidden ReLU while training, in [0, 1) (default 0: "
           "none)", type=float, metavar="RATE"),
    _field("--out", "metrics.csv, curves.png, checkpoints (default: a new folder runs/<start time>, named by "
           "runs/latest); refused if DIR holds a run, unless --overwrite or --resume DIR", metavar="DIR"),
    _field("--overwrite", "with --out DIR: delete the run DIR holds first", action="store_true"),
    _field("--checkpoint-every", "also checkpoint every N steps (always at the end of each epoch)", type=int,
           metavar="N"),
    _field("--resume", "continue the run checkpointed in DIR, in DIR (give the run's arguments again)", metavar="DIR"),
    _field("--devices", "shard each batch over N local devices (default: all)", type=int, metavar="N"),
    _field("--cross-check-batches", "batches for the final hand-rule vs jax.grad check (0: none)", type=int,
           metavar="N"),
)  # fmt: skip
_DISTRIBUTED_OPTIONS = (
    _field("--coordinator", "process 0's address, the same for all", metavar="HOST:PORT"),
    _field("--num-processes", "processes in the run", type=int, metavar="N"),
    _field("--process-id", "this process, 0 to N-1", type=int, metavar="I"),
    _field("--distributed", "detect the three above under SLURM, Open MPI, Kubernetes (auto) or through mpi4py",
           choices=tuple(distributed.DETECTIONS)),
    _field("--process-timeout", "wait this long for the others to join, for a silent process's heartbeat and at "
           f"exit; then stop with an error (default {_TRAIN_DEFAULTS.process_timeout:g})", type=float,
           metavar="SECONDS"),
)  # fmt: skip


def _add_training(commands: argparse._SubParsersAction) -> None:
    """train and launch."""
    train = _command(commands, _train, "train a model on the hand rules (jitted, optax, checkpoints, many devices)",
                     *_TRAIN_OPTIONS)  # fmt: skip
    group = train.add_argument_group(
        "several processes (jax.distributed; one per host, --batch-size is the global batch, process 0 writes)"
    )
    _add_options(group, *_DISTRIBUTED_OPTIONS)
    _command(commands, _launch, "run `train ARGS` as N processes of one jax.distributed run on this machine",
             _option("--processes", type=int, required=True, metavar="N", help="processes to start"),
             _option("arguments", nargs=argparse.REMAINDER, metavar="-- train ARGS",
                     help="the command every process runs"))  # fmt: skip


def _add_bench(commands: argparse._SubParsersAction) -> None:
    settings = bench.Settings
    _command(commands, _bench, "hand rules vs jax.grad, NumPy and PyTorch: step time, compile time, memory, "
             "FLOP/s, check time",
             _option("--models", metavar="M1,M2", help=f"comma-separated, from: {', '.join(bench.MODELS)} (default: "
                     "all)"),
             _option("--repeats", type=int, help=f"interleaved timed repetitions per model ({settings.repeats})"),
             _option("--compile-repeats", type=int, help=f"interleaved compilations per side "
                     f"({settings.compile_repeats})"),
             _option("--matmul-size", type=int, metavar="N", help="side of the float32 matmul that measures the "
                     "peak (2048 on CPU, 8192 on accelerators)"),
             _option("--no-peers", action="store_true", help="leave out the NumPy and PyTorch peers"),
             _option("--check-rules", nargs="*", metavar="RULE", help="time `manualgrad check --dtype float64` on "
                     "these rules (default: all)"),
             _option("--no-check", action="store_true", help="leave out the check's wall time"),
             _option("--quick", action="store_true", help="smoke run in seconds: digits models, 3 repeats, 256 "
                     "matmul, check of relu only (not a measurement)"),
             _option("--json", action="store_true", help="one JSON document: machine, settings, one record per "
                     "figure"))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``manualgrad`` parser: one sub-parser per command."""
    parser = _Parser(prog="manualgrad", description=manualgrad.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_checking, _add_teaching, _add_training, _add_bench):
        add(commands)
    return parser


BROKEN_PIPE = 141  # 128 + SIGPIPE: what a reader that stops early expects, not check's 1 for a failure
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def _flag(field: str) -> str:
    """A configuration field as the command line spells it: ``batch_size`` → ``--batch-size``."""
    return "--" + field.replace("_", "-")


def _refusal(error: ManualgradError) -> str:
    """The library's refusal in one line, its fields named as flags."""
    if isinstance(error, FieldMessage):
        return first_line(error.spelled(_flag, metavars=True))
    return first_line(error)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.reuse_host_memory()  # before the first JAX computation (see its docstring)
    try:
        code = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader is gone: stop quietly, and let the exit's flush write nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except KeyboardInterrupt:  # train saves and stops on its own first Ctrl-C; this is any other command's
        print(f"manualgrad {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
    except ManualgradError as error:  # a refusal of the library's, a missing extra among them
        print(f"manualgrad {args.command}: {_refusal(error)}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
