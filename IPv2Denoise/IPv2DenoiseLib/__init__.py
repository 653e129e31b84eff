"""IPv2 Denoise core: Slicer-free I/O, masks, low-dose simulation, IPv2 purification, denoisers.

Never imports slicer, qt or ctk (except :mod:`IPv2DenoiseLib.app.slicer_support` and the web app).
"""

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume

__version__ = "0.1.0"
__all__ = ["UserError", "Volume", "__version__"]
