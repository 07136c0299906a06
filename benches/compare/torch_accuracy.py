"""PyTorch's CPU batch norm on 16-bit tensors (f32 weight, bias and running statistics: its
mixed-type path), measured as `cargo run --release --example accuracy` measures this crate: the
same inputs (the example's generator, replicated here bit for bit), the same layer (weight 1.5,
bias 0.25, running statistics the data's own), and for training's output, inference's output
and backward's dx the share of outputs that are the correctly rounded float64 reference, the
share one unit in the last place off, and the largest distance in units. Prints the table."""
import sys

import torch
import torch.nn.functional as F

MASK = (1 << 64) - 1


def data(count, ratio, seed):
    """The accuracy example's `data`: `count` values with mean `ratio` and standard deviation 1
    (uniform), rounded to f32, from its xorshift64* generator."""
    state = (seed * 0x9E3779B97F4A7C15 | 1) & MASK
    out = []
    for _ in range(count):
        state ^= state >> 12
        state ^= (state << 25) & MASK
        state ^= state >> 27
        u = ((state * 0x2545F4914F6CDD1D) & MASK) >> 11
        out.append(ratio + 3 ** 0.5 * (u / (1 << 52) - 1.0))
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


def round_once(v, mantissa, min_exp):
    """`v` (float64) rounded to nearest even in a format with `mantissa` stored bits and smallest
    normal exponent `min_exp`, in one rounding (torch's float64 -> 16-bit conversion goes
    through float32 and rounds twice)."""
    _, e = torch.frexp(v)  # v = m * 2^e, 0.5 <= |m| < 1
    q = torch.ldexp(torch.ones_like(v), torch.clamp(e - 1, min=min_exp) - mantissa)
    r = torch.round(v / q) * q
    return torch.where(torch.isfinite(v) & (v != 0), r, v)


def ordered(t):
    """16-bit encodings as integers in the order of the values."""
    b = t.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(b >= 0x8000, -(b & 0x7FFF), b)


def summary(got, want, dtype, mantissa, min_exp):
    ref = round_once(want, mantissa, min_exp).to(dtype)
    d = (ordered(got.contiguous()) - ordered(ref.contiguous())).abs()
    n = d.numel()
    exact = (d == 0).sum().item() * 100 / n
    one = (d == 1).sum().item() * 100 / n
    return f"{exact:.2f}% / {one:.2f}% / {d.max().item()}"


def table(name, dtype, mantissa, min_exp, ratios, quick):
    n, c, s = 8, 16, (512 if quick else 4096)
    h, w = s, 1  # the spatial shape does not matter, only its size
    print(f"\nPyTorch {torch.__version__}, {name} tensors, {n * c * s} values: share of outputs "
          "correctly rounded / one unit in the last place off / largest distance in units:\n")
    print("| offset/std | layout | forward_train | forward_eval | backward dx |")
    print("|---|---|---|---|---|")
    for ratio in ratios:
        for layout in ["Nchw", "Nhwc"]:
            # The example's values in NCHW or NHWC order, as it generates them for that layout.
            flat = data(n * c * s, ratio, 11).to(dtype)
            dflat = data(n * c * s, 0.0, 12).to(dtype)
            if layout == "Nchw":
                x, dy = flat.view(n, c, h, w), dflat.view(n, c, h, w)
            else:
                x = flat.view(n, h, w, c).permute(0, 3, 1, 2)
                dy = dflat.view(n, h, w, c).permute(0, 3, 1, 2)
            x64 = x.to(torch.float64)
            mean = x64.mean(dim=(0, 2, 3))
            var = x64.var(dim=(0, 2, 3), unbiased=False)
            weight = torch.full((c,), 1.5)
            bias = torch.full((c,), 0.25)
            rm, rv = mean.to(torch.float32), var.to(torch.float32)
            # Training's forward pass and its backward, in the 16-bit type and in float64.
            xg = x.clone().requires_grad_(True)
            y = F.batch_norm(xg, rm.clone(), rv.clone(), weight, bias, training=True)
            (dx,) = torch.autograd.grad(y, (xg,), dy)
            x64g = x64.clone().requires_grad_(True)
            y64 = F.batch_norm(x64g, rm.double().clone(), rv.double().clone(), weight.double(),
                               bias.double(), training=True)
            (dx64,) = torch.autograd.grad(y64, (x64g,), dy.to(torch.float64))
            with torch.no_grad():
                e = F.batch_norm(x, rm, rv, weight, bias, training=False)
                e64 = F.batch_norm(x64, rm.double(), rv.double(), weight.double(), bias.double(),
                                   training=False)
            cells = [summary(y.detach(), y64.detach(), dtype, mantissa, min_exp),
                     summary(e, e64, dtype, mantissa, min_exp),
                     summary(dx, dx64, dtype, mantissa, min_exp)]
            print(f"| {ratio:.0e} | {layout} | " + " | ".join(cells) + " |")


def main():
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    table("f16", torch.float16, 10, -14, [0.0, 10.0, 100.0], quick)
    table("bf16", torch.bfloat16, 7, -126, [0.0, 10.0, 1e3], quick)


main()
