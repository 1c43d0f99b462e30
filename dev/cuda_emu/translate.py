"""translate.py IN.cu OUT.cpp: openmoe.cu as plain C++ for cuda_emu.h.

Replaces the CUDA headers by cuda_emu.h and every kernel launch
`kernel<<<grid, block>>>(args);` by `emu_launch(dim3(grid), dim3(block),
[&]() { kernel(args); });`. Nothing else changes, so the emulation runs the
kernels' own source."""
import re
import sys


def match_forward(s, i, open_ch, close_ch):
    """index of the bracket closing the one at s[i]"""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_ch:
            depth += 1
        elif s[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j
    raise SystemExit(f"unbalanced {open_ch} at offset {i}")


def split_top(s):
    """split at the commas outside brackets"""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


SYNC = ("__syncthreads", "__shfl", "__syncwarp", "wmma::")


def sync_functions(src):
    """names of the functions whose bodies synchronise, directly or through a callee"""
    bodies = {}
    for m in re.finditer(r"\b([A-Za-z_][A-Za-z_0-9]*)\s*\([^;{)]*(?:\([^)]*\)[^;{)]*)*\)\s*\{", src):
        name, b = m.group(1), m.end() - 1
        if name in ("if", "for", "while", "switch"):
            continue
        bodies.setdefault(name, "")
        bodies[name] += src[b:match_forward(src, b, "{", "}") + 1]
    sync = {n for n, body in bodies.items() if any(t in body for t in SYNC)}
    while True:
        more = {n for n, body in bodies.items() if n not in sync and any(re.search(rf"\b{f}\b", body) for f in sync)}
        if not more:
            return sync, bodies
        sync |= more


def translate(src):
    sync, bodies = sync_functions(src)
    for h in ("cuda_runtime.h", "cuda_bf16.h", "cublas_v2.h", "mma.h"):
        src = src.replace(f"#include <{h}>", f"// #include <{h}> (emulated)")
    src = '#include "cuda_emu.h"\n' + src
    out, pos, n = [], 0, 0
    while True:
        i = src.find("<<<", pos)
        if i < 0:
            break
        # the kernel: an identifier, maybe with template arguments <...>
        j = i
        if src[j - 1] == ">":
            depth = 0
            while True:
                j -= 1
                if src[j] == ">":
                    depth += 1
                elif src[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        m = re.search(r"[A-Za-z_][A-Za-z_0-9]*$", src[:j])
        k0 = m.start()
        kernel = src[k0:i]
        k = src.find(">>>", i)
        cfg = split_top(src[i + 3:k])
        if len(cfg) not in (2, 3):
            raise SystemExit(f"launch of {kernel}: expected <<<grid, block[, smem]>>>, got {cfg}")
        p = k + 3
        while src[p].isspace():
            p += 1
        assert src[p] == "(", kernel
        q = match_forward(src, p, "(", ")")
        args = src[p + 1:q]
        out.append(src[pos:k0])
        base = re.sub(r"<.*", "", kernel)
        if base not in bodies:
            raise SystemExit(f"launch of {kernel}: its definition was not found")
        launch = "emu_launch" if base in sync else "emu_launch_simple"
        if len(cfg) == 3:  # dynamic shared memory: check it fits the emulator's buffer
            out.append(f"(({cfg[2]}) <= sizeof(emu_dynamic_smem) ? (void)0 : abort()), ")
        out.append(f"{launch}(dim3({cfg[0]}), dim3({cfg[1]}), [&]() {{ {kernel}({args}); }})")
        pos = q + 1
        n += 1
    out.append(src[pos:])
    return "".join(out), n


if __name__ == "__main__":
    src = open(sys.argv[1]).read()
    text, n = translate(src)
    open(sys.argv[2], "w").write(text)
    print(f"{sys.argv[1]} -> {sys.argv[2]}: {n} kernel launches emulated")
