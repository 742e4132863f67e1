"""``python -m autoprec`` runs the CLI."""

import sys

from autoprec.cli import main

sys.exit(main())
