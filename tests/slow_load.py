"""`mlx-mixtral` whose loads of the models named WORD take SECONDS longer (usage: slow_load.py
WORD SECONDS ARGS...): a load that lasts, on the thread that loads, to see that requests for
the other models go on meanwhile."""

from __future__ import annotations

import sys
import time

import mlx_mixtral.cli.serve as serve
from mlx_mixtral.cli import main

WORD, SECONDS = sys.argv[1], float(sys.argv[2])
real = serve.load_from_plan


def slow(plan):
    if WORD in str(plan.name):
        time.sleep(SECONDS)
    return real(plan)


serve.load_from_plan = slow
sys.exit(main(sys.argv[3:]))
