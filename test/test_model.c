// test_model.c: one source for test_cpu (linked with openmoe.c) and test_gpu
// (linked with openmoe.cu). Its checks:
//
//   test_cpu MODEL STATE [-o OUT] [--bf16] [--tol-scale S]
//       one forward and backward on STATE's batch and settings, compared with
//       what STATE holds, at SPEC §7's tolerances (times S); -o writes what
//       this build computed as a state file, so that any two builds can be diffed
//   test_cpu MODEL STATE --update adamw|adafactor EXPECTED
//       three optimizer steps t = 1, 2, 3, each fed STATE's gradients, compared
//       with the parameters in EXPECTED (test/reference.py writes it), and
//       the same steps as two ZeRO-1 shards (bit for bit with the full update)
//   test_cpu --gradcheck [--break]
//       central finite differences of the total loss against the backward on a
//       micro config, routing held fixed; --break scales the backward's
//       gradients by 1.1, which the check must catch
//   test_cpu --config SPEC
//       the model header words 2..13 of a config as config_parse reads it
//   test_cpu --router
//       router_row's top-K (openmoe.h) against its definition on random rows
//   test_cpu --matvec [--break]
//       decode's product (gemm.h matvec_forward) against its definition, bit
//       for bit, on every path; --break plants a rounding the check must catch
//
// Exit status 0 only when every comparison holds.
#include "openmoe.h"

static float opt_tol_scale = 1.0f;

// ----------------------------------------------------------------------------
// the debug state file (SPEC §7): one batch, its settings, and what a correct
// implementation computes from it. The header (utils.h) holds these words;
// the coefficients as integer millionths.

enum {
    STATE_B = 2, STATE_T, STATE_CF1000, STATE_MIN_CAPACITY, STATE_LB_COEF, STATE_RZ_COEF, STATE_LZ_COEF,
    STATE_GROUP_SIZE, STATE_CAPACITY_RULE, STATE_DROP_POLICY, STATE_PACKED, STATE_HEADER_WORDS
};
#define STATE_COEF_SCALE 1e6

typedef struct {
    int B, T;
    MoeSettings s;
    int32_t *x, *y;   // [B*T] tokens, targets (-1 = ignored)
    int packed;       // header word [12] (SPEC §10): 1 when segment and position follow y
    int32_t *segment, *position;  // [B*T] when packed, else NULL: one segment per row, positions 0..T-1
    float *logits;    // [B*T*V]
    float losses[N_LOSSES];
    float *grads;     // [n_params]
} DebugState;

// the batch size and settings of header h, checked against model config c
static void state_settings_from_header(const int32_t *h, const char *path, const Config *c, DebugState *st) {
    st->B = h[STATE_B];
    st->T = h[STATE_T];
    st->s.cf1000 = h[STATE_CF1000];
    st->s.min_capacity = h[STATE_MIN_CAPACITY];
    st->s.lb_coef = h[STATE_LB_COEF] * (float)(1.0 / STATE_COEF_SCALE);
    st->s.rz_coef = h[STATE_RZ_COEF] * (float)(1.0 / STATE_COEF_SCALE);
    st->s.lz_coef = h[STATE_LZ_COEF] * (float)(1.0 / STATE_COEF_SCALE);
    st->s.group_size = h[STATE_GROUP_SIZE];
    st->s.capacity_rule = h[STATE_CAPACITY_RULE];
    st->s.drop_policy = h[STATE_DROP_POLICY];
    st->s.first_group = 0;  // no first group of its own: the state file has no word for one
    st->packed = h[STATE_PACKED];
    if (st->packed != 0 && st->packed != 1)
        die("%s: header word %d (segments and positions) is %d: must be 0 (none) or 1 (they follow y)", path,
            STATE_PACKED, st->packed);
    if (st->s.capacity_rule < 0 || st->s.capacity_rule >= N_CAP_RULES)
        die("%s: header word %d (capacity rule) is %d: must be 0 (t5x), 1 (colossalai) or 2 (none)", path,
            STATE_CAPACITY_RULE, st->s.capacity_rule);
    if (st->s.drop_policy < 0 || st->s.drop_policy >= N_DROP_POLICIES)
        die("%s: header word %d (drop policy) is %d: must be 0 (position) or 1 (probs)", path, STATE_DROP_POLICY,
            st->s.drop_policy);
    if (st->B <= 0 || st->T <= 0) die("%s: B = %d, T = %d, both must be > 0", path, st->B, st->T);
    if (st->T > c->max_seq_len) die("%s: T = %d is longer than the model's context %d", path, st->T, c->max_seq_len);
    if (st->s.cf1000 <= 0 || st->s.min_capacity < 0 || st->s.group_size < 0 || h[STATE_LB_COEF] < 0 ||
        h[STATE_RZ_COEF] < 0 || h[STATE_LZ_COEF] < 0)
        die("%s: bad settings: cf1000 %d, min_capacity %d, group_size %d, coefs %d %d %d", path, st->s.cf1000,
            st->s.min_capacity, st->s.group_size, h[STATE_LB_COEF], h[STATE_RZ_COEF], h[STATE_LZ_COEF]);
}

