// bench_cpu.c: times the CPU backend for dev/bench.sh. It includes openmoe.c
// and gemm.c, so that the matmul itself can be timed; dev/bench_torch.py is
// its twin.
//
//   bench_cpu step CONFIG B T STEPS [MODEL]  median ms of a training step (forward, backward,
//                                            AdamW) and the losses of the first two; writes the
//                                            initial weights to MODEL for bench_torch.py
//   bench_cpu matmul N:IN:OUT ...            GFLOP/s of out (N,OUT) = inp (N,IN) @ w (OUT,IN)^T
//                                            and its backward
//   bench_cpu matmul -                       the same for each shape read from stdin, a line
//                                            each, answered as it comes (bench.sh alternates
//                                            this process with bench_torch.py's)
//   bench_cpu decode CONFIG TOKENS           tokens/s of model_decode with a KV cache
//   bench_cpu matvec OUT IN                  GB/s of decode's product over weights (OUT,IN) stored
//                                            in fp32, bf16 and int8 (groups of 64), against a
//                                            plain read of the same bytes: what memory gives
//   bench_cpu peak                           GFLOP/s of independent vector FMAs on every
//                                            thread at the CPU's widest vectors: the ceiling
//
// CONFIG: V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn (as SPEC §1), or a preset name.
#include "../openmoe.c"
#include "../gemm.c"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static Config parse_config(const char *s) {
    Config c;
    char why[128];
    if (!config_parse(s, &c, why, sizeof(why))) die("config '%s': %s", s, why);
    return c;
}

// a model with weights from params_init, also written to model_path unless NULL
static Model *random_model(const Config *c, int B, int T, const OptSettings *o, const char *model_path) {
    Model *m = model_create(c, B, T, PRECISION_FP32, o);
    float *w = (float *)mallocCheck(m->table.n_params * sizeof(float));
    params_init(&m->table, c, w, 1);
    model_set_params(m, w);
    if (model_path) model_file_save(model_path, c, w);
    free(w);
    return m;
}

static void bench_step(const Config *c, int B, int T, int steps, const char *model_path) {
    OptSettings o = opt_settings_default(OPT_ADAMW);
    Model *m = random_model(c, B, T, &o, model_path);
    int32_t *x = (int32_t *)mallocCheck((size_t)B * T * 4), *y = (int32_t *)mallocCheck((size_t)B * T * 4);
    Rng r = {7};
    for (int i = 0; i < B * T; i++) {
        x[i] = (int32_t)(rng_u64(&r) % c->V);
        y[i] = (int32_t)(rng_u64(&r) % c->V);
    }
    MoeSettings s = moe_settings_default();
    Batch batch = {x, y, NULL, NULL, B, T, 0.0};
    float losses[N_LOSSES], first[2] = {0};
    double *ms = (double *)mallocCheck(steps * sizeof(double));
    for (int i = -1; i < steps; i++) {  // one warm-up step
        double t0 = wall_seconds();
        model_forward(m, &batch, &s, losses);
        model_backward(m);
        model_update(m, &o, i + 2);
        if (i >= 0) ms[i] = 1e3 * (wall_seconds() - t0);
        if (i < 1) first[i + 1] = losses[LOSS_TOTAL];
    }
    qsort(ms, steps, sizeof(double), cmp_double);
    printf("step_ms %.2f loss0 %.7f loss1 %.7f\n", ms[steps / 2], first[0], first[1]);
    free(ms);
    free(x);
    free(y);
    model_free(m);
}

