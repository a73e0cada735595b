"""The ``manualgrad`` command line.

``manualgrad check [RULE ...] [--dtype float32|float64] [--json]`` cross-checks the registered
rules, names the usual mistake behind a failure (``DIAGNOSIS`` lines) and exits 1 if any
check fails (2 for a bad command line, as argparse does).
``manualgrad train [...]`` trains a model on the hand rules (see ``manualgrad train --help``).
``manualgrad explain RULE`` prints a rule's derivation and checks it live; ``--list`` lists rules.
``manualgrad exercise RULE [--out FILE]`` writes a rule's exercise (forward, derivation up to the
result, an empty backward); ``manualgrad grade FILE`` grades it: exit 0 if every check passes,
1 if some fail, 2 for a file that cannot be graded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import manualgrad
from manualgrad import checker, registry


def _check(args: argparse.Namespace) -> int:
    names = args.rules or [r.name for r in registry.rules()]
    unknown = [n for n in names if n not in {r.name for r in registry.rules()}]
    if unknown:
        known = ", ".join(r.name for r in registry.rules())
        print(f"manualgrad check: unknown rule(s) {', '.join(unknown)}; registered: {known}", file=sys.stderr)
        return 2
    report = manualgrad.check(names, dtype=args.dtype)
    if args.json:
        for record in report.records():
            print(json.dumps(record))
        return 0 if report.passed else 1
    print(f"manualgrad check: {len(names)} rules, dtype {args.dtype}, worst relative error per check")
    print(report.table())
    failures = report.failures()
    for f in failures:
        print("FAIL " + f.describe())
    for line in report.diagnoses():
        print("DIAGNOSIS " + line)
    checks = len(report.worst())
    failed = len({(f.rule, f.check) for f in failures})
    print(f"{checks - failed} passed, {failed} failed in {report.seconds:.1f} s")
    return 0 if report.passed else 1


def _bench(args: argparse.Namespace) -> int:
    from manualgrad import bench

    result = bench.cnn_gradient(batch=args.batch, repeats=args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(result["benchmark"] + f", median of {result['repeats']} interleaved steps on {result['machine']}")
    print(f"  hand rules   {result['manual_ms']:8.2f} ms   compile {result['compile_s_manual']:.2f} s")
    print(f"  jax.grad     {result['jax_grad_ms']:8.2f} ms   compile {result['compile_s_jax_grad']:.2f} s")
    print(f"  ratio_manual_over_jax_grad {result['ratio_manual_over_jax_grad']:.3f}"
          f"   (gradients agree to {result['max_gradient_difference_relative']:.1e} relative)")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from manualgrad import explain

    if args.list:
        print(explain.rule_list())
        return 0
    if args.rule is None:
        print("manualgrad explain: give a RULE or --list", file=sys.stderr)
        return 2
    if args.rule not in {r.name for r in registry.rules()}:
        known = ", ".join(r.name for r in registry.rules())
        print(f"manualgrad explain: unknown rule {args.rule}; registered: {known}", file=sys.stderr)
        return 2
    print(explain.explain(args.rule))
    return 0


def _exercise(args: argparse.Namespace) -> int:
    from manualgrad import exercise

    if args.rule not in {r.name for r in registry.rules()}:
        known = ", ".join(r.name for r in registry.rules())
        print(f"manualgrad exercise: unknown rule {args.rule}; registered: {known}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out or f"{args.rule}_exercise.py")
    if out.exists():
        print(f"manualgrad exercise: {out} exists; remove it or choose another --out FILE", file=sys.stderr)
        return 2
    try:
        out.write_text(exercise.exercise(args.rule))
    except OSError as error:
        print(f"manualgrad exercise: cannot write {out}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {out}: write its backward, then run `manualgrad grade {out}`")
    return 0


def _grade(args: argparse.Namespace) -> int:
    from manualgrad import exercise

    try:
        text, passed = exercise.grade(args.file, dtype=args.dtype)
    except exercise.ExerciseError as error:
        print(f"manualgrad grade: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0 if passed else 1


def _train(args: argparse.Namespace) -> int:
    from manualgrad import checkpoint, data, train

    config = train.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(train.Config)})
    try:
        summary = train.train(config)
    except (train.TrainError, data.DataError, checkpoint.CheckpointError) as error:
        print(f"manualgrad {error}" if str(error).startswith("train:") else f"manualgrad train: {error}", file=sys.stderr)
        return 2
    print(f"test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f} after "
          f"{summary['epoch']} epochs ({summary['steps']} steps on {summary['devices']} device(s)) in {summary['seconds']:.1f} s")
    print(f"hand-rule gradient vs jax.grad of the references on {config.cross_check_batches} batches: "
          f"max relative error {summary['cross_check_max_relative_error']:.1e}")
    print(f"wrote {summary['metrics']}, {summary['curves']}, {summary['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manualgrad", description=manualgrad.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="cross-check hand rules against jax.grad and finite differences")
    check.add_argument("rules", nargs="*", metavar="RULE", help="rules to check (default: all)")
    check.add_argument("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
    check.add_argument("--json", action="store_true", help="one JSON record per rule and check")
    check.set_defaults(run=_check)
    explain = commands.add_parser("explain", help="a rule's derivation, its seed, and a live numeric check")
    explain.add_argument("rule", nargs="?", metavar="RULE", help="the rule to explain")
    explain.add_argument("--list", action="store_true", help="list the rules")
    explain.set_defaults(run=_explain)
    ex = commands.add_parser("exercise", help="write a rule's exercise: forward, derivation up to the result, empty backward")
    ex.add_argument("rule", metavar="RULE", help="the rule to practise")
    ex.add_argument("--out", metavar="FILE", default=None, help="where to write it (default: RULE_exercise.py)")
    ex.set_defaults(run=_exercise)
    gr = commands.add_parser("grade", help="grade an exercise file's backward with every check, and diagnose it")
    gr.add_argument("file", metavar="FILE", help="a file written by `manualgrad exercise`")
    gr.add_argument("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
    gr.set_defaults(run=_grade)
    tr = commands.add_parser("train", help="train a model on the hand rules (jitted, optax, checkpoints, many devices)")
    tr.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    tr.add_argument("--dataset", default="digits", metavar="digits|xor|spirals|idx:PATH")
    tr.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="adam")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default: sgd 0.1, momentum 0.05, adam 3e-3)")
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--seed", type=int, default=0, help="initialisation, split and data order")
    tr.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    tr.add_argument("--grad", choices=("manual", "autodiff"), default="manual",
                    help="hand rules, or jax.grad of the same model built from the references")
    tr.add_argument("--out", default="runs/latest", metavar="DIR", help="metrics.csv, curves.png, checkpoints")
    tr.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                    help="also checkpoint every N steps (always at the end of each epoch)")
    tr.add_argument("--resume", default=None, metavar="DIR", help="continue the run checkpointed in DIR")
    tr.add_argument("--devices", type=int, default=None, metavar="N",
                    help="shard each batch over N local devices (default: all)")
    tr.add_argument("--cross-check-batches", type=int, default=3, metavar="N",
                    help="batches for the final hand-rule vs jax.grad check")
    tr.set_defaults(run=_train)
    bench = commands.add_parser("bench", help="time the jitted CNN gradient: hand rules vs jax.grad")
    bench.add_argument("--batch", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=30)
    bench.add_argument("--json", action="store_true", help="one JSON document")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
