// train.c: trains OpenMoE on token files, linked with either backend
// (openmoe.c -> train, openmoe.cu -> train_gpu).
//
//   ./train -c tiny -o out/tiny -n 1000          train the tiny preset on the KJV
//   ./train -c tiny -o out/tiny -n 1000 -r       resume from the latest checkpoint
//   mpirun -np 2 ./train -c tiny ...             data-parallel (make train MPI=1; section
//                                                "data parallelism" below)
//
// Every step prints one line and appends a row to DIR/log.tsv; every -v steps
// a validation loss at the evaluation capacity factor and a short sample;
// every -e steps (and at the end) a checkpoint: DIR/model_NNNNNNNN.bin (SPEC
// §6, usable by ./run) and DIR/state_NNNNNNNN.bin (optimizer state, step, RNG),
// each written to a temporary name and renamed. With -a N, routing traces of N
// validation and N out-of-domain sequences for dev/analyze_routing.py.
#include "openmoe.h"
#include "tokenizer.h"
#include <time.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <limits.h>

// flag ranges: checkpoint names have 8 digits of step; batch offsets are kept
// in arrays of MAX_BATCH
#define MAX_STEPS 99999999
#define MAX_BATCH 4096
#define MAX_LR 10.0
#define MAX_BIAS_RATE 1.0

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// ----------------------------------------------------------------------------
// token data files (tokenizer.bin-spec, section 2): the header, then the ids
// as uint16 (vocab <= 65536) or int32; kept in memory as int32

typedef struct {
    int32_t *tokens;
    long n;
    int V;
} TokenData;

static void tokens_load(TokenData *d, const char *path) {
    FILE *f = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    long size = header_read(f, path, "token data", TOKENS_MAGIC, 5, h);
    int bytes = h[2];
    d->V = h[3];
    d->n = h[4];
    if ((bytes != 2 && bytes != 4) || d->V <= 0 || d->n <= 0 || (bytes == 2 && d->V > 65536))
        die("%s: bad header: %d bytes per token, vocab %d, %ld tokens", path, bytes, d->V, d->n);
    uint64_t want = size_add(sizeof(h), size_mul(d->n, bytes));
    if ((uint64_t)size != want)
        die("%s: size %ld bytes, but its header describes %ld tokens of %d bytes (%llu bytes)", path, size, d->n,
            bytes, (unsigned long long)want);
    d->tokens = (int32_t *)mallocCheck(d->n * sizeof(int32_t));
    if (bytes == 4) {
        freadCheck(d->tokens, 4, d->n, f, path);
    } else {
        uint16_t *u = (uint16_t *)mallocCheck(d->n * sizeof(uint16_t));
        freadCheck(u, 2, d->n, f, path);
        for (long i = 0; i < d->n; i++) d->tokens[i] = u[i];
        free(u);
    }
    fcloseCheck(f, path);
    for (long i = 0; i < d->n; i++)
        if (d->tokens[i] < 0 || d->tokens[i] >= d->V)
            die("%s: token %ld is %d, out of range [0, %d)", path, i, d->tokens[i], d->V);
}

// x, y (B*T): B windows of T+1 tokens starting at starts[b]
static void batch_fill(int32_t *x, int32_t *y, const TokenData *d, const long *starts, int B, int T) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            x[b * T + t] = d->tokens[starts[b] + t];
            y[b * T + t] = d->tokens[starts[b] + t + 1];
        }
}

// ----------------------------------------------------------------------------
// the training-state checkpoint DIR/state_NNNNNNNN.bin: int32 header[256]
//   [0] CKPT_MAGIC  [1] version 1  [2] step  [3] optimizer kind  [4] B  [5] T
//   [6..7] the data RNG state (uint64, low word first)  [8] Adafactor min_dim
//   [9..10] optimizer state floats (uint64)
//   [11] -n steps  [12] warmup  [13] peak lr (float32 bits)  [14] train cf1000
//   [15] routing group size  [16] seed
//   [17] capacity rule  [18] drop policy  [19] router freeze step S + 1 (0: off)
//   [20] router bias rate u (float32 bits, 0: off)  [21] router bias floats (n_moe*E when u > 0, else 0)
//   [22..255] 0
// then the optimizer state (openmoe.h section 6 layout) as fp32, then the
// router bias (SPEC §8) as fp32 when u > 0. The model's parameters are
// DIR/model_NNNNNNNN.bin. Words 2..10 must match the resuming run (else it
// could not continue exactly); 11..16 are the schedule and settings of the
// saved run, and a resuming run that differs is told so; 17..21, the routing
// variant (SPEC §8), must match: a run is one variant from its first step.

typedef struct {
    int n_steps, warmup, cf1000, group, seed;
    float lr;
    int capacity_rule, drop_policy, freeze;  // SPEC §8; freeze -1: off
    float bias_rate;                         // 0: off
} RunSettings;

static void ckpt_save(const char *path, int step, const OptSettings *o, int B, int T, const Rng *rng,
                      const RunSettings *rs, const float *state, size_t n, const float *bias, size_t n_bias) {
    int32_t h[HEADER_INTS] = {0};
    h[0] = CKPT_MAGIC;
    h[1] = 1;
    h[2] = step;
    h[3] = o->kind;
    h[4] = B;
    h[5] = T;
    memcpy(&h[6], &rng->s, 8);
    h[8] = o->min_dim;
    uint64_t n64 = n;
    memcpy(&h[9], &n64, 8);
    h[11] = rs->n_steps;
    h[12] = rs->warmup;
    memcpy(&h[13], &rs->lr, 4);
    h[14] = rs->cf1000;
    h[15] = rs->group;
    h[16] = rs->seed;
    h[17] = rs->capacity_rule;
    h[18] = rs->drop_policy;
    h[19] = rs->freeze + 1;
    memcpy(&h[20], &rs->bias_rate, 4);
    h[21] = (int32_t)n_bias;
    char tmp[4096];
    FILE *f = atomic_open(path, tmp, sizeof(tmp));
    fwriteCheck(h, sizeof(int32_t), HEADER_INTS, f, tmp);
    fwriteCheck(state, sizeof(float), n, f, tmp);
    fwriteCheck(bias, sizeof(float), n_bias, f, tmp);
    atomic_commit(f, tmp, path);
}

