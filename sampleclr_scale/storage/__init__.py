"""Where the stages read and write, and how an output is published.

- :mod:`~sampleclr_scale.storage.location`: :class:`Location`, a local path or a URI, and
  plain-data (de)serialisation;
- :mod:`~sampleclr_scale.storage.outputs`: what each stage's output is (its kind), locks,
  recovery of an interrupted publish, a check that a folder can be written;
- :mod:`~sampleclr_scale.storage.publish`: :func:`staged_output`, the one way a stage
  publishes, and :func:`local_directory`.
"""

from sampleclr_scale.storage.location import ZARR_COMMIT, Location, plain_data
from sampleclr_scale.storage.outputs import (
    OutputKind,
    check_writable,
    claim,
    files_output,
    zarr_output,
)
from sampleclr_scale.storage.publish import local_directory, staged_output

__all__ = ["ZARR_COMMIT", "Location", "OutputKind", "check_writable", "claim", "files_output",
           "local_directory", "plain_data", "staged_output", "zarr_output"]
