"""Stands alone: Python runs this file for `python -m capsdist` (torchrun and the tests do)."""

from capsdist.cli import main

raise SystemExit(main())
