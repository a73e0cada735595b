"""The ``manualgrad`` command line.

``manualgrad check [RULE ...] [--dtype float32|float64] [--json]`` cross-checks the registered
rules and exits 1 if any check fails (2 for a bad command line, as argparse does).
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manualgrad", description=manualgrad.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="cross-check hand rules against jax.grad and finite differences")
    check.add_argument("rules", nargs="*", metavar="RULE", help="rules to check (default: all)")
    check.add_argument("--dtype", choices=sorted(checker.TOLERANCES), default="float64")
    check.add_argument("--json", action="store_true", help="one JSON record per rule and check")
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
