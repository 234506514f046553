"""`dsv3-worker download` against a local hub serving the tiny FP8 checkpoint in the hub's file
API layout: whole and per-role downloads, resumed transfers, checksums, skipped files, tokens;
then a fleet whose router, attention rank and expert shards each run from their own downloaded
directory answers as `serve` does."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from hub_server import COMMIT, Hub

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("DSV3_WORKER", os.path.join(ROOT, "target", "debug", "dsv3-worker"))
TINY = os.path.join(ROOT, "tests", "golden", "tiny-fp8")
REPO = "dsv3-test/tiny"
ROUTER_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture
def hub():
    hub = Hub(TINY, REPO, extra_files={"README.md": b"# tiny\n", "inference/model.py": b"print()\n"})
    yield hub
    hub.close()


def download(hub, target, *extra, token=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [BIN, "download", "--repo", REPO, "--dir", str(target), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def visible_files(directory):
    return {n for n in os.listdir(directory) if not n.startswith(".")}


def same_bytes(directory, name):
    with open(os.path.join(directory, name), "rb") as a, open(os.path.join(TINY, name), "rb") as b:
        return a.read() == b.read()


def test_the_whole_checkpoint_arrives_verified_and_a_second_run_fetches_nothing(hub, tmp_path):
    run = download(hub, tmp_path)
    assert run.returncode == 0, run.stderr
    assert visible_files(tmp_path) == set(os.listdir(TINY)), "exactly the model's files, no README or code"
    for name in os.listdir(TINY):
        assert same_bytes(tmp_path, name), name
    assert COMMIT in run.stderr
    manifest = json.load(open(tmp_path / ".dsv3-download.json"))
    assert manifest["commit"] == COMMIT and set(manifest["files"]) == set(os.listdir(TINY))

    transfers = len(hub.requests)
    again = download(hub, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 fetched" in again.stderr and f"{len(os.listdir(TINY))} already in place" in again.stderr
    later = hub.requests[transfers:]
    assert all(r == "bytes=0-0" or p.startswith("/api/") for p, r in later), f"only probes, got {later}"


def test_a_broken_transfer_resumes_where_it_stopped(hub, tmp_path):
    shard = "model-00002-of-00003.safetensors"
    hub.cut.add(shard)
    run = download(hub, tmp_path)
    assert run.returncode == 0, run.stderr
    assert same_bytes(tmp_path, shard)
    ranges = hub.body_requests(shard)
    assert len(ranges) == 2, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    size = os.path.getsize(os.path.join(TINY, shard))
    assert 0 < resumed_at < size, f"the retry starts mid-file, not over: {ranges}"


def test_a_file_that_fails_its_checksum_is_refused_and_not_kept(hub, tmp_path):
    shard = "model-00003-of-00003.safetensors"
    hub.corrupt.add(shard)
    run = download(hub, tmp_path)
    assert run.returncode != 0
    assert shard in run.stderr and "checksum" in run.stderr, run.stderr
    assert not (tmp_path / shard).exists()
    # Fixed at the source, the next run fetches it again and completes.
    hub.corrupt.clear()
    run = download(hub, tmp_path)
    assert run.returncode == 0, run.stderr
    assert same_bytes(tmp_path, shard)


def test_a_gated_repository_needs_the_token(tmp_path):
    hub = Hub(TINY, REPO, token="hf_secret")
    try:
        refused = download(hub, tmp_path)
        assert refused.returncode != 0
        assert "HF_TOKEN" in refused.stderr and "401" in refused.stderr, refused.stderr
        wrong = download(hub, tmp_path, token="hf_wrong")
        assert wrong.returncode != 0 and "does not grant access" in wrong.stderr, wrong.stderr
        run = download(hub, tmp_path, token="hf_secret")
        assert run.returncode == 0, run.stderr
        assert "hf_secret" not in run.stderr
    finally:
        hub.close()


def test_an_unknown_revision_is_named(hub, tmp_path):
    run = download(hub, tmp_path, "--revision", "v9")
    assert run.returncode != 0
    assert "v9" in run.stderr and "no such repository or revision" in run.stderr, run.stderr


def shards_of(index, dense, experts=()):
    """The shard files holding the non-expert tensors (if `dense`) and those of `experts`."""
    weight_map = json.load(open(os.path.join(TINY, index)))["weight_map"]
    wanted = set()
    for tensor, file in weight_map.items():
        parts = tensor.split(".")
        is_expert = len(parts) > 5 and parts[3:5] == ["mlp", "experts"]
        if (is_expert and int(parts[5]) in experts) or (not is_expert and dense):
            wanted.add(file)
    return wanted


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base, procs, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                p.log.seek(0)
                raise AssertionError(f"{p.args} exited with {p.returncode}: {p.log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/ready") as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(base + " did not become ready")


def greedy(base):
    body = json.dumps({"model": "tiny", "prompt": "The capital of", "max_tokens": 12, "temperature": 0}).encode()
    request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)["choices"][0]["text"]


def started(args, log):
    proc = subprocess.Popen([BIN, *args], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    proc.log = log
    return proc


def test_each_role_runs_from_only_its_own_files(hub, tmp_path):
    index = "model.safetensors.index.json"
    dirs = {role: tmp_path / role for role in ["router", "attention", "expert0", "expert1"]}
    for role, extra in [
        ("router", ["--for", "router"]),
        ("attention", ["--for", "attention", "--expert-shards", "2"]),
        ("expert0", ["--for", "expert", "--expert-shards", "2", "--rank", "0"]),
        ("expert1", ["--for", "expert", "--expert-shards", "2", "--rank", "1"]),
    ]:
        run = download(hub, dirs[role], *extra)
        assert run.returncode == 0, f"{role}: {run.stderr}"
    small = ROUTER_FILES
    assert visible_files(dirs["router"]) == ROUTER_FILES
    # Every directory carries the router's view: the same files, linked, for a mount of it alone.
    for directory in dirs.values():
        assert set(os.listdir(directory / ".router")) == ROUTER_FILES
        assert all(same_bytes(directory / ".router", name) for name in ROUTER_FILES)
    assert visible_files(dirs["attention"]) == small | shards_of(index, dense=True)
    # Round-robin over two shards: shard r holds the experts e with e % 2 == r.
    n = json.load(open(os.path.join(TINY, "config.json")))["n_routed_experts"]
    for r in (0, 1):
        held = {e for e in range(n) if e % 2 == r}
        assert visible_files(dirs[f"expert{r}"]) == small | shards_of(index, dense=False, experts=held)
    assert "model-00001-of-00003.safetensors" not in visible_files(dirs["expert0"]), "a shard with no experts"

    expert_ports = [free_port(), free_port()]
    attention_port, router_port = free_port(), free_port()
    procs = []

    def logs():
        return open(tmp_path / f"log{len(procs)}", "w+b")

    try:
        for r, port in enumerate(expert_ports):
            procs.append(started(["expert", "--model", str(dirs[f"expert{r}"]), "--port", str(port),
                                  "--rank", str(r), "--expert-shards", "2"], logs()))
        peers = ",".join(f"127.0.0.1:{p}" for p in expert_ports)
        procs.append(started(["attention", "--model", str(dirs["attention"]), "--port", str(attention_port),
                              "--rank", "0", "--expert-peers", peers], logs()))
        procs.append(started(["router", "--model", str(dirs["router"] / ".router"), "--port", str(router_port),
                              "--attention-peers", f"127.0.0.1:{attention_port}", "--served-model-name", "tiny"], logs()))
        fleet = f"http://127.0.0.1:{router_port}"
        wait_ready(fleet, procs)
        serve_port = free_port()
        procs.append(started(["serve", "--port", str(serve_port), "--served-model-name", "tiny"], logs()))
        serve = f"http://127.0.0.1:{serve_port}"
        wait_ready(serve, procs)
        answer = greedy(fleet)
        assert answer and answer == greedy(serve)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
