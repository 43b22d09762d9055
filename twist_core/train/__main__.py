"""``python -m twist_core.train`` and ``torchrun -m twist_core.train`` (documented): the ``twist train`` command."""

import sys

from twist_core.commands.train import main

sys.exit(main())
