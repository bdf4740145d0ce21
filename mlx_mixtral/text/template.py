"""A model's own Jinja chat template, rendered as transformers renders it, in a sandbox.

Templates arrive with untrusted model files, so they run in Jinja's immutable sandbox, with the
same extras transformers gives them: `loopcontrols` (break / continue), a `tojson` that keeps
non-ASCII text and takes indent / separators / sort_keys, `strftime_now`, `raise_exception`,
and a `namespace` that refuses underscore names. tools and documents are passed when given.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import ChatFormatError


class _TemplateRefusedError(Exception):
    """The template called raise_exception(message)."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefusedError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> Any:
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class SafeNamespace(Namespace):
        """`namespace()` that refuses underscore names (no reaching CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace.check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace.check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=SafeNamespace)
    return env.from_string(source)


@lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """The names a template reads from what it is given (messages, tools, documents ...);
    none when it does not parse. Parsing runs nothing of the template."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        parsed = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except TemplateSyntaxError:
        return frozenset()
    return frozenset(meta.find_undeclared_variables(parsed))


def render_template(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    bos_token: str, eos_token: str, tools: list[dict] | None = None,
                    documents: list[dict] | None = None) -> str:
    """The template's text for `messages`; `ChatFormatError` if it fails or refuses them."""
    from jinja2 import TemplateError

    try:
        return _compile(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            documents=documents, bos_token=bos_token, eos_token=eos_token)
    except _TemplateRefusedError as e:
        raise ChatFormatError(f"the model's chat template refused the messages: {e}") from None
    except (TemplateError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise ChatFormatError(f"the model's chat template failed: {e}") from None
