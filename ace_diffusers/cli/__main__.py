"""``python -m ace_diffusers.cli COMMAND ...`` (e.g. under ``accelerate launch -m``): the ``ace-diffusers``
command."""

import sys

from . import main

sys.exit(main())
