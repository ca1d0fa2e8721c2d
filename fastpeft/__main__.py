"""``python -m fastpeft`` (and ``torchrun ... -m fastpeft``): the ``fastpeft`` command."""

import sys

from fastpeft.app.cli import main

sys.exit(main())
