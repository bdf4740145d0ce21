"""Tool calls through a model's own chat template (Hermes / Qwen `<tool_call>` blocks, Llama
3.1's JSON): the prompt is the template rendered with the tools and the conversation's calls
and results exactly as transformers renders it (the oracle), and against a real `serve` of a
random tiny Mixtral whose tokenizer carries a Qwen 2.5 style template, tool choice holds the
reply to the tool's schema (jsonschema, the oracle) whatever the random weights sample."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
import transformers
from conftest import build_hf
from server_helpers import Server
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mlx_mixtral.text.tokenizer import load_folder_tokenizer
from mlx_mixtral.text.tool_formats import template_tool_text, tool_format

# Qwen 2.5's template, trimmed (its default system prompt shortened).
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 - the template's own long lines

# Llama 3.1's template, trimmed to its custom-tool part.
LLAMA = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 - the template's own long lines

KEY = "sesame"
WEATHER = {"type": "object", "required": ["city", "days"],
           "properties": {"city": {"type": "string", "maxLength": 6},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
CLOCK = {"type": "object", "required": ["zone"], "properties": {"zone": {"enum": ["UTC", "CET"]}}}
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n} somewhere",
                                           "parameters": s}} for n, s in SCHEMAS.items()]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
# A conversation with a call and its result: as OpenAI clients send it, and as transformers'
# documentation writes it for apply_chat_template.
CALLED = [{"role": "system", "content": "Be brief."}, *ASK,
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"}]
CALLED_HF = [{"role": "system", "content": "Be brief."}, *ASK,
             {"role": "assistant", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris", "days": 2}}}]},
             {"role": "tool", "name": "get_weather", "content": "sunny, 21 °C"}]


def byte_tokenizer(special: list[str], added: list[str], eos: str,
                   bos: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE without merges (one token per byte: any text, JSON included), with the
    template's control tokens: `special` ones and `added` plain ones (Qwen's `<tool_call>`)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos,
                                                bos_token=bos)


def qwen_folder(folder):
    hf = byte_tokenizer(["<|im_start|>", "<|im_end|>"],
                        ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
                        eos="<|im_end|>")
    hf.chat_template = QWEN
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen")
    hf = qwen_folder(folder)
    # (Its generation config names the tokenizer's end token, not Mixtral's default 2: here
    # a byte any JSON string may hold.)
    build_hf(folder, "mixtral", vocab_size=len(hf), num_local_experts=4,
             num_experts_per_tok=2, max_position_embeddings=2048,
             eos_token_id=hf.eos_token_id, bos_token_id=None)
    server = Server("--api-key", KEY, "--max-tokens", "160", "--model-id", "tiny",
                    model=str(folder))
    server.folder, server.hf = folder, hf
    yield server
    server.stop()


def chat(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _valid(calls, only: str | None) -> None:
    assert len(calls) == 1, calls  # parallel calls are off
    name, arguments = calls[0].function.name, json.loads(calls[0].function.arguments)
    assert name in SCHEMAS and (only is None or name == only), name
    jsonschema.validate(arguments, SCHEMAS[name])


# ---- the prompt: transformers' rendering is the oracle ------------------------------------


@pytest.mark.parametrize("conversation", [ASK, CALLED], ids=["ask", "called"])
def test_qwen_prompt_renders_as_transformers(tmp_path, conversation):
    hf = qwen_folder(tmp_path)
    ours = load_folder_tokenizer(tmp_path)
    assert tool_format(ours).name == "hermes"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    theirs = hf.apply_chat_template(CALLED_HF if conversation is CALLED else ASK, tools=TOOLS,
                                    tokenize=False, add_generation_prompt=True)
    text = template_tool_text(ours, conversation, TOOLS)
    assert text == theirs
    assert '"name": "get_time"' in text and "<tool_response>\nsunny" in text \
        if conversation is CALLED else '"name": "get_time"' in text
    assert ours.encode(text) == hf(theirs, add_special_tokens=False)["input_ids"]


def test_llama_prompt_renders_as_transformers_and_its_calls_read_back(tmp_path):
    llama_folder(tmp_path)
    ours = load_folder_tokenizer(tmp_path)
    fmt = tool_format(ours)
    assert fmt.name == "llama3-json"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert template_tool_text(ours, CALLED, TOOLS) == hf.apply_chat_template(
        CALLED_HF, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    calls = fmt.parse('{"name": "get_time", "parameters": {"zone": "CET"}}')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_time", {"zone": "CET"})]
    assert fmt.parse("It is sunny.") is None


def test_hermes_calls_read_back_with_the_markers_as_text_or_left_out(tmp_path):
    """Qwen writes `<tool_call>` as a plain token (in the text), other models as a special one
    (left out of the decoded text): both read back the same calls."""
    qwen_folder(tmp_path)
    fmt = tool_format(load_folder_tokenizer(tmp_path))
    one, two = '{"name": "get_time", "arguments": {"zone": "UTC"}}', \
        '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}'
    for text in (f"<tool_call>\n{one}\n</tool_call>\n<tool_call>\n{two}\n</tool_call>",
                 f"\n{one}\n\n{two}\n"):
        assert [c["function"]["name"] for c in fmt.parse(text)] == ["get_time", "get_weather"]
    assert fmt.parse(f"<tool_call>\n{one[:-3]}") is None  # cut short: text
    quoted = '{"name": "get_weather", "arguments": {"city": "</tool_call>", "days": 1}}'
    (call,) = fmt.parse(f"<tool_call>\n{quoted}\n</tool_call>")
    assert json.loads(call["function"]["arguments"])["city"] == "</tool_call>"


def llama_folder(folder):
    hf = byte_tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"], [], eos="<|eot_id|>", bos="<|begin_of_text|>")
    hf.chat_template = LLAMA
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("family", ["hermes", "llama3-json"])
def test_under_auto_text_may_not_start_as_a_call_and_a_call_follows_the_schema(tmp_path,
                                                                                family):
    """The "auto" grammar, token by token (llguidance's matcher over our vocabulary): text
    that spells out how a call starts is refused (else it would start a call no schema holds),
    other text passes, and a call is held to the tool's schema."""
    import llguidance

    from mlx_mixtral.generation.grammar import call_grammar, vocabulary

    hf = (qwen_folder if family == "hermes" else llama_folder)(tmp_path)
    ours = load_folder_tokenizer(tmp_path)
    fmt = tool_format(ours)
    assert fmt.name == family
    grammar = call_grammar(fmt.syntax(ours, TOOLS, None, False), True, ours, len(hf))

    def accepted(ids: list[int]) -> int:
        return llguidance.LLMatcher(vocabulary(ours, len(hf)), grammar).validate_tokens(ids)

    # Qwen's call token spelled out byte by byte; a reply starting "{" that is no call.
    spelled = ours.encode("<tool_call") + ours.encode(">") if family == "hermes" \
        else ours.encode("{hello")
    assert accepted(spelled) == (len(spelled) - 1 if family == "hermes" else 1)
    assert accepted(ours.encode("It is sunny.")) == len(ours.encode("It is sunny."))
    key = "arguments" if family == "hermes" else "parameters"
    good = f'{{"name": "get_time", "{key}": {{"zone": "UTC"}}}}'
    bad = f'{{"name": "get_time", "{key}": {{"zone": "GMT"}}}}'
    wrap = (lambda body: [fmt.start_token, *ours.encode(f"\n{body}\n</tool_call>")]) \
        if family == "hermes" else ours.encode
    assert accepted(wrap(good)) == len(wrap(good))
    assert accepted(wrap(bad)) < len(wrap(bad))


def test_a_template_without_tools_cannot_call_tools(tmp_path):
    hf = byte_tokenizer(["<|im_start|>", "<|im_end|>"], ["<tool_call>"], eos="<|im_end|>")
    hf.chat_template = QWEN.replace("tools", "extras")
    hf.save_pretrained(tmp_path)
    assert tool_format(load_folder_tokenizer(tmp_path)) is None


# ---- a real server: tool choice on the template's calls -----------------------------------


@pytest.mark.parametrize("named", [False, True], ids=["required", "named"])
def test_forced_calls_follow_the_tool_schema(tiny, named):
    choice = {"type": "function", "function": {"name": "get_weather"}} if named else "required"
    for seed in range(10):
        reply = chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1,
            seed=seed, parallel_tool_calls=False)
        assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
        _valid(reply.choices[0].message.tool_calls, "get_weather" if named else None)


