"""The package's shape: which folder may import which, no cycles, a light top-level import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import seeing

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_mixtral"
# Shared by every folder; they import only each other.
LEAVES = {"errors", "units", "jsonfile", "lazy", "user_files", "demo", "threads"}
# What each folder may import from the package (besides itself and the leaves).
ALLOWED = {
    "model": set(),
    "text": set(),
    "loading": {"model", "text"},
    "generation": {"model", "text"},
    "catalog": {"model", "text", "loading"},
    "convert": {"model", "text", "loading"},
    "prefixes": {"model", "loading", "generation"},
    "app": {"model", "text", "loading", "catalog", "generation", "prefixes"},
    "server": {"__init__", "model", "text", "loading", "catalog", "generation", "prefixes"},
    "cli": {"__init__", "model", "text", "loading", "catalog", "generation", "convert", "app",
            "server", "prefixes"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file, as absolute names (the type
    checker's imports left out)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}  # `from . import x`
    return found


def ours(names: set[str]) -> set[str]:
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {n for n in names if n in modules}


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def fresh_imports(code: str, *modules: str, env: dict[str, str] | None = None
                  ) -> tuple[list[str], str]:
    """Run `code` in a new Python (stdin closed): which of `modules` (or modules inside them)
    it imported, and what it wrote on stderr."""
    probe = (f"{code}\nimport sys\nprint(sorted(m for m in sys.modules "
             f"if any(m == n or m.startswith(n + '.') for n in {modules!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, stdin=subprocess.DEVNULL, env=env)
    return ast.literal_eval(out.stdout.strip().splitlines()[-1]), out.stderr


def test_folders_import_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        folder = folder_of(module_name(path))
        if folder not in ALLOWED:
            continue
        for target in ours(imports_of(path)):
            dest = folder_of(target)
            if dest not in {folder, *LEAVES, *ALLOWED[folder]}:
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, wrong


def test_leaves_import_only_leaves():
    for leaf in LEAVES:
        targets = {folder_of(t) for t in ours(imports_of(PACKAGE / f"{leaf}.py"))}
        assert targets <= LEAVES, (leaf, targets - LEAVES)


def test_model_needs_only_mlx_and_mlx_lm_models():
    for path in (PACKAGE / "model").rglob("*.py"):
        for name in imports_of(path):
            if name.startswith("mlx_lm"):
                assert name.startswith("mlx_lm.models"), (path.name, name)


def test_text_does_not_import_mlx():
    for path in (PACKAGE / "text").rglob("*.py"):
        assert not {n for n in imports_of(path) if n.split(".")[0] in ("mlx", "mlx_lm")}, path
    code = "import mlx_mixtral.text, mlx_mixtral.text.gguf_vocab, mlx_mixtral.text.template"
    assert fresh_imports(code, "mlx", "mlx_lm")[0] == []


def test_no_import_cycle():
    graph = {module_name(p): ours(imports_of(p)) for p in PACKAGE.rglob("*.py")}
    # A package's own __init__ imported by its children is how Python works, not a cycle.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_chat_server_imports_no_mlx():
    """`chat --server` loads nothing here: the app modules it runs (the app, its HTTP engine,
    the store, the CLI that starts them) must not import MLX, mlx-lm or transformers."""
    code = ("import mlx_mixtral.cli.main, mlx_mixtral.app.chat_app, "
            "mlx_mixtral.app.http_engine, mlx_mixtral.app.store")
    assert fresh_imports(code, "mlx", "mlx_lm", "transformers", "torch")[0] == []


def test_chat_server_command_imports_no_model_stack():
    """The whole `chat --server` command (up to where it wants a terminal) leaves the model's
    stack alone. (The parser's flag choices still import `mlx.core` itself: cheap.)"""
    code = ("from mlx_mixtral.cli.main import main; "
            "main(['chat', '--server', 'http://127.0.0.1:9'])")
    imported, stderr = fresh_imports(code, "mlx.nn", "mlx_lm", "transformers", "torch")
    assert "needs a terminal" in stderr  # it got as far as the app
    assert imported == []


def test_import_is_light():
    # torch must be findable here, or its absence would prove nothing.
    assert fresh_imports("import mlx_mixtral", "transformers", "torch",
                         env=seeing("torch"))[0] == []


def test_help_imports_no_model_or_server_stack():
    """Every command builds the whole parser first: it must not import mlx-lm, transformers or
    the web stack (that once made `--help` take 7 s)."""
    code = "from mlx_mixtral.cli.main import build_parser; build_parser()"
    assert fresh_imports(code, "mlx_lm", "transformers", "fastapi", "uvicorn")[0] == []


def test_public_api_still_importable():
    import mlx_mixtral

    for name in mlx_mixtral.__all__:
        assert getattr(mlx_mixtral, name) is not None, name


def test_loading_imports_nothing_from_the_app():
    """The load policy is the library's: no front end's module decides it (ALLOWED implies
    this; said here on its own, since the app once held a copy of the policy)."""
    wrong = [f"{module_name(path)} imports {target}"
             for path in (PACKAGE / "loading").rglob("*.py")
             for target in ours(imports_of(path)) if folder_of(target) == "app"]
    assert not wrong, wrong


FLAG = re.compile(r"(?<![\w-])--[a-zA-Z]")


def _docstrings(tree: ast.Module) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)}


def test_generation_and_model_name_parameters_not_flags():
    """Library messages name the API parameter (`max_memory`, `kv_bits`); the CLI puts its
    flags in (cli/flags.py `with_flags`). Docstrings and comments may mention flags."""
    found = []
    for folder in ("generation", "model"):
        for path in (PACKAGE / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            docs = _docstrings(tree)
            found += [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and id(node) not in docs and FLAG.search(node.value)]
    assert not found, found


def test_the_readme_names_every_module():
    """README's "How it is built" table lists every module, each in its folder's row."""
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## How it is built"):readme.index("## Performance")]
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `")}
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        # The shared files have one row, headed by the first of them.
        row = rows.get("mlx_mixtral/errors.py" if path.parent == PACKAGE
                       else f"mlx_mixtral/{path.parent.name}/", "")
        if f"`{path.name}`" not in row and f"/{path.name}`" not in row:
            missing.append(str(path.relative_to(PACKAGE)))
    assert not missing, missing
    # ... and no module that is gone (a file moved or deleted leaves its row behind).
    gone = [f"{head}: {name}" for head, row in rows.items() if head.startswith("mlx_mixtral/")
            for name in re.findall(r"`(\w+\.py)`", row)
            if not ((PACKAGE.parent / head).parent if head.endswith(".py")
                    else PACKAGE.parent / head).joinpath(name).is_file()]
    assert not gone, gone
