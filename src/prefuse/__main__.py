"""``python -m prefuse``: the ``prefuse`` command (``prefuse.alignment.cli``)."""

from prefuse.alignment.cli import main

raise SystemExit(main())