static void bench_matmul(const char *shape) {
    int N, IN, OUT;
    if (sscanf(shape, "%d:%d:%d", &N, &IN, &OUT) != 3 || N <= 0 || IN <= 0 || OUT <= 0)
        die("matmul shape '%s': expected N:IN:OUT, three positive integers", shape);
    // on cache lines, as the model's parameters, gradients and activations are
    float *inp = (float *)callocAlignedCheck((size_t)N * IN, sizeof(float), LINE_FLOATS * sizeof(float));
    float *w = (float *)callocAlignedCheck((size_t)OUT * IN, sizeof(float), LINE_FLOATS * sizeof(float));
    float *out = (float *)callocAlignedCheck((size_t)N * OUT, sizeof(float), LINE_FLOATS * sizeof(float));
    float *dinp = (float *)callocAlignedCheck((size_t)N * IN, sizeof(float), LINE_FLOATS * sizeof(float));
    float *dw = (float *)callocAlignedCheck((size_t)OUT * IN, sizeof(float), LINE_FLOATS * sizeof(float));
    Rng r = {3};
    for (size_t i = 0; i < (size_t)N * IN; i++) inp[i] = rng_uniform(&r) - 0.5f;
    for (size_t i = 0; i < (size_t)OUT * IN; i++) w[i] = rng_uniform(&r) - 0.5f;
    double best_f = 1e9, best_b = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = wall_seconds();
        matmul_forward(out, inp, weight_fp32(w), N, IN, OUT, OUT, 0);
        double t1 = wall_seconds();
        matmul_backward(dinp, dw, out, inp, w, N, IN, OUT, OUT, 0);
        double t2 = wall_seconds();
        best_f = fmin(best_f, t1 - t0);
        best_b = fmin(best_b, t2 - t1);
    }
    double flop = 2.0 * N * IN * OUT;
    printf("%s fwd_gflops %.1f bwd_gflops %.1f\n", shape, flop / best_f / 1e9, 2 * flop / best_b / 1e9);
    free(inp);
    free(w);
    free(out);
    free(dinp);
    free(dw);
}

static void bench_decode(const Config *c, int tokens) {
    Model *m = random_model(c, 1, tokens, NULL, NULL);  // its KV cache holds the tokens
    int tok = 1;
    double t0 = wall_seconds();
    for (int pos = 0; pos < tokens; pos++) {
        const float *logits = model_decode(m, tok, pos);
        int best = 0;
        for (int v = 1; v < c->V; v++) best = logits[v] > logits[best] ? v : best;
        tok = best;
    }
    printf("decode_tok_s %.1f\n", tokens / (wall_seconds() - t0));
    model_free(m);
}

// the sum of n floats' worth of bytes read as vectors, on every thread: a
// read of memory at the speed the cores can ask for it
static float read_all(const float *p, size_t n) {
    float total = 0.0f;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (size_t b = 0; b < n / (4 * VW); b++) {
        const vecf *v = (const vecf *)(p + b * 4 * VW);
        vecf acc = v[0] + v[1] + v[2] + v[3];
        for (int i = 0; i < VW; i++) total += acc[i];
    }
    return total;
}

#define MATVEC_G 64   // int8's group
#define MATVEC_REPS 9  // the median of these
static void bench_matvec(int OUT, int IN) {
    if (OUT <= 0 || IN <= 0 || IN % MATVEC_G) die("matvec %d %d: positive, IN a multiple of %d", OUT, IN, MATVEC_G);
    size_t n = (size_t)OUT * IN;
    float *w = (float *)callocAlignedCheck(n, sizeof(float), 64), *x = (float *)mallocCheck(IN * sizeof(float));
    float *out = (float *)mallocCheck(OUT * sizeof(float)), *scales = (float *)mallocCheck(n / MATVEC_G * sizeof(float));
    uint16_t *b16 = (uint16_t *)callocAlignedCheck(n, 2, 64);
    int8_t *q = (int8_t *)callocAlignedCheck(n, 1, 64);
    Rng r = {5};
    for (size_t i = 0; i < n; i++) {
        w[i] = rng_uniform(&r) - 0.5f;
        uint32_t u;
        memcpy(&u, &w[i], 4);
        b16[i] = (uint16_t)(u >> 16);  // normal numbers: subnormals would slow the multiply-adds
        q[i] = (int8_t)(rng_u64(&r) % 255 - 127);
    }
    for (size_t i = 0; i < n / MATVEC_G; i++) scales[i] = 0.01f;
    for (int i = 0; i < IN; i++) x[i] = rng_uniform(&r);
    Weight ws[3] = {weight_fp32(w), {WEIGHT_BF16, b16, NULL, 0}, {WEIGHT_INT8, q, scales, MATVEC_G}};
    const char *names[3] = {"fp32", "bf16", "int8"};
    double bytes[3] = {4.0 * n, 2.0 * n, n + 4.0 * n / MATVEC_G}, t[MATVEC_REPS];
    for (int k = 0; k < 3; k++) {
        for (int rep = 0; rep < MATVEC_REPS; rep++) {
            double t0 = wall_seconds();
            matvec_forward(out, x, ws[k], IN, OUT, 0);
            t[rep] = wall_seconds() - t0;
        }
        qsort(t, MATVEC_REPS, sizeof(double), cmp_double);
        double kernel = bytes[k] / t[MATVEC_REPS / 2] / 1e9;
        for (int rep = 0; rep < MATVEC_REPS; rep++) {
            double t0 = wall_seconds();
            volatile float sink = read_all((const float *)ws[k].values, (size_t)(bytes[k] / 4) / (4 * VW) * (4 * VW));
            (void)sink;
            t[rep] = wall_seconds() - t0;
        }
        qsort(t, MATVEC_REPS, sizeof(double), cmp_double);
        printf("matvec %d x %d %s: %.1f GB/s (a plain read of its bytes: %.1f GB/s)\n", OUT, IN, names[k], kernel,
               bytes[k] / t[MATVEC_REPS / 2] / 1e9);
    }
    free(w), free(x), free(out), free(scales), free(b16), free(q);
}