static void state_file_load(const char *path, const Config *c, DebugState *st) {
    memset(st, 0, sizeof(*st));
    FILE *f = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    long size = header_read(f, path, "state", STATE_MAGIC, STATE_HEADER_WORDS, h);
    state_settings_from_header(h, path, c, st);
    size_t BT = (size_t)st->B * st->T, n_params = config_n_params(c), n_ints = (st->packed ? 4 : 2) * BT;
    uint64_t nfloat = size_add(size_add(n_ints, size_mul(BT, c->V)), N_LOSSES + n_params);
    uint64_t want = size_add(HEADER_BYTES, size_mul(sizeof(float), nfloat));
    if ((uint64_t)size != want)
        die("%s: size %ld bytes, but B=%d T=%d V=%d%s and %zu parameters make %llu bytes", path, size, st->B, st->T,
            c->V, st->packed ? " with segments and positions" : "", n_params, (unsigned long long)want);
    st->x = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    st->y = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    st->logits = (float *)mallocCheck(BT * c->V * sizeof(float));
    st->grads = (float *)mallocCheck(n_params * sizeof(float));
    freadCheck(st->x, sizeof(int32_t), BT, f, path);
    freadCheck(st->y, sizeof(int32_t), BT, f, path);
    if (st->packed) {
        st->segment = (int32_t *)mallocCheck(BT * sizeof(int32_t));
        st->position = (int32_t *)mallocCheck(BT * sizeof(int32_t));
        freadCheck(st->segment, sizeof(int32_t), BT, f, path);
        freadCheck(st->position, sizeof(int32_t), BT, f, path);
    }
    freadCheck(st->logits, sizeof(float), BT * c->V, f, path);
    freadCheck(st->losses, sizeof(float), N_LOSSES, f, path);
    freadCheck(st->grads, sizeof(float), n_params, f, path);
    fcloseCheck(f, path);
    for (size_t i = 0; i < BT; i++) {
        if (st->x[i] < 0 || st->x[i] >= c->V) die("%s: token x[%zu] = %d is out of range [0, %d)", path, i, st->x[i], c->V);
        if (st->y[i] < -1 || st->y[i] >= c->V) die("%s: target y[%zu] = %d is out of range [-1, %d)", path, i, st->y[i], c->V);
        if (st->packed && st->segment[i] < -1) die("%s: segment[%zu] = %d, must be >= -1", path, i, st->segment[i]);
        if (st->packed && (st->position[i] < 0 || st->position[i] >= c->max_seq_len))
            die("%s: position[%zu] = %d is out of the context [0, %d)", path, i, st->position[i], c->max_seq_len);
    }
}

static void state_file_save(const char *path, const Config *c, const DebugState *st) {
    int32_t h[HEADER_INTS] = {0};
    h[0] = STATE_MAGIC;
    h[1] = FILE_VERSION;
    h[STATE_B] = st->B;
    h[STATE_T] = st->T;
    h[STATE_CF1000] = st->s.cf1000;
    h[STATE_MIN_CAPACITY] = st->s.min_capacity;
    h[STATE_LB_COEF] = (int32_t)lrint(st->s.lb_coef * STATE_COEF_SCALE);
    h[STATE_RZ_COEF] = (int32_t)lrint(st->s.rz_coef * STATE_COEF_SCALE);
    h[STATE_LZ_COEF] = (int32_t)lrint(st->s.lz_coef * STATE_COEF_SCALE);
    h[STATE_GROUP_SIZE] = st->s.group_size;
    h[STATE_CAPACITY_RULE] = st->s.capacity_rule;
    h[STATE_DROP_POLICY] = st->s.drop_policy;
    h[STATE_PACKED] = st->packed;
    size_t BT = (size_t)st->B * st->T;
    char tmp[MAX_PATH_BYTES];
    FILE *f = atomic_open(path, tmp, sizeof(tmp));
    fwriteCheck(h, sizeof(int32_t), HEADER_INTS, f, tmp);
    fwriteCheck(st->x, sizeof(int32_t), BT, f, tmp);
    fwriteCheck(st->y, sizeof(int32_t), BT, f, tmp);
    if (st->packed) {
        fwriteCheck(st->segment, sizeof(int32_t), BT, f, tmp);
        fwriteCheck(st->position, sizeof(int32_t), BT, f, tmp);
    }
    fwriteCheck(st->logits, sizeof(float), BT * c->V, f, tmp);
    fwriteCheck(st->losses, sizeof(float), N_LOSSES, f, tmp);
    fwriteCheck(st->grads, sizeof(float), config_n_params(c), f, tmp);
    atomic_commit(f, tmp, path);
}

static void state_free(DebugState *st) {
    free(st->x);
    free(st->y);
    free(st->segment);
    free(st->position);
    free(st->logits);
    free(st->grads);
    memset(st, 0, sizeof(*st));
}

// ----------------------------------------------------------------------------
// comparisons: each prints its worst error against what it allows

