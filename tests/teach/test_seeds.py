"""The seeds are cited by author, title and section wherever a user sees them.

The seed documents are not part of a clone, so a path means nothing to a reader: every
surface (``explain``, ``explain --list``, the README's tables) goes through
:func:`manualgrad.registry.cite`, and the file name is only a secondary key.
"""

import pathlib

from manualgrad import cli, registry
from manualgrad.teach import docs, explain

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cite_names_author_title_section_then_file():
    assert registry.cite("000", "§4 Linear") == (
        'seed 000: N. Kumar, "Proofs for Neural Network Library" (2020), §4 Linear [000_a6d29114e988ce87.txt]'
    )
    assert registry.cite("002", "Remark 8") == (
        'seed 002: T. Hamm, "A Derivation of Feedforward Neural Network Gradients Using Fréchet Calculus", '
        "Remark 8 [002_3df32e287afc1568.txt]"
    )
    assert registry.cite("004", "For bias: ∇_b = 1ᵀ G").startswith(
        'seed 004: "Basic Knowledge" (notes, author not named), '
    )


def test_every_seed_has_a_title_and_its_file():
    assert sorted(registry.SEEDS) == ["000", "001", "002", "003", "004"]
    for key, seed in registry.SEEDS.items():
        assert seed.title and seed.file.startswith(f"{key}_") and seed.file.endswith(".txt")


def test_rule_seed_text_is_its_citations():
    dense = registry.get("dense")
    assert dense.seed_text == "; ".join(registry.cite(s, section) for s, section in dense.seeds)
    assert 'N. Kumar, "Proofs for Neural Network Library" (2020), §4 Linear' in dense.seed_text


def test_explain_cites_the_seeds_without_a_path(capsys):
    assert cli.main(["explain", "dense"]) == 0
    out = capsys.readouterr().out
    assert "shared/seeds" not in out
    for s, section in registry.get("dense").seeds:
        assert registry.cite(s, section) in out


def test_explain_list_names_the_seeds_in_100_columns():
    lines = explain.rule_list().splitlines()
    assert len(lines) == len(registry.rules())
    for rule, line in zip(registry.rules(), lines):
        assert line.split()[0] == rule.name and len(line) <= 100, line
        assert f"seed {', '.join(s for s, _ in rule.seeds)}: {rule.seeds[0][1][:10]}" in line, line


def test_readme_cites_seeds_by_author_and_title():
    readme = (ROOT / "README.md").read_text()
    assert "shared/seeds" not in readme
    assert docs.seeds_table() in readme
    for seed in registry.SEEDS.values():
        assert f'"{seed.title}"' in docs.seeds_table() and seed.file in docs.seeds_table()
    mse = next(line for line in docs.rules_table().splitlines() if line.startswith("| `mse`"))
    assert registry.cite("000", "§3 mse") in mse and registry.cite("001", "loss ½(a_2 − y)²") in mse
