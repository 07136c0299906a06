#!/usr/bin/env bash
# Runs the report's shapes and ResNet-50's 53 batch-norm layers (batch 1 and 32) through this
# crate, oneDNN and PyTorch on this machine, every tool timed the same way (each operation
# alternately with a copy of the same bytes on the same threads, the same buffers every call,
# median and minimum), and prints them side by side: GB/s of the median call and the ratio to
# that tool's own copy. THREADS=N (default 1). DTYPE=f16 or bf16: 16-bit tensors with f32
# parameters (the report's shapes, this crate and PyTorch; the oneDNN program is f32 only).
# torch_accuracy.py measures PyTorch's accuracy on 16-bit tensors as the accuracy example
# measures this crate's. Not run by CI.
# Needs: g++ and Debian's libdnnl-dev (oneDNN 2.x) for oneDNN; `pip install torch` for
# PyTorch (each is skipped when missing).
set -uo pipefail
cd "$(dirname "$0")"
threads=${THREADS:-1}
dtype=${DTYPE:-f32}
out=$(mktemp -d)

cargo run --release --quiet --example report -- --csv --threads "$threads" --dtype "$dtype" > "$out/ours.csv"
if [ "$dtype" != f32 ]; then
    :
elif ! cargo run --release --quiet --example resnet50 -- --csv --threads "$threads" >> "$out/ours.csv"; then
    echo "resnet50 example failed" >&2
fi
if [ "$dtype" != f32 ]; then
    echo "oneDNN: f32 only here" >&2
elif g++ -O2 -fopenmp -std=c++17 onednn.cpp -ldnnl -o "$out/onednn" 2>"$out/onednn.err"; then
    OMP_NUM_THREADS=$threads "$out/onednn" > "$out/onednn.csv"
else
    echo "oneDNN: not built (apt-get install libdnnl-dev); $(head -3 "$out/onednn.err")" >&2
fi
if python3 -c 'import torch' 2>/dev/null; then
    THREADS=$threads DTYPE=$dtype python3 torch_bn.py > "$out/torch.csv"
else
    echo "PyTorch: not installed (pip install torch)" >&2
fi

python3 - "$out" <<'PY'
import csv, os, sys
out = sys.argv[1]
tools = ["ours", "onednn", "torch"]
rows = {}
for tool in tools:
    path = os.path.join(out, tool + ".csv")
    if os.path.exists(path):
        for r in csv.reader(open(path)):
            if len(r) == 8:
                name, layout, op, threads, med, low, cp, nbytes = r
                rows.setdefault((name, layout, op, threads), {})[tool] = (float(med), float(low), float(cp), float(nbytes))
def cell(v):
    if v is None:
        return "-"
    med, low, cp, nbytes = v
    return f"{med:.3f} ms ({low:.3f}) {nbytes / med / 1e6:.1f} GB/s, {cp / med:.2f}"
print("median time (min), GB/s, ratio to the tool's own copy of the same bytes")
print()
print("| shape | layout | op | threads | batchnorm | oneDNN | PyTorch |")
print("|---|---|---|---|---|---|---|")
for key in sorted(rows):
    t = rows[key]
    print("| " + " | ".join(key) + " | " + " | ".join(cell(t.get(k)) for k in tools) + " |")
PY