// the routing variant of a run, for messages: "capacity t5x, drop position, freeze off, bias 0"
static void variant_text(char *buf, size_t n, int rule, int policy, long long freeze, float u) {
    char fz[32];
    if (freeze < 0) snprintf(fz, sizeof(fz), "off");
    else snprintf(fz, sizeof(fz), "%lld", freeze);
    snprintf(buf, n, "--capacity %s --drop-policy %s --freeze-router %s --router-bias %g",
             rule >= 0 && rule < N_CAP_RULES ? cap_rule_names[rule] : "?",
             policy >= 0 && policy < N_DROP_POLICIES ? drop_policy_names[policy] : "?", fz, u);
}

static const char *opt_name(int kind) {
    return kind == OPT_ADAMW ? "adamw" : kind == OPT_ADAFACTOR ? "adafactor" : "unknown";
}

// whether the checkpoint header h (of a file of size bytes) can be resumed
// by a run with these settings, n_state floats of optimizer state and n_bias
// of router bias: 0 yes,
// CKPT_OTHER_RUN when a setting differs, CKPT_DAMAGED when the file does not
// add up; why names the first problem
enum { CKPT_OTHER_RUN = 1, CKPT_DAMAGED = 2 };
static int ckpt_mismatch(const int32_t *h, long size, const OptSettings *o, int B, int T, const RunSettings *rs,
                         size_t n_state, size_t n_bias, char *why, size_t nwhy) {
    uint64_t n64;
    memcpy(&n64, &h[9], 8);
    float u;
    memcpy(&u, &h[20], 4);
    if (h[17] != rs->capacity_rule || h[18] != rs->drop_policy || h[19] != rs->freeze + 1 || u != rs->bias_rate) {
        char saved[160], now_[160];
        variant_text(saved, sizeof(saved), h[17], h[18], (long long)h[19] - 1, u);  // a damaged word may be INT_MIN
        variant_text(now_, sizeof(now_), rs->capacity_rule, rs->drop_policy, rs->freeze, rs->bias_rate);
        snprintf(why, nwhy, "saved with routing %s, this run has %s (a run keeps its routing variant: use another -o)",
                 saved, now_);
    } else if (h[3] != (int)o->kind) {
        snprintf(why, nwhy, "saved with optimizer %d (%s), this run has -x %s", h[3], opt_name(h[3]), opt_name(o->kind));
    } else if (h[4] != B) {
        snprintf(why, nwhy, "saved with -b %d, this run has -b %d", h[4], B);
    } else if (h[5] != T) {
        snprintf(why, nwhy, "saved with -t %d, this run has -t %d", h[5], T);
    } else if (h[8] != o->min_dim) {
        snprintf(why, nwhy, "saved with Adafactor min_dim %d, this run has %d", h[8], o->min_dim);
    } else if (n64 != n_state) {
        snprintf(why, nwhy, "%llu floats of optimizer state, this model's are %zu", (unsigned long long)n64, n_state);
    } else if (h[21] != (int32_t)n_bias || h[2] < 0 ||
               (uint64_t)size != size_add(HEADER_BYTES, size_mul(sizeof(float), size_add(n64, n_bias)))) {
        snprintf(why, nwhy, "step %d, size %ld bytes, but its header describes %llu + %d floats (damaged)", h[2],
                 size, (unsigned long long)n64, h[21]);
        return CKPT_DAMAGED;
    } else {
        return 0;
    }
    return CKPT_OTHER_RUN;
}

// reads the optimizer state, the router bias and the data RNG; returns the step
static int ckpt_load(const char *path, const OptSettings *o, int B, int T, const RunSettings *rs, Rng *rng,
                     float *state, size_t n, float *bias, size_t n_bias) {
    FILE *f = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    long size = header_read(f, path, "training state", CKPT_MAGIC, 22, h);
    char why[512];
    if (ckpt_mismatch(h, size, o, B, T, rs, n, n_bias, why, sizeof(why))) die("%s: cannot resume: %s", path, why);
    float lr;
    memcpy(&lr, &h[13], 4);
    if (h[11] != rs->n_steps || h[12] != rs->warmup || lr != rs->lr || h[14] != rs->cf1000 || h[15] != rs->group ||
        h[16] != rs->seed)
        printf("note: %s was saved with -n %d -w %d -l %g -f %g -q %d -s %d; this run continues with -n %d -w %d "
               "-l %g -f %g -q %d -s %d\n", path, h[11], h[12], lr, h[14] / 1000.0, h[15], h[16], rs->n_steps,
               rs->warmup, rs->lr, rs->cf1000 / 1000.0, rs->group, rs->seed);
    memcpy(&rng->s, &h[6], 8);
    freadCheck(state, sizeof(float), n, f, path);
    freadCheck(bias, sizeof(float), n_bias, f, path);
    fcloseCheck(f, path);
    return h[2];
}

// reads the first HEADER_INTS words of path into h; returns its size, -1 when
// it cannot be read or is shorter than a header
static long header_peek(const char *path, int32_t *h) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    struct stat st;
    long size = fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) ? (long)st.st_size : -1;
    if (size >= 0 && fread(h, sizeof(int32_t), HEADER_INTS, f) != HEADER_INTS) size = -1;
    fclose(f);
    return size;
}

// why checkpoint step of dir cannot be resumed by this run (NULL when it can);
// *damaged: 1 when a file is cut short or broken, 0 when it is whole but from
// a run with other settings (another -c, -x, -b, -t)
static const char *checkpoint_problem(const char *dir, int step, const Config *c, const OptSettings *o, int B, int T,
                                      const RunSettings *rs, size_t n_state, size_t n_bias, int *damaged, char *why,
                                      size_t nwhy) {
    char model[4096], state[4096], what[512];
    snprintf(model, sizeof(model), "%s/model_%08d.bin", dir, step);
    snprintf(state, sizeof(state), "%s/state_%08d.bin", dir, step);
    int32_t h[HEADER_INTS];
    long size = header_peek(model, h);
    int problem, field;
    *damaged = 1;
    if (size < 0) snprintf(why, nwhy, "%s: missing, unreadable or shorter than a header (damaged)", model);
    else if (h[0] != MODEL_MAGIC || h[1] != 1) snprintf(why, nwhy, "%s: not a model file of version 1 (damaged)", model);
    else if ((field = config_header_diff(h, c)) >= 0) {
        snprintf(why, nwhy, "%s: the model has %s %d, this run's (-c) has %d", model, config_fields[field].name,
                 h[config_fields[field].word], config_value(c, field));
        *damaged = 0;
    } else if ((uint64_t)size != size_add(sizeof(h), size_mul(4, config_n_params(c))))
        snprintf(why, nwhy, "%s: size %ld bytes, not this model's %llu (damaged)", model, size,
                 (unsigned long long)size_add(sizeof(h), size_mul(4, config_n_params(c))));
    else if ((size = header_peek(state, h)) < 0)
        snprintf(why, nwhy, "%s: unreadable or shorter than a header (damaged)", state);
    else if (h[0] != CKPT_MAGIC || h[1] != 1) snprintf(why, nwhy, "%s: not a training state of version 1 (damaged)", state);
    else if ((problem = ckpt_mismatch(h, size, o, B, T, rs, n_state, n_bias, what, sizeof(what)))) {
        *damaged = problem == CKPT_DAMAGED;
        snprintf(why, nwhy, "%s: %s", state, what);
    } else return NULL;
    return why;
}