// element-wise |a-b| <= tol (1 + |b|); returns 1 when all hold
static int compare_elementwise(const char *what, const float *a, const float *b, size_t n, float tol) {
    double worst = 0.0, worst_ratio = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)a[i] - b[i]), ratio = err / (tol * (1.0 + fabs(b[i])));
        if (!(ratio <= worst_ratio)) {  // also catches NaN
            worst_ratio = ratio;
            worst = err;
            at = i;
        }
    }
    int ok = worst_ratio <= 1.0;
    printf("%-6s %-24s worst |a-b| %.3e at %zu (%.3g of allowed)\n", ok ? "ok" : "FAILED", what, worst, at, worst_ratio);
    return ok;
}

// per gradient tensor, expert stacks one slice at a time:
// max|a-b| <= tol max|b| + 1e-7 (both scaled by the tolerance scale)
static int compare_grads(const ParamTable *pt, const float *a, const float *b, float tol) {
    int ok = 1, n_checked = 0;
    double worst_ratio = 0.0;
    char worst_name[48] = "";
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *t = &pt->tensors[i];
        size_t n = (size_t)t->rows * t->cols;
        for (int s = 0; s < t->slices; s++) {
            const float *as = a + t->offset + s * n, *bs = b + t->offset + s * n;
            double maxb = 0.0, maxerr = 0.0;
            for (size_t j = 0; j < n; j++) {
                maxb = fmax(maxb, fabs(bs[j]));
                double err = fabs((double)as[j] - bs[j]);
                if (!(err <= maxerr)) maxerr = err;
            }
            double allowed = tol * maxb + 1e-7 * opt_tol_scale, ratio = maxerr / allowed;
            char name[48];
            if (t->slices > 1) snprintf(name, sizeof(name), "%s[%d]", t->name, s);
            else snprintf(name, sizeof(name), "%s", t->name);
            if (!(ratio <= 1.0)) {
                printf("FAILED grad %-18s max|a-b| %.3e, allowed %.3e (max|b| %.3e)\n", name, maxerr, allowed, maxb);
                ok = 0;
            }
            if (!(ratio <= worst_ratio)) {
                worst_ratio = ratio;
                snprintf(worst_name, sizeof(worst_name), "%s", name);
            }
            n_checked++;
        }
    }
    printf("%-6s grads (%d tensors/slices)   worst %s at %.3g of allowed\n", ok ? "ok" : "FAILED", n_checked,
           worst_name, worst_ratio);
    return ok;
}

// ----------------------------------------------------------------------------
// check 1: forward and backward against a state file

static int check_state(const char *model_path, const char *state_path, const char *out_path, Precision prec) {
    Config c;
    float *params = model_file_load(model_path, &c);
    DebugState st;
    state_file_load(state_path, &c, &st);
    OptSettings opt = opt_settings_default(OPT_ADAMW);
    size_t BT = (size_t)st.B * st.T;
    int Tmax = st.T;  // and room for the batch's positions (SPEC §10: an example may start past column 0)
    for (size_t i = 0; st.position && i < BT; i++) Tmax = st.position[i] >= Tmax ? st.position[i] + 1 : Tmax;
    Model *m = model_create(&c, st.B + 1, Tmax, prec, &opt);  // room for one more: a smaller batch must work too
    model_set_params(m, params);
    size_t n = model_param_table(m)->n_params;
    DebugState mine = st;
    mine.logits = (float *)mallocCheck(BT * c.V * sizeof(float));
    mine.grads = (float *)mallocCheck(n * sizeof(float));
    Batch batch = {st.x, st.y, st.segment, st.position, st.B, st.T, 0.0};
    model_forward(m, &batch, &st.s, mine.losses);
    model_get_logits(m, mine.logits);
    model_backward(m);
    model_get_grads(m, mine.grads);

    float tol = 1e-4f * opt_tol_scale;
    printf("%s: B=%d T=%d V=%d L=%d D=%d E=%d K=%d, cf %.3f, group %d, capacity %s, drop %s, %zu params%s\n",
           state_path, st.B, st.T, c.V, c.L, c.D, c.E, c.K, st.s.cf1000 / 1000.0, st.s.group_size,
           cap_rule_names[st.s.capacity_rule], drop_policy_names[st.s.drop_policy], n,
           st.packed ? ", segments and positions" : "");
    printf("losses: total %.6f ce %.6f lb %.6f rz %.6f lz %.6f dropped %.6f (reference %.6f %.6f %.6f %.6f %.6f %.6f)\n",
           mine.losses[0], mine.losses[1], mine.losses[2], mine.losses[3], mine.losses[4], mine.losses[5],
           st.losses[0], st.losses[1], st.losses[2], st.losses[3], st.losses[4], st.losses[5]);
    int ok = compare_elementwise("logits", mine.logits, st.logits, BT * c.V, tol);
    static const char *names[] = {"loss total", "loss ce", "loss lb", "loss rz", "loss lz"};
    for (int i = 0; i < 5; i++) ok &= compare_elementwise(names[i], &mine.losses[i], &st.losses[i], 1, tol);
    double derr = fabs((double)mine.losses[LOSS_DROPPED] - st.losses[LOSS_DROPPED]);
    int dok = derr <= 1e-7 * opt_tol_scale;
    printf("%-6s %-24s |a-b| %.3e (allowed %.1e)\n", dok ? "ok" : "FAILED", "dropped fraction", derr, 1e-7 * opt_tol_scale);
    ok &= dok;
    ok &= compare_grads(model_param_table(m), mine.grads, st.grads, tol);
    if (out_path) {
        state_file_save(out_path, &c, &mine);
        printf("wrote %s\n", out_path);
    }
    printf("%s\n", ok ? "PASS" : "FAIL");
    free(mine.logits);
    free(mine.grads);
    state_free(&st);
    free(params);
    model_free(m);
    return ok;
}

