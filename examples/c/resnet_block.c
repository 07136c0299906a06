/* A conv-less ResNet bottleneck's batch norms through the C ABI, checked against this
 * file's own loops (in double):
 *
 *   a = relu(bn1(x)), b = relu(bn2(a)), out = relu(bn3(b) + x)       (training, NCHW)
 *   the same block in inference, NHWC, in place
 *   the backward pass of bn3 with its ReLU and the residual's gradient
 *   refused calls: NULL data, overlapping buffers, an unknown layout, a bad eps
 *
 * Build (see docs/CAPI.md):
 *   cargo build --release -p batchnorm-capi
 *   cc -std=c11 -O2 -Wall -Wextra -Werror -Iinclude examples/c/resnet_block.c \
 *      target/release/libbatchnorm_capi.a -lpthread -ldl -lm -o resnet_block && ./resnet_block
 */
#include "batchnorm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N = 3, C = 12, S = 7 * 7, LEN = N * C * S };

static int failures = 0;

#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);                        \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fprintf(stderr, " (last error: %s)\n", bn_last_error());                      \
            failures++;                                                                   \
        }                                                                                 \
    } while (0)

#define OK(call) CHECK((call) == BN_OK, "%s", #call)

static size_t at(int nhwc, size_t n, size_t c, size_t s) {
    return nhwc ? (n * S + s) * C + c : (n * C + c) * S + s;
}

static double uniform(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return (*state >> 8) / 16777216.0 * 2.0 - 1.0;
}

/* One layer's parameters, also kept here for the reference loops. */
typedef struct {
    bn_layer *layer;
    float weight[C], bias[C], mean[C], var[C];
} layer_t;

static void make_layer(layer_t *l, unsigned seed) {
    l->layer = bn_layer_new(C);
    CHECK(l->layer != NULL, "bn_layer_new");
    for (int c = 0; c < C; c++) {
        l->weight[c] = (float)(1.0 + 0.5 * uniform(&seed));
        l->bias[c] = (float)(0.3 * uniform(&seed));
        l->mean[c] = 0.0f;
        l->var[c] = 1.0f;
    }
    OK(bn_layer_set(l->layer, l->weight, l->bias, NULL, NULL, 1e-5, 0.1));
}

/* Training's forward pass in double: y = relu(bn(x) + residual), the running statistics
 * moved (momentum 0.1, unbiased variance), and the saved mean and invstd. */
static void reference_train(layer_t *l, const float *x, const float *residual, int nhwc,
                            double *y, double *saved_mean, double *saved_invstd) {
    const double m = N * S;
    for (int c = 0; c < C; c++) {
        double sum = 0.0, sq = 0.0;
        for (int n = 0; n < N; n++)
            for (int s = 0; s < S; s++) sum += x[at(nhwc, n, c, s)];
        double mean = sum / m;
        for (int n = 0; n < N; n++)
            for (int s = 0; s < S; s++) {
                double d = x[at(nhwc, n, c, s)] - mean;
                sq += d * d;
            }
        double invstd = 1.0 / sqrt(sq / m + 1e-5);
        saved_mean[c] = mean;
        saved_invstd[c] = invstd;
        for (int n = 0; n < N; n++)
            for (int s = 0; s < S; s++) {
                size_t i = at(nhwc, n, c, s);
                double v = (x[i] - mean) * invstd * l->weight[c] + l->bias[c];
                if (residual) v += residual[i];
                y[i] = v < 0.0 ? 0.0 : v;
            }
        l->mean[c] = (float)(0.9 * l->mean[c] + 0.1 * mean);
        l->var[c] = (float)(0.9 * l->var[c] + 0.1 * sq / (m - 1.0));
    }
}

