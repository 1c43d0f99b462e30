"""profile_gpu.py: where the CUDA backend's training step spends its time, kernel by kernel.

nsys does not run on the lent machines, but CUPTI does: this loads
dev/bench_gpu.c (built as a shared library, its main called through ctypes)
into a process with PyTorch and records its kernels with torch.profiler.
Prints each kernel's GPU time per step, summed over its launches.

  python3 dev/profile_gpu.py CONFIG B T [STEPS] [--fp32] [--capacity RULE]   (as bench_gpu.c takes them)
"""
import ctypes
import os
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
lib_path = os.path.join(root, "build", "libbench_gpu.so")


def build():
    srcs = [os.path.join(root, f) for f in ("dev/bench_gpu.c", "openmoe.cu", "openmoe.h", "utils.h")]
    if os.path.exists(lib_path) and all(os.path.getmtime(s) < os.path.getmtime(lib_path) for s in srcs):
        return
    os.makedirs(os.path.dirname(lib_path), exist_ok=True)
    nvcc = os.environ.get("NVCC", "nvcc")
    subprocess.run([nvcc, "-O3", "-std=c++17", "-arch=sm_90", "-I", root, "-diag-suppress", "177", "-shared",
                    "-Xcompiler", "-fPIC", "-cudart", "shared", "-x", "cu", srcs[0], "-x", "cu", srcs[1],
                    "-o", lib_path, "-lcublas", "-lcublasLt", "-lm"], check=True)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    cfg, B, T = sys.argv[1], sys.argv[2], sys.argv[3]
    steps = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4].isdigit() else "3"
    build()
    torch.cuda.init()
    lib = ctypes.CDLL(lib_path)
    flags = sys.argv[5:] if len(sys.argv) > 4 and sys.argv[4].isdigit() else sys.argv[4:]
    args = [b"bench_gpu", cfg.encode(), B.encode(), T.encode(), steps.encode()] + [a.encode() for a in flags]
    argv = (ctypes.c_char_p * len(args))(*args)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rc = lib.main(len(args), argv)
        torch.cuda.synchronize()
    if rc != 0:
        sys.exit(f"bench_gpu exited with {rc}")
    n = int(steps) + 3  # bench_gpu runs three warm-up steps
    rows = [(e.device_time_total, e.count, e.key) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{cfg} B={B} T={T}: {total / n / 1e3:.2f} ms of kernels per step ({n} steps profiled)")
    print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel")
    for t, cnt, name in rows[:40]:
        print(f"{t / n / 1e3:8.3f} {100 * t / total:5.1f}% {cnt / n:10.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
