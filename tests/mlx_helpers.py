"""MLX memory as one test sees it."""

from __future__ import annotations

import gc

import mlx.core as mx


def settled() -> int:
    """MLX's memory in use now, its peak reset: what earlier tests in this process still hold
    (their pagers' threads may keep slots alive), not counted against this test's budget."""
    gc.collect()
    mx.clear_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    return mx.get_active_memory()


# One paged run in a fresh interpreter: its RSS after the imports, then loading and greedy
# decoding (drafted with prompt lookup when asked); MLX's peak and the process's peak RSS over
# both. A test's own process holds what earlier tests left: only a fresh one measures RSS.
FRESH_RUN = """
import json, sys
import mlx.core as mx
from mlx_mixtral.generation import Stats, stream_generate
from mlx_mixtral.generation.sampling import SamplingParams
from mlx_mixtral.generation.speculative import LookupDrafter
from mlx_mixtral.loading import draft_needs, load
from mlx_mixtral.loading.process_memory import current_rss, peak_rss, reset_peak_rss
a = json.loads(sys.argv[1])
class Ids:
    eos_ids = frozenset()
    def detokenizer(self): return self
    def add_token(self, token): return ""
    def finalize(self): return ""
base = current_rss()
reset_peak_rss()
mx.reset_peak_memory()
k = a["lookup"]
model, _ = load(a["path"], tokenizer=False, max_memory=a["budget"], context=a["context"],
                draft=draft_needs(k) if k else None)
*_, stats = stream_generate(model, Ids(), a["prompt"], draft=LookupDrafter(k) if k else None,
                            sampling=SamplingParams(temperature=0, max_tokens=a["tokens"]))
model.limits.expert_pager.close()
print(json.dumps({"tokens": stats.tokens, "base": base, "rss": peak_rss(),
                  "mlx": mx.get_peak_memory(), "slots": model.limits.memory_plan.slots}))
"""


def fresh_paged_run(path, budget: int, prompt: list[int], tokens: int = 256,
                    context: int = 512, lookup: int = 0) -> dict:
    """FRESH_RUN in a new interpreter: {"tokens", "base" (RSS after the imports), "rss" (peak),
    "mlx" (MLX's peak), "slots"}."""
    import json
    import subprocess
    import sys

    args = dict(path=str(path), budget=budget, prompt=prompt, tokens=tokens, context=context,
                lookup=lookup)
    r = subprocess.run([sys.executable, "-c", FRESH_RUN, json.dumps(args)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_within(run: dict, budget: int) -> None:
    """MLX's peak within the budget + 5%, the peak RSS within the budget + the interpreter's
    own baseline + 10%."""
    assert run["mlx"] <= 1.05 * budget, (run["mlx"] / budget, budget)
    over = run["rss"] - run["base"]
    assert over <= 1.10 * budget, f"RSS {over / budget:.2f}x the budget of {budget:,}"
