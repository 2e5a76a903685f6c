"""The bound engine: sound bounds on a network's outputs over a box of inputs.

One entry point, :func:`compute_bounds` (and :func:`margin_bounds` for the margins of a batch
``(x, y, eps)``), and methods chosen by one canonical name from a registry:

=============  ======================================================================
``ibp``        interval bound propagation
``crown``      backward linear relaxation, adaptive lower slopes, linear intermediate bounds
``crown-ibp``  CROWN for the output, intervals for intermediate layers
``wong-kolter``  Wong & Kolter's dual network (lower slope parallel to the upper chord)
``alpha-crown``  CROWN with lower slopes optimized per specification row
``lp``         the exact LP of the triangle relaxation (cvxpy), small networks
``milp``       exact big-M mixed-integer program (cvxpy + HiGHS), small networks
``lirpa-*``    auto_LiRPA's ibp, crown, crown-ibp, alpha-crown (optional; it bounds the
               module itself, so layers without a native rule work too)
=============  ======================================================================

A configured method is a callable ``method(model_or_net, region, spec) -> Bounds``
(:class:`BoundMethod`); its capabilities (``is_complete``, ``decides_threshold``,
``accepts_time_budget``, ...) are class attributes, and :func:`list_methods` filters on them.

Every bound is rigorous for the network in exact arithmetic: the engine accounts for every
rounding of its own float32/float64 computation (:mod:`certify.bounds.rounding`), and
:func:`margin_bounds` also for the model's own forward pass in its dtype
(:mod:`certify.bounds.forward_error`). ``rigorous=False`` (an option of the native methods)
gives the plain floating-point bound, for what proves nothing (training losses, steering a
search).

Example::

    from certify.bounds import margin_bounds
    b = margin_bounds(model, x, y, eps=0.01, method="crown")
    verified = b.lower.min(1).values > 0
"""

from __future__ import annotations

import importlib

from certify.bounds.api import compute_bounds, margin_bounds
from certify.bounds.base import BoundMethod, Bounds, get_method, list_methods, register_method
from certify.bounds.network import Network, to_network

# Importing a method's module registers it; list_methods() keeps this order (cheap to costly).
for _module in ("ibp", "crown", "wong_kolter", "alpha_crown", "lp", "milp", "bab", "auto_lirpa"):
    importlib.import_module(f"certify.bounds.{_module}")

__all__ = [
    "BoundMethod",
    "Bounds",
    "Network",
    "compute_bounds",
    "get_method",
    "list_methods",
    "margin_bounds",
    "register_method",
    "to_network",
]