// ----------------------------------------------------------------------------
// check 2: three optimizer steps with the state's gradients. The settings are
// the ones test/reference.py uses for its expected files.

// ZeRO-1 (train.c's data parallelism): two models each keeping the state of
// one half of the tensors (OptSettings shard_lo, shard_hi) and stepping only
// those must give, stitched together, the full update bit for bit
static int sharded_update_same(const Config *c, const float *params, const float *grads, const OptSettings *o,
                               const float *full, Precision prec) {
    ParamTable pt;
    param_table_build(&pt, c);
    size_t mid = pt.tensors[pt.n_tensors / 2].offset, n = pt.n_params, bounds[3] = {0, mid, n};
    float *half = (float *)mallocCheck(n * sizeof(float));
    int same = 1;
    for (int h = 0; h < 2; h++) {
        OptSettings os = *o;
        os.shard_lo = bounds[h];
        os.shard_hi = bounds[h + 1];
        Model *m = model_create(c, 1, 1, prec, &os);
        model_set_params(m, params);
        for (int t = 1; t <= 3; t++) {
            model_set_grads(m, grads);
            model_update(m, &os, t);
        }
        model_get_params(m, half);
        for (size_t i = 0; i < n; i++) same &= i >= bounds[h] && i < bounds[h + 1] ? half[i] == full[i] : half[i] == params[i];
        model_free(m);
    }
    printf("%-6s two ZeRO-1 shards, each stepping its own tensors, give the full update bit for bit\n",
           same ? "ok" : "FAILED");
    free(half);
    param_table_free(&pt);
    return same;
}

static int check_update(const char *model_path, const char *state_path, const char *kind, const char *expect_path,
                        Precision prec) {
    Config c, ce;
    float *params = model_file_load(model_path, &c);
    float *expect = model_file_load(expect_path, &ce);
    if (memcmp(&c, &ce, sizeof(c)) != 0) die("%s: its config differs from %s's", expect_path, model_path);
    DebugState st;
    state_file_load(state_path, &c, &st);
    OptSettings o;
    if (strcmp(kind, "adamw") == 0) {
        o = opt_settings_default(OPT_ADAMW);
        o.lr = 1e-3f;
    } else if (strcmp(kind, "adafactor") == 0) {
        o = opt_settings_default(OPT_ADAFACTOR);
        o.lr = 0.01f;
        o.min_dim = 8;
    } else {
        die("--update: unknown optimizer '%s' (adamw or adafactor)", kind);
    }
    Model *m = model_create(&c, 1, 1, prec, &o);
    model_set_params(m, params);
    for (int t = 1; t <= 3; t++) {
        model_set_grads(m, st.grads);
        model_update(m, &o, t);
    }
    const ParamTable *pt = model_param_table(m);
    float *mine = (float *)mallocCheck(pt->n_params * sizeof(float));
    model_get_params(m, mine);
    int ok = sharded_update_same(&c, params, st.grads, &o, mine, prec);
    // per tensor slice: max|a-b| <= 1e-4 max|b - p0| + 1e-6 max|b|: the
    // update is what is tested, so its size sets the scale
    double worst = 0.0;
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *t = &pt->tensors[i];
        size_t n = (size_t)t->rows * t->cols;
        for (int s = 0; s < t->slices; s++) {
            size_t o0 = t->offset + s * n;
            double maxd = 0.0, maxb = 0.0, maxerr = 0.0;
            for (size_t j = o0; j < o0 + n; j++) {
                maxd = fmax(maxd, fabs((double)expect[j] - params[j]));
                maxb = fmax(maxb, fabs(expect[j]));
                double err = fabs((double)mine[j] - expect[j]);
                if (!(err <= maxerr)) maxerr = err;
            }
            double ratio = maxerr / ((1e-4 * maxd + 1e-6 * maxb) * opt_tol_scale);
            if (!(ratio <= 1.0)) {
                printf("FAILED %s slice %d: max|a-b| %.3e, update size %.3e\n", t->name, s, maxerr, maxd);
                ok = 0;
            }
            if (!(ratio <= worst)) worst = ratio;
        }
    }
    printf("%-6s %s, 3 steps: worst parameter error at %.3g of allowed\n%s\n", ok ? "ok" : "FAILED", kind, worst,
           ok ? "PASS" : "FAIL");
    free(mine);
    free(params);
    free(expect);
    state_free(&st);
    model_free(m);
    return ok;
}

