"""``python -m IPv2DenoiseLib`` runs the command line (used by the Slicer module's subprocess)."""

import sys

from IPv2DenoiseLib.app.cli import main

sys.exit(main())
