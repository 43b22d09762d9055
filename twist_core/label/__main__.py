"""``python -m twist_core.label`` and ``torchrun -m twist_core.label`` (documented): the ``twist label`` command."""

import sys

from twist_core.commands.label import main

sys.exit(main())
