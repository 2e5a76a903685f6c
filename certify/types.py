"""Shape legend used in docstrings throughout the package.

    N   batch (samples)
    K   classes (logits)
    S   specification rows, usually K - 1 margins ``f_y - f_j``
    C, H, W   image channels, height, width
    D   flattened input size, ``C * H * W``

Images are in pixel space, ``[0, 1]``; ``eps`` is an L-infinity radius in pixel units and a
per-sample tensor of shape ``(N,)``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["Tensor"]
