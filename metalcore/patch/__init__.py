"""One-line Hugging Face integration: ``metalcore.patch.patch_model(model)``.

Table-driven (:data:`FAMILIES`), per instance, reversible, and it returns a :class:`PatchReport` of
what it swapped and what it skipped and why. See :mod:`metalcore.patch.core` for how each swap is made
and :mod:`metalcore.patch.attention` for the ``"metalcore"`` attention implementation.
"""

from metalcore.patch.core import PatchReport, patch_model, patch_report, unpatch_model
from metalcore.patch.families import FAMILIES, Family

__all__ = ["FAMILIES", "Family", "PatchReport", "patch_model", "patch_report", "unpatch_model"]
