"""The README's tables of seeds and of rules, generated from the registry (``python -m manualgrad.teach.docs``)."""

from __future__ import annotations

import inspect

from manualgrad import registry


def seeds_table() -> str:
    """A Markdown table of the seed documents: id, author and title, and the file name as a key."""
    lines = ["| seed | author, title | file (a key) |", "|---|---|---|"]
    lines += [f"| {key} | {seed.work} | `{seed.file}` |" for key, seed in registry.SEEDS.items()]
    return "\n".join(lines)


def rules_table() -> str:
    """A Markdown table: rule, signature, module, its seeds (:func:`registry.cite`), and where its explanation is."""
    lines = [
        "| rule | signature | module | seeds: author, title, section [file] | explanation |",
        "|---|---|---|---|---|",
    ]
    for rule in registry.rules():
        params = inspect.signature(rule.fn).parameters.values()
        shown = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        signature = f"`{rule.name}({shown})`"
        module = inspect.getmodule(rule.reference).__name__.replace(".", "/") + ".py"
        seeds = "<br>".join(registry.cite(s, section) for s, section in rule.seeds)
        line = inspect.getsourcelines(rule.fn.fun)[1]
        explanation = f"[derivation]({module}#L{line}), `manualgrad explain {rule.name}`"
        lines.append(f"| `{rule.name}` | {signature} | [{module}]({module}) | {seeds} | {explanation} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(seeds_table(), rules_table(), sep="\n\n")
