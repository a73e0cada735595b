"""The ``manualgrad`` command line.

``manualgrad check [RULE ...] [--dtype float32|float64] [--json] [--no-cache]`` cross-checks the
registered rules, names the usual mistake behind a failure (``DIAGNOSIS`` lines) and exits 1 if
any check fails (2 for a bad command line, as argparse does); compiled programs are kept in JAX's
persistent compilation cache (:mod:`manualgrad.check.cache`) unless ``--no-cache``.
``manualgrad train [...]`` trains a model on the hand rules (see ``manualgrad train --help``), in one
process or as one of several (``--coordinator``, ``--num-processes``, ``--process-id``, ``--distributed auto``);
``manualgrad launch --processes N -- train ARGS`` runs N such processes on this machine and exits with the
worst status among them.
``manualgrad bench [...]`` measures the hand rules against ``jax.grad``, NumPy and PyTorch.
``manualgrad audit FILE:FUNCTION [--args NAME]`` checks every ``custom_vjp`` inside FUNCTION at the
values it receives there (its arguments from FILE's ``audit_args()``): exit 0 if all agree, 1 if not.
``manualgrad explain RULE`` prints a rule's derivation and checks it live; ``--list`` lists rules.
``manualgrad exercise RULE [--notebook] [--out FILE]`` writes a rule's exercise (forward, derivation
up to the result, an empty backward), as a file or a notebook; ``manualgrad exercise --network NAME``
a whole network's (the gradient of every intermediate); ``manualgrad grade FILE ...`` grades
them, each in its own process (``--timeout``), with a summary table and ``--format
gradescope|json|junit --out FILE``: exit 0 if every check passes, 1 if some fail, 2 for a file that
cannot be graded. ``manualgrad autograder RULE ... [--network NAME ...] --out autograder.zip``
builds a Gradescope bundle.
Output into a pipe its reader has closed (``manualgrad check --json | head -1``) ends the command
quietly with status 141, as if killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence

import manualgrad
from manualgrad import registry, runtime
from manualgrad.bench import bench
from manualgrad.check import cache, checker, processes
from manualgrad.train import checkpoint, data, distributed, loop, step


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
    names = args.rules or [r.name for r in registry.rules()]
    if _refuse_unknown_rules("check", names, "rule(s)"):
        return 2
    with cache.command_settings(not args.no_cache) as cached_in:
        report = processes.check(names, dtype=args.dtype, cache_dir=cached_in)
    if args.json:
        for record in report.records():
            print(json.dumps(record))
        return 0 if report.passed else 1
    where = f"programs cached in {cached_in}" if cached_in else "no compilation cache"
    print(f"manualgrad check: {len(names)} rules, dtype {args.dtype}, {where}; worst relative error per check")
    print(report.table())
    failures = report.failures()
    for f in failures:
        print("FAIL " + f.describe())
    for line in report.diagnoses():
        print("DIAGNOSIS " + line)
    checks = len(report.worst())
    failed = len({(f.rule, f.check) for f in failures})
    print(f"{checks - failed} passed, {failed} failed in {report.timing()}")
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
        print("manualgrad bench: --repeats, --compile-repeats and --matmul-size must be ≥ 1", file=sys.stderr)
        return 2
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
        print("manualgrad explain: give a RULE or --list", file=sys.stderr)
        return 2
    if _refuse_unknown_rules("explain", [args.rule]):
        return 2
    print(explain.explain(args.rule))
    return 0


def _exercise(args: argparse.Namespace) -> int:
    from manualgrad.teach import exercise, networks, notebook

    if (args.rule is None) == (args.network is None):
        print("manualgrad exercise: give a RULE or --network NAME (one of them)", file=sys.stderr)
        return 2
    if (
        _refuse_unknown_rules("exercise", [args.rule])
        if args.rule
        else _refuse_unknown_networks("exercise", [args.network])
    ):
        return 2
    name = args.rule or args.network
    out = pathlib.Path(args.out or f"{name}_exercise.{'ipynb' if args.notebook else 'py'}")
    if out.exists():
        print(f"manualgrad exercise: {out} exists; remove it or choose another --out FILE", file=sys.stderr)
        return 2
    try:
        if args.notebook:
            (notebook.write_network if args.network else notebook.write)(name, out)
        else:
            out.write_text(networks.exercise_text(name) if args.network else exercise.exercise(name))
    except OSError as error:
        print(f"manualgrad exercise: cannot write {out}: {error.strerror}", file=sys.stderr)
        return 2
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
                print(f"manualgrad grade: cannot write {args.out}: {error.strerror}", file=sys.stderr)
                return 2
            print(f"wrote {args.out} ({args.format})")
    if any(r.status == results.ERROR for r in graded) and not args.expect:
        return 2
    return 0 if all(r.passed for r in graded) else 1


def _autograder(args: argparse.Namespace) -> int:
    from manualgrad.teach import autograder, results

    if not args.rules and not args.networks:
        print("manualgrad autograder: give the RULEs (or --network NAME) a submission must contain", file=sys.stderr)
        return 2
    if _refuse_unknown_rules("autograder", args.rules) or _refuse_unknown_networks("autograder", args.networks):
        return 2
    out = pathlib.Path(args.out)
    if out.exists():
        print(f"manualgrad autograder: {out} exists; remove it or choose another --out FILE", file=sys.stderr)
        return 2
    try:
        weights = results.load_weights(args.weights) if args.weights else None
        exercises = [*args.rules, *args.networks]
        names = autograder.bundle(exercises, out, weights=weights, timeout=args.timeout, dtype=args.dtype)
    except (results.WeightsError, autograder.BundleError) as error:
        print(f"manualgrad autograder: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"manualgrad autograder: cannot write {out}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(names)}; upload it as a Gradescope autograder (Ubuntu, Python 3)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from manualgrad.teach import exercise

    file, sep, name = args.target.rpartition(":")
    if not sep or not file or not name.isidentifier():
        print(f"manualgrad audit: give FILE:FUNCTION, e.g. model.py:loss; got {args.target!r}", file=sys.stderr)
        return 2
    if not pathlib.Path(file).is_file():
        print(f"manualgrad audit: no file {file!r}", file=sys.stderr)
        return 2
    try:
        module = exercise.run_file(file, "manualgrad_audited")
    except exercise.ExerciseError as error:
        print(f"manualgrad audit: {error}", file=sys.stderr)
        return 2
    fn, make = getattr(module, name, None), getattr(module, args.args, None)
    for what, f, role in ((name, fn, "to audit"), (args.args, make, f"returning the arguments of {name} (--args)")):
        if not callable(f):
            print(f"manualgrad audit: {file} defines no function {what} {role}", file=sys.stderr)
            return 2
    try:
        values = make()
        if not isinstance(values, (tuple, list)):
            raise TypeError(f"it returned {type(values).__name__}, not a tuple of {name}'s positional arguments")
        report = manualgrad.audit(fn, *values, seed=args.seed)
    except Exception as error:  # the user's code: its error in one line, the audit never began
        first = str(error).splitlines()[0] if str(error) else ""
        print(f"manualgrad audit: {file}:{name} with {args.args}(): {type(error).__name__}: {first}", file=sys.stderr)
        return 2
    print(report.text())
    return 0 if report.passed else 1


def _train(args: argparse.Namespace) -> int:
    config = loop.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(loop.Config)})
    try:
        summary = loop.train(config)
    except (loop.TrainError, data.DataError, checkpoint.CheckpointError, distributed.DistributedError) as error:
        print(
            f"manualgrad {error}" if str(error).startswith("train:") else f"manualgrad train: {error}", file=sys.stderr
        )
        return 2
    except loop.Diverged as error:
        print(f"manualgrad {error}", file=sys.stderr)
        return 1
    except loop.Interrupted as error:
        print(f"manualgrad {error}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:  # outside the steps (loading, compiling, plot, cross-check) or a second Ctrl-C
        print("manualgrad train: interrupted; the checkpoints written so far are kept", file=sys.stderr)
        return INTERRUPTED
    if summary["process"] != distributed.WRITER:
        print(f"process {summary['process']} of {summary['processes']} done; process 0 wrote the run's files")
        return 0
    print(
        f"test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f} after "
        f"{summary['epoch']} epochs ({summary['steps']} steps on {summary['devices']} device(s) of "
        f"{summary['processes']} process(es)) "
        f"in {summary['seconds']:.1f} s ({summary['steps_per_second']:.1f} steps/s)"
    )
    if summary["cross_check_max_relative_error"] is None:
        print("no cross-check of the hand-rule gradient (--cross-check-batches 0)")
    else:
        print(
            f"hand-rule gradient vs jax.grad of the references on {summary['cross_check_batches']} batches: "
            f"max relative error {summary['cross_check_max_relative_error']:.1e}"
            + ("" if math.isfinite(summary["cross_check_max_relative_error"]) else " (a gradient has NaN or ∞ entries)")
        )
    if summary["samples"] is not None:
        print(f"{len(summary['samples'])} samples from the model: {' '.join(summary['samples'])}")
    latest = f"; {summary['latest']} names {summary['directory']}" if summary["latest"] else ""
    samples = f", {pathlib.Path(summary['directory']) / 'samples.txt'}" if summary["samples"] is not None else ""
    print(f"wrote {summary['metrics']}, {summary['curves']}{samples}, {summary['checkpoint']}{latest}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    try:
        return distributed.launch(args.processes, arguments)
    except distributed.DistributedError as error:
        print(f"manualgrad {error}", file=sys.stderr)
        return 2


def _add_check(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser("check", help="cross-check hand rules against jax.grad and finite differences")
    check.add_argument("rules", nargs="*", metavar="RULE", help="rules to check (default: all)")
    check.add_argument("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
    check.add_argument("--json", action="store_true", help="one JSON record per rule and check")
    check.add_argument(
        "--no-cache",
        action="store_true",
        help=f"compile every program afresh: no persistent compilation cache (also {cache.OFF_VARIABLE}=1)",
    )
    check.set_defaults(run=_check)


def _add_explain(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser("explain", help="a rule's derivation, its seed, and a live numeric check")
    explain.add_argument("rule", nargs="?", metavar="RULE", help="the rule to explain")
    explain.add_argument("--list", action="store_true", help="list the rules")
    explain.set_defaults(run=_explain)


def _add_exercise(commands: argparse._SubParsersAction) -> None:
    from manualgrad.teach import networks

    ex = commands.add_parser(
        "exercise", help="write a rule's exercise: forward, derivation up to the result, empty backward"
    )
    ex.add_argument("rule", nargs="?", metavar="RULE", help="the rule to practise")
    ex.add_argument(
        "--network",
        metavar="NAME",
        default=None,
        help=f"a whole network instead, the gradient of every intermediate: {', '.join(networks.NETWORKS)}",
    )
    ex.add_argument("--notebook", action="store_true", help="write a Jupyter notebook (.ipynb) that grades in place")
    ex.add_argument(
        "--out", metavar="FILE", default=None, help="where to write it (default: NAME_exercise.py or .ipynb)"
    )
    ex.set_defaults(run=_exercise)


def _add_grade(commands: argparse._SubParsersAction) -> None:
    from manualgrad.teach import results

    gr = commands.add_parser(
        "grade", help="grade exercise files' backwards with every check, each in its own process, and diagnose them"
    )
    gr.add_argument("files", nargs="*", metavar="FILE", help="files or notebooks written by `manualgrad exercise`")
    gr.add_argument("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
    gr.add_argument("--format", choices=results.FORMATS, default="text", help="text, or a document (see --out)")
    gr.add_argument("--out", metavar="FILE", default=None, help="write the --format document here (default: stdout)")
    gr.add_argument(
        "--weights",
        metavar="FILE",
        default=None,
        help='JSON points: {"RULE": points, "RULE: CHECK": points, "NETWORK: dNAME": points} (default 1 a test)',
    )
    gr.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"a submission still running after this fails (default {results.DEFAULT_TIMEOUT:g})",
    )
    gr.add_argument(
        "--in-process",
        action="store_true",
        help="grade in this process, one file after another, with no time limit: only for code you trust",
    )
    gr.add_argument(
        "--expect",
        nargs="+",
        default=[],
        metavar="NAME",
        help="grade the FILEs for these rules or networks only; one with no file fails (autograder runs)",
    )
    gr.set_defaults(run=_grade)


def _add_autograder(commands: argparse._SubParsersAction) -> None:
    from manualgrad.teach import results

    ag = commands.add_parser(
        "autograder", help="build a Gradescope autograder bundle (.zip) for rules' and networks' exercises"
    )
    ag.add_argument("rules", nargs="*", metavar="RULE", help="the rule exercises a submission must contain")
    ag.add_argument(
        "--network",
        dest="networks",
        action="append",
        default=[],
        metavar="NAME",
        help="a network exercise a submission must contain (repeat for more)",
    )
    ag.add_argument("--out", metavar="FILE", default="autograder.zip", help="the bundle (default: autograder.zip)")
    ag.add_argument("--weights", metavar="FILE", default=None, help="JSON points, as for `manualgrad grade`")
    ag.add_argument("--timeout", type=float, default=results.DEFAULT_TIMEOUT, metavar="SECONDS")
    ag.add_argument("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
    ag.set_defaults(run=_autograder)


def _add_audit(commands: argparse._SubParsersAction) -> None:
    au = commands.add_parser(
        "audit", help="check every custom_vjp inside a function at the values it receives there (no reference needed)"
    )
    au.add_argument("target", metavar="FILE:FUNCTION", help="the function to audit, e.g. model.py:loss")
    au.add_argument(
        "--args",
        default="audit_args",
        metavar="NAME",
        help="the function in FILE that returns FUNCTION's arguments as a tuple (default: audit_args)",
    )
    au.add_argument("--seed", type=int, default=0, help="the random output cotangents")
    au.set_defaults(run=_audit)


def _add_train(commands: argparse._SubParsersAction) -> None:
    defaults = loop.Config()
    tr = commands.add_parser("train", help="train a model on the hand rules (jitted, optax, checkpoints, many devices)")
    tr.add_argument("--model", choices=tuple(loop.MODELS), default=defaults.model)
    model_defaults = "; ".join(
        f"{'other models' if name == '*' else name}: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in given.items())
        for name, given in loop.MODEL_DEFAULTS.items()
    )
    tr.add_argument("--dataset", default=defaults.dataset, metavar="|".join((*data.SPECS, *data.SEQUENCE_SPECS)))
    tr.add_argument(
        "--optimizer",
        choices=tuple(step.OPTIMIZERS),
        default=None,
        help=f"default: the model's ({model_defaults}); adamw warms up, then decays as a cosine over the run",
    )
    tr.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: sgd 0.1, momentum 0.05, adam 3e-3, adamw 1e-2, its peak)",
    )
    tr.add_argument("--batch-size", type=int, default=None, help="default: the model's (see --optimizer)")
    tr.add_argument("--epochs", type=int, default=None, help="default: the model's (see --optimizer)")
    tr.add_argument(
        "--clip",
        type=float,
        default=None,
        metavar="NORM",
        help="scale each gradient down to global norm NORM if larger (optax.clip_by_global_norm; "
        "default: the model's, see --optimizer; none for the others)",
    )
    tr.add_argument("--seed", type=int, default=defaults.seed, help="initialisation, split and data order")
    tr.add_argument("--dtype", choices=loop.DTYPES, default=defaults.dtype)
    tr.add_argument(
        "--grad",
        choices=step.GRADS,
        default=defaults.grad,
        help="hand rules, or jax.grad of the same model built from the references",
    )
    tr.add_argument(
        "--norm",
        choices=tuple(loop.NORMS),
        default=defaults.norm,
        help="normalisation after every hidden conv and dense layer, before its ReLU (batch: running statistics)",
    )
    tr.add_argument(
        "--groups",
        type=int,
        default=None,
        metavar="G",
        help=f"channel groups of --norm group (default {loop.DEFAULT_GROUPS}; must divide every width)",
    )
    tr.add_argument(
        "--dropout",
        type=float,
        default=defaults.dropout,
        metavar="RATE",
        help="inverted dropout after every dense hidden ReLU while training, in [0, 1) (default 0: none)",
    )
    tr.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="metrics.csv, curves.png, checkpoints (default: a new folder runs/<start time>, "
        "named by runs/latest); refused if DIR holds a run, unless --overwrite or --resume DIR",
    )
    tr.add_argument("--overwrite", action="store_true", help="with --out DIR: delete the run DIR holds first")
    tr.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        metavar="N",
        help="also checkpoint every N steps (always at the end of each epoch)",
    )
    tr.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run checkpointed in DIR, in DIR (give the run's arguments again)",
    )
    tr.add_argument(
        "--devices", type=int, default=None, metavar="N", help="shard each batch over N local devices (default: all)"
    )
    tr.add_argument(
        "--cross-check-batches",
        type=int,
        default=defaults.cross_check_batches,
        metavar="N",
        help="batches for the final hand-rule vs jax.grad check (0: none)",
    )
    _add_distributed_flags(tr, defaults)
    tr.set_defaults(run=_train)


def _add_distributed_flags(tr: argparse.ArgumentParser, defaults: loop.Config) -> None:
    group = tr.add_argument_group(
        "several processes (jax.distributed; one per host, --batch-size is the global batch, process 0 writes)"
    )
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address, the same for all")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 to N-1")
    group.add_argument(
        "--distributed",
        choices=tuple(distributed.DETECTIONS),
        default=None,
        help="detect the three above under SLURM, Open MPI, Kubernetes (auto) or through mpi4py",
    )
    group.add_argument(
        "--process-timeout",
        type=float,
        default=defaults.process_timeout,
        metavar="SECONDS",
        help="wait this long for the others to join, for a silent process's heartbeat and at exit; then stop "
        f"with an error (default {defaults.process_timeout:g})",
    )


def _add_launch(commands: argparse._SubParsersAction) -> None:
    la = commands.add_parser(
        "launch", help="run `train ARGS` as N processes of one jax.distributed run on this machine"
    )
    la.add_argument("--processes", type=int, required=True, metavar="N", help="processes to start")
    la.add_argument(
        "arguments", nargs=argparse.REMAINDER, metavar="-- train ARGS", help="the command every process runs"
    )
    la.set_defaults(run=_launch)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench_ = commands.add_parser(
        "bench", help="hand rules vs jax.grad, NumPy and PyTorch: step time, compile time, memory, FLOP/s, check time"
    )
    bench_.add_argument(
        "--models",
        default=None,
        metavar="M1,M2",
        help=f"comma-separated, from: {', '.join(bench.MODELS)} (default: all)",
    )
    bench_.add_argument(
        "--repeats", type=int, default=None, help=f"interleaved timed repetitions per model ({bench.Settings.repeats})"
    )
    bench_.add_argument(
        "--compile-repeats",
        type=int,
        default=None,
        help=f"interleaved compilations per side ({bench.Settings.compile_repeats})",
    )
    bench_.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        metavar="N",
        help="side of the float32 matmul that measures the peak (2048 on CPU, 8192 on accelerators)",
    )
    bench_.add_argument("--no-peers", action="store_true", help="leave out the NumPy and PyTorch peers")
    bench_.add_argument(
        "--check-rules",
        nargs="*",
        default=None,
        metavar="RULE",
        help="time `manualgrad check --dtype float64` on these rules (default: all)",
    )
    bench_.add_argument("--no-check", action="store_true", help="leave out the check's wall time")
    bench_.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in seconds: digits models, 3 repeats, 256 matmul, check of relu only (not a measurement)",
    )
    bench_.add_argument(
        "--json", action="store_true", help="one JSON document: machine, settings, one record per figure"
    )
    bench_.set_defaults(run=_bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``manualgrad`` parser: one sub-parser per command, each added by its ``_add_COMMAND``."""
    parser = argparse.ArgumentParser(prog="manualgrad", description=manualgrad.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_check,
        _add_audit,
        _add_explain,
        _add_exercise,
        _add_grade,
        _add_autograder,
        _add_train,
        _add_launch,
        _add_bench,
    ):
        add(commands)
    return parser


# The status of a process killed by SIGPIPE (128 + 13), which is what a reader that stops early
# (`manualgrad check --json | head -1`) expects, and not check's 1 for a failed check.
BROKEN_PIPE = 141
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


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
    return code


if __name__ == "__main__":
    sys.exit(main())
