"""`dsv3-worker download` against a local hub serving the tiny FP8 checkpoint in the hub's file
API layout: whole and per-role downloads, resumed transfers, checksums, skipped files, tokens;
then a fleet whose router, attention rank and expert shards each run from their own downloaded
directory answers as `serve` does."""

import fcntl
import hashlib
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
    "chat_template.jinja",
}
CHAT_TEMPLATE = b"{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
# What the worker reads: the tiny checkpoint and a chat template file beside it.
MODEL_FILES = set(os.listdir(TINY)) | {"chat_template.jinja"}


@pytest.fixture
def hub():
    hub = Hub(TINY, REPO, extra_files={"README.md": b"# tiny\n", "inference/model.py": b"print()\n",
                                       "chat_template.jinja": CHAT_TEMPLATE})
    yield hub
    hub.close()


def download_command(hub, target, *extra, token=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_ENDPOINT"] = hub.url
    if token:
        env["HF_TOKEN"] = token
    return [BIN, "download", "--repo", REPO, "--dir", str(target), *extra], env


def download(hub, target, *extra, token=None):
    command, env = download_command(hub, target, *extra, token=token)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def visible_files(directory):
    return {n for n in os.listdir(directory) if not n.startswith(".")}


def source_bytes(name):
    if name == "chat_template.jinja":
        return CHAT_TEMPLATE
    with open(os.path.join(TINY, name), "rb") as f:
        return f.read()


def same_bytes(directory, name):
    with open(os.path.join(directory, name), "rb") as a:
        return a.read() == source_bytes(name)


def client_cache(directory):
    """The hub client's cache in a model directory: (blobs, this commit's snapshot)."""
    repo = directory / ".cache" / "huggingface" / ("models--" + REPO.replace("/", "--"))
    return repo / "blobs", repo / "snapshots" / COMMIT


def test_the_whole_checkpoint_arrives_verified_and_a_second_run_fetches_nothing(hub, tmp_path):
    run = download(hub, tmp_path)
    assert run.returncode == 0, run.stderr
    assert visible_files(tmp_path) == MODEL_FILES, "exactly the model's files, no README or code"
    for name in MODEL_FILES:
        assert same_bytes(tmp_path, name), name
    assert COMMIT in run.stderr
    manifest = json.load(open(tmp_path / ".dsv3-download.json"))
    assert manifest["commit"] == COMMIT and set(manifest["files"]) == MODEL_FILES

    transfers = len(hub.requests)
    again = download(hub, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 fetched" in again.stderr and f"{len(MODEL_FILES)} already in place" in again.stderr
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


def test_a_run_that_dies_mid_file_is_resumed_by_the_next_run(hub, tmp_path):
    shard = "model-00002-of-00003.safetensors"
    hub.cut.add(shard)
    dead = download(hub, tmp_path, "--retries", "0")
    assert dead.returncode != 0 and shard in dead.stderr, dead.stderr
    assert not (tmp_path / shard).exists()
    run = download(hub, tmp_path)
    assert run.returncode == 0, run.stderr
    assert same_bytes(tmp_path, shard)
    ranges = hub.body_requests(shard)
    assert len(ranges) == 2 and ranges[0] == "bytes=0-", ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < os.path.getsize(os.path.join(TINY, shard)), f"resumed mid-file: {ranges}"


def test_leftovers_that_cannot_be_resumed_are_cleared(hub, tmp_path):
    # A partial copy longer than the file (the hub client would refuse it forever) and a link
    # left to a blob that an interrupted run had already moved into the directory.
    too_long, dangling = "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"
    blobs, snapshot = client_cache(tmp_path)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    sha = hashlib.sha256(source_bytes(too_long)).hexdigest()
    (blobs / f"{sha}.part").write_bytes(b"x" * (len(source_bytes(too_long)) + 10))
    os.symlink(blobs / "gone", snapshot / dangling)
    run = download(hub, tmp_path)
    assert run.returncode == 0, run.stderr
    assert same_bytes(tmp_path, too_long) and same_bytes(tmp_path, dangling)
    assert hub.body_requests(too_long) == ["bytes=0-"], "started over, once"


def test_two_runs_into_one_directory_take_turns(hub, tmp_path):
    # Per transfer: the first run still holds the lock when the second (a debug binary, started on
    # a loaded machine) reaches it.
    hub.delay = 3.0
    command, env = download_command(hub, tmp_path)
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".dsv3-download.lock"
    deadline = time.time() + 30
    while not held(lock):
        assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.05)
    second = download(hub, tmp_path)
    _, first_log = first.communicate(timeout=120)
    assert first.returncode == 0, first_log
    assert second.returncode == 0, second.stderr
    assert "another download is filling" in second.stderr, second.stderr
    assert f"{len(MODEL_FILES)} already in place" in second.stderr, "the second finds the first's files"
    for name in MODEL_FILES:
        assert same_bytes(tmp_path, name), name


def held(lock):
    """Whether another process holds `lock` (an flock)."""
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.parametrize("role", ["all", "router"])
def test_a_ranks_options_are_refused_for_whole_and_router_downloads(hub, tmp_path, role):
    for option in (["--rank", "0"], ["--expert-shards", "2"]):
        run = download(hub, tmp_path, "--for", role, *option)
        assert run.returncode != 0
        assert f"{option[0]} applies to --for expert or attention, not --for {role}" in run.stderr, run.stderr
    assert not (tmp_path / "config.json").exists(), "refused before anything is fetched"


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