// ----------------------------------------------------------------------------
// check 3: finite differences on a micro config, every tensor, routing fixed

static int same_routing(Model *m, int n_moe, int BTK, int32_t *e0, uint8_t *k0, int32_t *e1, float *p1, uint8_t *k1) {
    for (int i = 0; i < n_moe; i++) {
        model_get_routing(m, i, e1, p1, k1);
        if (memcmp(e1, e0 + (size_t)i * BTK, BTK * sizeof(int32_t)) || memcmp(k1, k0 + (size_t)i * BTK, BTK))
            return 0;
    }
    return 1;
}

// finite differences of the total loss on one batch against the backward,
// on up to 16 elements of every tensor of m (weights w) drawn from r
static int gradcheck_batch(Model *m, float *w, const Batch *batch, const MoeSettings *s, int broken, Rng *r,
                           const char *what) {
    const ParamTable *pt = model_param_table(m);
    int n_moe = n_moe_layers(model_config(m)), BTK = batch->B * batch->T * model_config(m)->K;
    size_t n = pt->n_params;
    float *g = (float *)mallocCheck(n * sizeof(float));
    float losses[N_LOSSES];
    model_set_params(m, w);
    model_forward(m, batch, s, losses);
    model_backward(m);
    model_get_grads(m, g);
    if (broken)
        for (size_t j = 0; j < n; j++) g[j] *= 1.1f;
    printf("gradcheck: micro config, %s, loss %.5f, dropped %.3f%s\n", what, losses[LOSS_TOTAL],
           losses[LOSS_DROPPED], broken ? " (gradients deliberately scaled by 1.1)" : "");
    int32_t *e0 = (int32_t *)mallocCheck((size_t)n_moe * BTK * sizeof(int32_t)), e1[24];
    uint8_t *k0 = (uint8_t *)mallocCheck((size_t)n_moe * BTK), k1[24];
    float p1[24];
    for (int i = 0; i < n_moe; i++) model_get_routing(m, i, e0 + (size_t)i * BTK, p1, k0 + (size_t)i * BTK);

    const float eps = 2e-2f;
    int ok = 1, skipped = 0;
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *t = &pt->tensors[i];
        size_t numel = tensor_numel(t);
        double maxerr = 0.0, maxg = 0.0;
        int samples = numel < 16 ? (int)numel : 16;
        for (int k = 0; k < samples; k++) {
            size_t j = t->offset + (numel <= 16 ? (size_t)k : rng_u64(r) % numel);
            float w0 = w[j], lp[N_LOSSES], lm[N_LOSSES];
            w[j] = w0 + eps;
            model_set_params(m, w);
            model_forward(m, batch, s, lp);
            int same = same_routing(m, n_moe, BTK, e0, k0, e1, p1, k1);
            w[j] = w0 - eps;
            model_set_params(m, w);
            model_forward(m, batch, s, lm);
            same &= same_routing(m, n_moe, BTK, e0, k0, e1, p1, k1);
            w[j] = w0;
            if (!same) {  // the perturbation moved a routing decision: no derivative there
                skipped++;
                continue;
            }
            double fd = ((double)lp[LOSS_TOTAL] - lm[LOSS_TOTAL]) / (2.0 * eps);
            maxerr = fmax(maxerr, fabs(fd - g[j]));
            maxg = fmax(maxg, fabs(g[j]));
        }
        // fp32 losses give finite differences with noise near 1e-5; 2% of the
        // largest gradient sampled covers the truncation error
        double allowed = 0.02 * maxg + 3e-5;
        int tok = maxerr <= allowed;
        if (!tok || broken) printf("%-6s %-14s max|fd-grad| %.3e, allowed %.3e\n", tok ? "ok" : "FAILED", t->name, maxerr, allowed);
        ok &= tok;
    }
    printf("gradcheck: %s: %d tensors, %d samples skipped for a routing change: %s\n", what, pt->n_tensors, skipped,
           ok ? "ok" : "FAILED");
    free(g);
    free(e0);
    free(k0);
    return ok;
}

// a batch given one segment per row and positions 0..T-1 explicitly (SPEC
// §10) gives the logits, losses and gradients of the same batch without them
// (SPEC §2) bit for bit
static int check_one_segment(Model *m, const float *w, const Batch *plain, const MoeSettings *s) {
    int BT = plain->B * plain->T, V = model_config(m)->V;
    size_t n = model_param_table(m)->n_params, nl = (size_t)BT * V;
    int32_t *segment = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    int32_t *position = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    for (int i = 0; i < BT; i++) {
        segment[i] = 0;
        position[i] = i % plain->T;
    }
    Batch given = *plain;
    given.segment = segment;
    given.position = position;
    float *out[2], losses[2][N_LOSSES];
    const Batch *batches[2] = {plain, &given};
    model_set_params(m, w);
    for (int k = 0; k < 2; k++) {
        out[k] = (float *)mallocCheck((nl + n) * sizeof(float));
        model_forward(m, batches[k], s, losses[k]);
        model_get_logits(m, out[k]);
        model_backward(m);
        model_get_grads(m, out[k] + nl);
    }
    int same = memcmp(out[0], out[1], (nl + n) * sizeof(float)) == 0 &&
               memcmp(losses[0], losses[1], sizeof(losses[0])) == 0;
    printf("one segment per row at positions 0..T-1, given explicitly: logits, losses and gradients %s\n",
           same ? "bit-identical to none given: ok" : "differ from none given: FAILED");
    free(segment);
    free(position);
    free(out[0]);
    free(out[1]);
    return same;
}