// The step to resume from: the latest checkpoint N of dir with a
// state_N.bin (the model is written first and the state last, each to a .tmp
// renamed into place, so a model without its state is an interrupted write and
// does not count); -1 when dir holds none. Exits naming the checkpoint and the
// setting when that checkpoint is from a run with other settings, or when
// every checkpoint is damaged; a damaged checkpoint after a good one is
// skipped with a note.
static int resume_step(const char *dir, const Config *c, const OptSettings *o, int B, int T, const RunSettings *rs,
                       size_t n_state, size_t n_bias) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int best = -1, other = -1, broken = -1;  // latest good, of other settings, damaged
    char why[4096 + 1024], other_why[sizeof(why)], broken_why[sizeof(why)];
    struct dirent *e;
    while ((e = readdir(d))) {
        int step, end = 0, damaged;
        if (sscanf(e->d_name, "state_%8d.bin%n", &step, &end) != 1 || end != 18 || e->d_name[end] != '\0') continue;
        if (!checkpoint_problem(dir, step, c, o, B, T, rs, n_state, n_bias, &damaged, why, sizeof(why))) {
            best = step > best ? step : best;
        } else if (!damaged && step > other) {
            other = step;
            snprintf(other_why, sizeof(other_why), "%s", why);
        } else if (damaged && step > broken) {
            broken = step;
            snprintf(broken_why, sizeof(broken_why), "%s", why);
        }
    }
    closedir(d);
    if (other >= 0) die("-r: cannot resume from checkpoint %d in %s: %s", other, dir, other_why);
    if (broken >= 0 && best < 0) die("-r: cannot resume from checkpoint %d in %s: %s", broken, dir, broken_why);
    if (broken > best) printf("note: checkpoint %d in %s is skipped: %s\n", broken, dir, broken_why);
    return best;
}

// ----------------------------------------------------------------------------
// the log: DIR/log.tsv, a header row, then one row per step. A resumed run
// keeps the rows up to its checkpoint and appends from there, so that the log
// reads as one run.

static FILE *log_open(const char *dir, int resume_step, int n_moe) {
    char path[4096], tmp[4096], line[8192];
    snprintf(path, sizeof(path), "%s/log.tsv", dir);
    FILE *in = resume_step > 0 ? fopen(path, "r") : NULL;
    FILE *out = atomic_open(path, tmp, sizeof(tmp));
    if (in && fgets(line, sizeof(line), in) && strncmp(line, "step\t", 5) == 0) {
        fputs(line, out);
        while (fgets(line, sizeof(line), in) && atoi(line) <= resume_step) fputs(line, out);
    } else {
        fprintf(out, "step\tloss\tce\tlb\trz\tlz\tdropped\tlr\tnorm\tms\ttok_s\tval_ce\tval_loss");
        for (int i = 0; i < n_moe; i++) fprintf(out, "\tdrop_moe%d", i);
        fprintf(out, "\n");
    }
    if (in) fclose(in);
    atomic_commit(out, tmp, path);
    return fopenCheck(path, "a");
}

// ----------------------------------------------------------------------------
// validation, samples and routing traces

// mean losses over the first n_batches windows of val, at the settings s
static void validate(Model *m, const TokenData *val, int B, int T, int n_batches, const MoeSettings *s,
                     int32_t *x, int32_t *y, double *ce, double *total) {
    long starts[MAX_BATCH];
    float losses[N_LOSSES];
    *ce = *total = 0.0;
    for (int i = 0; i < n_batches; i++) {
        for (int b = 0; b < B; b++) starts[b] = ((long)i * B + b) * T;
        batch_fill(x, y, val, starts, B, T);
        model_forward(m, x, y, B, T, s, losses);
        *ce += losses[LOSS_CE] / n_batches;
        *total += losses[LOSS_TOTAL] / n_batches;
    }
}

// generates n tokens with temperature 1 after the token start (EOS, which
// precedes every verse of the data), printing text when a tokenizer is at hand
static void print_sample(Model *m, const Tokenizer *tok, int start, int n, uint64_t seed, float *probs) {
    const Config *c = model_config(m);
    Rng r = {seed};
    int token = start;
    printf("sample: ");
    for (int pos = 0; pos < n && pos + 1 < c->max_seq_len; pos++) {
        const float *logits = model_decode(m, token, pos);
        float maxl = logits[0], sum = 0.0f;
        for (int v = 1; v < c->V; v++) maxl = logits[v] > maxl ? logits[v] : maxl;
        for (int v = 0; v < c->V; v++) sum += probs[v] = expf(logits[v] - maxl);
        float coin = rng_uniform(&r) * sum, cdf = 0.0f;
        for (token = 0; token < c->V - 1; token++) {
            cdf += probs[token];
            if (coin < cdf) break;
        }
        if (!tok) {
            printf("%d ", token);
        } else if (token == tok->eos_id) {
            printf(" / ");
        } else {
            size_t len;
            const char *piece = tokenizer_piece_text(tok, token, pos == 0, &len);
            fwrite(piece, 1, len, stdout);
        }
    }
    printf("\n");
}

