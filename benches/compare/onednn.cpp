// oneDNN batch normalization on the report's shapes and ResNet-50's batch-norm layers, timed
// as this crate's examples time themselves: each operation alternately with a copy of the same
// bytes on the same OpenMP threads, the same buffers every call, median and minimum of the
// calls. Prints "name,layout,op,threads,median_ms,min_ms,copy_ms,bytes" lines (8 bytes per
// element forward, 12 backward; ResNet-50 rows are totals over its 53 layers).
// Build: g++ -O2 -fopenmp -std=c++17 onednn.cpp -ldnnl -o onednn   (Debian: libdnnl-dev, 2.x)
#include <dnnl.hpp>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

using namespace dnnl;
using clk = std::chrono::steady_clock;

struct Timing { double median, min, copy; };

static double budget() {
    const char *b = std::getenv("BUDGET");
    return b ? std::atof(b) : 0.25;
}

static void par_copy(const float *s, float *d, long n) {
#pragma omp parallel
    {
        long t = omp_get_thread_num(), k = omp_get_num_threads();
        long a = n * t / k, b = n * (t + 1) / k;
        std::memcpy(d + a, s + a, (b - a) * sizeof(float));
    }
}

static Timing time_pair(const std::function<void()> &op, const std::function<void()> &copy) {
    op();
    copy();
    std::vector<double> a, b;
    auto start = clk::now();
    auto secs = [](clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); };
    while (a.size() < 7 || (secs(start) < budget() && a.size() < 1000)) {
        auto t = clk::now();
        op();
        a.push_back(secs(t));
        t = clk::now();
        copy();
        b.push_back(secs(t));
    }
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    return {a[a.size() / 2], a[0], b[b.size() / 2]};
}

// {op: timing} and bytes per op for one shape.
static std::map<std::string, std::pair<Timing, double>> measure(long n, long c, long h, long w, bool nhwc) {
    static engine eng(engine::kind::cpu, 0);
    static stream strm(eng);
    long len = n * c * h * w;
    std::vector<float> x(len), y(len), dy(len), dx(len), cp(len);
    std::vector<float> src12(len * 3 / 2), dst12(len * 3 / 2);
    for (long i = 0; i < len; i++) {
        x[i] = float((i * 7919) % 1009) * 0.01f;
        dy[i] = float((i * 31) % 17) * 0.1f - 0.8f;
    }
    memory::desc md = h == 1 && w == 1
        ? memory::desc({n, c}, memory::data_type::f32, memory::format_tag::nc)
        : memory::desc({n, c, h, w}, memory::data_type::f32, nhwc ? memory::format_tag::nhwc : memory::format_tag::nchw);
    memory::desc cd({c}, memory::data_type::f32, memory::format_tag::a);
    std::vector<float> ones(c, 1.0f), zeros(c, 0.0f), dscale(c), dshift(c);
    memory scale(cd, eng, ones.data()), shift(cd, eng, zeros.data());
    memory dscale_m(cd, eng, dscale.data()), dshift_m(cd, eng, dshift.data());
    memory src(md, eng, x.data()), dst(md, eng, y.data()), ddst(md, eng, dy.data()), dsrc(md, eng, dx.data());
    auto copy8 = [&] { par_copy(x.data(), cp.data(), len); };
    auto copy12 = [&] { par_copy(src12.data(), dst12.data(), (long)src12.size()); };
    std::map<std::string, std::pair<Timing, double>> out;
    auto base = normalization_flags::use_scale | normalization_flags::use_shift;
    // Inference.
    {
        batch_normalization_forward::primitive_desc pd(
            batch_normalization_forward::desc(prop_kind::forward_inference, md, 1e-5f,
                                              base | normalization_flags::use_global_stats), eng);
        batch_normalization_forward prim(pd);
        memory mean(pd.mean_desc(), eng), var(pd.variance_desc(), eng);
        std::fill((float *)mean.get_data_handle(), (float *)mean.get_data_handle() + c, 0.0f);
        std::fill((float *)var.get_data_handle(), (float *)var.get_data_handle() + c, 1.0f);
        out["eval"] = {time_pair([&] {
            prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, mean},
                                {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}});
            strm.wait();
        }, copy8), 8.0 * len};
    }
    // Training forward, then backward with its statistics.
    batch_normalization_forward::primitive_desc fpd(
        batch_normalization_forward::desc(prop_kind::forward_training, md, 1e-5f, base), eng);
    batch_normalization_forward fwd(fpd);
    memory mean(fpd.mean_desc(), eng), var(fpd.variance_desc(), eng);
    std::unordered_map<int, memory> fargs = {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, mean},
                                             {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}};
    out["train"] = {time_pair([&] { fwd.execute(strm, fargs); strm.wait(); }, copy8), 8.0 * len};
    // (oneDNN 2.6 refuses to execute a backward pass created with use_shift; its dbias is
    // Σ dy, which dx needs anyway.)
    batch_normalization_backward::primitive_desc bpd(
        batch_normalization_backward::desc(prop_kind::backward, md, md, 1e-5f, normalization_flags::use_scale),
        eng, fpd);
    batch_normalization_backward bwd(bpd);
    out["backward"] = {time_pair([&] {
        bwd.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var},
                           {DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_DIFF_SRC, dsrc},
                           {DNNL_ARG_DIFF_SCALE, dscale_m}, {DNNL_ARG_DIFF_SHIFT, dshift_m}});
        strm.wait();
    }, copy12), 12.0 * len};
    return out;
}

