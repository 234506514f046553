"""The official `openai` Python client against a real dsv3 fleet (router + 2 attention ranks +
3 expert shards on loopback) and the all-in-one `serve`: chat, streaming and completions."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DSV3_WORKER", os.path.join(ROOT, "target", "debug", "dsv3-worker"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/ready") as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(base + " did not become ready")


def launched(mode, *extra):
    """Starts `dsv3-worker MODE --port P EXTRA...`, yields (client, base URL) once it is ready,
    and stops it (with every member of a fleet) afterwards."""
    port = free_port()
    args = [BIN, mode, "--port", str(port), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused"), base
    finally:
        # The launcher's members are in its session: stop them all.
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["fleet", "serve"])
def client(request):
    extra = ["--attention", "2", "--experts", "3"] if request.param == "fleet" else []
    for client, _ in launched(request.param, *extra):
        yield client


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["dsv3-tiny"]


def test_chat(client):
    r = client.chat.completions.create(
        model="dsv3-tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_chat_streaming_matches_the_plain_answer(client):
    kwargs = dict(model="dsv3-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0, seed=1)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10


def test_completions_text_and_token_ids(client):
    r = client.completions.create(model="dsv3-tiny", prompt="Hello, world!", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    ids = client.completions.create(
        model="dsv3-tiny", prompt=[683, 13, 615], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ids.usage.completion_tokens == 4


def test_logprobs(client):
    r = client.chat.completions.create(
        model="dsv3-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and len(content[0].top_logprobs) == 2
    assert content[0].logprob <= 0


def test_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dsv3-tiny", prompt="x", max_tokens=5, temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_request_ids_name_the_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="dsv3-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_headers={"X-Request-Id": "e2e-42"},
    )
    assert raw.headers["x-request-id"] == "e2e-42"
    assert raw.parse().id == "chatcmpl-e2e-42"


def post_json(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def test_tokenize_agrees_with_the_completion(client):
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    messages = [{"role": "user", "content": "Hello there!"}]
    counted = post_json(root + "/tokenize", {"model": "dsv3-tiny", "messages": messages})
    usage = client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=1).usage
    assert counted["count"] == usage.prompt_tokens == len(counted["tokens"])
    plain = post_json(root + "/tokenize", {"prompt": "Hello there!", "add_special_tokens": False})
    assert post_json(root + "/detokenize", {"tokens": plain["tokens"]})["prompt"] == "Hello there!"


@pytest.fixture(scope="module", params=["fleet", "serve"])
def small_cache(request):
    """`serve`, and a fleet of 1 attention rank + 2 expert shards, with a KV cache of 128
    positions: half the tiny model's context of 256."""
    extra = ["--attention", "1", "--experts", "2"] if request.param == "fleet" else []
    yield from launched(request.param, "--cache-tokens", "128", *extra)


def test_omitted_max_tokens_runs_at_full_concurrency_on_a_small_cache(small_cache):
    """No `max_tokens` (the SDK's default) means until the context ends: cache is taken as
    sequences grow, so four such requests run together on a cache that holds less than one
    context, the newest preempted and resumed; none fails, and each ends with `length` when the
    cache (here the tighter limit than the context) is full."""
    from concurrent.futures import ThreadPoolExecutor

    client, base = small_cache
    prompts = [f"Tell me about {w}" for w in ("ships", "trees", "rivers", "stars")]

    def ask(prompt):
        return client.chat.completions.create(
            model="dsv3-tiny",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, prompts))
    for a in answers:
        assert a.choices[0].finish_reason == "length"
        assert a.usage.completion_tokens > 8
        # The last token is never written to the cache: 128 positions serve 129 tokens.
        assert a.usage.prompt_tokens + a.usage.completion_tokens == 129
    with urllib.request.urlopen(base + "/metrics") as r:
        metrics = r.read().decode()
    preempted = [l for l in metrics.splitlines() if l.startswith("dsv3_num_preemptions_total{")]
    assert preempted and float(preempted[0].split()[-1]) > 0, preempted


def test_a_prompt_longer_than_the_cache_is_a_400(small_cache):
    client, _ = small_cache
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dsv3-tiny", prompt=list(range(2, 202)), max_tokens=4)
    assert "KV cache holds" in str(e.value)


