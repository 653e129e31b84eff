"""IPv2 Denoise core: Slicer-free I/O, masks, low-dose simulation, IPv2 purification, denoisers.

Never imports slicer, qt or ctk (except :mod:`IPv2DenoiseLib.slicer_bridge`).
"""

from .errors import UserError
from .volume import Volume

__version__ = "0.1.0"
__all__ = ["UserError", "Volume", "__version__"]
