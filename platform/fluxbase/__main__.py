"""`python -m fluxbase` is the `fluxbase` console script."""

from fluxbase.cli import main

raise SystemExit(main())
