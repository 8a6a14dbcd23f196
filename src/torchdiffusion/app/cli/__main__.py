"""``python -m torchdiffusion.app.cli ...`` runs the command line (as ``python -m torchdiffusion``)."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