// the micro model on two batches: one segment per row (SPEC §2), and rows
// packed with segments, padding and positions (SPEC §10); and the first given explicitly
static int check_gradients(int broken, Precision prec) {
    //          V  ctx  L  D  H Hd   F  E  K  every Fe extra
    Config c = {23, 8, 4, 12, 2, 6, 10, 4, 2, 2, 8, 1};
    enum { B = 2, T = 6, BT = B * T };
    MoeSettings s = {800, 1, 5, 0.05f, 0.01f, 0.01f, CAP_T5X, DROP_POSITION, 0};  // groups of 5, 5, 2; capacity 1-2: drops happen
    OptSettings opt = opt_settings_default(OPT_ADAMW);
    Model *m = model_create(&c, B, c.max_seq_len, prec, &opt);  // positions up to 7 (the packed batch)
    const ParamTable *pt = model_param_table(m);
    float *w = (float *)mallocCheck(pt->n_params * sizeof(float));
    params_init(pt, &c, w, 1234);
    Rng r = {99};
    for (int i = 0; i < pt->n_tensors; i++) {  // make routing decisive and norm weights non-trivial
        const TensorInfo *t = &pt->tensors[i];
        for (size_t j = t->offset; j < t->offset + tensor_numel(t); j++) {
            if (strstr(t->name, "router")) w[j] *= 40.0f;
            if (!t->matrix) w[j] = 0.5f + rng_uniform(&r);
        }
    }
    int32_t x[BT], y[BT];
    for (int i = 0; i < BT; i++) {
        x[i] = (int32_t)(rng_u64(&r) % c.V);
        y[i] = i % 5 == 3 ? -1 : (int32_t)(rng_u64(&r) % c.V);
    }
    // row 0: two examples and a padding token; row 1: one example from position 2
    int32_t segment[BT] = {0, 0, 0, 1, 1, -1, 0, 0, 0, 0, 0, 0}, position[BT] = {0, 1, 2, 0, 1, 0, 2, 3, 4, 5, 6, 7};
    Batch plain = {x, y, NULL, NULL, B, T, 0.0}, packed = {x, y, segment, position, B, T, 0.0};
    int ok = gradcheck_batch(m, w, &plain, &s, broken, &r, "one segment per row");
    ok &= gradcheck_batch(m, w, &packed, &s, broken, &r, "segments, padding, positions");
    ok &= check_one_segment(m, w, &plain, &s);
    printf("%s\n", ok ? "PASS" : "FAIL");
    free(w);
    model_free(m);
    return ok;
}

// ----------------------------------------------------------------------------
// check 4: a config as config_parse reads it (the benchmarks' -c), printed as
// the model header's words 2..13, which t_cpu.sh compares with SPEC §6's
// order; the words must read back to the same config

static int check_config(const char *spec) {
    Config c, back;
    char why[160];
    if (!config_parse(spec, &c, why, sizeof(why))) die("config '%s': %s", spec, why);
    int32_t h[HEADER_INTS];
    config_to_header(&c, h);
    for (int i = 2; i < MODEL_HEADER_WORDS; i++) printf("%d%c", h[i], i + 1 < MODEL_HEADER_WORDS ? ' ' : '\n');
    config_from_header(h, &back);
    if (memcmp(&c, &back, sizeof(c)) != 0) {
        printf("FAILED the header words read back to another config\n");
        return 0;
    }
    return 1;
}

// ----------------------------------------------------------------------------
// check 5: router_row's top-K against its definition: K scans of the experts,
// each taking the best by p + bias not yet taken, ties to the lower index.
// Random rows of up to MAX_E experts whose logits and biases take few values
// (ties everywhere), with and without a bias, and rows whose p are all NaN.

#define ROUTER_ROWS 20000

static void router_top_definition(int *top, const float *p, const float *bias, int E, int K) {
    for (int r = 0; r < K; r++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int q = 0; q < r; q++) taken |= top[q] == e;
            if (!taken && (best < 0 || router_score(p, bias, e) > router_score(p, bias, best))) best = e;
        }
        top[r] = best;
    }
}

