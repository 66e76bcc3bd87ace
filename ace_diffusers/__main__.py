"""``python -m ace_diffusers COMMAND ...``: the ``ace-diffusers`` command."""

import sys

from .cli import main

sys.exit(main())
