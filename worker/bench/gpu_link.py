# The link between two GPUs, for the NCCL data plane: the topology, the NCCL libraries present,
# and the time to copy a MoE layer's dispatch (bf16 rows of 7168, 8 routes a token) from GPU 0 to
# GPU 1 peer to peer, at batch 1 to 4096. Run on a machine with two GPUs:
#   python3 worker/bench/gpu_link.py
import glob, os, subprocess, time
import torch
print(subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout)
print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())
for p in glob.glob("/usr/**/libnccl.so*", recursive=True)[:5] + glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libnccl*"))[:5]:
    print("libnccl:", os.path.realpath(p))
print("peer access 0->1:", torch.cuda.can_device_access_peer(0, 1))
width = 7168
print("| batch | rows (x8 routes) | bytes | copy us | GB/s |")
for b in [1, 8, 64, 256, 1024, 4096]:
    rows = b * 8
    x = torch.randn(rows, width, device="cuda:0", dtype=torch.bfloat16)
    y = torch.empty_like(x, device="cuda:1")
    for _ in range(5): y.copy_(x)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    reps = 50
    t = time.perf_counter()
    for _ in range(reps): y.copy_(x, non_blocking=True)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    dt = (time.perf_counter() - t) / reps
    nbytes = x.numel() * 2
    print(f"| {b} | {rows} | {nbytes} | {dt*1e6:.1f} | {nbytes/dt/1e9:.0f} |")
