"""Names of the weak denoisers of *Remove noise* (the vocabulary; the filters are in :mod:`pairs`).

Torch- and SciPy-free, so ``ipv2-denoise purify --help`` lists the choices without loading the
purification code (the CLI builds every command's parser at start-up).
"""

from __future__ import annotations

#: Weak denoisers ``build_pairs`` and ``purify --weak-denoiser`` accept.
WEAK_DENOISERS = ("nlm", "gaussian", "bilateral", "median")
#: The default: NLM with ``h`` from the scan's own noise estimate.
DEFAULT_WEAK_DENOISER = "nlm"