// DIR/trace/sNNNNNNNN_dD_cfCCCC.bin: the routing of the first n_seq sequences
// of T tokens of data (n_seq a multiple of B, so that every forward is a full
// batch as in training), read by dev/analyze_routing.py. int32 header[256]:
//   [0] TRACE_MAGIC [1] 1 [2] step [3] n_moe [4] E [5] K [6] N = n_seq*T
//   [7] T [8] cf1000 [9] group_size [10] domain (0 validation, 1 out of domain)
//   [11] L [16..16+n_moe) the model layer of each MoE layer, rest 0
// then int32 tokens[N]; then per MoE layer: int32 expert[N*K], float32
// prob[N*K], uint8 kept[N*K], entry n*K+r being token n's rank-r choice.
static void trace_write(Model *m, const char *dir, int step, const TokenData *data, int domain, int n_seq, int B,
                        int T, const MoeSettings *s, int32_t *x, int32_t *y) {
    const Config *c = model_config(m);
    int nm = n_moe_layers(c), K = c->K;
    size_t N = (size_t)n_seq * T;
    int32_t *tokens = (int32_t *)mallocCheck(N * sizeof(int32_t));
    int32_t *expert = (int32_t *)mallocCheck(nm * N * K * sizeof(int32_t));
    float *prob = (float *)mallocCheck(nm * N * K * sizeof(float));
    uint8_t *kept = (uint8_t *)mallocCheck(nm * N * K);
    float losses[N_LOSSES];
    long starts[MAX_BATCH];
    for (int s0 = 0; s0 < n_seq; s0 += B) {
        for (int b = 0; b < B; b++) starts[b] = (long)(s0 + b) * T;
        batch_fill(x, y, data, starts, B, T);
        model_forward(m, x, y, B, T, s, losses);
        memcpy(tokens + (size_t)s0 * T, x, (size_t)B * T * sizeof(int32_t));
        for (int i = 0; i < nm; i++) {
            size_t at = i * N * K + (size_t)s0 * T * K;
            model_get_routing(m, i, expert + at, prob + at, kept + at);
        }
    }
    int32_t h[HEADER_INTS] = {0};
    h[0] = TRACE_MAGIC;
    h[1] = 1;
    h[2] = step;
    h[3] = nm;
    h[4] = c->E;
    h[5] = K;
    h[6] = (int32_t)N;
    h[7] = T;
    h[8] = s->cf1000;
    h[9] = s->group_size;
    h[10] = domain;
    h[11] = c->L;
    for (int i = 0, l = 0; l < c->L; l++)
        if (is_moe_layer(c, l)) h[16 + i++] = l;
    char path[4096], tmp[4096];
    snprintf(path, sizeof(path), "%s/trace/s%08d_d%d_cf%d.bin", dir, step, domain, s->cf1000);
    FILE *f = atomic_open(path, tmp, sizeof(tmp));
    fwriteCheck(h, sizeof(int32_t), HEADER_INTS, f, tmp);
    fwriteCheck(tokens, sizeof(int32_t), N, f, tmp);
    for (int i = 0; i < nm; i++) {
        fwriteCheck(expert + i * N * K, sizeof(int32_t), N * K, f, tmp);
        fwriteCheck(prob + i * N * K, sizeof(float), N * K, f, tmp);
        fwriteCheck(kept + i * N * K, 1, N * K, f, tmp);
    }
    atomic_commit(f, tmp, path);
    free(tokens);
    free(expert);
    free(prob);
    free(kept);
}

// the four traces of one step: validation and out-of-domain data (when
// given), each at the training and the evaluation capacity factor
static void traces_write(Model *m, const char *dir, int step, const TokenData *val, const TokenData *ood, int n_seq,
                         int B, int T, const MoeSettings *s_train, const MoeSettings *s_eval, int32_t *x, int32_t *y) {
    trace_write(m, dir, step, val, 0, n_seq, B, T, s_train, x, y);
    trace_write(m, dir, step, val, 0, n_seq, B, T, s_eval, x, y);
    if (ood->n) {
        trace_write(m, dir, step, ood, 1, n_seq, B, T, s_train, x, y);
        trace_write(m, dir, step, ood, 1, n_seq, B, T, s_eval, x, y);
    }
}

// mkdir -p: makes dir and its missing parents (errors show when it is written to)
static void make_dirs(const char *dir) {
    char p[4096];
    snprintf(p, sizeof(p), "%s", dir);
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            mkdir(p, 0755);
            *s = '/';
        }
    mkdir(p, 0755);
}

// ----------------------------------------------------------------------------
// learning rate: AdamW warms up linearly then follows a cosine to lr/10 at
// step n; Adafactor is OpenMoE's lr * sqrt(warmup / max(step, warmup))

static float learning_rate(OptKind kind, float lr, int warmup, int step, int n) {
    if (kind == OPT_ADAFACTOR) return lr * sqrtf((float)warmup / (float)(step > warmup ? step : warmup));
    if (step <= warmup) return lr * step / warmup;
    float progress = (float)(step - warmup) / (float)(n > warmup ? n - warmup : 1);
    return lr * (0.1f + 0.9f * 0.5f * (1.0f + cosf(3.14159265f * (progress < 1.0f ? progress : 1.0f))));
}

// ----------------------------------------------------------------------------
// data parallelism (make train MPI=1, then mpirun -np N ./train ...; README
// "Several GPUs"). -b is the global batch: rank r trains on windows
// [r*B/N, (r+1)*B/N) of the batch a 1-rank run draws (the data RNG advances
// the same on every rank), so a run gives the same steps on any rank count,
// up to float rounding. Every rank has all targets (B/N*T each), so the mean
// of the ranks' losses and gradients is those of the whole batch. MoE routing
// groups (-q) stay inside one rank's tokens: capacity is per group and the
// load-balance and z-losses are means over groups, so a run equals the 1-rank
// run when -q divides B/N*T; with -q 0 (or -q > B/N*T) each rank's tokens
// form one smaller group, of capacity cf*(B/N*T)/E, balanced on its own.
// ZeRO-1: rank r keeps the optimizer state of the tensors starting in
// parameters [shard[r], shard[r+1]) (whole tensors: Adafactor's factors span
// a tensor slice), steps them, then every rank gathers the stepped weights.
// Only rank 0 prints, validates, samples and writes; a rank that exits
// with an error aborts the whole job. Without MPI the same calls run one rank.

typedef struct {
    int rank, n;
    size_t *shard;     // [n + 1] parameter offsets of the ZeRO-1 shards
    int *counts;       // [2n] scratch: per-rank counts and displacements of a gather
} Ranks;

// shard[r] = offset of the first tensor at or after n_params * r / n
static void dp_shards(Ranks *dp, const ParamTable *pt) {
    dp->shard = (size_t *)mallocCheck((dp->n + 1) * sizeof(size_t));
    dp->counts = (int *)mallocCheck(2 * (size_t)dp->n * sizeof(int));
    for (int r = 0; r <= dp->n; r++) {
        size_t want = pt->n_params * r / dp->n;
        dp->shard[r] = pt->n_params;
        for (int i = pt->n_tensors - 1; i >= 0; i--)
            if (pt->tensors[i].offset >= want) dp->shard[r] = pt->tensors[i].offset;
    }
}

#ifdef USE_MPI
#include <mpi.h>

static void mpiCheck(int err, const char *what) {
    if (err != MPI_SUCCESS) die("%s failed (MPI error %d)", what, err);
}

