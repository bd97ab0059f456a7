#!/usr/bin/env python
"""The seed's entry point: contrastive steering between two Tulu subsets (see README)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chunky_utils.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
