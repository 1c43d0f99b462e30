#!/usr/bin/env bash
# The backends' twins keep the rule openmoe.cu's header states: a function of
# openmoe.c (or gemm.h) and one of openmoe.cu with the same name take the
# arguments they share in the same order, before any argument only one of
# them has (the GPU's launch details, the CPU's scratch). With --table,
# prints every pair with both argument lists.
set -u
source test/lib.sh
PY=${PYTHON:-/usr/bin/python3}
$PY - "$@" <<'EOF'
import re, sys

def functions(path):
    """name -> parameter names of each function defined (or, in a header, declared) at file scope"""
    text = open(path).read()
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"^\s*#[^\n]*(\\\n[^\n]*)*", "", text, flags=re.M)
    found, depth, i = {}, 0, 0
    while i < len(text):
        c = text[i]
        if c in "{}":
            depth += 1 if c == "{" else -1
            i += 1
            continue
        m = re.compile(r"\b([A-Za-z_]\w*)\s*\(").match(text, i) if depth == 0 else None
        if not m:
            i += 1
            continue
        name, j, level = m.group(1), m.end(), 1
        while level and j < len(text):
            level += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        rest = text[j:j + 40].lstrip()
        is_def = rest.startswith("{") or (path.endswith(".h") and rest.startswith(";"))
        if is_def and name not in ("if", "for", "while", "switch", "return", "sizeof", "__attribute__"):
            params = []
            for p in split_params(text[m.end():j - 1]):
                p = p.split("=")[0].strip()
                ids = re.findall(r"[A-Za-z_]\w*", p)
                if ids and p != "void":
                    params.append(ids[-1])
            found.setdefault(name, params)
        i = j
    return found

def split_params(s):
    out, level, cur = [], 0, ""
    for ch in s:
        level += {"(": 1, "<": 1, ")": -1, ">": -1}.get(ch, 0)
        if ch == "," and level == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur] if cur.strip() else out

cpu = functions("openmoe.c")
cpu.update(functions("gemm.h"))
gpu = functions("openmoe.cu")
broken = []
pairs = sorted(set(cpu) & set(gpu) - {"main"})
for name in pairs:
    a, b = cpu[name], gpu[name]
    shared = [p for p in a if p in b]
    ok = a[:len(shared)] == shared and b[:len(shared)] == shared
    if "--table" in sys.argv:
        print(f"{'  ' if ok else '! '}{name}\n    cpu ({', '.join(a)})\n    gpu ({', '.join(b)})")
    if not ok:
        broken.append(name)
if len(pairs) < 20:
    print(f"FAIL twins: only {len(pairs)} pairs found in openmoe.c and openmoe.cu (the parser missed some?)")
elif broken:
    for name in broken:
        print(f"FAIL twins: {name}: cpu ({', '.join(cpu[name])}) against gpu ({', '.join(gpu[name])})")
else:
    print(f"PASS twins: {len(pairs)} pairs, shared arguments first and in the same order")
EOF