// a rank leaving by exit() before MPI_Finalize: with an error (die) it takes
// the whole job down, else (usage) it finalizes
static void dp_at_exit(int status, void *unused) {
    int fin = 1;
    MPI_Finalized(&fin);
    if (fin) return;
    if (status != 0) MPI_Abort(MPI_COMM_WORLD, status);
    MPI_Finalize();
}

static void dp_start(Ranks *dp, int *argc, char ***argv) {
    mpiCheck(MPI_Init(argc, argv), "MPI_Init");
    if (on_exit(dp_at_exit, NULL) != 0) die("on_exit failed");
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &dp->rank), "MPI_Comm_rank");
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &dp->n), "MPI_Comm_size");
    MPI_Comm node;
    int local;
    mpiCheck(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, dp->rank, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
    mpiCheck(MPI_Comm_rank(node, &local), "MPI_Comm_rank");
    mpiCheck(MPI_Comm_free(&node), "MPI_Comm_free");
    if (dp->rank != 0 && !freopen("/dev/null", "w", stdout)) die("rank %d: cannot silence stdout", dp->rank);
    dp_init(dp->rank, dp->n, local);
}

static void dp_end(void) { mpiCheck(MPI_Finalize(), "MPI_Finalize"); }

// dies on every rank unless h is the same on all
static void dp_same(uint64_t h, const char *what) {
    unsigned long long lo = h, hi = h;
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce");
    if (lo != hi) die("the ranks differ in %s", what);
}

static void dp_bcast(void *p, size_t bytes) {
    if (bytes > INT_MAX) die("broadcast of %zu bytes: more than one MPI call carries", bytes);
    mpiCheck(MPI_Bcast(p, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast");
}

// the routed and kept counts of the last forward (n_moe layers of E each,
// contiguous in the model's stats) <- their sums over the ranks
static void dp_sum_router_loads(const RouterStats *stats, int n_moe, int E) {
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, stats[0].routed, 2 * n_moe * E, MPI_INT, MPI_SUM, MPI_COMM_WORLD),
             "MPI_Allreduce");
}

// x (n) <- its mean over the ranks
static void dp_mean(float *x, int n, const Ranks *dp) {
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
    for (int i = 0; i < n; i++) x[i] /= dp->n;
}
#else
static void dp_start(Ranks *dp, int *argc, char ***argv) { dp->rank = 0, dp->n = 1; }
static void dp_end(void) {}
static void dp_same(uint64_t h, const char *what) {}
static void dp_bcast(void *p, size_t bytes) {}
static void dp_mean(float *x, int n, const Ranks *dp) {}
static void dp_sum_router_loads(const RouterStats *stats, int n_moe, int E) {}
static void model_grads_allreduce(Model *m) {}
static void model_params_allgather(Model *m, const size_t *shard) {}
#endif

// The optimizer state moves between the full layout (full, on rank 0:
// checkpoints) and this rank's shard (part). Both layouts are segs segments
// (AdamW: m then v; Adafactor: one), each the ranks' shards in rank order.
// gather 1: part -> full, else full -> part.
static void dp_state_move(const Ranks *dp, const ParamTable *pt, const OptSettings *o, float *full, float *part,
                          int gather) {
    int segs = o->kind == OPT_ADAMW ? 2 : 1, *counts = dp->counts, *displs = dp->counts + dp->n;
    size_t total = 0;
    for (int r = 0; r < dp->n; r++) {
        size_t len = opt_state_floats_range(pt, o->kind, o->min_dim, dp->shard[r], dp->shard[r + 1]) / segs;
        if (total + len > INT_MAX) die("optimizer state of %zu floats: more than one MPI call carries", total + len);
        counts[r] = (int)len;
        displs[r] = (int)total;
        total += len;
    }
    for (int sg = 0; sg < segs; sg++) {
        float *f = full ? full + sg * total : NULL, *p = part + (size_t)sg * counts[dp->rank];
#ifdef USE_MPI
        if (gather)
            mpiCheck(MPI_Gatherv(p, counts[dp->rank], MPI_FLOAT, f, counts, displs, MPI_FLOAT, 0, MPI_COMM_WORLD),
                     "MPI_Gatherv");
        else
            mpiCheck(MPI_Scatterv(f, counts, displs, MPI_FLOAT, p, counts[dp->rank], MPI_FLOAT, 0, MPI_COMM_WORLD),
                     "MPI_Scatterv");
#else
        memcpy(gather ? f : p, gather ? p : f, total * sizeof(float));
#endif
    }
}

// ----------------------------------------------------------------------------

static void usage(int status) {
    fprintf(status ? stderr : stdout,
            "usage: ./train [options]\n"
            "  -c NAME|FILE  preset (tiny small base 8b 34b; V follows the data) or model file to start from (tiny)\n"
            "  -i FILE       training tokens (data/kjv/train.bin)\n"
            "  -j FILE       validation tokens (data/kjv/val.bin)\n"
            "  -k FILE       out-of-domain tokens for the -a traces (data/kjv/ood.bin; skipped if missing)\n"
            "  -z FILE       tokenizer for the samples (data/kjv/tokenizer.bin; token ids if missing)\n"
            "  -o DIR        output directory: log.tsv, checkpoints, traces (out/tiny)\n"
            "  -b N          batch size (8), split over the ranks of an MPI run\n"
            "  -t N          sequence length (256)\n"
            "  -n N          steps (1000)\n"
            "  -x adamw|adafactor  optimizer (adamw)\n"
            "  -l LR         peak learning rate (adamw 3e-3, adafactor 0.01)\n"
            "  -w N          warmup steps (adamw 2%% of -n, adafactor 10000)\n"
            "                adamw: linear warmup, then cosine to lr/10 at step n;\n"
            "                adafactor: lr * sqrt(warmup / max(step, warmup)), as OpenMoE\n"
            "  -f CF         training capacity factor (1.25)\n"
            "  -g CF         evaluation capacity factor (2.0)\n"
            "  -q N          routing group size in tokens, 0 = the whole batch (4096)\n"
            "  -s SEED       seed of the initialisation and the data order (1337)\n"
            "  -e N          checkpoint every N steps, 0 = only at the end (250)\n"
            "  -v N          validate and sample every N steps, 0 = only at the end (100)\n"
            "  -V N          validation batches, read in order from the start of -j (8)\n"
            "  -a N          routing traces of N sequences (rounded up to a multiple of -b) at\n"
            "                step 0, each checkpoint and the end, into DIR/trace (0: off)\n"
            "  -r            resume from the latest complete checkpoint in DIR\n"
            "  -y N          stop after step N as if interrupted (the schedule still spans -n)\n"
            "  routing variants (SPEC §8), in training, validation and traces alike:\n"
            "  --capacity t5x|colossalai|none  expert capacity rule; none is dropless (t5x)\n"
            "  --drop-policy position|probs    which assignments a full expert drops (position)\n"
            "  --freeze-router S   routers not updated after step S (off)\n"
            "  --router-bias U     loss-free balancing bias, rate U > 0 (0: off); with --capacity\n"
            "                      none it balances the experts' work, as nothing is dropped\n"
            "  --bf16        bf16 mixed precision (the CUDA backend)\n");
    exit(status);
}