// PEAK_CHAINS independent chains of vector multiply-adds per thread: what the
// cores can do when nothing waits on memory. Measured with the widest vectors
// the CPU runs, whatever this file was compiled for, so that a build for an
// older target is not measured against its own ceiling.
#define PEAK_CHAINS 12       // more than FMA latency x FMA ports on current cores
#define PEAK_ITERS 10000000L
#define PEAK_RUNS 5           // the best of these: a slow spell of a shared machine is not the ceiling
#define DEFINE_PEAK(name, vtype)                                                  \
    static float name(void) {                                                     \
        vtype acc[PEAK_CHAINS], b = (vtype){0} + 0.999f, c = (vtype){0} + 1e-4f; \
        for (int i = 0; i < PEAK_CHAINS; i++) acc[i] = (vtype){0} + (float)i;     \
        for (long it = 0; it < PEAK_ITERS; it++)                                  \
            for (int i = 0; i < PEAK_CHAINS; i++) acc[i] = acc[i] * b + c;        \
        float sum = 0.0f;                                                         \
        for (int i = 0; i < PEAK_CHAINS; i++) sum += acc[i][0];                   \
        return sum;                                                               \
    }
DEFINE_PEAK(peak_build, vecf)
#if defined(__x86_64__)
typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
__attribute__((target("avx512f,fma"))) DEFINE_PEAK(peak_avx512, vec16)
__attribute__((target("avx2,fma"))) DEFINE_PEAK(peak_avx2, vec8)
#endif

static void bench_peak(void) {
    float (*peak)(void) = peak_build;
    int width = VW;
    const char *isa = "the build's vectors";
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f")) {
        peak = peak_avx512, width = 16, isa = "avx512f";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        peak = peak_avx2, width = 8, isa = "avx2";
    }
#endif
    int threads = 1;
    float sum = 0.0f;
    double seconds = 1e9;
    for (int run = 0; run < PEAK_RUNS; run++) {
        double t0 = wall_seconds();
#pragma omp parallel reduction(+ : sum)
        {
            sum += peak();
#pragma omp single
            threads = omp_get_num_threads();
        }
        seconds = fmin(seconds, wall_seconds() - t0);
    }
    if (sum == 12345.0f) printf("%f\n", sum);  // keeps the loops alive
    printf("peak_gflops %.1f width %d isa %s threads %d\n",
           threads * PEAK_ITERS * PEAK_CHAINS * 2.0 * width / seconds / 1e9, width, isa, threads);
}

int main(int argc, char **argv) {
    if ((argc == 6 || argc == 7) && strcmp(argv[1], "step") == 0) {
        Config c = parse_config(argv[2]);
        bench_step(&c, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), argc == 7 ? argv[6] : NULL);
    } else if (argc == 3 && strcmp(argv[1], "matmul") == 0 && strcmp(argv[2], "-") == 0) {
        char line[128];
        while (fgets(line, sizeof(line), stdin)) {
            line[strcspn(line, "\n")] = '\0';
            bench_matmul(line);
            fflush(stdout);
        }
    } else if (argc >= 3 && strcmp(argv[1], "matmul") == 0) {
        for (int i = 2; i < argc; i++) bench_matmul(argv[i]);
    } else if (argc == 4 && strcmp(argv[1], "decode") == 0) {
        Config c = parse_config(argv[2]);
        bench_decode(&c, atoi(argv[3]));
    } else if (argc == 2 && strcmp(argv[1], "peak") == 0) {
        bench_peak();
    } else if (argc == 4 && strcmp(argv[1], "matvec") == 0) {
        bench_matvec(atoi(argv[2]), atoi(argv[3]));
    } else {
        fprintf(stderr, "usage: bench_cpu step CONFIG B T STEPS [MODEL] | matmul N:IN:OUT ... | matmul - | decode CONFIG TOKENS | peak | matvec OUT IN\n");
        return 2;
    }
    return 0;
}