static int check_router(void) {
    static float z[MAX_E], p[MAX_E], bias[MAX_E];
    static int top[MAX_K], want[MAX_K];
    Rng rng = {2024};
    int wrong = 0;
    for (int row = 0; row < ROUTER_ROWS && wrong < 5; row++) {
        int E = row % 100 == 0 ? MAX_E : 1 + (int)(rng_u64(&rng) % 300);
        int K = 1 + (int)(rng_u64(&rng) % (E < MAX_K ? E : MAX_K));
        int levels = 1 + (int)(rng_u64(&rng) % 8), nan_row = row % 50 == 1, with_bias = row % 2;
        for (int e = 0; e < E; e++) {
            z[e] = nan_row ? NAN : 0.5f * (float)(rng_u64(&rng) % levels);
            bias[e] = 0.01f * (float)(rng_u64(&rng) % 3);
        }
        const float *b = with_bias ? bias : NULL;
        router_row(p, top, z, b, E, K);
        router_top_definition(want, p, b, E, K);
        if (memcmp(top, want, K * sizeof(int)) != 0) {
            printf("FAILED row %d (E %d, K %d, %d levels, bias %d): rank 0 is %d, the definition's %d\n", row, E, K,
                   levels, with_bias, top[0], want[0]);
            wrong++;
        }
    }
    printf("router: %d rows, top-K %s its definition\n", ROUTER_ROWS, wrong ? "differs from" : "equals");
    return wrong == 0;
}

// ----------------------------------------------------------------------------
// check 6 (CPU): matvec_forward, decode's product over weights as stored,
// and matmul_forward of 1 to MATMUL_ROWS rows over the same weights, against
// the definition (gemm.h): each output one chain of multiply-adds in input
// order over weight_value, bit for bit. The shapes reach every path:
// whole tasks and a last task of one block, rows past the last whole block,
// inputs past the last whole vector, int8 groups that hold a block's inputs
// (64, 128) and groups that do not (8, 4), accumulate, and a product big
// enough to run on every thread. --break computes the definition's int8
// weights as (x·s)·q, a rounding the check must see. test_cpu only: the
// CUDA builds (nvcc, and the emulator's g++) compile this file as C++ and
// link openmoe.cu, which has no matvec_forward.

#ifndef __cplusplus
#include "gemm.h"

#define MATMUL_ROWS 5  // matmul_forward checked for 1 .. this many rows

typedef struct {
    WeightType type;
    int OUT, IN, group;  // group: int8 only
} MatvecCase;

static const MatvecCase matvec_cases[] = {
    {WEIGHT_FP32, 83, 100, 0},     {WEIGHT_FP32, 1427, 768, 0},  {WEIGHT_BF16, 83, 120, 0},
    {WEIGHT_BF16, 1427, 768, 0},   {WEIGHT_INT8, 83, 768, 64},   {WEIGHT_INT8, 1427, 768, 64},
    {WEIGHT_INT8, 99, 256, 128},   {WEIGHT_INT8, 83, 120, 8},    {WEIGHT_INT8, 50, 44, 4},
};

static float matvec_definition(const float *x, Weight w, int IN, size_t o, float acc, int broken) {
    for (int i = 0; i < IN; i++) {
        size_t e = o * IN + i;
        if (broken && w.type == WEIGHT_INT8)
            acc = MADD(x[i] * w.scales[e / w.group], (float)((const int8_t *)w.values)[e], acc);
        else
            acc = MADD(x[i], weight_value(w, e), acc);
    }
    return acc;
}