int main(int argc, char **argv) {
    Ranks dp;
    dp_start(&dp, &argc, &argv);
    int lead = dp.rank == 0;  // rank 0 prints, validates, samples and writes
    const char *init = "tiny", *train_path = "data/kjv/train.bin", *val_path = "data/kjv/val.bin";
    const char *ood_path = "data/kjv/ood.bin", *tok_path = "data/kjv/tokenizer.bin", *dir = "out/tiny";
    int B = 8, T = 256, n_steps = 1000, stop = -1, warmup = -1, group = 4096, seed = 1337;
    int ckpt_every = 250, val_every = 100, val_batches = 8, trace_seqs = 0, resume = 0, tok_given = 0;
    float lr = -1.0f, cf_train = 1.25f, cf_eval = 2.0f, bias_rate = 0.0f;
    int capacity_rule = CAP_T5X, drop_policy = DROP_POSITION, freeze = -1;
    OptKind kind = OPT_ADAMW;
    Precision prec = PRECISION_FP32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) usage(0);
        if (strcmp(a, "-r") == 0) { resume = 1; continue; }
        if (strcmp(a, "--bf16") == 0) { prec = PRECISION_BF16; continue; }
        if (strncmp(a, "--", 2) == 0 && i + 1 < argc) {  // the routing variants, each with a value
            const char *v = argv[i + 1];
            if (strcmp(a, "--capacity") == 0) {
                capacity_rule = name_index(v, cap_rule_names, N_CAP_RULES);
                if (capacity_rule < 0) die("--capacity %s: the rule is t5x, colossalai or none", v);
            } else if (strcmp(a, "--drop-policy") == 0) {
                drop_policy = name_index(v, drop_policy_names, N_DROP_POLICIES);
                if (drop_policy < 0) die("--drop-policy %s: the policy is position or probs", v);
            } else if (strcmp(a, "--freeze-router") == 0) {
                freeze = (int)flag_int(a, v, 0, MAX_STEPS);
            } else if (strcmp(a, "--router-bias") == 0) {
                bias_rate = (float)flag_float(a, v, 0.0, 0, MAX_BIAS_RATE);
            } else {
                fprintf(stderr, "error: unknown option '%s'\n", a);
                usage(2);
            }
            i++;
            continue;
        }
        if (a[0] != '-' || strlen(a) != 2 || i + 1 >= argc) {
            fprintf(stderr, "error: unknown or incomplete option '%s'\n", a);
            usage(2);
        }
        const char *v = argv[++i];
        switch (a[1]) {
        case 'c': init = flag_path(a, v); break;
        case 'i': train_path = flag_path(a, v); break;
        case 'j': val_path = flag_path(a, v); break;
        case 'k': ood_path = flag_path(a, v); break;
        case 'z': tok_path = flag_path(a, v); tok_given = 1; break;
        case 'o': dir = flag_path(a, v); break;
        case 'x':
            if (strcmp(v, "adamw") == 0) kind = OPT_ADAMW;
            else if (strcmp(v, "adafactor") == 0) kind = OPT_ADAFACTOR;
            else die("-x %s: the optimizer is adamw or adafactor", v);
            break;
        case 'l': lr = (float)flag_float(a, v, 0.0, 1, MAX_LR); break;
        case 'f': cf_train = (float)flag_float(a, v, MIN_CF, 0, MAX_CF); break;
        case 'g': cf_eval = (float)flag_float(a, v, MIN_CF, 0, MAX_CF); break;
        case 'b': B = (int)flag_int(a, v, 1, MAX_BATCH); break;
        case 't': T = (int)flag_int(a, v, 1, MAX_SEQ_LEN); break;
        case 'n': n_steps = (int)flag_int(a, v, 1, MAX_STEPS); break;
        case 'y': stop = (int)flag_int(a, v, 0, MAX_STEPS); break;
        case 'w': warmup = (int)flag_int(a, v, 0, MAX_STEPS); break;
        case 'q': group = (int)flag_int(a, v, 0, INT32_MAX); break;
        case 's': seed = (int)flag_int(a, v, 0, INT32_MAX); break;
        case 'e': ckpt_every = (int)flag_int(a, v, 0, MAX_STEPS); break;
        case 'v': val_every = (int)flag_int(a, v, 0, MAX_STEPS); break;
        case 'V': val_batches = (int)flag_int(a, v, 1, MAX_STEPS); break;
        case 'a': trace_seqs = (int)flag_int(a, v, 0, MAX_STEPS); break;
        default: fprintf(stderr, "error: unknown option '%s'\n", a); usage(2);
        }
    }
    if (stop < 0 || stop > n_steps) stop = n_steps;
    if (warmup < 0) warmup = kind == OPT_ADAFACTOR ? 10000 : n_steps / 50;
    if (warmup < 1) warmup = 1;
    int trace_seq_n = (trace_seqs + B - 1) / B * B;  // whole batches
    if (B % dp.n != 0) die("-b %d: the batch does not split over %d ranks", B, dp.n);
    int Bl = B / dp.n;  // this rank's share of every batch

    // data first: with a preset, V follows the data's tokenizer
    TokenData train, val, ood = {NULL, 0, 0};
    tokens_load(&train, train_path);
    tokens_load(&val, val_path);
    if (val.V != train.V) die("%s has vocabulary %d, but %s has %d", val_path, val.V, train_path, train.V);
    uint64_t run_hash = hash_bytes(FNV_BASIS, &train.n, sizeof(train.n));
    run_hash = hash_bytes(run_hash, &val.n, sizeof(val.n));
    for (int i = 1; i < argc; i++) run_hash = hash_bytes(run_hash, argv[i], strlen(argv[i]) + 1);
    dp_same(run_hash, "their flags or the sizes of their data files (-i, -j)");
    Config c;
    float *init_params = NULL;
    if (config_preset(init, &c)) c.V = train.V;
    else init_params = model_file_load(init, &c);
    if (c.V != train.V) die("%s: the model's vocabulary is %d, but the data's (%s) is %d", init, c.V, train_path, train.V);
    if (T > c.max_seq_len) die("-t %d is longer than the model's context %d", T, c.max_seq_len);
    if ((long)B * T + 1 > train.n) die("%s: %ld tokens, fewer than one batch of %d x %d + 1", train_path, train.n, B, T);
    long val_fit = (val.n - 1) / ((long)B * T);  // whole batches in the validation data
    if (val_fit < 1) die("%s: %ld tokens, fewer than one batch of %d x %d + 1", val_path, val.n, B, T);
    if (val_batches > val_fit) val_batches = (int)val_fit;
    if (trace_seq_n > 0) {
        if ((long)trace_seq_n * T + 1 > val.n)
            die("-a %d: %s holds fewer than %d sequences of %d tokens (+1)", trace_seqs, val_path, trace_seq_n, T);
        if (access(ood_path, R_OK) != 0) {
            printf("note: no out-of-domain data %s: routing traces of the validation data only\n", ood_path);
        } else {
            tokens_load(&ood, ood_path);
            if (ood.V != c.V) die("%s has vocabulary %d, but the model has %d", ood_path, ood.V, c.V);
            if ((long)trace_seq_n * T + 1 > ood.n) {
                printf("note: %s holds fewer than %d sequences of %d tokens (+1): not traced\n", ood_path,
                       trace_seq_n, T);
                free(ood.tokens);
                ood.tokens = NULL;
                ood.n = 0;
            }
        }
    }
    Tokenizer tokenizer, *tok = NULL;
    if (tok_given || access(tok_path, R_OK) == 0) {
        tokenizer_load(&tokenizer, tok_path);
        if (tokenizer.vocab_size != c.V)
            die("%s: the tokenizer has %d pieces, but the model's vocabulary is %d", tok_path, tokenizer.vocab_size, c.V);
        tok = &tokenizer;
    }
    int sample_start = tok && tok->eos_id >= 0 ? tok->eos_id : tok && tok->bos_id >= 0 ? tok->bos_id : 0;

    // the output directory, checked for writing before any work
    char path[4096];
    if (lead) {
        make_dirs(dir);
        snprintf(path, sizeof(path), "%s/.write_test", dir);
        FILE *probe = fopen(path, "w");
        if (!probe) die("-o %s: cannot write there: %s", dir, strerror(errno));
        fclose(probe);
        remove(path);
    }
    if (lead && trace_seq_n > 0) {
        snprintf(path, sizeof(path), "%s/trace", dir);
        mkdir(path, 0755);
    }

    OptSettings opt = opt_settings_default(kind);
    float peak_lr = lr > 0.0f ? lr : kind == OPT_ADAMW ? 3e-3f : 0.01f;
    opt.lr = peak_lr;
    MoeSettings s_train = moe_settings_default(), s_eval = moe_settings_default();
    s_train.cf1000 = (int)lrintf(cf_train * 1000);
    s_eval.cf1000 = (int)lrintf(cf_eval * 1000);
    s_train.group_size = s_eval.group_size = group;
    s_train.capacity_rule = s_eval.capacity_rule = capacity_rule;
    s_train.drop_policy = s_eval.drop_policy = drop_policy;
    RunSettings run = {n_steps, warmup, s_train.cf1000, group, seed, peak_lr, capacity_rule, drop_policy, freeze,
                       bias_rate};

    ParamTable table;
    param_table_build(&table, &c);
    dp_shards(&dp, &table);
    opt.shard_lo = dp.shard[dp.rank];
    opt.shard_hi = dp.shard[dp.rank + 1];
    param_table_free(&table);
    Model *m = model_create(&c, Bl, T, prec, &opt);
    const ParamTable *pt = model_param_table(m);
    float *params = (float *)mallocCheck(pt->n_params * sizeof(float));
    size_t n_state = opt_state_floats(pt, kind, opt.min_dim);
    size_t n_part = opt_state_floats_range(pt, kind, opt.min_dim, opt.shard_lo, opt.shard_hi);
    float *state = lead ? (float *)callocCheck(n_state, sizeof(float)) : NULL;  // the whole state, for checkpoints
    float *part = (float *)callocCheck(n_part ? n_part : 1, sizeof(float));       // this rank's shard of it
    size_t n_bias = bias_rate > 0.0f ? (size_t)n_moe_layers(&c) * c.E : 0;
    float *bias = (float *)callocCheck(n_bias, sizeof(float));  // the router bias, SPEC §8
    Rng data_rng = {(uint64_t)seed * 0x9E3779B97F4A7C15ull + 1};  // the batches' offsets
    int step = resume && lead ? resume_step(dir, &c, &opt, B, T, &run, n_state, n_bias) : -1;
    dp_bcast(&step, sizeof(step));
    if (step >= 0) {  // rank 0 reads, the others receive
        if (lead) {
            snprintf(path, sizeof(path), "%s/model_%08d.bin", dir, step);
            Config cc;
            float *p = model_file_load(path, &cc);
            if (memcmp(&cc, &c, sizeof(c)) != 0) die("%s: its config differs from this run's (-c %s)", path, init);
            memcpy(params, p, pt->n_params * sizeof(float));
            free(p);
            snprintf(path, sizeof(path), "%s/state_%08d.bin", dir, step);
            if (ckpt_load(path, &opt, B, T, &run, &data_rng, state, n_state, bias, n_bias) != step)
                die("%s: its step differs from its name", path);
        }
        dp_bcast(params, pt->n_params * sizeof(float));
        dp_bcast(&data_rng, sizeof(data_rng));
        dp_bcast(bias, n_bias * sizeof(float));
        model_set_params(m, params);
        dp_state_move(&dp, pt, &opt, state, part, 0);
        model_set_opt_state(m, part);
        if (n_bias) model_set_router_bias(m, bias);
        printf("resumed from %s/model_%08d.bin and state_%08d.bin at step %d\n", dir, step, step, step);
    } else {
        if (resume) printf("no checkpoint in %s: starting from scratch\n", dir);
        step = 0;
        if (init_params) model_set_params(m, init_params);
        else {
            params_init(pt, &c, params, (uint64_t)seed);
            model_set_params(m, params);
        }
    }
    free(init_params);
    int nm = n_moe_layers(&c);
    printf("model: L %d D %d H %d Hd %d F %d E %d K %d Fe %d moe_every %d, V %d, ctx %d, %zu parameters (%.1f MB)\n",
           c.L, c.D, c.H, c.Hd, c.F, c.E, c.K, c.Fe, c.moe_every, c.V, c.max_seq_len, pt->n_params,
           pt->n_params * 4 / 1e6);
    printf("data: %s %ld tokens, %s %ld tokens; batch %d x %d, %d steps, %s lr %.2e warmup %d, cf %.2f train "
           "%.2f eval, group %d\n", train_path, train.n, val_path, val.n, B, T, n_steps,
           kind == OPT_ADAMW ? "adamw" : "adafactor", peak_lr, warmup, cf_train, cf_eval, group);
    variant_text(path, sizeof(path), capacity_rule, drop_policy, freeze, bias_rate);
    printf("routing: %s\n", path);

    FILE *logf = lead ? log_open(dir, step, nm) : NULL;
    char log_path[4096 + 16];
    snprintf(log_path, sizeof(log_path), "%s/log.tsv", dir);
    int32_t *x = (int32_t *)mallocCheck((size_t)Bl * T * sizeof(int32_t));
    int32_t *y = (int32_t *)mallocCheck((size_t)Bl * T * sizeof(int32_t));
    float *probs = (float *)mallocCheck(c.V * sizeof(float));
    float *drop = (float *)mallocCheck(nm * sizeof(float));  // dropped share per MoE layer of the step
    long starts[MAX_BATCH];
    float losses[N_LOSSES];
    if (lead && trace_seq_n > 0 && step == 0)
        traces_write(m, dir, 0, &val, &ood, trace_seq_n, Bl, T, &s_train, &s_eval, x, y);
    while (step < stop) {
        step++;
        // one step: B windows of T+1 tokens at random offsets, forward, backward, update
        double t0 = now();
        for (int b = 0; b < B; b++) starts[b] = (long)(rng_u64(&data_rng) % (uint64_t)(train.n - T));
        batch_fill(x, y, &train, starts + (size_t)dp.rank * Bl, Bl, T);
        model_forward(m, x, y, Bl, T, &s_train, losses);
        model_backward(m);
        model_grads_allreduce(m);  // data parallelism: the whole batch's gradients on every rank
        opt.lr = learning_rate(kind, peak_lr, warmup, step, n_steps);
        opt.freeze_router = freeze >= 0 && step > freeze;
        float norm = model_update(m, &opt, step);
        model_params_allgather(m, dp.shard);  // ZeRO-1: every rank's stepped shard to all
        if (n_bias) {  // loss-free balancing: from this step's loads (all ranks'), before validation's forward
            dp_sum_router_loads(model_router_stats(m), nm, c.E);
            router_bias_update(bias, model_router_stats(m), nm, c.E, bias_rate);
            model_set_router_bias(m, bias);
        }
        dp_mean(losses, N_LOSSES, &dp);
        double ms = 1e3 * (now() - t0);
        printf("step %5d/%d | loss %.4f (ce %.4f lb %.4f rz %.4f lz %.2f) | drop %.3f | lr %.2e | norm %.3f | "
               "%.1f ms | %.0f tok/s\n", step, n_steps, losses[LOSS_TOTAL], losses[LOSS_CE], losses[LOSS_LB],
               losses[LOSS_RZ], losses[LOSS_LZ], losses[LOSS_DROPPED], opt.lr, norm, ms, B * T / (ms / 1e3));
        for (int i = 0; i < nm; i++) drop[i] = model_router_stats(m)[i].dropped;  // before validation's forward
        dp_mean(drop, nm, &dp);
        if (lead) fprintf(logf, "%d\t%.6f\t%.6f\t%.6f\t%.6f\t%.6f\t%.6f\t%.6e\t%.6f\t%.2f\t%.0f", step, losses[LOSS_TOTAL],
                losses[LOSS_CE], losses[LOSS_LB], losses[LOSS_RZ], losses[LOSS_LZ], losses[LOSS_DROPPED], opt.lr,
                norm, ms, B * T / (ms / 1e3));

        // validation at the evaluation capacity factor, router load of its last batch, a sample
        double val_ce = NAN, val_loss = NAN;
        if (lead && ((val_every > 0 && step % val_every == 0) || step == n_steps)) {
            validate(m, &val, Bl, T, val_batches * dp.n, &s_eval, x, y, &val_ce, &val_loss);
            printf("val  %5d | ce %.4f | loss %.4f | cf %.2f; per MoE layer, last batch:\n", step, val_ce, val_loss,
                   cf_eval);
            const RouterStats *rs = model_router_stats(m);
            for (int i = 0, l = 0; l < c.L; l++) {
                if (!is_moe_layer(&c, l)) continue;
                printf("  layer %2d: lb %.3f rz %.3f drop %.3f | routed %%:", l, rs[i].lb, rs[i].rz, rs[i].dropped);
                for (int e = 0; e < c.E; e++) printf(" %.0f", 100.0 * rs[i].routed[e] / ((double)Bl * T * c.K));
                printf("\n");
                i++;
            }
            print_sample(m, tok, sample_start, 48, (uint64_t)seed + step, probs);
        }
        if (lead) {
            fprintf(logf, "\t%.6f\t%.6f", val_ce, val_loss);
            for (int i = 0; i < nm; i++) fprintf(logf, "\t%.6f", drop[i]);
            fprintf(logf, "\n");
            if (fflush(logf) != 0 || ferror(logf)) die("%s: write failed: %s", log_path, strerror(errno));
        }
        fflush(stdout);

        // checkpoint: the model first, the state last, so a state file always has its model
        if ((ckpt_every > 0 && step % ckpt_every == 0) || step == stop) {
            model_get_params(m, params);
            if (dp.n > 1)
                dp_same(hash_bytes(FNV_BASIS, params, pt->n_params * sizeof(float)),
                        "their weights (a nondeterministic reduction?)");
            model_get_opt_state(m, part);
            dp_state_move(&dp, pt, &opt, state, part, 1);
            if (lead) {
                snprintf(path, sizeof(path), "%s/model_%08d.bin", dir, step);
                model_file_save(path, &c, params);
                snprintf(path, sizeof(path), "%s/state_%08d.bin", dir, step);
                ckpt_save(path, step, &opt, B, T, &data_rng, &run, state, n_state, bias, n_bias);
                printf("checkpoint %s/model_%08d.bin\n", dir, step);
                if (trace_seq_n > 0)
                    traces_write(m, dir, step, &val, &ood, trace_seq_n, Bl, T, &s_train, &s_eval, x, y);
            }
        }
    }
    if (lead) fcloseCheck(logf, log_path);
    if (tok) tokenizer_free(tok);
    free(train.tokens);
    free(val.tokens);
    free(ood.tokens);
    free(params);
    free(state);
    free(part);
    free(dp.shard);
    free(dp.counts);
    free(bias);
    free(x);
    free(y);
    free(probs);
    free(drop);
    model_free(m);
    dp_end();
    return 0;
}