def test_n_choices_stream_as_they_answer(client):
    kwargs = dict(model="dsv3-tiny", prompt="Once upon", max_tokens=6, temperature=1.0, seed=11, n=3,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs)
    assert [c.index for c in plain.choices] == [0, 1, 2]
    assert plain.usage.completion_tokens == 18
    texts = ["", "", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
    # Same seeds (seed + index), same draws, streamed or not.
    assert texts == [c.text for c in plain.choices]
    assert len(set(texts)) > 1, "the seeds differ, so should the choices"


def test_penalties_and_bias_change_the_greedy_answer(client):
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    body = {"model": "dsv3-tiny", "prompt": [683, 13, 615], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    plain = post_json(root + "/v1/completions", body)["choices"][0]["token_ids"]
    first = plain[0]
    biased = post_json(root + "/v1/completions", {**body, "logit_bias": {str(first): -100}})["choices"][0]["token_ids"]
    assert biased[0] != first and first not in biased
    # A bias of 6 makes the tiny model repeat token 500; penalties on the output stop it.
    favoured = {**body, "logit_bias": {"500": 6}}
    repeated = post_json(root + "/v1/completions", favoured)["choices"][0]["token_ids"]
    assert repeated == [500] * 24, repeated
    for penalties, most in (({"frequency_penalty": 2.0, "presence_penalty": 2.0}, 6), ({"repetition_penalty": 2.0}, 23)):
        penalised = post_json(root + "/v1/completions", {**favoured, **penalties})["choices"][0]["token_ids"]
        assert penalised[0] == 500 and penalised.count(500) <= most, (penalties, penalised)
    # Through the official client: the same options by their OpenAI names.
    r = client.completions.create(model="dsv3-tiny", prompt=[683, 13, 615], max_tokens=24, temperature=0,
                                  logit_bias={str(first): -100}, extra_body={"ignore_eos": True, "min_tokens": 4})
    assert r.usage.completion_tokens == 24


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}


def test_a_named_tool_choice_returns_that_call(client):
    """The tiny model writes noise, but a named `tool_choice` opens the call in the prompt and
    holds its arguments to the tool's schema, so the answer is a valid call of that tool, whole
    or streamed, with the same arguments."""
    kwargs = dict(model="dsv3-tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  max_tokens=30, temperature=0)
    r = client.chat.completions.create(**kwargs)
    call = r.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    assert r.choices[0].finish_reason == "stop"  # a named function, as OpenAI's API answers
    name, arguments = None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = delta_call.function.name or name
            arguments += delta_call.function.arguments or ""
    assert (name, arguments) == ("get_weather", call.function.arguments)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**kwargs, "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert "tool_choice" in str(e.value)
    # `required`: the model picks the tool, the grammar its arguments.
    r = client.chat.completions.create(**{**kwargs, "tools": [WEATHER, TIME], "tool_choice": "required", "seed": 4, "max_tokens": 120,
                                          "temperature": 1.0})
    call = r.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert (call.function.name, set(arguments)) in (("get_weather", {"city"}), ("get_time", {"utc"})), call


def test_a_tool_aware_chat_template_describes_the_tools():
    template = os.path.join(ROOT, "templates", "deepseek-v3-tools.jinja")
    for client, base in launched("serve", "--chat-template", template):
        tools = [{"type": "function", "function": {"name": "get_weather"}}]
        messages = [{"role": "user", "content": "Paris?"}]
        ids = post_json(base + "/tokenize", {"messages": messages, "tools": tools})["tokens"]
        text = post_json(base + "/detokenize", {"tokens": ids})["prompt"]
        assert "## Tools" in text and "`get_weather`" in text, text
        r = client.chat.completions.create(model="dsv3-tiny", messages=messages, tools=tools, tool_choice="required",
                                           max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("tool_calls", "length")


def test_structured_output_fits_the_schema(client):
    """The tiny model writes noise, but held to a JSON schema its answer parses and fits,
    streamed or not."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 999}, "tag": {"enum": ["red", "green", "blue"]}}, "required": ["ok", "n", "tag"],
              "additionalProperties": False}
    kwargs = dict(model="dsv3-tiny", messages=[{"role": "user", "content": "Give me JSON"}], max_tokens=60,
                  temperature=1.0, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}})
    r = client.chat.completions.create(**kwargs)
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value["ok"], bool) and 0 <= value["n"] <= 999 and value["tag"] in ("red", "green", "blue")
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**kwargs, "response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "no-such-type"}}}})
    assert "response_format" in str(e.value)


def test_a_resent_conversation_is_served_from_the_prefix_cache():
    """Multi-turn chat resends its history: the second request reports the history's whole
    cache blocks as `cached_tokens`, answers as the first did, and /metrics counts the hits."""
    for client, base in launched("serve"):
        history = [{"role": "user", "content": "Tell me about the history of ships and rivers " * 4}]
        kwargs = dict(model="dsv3-tiny", messages=history, max_tokens=6, temperature=0)
        first = client.chat.completions.create(**kwargs)
        second = client.chat.completions.create(**kwargs)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= 16 and cached < second.usage.prompt_tokens and cached % 16 == 0, cached
        assert second.choices[0].message.content == first.choices[0].message.content
        with urllib.request.urlopen(base + "/metrics") as r:
            metrics = r.read().decode()
        hits = [l for l in metrics.splitlines() if l.startswith("dsv3_prefix_cache_hits_total{")]
        assert hits and float(hits[0].split()[-1]) == cached, hits
        # `n` choices of a new prompt compute it once: the later choices take its blocks.
        fresh = [{"role": "user", "content": "Rivers, ships and harbours of old towns, please " * 4}]
        r = client.chat.completions.create(model="dsv3-tiny", messages=fresh, max_tokens=4, temperature=0, n=3)
        assert r.usage.prompt_tokens_details.cached_tokens >= 16


@pytest.mark.parametrize("mode", ["serve", "fleet"])
def test_speculative_decoding_answers_as_plain_decoding(mode):
    """`--speculative-tokens 2` (the MTP module drafts, one step verifies) gives the same greedy
    and seeded answers as plain decoding, and /metrics reports acceptance per draft position."""
    extra = ["--attention", "1", "--experts", "2"] if mode == "fleet" else []
    prompts = ["The history of ships and rivers", "Once upon a time", "你好，世界"]

    def answers(client):
        out = []
        for p in prompts:
            for kwargs in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=11, presence_penalty=0.5)):
                r = client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=24, **kwargs)
                out.append(r.choices[0].text)
        return out

    for client, _ in launched(mode, *extra):
        plain = answers(client)
    for client, base in launched(mode, *extra, "--speculative-tokens", "2"):
        assert answers(client) == plain
        # A rank's counters reach /metrics when the scheduler next probes it (every 500 ms).
        deadline = time.time() + 10
        while True:
            with urllib.request.urlopen(base + "/metrics") as r:
                metrics = r.read().decode()
            scored = [l for l in metrics.splitlines() if l.startswith("dsv3_spec_decode_draft_tokens_total{")]
            if scored or time.time() > deadline:
                break
            time.sleep(0.1)
        assert len(scored) == 2 and all(float(l.split()[-1]) > 0 for l in scored), scored
        rates = [l for l in metrics.splitlines() if l.startswith("dsv3_spec_decode_acceptance_rate{")]
        assert len(rates) == 2 and 'position="1"' in rates[0], rates


def test_max_model_len_and_max_num_seqs_are_honoured():
    """`--max-model-len` cuts the served context (a longer request is a 400 naming it, /tokenize
    reports it); with `--max-num-seqs 1` concurrent requests queue and all complete."""
    for client, base in launched("serve", "--max-model-len", "64", "--max-num-seqs", "1"):
        info = post_json(base + "/tokenize", {"model": "dsv3-tiny", "prompt": "hello"})
        assert info["max_model_len"] == 64, info
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="dsv3-tiny", prompt="ships and rivers " * 30, max_tokens=4)
        assert "64" in str(e.value)
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda p: client.completions.create(
                model="dsv3-tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text,
                ["one", "two", "three"]))
        alone = [client.completions.create(model="dsv3-tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                 for p in ["one", "two", "three"]]
        assert answers == alone
