"""pneumoseg: the SIIM-ACR pneumothorax segmentation pipeline.

Layers, data flowing one way: ``scripts/`` -> ``pneumoseg.stages`` (prepare, train, search,
predict, serve) -> core modules (rle, dicom, labels, metrics, postprocess, models, losses, config, io, layout).
Core modules never import from ``pneumoseg.stages``; where each stage writes is ``pneumoseg.layout``'s knowledge.
"""

import os

# albumentations checks PyPI for a newer release on import; that call hangs on offline machines.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