static void reference_eval(const layer_t *l, const float *x, const float *residual, int nhwc,
                           double *y) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int s = 0; s < S; s++) {
                size_t i = at(nhwc, n, c, s);
                double v = (x[i] - l->mean[c]) / sqrt((double)l->var[c] + 1e-5) * l->weight[c] +
                           l->bias[c];
                if (residual) v += residual[i];
                y[i] = v < 0.0 ? 0.0 : v;
            }
}

static void expect_close(const char *what, const float *got, const double *want, size_t len,
                         double tol) {
    size_t bad = 0;
    for (size_t i = 0; i < len; i++)
        if (!(fabs(got[i] - want[i]) <= tol * (1.0 + fabs(want[i])))) {
            if (bad++ < 3) fprintf(stderr, "%s[%zu] = %.9g, want %.9g\n", what, i, got[i], want[i]);
        }
    CHECK(bad == 0, "%s: %zu values off", what, bad);
}

int main(void) {
    static float x[LEN], a[LEN], b[LEN], out[LEN], dy[LEN], dx[LEN], dres[LEN], work[LEN];
    static double want[LEN], want_b[LEN], want_dx[LEN];
    float saved_mean[C], saved_invstd[C], dweight[C], dbias[C], got[C];
    double ref_mean[C], ref_invstd[C];
    unsigned seed = 7;
    for (size_t i = 0; i < LEN; i++) {
        x[i] = (float)(2.0 + 3.0 * uniform(&seed));
        dy[i] = (float)uniform(&seed);
    }
    printf("batchnorm %s\n", bn_version());

    layer_t l1, l2, l3;
    make_layer(&l1, 1);
    make_layer(&l2, 2);
    make_layer(&l3, 3);

    /* Training, NCHW: each batch norm with its ReLU, the last with the residual x. */
    bn_tensor t = {N, C, S, BN_NCHW, BN_F32};
    OK(bn_forward_train(l1.layer, t, x, a, NULL, 1, NULL, NULL));
    reference_train(&l1, x, NULL, 0, want, ref_mean, ref_invstd);
    expect_close("bn1", a, want, LEN, 1e-5);
    OK(bn_forward_train(l2.layer, t, a, b, NULL, 1, NULL, NULL));
    reference_train(&l2, a, NULL, 0, want_b, ref_mean, ref_invstd);
    expect_close("bn2", b, want_b, LEN, 1e-5);
    OK(bn_forward_train_f32(l3.layer, b, out, N, C, S, BN_NCHW, saved_mean, saved_invstd));
    /* (the plain call above moved bn3's running statistics; the fused one below again) */
    reference_train(&l3, b, NULL, 0, want, ref_mean, ref_invstd);
    OK(bn_forward_train(l3.layer, t, b, out, x, 1, saved_mean, saved_invstd));
    reference_train(&l3, b, x, 0, want, ref_mean, ref_invstd);
    expect_close("bn3 + x", out, want, LEN, 1e-5);
    for (int c = 0; c < C; c++) {
        CHECK(fabs(saved_mean[c] - ref_mean[c]) <= 1e-6 * (1.0 + fabs(ref_mean[c])), "mean %d", c);
        CHECK(fabs(saved_invstd[c] - ref_invstd[c]) <= 1e-5 * ref_invstd[c], "invstd %d", c);
    }
    uint64_t batches = 0;
    OK(bn_layer_get(l3.layer, NULL, NULL, got, NULL, &batches));
    CHECK(batches == 2, "num_batches_tracked %llu", (unsigned long long)batches);
    for (int c = 0; c < C; c++)
        CHECK(fabsf(got[c] - l3.mean[c]) <= 1e-5f * (1.0f + fabsf(l3.mean[c])), "running mean %d", c);
    OK(bn_layer_get(l3.layer, NULL, NULL, NULL, got, NULL));
    for (int c = 0; c < C; c++)
        CHECK(fabsf(got[c] - l3.var[c]) <= 1e-5f * l3.var[c], "running var %d", c);

    /* Backward of bn3 with its ReLU: dz = dy where out > 0; the residual's gradient is dz. */
    bn_saved saved = {saved_mean, saved_invstd};
    bn_grads grads = {dweight, dbias, dres};
    OK(bn_backward(l3.layer, t, b, out, dy, dx, saved, grads, 1));
    for (int c = 0; c < C; c++) {
        double sdz = 0.0, sdzx = 0.0, m = N * S;
        for (int n = 0; n < N; n++)
            for (int s = 0; s < S; s++) {
                size_t i = at(0, n, c, s);
                double dz = out[i] > 0.0f ? dy[i] : 0.0;
                CHECK(dres[i] == (float)dz, "d_residual[%zu]", i);
                sdz += dz;
                sdzx += dz * (b[i] - saved_mean[c]) * saved_invstd[c];
            }
        CHECK(fabs(dbias[c] - sdz) <= 1e-5 * (1.0 + fabs(sdz)), "dbias %d", c);
        CHECK(fabs(dweight[c] - sdzx) <= 1e-5 * (1.0 + fabs(sdzx)), "dweight %d", c);
        for (int n = 0; n < N; n++)
            for (int s = 0; s < S; s++) {
                size_t i = at(0, n, c, s);
                double dz = out[i] > 0.0f ? dy[i] : 0.0;
                double xhat = (b[i] - saved_mean[c]) * saved_invstd[c];
                want_dx[i] = l3.weight[c] * saved_invstd[c] / m * (m * dz - sdz - xhat * sdzx);
            }
    }
    expect_close("dx", dx, want_dx, LEN, 1e-4);

    /* Inference, NHWC, in place (x == y): the block with the running statistics. */
    t.layout = BN_NHWC;
    memcpy(work, x, sizeof work);
    OK(bn_forward_eval(l1.layer, t, work, work, NULL, 1));
    reference_eval(&l1, x, NULL, 1, want);
    expect_close("eval bn1 in place", work, want, LEN, 1e-5);
    memcpy(a, work, sizeof a);
    OK(bn_forward_eval(l3.layer, t, a, work, x, 1));
    reference_eval(&l3, a, x, 1, want);
    expect_close("eval bn3 + x", work, want, LEN, 1e-5);
    OK(bn_forward_eval_f32(l2.layer, a, work, N, C, S, BN_NHWC));

    /* Refused calls: the status, a message, and nothing changed. */
    memcpy(work, x, sizeof work);
    CHECK(bn_forward_eval_f32(l1.layer, NULL, work, N, C, S, BN_NCHW) == BN_INVALID_ARGUMENT,
          "NULL x accepted");
    CHECK(strlen(bn_last_error()) > 0, "no message");
    CHECK(bn_forward_train_f32(l1.layer, x, x + 1, N, C, S, BN_NCHW, NULL, NULL) ==
              BN_INVALID_ARGUMENT, "overlap accepted");
    CHECK(strstr(bn_last_error(), "overlaps") != NULL, "message: %s", bn_last_error());
    CHECK(bn_forward_eval_f32(l1.layer, x, work, N, C, S, 7) == BN_INVALID_ARGUMENT,
          "layout 7 accepted");
    CHECK(bn_forward_train_f32(l1.layer, x, work, N, C + 1, S, BN_NCHW, NULL, NULL) ==
              BN_INVALID_ARGUMENT, "wrong channels accepted");
    CHECK(bn_layer_set(l1.layer, NULL, NULL, NULL, NULL, -1.0, 0.1) == BN_INVALID_ARGUMENT,
          "eps -1 accepted");
    CHECK(memcmp(work, x, sizeof work) == 0, "a refused call wrote its output");
    OK(bn_layer_get(l1.layer, NULL, NULL, NULL, NULL, &batches));
    CHECK(batches == 1, "a refused call trained");

    bn_layer_free(l1.layer);
    bn_layer_free(l2.layer);
    bn_layer_free(l3.layer);
    bn_layer_free(NULL);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("resnet block: all checks passed\n");
    return 0;
}
