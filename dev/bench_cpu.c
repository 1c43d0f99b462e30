// bench_cpu.c: times the CPU backend for dev/bench.sh. It includes openmoe.c
// so that the matmul itself can be timed; dev/bench_torch.py is its twin.
//
//   bench_cpu step CONFIG B T STEPS   median ms of a training step (forward, backward, AdamW)
//   bench_cpu matmul N IN OUT         GFLOP/s of out (N,OUT) = inp (N,IN) @ w (OUT,IN)^T and its backward
//   bench_cpu decode CONFIG TOKENS    tokens/s of model_decode with a KV cache
//   bench_cpu peak                    GFLOP/s of independent vector FMAs on every thread: the ceiling
//
// CONFIG: V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn (as SPEC §1), or a preset name.
#include "../openmoe.c"
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

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

static Model *random_model(const Config *c, int B, int T, const OptSettings *o) {
    Model *m = model_create(c, B, T, PRECISION_FP32, o);
    float *w = (float *)mallocCheck(m->table.n_params * sizeof(float));
    params_init(&m->table, c, w, 1);
    model_set_params(m, w);
    free(w);
    return m;
}

static void bench_step(const Config *c, int B, int T, int steps) {
    OptSettings o = opt_settings_default(OPT_ADAMW);
    Model *m = random_model(c, B, T, &o);
    int32_t *x = (int32_t *)mallocCheck((size_t)B * T * 4), *y = (int32_t *)mallocCheck((size_t)B * T * 4);
    Rng r = {7};
    for (int i = 0; i < B * T; i++) {
        x[i] = (int32_t)(rng_u64(&r) % c->V);
        y[i] = (int32_t)(rng_u64(&r) % c->V);
    }
    MoeSettings s = moe_settings_default();
    float losses[N_LOSSES];
    double *ms = (double *)mallocCheck(steps * sizeof(double));
    for (int i = -1; i < steps; i++) {  // one warm-up step
        double t0 = now();
        model_forward(m, x, y, B, T, &s, losses);
        model_backward(m);
        model_update(m, &o, i + 2);
        if (i >= 0) ms[i] = 1e3 * (now() - t0);
    }
    qsort(ms, steps, sizeof(double), cmp_double);
    printf("step_ms %.2f loss %.4f\n", ms[steps / 2], losses[LOSS_TOTAL]);
    free(ms);
    free(x);
    free(y);
    model_free(m);
}

static void bench_matmul(int N, int IN, int OUT) {
    float *inp = (float *)mallocCheck((size_t)N * IN * 4), *w = (float *)mallocCheck((size_t)OUT * IN * 4);
    float *out = (float *)mallocCheck((size_t)N * OUT * 4), *dinp = (float *)mallocCheck((size_t)N * IN * 4);
    float *dw = (float *)callocCheck((size_t)OUT * IN, 4), *scratch = (float *)mallocCheck((size_t)OUT * IN * 4);
    Rng r = {3};
    for (size_t i = 0; i < (size_t)N * IN; i++) inp[i] = rng_uniform(&r) - 0.5f;
    for (size_t i = 0; i < (size_t)OUT * IN; i++) w[i] = rng_uniform(&r) - 0.5f;
    double best_f = 1e9, best_b = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        matmul_forward(out, inp, w, N, IN, OUT, scratch);
        double t1 = now();
        matmul_backward(dinp, dw, out, inp, w, N, IN, OUT, 0);
        double t2 = now();
        best_f = fmin(best_f, t1 - t0);
        best_b = fmin(best_b, t2 - t1);
    }
    double flop = 2.0 * N * IN * OUT;
    printf("fwd_gflops %.1f bwd_gflops %.1f\n", flop / best_f / 1e9, 2 * flop / best_b / 1e9);
}

static void bench_decode(const Config *c, int tokens) {
    Model *m = random_model(c, 1, 1, NULL);
    int tok = 1;
    double t0 = now();
    for (int pos = 0; pos < tokens; pos++) {
        const float *logits = model_decode(m, tok, pos);
        int best = 0;
        for (int v = 1; v < c->V; v++) best = logits[v] > logits[best] ? v : best;
        tok = best;
    }
    printf("decode_tok_s %.1f\n", tokens / (now() - t0));
    model_free(m);
}

// ten independent chains of 8-float multiply-adds per thread: what the cores
// can do when nothing waits on memory
static void bench_peak(void) {
    const long iters = 100000000L;
    double t0 = now();
    int threads = 1;
#pragma omp parallel
    {
        vec8 acc[10], b = (vec8){0} + 0.999f, c = (vec8){0} + 1e-4f;
        for (int i = 0; i < 10; i++) acc[i] = (vec8){0} + (float)i;
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 10; i++) acc[i] = acc[i] * b + c;
        float sum = 0.0f;
        for (int i = 0; i < 10; i++) sum += acc[i][0];
        if (sum == 12345.0f) printf("%f\n", sum);  // keeps the loop alive
#pragma omp single
        threads = omp_get_num_threads();
    }
    printf("peak_gflops %.1f\n", threads * iters * 10 * 16.0 / (now() - t0) / 1e9);
}

int main(int argc, char **argv) {
    if (argc == 6 && strcmp(argv[1], "step") == 0) {
        Config c = parse_config(argv[2]);
        bench_step(&c, atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    } else if (argc == 5 && strcmp(argv[1], "matmul") == 0) {
        bench_matmul(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    } else if (argc == 4 && strcmp(argv[1], "decode") == 0) {
        Config c = parse_config(argv[2]);
        bench_decode(&c, atoi(argv[3]));
    } else if (argc == 2 && strcmp(argv[1], "peak") == 0) {
        bench_peak();
    } else {
        fprintf(stderr, "usage: bench_cpu step CONFIG B T STEPS | matmul N IN OUT | decode CONFIG TOKENS | peak\n");
        return 2;
    }
    return 0;
}
