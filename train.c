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
// both written to temporary names, then renamed (all or nothing). With -a N, routing traces of N
// validation and N out-of-domain sequences for dev/analyze_routing.py.
#include "openmoe.h"
#include "tokenizer.h"
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <limits.h>

// flag ranges: checkpoint names have 8 digits of step; a batch's window
// offsets are kept in Run.starts[MAX_BATCH]
#define MAX_STEPS 99999999
#define MAX_BATCH 4096
#define MAX_LR 10.0
#define MAX_BIAS_RATE 1.0
// the most rows --dump-examples writes
#define MAX_DUMP_ROWS 1000000
// tokens in each sample printed at validation
#define SAMPLE_TOKENS 48

// ----------------------------------------------------------------------------
// token data files (tokenizer.bin-spec, section 2): the header, then the ids
// as uint16 (vocab <= 65536) or int32; kept in memory as int32

typedef struct {
    int32_t *tokens;
    long n;
    int V;        // the header's vocabulary
    int max_id;   // the largest token id present
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
    d->max_id = 0;
    for (long i = 0; i < d->n; i++) {
        if (d->tokens[i] < 0 || d->tokens[i] >= d->V)
            die("%s: token %ld is %d, out of range [0, %d)", path, i, d->tokens[i], d->V);
        d->max_id = d->tokens[i] > d->max_id ? d->tokens[i] : d->max_id;
    }
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
// UL2 (SPEC §10): OpenMoE's mixture of denoisers as rows of T tokens, packed.
// An example is a chunk of the training stream at a random offset, turned by
// one of six denoisers into inputs ++ targets: span corruption (R, X: each
// noise span replaced by a sentinel in the inputs, and follows its sentinel in
// the targets) or prefix LM (S: the chunk cut in two), with its mode prefix in
// front of the inputs, and EOS after inputs and targets. The model reads
// [0] ++ example[:-1] and is trained on the targets only. Examples fill the
// rows greedily in order, each its own segment with positions from 0; the rest
// of a row is padding (segment -1, target -1). An example's draws come from the
// generator's RNG in a fixed order (denoiser, offset, then the prefix LM's cut
// or the span lengths), so the rows depend on the seed, the data, the
// tokenizer and T alone, and a checkpoint saves the RNG state from which the
// next example (the one that did not fit the last row) is drawn again.

#define UL2_DENOISERS 6
#define UL2_START_TOKEN 0    // the model's input before an example's first token (seqio's shift fills 0)
#define UL2_PAD_TOKEN 0      // the input at padding
#define UL2_MAX_MODE_IDS 64  // room for a mode prefix's ids
#define UL2_VAL_SEED 0       // the validation examples' seed, whatever -s is: every run sees the same

enum { OBJ_CAUSAL, OBJ_UL2, N_OBJECTIVES };
static const char *const objective_names[N_OBJECTIVES] = {"causal", "ul2"};

// one denoiser of ul2_objective (OpenMoE's fork of t5/data/preprocessors.py)
typedef struct {
    char kind;          // 'R', 'X' (span corruption) or 'S' (prefix LM)
    int mean_span;      // μ (span corruption)
    int density_pct;    // r, in percent (span corruption)
    int rate_pct;       // its share of the examples, in percent
    const char *mode;   // the mode prefix, as text
} Denoiser;

static const Denoiser ul2_denoisers[UL2_DENOISERS] = {
    {'R', 3, 15, 10, "[NLU] "}, {'R', 8, 15, 10, "[NLU] "}, {'X', 3, 50, 10, "[NLG] "},
    {'X', 8, 50, 10, "[NLG] "}, {'X', 64, 50, 10, "[NLG] "}, {'S', 0, 0, 50, "[S2S] "},
};

// span corruption of a raw chunk of n tokens: m noise tokens in s spans
typedef struct { int n, m, s; } Spans;

// a / b rounded to nearest, halves to even (Python's round, tf.round); a >= 0, b > 0
static int div_round_even(int a, int b) {
    int q = a / b, twice_rest = 2 * (a % b);
    return q + (twice_rest > b || (twice_rest == b && (q & 1)));
}

// m = round(n r) kept in [1, n - 1], s = max(1, round(m / μ)) (random_spans_noise_mask); n >= 2
static Spans spans_of(int n, const Denoiser *d) {
    Spans sp = {n, div_round_even(n * d->density_pct, 100), 0};
    sp.m = sp.m < 1 ? 1 : sp.m > n - 1 ? n - 1 : sp.m;
    sp.s = div_round_even(sp.m, d->mean_span);
    if (sp.s < 1) sp.s = 1;
    return sp;
}

// inputs: the n - m other tokens, a sentinel per span, EOS; targets: a sentinel per span, the m noise tokens, EOS
static int spans_inputs(Spans sp) { return sp.n - sp.m + sp.s + 1; }
static int spans_targets(Spans sp) { return sp.m + sp.s + 1; }

// T5's random_spans_helper: the longest chunk whose inputs fit I (they grow
// with n); at r = 0.5 one token shorter when its targets would not fit I. I >= 3
static Spans spans_for(int I, const Denoiser *d) {
    int n = I - 1;
    while (spans_inputs(spans_of(n + 1, d)) <= I) n++;
    Spans sp = spans_of(n, d);
    if (d->density_pct == 50 && spans_targets(sp) > I) sp = spans_of(n - 1, d);
    return sp;
}

typedef struct {
    // fixed: the stream, the ids, the lengths
    const TokenData *data;
    int B, T, I;                      // rows of T; inputs get I = T/2, targets T - I
    int eos;
    int sentinel0;                    // sentinel k is id sentinel0 - k (V_tok + S - 1 - k)
    Spans spans[UL2_DENOISERS];       // the span denoisers' chunks at I
    int chunk_s;                      // the prefix LM's chunk: I - 1 tokens
    int32_t mode[UL2_DENOISERS][UL2_MAX_MODE_IDS];  // the mode prefixes' ids
    int mode_len[UL2_DENOISERS];
    int n_sentinels;                  // the tokenizer's
    // the state
    Rng rng;                          // the draws after those of the next example
    Rng next_from;                    // the RNG state the next example was drawn from: what a checkpoint keeps
    int32_t *seq;                     // (T) the next example, inputs ++ targets (each at most I: spans_for)
    int seq_len, n_inputs;
    int *noise, *runs;                // (T) scratch: a chunk's span and run lengths
    // the batch it fills: B rows of T
    int32_t *x, *y;                   // the model's inputs, the targets (-1: no loss)
    int32_t *segment, *position;      // the example of each token in its row (-1: padding), its position in it
} Ul2;

// the longest mode prefix, in ids
static int ul2_mode_max(const Ul2 *g) {
    int most = 0;
    for (int d = 0; d < UL2_DENOISERS; d++) most = g->mode_len[d] > most ? g->mode_len[d] : most;
    return most;
}

// the most spans an example masks: sentinels it needs
static int ul2_sentinels_needed(const Ul2 *g) {
    int most = 0;
    for (int d = 0; d < UL2_DENOISERS; d++) most = g->spans[d].s > most ? g->spans[d].s : most;
    return most;
}

// which denoiser the next example uses, by the rates
static int denoiser_draw(Rng *rng) {
    int u = (int)(rng_u64(rng) % 100), d = 0;
    while (u >= ul2_denoisers[d].rate_pct) u -= ul2_denoisers[d++].rate_pct;
    return d;
}

// len[0..parts) <- a uniformly random composition of total into parts positive
// parts (T5's _random_segmentation): parts - 1 of the total - 1 gaps between
// items are cuts, each gap in turn a cut with probability cuts left / gaps left
static void composition_draw(Rng *rng, int total, int parts, int *len) {
    int cuts = parts - 1, k = 0;
    len[0] = 1;
    for (int gap = 0; gap < total - 1; gap++) {
        if (cuts > 0 && rng_u64(rng) % (uint64_t)(total - 1 - gap) < (uint64_t)cuts) {
            len[++k] = 1;
            cuts--;
        } else {
            len[k]++;
        }
    }
}

// the next example into g->seq, drawn from g->rng: the mode prefix, the
// denoised chunk, EOS (inputs cut to I - 1 tokens before their EOS:
// append_eos_after_trim), then the targets and EOS
static void ul2_draw(Ul2 *g) {
    g->next_from = g->rng;
    int d = denoiser_draw(&g->rng), I = g->I, k = 0;
    int32_t *seq = g->seq;
    for (int i = 0; i < g->mode_len[d]; i++) seq[k++] = g->mode[d][i];
    if (ul2_denoisers[d].kind == 'S') {
        int n = g->chunk_s;
        const int32_t *c = g->data->tokens + rng_u64(&g->rng) % (uint64_t)(g->data->n - n + 1);
        int p = 1 + (int)(rng_u64(&g->rng) % (uint64_t)(n - 1));  // the cut, in [1, n - 1]
        for (int i = 0; i < p && k < I - 1; i++) seq[k++] = c[i];
        seq[k++] = g->eos;
        g->n_inputs = k;
        for (int i = p; i < n; i++) seq[k++] = c[i];
    } else {
        Spans sp = g->spans[d];
        const int32_t *c = g->data->tokens + rng_u64(&g->rng) % (uint64_t)(g->data->n - sp.n + 1);
        composition_draw(&g->rng, sp.m, sp.s, g->noise);
        composition_draw(&g->rng, sp.n - sp.m, sp.s, g->runs);
        // the chunk is run_0 span_0 run_1 span_1 ...: inputs run_0 <0> run_1 <1> ..., targets <0> span_0 <1> span_1 ...
        for (int j = 0, at = 0; j < sp.s; j++) {
            for (int i = 0; i < g->runs[j] && k < I - 1; i++) seq[k++] = c[at + i];
            if (k < I - 1) seq[k++] = g->sentinel0 - j;
            at += g->runs[j] + g->noise[j];
        }
        seq[k++] = g->eos;
        g->n_inputs = k;
        for (int j = 0, at = 0; j < sp.s; j++) {
            at += g->runs[j];
            seq[k++] = g->sentinel0 - j;
            for (int i = 0; i < g->noise[j]; i++) seq[k++] = c[at++];
        }
    }
    seq[k++] = g->eos;
    g->seq_len = k;
}

// the generator of B rows of T from data, with the sentinels, EOS and mode
// prefixes of tok (read from tok_path); its first example drawn from the seed.
// Exits naming the file or -t when they cannot make §10's examples
static void ul2_make(Ul2 *g, const TokenData *data, const Tokenizer *tok, const char *tok_path, int B, int T,
                     int seed) {
    memset(g, 0, sizeof(*g));
    g->data = data;
    g->B = B;
    g->T = T;
    g->I = T / 2;
    g->eos = tok->eos_id;
    g->sentinel0 = tok->vocab_size - 1;
    g->n_sentinels = tok->n_sentinels;
    if (g->eos < 0) die("%s: the tokenizer has no EOS, which ends UL2's inputs and targets", tok_path);
    if (tok->n_sentinels == 0)
        die("%s: the tokenizer has no sentinels <extra_id_k>, which --objective ul2 needs "
            "(dev/export_tokenizer.py --extra-ids S)", tok_path);
    for (int d = 0; d < UL2_DENOISERS; d++) {
        const char *text = ul2_denoisers[d].mode;
        g->mode_len[d] = tokenizer_encode(tok, text, strlen(text), g->mode[d], UL2_MAX_MODE_IDS);
    }
    int least_I = ul2_mode_max(g) + 2;  // the mode prefix, a token of the chunk and EOS
    if (g->I < least_I)
        die("-t %d is too short for UL2: its inputs (T/2 = %d tokens) must hold a mode prefix (%d tokens with "
            "%s), a token of text and EOS: -t %d at least", T, g->I, ul2_mode_max(g), tok_path, 2 * least_I);
    for (int d = 0; d < UL2_DENOISERS; d++)
        if (ul2_denoisers[d].kind != 'S') g->spans[d] = spans_for(g->I, &ul2_denoisers[d]);
    g->chunk_s = g->I - 1;
    if (ul2_sentinels_needed(g) > tok->n_sentinels)
        die("%s: the tokenizer has %d sentinels, but UL2 at -t %d masks up to %d spans, one sentinel each "
            "(dev/export_tokenizer.py --extra-ids)", tok_path, tok->n_sentinels, T, ul2_sentinels_needed(g));
    g->seq = (int32_t *)mallocCheck((size_t)T * sizeof(int32_t));
    g->noise = (int *)mallocCheck((size_t)T * sizeof(int));
    g->runs = (int *)mallocCheck((size_t)T * sizeof(int));
    size_t BT = (size_t)B * T;
    g->x = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    g->y = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    g->segment = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    g->position = (int32_t *)mallocCheck(BT * sizeof(int32_t));
    g->rng.s = (uint64_t)seed * 0x9E3779B97F4A7C15ull + 2;  // the data RNG's seeding, one stream over
    ul2_draw(g);
}

static void ul2_free(Ul2 *g) {
    free(g->seq);
    free(g->noise);
    free(g->runs);
    free(g->x);
    free(g->y);
    free(g->segment);
    free(g->position);
}

// the lengths at I, for the run's summary: "R(3, 0.15) n 1137 m 171 s 57, ..."
static void ul2_print(const Ul2 *g) {
    printf("ul2: I %d; ", g->I);
    for (int d = 0; d < UL2_DENOISERS; d++) {
        const Denoiser *dn = &ul2_denoisers[d];
        if (dn->kind == 'S') printf("S n %d", g->chunk_s);
        else printf("%c(%d, %g) n %d m %d s %d, ", dn->kind, dn->mean_span, dn->density_pct / 100.0, g->spans[d].n,
                    g->spans[d].m, g->spans[d].s);
    }
    printf("; mode prefixes");
    for (int d = 0; d < UL2_DENOISERS; d++)
        if (d == 0 || strcmp(ul2_denoisers[d].mode, ul2_denoisers[d - 1].mode) != 0)
            printf(" \"%s\" %d ids", ul2_denoisers[d].mode, g->mode_len[d]);
    printf("; %d of %d sentinels\n", ul2_sentinels_needed(g), g->n_sentinels);
}

// the next B rows: whole examples in order, each in the current row while it
// fits, else in the next (greedy packing)
static void ul2_batch(Ul2 *g) {
    int T = g->T;
    for (int b = 0; b < g->B; b++) {
        int32_t *x = g->x + (size_t)b * T, *y = g->y + (size_t)b * T;
        int32_t *seg = g->segment + (size_t)b * T, *pos = g->position + (size_t)b * T;
        int col = 0;
        for (int segment = 0; g->seq_len <= T - col; segment++) {
            for (int t = 0; t < g->seq_len; t++, col++) {
                x[col] = t == 0 ? UL2_START_TOKEN : g->seq[t - 1];
                y[col] = t >= g->n_inputs ? g->seq[t] : -1;
                seg[col] = segment;
                pos[col] = t;
            }
            ul2_draw(g);
        }
        for (; col < T; col++) {
            x[col] = UL2_PAD_TOKEN;
            y[col] = -1;
            seg[col] = -1;
            pos[col] = 0;
        }
    }
}

// the state a checkpoint keeps: the RNG state the next example is drawn from
static uint64_t ul2_state(const Ul2 *g) { return g->next_from.s; }

// continues from a kept state: the next example drawn again
static void ul2_restore(Ul2 *g, uint64_t state) {
    g->rng.s = state;
    ul2_draw(g);
}

// ----------------------------------------------------------------------------
// the run: its flags, and all that main's steps share

// the ranks of data parallelism (section "data parallelism" below)
typedef struct {
    int rank, n;
    size_t *shard;     // [n + 1] parameter offsets of the ZeRO-1 shards
    int *counts;       // [2n] scratch: per-rank counts and displacements of a gather
} Ranks;

// the flags (usage below); val_batches is cut to the batches the validation data holds
typedef struct {
    const char *init, *train_path, *val_path, *ood_path, *tok_path, *dir;
    int B, T, n_steps, stop, warmup, group, seed;
    int ckpt_every, val_every, val_batches, trace_seqs, resume, tok_given;
    float lr, cf_train, cf_eval, bias_rate;  // lr -1: the optimizer's default
    int capacity_rule, drop_policy, freeze;  // SPEC §8; freeze -1: off
    int objective, ul2_steps;                // SPEC §10: OBJ_*; causal LM after step ul2_steps (0: never)
    int dump_rows;                           // --dump-examples: rows to write to dump_path (0: off)
    const char *dump_path;
    OptKind kind;
    Precision prec;
} TrainArgs;

// what a checkpoint records of the run's settings (header words 11..23 below)
typedef struct {
    int n_steps, warmup, cf1000, group, seed;
    float lr;
    int capacity_rule, drop_policy, freeze;  // SPEC §8; freeze -1: off
    float bias_rate;                         // 0: off
    int objective, ul2_steps;                // SPEC §10
} RunSettings;

// a training run as each rank holds it
typedef struct {
    TrainArgs a;
    Ranks dp;
    int lead;                    // rank 0: prints, validates, samples and writes
    int Bl;                      // this rank's share of every batch
    int trace_seq_n;             // sequences traced: -a rounded up to whole batches
    TokenData train, val, ood;   // ood.n 0: none
    Tokenizer tokenizer, *tok;   // tok NULL: samples print token ids
    int sample_start;            // the token samples start from
    Config c;
    int nm;                      // MoE layers
    OptSettings opt;             // opt.lr: this step's
    float peak_lr;
    MoeSettings s_train, s_eval;
    RunSettings rs;
    Model *m;
    const ParamTable *pt;
    float *params;               // (n_params) the weights, for checkpoints
    float *state;                // (n_state) the whole optimizer state on rank 0, for checkpoints
    float *part;                 // this rank's shard of it
    float *bias;                 // (n_bias) the router bias, SPEC §8
    size_t n_state, n_bias;
    Rng data_rng;                // the batches' offsets
    Ul2 ul2;                     // with --objective ul2: the batches of its steps
    Ul2 ul2_val;                 // and its validation examples, this rank's share of a batch at a time
    uint64_t ul2_val_start;      // the state ul2_val starts from at every validation
    int step;                    // the last step taken
    FILE *logf;                  // rank 0
    char log_path[4096 + 16];
    int32_t *x, *y;              // (Bl*T) a batch's inputs and targets
    long starts[MAX_BATCH];      // a batch's window offsets
    float *drop;                 // (nm) dropped share per MoE layer of the step, mean over the ranks
    ProbIndex *probs;            // (V) the sampler's scratch
    // the last step's measurements
    float losses[N_LOSSES];      // mean over the ranks
    float norm;
    double ms;
    int step_ul2;                // 1: a UL2 step (SPEC §10), 0: causal LM
    long targets;                // the targets of its whole batch
    double val_ce, val_loss;     // NAN without validation
    double val_ul2_ce;           // NAN without validation or without UL2
} Run;

// ----------------------------------------------------------------------------
// the training-state checkpoint DIR/state_NNNNNNNN.bin: int32 header[256]
//   [0] CKPT_MAGIC  [1] version 1  [2] step  [3] optimizer kind  [4] B  [5] T
//   [6..7] the data RNG state (uint64, low word first)  [8] Adafactor min_dim
//   [9..10] optimizer state floats (uint64)
//   [11] -n steps  [12] warmup  [13] peak lr (float32 bits)  [14] train cf1000
//   [15] routing group size  [16] seed
//   [17] capacity rule  [18] drop policy  [19] router freeze step S + 1 (0: off)
//   [20] router bias rate u (float32 bits, 0: off)  [21] router bias floats (n_moe*E when u > 0, else 0)
//   [22] objective (0 causal, 1 ul2: SPEC §10)  [23] --ul2-steps S (0: never switches)
//   [24..25] with ul2, the UL2 generator's RNG state from which its next example is drawn (uint64, low
//   word first), else 0
//   [26..255] 0
// then the optimizer state (openmoe.h section 4 layout) as fp32, then the
// router bias (SPEC §8) as fp32 when u > 0. The model's parameters are
// DIR/model_NNNNNNNN.bin. Words 2..10 must match the resuming run (else it
// could not continue exactly); 11..16 are the schedule and settings of the
// saved run, and a resuming run that differs is told so; 17..21, the routing
// variant (SPEC §8), and 22..23, the objective, must match: a run is one
// variant and one objective from its first step. Files written before §10
// have 0 in 22..25: a causal run's words.

// the state of step r->step (rank 0's whole optimizer state) to f, an atomic_open'd tmp
static void ckpt_write(const Run *r, FILE *f, const char *tmp) {
    const RunSettings *rs = &r->rs;
    int32_t h[HEADER_INTS] = {0};
    h[0] = CKPT_MAGIC;
    h[1] = 1;
    h[2] = r->step;
    h[3] = r->opt.kind;
    h[4] = r->a.B;
    h[5] = r->a.T;
    memcpy(&h[6], &r->data_rng.s, 8);
    h[8] = r->opt.min_dim;
    uint64_t n64 = r->n_state;
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
    h[21] = (int32_t)r->n_bias;
    h[22] = rs->objective;
    h[23] = rs->ul2_steps;
    uint64_t ul2 = rs->objective == OBJ_UL2 ? ul2_state(&r->ul2) : 0;
    memcpy(&h[24], &ul2, 8);
    fwriteCheck(h, sizeof(int32_t), HEADER_INTS, f, tmp);
    fwriteCheck(r->state, sizeof(float), r->n_state, f, tmp);
    fwriteCheck(r->bias, sizeof(float), r->n_bias, f, tmp);
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

// the objective of a run, for messages: "--objective ul2 --ul2-steps 100"
static void objective_text(char *buf, size_t n, int objective, int ul2_steps) {
    snprintf(buf, n, "--objective %s --ul2-steps %d",
             objective >= 0 && objective < N_OBJECTIVES ? objective_names[objective] : "?", ul2_steps);
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
    uint64_t n64, ul2;
    memcpy(&n64, &h[9], 8);
    memcpy(&ul2, &h[24], 8);
    float u;
    memcpy(&u, &h[20], 4);
    if (h[22] != rs->objective || h[23] != rs->ul2_steps) {
        char saved[96], now_[96];
        objective_text(saved, sizeof(saved), h[22], h[23]);
        objective_text(now_, sizeof(now_), rs->objective, rs->ul2_steps);
        snprintf(why, nwhy, "saved with %s, this run has %s (a run keeps its objective: use another -o)", saved, now_);
    } else if (h[17] != rs->capacity_rule || h[18] != rs->drop_policy || h[19] != rs->freeze + 1 ||
               u != rs->bias_rate) {
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
    } else if (rs->objective != OBJ_UL2 && ul2 != 0) {
        snprintf(why, nwhy, "a causal run's, but words 24..25 hold a UL2 generator state (damaged)");
        return CKPT_DAMAGED;
    } else {
        return 0;
    }
    return CKPT_OTHER_RUN;
}

// reads the optimizer state, the router bias and the data RNG into r, the UL2
// generator's state into *ul2; returns the step
static int ckpt_load(Run *r, const char *path, uint64_t *ul2) {
    const RunSettings *rs = &r->rs;
    FILE *f = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    long size = header_read(f, path, "training state", CKPT_MAGIC, 26, h);
    char why[512];
    if (ckpt_mismatch(h, size, &r->opt, r->a.B, r->a.T, rs, r->n_state, r->n_bias, why, sizeof(why)))
        die("%s: cannot resume: %s", path, why);
    float lr;
    memcpy(&lr, &h[13], 4);
    if (h[11] != rs->n_steps || h[12] != rs->warmup || lr != rs->lr || h[14] != rs->cf1000 || h[15] != rs->group ||
        h[16] != rs->seed)
        printf("note: %s was saved with -n %d -w %d -l %g -f %g -q %d -s %d; this run continues with -n %d -w %d "
               "-l %g -f %g -q %d -s %d\n", path, h[11], h[12], lr, h[14] / 1000.0, h[15], h[16], rs->n_steps,
               rs->warmup, rs->lr, rs->cf1000 / 1000.0, rs->group, rs->seed);
    memcpy(&r->data_rng.s, &h[6], 8);
    memcpy(ul2, &h[24], 8);
    freadCheck(r->state, sizeof(float), r->n_state, f, path);
    freadCheck(r->bias, sizeof(float), r->n_bias, f, path);
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
static const char *checkpoint_problem(const Run *r, int step, int *damaged, char *why, size_t nwhy) {
    const char *dir = r->a.dir;
    const Config *c = &r->c;
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
    else if ((problem = ckpt_mismatch(h, size, &r->opt, r->a.B, r->a.T, &r->rs, r->n_state, r->n_bias, what,
                                      sizeof(what)))) {
        *damaged = problem == CKPT_DAMAGED;
        snprintf(why, nwhy, "%s: %s", state, what);
    } else return NULL;
    return why;
}

// The step to resume from: the latest checkpoint N of dir with a
// state_N.bin (both are written to .tmp files, then renamed, the model first,
// so a model without its state is an interrupted checkpoint and does not
// count: checkpoint_write); -1 when dir holds none. Exits naming the checkpoint and the
// setting when that checkpoint is from a run with other settings, or when
// every checkpoint is damaged; a damaged checkpoint after a good one is
// skipped with a note.
static int resume_step(const Run *r) {
    const char *dir = r->a.dir;
    DIR *d = opendir(dir);
    if (!d) return -1;
    int best = -1, other = -1, broken = -1;  // latest good, of other settings, damaged
    char why[4096 + 1024], other_why[sizeof(why)], broken_why[sizeof(why)];
    struct dirent *e;
    while ((e = readdir(d))) {
        int step, end = 0, damaged;
        if (sscanf(e->d_name, "state_%8d.bin%n", &step, &end) != 1 || end != 18 || e->d_name[end] != '\0') continue;
        if (!checkpoint_problem(r, step, &damaged, why, sizeof(why))) {
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

static void log_open(Run *r) {
    char tmp[4096], line[8192];
    snprintf(r->log_path, sizeof(r->log_path), "%s/log.tsv", r->a.dir);
    FILE *in = r->step > 0 ? fopen(r->log_path, "r") : NULL;
    FILE *out = atomic_open(r->log_path, tmp, sizeof(tmp));
    if (in && fgets(line, sizeof(line), in) && strncmp(line, "step\t", 5) == 0) {
        fputs(line, out);
        while (fgets(line, sizeof(line), in) && atoi(line) <= r->step) fputs(line, out);
    } else {
        fprintf(out, "step\tloss\tce\tlb\trz\tlz\tdropped\tlr\tnorm\tms\ttok_s\tval_ce\tval_loss");
        for (int i = 0; i < r->nm; i++) fprintf(out, "\tdrop_moe%d", i);
        fprintf(out, "\tul2\ttargets\tval_ul2_ce\n");
    }
    if (in) fclose(in);
    fflushCheck(out, tmp);
    atomic_rename(tmp, r->log_path);
    r->logf = out;  // still open: the rows go to the file just renamed, not to whatever the name holds later
}

// the row of the last step: its losses (ce and lz over the batch's targets),
// the validation losses when due, per MoE layer the dropped share; ul2 1 for
// a UL2 step (SPEC §10); the batch's targets; the UL2 validation loss
static void log_row(const Run *r) {
    const float *l = r->losses;
    int BT = r->a.B * r->a.T;
    fprintf(r->logf, "%d\t%.6f\t%.6f\t%.6f\t%.6f\t%.6f\t%.6f\t%.6e\t%.6f\t%.2f\t%.0f", r->step, l[LOSS_TOTAL],
            l[LOSS_CE], l[LOSS_LB], l[LOSS_RZ], l[LOSS_LZ], l[LOSS_DROPPED], r->opt.lr, r->norm, r->ms,
            BT / (r->ms / 1e3));
    fprintf(r->logf, "\t%.6f\t%.6f", r->val_ce, r->val_loss);
    for (int i = 0; i < r->nm; i++) fprintf(r->logf, "\t%.6f", r->drop[i]);
    fprintf(r->logf, "\t%d\t%ld\t%.6f\n", r->step_ul2, r->targets, r->val_ul2_ce);
    fflushCheck(r->logf, r->log_path);
}

// ----------------------------------------------------------------------------
// validation, samples and routing traces

// mean losses over the first -V windows per rank of the validation data, at
// the evaluation settings
static void validate(Run *r) {
    int B = r->Bl, T = r->a.T, n_batches = r->a.val_batches * r->dp.n;
    float losses[N_LOSSES];
    Batch batch = {r->x, r->y, NULL, NULL, B, T, 0.0};
    r->val_ce = r->val_loss = 0.0;
    for (int i = 0; i < n_batches; i++) {
        for (int b = 0; b < B; b++) r->starts[b] = ((long)i * B + b) * T;
        batch_fill(r->x, r->y, &r->val, r->starts, B, T);
        model_forward(r->m, &batch, &r->s_eval, losses);
        r->val_ce += losses[LOSS_CE] / n_batches;
        r->val_loss += losses[LOSS_TOTAL] / n_batches;
    }
}

// the targets of n tokens' y
static long targets_count(const int32_t *y, size_t n) {
    long k = 0;
    for (size_t i = 0; i < n; i++) k += y[i] >= 0;
    return k;
}

// with --objective ul2, the UL2 loss (SPEC §10) at the evaluation settings:
// the CE over all the targets of as many batches of packed examples as
// validate reads, drawn from the validation data, the same at every validation
static void validate_ul2(Run *r) {
    Ul2 *g = &r->ul2_val;
    int n_batches = r->a.val_batches * r->dp.n;
    size_t BT = (size_t)g->B * g->T;
    float losses[N_LOSSES];
    Batch batch = {g->x, g->y, g->segment, g->position, g->B, g->T, 0.0};
    double ce_sum = 0.0;
    long targets = 0;
    ul2_restore(g, r->ul2_val_start);
    for (int i = 0; i < n_batches; i++) {
        ul2_batch(g);
        long n = targets_count(g->y, BT);
        model_forward(r->m, &batch, &r->s_eval, losses);
        ce_sum += (double)losses[LOSS_CE] * n;
        targets += n;
    }
    r->val_ul2_ce = targets ? ce_sum / targets : NAN;
}

// per MoE layer of the last forward: its losses, dropped share and each expert's share of the assignments
static void routing_print(const Run *r) {
    const Config *c = &r->c;
    const RouterStats *rs = model_router_stats(r->m);
    for (int i = 0, l = 0; l < c->L; l++) {
        if (!is_moe_layer(c, l)) continue;
        printf("  layer %2d: lb %.3f rz %.3f drop %.3f | routed %%:", l, rs[i].lb, rs[i].rz, rs[i].dropped);
        for (int e = 0; e < c->E; e++) printf(" %.0f", 100.0 * rs[i].routed[e] / ((double)r->Bl * r->a.T * c->K));
        printf("\n");
        i++;
    }
}

// generates SAMPLE_TOKENS tokens with temperature 1 after the token
// sample_start (EOS, which precedes every verse of the data), printing text
// when a tokenizer is at hand; within -t, the positions the model holds
static void print_sample(Run *r) {
    const Config *c = &r->c;
    const Tokenizer *tok = r->tok;
    Sampler s = {c->V, 1.0f, TOPP_OFF, {(uint64_t)r->a.seed + r->step}, r->probs};
    int token = r->sample_start;
    printf("sample: ");
    for (int pos = 0; pos < SAMPLE_TOKENS && pos + 1 < r->a.T; pos++) {
        token = sample_token(&s, model_decode(r->m, token, pos));
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

// validation at the evaluation capacity factor, the router load of its last
// causal batch, a sample; with --objective ul2 also the UL2 loss
static void evaluate(Run *r) {
    if (r->a.objective == OBJ_UL2) validate_ul2(r);
    validate(r);
    printf("val  %5d | ce %.4f | loss %.4f", r->step, r->val_ce, r->val_loss);
    if (r->a.objective == OBJ_UL2) printf(" | ul2 ce %.4f", r->val_ul2_ce);
    printf(" | cf %.2f; per MoE layer, last batch:\n", r->a.cf_eval);
    routing_print(r);
    print_sample(r);
}

// DIR/trace/sNNNNNNNN_dD_cfCCCC.bin: the routing of the first n_seq sequences
// of T tokens of data (n_seq a multiple of B, so that every forward is a full
// batch as in training), read by dev/analyze_routing.py. int32 header[256]:
//   [0] TRACE_MAGIC [1] 1 [2] step [3] n_moe [4] E [5] K [6] N = n_seq*T
//   [7] T [8] cf1000 [9] group_size [10] domain (0 validation, 1 out of domain)
//   [11] L [16..16+n_moe) the model layer of each MoE layer, rest 0
// then int32 tokens[N]; then per MoE layer: int32 expert[N*K], float32
// prob[N*K], uint8 kept[N*K], entry n*K+r being token n's rank-r choice.

// h (HEADER_INTS) <- the header of the trace of step r->step at s
static void trace_header(const Run *r, int domain, const MoeSettings *s, int32_t *h) {
    const Config *c = &r->c;
    memset(h, 0, HEADER_INTS * sizeof(int32_t));
    h[0] = TRACE_MAGIC;
    h[1] = 1;
    h[2] = r->step;
    h[3] = r->nm;
    h[4] = c->E;
    h[5] = c->K;
    h[6] = (int32_t)((size_t)r->trace_seq_n * r->a.T);
    h[7] = r->a.T;
    h[8] = s->cf1000;
    h[9] = s->group_size;
    h[10] = domain;
    h[11] = c->L;
    for (int i = 0, l = 0; l < c->L; l++)
        if (is_moe_layer(c, l)) h[16 + i++] = l;
}

// the trace of data (domain 0 validation, 1 out of domain) at the settings s
static void trace_write(Run *r, const TokenData *data, int domain, const MoeSettings *s) {
    int nm = r->nm, K = r->c.K, B = r->Bl, T = r->a.T, n_seq = r->trace_seq_n;
    size_t N = (size_t)n_seq * T;
    int32_t *tokens = (int32_t *)mallocCheck(N * sizeof(int32_t));
    int32_t *expert = (int32_t *)mallocCheck(nm * N * K * sizeof(int32_t));
    float *prob = (float *)mallocCheck(nm * N * K * sizeof(float));
    uint8_t *kept = (uint8_t *)mallocCheck(nm * N * K);
    float losses[N_LOSSES];
    Batch batch = {r->x, r->y, NULL, NULL, B, T, 0.0};
    for (int s0 = 0; s0 < n_seq; s0 += B) {
        for (int b = 0; b < B; b++) r->starts[b] = (long)(s0 + b) * T;
        batch_fill(r->x, r->y, data, r->starts, B, T);
        model_forward(r->m, &batch, s, losses);
        memcpy(tokens + (size_t)s0 * T, r->x, (size_t)B * T * sizeof(int32_t));
        for (int i = 0; i < nm; i++) {
            size_t at = i * N * K + (size_t)s0 * T * K;
            model_get_routing(r->m, i, expert + at, prob + at, kept + at);
        }
    }
    int32_t h[HEADER_INTS];
    trace_header(r, domain, s, h);
    char path[4096], tmp[4096];
    snprintf(path, sizeof(path), "%s/trace/s%08d_d%d_cf%d.bin", r->a.dir, r->step, domain, s->cf1000);
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
static void traces_write(Run *r) {
    trace_write(r, &r->val, 0, &r->s_train);
    trace_write(r, &r->val, 0, &r->s_eval);
    if (r->ood.n) {
        trace_write(r, &r->ood, 1, &r->s_train);
        trace_write(r, &r->ood, 1, &r->s_eval);
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
// the same on every rank; so does the UL2 generator, whose rows these are in
// UL2 steps), so a run gives the same steps on any rank count, up to float
// rounding. The CE and output z-loss of every rank are sums over its targets
// divided by the batch's targets / N (Batch.loss_targets; with causal LM every
// rank has B/N*T targets), so the mean of the ranks' losses and gradients is
// those of the whole batch, whose packed UL2 rows hold different numbers of
// targets. MoE routing
// groups (-q) stay inside one rank's tokens: capacity is per group and the
// load-balance and z-losses are means over groups, so a run equals the 1-rank
// run when -q divides B/N*T; with -q 0 (or -q > B/N*T) each rank's tokens
// form one smaller group, of capacity cf*(B/N*T)/E, balanced on its own.
// ZeRO-1: rank r keeps the optimizer state of the tensors starting in
// parameters [shard[r], shard[r+1]) (whole tensors: Adafactor's factors span
// a tensor slice), steps them, then every rank gathers the stepped weights.
// Only rank 0 prints, validates, samples and writes; a rank that exits
// with an error aborts the whole job. Without MPI the same calls run one rank.
// (Ranks, a run's rank and shards, is defined with the run, above.)

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

// the sum of n over the ranks
static long dp_sum(long n) {
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &n, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
    return n;
}
#else
// A launcher (mpirun -np N, srun -n N) starting this build, which has no MPI,
// starts N copies that each train alone and write over each other's files in
// -o: refuse. The launchers say so in the environment: a world size above 1
// (Open MPI, MPICH and Intel MPI through PMI, MVAPICH2), or a rank above 0
// (PMIx, whose launchers need not set a size).
static void dp_start(Ranks *dp, int *argc, char ***argv) {
    static const struct { const char *name; int min_several; } vars[] = {
        {"OMPI_COMM_WORLD_SIZE", 2}, {"PMI_SIZE", 2}, {"MV2_COMM_WORLD_SIZE", 2},
        {"OMPI_COMM_WORLD_RANK", 1}, {"PMI_RANK", 1}, {"PMIX_RANK", 1}, {"MV2_COMM_WORLD_RANK", 1},
    };
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char *v = getenv(vars[i].name);
        if (v && atol(v) >= vars[i].min_several)
            die("%s was built without MPI, but %s=%s: a launcher (mpirun) started it as one of several ranks, "
                "which would each train alone and write over each other's files; build it with MPI=1 "
                "(make -B train MPI=1, README \"Several GPUs\"), or run it without mpirun", (*argv)[0],
                vars[i].name, v);
    }
    dp->rank = 0, dp->n = 1;
}
static void dp_end(void) {}
static void dp_same(uint64_t h, const char *what) {}
static void dp_bcast(void *p, size_t bytes) {}
static void dp_mean(float *x, int n, const Ranks *dp) {}
static long dp_sum(long n) { return n; }
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
            "  the objective (SPEC §10):\n"
            "  --objective causal|ul2  causal LM, or OpenMoE's UL2 mixture of denoisers, which needs\n"
            "                      -z's sentinels (causal)\n"
            "  --ul2-steps S       with ul2: causal LM after step S, as OpenMoE-8B (0: never)\n"
            "  --dump-examples N FILE  write the first N rows of the batches the flags give to FILE,\n"
            "                      a line per token, then exit (off)\n"
            "  --bf16        bf16 mixed precision (the CUDA backend)\n");
    exit(status);
}

// ----------------------------------------------------------------------------
// the flags

static void args_default(TrainArgs *a) {
    a->init = "tiny";
    a->train_path = "data/kjv/train.bin";
    a->val_path = "data/kjv/val.bin";
    a->ood_path = "data/kjv/ood.bin";
    a->tok_path = "data/kjv/tokenizer.bin";
    a->dir = "out/tiny";
    a->B = 8;
    a->T = 256;
    a->n_steps = 1000;
    a->stop = -1;    // -n
    a->warmup = -1;  // the optimizer's default
    a->group = 4096;
    a->seed = 1337;
    a->ckpt_every = 250;
    a->val_every = 100;
    a->val_batches = 8;
    a->trace_seqs = 0;
    a->resume = 0;
    a->tok_given = 0;
    a->lr = -1.0f;
    a->cf_train = 1.25f;
    a->cf_eval = 2.0f;
    a->bias_rate = 0.0f;
    a->capacity_rule = CAP_T5X;
    a->drop_policy = DROP_POSITION;
    a->freeze = -1;
    a->objective = OBJ_CAUSAL;
    a->ul2_steps = 0;
    a->dump_rows = 0;
    a->dump_path = NULL;
    a->kind = OPT_ADAMW;
    a->prec = PRECISION_FP32;
}

// the routing variants (SPEC §8): --capacity, --drop-policy, --freeze-router, --router-bias
static void routing_flag_parse(TrainArgs *a, const char *f, const char *v) {
    if (strcmp(f, "--capacity") == 0) {
        a->capacity_rule = name_index(v, cap_rule_names, N_CAP_RULES);
        if (a->capacity_rule < 0) die("--capacity %s: the rule is t5x, colossalai or none", v);
    } else if (strcmp(f, "--drop-policy") == 0) {
        a->drop_policy = name_index(v, drop_policy_names, N_DROP_POLICIES);
        if (a->drop_policy < 0) die("--drop-policy %s: the policy is position or probs", v);
    } else if (strcmp(f, "--freeze-router") == 0) {
        a->freeze = (int)flag_int(f, v, 0, MAX_STEPS);
    } else if (strcmp(f, "--router-bias") == 0) {
        a->bias_rate = (float)flag_float(f, v, 0.0, 0, MAX_BIAS_RATE);
    } else {
        fprintf(stderr, "error: unknown option '%s'\n", f);
        usage(2);
    }
}

// the objective (SPEC §10): --objective, --ul2-steps
static void objective_flag_parse(TrainArgs *a, const char *f, const char *v) {
    if (strcmp(f, "--objective") == 0) {
        a->objective = name_index(v, objective_names, N_OBJECTIVES);
        if (a->objective < 0) die("--objective %s: the objective is causal or ul2", v);
    } else {
        a->ul2_steps = (int)flag_int(f, v, 0, MAX_STEPS);
    }
}

// a one-letter flag f and its value v
static void letter_flag_parse(TrainArgs *a, const char *f, const char *v) {
    switch (f[1]) {
    case 'c': a->init = flag_path(f, v); break;
    case 'i': a->train_path = flag_path(f, v); break;
    case 'j': a->val_path = flag_path(f, v); break;
    case 'k': a->ood_path = flag_path(f, v); break;
    case 'z': a->tok_path = flag_path(f, v); a->tok_given = 1; break;
    case 'o': a->dir = flag_path(f, v); break;
    case 'x':
        if (strcmp(v, "adamw") == 0) a->kind = OPT_ADAMW;
        else if (strcmp(v, "adafactor") == 0) a->kind = OPT_ADAFACTOR;
        else die("-x %s: the optimizer is adamw or adafactor", v);
        break;
    case 'l': a->lr = (float)flag_float(f, v, 0.0, 1, MAX_LR); break;
    case 'f': a->cf_train = (float)flag_float(f, v, MIN_CF, 0, MAX_CF); break;
    case 'g': a->cf_eval = (float)flag_float(f, v, MIN_CF, 0, MAX_CF); break;
    case 'b': a->B = (int)flag_int(f, v, 1, MAX_BATCH); break;
    case 't': a->T = (int)flag_int(f, v, 1, MAX_SEQ_LEN); break;
    case 'n': a->n_steps = (int)flag_int(f, v, 1, MAX_STEPS); break;
    case 'y': a->stop = (int)flag_int(f, v, 0, MAX_STEPS); break;
    case 'w': a->warmup = (int)flag_int(f, v, 0, MAX_STEPS); break;
    case 'q': a->group = (int)flag_int(f, v, 0, INT32_MAX); break;
    case 's': a->seed = (int)flag_int(f, v, 0, INT32_MAX); break;
    case 'e': a->ckpt_every = (int)flag_int(f, v, 0, MAX_STEPS); break;
    case 'v': a->val_every = (int)flag_int(f, v, 0, MAX_STEPS); break;
    case 'V': a->val_batches = (int)flag_int(f, v, 1, MAX_STEPS); break;
    case 'a': a->trace_seqs = (int)flag_int(f, v, 0, MAX_STEPS); break;
    default: fprintf(stderr, "error: unknown option '%s'\n", f); usage(2);
    }
}

// the flags, then the defaults that depend on others (-y, -w)
static void args_parse(TrainArgs *a, int argc, char **argv) {
    args_default(a);
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) usage(0);
        else if (strcmp(f, "-r") == 0) a->resume = 1;
        else if (strcmp(f, "--bf16") == 0) a->prec = PRECISION_BF16;
        else if (strcmp(f, "--dump-examples") == 0) {
            if (i + 2 >= argc) die("--dump-examples: needs N and FILE");
            a->dump_rows = (int)flag_int(f, argv[i + 1], 1, MAX_DUMP_ROWS);
            a->dump_path = flag_path(f, argv[i + 2]);
            i += 2;
        } else if ((strcmp(f, "--objective") == 0 || strcmp(f, "--ul2-steps") == 0) && i + 1 < argc)
            objective_flag_parse(a, f, argv[++i]);
        else if (strncmp(f, "--", 2) == 0 && i + 1 < argc) routing_flag_parse(a, f, argv[++i]);
        else if (f[0] == '-' && strlen(f) == 2 && i + 1 < argc) letter_flag_parse(a, f, argv[++i]);
        else {
            fprintf(stderr, "error: unknown or incomplete option '%s'\n", f);
            usage(2);
        }
    }
    if (a->stop < 0 || a->stop > a->n_steps) a->stop = a->n_steps;
    if (a->ul2_steps > 0 && a->objective != OBJ_UL2)
        die("--ul2-steps %d: switches from UL2 to causal LM, and needs --objective ul2", a->ul2_steps);
    if (a->ul2_steps > a->n_steps) die("--ul2-steps %d is beyond the run's -n %d steps", a->ul2_steps, a->n_steps);
    if (a->warmup < 0) a->warmup = a->kind == OPT_ADAFACTOR ? 10000 : a->n_steps / 50;
    if (a->warmup < 1) a->warmup = 1;
}

// ----------------------------------------------------------------------------
// setting up: the data, the model, the tokenizer, the output directory; then
// a checkpoint to resume from, or the initial weights

// -b over the ranks; -a in whole batches
static void batch_split(Run *r) {
    if (r->a.B % r->dp.n != 0) die("-b %d: the batch does not split over %d ranks", r->a.B, r->dp.n);
    r->Bl = r->a.B / r->dp.n;
    r->trace_seq_n = (r->a.trace_seqs + r->a.B - 1) / r->a.B * r->a.B;
}

// the training and validation tokens; first, because with a preset the
// model's V follows the data's tokenizer
static void data_load(Run *r) {
    tokens_load(&r->train, r->a.train_path);
    tokens_load(&r->val, r->a.val_path);
    if (r->val.V != r->train.V)
        die("%s has vocabulary %d, but %s has %d", r->a.val_path, r->val.V, r->a.train_path, r->train.V);
}

// what the ranks must agree on: their flags and the sizes of their data
static uint64_t flags_data_hash(const Run *r, int argc, char **argv) {
    uint64_t h = hash_bytes(FNV_BASIS, &r->train.n, sizeof(r->train.n));
    h = hash_bytes(h, &r->val.n, sizeof(r->val.n));
    for (int i = 1; i < argc; i++) h = hash_bytes(h, argv[i], strlen(argv[i]) + 1);
    return h;
}

// whether the samples have a tokenizer: -z, or the default when it exists
static int tokenizer_wanted(const TrainArgs *a) { return a->tok_given || access(a->tok_path, R_OK) == 0; }

// A preset's vocabulary: the data's, which the tokenizer must then have
// (tokenizer_open). Without a tokenizer the data's header V is a claim that
// nothing checks, and a short file may declare millions: the model then has
// 1 + the largest token id in the training and validation data.
static int preset_vocab(const Run *r) {
    if (tokenizer_wanted(&r->a)) return r->train.V;
    int V = 1 + (r->train.max_id > r->val.max_id ? r->train.max_id : r->val.max_id);
    if (V < r->train.V)
        printf("note: no tokenizer (%s): the model's vocabulary is %d, 1 + the largest token id in %s and %s, "
               "not their headers' %d\n", r->a.tok_path, V, r->a.train_path, r->a.val_path, r->train.V);
    return V;
}

// the config of -c, a preset or a model file, whose parameters it returns
// (NULL for a preset), checked against the data and -t
static float *config_load(Run *r) {
    float *init_params = NULL;
    char why[160];
    if (config_preset(r->a.init, &r->c)) {
        r->c.V = preset_vocab(r);
        if (!config_check(&r->c, why, sizeof(why)))
            die("-c %s with the vocabulary of %s: %s", r->a.init, r->a.train_path, why);
    } else {
        init_params = model_file_load(r->a.init, &r->c);
        if (r->c.V != r->train.V)
            die("%s: the model's vocabulary is %d, but the data's (%s) is %d", r->a.init, r->c.V, r->a.train_path,
                r->train.V);
    }
    if (r->a.T > r->c.max_seq_len) die("-t %d is longer than the model's context %d", r->a.T, r->c.max_seq_len);
    r->nm = n_moe_layers(&r->c);
    return init_params;
}

// the data of the -a traces: the validation data, and the out-of-domain data
// when it is there and long enough
static void trace_data_load(Run *r) {
    int n_seq = r->trace_seq_n, T = r->a.T;
    const char *ood_path = r->a.ood_path;
    if ((long)n_seq * T + 1 > r->val.n)
        die("-a %d: %s holds fewer than %d sequences of %d tokens (+1)", r->a.trace_seqs, r->a.val_path, n_seq, T);
    if (access(ood_path, R_OK) != 0) {
        printf("note: no out-of-domain data %s: routing traces of the validation data only\n", ood_path);
        return;
    }
    tokens_load(&r->ood, ood_path);
    if (r->ood.V != r->train.V)
        die("%s has vocabulary %d, but %s has %d", ood_path, r->ood.V, r->a.train_path, r->train.V);
    if (r->ood.max_id >= r->c.V)
        die("%s: token id %d is outside the model's vocabulary of %d", ood_path, r->ood.max_id, r->c.V);
    if ((long)n_seq * T + 1 > r->ood.n) {
        printf("note: %s holds fewer than %d sequences of %d tokens (+1): not traced\n", ood_path, n_seq, T);
        free(r->ood.tokens);
        r->ood.tokens = NULL;
        r->ood.n = 0;
    }
}

// one batch fits the training data, at least one the validation data (-V is
// cut to those it holds); then the trace data
static void data_check(Run *r) {
    int B = r->a.B, T = r->a.T;
    if ((long)B * T + 1 > r->train.n)
        die("%s: %ld tokens, fewer than one batch of %d x %d + 1", r->a.train_path, r->train.n, B, T);
    long val_fit = (r->val.n - 1) / ((long)B * T);  // whole batches in the validation data
    if (val_fit < 1) die("%s: %ld tokens, fewer than one batch of %d x %d + 1", r->a.val_path, r->val.n, B, T);
    if (r->a.val_batches > val_fit) r->a.val_batches = (int)val_fit;
    if (r->trace_seq_n > 0) trace_data_load(r);
}

// the tokenizer of the samples, when -z is given or the default exists
static void tokenizer_open(Run *r) {
    const char *tok_path = r->a.tok_path;
    r->tok = NULL;
    if (tokenizer_wanted(&r->a)) {
        tokenizer_load(&r->tokenizer, tok_path);
        if (r->tokenizer.vocab_size != r->c.V)
            die("%s: the tokenizer has %d pieces, but the model's vocabulary is %d", tok_path,
                r->tokenizer.vocab_size, r->c.V);
        r->tok = &r->tokenizer;
    }
    const Tokenizer *tok = r->tok;
    r->sample_start = tok && tok->eos_id >= 0 ? tok->eos_id : tok && tok->bos_id >= 0 ? tok->bos_id : 0;
}

// the output directory (and its trace/ for -a), checked for writing before
// any work (by access: a probe file written there would follow a link planted
// under its name)
static void output_dir_make(const Run *r) {
    const char *dir = r->a.dir;
    char path[4096];
    make_dirs(dir);
    if (access(dir, W_OK | X_OK) != 0) die("-o %s: cannot write there: %s", dir, strerror(errno));
    if (r->trace_seq_n > 0) {
        snprintf(path, sizeof(path), "%s/trace", dir);
        mkdir(path, 0755);
    }
}

// the optimizer's, the routing's and the checkpoints' settings from the flags; the data RNG
static void settings_make(Run *r) {
    const TrainArgs *a = &r->a;
    r->opt = opt_settings_default(a->kind);
    r->peak_lr = a->lr > 0.0f ? a->lr : a->kind == OPT_ADAMW ? 3e-3f : 0.01f;
    r->opt.lr = r->peak_lr;
    r->s_train = r->s_eval = moe_settings_default();
    r->s_train.cf1000 = (int)lrintf(a->cf_train * 1000);
    r->s_eval.cf1000 = (int)lrintf(a->cf_eval * 1000);
    r->s_train.group_size = r->s_eval.group_size = a->group;
    r->s_train.capacity_rule = r->s_eval.capacity_rule = a->capacity_rule;
    r->s_train.drop_policy = r->s_eval.drop_policy = a->drop_policy;
    RunSettings rs = {a->n_steps, a->warmup, r->s_train.cf1000, a->group, a->seed, r->peak_lr,
                      a->capacity_rule, a->drop_policy, a->freeze, a->bias_rate, a->objective, a->ul2_steps};
    r->rs = rs;
    r->data_rng.s = (uint64_t)a->seed * 0x9E3779B97F4A7C15ull + 1;
}

// the model on this rank's share of a batch, its optimizer state's shard
// (ZeRO-1), and the buffers of the steps
static void model_make(Run *r) {
    const Config *c = &r->c;
    ParamTable table;
    param_table_build(&table, c);
    dp_shards(&r->dp, &table);
    r->opt.shard_lo = r->dp.shard[r->dp.rank];
    r->opt.shard_hi = r->dp.shard[r->dp.rank + 1];
    param_table_free(&table);
    r->m = model_create(c, r->Bl, r->a.T, r->a.prec, &r->opt);
    r->pt = model_param_table(r->m);
    OptKind kind = r->a.kind;
    int min_dim = r->opt.min_dim;
    size_t n_part = opt_state_floats_range(r->pt, kind, min_dim, r->opt.shard_lo, r->opt.shard_hi);
    r->params = (float *)mallocCheck(r->pt->n_params * sizeof(float));
    r->n_state = opt_state_floats(r->pt, kind, min_dim);
    r->state = r->lead ? (float *)callocCheck(r->n_state, sizeof(float)) : NULL;
    r->part = (float *)callocCheck(n_part ? n_part : 1, sizeof(float));
    r->n_bias = r->a.bias_rate > 0.0f ? (size_t)r->nm * c->E : 0;
    r->bias = (float *)callocCheck(r->n_bias, sizeof(float));
    r->x = (int32_t *)mallocCheck((size_t)r->Bl * r->a.T * sizeof(int32_t));
    r->y = (int32_t *)mallocCheck((size_t)r->Bl * r->a.T * sizeof(int32_t));
    r->probs = (ProbIndex *)mallocCheck(c->V * sizeof(ProbIndex));
    r->drop = (float *)mallocCheck(r->nm * sizeof(float));
}

// the weights, optimizer state, router bias, data RNG and UL2 generator of
// checkpoint step: rank 0 reads them, the others receive
static void checkpoint_resume(Run *r, int step) {
    char path[4096];
    const char *dir = r->a.dir;
    uint64_t ul2 = 0;
    if (r->lead) {
        snprintf(path, sizeof(path), "%s/model_%08d.bin", dir, step);
        Config cc;
        float *p = model_file_load(path, &cc);
        if (memcmp(&cc, &r->c, sizeof(cc)) != 0) die("%s: its config differs from this run's (-c %s)", path, r->a.init);
        memcpy(r->params, p, r->pt->n_params * sizeof(float));
        free(p);
        snprintf(path, sizeof(path), "%s/state_%08d.bin", dir, step);
        if (ckpt_load(r, path, &ul2) != step) die("%s: its step differs from its name", path);
    }
    dp_bcast(r->params, r->pt->n_params * sizeof(float));
    dp_bcast(&r->data_rng, sizeof(r->data_rng));
    dp_bcast(&ul2, sizeof(ul2));
    if (r->a.objective == OBJ_UL2) ul2_restore(&r->ul2, ul2);
    dp_bcast(r->bias, r->n_bias * sizeof(float));
    model_set_params(r->m, r->params);
    dp_state_move(&r->dp, r->pt, &r->opt, r->state, r->part, 0);
    model_set_opt_state(r->m, r->part);
    if (r->n_bias) model_set_router_bias(r->m, r->bias);
    printf("resumed from %s/model_%08d.bin and state_%08d.bin at step %d\n", dir, step, step, step);
}

// with -r, the latest checkpoint this run can resume; else (or when there is
// none) step 0 with the weights of -c's model file or SPEC §5's initialisation
static void resume_or_init(Run *r, const float *init_params) {
    int step = r->a.resume && r->lead ? resume_step(r) : -1;
    dp_bcast(&step, sizeof(step));
    if (step >= 0) {
        checkpoint_resume(r, step);
        r->step = step;
        return;
    }
    if (r->a.resume) printf("no checkpoint in %s: starting from scratch\n", r->a.dir);
    r->step = 0;
    if (init_params) {
        model_set_params(r->m, init_params);
    } else {
        params_init(r->pt, &r->c, r->params, (uint64_t)r->a.seed);
        model_set_params(r->m, r->params);
    }
}

// the model, the data and the settings, in three lines
static void run_print(const Run *r) {
    const Config *c = &r->c;
    const TrainArgs *a = &r->a;
    size_t n = r->pt->n_params;
    char variant[256];
    printf("model: L %d D %d H %d Hd %d F %d E %d K %d Fe %d moe_every %d, V %d, ctx %d, %zu parameters (%.1f MB)\n",
           c->L, c->D, c->H, c->Hd, c->F, c->E, c->K, c->Fe, c->moe_every, c->V, c->max_seq_len, n, n * 4 / 1e6);
    printf("data: %s %ld tokens, %s %ld tokens; batch %d x %d, %d steps, %s lr %.2e warmup %d, cf %.2f train "
           "%.2f eval, group %d\n", a->train_path, r->train.n, a->val_path, r->val.n, a->B, a->T, a->n_steps,
           a->kind == OPT_ADAMW ? "adamw" : "adafactor", r->peak_lr, a->warmup, a->cf_train, a->cf_eval, a->group);
    variant_text(variant, sizeof(variant), a->capacity_rule, a->drop_policy, a->freeze, a->bias_rate);
    printf("routing: %s\n", variant);
}

static void run_free(Run *r) {
    if (r->logf) fcloseCheck(r->logf, r->log_path);
    if (r->tok) tokenizer_free(r->tok);
    free(r->train.tokens);
    free(r->val.tokens);
    free(r->ood.tokens);
    free(r->params);
    free(r->state);
    free(r->part);
    free(r->dp.shard);
    free(r->dp.counts);
    free(r->bias);
    free(r->x);
    free(r->y);
    free(r->probs);
    free(r->drop);
    ul2_free(&r->ul2);
    ul2_free(&r->ul2_val);
    model_free(r->m);
}

// ----------------------------------------------------------------------------
// the steps

// whether step is one of UL2's (SPEC §10), else causal LM
static int ul2_step(const TrainArgs *a, int step) {
    return a->objective == OBJ_UL2 && (a->ul2_steps == 0 || step <= a->ul2_steps);
}

// a causal LM step's B windows of T+1 tokens: their offsets in r->starts,
// drawn from the data RNG (every rank draws all B)
static void windows_draw(Run *r) {
    for (int b = 0; b < r->a.B; b++) r->starts[b] = (long)(rng_u64(&r->data_rng) % (uint64_t)(r->train.n - r->a.T));
}

// this rank's share of step r->step's batch: in a UL2 step the generator's
// next B packed rows, whose CE is over the targets of all the ranks' rows
// (their count in r->targets); else B windows of T+1 tokens at random offsets
// (windows_draw)
static Batch step_batch(Run *r) {
    int Bl = r->Bl, T = r->a.T;
    r->step_ul2 = ul2_step(&r->a, r->step);
    if (r->step_ul2) {
        Ul2 *g = &r->ul2;
        ul2_batch(g);
        size_t at = (size_t)r->dp.rank * Bl * T;
        r->targets = dp_sum(targets_count(g->y + at, (size_t)Bl * T));
        Batch b = {g->x + at, g->y + at, g->segment + at, g->position + at, Bl, T, (double)r->targets / r->dp.n};
        return b;
    }
    windows_draw(r);
    batch_fill(r->x, r->y, &r->train, r->starts + (size_t)r->dp.rank * Bl, Bl, T);
    r->targets = (long)r->a.B * T;
    Batch b = {r->x, r->y, NULL, NULL, Bl, T, 0.0};
    return b;
}

// step r->step: this rank's share of its batch (step_batch), forward,
// backward, update; the whole batch's losses and dropped shares (the mean
// over the ranks), and the time it took
static void train_step(Run *r) {
    int nm = r->nm;
    double t0 = wall_seconds();
    Batch batch = step_batch(r);
    model_forward(r->m, &batch, &r->s_train, r->losses);
    model_backward(r->m);
    model_grads_allreduce(r->m);  // data parallelism: the whole batch's gradients on every rank
    r->opt.lr = learning_rate(r->a.kind, r->peak_lr, r->a.warmup, r->step, r->a.n_steps);
    r->opt.freeze_router = r->a.freeze >= 0 && r->step > r->a.freeze;
    r->norm = model_update(r->m, &r->opt, r->step);
    model_params_allgather(r->m, r->dp.shard);  // ZeRO-1: every rank's stepped shard to all
    if (r->n_bias) {  // loss-free balancing: from this step's loads (all ranks'), before validation's forward
        dp_sum_router_loads(model_router_stats(r->m), nm, r->c.E);
        router_bias_update(r->bias, model_router_stats(r->m), nm, r->c.E, r->a.bias_rate);
        model_set_router_bias(r->m, r->bias);
    }
    dp_mean(r->losses, N_LOSSES, &r->dp);
    r->ms = 1e3 * (wall_seconds() - t0);
    for (int i = 0; i < nm; i++) r->drop[i] = model_router_stats(r->m)[i].dropped;  // before validation's forward
    dp_mean(r->drop, nm, &r->dp);
}

static void step_print(const Run *r) {
    const float *l = r->losses;
    printf("step %5d/%d | loss %.4f (ce %.4f lb %.4f rz %.4f lz %.2f) | drop %.3f | lr %.2e | norm %.3f | "
           "%.1f ms | %.0f tok/s", r->step, r->a.n_steps, l[LOSS_TOTAL], l[LOSS_CE], l[LOSS_LB], l[LOSS_RZ],
           l[LOSS_LZ], l[LOSS_DROPPED], r->opt.lr, r->norm, r->ms, r->a.B * r->a.T / (r->ms / 1e3));
    if (r->step_ul2) printf(" | ul2, %ld targets", r->targets);
    printf("\n");
}

static int validation_due(const Run *r) {
    return (r->a.val_every > 0 && r->step % r->a.val_every == 0) || r->step == r->a.n_steps;
}

static int checkpoint_due(const Run *r) {
    return (r->a.ckpt_every > 0 && r->step % r->a.ckpt_every == 0) || r->step == r->a.stop;
}

// Checkpoint r->step, all or nothing: the model and the state are written in
// full to their temporaries, then renamed, the model first, so that a state
// file always has its model (resume_step counts a checkpoint by its state).
// A write that fails (a full disk) leaves neither, and the previous checkpoint
// stays the latest. An older state of the same step goes first, so that no
// moment pairs it with the new model. Then the traces of -a.
static void checkpoint_write(Run *r) {
    model_get_params(r->m, r->params);
    if (r->dp.n > 1)
        dp_same(hash_bytes(FNV_BASIS, r->params, r->pt->n_params * sizeof(float)),
                "their weights (a nondeterministic reduction?)");
    model_get_opt_state(r->m, r->part);
    dp_state_move(&r->dp, r->pt, &r->opt, r->state, r->part, 1);
    if (!r->lead) return;
    char model[4096], state[4096], model_tmp[4096], state_tmp[4096];
    snprintf(model, sizeof(model), "%s/model_%08d.bin", r->a.dir, r->step);
    snprintf(state, sizeof(state), "%s/state_%08d.bin", r->a.dir, r->step);
    FILE *f = atomic_open(model, model_tmp, sizeof(model_tmp));
    model_file_write(f, model_tmp, &r->c, r->params);
    atomic_close(f, model_tmp);
    f = atomic_open(state, state_tmp, sizeof(state_tmp));
    ckpt_write(r, f, state_tmp);
    atomic_close(f, state_tmp);
    if (remove(state) != 0 && errno != ENOENT) die("%s: cannot remove: %s", state, strerror(errno));
    atomic_rename(model_tmp, model);
    atomic_rename(state_tmp, state);
    printf("checkpoint %s\n", model);
    if (r->trace_seq_n > 0) traces_write(r);
}

// ----------------------------------------------------------------------------
// the UL2 generator of --objective ul2, and --dump-examples N FILE: the first
// N rows of the batches the flags give (UL2 steps' packed rows, causal steps'
// windows) without a model, a tab-separated line per token after a header
// line: row col token target segment position piece, where token is what the
// model reads, target what it learns (-1: no loss), segment the example of
// the token in its row (-1: padding), position its position there, piece
// the token's piece (bytes below 0x20 and '\' as \xNN; "-" without a
// tokenizer). Between UL2 batches the generator goes through the state a
// checkpoint keeps (ul2_state, ul2_restore), as a run resumed there would.

// the generator from the training data and the tokenizer, and its lengths;
// the validation examples' from the validation data, seeded alike in every run
static void ul2_setup(Run *r) {
    if (!r->tok)
        die("--objective ul2 needs the data's tokenizer, for its sentinels and mode prefixes: %s is missing (-z FILE)",
            r->a.tok_path);
    ul2_make(&r->ul2, &r->train, r->tok, r->a.tok_path, r->a.B, r->a.T, r->a.seed);
    ul2_make(&r->ul2_val, &r->val, r->tok, r->a.tok_path, r->Bl, r->a.T, UL2_VAL_SEED);
    r->ul2_val_start = ul2_state(&r->ul2_val);
    if (r->lead) ul2_print(&r->ul2);
}

static void piece_write(FILE *f, const Tokenizer *tok, int id) {
    if (!tok) {
        fputc('-', f);
        return;
    }
    for (const char *p = tokenizer_piece(tok, id); *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == '\\') fprintf(f, "\\x%02X", (unsigned char)*p);
        else fputc(*p, f);
    }
}

// --dump-examples N FILE, on rank 0
static void examples_dump(Run *r) {
    const TrainArgs *a = &r->a;
    const Ul2 *g = &r->ul2;
    int B = a->B, T = a->T;
    int32_t *x = (int32_t *)mallocCheck((size_t)B * T * sizeof(int32_t));  // a causal step's windows
    int32_t *y = (int32_t *)mallocCheck((size_t)B * T * sizeof(int32_t));
    char tmp[4096];
    FILE *f = atomic_open(a->dump_path, tmp, sizeof(tmp));
    fprintf(f, "row\tcol\ttoken\ttarget\tsegment\tposition\tpiece\n");
    for (int step = 1, row = 0; row < a->dump_rows; step++) {
        int ul2 = ul2_step(a, step);
        if (ul2) {
            ul2_batch(&r->ul2);
        } else {
            windows_draw(r);
            batch_fill(x, y, &r->train, r->starts, B, T);
        }
        for (int b = 0; b < B && row < a->dump_rows; b++, row++)
            for (int t = 0; t < T; t++) {
                size_t i = (size_t)b * T + t;
                int token = ul2 ? g->x[i] : x[i];
                fprintf(f, "%d\t%d\t%d\t%d\t%d\t%d\t", row, t, token, ul2 ? g->y[i] : y[i], ul2 ? g->segment[i] : 0,
                        ul2 ? g->position[i] : t);
                piece_write(f, r->tok, token);
                fputc('\n', f);
            }
        if (ul2) ul2_restore(&r->ul2, ul2_state(g));
    }
    atomic_commit(f, tmp, a->dump_path);
    printf("wrote %s: %d rows of %d tokens\n", a->dump_path, a->dump_rows, T);
    free(x);
    free(y);
}

// ----------------------------------------------------------------------------

int main(int argc, char **argv) {
    Run r;
    memset(&r, 0, sizeof(r));
    dp_start(&r.dp, &argc, &argv);
    r.lead = r.dp.rank == 0;
    args_parse(&r.a, argc, argv);
    batch_split(&r);
    data_load(&r);
    dp_same(flags_data_hash(&r, argc, argv), "their flags or the sizes of their data files (-i, -j)");
    float *init_params = config_load(&r);
    data_check(&r);
    tokenizer_open(&r);
    settings_make(&r);
    if (r.a.objective == OBJ_UL2) ul2_setup(&r);
    if (r.a.dump_rows) {
        if (r.lead) examples_dump(&r);
        free(init_params);
        run_free(&r);
        dp_end();
        return 0;
    }
    if (r.lead) output_dir_make(&r);
    model_make(&r);
    resume_or_init(&r, init_params);
    free(init_params);
    run_print(&r);
    if (r.lead) log_open(&r);
    if (r.lead && r.trace_seq_n > 0 && r.step == 0) traces_write(&r);
    while (r.step < r.a.stop) {
        r.step++;
        train_step(&r);
        step_print(&r);
        r.val_ce = r.val_loss = r.val_ul2_ce = NAN;
        if (r.lead && validation_due(&r)) evaluate(&r);
        if (r.lead) log_row(&r);
        fflush(stdout);
        if (checkpoint_due(&r)) checkpoint_write(&r);
    }
    run_free(&r);
    dp_end();
    return 0;
}
