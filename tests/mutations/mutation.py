"""The record of a planted mistake, shared by the family files of ``tests/mutations/``."""

from typing import NamedTuple


class Mutation(NamedTuple):
    rule: str
    mistake: str
    argument: str  # the argument the checker must name
    vjp: object  # wrong (residuals, g) -> cotangents; with nondiff args: (*static, residuals, g)
    # The checks that must fail. A wrong tie-break in max pooling sits at a kink, which finite
    # differences rightly leave out, so only the comparison with the reference can see it.
    caught_by: tuple[str, ...] = ("vjp", "finite_diff")
    # A phrase every failing sample's diagnosis must contain, for the mistakes manualgrad.check.diagnose
    # knows; empty for the others. The diagnoses never see these mutations: they derive their
    # candidates from the reference and the right answer.
    diagnosis: str = ""
    # A forward saving other residuals than the rule's (the same output), for a mistake that
    # needs them, e.g. statistics recomputed from x over other axes; None: the rule's own.
    forward: object = None
