#!/usr/bin/env bash
# The GPU check-and-benchmark run for the CUDA backend, in one call on the GPU machine.
#
# Here (no GPU needed):   bash worker/bench/gpu.sh build     -> target/gpu-bundle/{dsv3-worker,gpu-tests}
#                         (BASE_REV=<commit>: also dsv3-worker-base, built from that commit)
# There (repo root):      bash worker/bench/gpu.sh run [tests] [bench] [peer]
#   tests  the ignored GPU tests (CUDA vs CPU on the golden fixture and full-width random layers,
#          every allocation poisoned) and `generate --device cuda` against `--device cpu`
#   bench  `dsv3-worker bench-cuda` (one MoE layer, 5-layer slice), FP8 matrix peak via torch;
#          BENCH_ARGS="--configs mla" times the MLA decode kernel alone, "--configs mla_prefill"
#          the prefill attention alone (with PEER_ARGS="--configs mla_prefill" torch's SDPA beside it)
#          and "--configs dense --batches 1,2,4,8,16,32,64" each dense FP8 product alone, beside
#          cuBLASLt's
#   serve  `serve --device cuda` against `serve --device cpu`: concurrent greedy completions
#   fleet  the fleet test suite (worker/tests/fleet.rs) with every rank on the GPU, then
#          `bench-fleet --device cuda` (serve against a fleet of 1 attention rank + 2 expert shards)
#   serving `bench-serve` on a written full-width 5-layer checkpoint: TTFT, time between tokens and
#          tok/s through the OpenAI API at 1, 64 and 256 streams beside the engine's step (greedy,
#          then temperature 1 / top_p 0.9)
#   fleet-full  after `serving` (its checkpoint): greedy tokens of `serve --device cuda` and of a
#          fleet of 1 attention rank + 2 expert shards as processes on the full-width checkpoint
#          (then with the attention rank holding a third of the experts)
#   startup start to first token of `generate`: kernels compiled each start, then the kernel cache
#   projection `bench-projection`: the full model's decode tok/s per GPU from measured parts
#   profile the same with CUDA events around every launch, graphs off (where each step goes)
#   probe  the MLA decode alone with its timeline, then with parts of it switched off
#          (DSV3_MLA_PROBE), to find its fixed cost; PROBE, PROBE_SETS, PROBE_CONTEXTS and
#          BENCH_ARGS pick another kernel and sets
#   ab     the worker against the one of BASE_REV (`BASE_REV=<commit> gpu.sh build`), alternating
#          on AB_ARGS (bench-cuda's decode table by default), AB_ROUNDS times
#   trace  one graphed decode step kernel by kernel (CUPTI's kernel records, kernel_trace.cu):
#          kernel times and the gaps between them (gpu_trace.py; TRACE_ARGS picks the run)
#   peer   transformers on the same shapes (worker/bench/hf_gpu_peer.py), set beside ours
# Logs and JSON go to $OUT (or target/gpu-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=target/gpu-bundle

if [[ "${1:-}" == build ]]; then
    export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true
    mkdir -p "$bundle"
    if [[ -n "${BASE_REV:-}" ]]; then
        # The worker as of BASE_REV too, for `run ab`: built from a worktree of that commit
        # into the same target directory (the dependencies are built once for both).
        tree=target/gpu-base-tree
        git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
        git worktree add --detach "$tree" "$BASE_REV"
        (cd "$tree" && CARGO_TARGET_DIR="$PWD/../../target" cargo build --release -p dsv3-worker)
        cp target/release/dsv3-worker "$bundle/dsv3-worker-base"
        git worktree remove --force "$tree"
    fi
    cargo build --release -p dsv3-worker
    # The test executable cargo built for `--test NAME` of a package.
    test_exe() {
        cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"): print(m["executable"])' "$2"
    }
    cp target/release/dsv3-worker "$bundle/"
    cp "$(test_exe dsv3-cuda gpu)" "$bundle/gpu-tests"
    cp "$(test_exe dsv3-worker fleet)" "$bundle/fleet-tests"
    strip "$bundle/gpu-tests" "$bundle/fleet-tests"
    ls -la "$bundle"
    exit 0