def test_none_never_calls_even_when_the_model_wants_to(tiny):
    """+100 on `<tool_call>` (the model's sure choice otherwise) under "none": still text."""
    start = tool_format(load_folder_tokenizer(tiny.folder)).start_token
    for seed in range(5):
        reply = chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", temperature=1,
            seed=seed, max_tokens=8, logit_bias={str(start): 100})
        assert not reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "length"
        assert not reply.choices[0].message.content.startswith("<tool_call>")  # banned


def test_auto_holds_a_started_call_to_the_schema_and_streams_it_whole(tiny):
    """Pushed to start a call under "auto", the call is whole and valid; streamed, its text is
    held back and comes as structured `tool_calls`."""
    start = tool_format(load_folder_tokenizer(tiny.folder)).start_token
    for seed in range(3):
        stream = chat(tiny).chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice="auto", temperature=1,
            seed=seed, logit_bias={str(start): 100}, parallel_tool_calls=False, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert text == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
        _valid([d for d in deltas], None)


def test_show_lists_tools_and_a_round_trip_through_anthropic(tiny):
    show = httpx.post(tiny.url + "/api/show", json={"model": "tiny"},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert "tools" in show["capabilities"]
    tools = [{"name": n, "description": f"{n} somewhere", "input_schema": s}
             for n, s in SCHEMAS.items()]
    client = claude(tiny)
    first = client.messages.create(model="tiny", max_tokens=160, messages=ASK, tools=tools,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   extra_body={"seed": 1})
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    jsonschema.validate(use.input, SCHEMAS[use.name])
    turn = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": "sunny"}]}]
    answer = client.messages.create(model="tiny", max_tokens=8, messages=turn, tools=tools,
                                    tool_choice={"type": "none"})
    assert answer.content[0].type == "text" and answer.stop_reason == "max_tokens"
    # The server's prompt for that turn is transformers' rendering of the same conversation.
    counted = client.messages.count_tokens(model="tiny", messages=turn, tools=tools)
    hf_turn = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": use.name, "arguments": use.input}}]},
        {"role": "tool", "name": use.name, "content": "sunny"}]
    hf_tools = [{"type": "function", "function": {"name": t["name"],
                                                  "description": t["description"],
                                                  "parameters": t["input_schema"]}}
                for t in tools]
    expected = tiny.hf.apply_chat_template(hf_turn, tools=hf_tools, tokenize=False,
                                           add_generation_prompt=True)
    assert counted.input_tokens == len(tiny.hf(expected, add_special_tokens=False)["input_ids"])


def test_responses_required_call_follows_the_schema(tiny):
    for seed in range(3):
        reply = chat(tiny).responses.create(
            model="tiny", input=ASK, tool_choice="required", temperature=1,
            parallel_tool_calls=False, max_output_tokens=160, extra_body={"seed": seed},
            tools=[{"type": "function", "name": n, "parameters": s}
                   for n, s in SCHEMAS.items()])
        (call,) = [i for i in reply.output if i.type == "function_call"]
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
