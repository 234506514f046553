"""Sustained load: 1,000 concurrent streaming requests against `serve` and against a fleet
(router + 2 attention ranks + 3 expert shards), a tenth of the clients hanging up after a few
tokens. Every request either completes with the tokens its prompt gets alone, or is refused
with 429 and `Retry-After`; none is cut off or mixed up; when the load ends every KV cache block
is free again; a second round leaves the processes' memory where the first did."""

import concurrent.futures
import http.client
import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

from test_openai_client import BIN, free_port, wait_ready

CLIENTS = 1000
PROMPTS = 8
TOKENS = 16


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024
        except (OSError, AttributeError):
            pass
    return total


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


@pytest.fixture(scope="module", params=["serve", "fleet"])
def served(request):
    port = free_port()
    extra = ["--attention", "2", "--experts", "3"] if request.param == "fleet" else []
    proc = subprocess.Popen([BIN, request.param, "--port", str(port), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    pids, ranks = [proc.pid], []
    if request.param == "fleet":
        members = [json.loads(proc.stdout.readline()) for _ in range(2 + 3 + 1)]
        pids += [m["pid"] for m in members]
        # The attention ranks' own /metrics (on their gRPC port): what they still hold.
        ranks = [f"http://{m['address']}" for m in members if m["role"] == "attention"]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield port, pids, ranks
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def body(i, stream=True):
    return {"model": "dsv3-tiny", "prompt": f"Request number {i % PROMPTS}:", "max_tokens": TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": stream, "return_token_ids": True}


def one(port, i, expected, hang_up):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body(i)), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status == 429:
            return "refused" if r.getheader("Retry-After") else "429 without Retry-After"
        if r.status != 200:
            return f"status {r.status}"
        ids, finish = [], None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return f"error {chunk['error'].get('message')}"
            choice = chunk["choices"][0]
            ids += choice.get("token_ids") or []
            finish = choice.get("finish_reason") or finish
            if hang_up and len(ids) >= 3:
                return "hung up"
        if finish != "length" or len(ids) != TOKENS:
            return f"cut off: {len(ids)} tokens, finish {finish}"
        return "completed" if ids == expected[i % PROMPTS] else "mixed"
    except OSError as e:
        return f"connection: {e}"
    finally:
        conn.close()


def round_of_load(port, expected):
    with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        outcomes = list(pool.map(lambda i: one(port, i, expected, hang_up=i % 10 == 9), range(CLIENTS)))
    tally = {}
    for o in outcomes:
        tally[o] = tally.get(o, 0) + 1
    return tally


def test_a_thousand_concurrent_streams_complete_or_are_refused_and_leave_nothing_behind(served):
    port, pids, ranks = served
    base = f"http://127.0.0.1:{port}"
    expected = []
    for p in range(PROMPTS):
        request = urllib.request.Request(base + "/v1/completions", json.dumps(body(p, stream=False)).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            expected.append(json.load(r)["choices"][0]["token_ids"])
    memory = []
    for _ in range(2):
        started = time.time()
        tally = round_of_load(port, expected)
        print(f"{base}: {tally} in {time.time() - started:.1f}s")
        assert set(tally) <= {"completed", "refused", "hung up"}, tally
        assert tally.get("completed", 0) >= CLIENTS // 4, tally
        # Every sequence released once the load ends (hung-up clients' included): by the
        # scheduler's count and, in a fleet, by each rank's own.
        deadline = time.time() + 5
        while metric(base, "dsv3_kv_cache_used_blocks") != 0 and time.time() < deadline:
            time.sleep(0.1)
        assert metric(base, "dsv3_kv_cache_used_blocks") == 0
        for rank in ranks:
            assert metric(rank, "dsv3_rank_sequences") == 0, rank
        memory.append(rss_bytes(pids))
    print(f"resident memory after each round: {[m >> 20 for m in memory]} MiB")
    assert memory[1] <= memory[0] * 1.1 + (64 << 20), f"resident memory grew: {memory}"
