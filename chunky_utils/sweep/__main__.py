"""`python -m chunky_utils.sweep`: the chunky-sweep command."""

from chunky_utils.sweep.cli import main

raise SystemExit(main())
