"""Gradient checking: manual against autodiff against finite differences, term by term.

`compare_grads` is the entry point; ``python -m jaxbp.check`` runs it over random specs. The
modules, one concept each:

- `metrics`: relative error (with floor), cosine similarity, norm ratio.
- `tolerances`: the measured pass/fail profiles per dtype.
- `report`: the generic core -- named (candidate, reference) pairs -> rows -> `GradCheckReport`.
- `finite_differences`: central differences, elementwise or along random directions.
- `reference_terms`: every chain-rule term by autodiff of a sub-network (or of one layer).
- `gradcheck`: `compare_grads`, assembling the above for the slides' network or any `jaxbp.Network`.
- `cli`: the command-line checker.
"""

from jaxbp.check.finite_differences import finite_difference_grads
from jaxbp.check.finite_differences import float64_differences
from jaxbp.check.gradcheck import compare_grads
from jaxbp.check.metrics import REL_FLOOR
from jaxbp.check.metrics import cosine_similarity
from jaxbp.check.metrics import norm_ratio
from jaxbp.check.metrics import relative_error
from jaxbp.check.metrics import tree_relative_error
from jaxbp.check.reference_terms import autodiff_chain_terms
from jaxbp.check.report import GradCheckReport
from jaxbp.check.report import Row
from jaxbp.check.report import compare_arrays
from jaxbp.check.report import compare_named
from jaxbp.check.report import compare_trees
from jaxbp.check.tolerances import TOLERANCES
from jaxbp.check.tolerances import Tolerance
from jaxbp.check.tolerances import tolerance_for
