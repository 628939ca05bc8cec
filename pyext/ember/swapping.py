"""Moved to the ``ember.swap`` package. Kept only while ``ember/quant.py`` and ``ember/smooth_fold.py``
still import from here; delete it once they import from ``ember.swap``."""
from .swap import SwapReport, SwapRule, swap  # noqa: F401
from .swap.apply import blocker as _blocker  # noqa: F401
