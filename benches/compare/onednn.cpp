// oneDNN batch normalization on the report's shapes, single or multi-threaded (OMP_NUM_THREADS),
// printing "shape,layout,op,GB/s" lines (8 bytes per element: x read, y written).
// Build: g++ -O2 -std=c++17 onednn.cpp -ldnnl -o onednn   (Debian: libdnnl-dev)
#include <dnnl.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

using namespace dnnl;

static double best_seconds(const std::function<void()> &f) {
    f();
    double best = 1e30;
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 200; i++) {
        auto t = std::chrono::steady_clock::now();
        f();
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
        best = std::min(best, s);
        if (i >= 3 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > 0.4) break;
    }
    return best;
}

int main() {
    struct S { const char *name; long n, c, h, w; };
    S shapes[] = {{"A 32x64x56x56", 32, 64, 56, 56}, {"B 32x256x28x28", 32, 256, 28, 28},
                  {"C 1x512x7x7", 1, 512, 7, 7}, {"D 256x1024", 256, 1024, 1, 1},
                  {"E 8x32x224x224", 8, 32, 224, 224}};
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    for (auto &sh : shapes) {
        long len = sh.n * sh.c * sh.h * sh.w;
        std::vector<float> x(len), y(len);
        for (long i = 0; i < len; i++) x[i] = float((i * 7919) % 1009) * 0.01f;
        for (int nhwc = 0; nhwc < 2; nhwc++) {
            memory::desc md = sh.h == 1 && sh.w == 1
                ? memory::desc({sh.n, sh.c}, memory::data_type::f32, memory::format_tag::nc)
                : memory::desc({sh.n, sh.c, sh.h, sh.w}, memory::data_type::f32,
                               nhwc ? memory::format_tag::nhwc : memory::format_tag::nchw);
            if (sh.h == 1 && sh.w == 1 && nhwc) continue;
            for (int train = 0; train < 2; train++) {
                auto flags = normalization_flags::use_scale | normalization_flags::use_shift;
                if (!train) flags = flags | normalization_flags::use_global_stats;
                auto d = batch_normalization_forward::desc(
                    train ? prop_kind::forward_training : prop_kind::forward_inference, md, 1e-5f, flags);
                auto pd = batch_normalization_forward::primitive_desc(d, eng);
                batch_normalization_forward prim(pd);
                memory src(md, eng, x.data()), dst(md, eng, y.data());
                memory mean(pd.mean_desc(), eng), var(pd.variance_desc(), eng);
                memory::desc cd({sh.c}, memory::data_type::f32, memory::format_tag::a);
                std::vector<float> ones(sh.c, 1.0f), zeros(sh.c, 0.0f);
                memory scale(cd, eng, ones.data()), shift(cd, eng, zeros.data());
                if (!train) {
                    std::fill((float *)mean.get_data_handle(), (float *)mean.get_data_handle() + sh.c, 0.0f);
                    std::fill((float *)var.get_data_handle(), (float *)var.get_data_handle() + sh.c, 1.0f);
                }
                double s = best_seconds([&] {
                    prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, mean},
                                        {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}});
                    strm.wait();
                });
                std::printf("%s,%s,%s,%.1f\n", sh.name, nhwc ? "Nhwc" : "Nchw", train ? "train" : "eval",
                            8.0 * len / s / 1e9);
            }
        }
    }
}
