"""`python -m neuronmap` is the `neuronmap` command."""

import sys

from .cli import main

sys.exit(main())
