"""``python -m expint_jax.cli`` is the ``expint`` command."""

import sys

from expint_jax.cli import main

sys.exit(main())
