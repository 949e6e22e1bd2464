"""`python -m fluxrl ...` is the `fluxrl` command (the sweep's workers start runs this way)."""

import sys

from fluxrl.cli import main

sys.exit(main())
