"""``python -m kldiv_spec``: the ``kldiv-spec`` command (``check``, ``vectors``, ``--version``)."""

import sys

from kldiv_spec._cli import main

sys.exit(main())
