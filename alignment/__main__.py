"""``python -m prefuse.alignment``: the main job (see ``prefuse.alignment.cli``)."""

from prefuse.alignment.cli import main

raise SystemExit(main())
