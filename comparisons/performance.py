"""What the hand rules cost, printed side by side: ``manualgrad bench`` as a script.

Times the jitted training step (forward, hand backward, optax Adam, parameters donated) of
each model in :data:`manualgrad.bench.bench.MODELS` against ``jax.grad`` of the same model built from
the references, the MLPs also against hand-written NumPy and PyTorch backprop, interleaved so
that the machine's drift cancels; and the compile time, compiled memory, residual bytes,
FLOP/s against a measured matmul, and ``manualgrad check``'s wall time.

Run: ``python comparisons/performance.py [the flags of manualgrad bench, e.g. --quick --json]``;
``main()`` returns the JSON document as a dict.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from contextlib import redirect_stdout
from io import StringIO
from typing import Any

from manualgrad import cli


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Prints the table and returns the JSON document of ``manualgrad bench ARGV``."""
    args = [a for a in argv if a != "--json"]
    captured = StringIO()
    with redirect_stdout(captured):
        code = cli.main(["bench", *args, "--json"])
    if code:
        raise SystemExit(code)
    result = json.loads(captured.getvalue())
    if "--json" in argv:
        print(captured.getvalue())
    else:
        from manualgrad.bench import bench

        print(bench.table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