fi
[[ "${1:-}" == run ]] || { echo "usage: $0 build | run [tests] [bench] [peer]" >&2; exit 2; }
shift
out=${OUT:-target/gpu-out}
mkdir -p "$out"
# libcuda from the driver; libnvrtc and libcublas from the CUDA toolkit or its pip wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
    [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.log"
export DSV3_REPO_ROOT=$PWD
failed=0
for step in "$@"; do
    case $step in
    tests)
        "$bundle/gpu-tests" --ignored --nocapture --test-threads 1 2>&1 | tee "$out/tests.log" || failed=1
        # Both ways FP8 products treat activations, each against the CPU doing the same.
        for recipe in unquantised quantised; do
            for dev in cpu cuda; do
                "$bundle/dsv3-worker" generate --model tests/golden/tiny-fp8 --prompt-token-ids 0,5,77,300,12 \
                    --max-tokens 24 --temperature 0 --json --device $dev --fp8-activations $recipe \
                    > "/tmp/generate-$dev.json"
            done
            echo "FP8 activations $recipe:" | tee -a "$out/tests.log"
            python3 - <<'PY' | tee -a "$out/tests.log"
import json
cpu, gpu = (json.load(open(f"/tmp/generate-{d}.json")) for d in ("cpu", "cuda"))
diff = max(abs(a - b) for a, b in zip(cpu["prompt_last_logits"], gpu["prompt_last_logits"]))
print("generate cpu :", cpu["token_ids"]); print("generate cuda:", gpu["token_ids"])
print(f"prompt logits max |cpu - cuda| = {diff:.2e}; tokens equal: {cpu['token_ids'] == gpu['token_ids']}")
PY
        done
        ;;
    bench)
        python3 - <<'PY' | tee "$out/fp8_peak.txt"
