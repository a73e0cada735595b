"""The ``manualgrad`` command line.

``manualgrad check [RULE ...] [--dtype float32|float64] [--json]`` cross-checks the registered
rules and exits 1 if any check fails (2 for a bad command line, as argparse does).
``manualgrad explain RULE`` prints a rule's derivation and checks it live; ``--list`` lists rules.
"""

from __future__ import annotations

import argparse
import json
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
