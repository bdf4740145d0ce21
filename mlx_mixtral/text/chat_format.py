"""Chat prompts: the Mistral instruct formats (token-exact with mistral-common) or a template.

- mistral-v1 (Mistral 7B v0.1/v0.2, Mixtral 8x7B): `[INST]` is text; the system prompt joins
  the first user message with a blank line.
- mistral-v3 (Mistral 7B v0.3, Mixtral 8x22B): `[INST]`/`[/INST]` are control tokens; the system
  prompt goes into the last user message; assistant text loses trailing spaces.
- template: the model's own Jinja chat template (`chat_template` in tokenizer_config.json or
  `tokenizer.chat_template` in a GGUF), rendered as transformers renders it, in a sandbox
  (template.py).

Assistant turns end with EOS. A conversation is built as per-message token segments, which is
how mistral-common builds it too; `ChatSession` relies on that to reuse its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ChatFormatError
from .protocol import Codec
from .template import render_template

FORMATS = ("mistral-v1", "mistral-v3", "template", "plain")
ROLES = ("system", "user", "assistant")
JOIN = "\n\n"  # mistral-common joins system prompts and consecutive same-role messages so


@dataclass
class Segment:
    role: str  # "bos", "user", "assistant", or "prompt" (a template's whole rendering)
    ids: list[int]
    text: str = field(default="", repr=False)


def detect_chat_format(tokenizer: Codec) -> str:
    """mistral-v3 when [INST] is a control token; the model's template when it has one that is
    not Mistral's; mistral-v1 for a sentencepiece Mistral vocabulary; else plain."""
    if tokenizer.token_id("[INST]") is not None:
        return "mistral-v3"
    template = tokenizer.chat_template
    if template and "[INST]" not in template:
        return "template"
    if template or tokenizer.sentencepiece:
        return "mistral-v1"
    return "plain"


def clean_text(text: str) -> str:
    """Text may carry what is not UTF-8 (lone surrogates from undecodable bytes): U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8")


def normalize(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """(system prompt, alternating user/assistant turns) as mistral-common aggregates them."""
    if not isinstance(messages, list):
        raise ChatFormatError("messages must be a list of {'role', 'content'} objects")
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for m in messages:
        if not isinstance(m, dict):
            raise ChatFormatError(f"a message must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"{role} message content must be text")
        content = clean_text(content)
        if role == "system":
            system.append(content)
        elif turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + JOIN + content}
        else:
            turns.append({"role": role, "content": content})
    if not any(t["role"] == "user" for t in turns):
        raise ChatFormatError("the conversation has no user message")
    return (JOIN.join(system) if system else None), turns


def mistral_segments(tokenizer: Codec, messages: list[dict[str, str]],
                     version: str) -> list[Segment]:
    system, turns = normalize(messages)
    user_positions = [i for i, t in enumerate(turns) if t["role"] == "user"]
    first_user, last_user = user_positions[0], user_positions[-1]
    segments = [Segment("bos", [tokenizer.bos_id], "<s>")]
    inst, end_inst = tokenizer.token_id("[INST]"), tokenizer.token_id("[/INST]")
    for i, turn in enumerate(turns):
        content = turn["content"]
        if turn["role"] == "assistant":
            if version == "mistral-v3":
                content = content.rstrip(" ")
            ids = tokenizer.encode(content) + [tokenizer.eos_id]
            segments.append(Segment("assistant", ids, content + "</s>"))
        elif version == "mistral-v1":
            if i == first_user and system:
                content = system + JOIN + content
            text = f"[INST] {content} [/INST]"
            segments.append(Segment("user", tokenizer.encode(text), text))
        else:
            if i == last_user and system:
                content = system + JOIN + content
            ids = [inst, *tokenizer.encode(content), end_inst]
            segments.append(Segment("user", ids, f"[INST]{content}[/INST]"))
    return segments


def _render(tokenizer: Codec, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    bos = tokenizer.decode_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    return render_template(tokenizer.chat_template, messages, add_generation_prompt,
                           bos_token=bos, eos_token=tokenizer.decode_piece(tokenizer.eos_id))


def format_segments(tokenizer: Codec, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True,
                    chat_format: str | None = None) -> list[Segment]:
    fmt = chat_format or tokenizer.chat_format
    if fmt not in FORMATS:
        raise ChatFormatError(f"unknown chat format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in ("mistral-v1", "mistral-v3"):
        if fmt == "mistral-v3" and tokenizer.token_id("[INST]") is None:
            raise ChatFormatError("mistral-v3 needs [INST] control tokens; this tokenizer has "
                                  "none (use mistral-v1)")
        return mistral_segments(tokenizer, messages, fmt)
    if fmt == "template":
        if not tokenizer.chat_template:
            raise ChatFormatError("the model has no chat template")
        normalize(messages)  # the same validation as the other formats
        messages = [{**m, "content": clean_text(m["content"])} for m in messages]
        text = _render(tokenizer, messages, add_generation_prompt)
        return [Segment("prompt", tokenizer.encode(text), text)]
    system, turns = normalize(messages)
    text = "".join(f"{t['role'].title()}: {t['content']}\n" for t in turns)
    text = (f"{system}\n" if system else "") + text + ("Assistant:" if add_generation_prompt
                                                       else "")
    return [Segment("prompt", tokenizer.encode(text, add_bos=tokenizer.add_bos), text)]


def apply_chat_template(tokenizer: Codec, messages: list[dict[str, str]],
                        add_generation_prompt: bool = True, tokenize: bool = True,
                        chat_format: str | None = None) -> list[int] | str:
    segments = format_segments(tokenizer, messages, add_generation_prompt, chat_format)
    if tokenize:
        return [i for s in segments for i in s.ids]
    return "".join(s.text for s in segments)