import torch
n = 8192
a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
one = torch.tensor(1.0, device="cuda")
f = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
for _ in range(3): f()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); [f() for _ in range(20)]; e.record(); torch.cuda.synchronize()
print(f"{2 * n**3 * 20 / (s.elapsed_time(e) / 1e3) / 1e12:.0f}")
PY
        peak=$(tail -1 "$out/fp8_peak.txt")
        peer_arg=()
        [[ -f "$out/hf.json" ]] && peer_arg=(--peer "$out/hf.json")
        "$bundle/dsv3-worker" bench-cuda --fp8-tflops "$peak" --out "$out/dsv3.json" "${peer_arg[@]}" \
            ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.md"
        ;;
    serve)
        # The OpenAI server on the GPU against the same server on the CPU: 4 concurrent greedy requests.
        for dev in cpu cuda; do
            port=$([[ $dev == cpu ]] && echo 8121 || echo 8122)
            "$bundle/dsv3-worker" serve --model tests/golden/tiny-fp8 --port $port --device $dev > "/tmp/serve-$dev.log" 2>&1 &
        done
        python3 worker/bench/compare_greedy.py --max-tokens 16 "serve --device cpu=8121" \
            "serve --device cuda=8122" 2>&1 | tee -a "$out/tests.log"
        kill %1 %2 2>/dev/null || true
        grep -h "memory on" /tmp/serve-cuda.log || tail -5 /tmp/serve-cuda.log
        ;;
    fleet)
        # serve and a fleet (2 attention ranks + 3 expert shards, all on this GPU) give the tokens of
        # generate; 64 concurrent streams; a killed expert shard or attention rank ends its requests
        # with an error and the fleet serves again once it is restarted.
        DSV3_WORKER="$bundle/dsv3-worker" DSV3_TEST_DEVICE=cuda "$bundle/fleet-tests" --test-threads 1 --nocapture \
            2>&1 | tee -a "$out/tests.log" || failed=1
        "$bundle/dsv3-worker" bench-fleet --device cuda --attention 1 --experts 2 --clients 16 --requests 2 \
            ${FLEET_ARGS:-} --output "$out/bench-fleet.md" 2>&1 | tail -8 || failed=1
        ;;
    serving)
        for sampling in "--temperature 0" "--temperature 1 --top-p 0.9"; do
            "$bundle/dsv3-worker" bench-serve --device cuda --checkpoint-dir /tmp/dsv3-full-width $sampling \
                --output "$out/serving-$(echo $sampling | tr -dc 0-9).md" ${SERVING_ARGS:-} 2>&1 |
                grep -v "^loading" | tee -a "$out/serving.log" || failed=1
        done
        ;;
    fleet-full)
        ckpt=/tmp/dsv3-full-width
        [[ -f $ckpt/config.json ]] || "$bundle/dsv3-worker" bench-serve --device cuda --checkpoint-dir $ckpt \
            --batches 1 --prompt-len 4 --max-tokens 4 2>&1 | grep "^checkpoint"
        # serve with its decode graphs, serve launching kernel by kernel (the fleet's attention rank
        # cannot graph a step that reaches the host), and the fleet.
        "$bundle/dsv3-worker" serve --model $ckpt --device cuda --port 8131 > /tmp/full-serve.log 2>&1 &
        DSV3_CUDA_GRAPHS=0 "$bundle/dsv3-worker" serve --model $ckpt --device cuda --port 8133 > /tmp/full-serve-ungraphed.log 2>&1 &
        "$bundle/dsv3-worker" fleet --model $ckpt --device cuda --port 8132 --attention 1 --experts 2 \
            --activation-dtype f32 > /tmp/full-fleet.log 2>&1 &
        echo "full-width checkpoint (the fleet: 1 attention rank + 2 expert shards, f32 activations):" |
            tee -a "$out/tests.log"
        python3 worker/bench/compare_greedy.py --max-tokens 24 "serve (graphed)=8131" "fleet=8132" \
            "serve (kernel by kernel)=8133" 2>&1 | tee -a "$out/tests.log"
        # Then the fleet whose attention rank runs a third of the experts itself.
        kill %3 2>/dev/null || true
        "$bundle/dsv3-worker" fleet --model $ckpt --device cuda --port 8134 --attention 1 --experts 2 \
            --attention-holds-experts --activation-dtype f32 > /tmp/full-fleet-holding.log 2>&1 &
        echo "the same, the attention rank holding a third of the experts:" | tee -a "$out/tests.log"
        python3 worker/bench/compare_greedy.py --max-tokens 24 "serve (graphed)=8131" "fleet, attention holding experts=8134" \
            "serve (kernel by kernel)=8133" 2>&1 | tee -a "$out/tests.log"
        kill %1 %2 %4 2>/dev/null || true
        wait 2>/dev/null || true
        grep -h "memory on\|runs .* routed experts" /tmp/full-serve.log /tmp/full-fleet.log /tmp/full-fleet-holding.log || true
        grep -h -i "error" /tmp/full-*.log | head -5 || true
        ;;
    startup)
        # Start to first token of `generate` on the tiny model: kernels compiled (no cache, as every
        # start did before the kernel cache), then the first start with an empty cache, then warm.
        cache=$(mktemp -d)
        for run in "no cache=off" "empty cache=$cache" "warm cache=$cache"; do
            started=$EPOCHREALTIME
            DSV3_KERNEL_CACHE=${run#*=} "$bundle/dsv3-worker" generate --model tests/golden/tiny-fp8 \
                --prompt-token-ids 1,2,3 --max-tokens 1 --device cuda --json > /dev/null 2>&1 || failed=1
            echo "start to first token, ${run%%=*}: $(awk "BEGIN { printf \"%.2f\", $EPOCHREALTIME - $started }") s" |
                tee -a "$out/startup.log"
        done
        ;;
    projection)
        # DeepSeek-V3 tok/s per GPU of A attention + E expert GPUs, from measured parts.
        "$bundle/dsv3-worker" bench-projection ${PROJECTION_ARGS:-} --output "$out/projection.md" 2>&1 |
            tee "$out/projection.log" | grep -v "^gRPC\|^expert shard\|^attention batch" || failed=1
        ;;
    profile)
        DSV3_CUDA_PROFILE=1 "$bundle/dsv3-worker" bench-cuda --reps 3 --batches 1,8,64,256 --out "$out/profile.json" \
            ${BENCH_ARGS:-} > "$out/profile.log" 2>&1
        grep -E "^(profile|  )" "$out/profile.log" | head -120
        ;;
    probe)
        # One kernel timed with parts of it switched off (worker/cuda/src/probes.rs): by default
        # the MLA decode alone at batches 1, 8 and 64 over 128 and 4,096 positions, first with its
        # timeline (each block's clock at each step, nothing off);
        # PROBE=DSV3_EXPERT_PROBE PROBE_SETS="weight-tiles token-scales" BENCH_ARGS="--configs
        # moe_layer --batches 256 --prefill 4096" for the routed experts.
        var=${PROBE:-DSV3_MLA_PROBE}
        for set in "" ${PROBE_SETS:-timeline load-q tiles scores pv finish scores,pv load-q,tiles,scores,pv,finish}; do
            for ctx in ${PROBE_CONTEXTS:-128 4096}; do
                echo "== $var=$set, context $ctx" | tee -a "$out/probe.log"
                env "$var=$set" "$bundle/dsv3-worker" bench-cuda --context "$ctx" --reps 5 \
                    ${BENCH_ARGS:---configs mla --batches 1,8,64} 2>&1 | grep -E "^\| [A-Za-z]|Timeline of" | tee -a "$out/probe.log"
            done
        done
        ;;
    ab)
        # The worker built here against the one built from BASE_REV (`BASE_REV=rev gpu.sh
        # build`), alternating, AB_ROUNDS times (2), on AB_ARGS (the decode table by default):
        # a change measured against the code before it in one run on one GPU.
        if [[ ! -x "$bundle/dsv3-worker-base" ]]; then
            echo "ab: no $bundle/dsv3-worker-base (build with BASE_REV=<commit>)" | tee "$out/ab.log"
            failed=1
            continue
        fi
        for round in $(seq "${AB_ROUNDS:-2}"); do
            for side in base new; do
                exe=$bundle/dsv3-worker
                [[ $side == base ]] && exe=$bundle/dsv3-worker-base
                echo "== $side, round $round" | tee -a "$out/ab.log"
                "$exe" ${AB_ARGS:-bench-cuda --configs moe_layer,slice5 --batches 1,8,64 --context 4096 --prefill 0 --reps 5} \
                    2>&1 | grep -E "^\| " | tee -a "$out/ab.log" || failed=1
            done
        done
        ;;
    trace)
        # One graphed decode step kernel by kernel: every kernel's start and end on the GPU from
        # CUPTI's activity records (worker/bench/kernel_trace.cu, injected into the worker; graph
        # nodes recorded one by one), then what ran, for how long, and the gaps between kernels
        # (worker/bench/gpu_trace.py). slice5 at batch 1 over 4,096 positions unless TRACE_ARGS
        # says otherwise.
        tracer=$(realpath "$out")/kernel_trace.so
        nvcc -O2 -shared -Xcompiler -fPIC -o "$tracer" worker/bench/kernel_trace.cu -lcupti \
            > "$out/trace.log" 2>&1 || { failed=1; continue; }
        KERNEL_TRACE_CSV="$out/trace.csv" CUDA_INJECTION64_PATH="$tracer" \
            "$bundle/dsv3-worker" bench-cuda --reps 3 --prefill 0 \
            ${TRACE_ARGS:---configs slice5 --batches 1 --context 4096} >> "$out/trace.log" 2>&1 || failed=1
        rm -f "$tracer"
        python3 worker/bench/gpu_trace.py --list "$out/trace.csv" | tee "$out/trace.md" || failed=1
        ;;
    peer)
        timeout 330 python3 worker/bench/hf_gpu_peer.py --out "$out/hf.json" ${PEER_ARGS:-} 2>&1 | tee "$out/hf.log" || echo "transformers peer did not finish"
        ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
[[ $failed == 0 ]] || { echo "GPU tests FAILED (see tests.log)"; exit 1; }