static void print(const std::string &name, const char *layout, const std::string &op, const Timing &t, double bytes) {
    std::printf("%s,%s,%s,%d,%.4f,%.4f,%.4f,%.0f\n", name.c_str(), layout, op.c_str(), omp_get_max_threads(),
                t.median * 1e3, t.min * 1e3, t.copy * 1e3, bytes);
}

int main() {
    struct S { const char *name; long n, c, h, w; };
    S shapes[] = {{"A 32x64x56x56", 32, 64, 56, 56}, {"B 32x256x28x28", 32, 256, 28, 28},
                  {"C 1x512x7x7", 1, 512, 7, 7}, {"D 256x1024", 256, 1024, 1, 1},
                  {"E 8x32x224x224", 8, 32, 224, 224}, {"F 256x64x56x56", 256, 64, 56, 56}};
    for (auto &sh : shapes)
        for (int nhwc = 0; nhwc < (sh.h == 1 ? 1 : 2); nhwc++)
            for (auto &[op, tb] : measure(sh.n, sh.c, sh.h, sh.w, nhwc))
                print(sh.name, nhwc ? "Nhwc" : "Nchw", op, tb.first, tb.second);
    long layers[12][3] = {{64, 112, 1}, {64, 56, 6}, {256, 56, 4}, {128, 56, 1}, {128, 28, 7}, {512, 28, 5},
                          {256, 28, 1}, {256, 14, 11}, {1024, 14, 7}, {512, 14, 1}, {512, 7, 5}, {2048, 7, 4}};
    for (long batch : {1L, 32L})
        for (int nhwc = 0; nhwc < 2; nhwc++) {
            std::map<std::string, std::pair<Timing, double>> total;
            for (auto &l : layers)
                for (auto &[op, tb] : measure(batch, l[0], l[1], l[1], nhwc)) {
                    auto &t = total[op];
                    t.first.median += tb.first.median * l[2];
                    t.first.min += tb.first.min * l[2];
                    t.first.copy += tb.first.copy * l[2];
                    t.second += tb.second * l[2];
                }
            for (auto &[op, tb] : total)
                print("resnet50 b" + std::to_string(batch), nhwc ? "Nhwc" : "Nchw", op, tb.first, tb.second);
        }
}
