"""``python -m qembed``: the command line of :mod:`qembed.experiments.cli`."""
import sys

from .experiments.cli import main

sys.exit(main())
