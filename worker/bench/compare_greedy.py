"""Greedy completions of the same prompts from several running dsv3 servers, compared pairwise.

    python3 compare_greedy.py --max-tokens 24 LABEL=PORT LABEL=PORT [LABEL=PORT ...]

Waits for every server's /ready, sends four prompts concurrently to each (token ids, temperature 0,
top-2 log-probabilities), then prints for each pair of servers, prompt by prompt, whether the tokens
are the same and, where they part, the first server's top-2 log-probability margin there (a small
margin is a near-tie that rounding may tip).
"""
import argparse
import concurrent.futures as cf
import itertools
import json
import time
import urllib.request

PROMPTS = [[0, 5, 77, 300, 12], [9, 9, 100, 400], [42, 7] * 40, [1000, 7, 1]]  # inside any vocabulary of 1024+


def call(port, path, body=None, timeout=300):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def wait_ready(port, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            call(port, "/ready", timeout=5)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"the server on port {port} did not become ready")


def completions(port, max_tokens):
    model = call(port, "/v1/models")["data"][0]["id"]
    body = lambda p: {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                      "ignore_eos": True, "return_token_ids": True, "logprobs": 2}
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        return [r["choices"][0] for r in ex.map(lambda p: call(port, "/v1/completions", body(p)), PROMPTS)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("servers", nargs="+", help="LABEL=PORT")
    args = parser.parse_args()
    servers = [(label, int(port)) for label, port in (s.split("=", 1) for s in args.servers)]
    for _, port in servers:
        wait_ready(port)
    answers = {label: completions(port, args.max_tokens) for label, port in servers}
    for (first, a), (second, b) in itertools.combinations(answers.items(), 2):
        print(f"{first} vs {second}:")
        for i, (x, y) in enumerate(zip(a, b)):
            tx, ty = x["token_ids"], y["token_ids"]
            k = next((j for j in range(min(len(tx), len(ty))) if tx[j] != ty[j]), None)
            if k is None:
                print(f"  prompt {i}: the same {len(tx)} greedy tokens")
                continue
            top = sorted(x["logprobs"]["top_logprobs"][k].values(), reverse=True)
            margin = f"{top[0] - top[1]:.4f}" if len(top) > 1 else "n/a"
            print(f"  prompt {i}: {k} tokens agree; there {first}'s top-2 logprob margin is {margin}")


if __name__ == "__main__":
    main()
