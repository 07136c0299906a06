"""PyTorch CPU batch normalization on the report's shapes, printing "shape,layout,op,GB/s" lines
(8 bytes per element forward, 12 backward). Threads: torch.set_num_threads(THREADS env, default 1).
channels_last memory format stands for NHWC."""
import os
import time

import torch
import torch.nn.functional as F

SHAPES = [("A 32x64x56x56", (32, 64, 56, 56)), ("B 32x256x28x28", (32, 256, 28, 28)),
          ("C 1x512x7x7", (1, 512, 7, 7)), ("D 256x1024", (256, 1024)),
          ("E 8x32x224x224", (8, 32, 224, 224))]


def best(f, budget=0.4):
    f()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


torch.set_num_threads(int(os.environ.get("THREADS", "1")))
for name, dims in SHAPES:
    n = 1
    for d in dims:
        n *= d
    c = dims[1]
    for layout in (["Nchw"] if len(dims) == 2 else ["Nchw", "Nhwc"]):
        x = torch.rand(dims)
        if layout == "Nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.ones(c), torch.zeros(c)
        rm, rv = torch.zeros(c), torch.ones(c)
        with torch.no_grad():
            t = best(lambda: F.batch_norm(x, rm, rv, w, b, training=False))
            print(f"{name},{layout},eval,{8 * n / t / 1e9:.1f}")
            t = best(lambda: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1))
            print(f"{name},{layout},train,{8 * n / t / 1e9:.1f}")
        xg = x.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)
        bg = b.clone().requires_grad_(True)
        y = F.batch_norm(xg, rm, rv, wg, bg, training=True)
        dy = torch.rand_like(y)
        t = best(lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True))
        print(f"{name},{layout},backward,{12 * n / t / 1e9:.1f}")
