"""Multi-turn chat against `dsv3-worker serve`, with and without prefix caching: each turn resends
the whole history plus a new question. Prints, per turn, the prompt tokens, those taken from the
prefix cache, and the time to first token (median of REPS conversations), as a Markdown table.

    python3 worker/bench/prefix_cache.py [path/to/dsv3-worker] [extra serve args...]

MAX_TOKENS=N sets the answers' length (4); SYSTEM_WORDS=N puts a system message of N words before the conversation (a long shared history,
as an agent's instructions and tools), so each turn's prompt is that much longer.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/dsv3-worker"
EXTRA = sys.argv[2:]
TURNS, REPS = 5, 5
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "4"))
QUESTION = "More on rivers and ships? "
WORDS = "ships rivers harbours towns bridges sails winds tides maps stars".split()
SYSTEM = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(int(os.environ.get("SYSTEM_WORDS", "0"))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_stream(base, body):
    """Time to the first token (the first chunk with content or a finish: a token outside the
    tokenizer's vocabulary has no text), the answer, and the usage."""
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    start, first, text, usage = time.perf_counter(), None, "", None
    with urllib.request.urlopen(req) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c["delta"].get("content") or ""
                if (piece or c.get("finish_reason")) and first is None:
                    first = time.perf_counter() - start
                text += piece
    return first, text, usage


def conversation(base, rep):
    messages, rows = ([{"role": "system", "content": f"[{rep}] {SYSTEM}"}] if SYSTEM else []), []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": QUESTION})
        body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        ttft, text, usage = post_stream(base, body)
        messages.append({"role": "assistant", "content": text})
        rows.append((usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], ttft))
    return rows


def run(caching):
    port = free_port()
    args = [BIN, "serve", "--port", str(port), *EXTRA] + ([] if caching else ["--no-prefix-caching"])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(base + "/ready").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        # Each repetition is a new conversation (a different first question) so nothing is
        # shared between repetitions.
        runs = []
        for rep in range(REPS):
            global QUESTION
            QUESTION = f"[{rep}] " + QUESTION.split("] ", 1)[-1]
            runs.append(conversation(base, rep))
        return [(runs[0][t][0], runs[0][t][1], statistics.median(r[t][2] for r in runs)) for t in range(TURNS)]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


on, off = run(True), run(False)
print("| turn | prompt tokens | from the prefix cache | TTFT cached | TTFT without | prefill tokens computed (cached / without) |")
print("|---|---|---|---|---|---|")
for t, ((p, c, ttft_on), (_, c_off, ttft_off)) in enumerate(zip(on, off), 1):
    print(f"| {t} | {p} | {c} | {ttft_on * 1e3:.1f} ms | {ttft_off * 1e3:.1f} ms | {p - c} / {p - c_off} |")
total_on = sum(p - c for p, c, _ in on)
total_off = sum(p - c for p, c, _ in off)
print(f"\nprefill tokens computed over the conversation: {total_on} with caching, {total_off} without")
