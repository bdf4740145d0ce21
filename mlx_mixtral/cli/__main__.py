"""`python -m mlx_mixtral.cli`: the same as the `mlx-mixtral` command."""

import sys

from .main import main

sys.exit(main())