static int check_matvec(int broken) {
    Rng rng = {29};
    int wrong_cases = 0, n_cases = (int)(sizeof(matvec_cases) / sizeof(matvec_cases[0]));
    for (int c = 0; c < n_cases; c++) {
        MatvecCase mc = matvec_cases[c];
        size_t n = (size_t)mc.OUT * mc.IN;
        int G = mc.type == WEIGHT_INT8 ? mc.group : 1;
        float *x = (float *)mallocCheck(mc.IN * sizeof(float)), *out = (float *)mallocCheck(mc.OUT * sizeof(float));
        float *start = (float *)mallocCheck(mc.OUT * sizeof(float)), *scales = (float *)mallocCheck(n / G * sizeof(float));
        float *f32 = (float *)mallocCheck(n * sizeof(float));
        uint16_t *b16 = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
        int8_t *q = (int8_t *)mallocCheck(n);
        for (size_t e = 0; e < n; e++) {
            f32[e] = rng_uniform(&rng) - 0.5f;
            b16[e] = (uint16_t)(0x3C00 + rng_u64(&rng) % 0x0800) | (uint16_t)(rng_u64(&rng) % 2 << 15);
            q[e] = (int8_t)((int)(rng_u64(&rng) % 255) - 127);
        }
        for (size_t g = 0; g < n / G; g++) scales[g] = (0.5f + rng_uniform(&rng)) / 127.0f;
        for (int i = 0; i < mc.IN; i++) x[i] = rng_uniform(&rng) - 0.5f;
        for (int o = 0; o < mc.OUT; o++) start[o] = rng_uniform(&rng);
        Weight w = {mc.type, mc.type == WEIGHT_FP32 ? (const void *)f32 : mc.type == WEIGHT_BF16 ? (const void *)b16 : q,
                    scales, mc.group};
        int wrong = 0, rows_wrong = 0;
        for (int accumulate = 0; accumulate <= 1; accumulate++) {
            memcpy(out, start, mc.OUT * sizeof(float));
            matvec_forward(out, x, w, mc.IN, mc.OUT, accumulate);
            for (int o = 0; o < mc.OUT; o++) {
                float want = matvec_definition(x, w, mc.IN, o, accumulate ? start[o] : 0.0f, broken);
                if (memcmp(&want, &out[o], sizeof(float)) != 0) wrong++;
            }
        }
        // matmul_forward over N rows, each x, rows ldo apart: a few rows run
        // as matvecs, more through the packed panels; every row is x's chain
        for (int N = 1; N <= MATMUL_ROWS; N++) {
            int ldo = mc.OUT + 3;
            float *xs = (float *)mallocCheck((size_t)N * mc.IN * sizeof(float));
            float *outs = (float *)mallocCheck((size_t)N * ldo * sizeof(float));
            for (int n = 0; n < N; n++) memcpy(xs + (size_t)n * mc.IN, x, mc.IN * sizeof(float));
            for (int n = 0; n < N; n++) memcpy(outs + (size_t)n * ldo, start, mc.OUT * sizeof(float));
            matmul_forward(outs, xs, w, N, mc.IN, mc.OUT, ldo, 1);
            for (int n = 0; n < N; n++)
                for (int o = 0; o < mc.OUT; o++) {
                    float want = matvec_definition(x, w, mc.IN, o, start[o], broken);
                    if (memcmp(&want, &outs[(size_t)n * ldo + o], sizeof(float)) != 0) rows_wrong++;
                }
            free(xs), free(outs);
        }
        const char *names[3] = {"fp32", "bf16", "int8"};
        printf("matvec %s %d x %d (group %d): %d of %d outputs differ from the definition; matmul_forward of 1..%d "
               "rows: %d\n",
               names[mc.type], mc.OUT, mc.IN, mc.group, wrong, 2 * mc.OUT, MATMUL_ROWS, rows_wrong);
        wrong_cases += wrong + rows_wrong > 0;
        free(x), free(out), free(start), free(scales), free(f32), free(b16), free(q);
    }
    return wrong_cases == 0;
}
#endif

// ----------------------------------------------------------------------------

__attribute__((noreturn)) static void usage(const char *prog) {
    fprintf(stderr,
            "usage: %s MODEL STATE [-o OUT] [--bf16] [--tol-scale S]\n"
            "       %s MODEL STATE --update adamw|adafactor EXPECTED\n"
            "       %s --gradcheck [--break]\n"
            "       %s --config SPEC\n"
            "       %s --router\n"
            "       %s --matvec [--break]   (CPU)\n"
            "Compares one forward+backward (or three optimizer steps) with a debug state\n"
            "file at SPEC §7's tolerances; exits 0 only if all hold. --config prints the\n"
            "model header words 2..13 of a preset name or V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn;\n"
            "--router compares the router's top-K with its definition; --matvec decode's\n"
            "product with its definition, bit for bit.\n",
            prog, prog, prog, prog, prog, prog);
    exit(2);
}

int main(int argc, char **argv) {
    const char *pos[2] = {NULL, NULL}, *out = NULL, *update = NULL, *expect = NULL, *config = NULL;
    int npos = 0, gradcheck = 0, broken = 0, router = 0, matvec = 0;
    Precision prec = PRECISION_FP32;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-o") == 0 && i + 1 < argc) out = argv[++i];
        else if (strcmp(argv[i], "--bf16") == 0) prec = PRECISION_BF16;
        else if (strcmp(argv[i], "--tol-scale") == 0 && i + 1 < argc) opt_tol_scale = (float)atof(argv[++i]);
        else if (strcmp(argv[i], "--update") == 0 && i + 2 < argc) {
            update = argv[++i];
            expect = argv[++i];
        } else if (strcmp(argv[i], "--gradcheck") == 0) gradcheck = 1;
        else if (strcmp(argv[i], "--break") == 0) broken = 1;
        else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) config = argv[++i];
        else if (strcmp(argv[i], "--router") == 0) router = 1;
        else if (strcmp(argv[i], "--matvec") == 0) matvec = 1;
        else if (argv[i][0] != '-' && npos < 2) pos[npos++] = argv[i];
        else usage(argv[0]);
    }
    if (prec == PRECISION_BF16 && opt_tol_scale == 1.0f) opt_tol_scale = 30.0f;  // SPEC §7, documented in test/
    if (!(opt_tol_scale > 0.0f)) die("--tol-scale must be > 0");
    int ok;
    if (config) ok = check_config(config);
    else if (router) ok = check_router();
    else if (matvec) {
#ifndef __cplusplus
        ok = check_matvec(broken);
#else
        die("--matvec checks the CPU's matvec_forward (gemm.h): run test_cpu");
#endif
    }
    else if (gradcheck) ok = check_gradients(broken, prec);
    else if (npos != 2) usage(argv[0]);
    else if (update) ok = check_update(pos[0], pos[1], update, expect, prec);
    else ok = check_state(pos[0], pos[1], out, prec);
    return ok ? 0 : 1;
}
