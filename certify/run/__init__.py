"""The run layer: certify a dataset batch by batch, into a run folder.

- :func:`certify_dataset` (:mod:`certify.run.iterate`): the library iterator, one
  :class:`BatchResult` per batch and method; it writes nothing.
- :class:`RunFolder` (:mod:`certify.run.folder`): a run's files; appends rows per batch,
  reads them back to resume, finalizes once.
- :func:`run_area` / :class:`AreaConfig` (:mod:`certify.run.area`): ``certify area``, the two
  composed (sharded over processes under torchrun by :func:`certify.distributed.sharded`).

``certify.report`` only reads and draws what this layer wrote; it imports nothing from here.
"""

from certify.run.area import AreaConfig, run_area, smallest_tol
from certify.run.folder import RunFolder
from certify.run.iterate import BatchResult, certify_dataset

__all__ = [
    "AreaConfig",
    "BatchResult",
    "RunFolder",
    "certify_dataset",
    "run_area",
    "smallest_tol",
]
