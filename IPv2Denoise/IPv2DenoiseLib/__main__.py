"""``python -m IPv2DenoiseLib`` runs the command line (used by the Slicer module's subprocess)."""

import sys

from .cli import main

sys.exit(main())
