"""Soak: rounds of the sustained load (`test_load.py`) back to back for DSV3_SOAK_SECONDS (skipped
when unset; RELIABILITY.md keeps a 30-minute run), against DSV3_SOAK_TARGET (`serve`, the
default, or `fleet`). A fifth of the clients, chosen at random each round, hang up after a random
number of tokens. Every request completes with its prompt's answer, is refused with 429 and
`Retry-After`, or is its client's own hang-up; the KV cache is empty after every round; and the
resident memory of the last rounds stays within 10% + 64 MiB of the first minute's."""

import json
import os
import random
import subprocess
import time
import urllib.request

import pytest

from test_load import CLIENTS, PROMPTS, body, metric, one, rss_bytes
from test_openai_client import BIN, free_port, wait_ready
import concurrent.futures

SECONDS = int(os.environ.get("DSV3_SOAK_SECONDS", "0"))
TARGET = os.environ.get("DSV3_SOAK_TARGET", "serve")


def round_with_random_hang_ups(port, expected, rng):
    hang = {i for i in range(CLIENTS) if rng.random() < 0.2}
    with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        outcomes = list(pool.map(lambda i: one(port, i, expected, hang_up=i in hang), range(CLIENTS)))
    tally = {}
    for o in outcomes:
        tally[o] = tally.get(o, 0) + 1
    return tally


@pytest.mark.skipif(SECONDS <= 0, reason="set DSV3_SOAK_SECONDS to soak")
def test_memory_stays_flat_under_hours_of_load_with_random_cancellations():
    port = free_port()
    extra = ["--attention", "2", "--experts", "3"] if TARGET == "fleet" else []
    proc = subprocess.Popen([BIN, TARGET, "--port", str(port), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    pids = [proc.pid]
    if TARGET == "fleet":
        pids += [json.loads(proc.stdout.readline())["pid"] for _ in range(2 + 3 + 1)]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        expected = []
        for p in range(PROMPTS):
            request = urllib.request.Request(base + "/v1/completions", json.dumps(body(p, stream=False)).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                expected.append(json.load(r)["choices"][0]["token_ids"])
        rng = random.Random(7)
        started, samples, totals = time.time(), [], {}
        while time.time() - started < SECONDS:
            tally = round_with_random_hang_ups(port, expected, rng)
            assert set(tally) <= {"completed", "refused", "hung up"}, tally
            for k, v in tally.items():
                totals[k] = totals.get(k, 0) + v
            deadline = time.time() + 5
            while metric(base, "dsv3_kv_cache_used_blocks") != 0 and time.time() < deadline:
                time.sleep(0.1)
            assert metric(base, "dsv3_kv_cache_used_blocks") == 0
            samples.append((time.time() - started, rss_bytes(pids)))
        minutes = {}
        for t, m in samples:
            minutes.setdefault(int(t // 60), []).append(m)
        print(f"\n{TARGET}: {len(samples)} rounds of {CLIENTS} in {samples[-1][0]:.0f} s: {totals}")
        print("| minute | rounds | resident memory, MiB (max) |")
        print("|---:|---:|---:|")
        for minute, ms in sorted(minutes.items()):
            print(f"| {minute} | {len(ms)} | {max(ms) >> 20} |")
        first = max(minutes[min(minutes)])
        last = max(m for t, m in samples if t >= samples[-1][0] * 0.9)
        assert last <= first * 1.1 + (64 << 20), f"resident memory grew: first minute {first}, last rounds {last}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
