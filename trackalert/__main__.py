"""Allow ``python -m trackalert``."""

from trackalert.cli import main

raise SystemExit(main())
