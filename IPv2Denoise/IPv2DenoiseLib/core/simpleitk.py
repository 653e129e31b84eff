"""SimpleITK for the modules that read, write or filter images with it, or None where it is missing.

SimpleITK is a dependency of the package; the guard lets training import without it, as on the
lent GPU machine, whose PyTorch image has none and where 50 MB of wheel cannot travel beside the
corpus (``scripts/gpu_train_job.py``). A function that needs it there fails at its first call.
"""

from __future__ import annotations

try:
    import SimpleITK as sitk
except ImportError:
    sitk = None

__all__ = ["sitk"]
