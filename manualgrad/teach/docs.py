"""The README's table of rules, generated from the registry (``python -m manualgrad.teach.docs``)."""

from __future__ import annotations

import inspect

from manualgrad import registry


def rules_table() -> str:
    """A Markdown table: rule, signature, module, seeds and sections, and where its explanation is."""
    lines = ["| rule | signature | module | seed (section) | explanation |", "|---|---|---|---|---|"]
    for rule in registry.rules():
        params = inspect.signature(rule.fn).parameters.values()
        shown = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        signature = f"`{rule.name}({shown})`"
        module = inspect.getmodule(rule.reference).__name__.replace(".", "/") + ".py"
        seeds = "<br>".join(f"{registry.SEED_FILES[s]} ({section})" for s, section in rule.seeds)
        line = inspect.getsourcelines(rule.fn.fun)[1]
        explanation = f"[derivation]({module}#L{line}), `manualgrad explain {rule.name}`"
        lines.append(f"| `{rule.name}` | {signature} | [{module}]({module}) | {seeds} | {explanation} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rules_table())
