"""``python -m finpipe.cli``: the ``finpipe`` command."""

import sys

from finpipe.cli import main

sys.exit(main())
