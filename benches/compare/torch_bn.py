"""PyTorch CPU batch normalization on the report's shapes and ResNet-50's batch-norm layers,
timed as this crate's examples time themselves: each operation alternately with a copy of the
same bytes (`dst.copy_(src)`) on the same threads, the same buffers every call, median and
minimum of the calls. Prints `name,layout,op,threads,median_ms,min_ms,copy_ms,bytes` lines
(two tensors' bytes per element forward, three backward: 8 and 12 for f32; ResNet-50 rows are
totals over its 53 layers). Threads: THREADS (default 1). DTYPE: f32 (default), f16 or bf16
tensors, with f32 weight, bias and running statistics (PyTorch's mixed-type path). The
channels_last memory format stands for NHWC."""
import os
import time

import torch
import torch.nn.functional as F

SHAPES = [("A 32x64x56x56", (32, 64, 56, 56)), ("B 32x256x28x28", (32, 256, 28, 28)),
          ("C 1x512x7x7", (1, 512, 7, 7)), ("D 256x1024", (256, 1024)),
          ("E 8x32x224x224", (8, 32, 224, 224)), ("F 256x64x56x56", (256, 64, 56, 56))]
RESNET50 = [(64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7), (512, 28, 5),
            (256, 28, 1), (256, 14, 11), (1024, 14, 7), (512, 14, 1), (512, 7, 5), (2048, 7, 4)]
BUDGET = float(os.environ.get("BUDGET", "0.25"))
DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
    os.environ.get("DTYPE", "f32")]
SIZE = torch.tensor([], dtype=DTYPE).element_size()


def time_pair(op, copy, min_calls=7):
    op()
    copy()
    a, b = [], []
    start = time.perf_counter()
    while len(a) < min_calls or (time.perf_counter() - start < BUDGET and len(a) < 1000):
        t = time.perf_counter()
        op()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        copy()
        b.append(time.perf_counter() - t)
    a.sort()
    b.sort()
    return a[len(a) // 2], a[0], b[len(b) // 2]


def measure(dims, layout):
    """{op: (median, min, copy median, bytes)} for one shape."""
    n = 1
    for d in dims:
        n *= d
    c = dims[1]
    x = torch.rand(dims).to(DTYPE)
    if layout == "Nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(c), torch.zeros(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    dst = torch.empty_like(x)
    src12 = torch.rand(n * 3 // 2).to(DTYPE)
    dst12 = torch.empty_like(src12)
    out = {}
    with torch.no_grad():
        out["eval"] = time_pair(lambda: F.batch_norm(x, rm, rv, w, b, training=False),
                                lambda: dst.copy_(x)) + (2 * SIZE * n,)
        out["train"] = time_pair(lambda: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1),
                                 lambda: dst.copy_(x)) + (2 * SIZE * n,)
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    y = F.batch_norm(xg, rm, rv, wg, bg, training=True)
    dy = torch.rand_like(y)
    out["backward"] = time_pair(lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True),
                                lambda: dst12.copy_(src12)) + (3 * SIZE * n,)
    return out


def main():
    threads = int(os.environ.get("THREADS", "1"))
    torch.set_num_threads(threads)
    ms = 1e3
    for name, dims in SHAPES:
        for layout in (["Nchw"] if len(dims) == 2 else ["Nchw", "Nhwc"]):
            for op, (med, low, cp, nbytes) in measure(dims, layout).items():
                print(f"{name},{layout},{op},{threads},{med * ms:.4f},{low * ms:.4f},{cp * ms:.4f},{nbytes}")
    if DTYPE != torch.float32:
        return
    for batch in (1, 32):
        for layout in ["Nchw", "Nhwc"]:
            total = {}
            for c, hw, count in RESNET50:
                for op, vals in measure((batch, c, hw, hw), layout).items():
                    t = total.setdefault(op, [0.0, 0.0, 0.0, 0])
                    for i in range(4):
                        t[i] += vals[i] * count
            for op, (med, low, cp, nbytes) in total.items():
                print(f"resnet50 b{batch},{layout},{op},{threads},{med * ms:.4f},{low * ms:.4f},{cp * ms:.4f},{nbytes}")


main()
