// bench_gpu.c: times training steps of the CUDA backend for dev/bench_gpu.sh;
// dev/bench_gpu.py is its PyTorch twin. Built by bench_gpu.sh with nvcc
// (the file compiles as CUDA C++ with openmoe.cu, as train.c does).
//
//   bench_gpu CONFIG B T STEPS [--fp32] [--capacity t5x|colossalai|none]
//       median ms of a training step (forward, backward, AdamW update) in bf16
//       (or fp32), on random tokens, after three warm-up steps (as bench_gpu.py); also the median
//       of each phase and the tokens per second. --capacity: the capacity rule
//       (SPEC §8; none is dropless), t5x by default
//
// CONFIG: a preset name (tiny small base 8b 34b) or V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn.
#include "openmoe.h"
#include <cuda_runtime.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, n, sizeof(double), cmp_double);
    return v[n / 2];
}

static Config parse_config(const char *s) {
    Config c;
    char why[128];
    if (!config_parse(s, &c, why, sizeof(why))) die("config '%s': %s", s, why);
    return c;
}

int main(int argc, char **argv) {
    const char *usage = "usage: bench_gpu CONFIG B T STEPS [--fp32] [--capacity t5x|colossalai|none]";
    if (argc < 5) die("%s", usage);
    Config c = parse_config(argv[1]);
    int B = atoi(argv[2]), T = atoi(argv[3]), steps = atoi(argv[4]);
    Precision prec = PRECISION_BF16;
    MoeSettings s = moe_settings_default();
    for (int i = 5; i < argc; i++) {
        if (strcmp(argv[i], "--fp32") == 0) {
            prec = PRECISION_FP32;
        } else if (strcmp(argv[i], "--capacity") == 0 && i + 1 < argc) {
            s.capacity_rule = name_index(argv[++i], cap_rule_names, N_CAP_RULES);
            if (s.capacity_rule < 0) die("bench_gpu --capacity %s: the rule is t5x, colossalai or none", argv[i]);
        } else {
            die("bench_gpu: unknown argument '%s'; %s", argv[i], usage);
        }
    }
    if (B < 1 || T < 1 || T > c.max_seq_len || steps < 1) die("bench_gpu: bad B %d, T %d or steps %d", B, T, steps);
    OptSettings o = opt_settings_default(OPT_ADAMW);
    Model *m = model_create(&c, B, T, prec, &o);
    const ParamTable *pt = model_param_table(m);
    float *w = (float *)mallocCheck(pt->n_params * sizeof(float));
    params_init(pt, &c, w, 1);
    model_set_params(m, w);
    free(w);
    size_t BT = (size_t)B * T;
    int32_t *x = (int32_t *)mallocCheck(BT * 4), *y = (int32_t *)mallocCheck(BT * 4);
    Rng r = {7};
    for (size_t i = 0; i < BT; i++) {
        x[i] = (int32_t)(rng_u64(&r) % c.V);
        y[i] = (int32_t)(rng_u64(&r) % c.V);
    }
    Batch batch = {x, y, NULL, NULL, B, T, 0.0};
    float losses[N_LOSSES];
    double *tf = (double *)mallocCheck(steps * sizeof(double)), *tb = (double *)mallocCheck(steps * sizeof(double));
    double *tu = (double *)mallocCheck(steps * sizeof(double)), *ts = (double *)mallocCheck(steps * sizeof(double));
    for (int i = -3; i < steps; i++) {  // three warm-up steps
        cudaDeviceSynchronize();
        double t0 = wall_seconds();
        model_forward(m, &batch, &s, losses);  // ends with a sync (the losses)
        double t1 = wall_seconds();
        model_backward(m);
        cudaDeviceSynchronize();
        double t2 = wall_seconds();
        model_update(m, &o, i + 4);  // ends with the kernels queued after a sync on the norm
        cudaDeviceSynchronize();
        double t3 = wall_seconds();
        if (i < 0) continue;
        tf[i] = 1e3 * (t1 - t0);
        tb[i] = 1e3 * (t2 - t1);
        tu[i] = 1e3 * (t3 - t2);
        ts[i] = 1e3 * (t3 - t0);
    }
    double step = median(ts, steps);
    printf("step_ms %.2f fwd_ms %.2f bwd_ms %.2f update_ms %.2f tok_s %.0f loss %.4f dropped %.3f\n", step,
           median(tf, steps), median(tb, steps), median(tu, steps), BT / (step / 1e3), losses[LOSS_TOTAL],
           losses[LOSS_DROPPED]);
    free(tf);
    free(tb);
    free(tu);
    free(ts);
    free(x);
    free(y);
    model_free(m);
    return 0;
}
