"""sampleclr-scale: atlas-scale, out-of-core SampleCLR donor representations.

Stages (each reads and writes plain files, so they can run on different machines):
ingest -> prior -> train -> embed -> write back -> evaluate.
"""

from sampleclr_scale.errors import InputError

__all__ = ["InputError"]
__version__ = "0.1.0"
