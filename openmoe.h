// openmoe.h: what both backends (openmoe.c, openmoe.cu) and all programs share,
// in reading order:
//
//   1. the config, its presets and their checks                    (SPEC §1)
//   2. the backend API, implemented by openmoe.c and by openmoe.cu
//   3. the tables: the parameters in one fp32 buffer, offsets in file order
//      (SPEC §6), and the activations, sized by what the model uses
//   4. what both backends compute the same way: initialisation with a
//      portable RNG (SPEC §5), routing groups, capacity, the router's softmax
//      and top-K, RoPE tables, argument checks, losses, optimizer state
//   5. the model file                                              (SPEC §6)
//   6. sampling: temperature, top-p, argmax (train.c's samples, run.c)
//
// Checked C library calls, file helpers and the file magics are utils.h's.
// The debug state file (SPEC §7) is read and written by test/test_model.c,
// its only user. Everything but the backend API is defined here as static
// functions, so that each program is one translation unit plus one backend.
#ifndef OPENMOE_H
#define OPENMOE_H

#include <stddef.h>
#include <float.h>
#include <sys/mman.h>
#include "utils.h"

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------
// 1. the config, its presets and their checks (SPEC §1)

// The bounds of the config's fields (config_check), each field bounded
// whether the model uses it or not, so that no header asks for more than the
// largest models need. Each admits the presets and OpenMoE's released models
// (base, 8B, 34B) with room to spare:
// the longest context (OpenMoE's models have 2048); a model's RoPE tables and
// KV cache are sized by the sequences it is made for (model_create's T)
#define MAX_SEQ_LEN (1 << 20)
// the vocabulary: OpenMoE's is 256384, the largest tokenizers in use about 10^6
#define MAX_V (1 << 22)
// layers (L, and moe_every up to MAX_L + 1, a model without MoE layers): the
// presets have up to 32, the deepest published transformers about 100-200
#define MAX_L 512
// the widths D, Hd, H*Hd, F, Fe and the head count H: 34b has F = Fe = 12288,
// the widest published FFNs about 5*10^4
#define MAX_WIDTH (1 << 16)
// experts: the presets have up to 32, fine-grained MoEs a few hundred
#define MAX_E 4096
// experts per token: OpenMoE has 2, the MoEs in use at most about 8. The
// router's top-K is O(E*K) a token, and the drop policy probs keeps the rank
// in 5 bits of its sort key (probs_key): every config can take every policy
#define MAX_K 32

typedef struct {
    int V;            // vocabulary size
    int max_seq_len;  // context length
    int L;            // decoder layers
    int D;            // model width
    int H, Hd;        // heads, head width (H*Hd may differ from D)
    int F;            // dense FFN hidden width
    int E, K;         // experts, experts per token
    int moe_every;    // layer l is MoE iff (l+1) % moe_every == 0
    int Fe;           // expert FFN hidden width
    int extra_ffn;    // MoE layers also carry a dense FFN after the MoE
} Config;

static inline int is_moe_layer(const Config *c, int l) { return (l + 1) % c->moe_every == 0; }
static inline int n_moe_layers(const Config *c) { return c->L / c->moe_every; }

// the presets of SPEC §1; returns 0 when the name is unknown
static inline int config_preset(const char *name, Config *c) {
    static const struct { const char *name; Config c; } presets[] = {
        //           V    ctx   L     D   H   Hd      F   E  K  every    Fe  extra
        {"tiny",  {  4096,  256,  4,  128,  4,  32,   384,  8, 2, 2,   384, 1}},
        {"small", { 32000, 1024,  8,  512,  8,  64,  1536,  8, 2, 2,  1536, 1}},
        {"base",  {256384, 2048, 12,  768, 12,  64,  2048, 16, 2, 4,  2048, 1}},
        {"8b",    {256384, 2048, 24, 2048, 24, 128,  8192, 32, 2, 6,  8192, 1}},
        {"34b",   {256384, 2048, 32, 3072, 24, 128, 12288, 32, 2, 4, 12288, 1}},
    };
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
        if (strcmp(name, presets[i].name) == 0) { *c = presets[i].c; return 1; }
    }
    return 0;
}

// The Config fields, described once: name, place in the struct, and word of
// the model file's header (SPEC §6). The checks, the parser, the header I/O
// and train.c's resume go through this table, so that a new field is one row
// here and cannot shift the file format. The field must lie in [lo, hi].
typedef struct {
    const char *name;
    size_t offset;   // offsetof(Config, field)
    int word;        // header word
    int lo, hi;
} ConfigField;

#define CONFIG_FIELD(field, word, lo, hi) {#field, offsetof(Config, field), word, lo, hi}
static const ConfigField config_fields[] = {
    CONFIG_FIELD(V, 2, 1, MAX_V),                 CONFIG_FIELD(max_seq_len, 3, 1, MAX_SEQ_LEN),
    CONFIG_FIELD(L, 4, 1, MAX_L),                 CONFIG_FIELD(D, 5, 1, MAX_WIDTH),
    CONFIG_FIELD(H, 6, 1, MAX_WIDTH),             CONFIG_FIELD(Hd, 7, 1, MAX_WIDTH),
    CONFIG_FIELD(F, 8, 1, MAX_WIDTH),             CONFIG_FIELD(E, 9, 1, MAX_E),
    CONFIG_FIELD(K, 10, 1, MAX_K),                CONFIG_FIELD(moe_every, 11, 1, MAX_L + 1),
    CONFIG_FIELD(Fe, 12, 1, MAX_WIDTH),           CONFIG_FIELD(extra_ffn, 13, 0, 1),
};
#undef CONFIG_FIELD
#define N_CONFIG_FIELDS ((int)(sizeof(config_fields) / sizeof(config_fields[0])))
// the model file's header words: magic, version, then the fields
#define MODEL_HEADER_WORDS (2 + N_CONFIG_FIELDS)
// a Config field without a row would be neither checked nor saved
#ifdef __cplusplus
static_assert(sizeof(Config) == sizeof(config_fields) / sizeof(config_fields[0]) * sizeof(int),
              "every Config field needs a row in config_fields");
#else
_Static_assert(sizeof(Config) == sizeof(config_fields) / sizeof(config_fields[0]) * sizeof(int),
               "every Config field needs a row in config_fields");
#endif

// field i of config_fields in c
static inline int *config_field(Config *c, int i) { return (int *)((char *)c + config_fields[i].offset); }
static inline int config_value(const Config *c, int i) {
    return *(const int *)((const char *)c + config_fields[i].offset);
}

// checks a config as SPEC §6 asks of a header; on failure writes why and
// returns 0. K > E comes before the upper bounds, so that a K too large for
// E is named so; H*Hd after them, so that H or Hd past MAX_WIDTH is named.
static inline int config_check(const Config *c, char *why, size_t nwhy) {
    for (int i = 0; i < N_CONFIG_FIELDS; i++) {
        int v = config_value(c, i);
        if (v < config_fields[i].lo) {
            if (config_fields[i].lo == 1) snprintf(why, nwhy, "%s = %d, must be > 0", config_fields[i].name, v);
            else snprintf(why, nwhy, "%s = %d, must be in [%d, %d]", config_fields[i].name, v, config_fields[i].lo,
                          config_fields[i].hi);
            return 0;
        }
    }
    if (c->K > c->E) { snprintf(why, nwhy, "K = %d > E = %d", c->K, c->E); return 0; }
    if (c->Hd % 2) { snprintf(why, nwhy, "Hd = %d is odd (RoPE pairs i with i+Hd/2)", c->Hd); return 0; }
    for (int i = 0; i < N_CONFIG_FIELDS; i++) {
        int v = config_value(c, i);
        if (v > config_fields[i].hi) {
            snprintf(why, nwhy, "%s = %d, must be in [%d, %d]", config_fields[i].name, v, config_fields[i].lo,
                     config_fields[i].hi);
            return 0;
        }
    }
    if ((int64_t)c->H * c->Hd > MAX_WIDTH) {
        snprintf(why, nwhy, "H*Hd = %lld, must be <= %d", (long long)c->H * c->Hd, MAX_WIDTH);
        return 0;
    }
    return 1;
}

// the context of a config given as numbers, which do not include it
#define PARSED_SEQ_LEN 2048

// a preset name, or the fields but max_seq_len in table order, comma-separated
// ("V,L,D,H,Hd,F,E,K,moe_every,Fe,extra_ffn", max_seq_len PARSED_SEQ_LEN), as
// the benchmarks take it; on failure writes why and returns 0
static inline int config_parse(const char *s, Config *c, char *why, size_t nwhy) {
    if (config_preset(s, c)) return 1;
    c->max_seq_len = PARSED_SEQ_LEN;
    char expected[128] = "";
    int ok = 1, used;
    for (int i = 0; i < N_CONFIG_FIELDS; i++) {
        if (config_fields[i].offset == offsetof(Config, max_seq_len)) continue;
        int first = !expected[0];
        snprintf(expected + strlen(expected), sizeof(expected) - strlen(expected), "%s%s", first ? "" : ",",
                 config_fields[i].name);
        if (ok && !first) ok = *s++ == ',';
        if (ok) ok = sscanf(s, "%d%n", config_field(c, i), &used) == 1;
        if (ok) s += used;
    }
    if (!ok) {
        snprintf(why, nwhy, "not a preset name nor %s", expected);
        return 0;
    }
    return config_check(c, why, nwhy);
}

// the first field (index into config_fields) whose model header word in h
// differs from c's, or -1 when they all agree
static inline int config_header_diff(const int32_t *h, const Config *c) {
    for (int i = 0; i < N_CONFIG_FIELDS; i++)
        if (h[config_fields[i].word] != config_value(c, i)) return i;
    return -1;
}

// ----------------------------------------------------------------------------
// 2. the backend API. openmoe.c implements it on the CPU, openmoe.cu on one
// GPU; train.c, run.c and test/test_model.c link with either.

typedef struct Model Model;
typedef struct ParamTable ParamTable;  // section 3

// Per-call settings of routing and losses (SPEC §3, §4, §8); the debug state
// file (test/test_model.c) stores them in its header.
enum { CAP_T5X = 0, CAP_COLOSSALAI = 1, CAP_NONE = 2, N_CAP_RULES };   // capacity rules (SPEC §8)
enum { DROP_POSITION = 0, DROP_PROBS = 1, N_DROP_POLICIES };          // drop policies (SPEC §8)
static const char *const cap_rule_names[N_CAP_RULES] = {"t5x", "colossalai", "none"};
static const char *const drop_policy_names[N_DROP_POLICIES] = {"position", "probs"};

typedef struct {
    int cf1000;        // capacity factor x 1000: 1250 train, 2000 eval
    int min_capacity;  // 4
    int group_size;    // tokens per routing group, 0 = all B*T tokens of the call
    float lb_coef, rz_coef, lz_coef;  // 0.01, 1e-4, 1e-4
    int capacity_rule; // CAP_T5X, CAP_COLOSSALAI or CAP_NONE (dropless)
    int drop_policy;   // DROP_POSITION or DROP_PROBS
    int first_group;   // > 0: tokens 0..first_group-1 are the first routing group, and the groups of
                       // group_size follow it (run --verify: the prompt one group, as prefilled, then
                       // each generated token its own)
} MoeSettings;

// the range of capacity factors a flag may set: cf1000 stays an int >= 1
#define MIN_CF 0.001
#define MAX_CF 1000.0

static inline MoeSettings moe_settings_default(void) {
    MoeSettings s = {1250, 4, 4096, 0.01f, 1e-4f, 1e-4f, CAP_T5X, DROP_POSITION, 0};
    return s;
}

// index of name in names[n], or -1
static inline int name_index(const char *name, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (strcmp(name, names[i]) == 0) return i;
    return -1;
}

// the losses of a forward (SPEC §4), indices into model_forward's losses;
// N_LOSSES 8, as the debug state file's losses[8] (SPEC §7), the last two 0
enum { LOSS_TOTAL, LOSS_CE, LOSS_LB, LOSS_RZ, LOSS_LZ, LOSS_DROPPED, N_LOSSES = 8 };

typedef enum { PRECISION_FP32 = 0, PRECISION_BF16 = 1 } Precision;

// Optimizers (SPEC §5). The caller applies the learning-rate schedule.
//
// AdamW, per parameter, step t = 1, 2, ...; first the gradient is scaled by
// min(1, grad_clip / global_norm):
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + lr * wd * w   (wd on matrices only)
// Adafactor (Shazeer & Stern 2018, as T5X ran it for OpenMoE), no momentum,
// no weight decay, no global clipping; per matrix slice [rows, cols] with
// rows >= min_dim and cols >= min_dim (else per element), beta = 1 - t^(-decay):
//   g2 = g^2 + eps1
//   factored: r = beta r + (1-beta) rowmean(g2);  c = beta c + (1-beta) colmean(g2)
//             u = g / sqrt(r / mean(r)) / sqrt(c)
//   else:     v = beta v + (1-beta) g2;  u = g / sqrt(v)
//   u /= max(1, rms(u) / clip_threshold)
//   w -= lr * max(eps2, rms(w)) * u       (rms(w) before the update, per slice)
typedef enum { OPT_ADAMW = 0, OPT_ADAFACTOR = 1 } OptKind;

//
// With freeze_router (SPEC §8, router freeze), the routers' gradients are
// zeroed before the global norm (so they are left out of it) and the routers
// and their optimizer state are not touched.
typedef struct {
    OptKind kind;
    float lr;
    float beta1, beta2, eps, weight_decay, grad_clip;    // AdamW
    float decay, clip_threshold, eps1, eps2;             // Adafactor
    int min_dim;                                         // Adafactor: factor slices with both dims >= this
    int freeze_router;                                   // 1: the routers stay as they are
    // ZeRO-1 (train.c's data parallelism): the model keeps the optimizer state
    // of, and model_update steps, only the tensors that start in parameters
    // [shard_lo, shard_hi); shard_hi 0 means all. Read by model_create.
    size_t shard_lo, shard_hi;
} OptSettings;

static inline OptSettings opt_settings_default(OptKind kind) {
    OptSettings o = {kind, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 0.8f, 1.0f, 1e-30f, 1e-3f, 128, 0, 0, 0};
    if (kind == OPT_ADAFACTOR) o.lr = 0.01f;
    return o;
}

// Router statistics of the last forward, one entry per MoE layer.
typedef struct {
    float lb;         // load-balance loss (mean over groups), before its coefficient
    float rz;         // router z-loss
    float dropped;    // dropped share of this layer's B*T*K assignments
    int *routed;      // [E] top-K choices per expert, before dropping
    int *kept;        // [E] assignments kept per expert
} RouterStats;

// A model for batches of up to B sequences of up to T tokens: activations
// for B x T, and RoPE tables and a KV cache for positions 0..T-1, which
// model_prefill and model_decode fill (T <= max_seq_len). With opt (not
// NULL): parameters (zero), gradients and the state of optimizer opt->kind
// (zero), and every layer keeps its activations for model_backward;
// model_update must then be called with the same kind and min_dim. Without
// opt (inference): no parameters until model_set_params copies them in or
// model_set_weights points the model at a model file's, and the layers share
// one set of activations, as no backward reads them (model_get_routing is
// then refused). Nothing else is allocated after this call. Exits with a
// message when memory or the backend fails.
Model *model_create(const Config *c, int B, int T, Precision precision, const OptSettings *opt);
void model_free(Model *m);

const Config *model_config(const Model *m);
const ParamTable *model_param_table(const Model *m);

void model_set_params(Model *m, const float *params);   // host [n_params], copied
void model_get_params(const Model *m, float *params);   // of a model with parameters of its own

// The weights of a mapped model file (section 5), for a model of its config
// made without an optimizer: the model computes with them where they lie
// (the file stays mapped while it does), and holds no parameters of its own.
// The CPU reads every version in place, the products widening bf16 and int8
// to the fp32 values a version-1 file of the decoded weights holds, so that
// its results have those bits; it touches an expert's weights only when a
// token uses the expert. The GPU uploads them: version 1 as its fp32
// weights, versions 2 and 3 as the bf16 copy its bf16 mode computes with,
// with no fp32 copy (the norms and routers, read in fp32, aside).
typedef struct ModelFile ModelFile;
void model_set_weights(Model *m, const ModelFile *f);
// the precision a backend computes a model file of this version in: the CPU
// fp32 always; the GPU fp32 for version 1, bf16 for versions 2 and 3
Precision model_file_precision(int version);
void model_get_grads(const Model *m, float *grads);
void model_set_grads(Model *m, const float *grads);     // tests: feed known gradients to model_update

// One batch: B rows of T tokens, host arrays [B*T] (row b, column t at
// b*T + t). SPEC §10 packs several examples into a row: each token carries
// its segment (which example) and its position in it. A query sees the keys
// at or before it in its own segment; padding (segment -1) is a segment of
// its own, so that no real token sees it and no softmax is empty.
typedef struct {
    const int32_t *x;         // the tokens
    const int32_t *y;         // the targets, -1: none; NULL: logits only
    const int32_t *segment;   // each token's segment in its row, >= -1; NULL: one segment per row
    const int32_t *position;  // each token's RoPE position, in [0, the model's T); NULL: 0..T-1 in every row
    int B, T;
    // what the CE and the output z-loss sums are divided by; 0: the number of
    // targets in y. Data parallelism (train.c) gives every rank the mean of
    // the ranks' counts, so that the mean of the ranks' gradients is that of
    // the mean over all the batch's targets.
    double loss_targets;
} Batch;

// Forward of one batch; returns the losses (N_LOSSES, indexed by LOSS_*).
// Without segments and positions, a row is computed exactly as SPEC §2 says.
void model_forward(Model *m, const Batch *batch, const MoeSettings *s, float *losses);
void model_get_logits(const Model *m, float *logits);   // host [B*T*V] of the last forward
const RouterStats *model_router_stats(const Model *m);  // [n_moe_layers] of the last forward
// Routing of MoE layer i (0-based among MoE layers) in the last forward, host
// arrays [B*T*K], rank-major per token: expert id, full-softmax probability,
// 1 if the assignment was kept, 0 if capacity dropped it.
void model_get_routing(const Model *m, int i, int32_t *expert, float *prob, uint8_t *kept);

// Gradients of the total loss of the last forward (which needs y).
void model_backward(Model *m);
// One optimizer step t (1-based) with the gradients of the last backward;
// returns the global gradient norm before clipping.
float model_update(Model *m, const OptSettings *o, int t);
// optimizer state, host [opt_state_floats(...)] (with a ZeRO-1 shard: its
// opt_state_floats_range(...), m then v for AdamW), for checkpoints
void model_get_opt_state(const Model *m, float *state);
void model_set_opt_state(Model *m, const float *state);

// Loss-free balancing bias (SPEC §8): b[E] per MoE layer, host arrays
// [n_moe*E]; top-K is chosen by p + b (combine weights and losses use p).
// Zero after model_create.
void model_set_router_bias(Model *m, const float *bias);
void model_get_router_bias(const Model *m, float *bias);

// Data parallelism, compiled with -DUSE_MPI (make MPI=1): the CPU backend
// talks MPI, the CUDA backend NCCL. dp_init, once after MPI_Init and before
// model_create, picks this rank's device (GPU: local rank) and connects the
// ranks. model_grads_allreduce replaces the gradients by their mean over the
// ranks; model_params_allgather gives every rank the parameters that rank r
// stepped, [shard[r], shard[r+1]) (shard: n_ranks + 1 offsets).
#ifdef USE_MPI
void dp_init(int rank, int n_ranks, int local_rank);
void model_grads_allreduce(Model *m);
void model_params_allgather(Model *m, const size_t *shard);
#endif

// Inference with a KV cache, one sequence. model_prefill runs the prompt x
// (T tokens) as one forward pass, routed as s says (model_forward's batch of
// one), puts its keys and values into the cache at positions 0..T-1 and
// returns the host logits [V] of its last position. model_decode feeds one
// token at position pos (0 <= pos < the model's T; positions before pos must
// have been fed) and returns the host logits [V] for the next token. Each
// decoded token is routed on its own (a group of one), so capacity never
// drops it: a prefill routed so too (group_size 1) followed by decoding
// matches model_forward with group_size 1, and a prefill of the first
// n tokens as one group matches model_forward with first_group n and
// group_size 1.
const float *model_prefill(Model *m, const int32_t *x, int T, const MoeSettings *s);
const float *model_decode(Model *m, int token, int pos);
// 1 when model_prefill's and model_decode's logits equal model_forward's bit
// for bit, as on the CPU, where all sum each output in one fixed chain; 0 on
// the GPU, where the forward's cuBLAS sums in its own order (run --verify
// then checks the argmax only)
extern const int model_decode_bitwise;

// ----------------------------------------------------------------------------
// 3. the tables. First the parameters: every tensor's offset into one fp32
// buffer, in the order of the model file (SPEC §6). Expert stacks [E, rows,
// cols] are one tensor of E slices; optimizers and tests treat each slice as
// a matrix.

typedef struct {
    size_t attn_norm, wq, wk, wv, wo;  // wq,wk,wv [H*Hd, D], wo [D, H*Hd]
    size_t mlp_norm;
    size_t w_gate, w_up, w_down;       // dense: [2F,D] [F,D] [D,F]; MoE: [E,2Fe,D] [E,Fe,D] [E,D,Fe]
    size_t router;                     // MoE: [E, D]
    size_t extra_norm, x_gate, x_up, x_down;  // MoE with extra_ffn: [D] [2F,D] [F,D] [D,F]
    int moe;
} LayerParams;

typedef struct {
    char name[32];   // e.g. "l3.w_gate", "l3.router", "wte"
    size_t offset;   // into the parameter buffer
    int slices;      // E for expert stacks, else 1
    int rows, cols;  // each slice is rows x cols; vectors have rows 1
    int matrix;      // 1 for weight matrices (weight decay, factored Adafactor), 0 for norm weights
} TensorInfo;

struct ParamTable {
    size_t wte, final_norm, lm_head;
    LayerParams *layer;    // [L]
    TensorInfo *tensors;   // in file order
    int n_tensors;
    size_t n_params;
};

static inline size_t tensor_numel(const TensorInfo *t) {
    return (size_t)t->slices * t->rows * t->cols;
}

static inline size_t param_table_add(ParamTable *p, const char *name, int slices, int rows, int cols,
                                     int matrix) {
    TensorInfo *t = &p->tensors[p->n_tensors++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->offset = p->n_params;
    t->slices = slices;
    t->rows = rows;
    t->cols = cols;
    t->matrix = matrix;
    p->n_params += tensor_numel(t);
    return t->offset;
}

// the number of parameters (SPEC §6), from the config alone: what a reader
// compares with the file's size before it builds the table or allocates
// anything (saturates at SIZE_OVERFLOW)
static inline uint64_t config_n_params(const Config *c) {
    uint64_t D = c->D, HHd = size_mul(c->H, c->Hd);
    uint64_t dense_ffn = size_mul(4, size_mul(c->F, D));  // w_gate [2F,D], w_up [F,D], w_down [D,F]
    uint64_t attn = size_add(2 * D, size_mul(4, size_mul(HHd, D)));  // two norms, wq wk wv wo
    uint64_t moe = size_add(size_mul(c->E, D), size_mul(4, size_mul(c->E, size_mul(c->Fe, D))));
    if (c->extra_ffn) moe = size_add(moe, size_add(D, dense_ffn));
    uint64_t n_moe = (uint64_t)n_moe_layers(c), n_dense = (uint64_t)c->L - n_moe;
    uint64_t n = size_add(size_mul(2, size_mul(c->V, D)), D);  // wte, lm_head, final_norm
    n = size_add(n, size_mul(n_dense, size_add(attn, dense_ffn)));
    return size_add(n, size_mul(n_moe, size_add(attn, moe)));
}

static inline void param_table_build(ParamTable *p, const Config *c) {
    int HHd = c->H * c->Hd;
    memset(p, 0, sizeof(*p));
    p->layer = (LayerParams *)callocCheck(c->L, sizeof(LayerParams));
    p->tensors = (TensorInfo *)callocCheck(3 + 14 * (size_t)c->L, sizeof(TensorInfo));
    char n[32];
    p->wte = param_table_add(p, "wte", 1, c->V, c->D, 1);
    for (int l = 0; l < c->L; l++) {
        LayerParams *lp = &p->layer[l];
        lp->moe = is_moe_layer(c, l);
#define ADD(field, slices, rows, cols, matrix) \
        (snprintf(n, sizeof(n), "l%d.%s", l, #field), \
         lp->field = param_table_add(p, n, slices, rows, cols, matrix))
        ADD(attn_norm, 1, 1, c->D, 0);
        ADD(wq, 1, HHd, c->D, 1);
        ADD(wk, 1, HHd, c->D, 1);
        ADD(wv, 1, HHd, c->D, 1);
        ADD(wo, 1, c->D, HHd, 1);
        ADD(mlp_norm, 1, 1, c->D, 0);
        if (!lp->moe) {
            ADD(w_gate, 1, 2 * c->F, c->D, 1);
            ADD(w_up, 1, c->F, c->D, 1);
            ADD(w_down, 1, c->D, c->F, 1);
        } else {
            ADD(router, 1, c->E, c->D, 1);
            ADD(w_gate, c->E, 2 * c->Fe, c->D, 1);
            ADD(w_up, c->E, c->Fe, c->D, 1);
            ADD(w_down, c->E, c->D, c->Fe, 1);
            if (c->extra_ffn) {
                ADD(extra_norm, 1, 1, c->D, 0);
                ADD(x_gate, 1, 2 * c->F, c->D, 1);
                ADD(x_up, 1, c->F, c->D, 1);
                ADD(x_down, 1, c->D, c->F, 1);
            }
        }
#undef ADD
    }
    p->final_norm = param_table_add(p, "final_norm", 1, 1, c->D, 0);
    p->lm_head = param_table_add(p, "lm_head", 1, c->V, c->D, 1);
    if (p->n_params != config_n_params(c))
        die("param_table_build: %zu parameters, but config_n_params says %llu", p->n_params,
            (unsigned long long)config_n_params(c));
}

// the tensor that holds parameter off (the last that starts at or before it)
static inline int param_tensor_of(const ParamTable *p, size_t off) {
    int lo = 0, hi = p->n_tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (p->tensors[mid].offset <= off) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static inline void param_table_free(ParamTable *p) {
    free(p->layer);
    free(p->tensors);
    memset(p, 0, sizeof(*p));
}

// ----------------------------------------------------------------------------
// the tables, continued: the activations. Every tensor a forward keeps for
// its backward, the backward's scratch and inference's buffers, described
// once for both backends, as the parameter table describes the weights. A
// row names a tensor, its element type, its size in elements and when a
// model has it (else its pointer is NULL); its comment gives its shape. Each
// backend declares its structs from the rows (ACT_POINTER), adds rows of its
// own, and carves them all from one allocation in row order. floatX, the
// type of a matmul's operands, is fp32 on the CPU and fp32 or bf16 in
// openmoe.cu.
//
// The sizes are for the largest batch, B x T (BT = B*T), and for what the
// model uses, so that a width no layer has allocates nothing: in a layer,
// dense (it has a dense FFN), moe (router and experts) and extra (the extra
// FFN after the MoE); in the model, any_moe (a MoE layer), ffn_elems (the
// most FFN rows x width the backward holds at once: BT*F with a dense or
// extra FFN, BT*K*Fe with experts) and ffn_width (the widest FFN, F or Fe).
// flash: openmoe.cu's flash attention keeps no (T,T) matrices.

// The layers' rows are carved for every layer where a backward will read
// them (keep: a model with an optimizer); an inference model carves them
// once, for the kinds of layer it has (ACT_SHARED_LAYER), every layer
// reusing them, and keeps two residuals, a layer's input and its output.
// T is also the number of positions the RoPE tables and KV cache hold.

// what ACT_SIZES and ACT_LAYER name, as locals of the function that carves:
// c the config, Bmax x Tmax the largest batch, flash_ as above, keep_ as above
#define ACT_SIZES(c, Bmax, Tmax, flash_, keep_)                                                                   \
    const size_t B = (Bmax), T = (Tmax), BT = B * T, D = (c)->D, H = (c)->H, Hd = (c)->Hd, HHd = H * Hd;        \
    const size_t V = (c)->V, L = (c)->L, E = (c)->E, K = (c)->K, F = (c)->F, Fe = (c)->Fe;                      \
    const size_t n_moe = n_moe_layers(c), n_resid = (keep_) ? L + 1 : 2;                                        \
    const int any_moe = n_moe > 0, any_ffn = L > n_moe || (any_moe && (c)->extra_ffn), flash = (flash_);        \
    const size_t ffn_f = any_ffn ? F : 0, ffn_fe = any_moe ? Fe : 0;                                            \
    const size_t ffn_elems = BT * ffn_f > BT * K * ffn_fe ? BT * ffn_f : BT * K * ffn_fe;                        \
    const size_t ffn_width = ffn_f > ffn_fe ? ffn_f : ffn_fe;                                                    \
    (void)B, (void)T, (void)BT, (void)D, (void)H, (void)Hd, (void)HHd, (void)V, (void)L, (void)E, (void)K;      \
    (void)F, (void)Fe, (void)n_moe, (void)n_resid, (void)any_moe, (void)flash, (void)ffn_elems, (void)ffn_width
#define ACT_LAYER(c, l)                                                                                          \
    const int moe = is_moe_layer(c, l), dense = !moe, extra = moe && (c)->extra_ffn;                            \
    (void)moe, (void)dense, (void)extra
// the rows of every kind of layer the model has, carved once for an inference model
#define ACT_SHARED_LAYER(c)                                                                                      \
    const int moe = any_moe, dense = (int)L > (int)n_moe, extra = any_moe && (c)->extra_ffn;                   \
    (void)moe, (void)dense, (void)extra
// where layer l's input lies among the n_resid residuals (resid (n_resid,BT,D))
#define ACT_RESID(l) ((size_t)(l) % n_resid * BT * D)

// a row as a struct member
#define ACT_POINTER(name, type, n, when) type *name;

// one layer's: what it keeps for the backward. (Its input, resid[l], and a
// MoE layer's moe_out without the extra FFN, resid[l+1], point into resid.)
//  name       type    elements          when
#define LAYER_ACTS(_)                                                                                            \
    _(ln1,       floatX, BT * D,           1)       /* (BT,D) RMSNorm(in): attention's input */                \
    _(rstd1,     float,  BT,               1)       /* (BT) its 1/rms */                                         \
    _(qkv,       floatX, BT * 3 * HHd,     1)       /* (BT,3HHd) q | k | v of each token, q, k after RoPE */    \
    _(att,       floatX, B * H * T * T,    !flash)  /* (B,H,T,T) attention probabilities */                     \
    _(atty,      floatX, BT * HHd,         1)       /* (BT,HHd) attention's output before Wo */                 \
    _(mid,       float,  BT * D,           1)       /* (BT,D) the residual after attention */                   \
    _(rstd2,     float,  BT,               1)       /* (BT) 1/rms of mid */                                      \
    _(ln2,       floatX, BT * D,           dense)   /* (BT,D) RMSNorm(mid): the dense FFN's input */            \
    _(gu,        floatX, BT * 3 * F,       dense)   /* (BT,3F) its [a | b | u] */                               \
    _(h,         floatX, BT * F,           dense)   /* (BT,F) a * silu(b) * u */                                \
    _(moe_in,    float,  BT * D,           moe)     /* (BT,D) RMSNorm(mid) in fp32: router input, rows' source */ \
    _(z,         float,  BT * E,           moe)     /* (BT,E) router logits */                                  \
    _(p,         float,  BT * E,           moe)     /* (BT,E) their softmax */                                  \
    _(lse,       float,  BT,               moe)     /* (BT) their logsumexp */                                  \
    _(top,       int,    BT * K,           moe)     /* (BT,K) the experts chosen, best first */                 \
    _(kept,      int,    BT * K,           moe)     /* (BT,K) 1 where capacity kept the choice */               \
    _(row_of,    int,    BT * K,           moe)     /* (BT,K) its row in the experts' buffers, -1: dropped */   \
    _(row_token, int,    BT * K,           moe)     /* (BT*K) each expert row's token */                        \
    _(start,     int,    E + 1,            moe)     /* (E+1) expert e's rows: start[e] .. start[e+1]-1 */       \
    _(lbf,       float,  BT * E,           moe)     /* (groups,E) f_e of the load-balance loss, groups <= BT */ \
    _(xe,        floatX, BT * K * D,       moe)     /* (BT*K,D) the experts' rows: their inputs */              \
    _(gue,       floatX, BT * K * 3 * Fe,  moe)     /* (BT*K,3Fe) their [a | b | u] */                          \
    _(he,        floatX, BT * K * Fe,      moe)     /* (BT*K,Fe) */                                             \
    _(ye,        floatX, BT * K * D,       moe)     /* (BT*K,D) their outputs */                                \
    _(moe_out,   float,  BT * D,           extra)   /* (BT,D) the residual after the MoE */                     \
    _(ln3,       floatX, BT * D,           extra)   /* (BT,D) RMSNorm(moe_out): the extra FFN's input */        \
    _(rstd3,     float,  BT,               extra)   /* (BT) */                                                   \
    _(gux,       floatX, BT * 3 * F,       extra)   /* (BT,3F) */                                               \
    _(hx,        floatX, BT * F,           extra)   /* (BT,F) */

// the model's forward, after its layers'
#define FORWARD_ACTS(_)                                                                                          \
    _(resid,     float,  n_resid * BT * D, 1)       /* (n_resid,BT,D) layer l reads ACT_RESID(l), writes l+1's */ \
    _(lnf,       floatX, BT * D,           1)       /* (BT,D) the final norm's output */                        \
    _(rstdf,     float,  BT,               1)       /* (BT) */                                                   \
    _(logits,    floatX, BT * V,           1)       /* (BT,V) */                                                \
    _(lse,       float,  BT,               1)       /* (BT) logsumexp of each token's logits */

// the backward's scratch, with an optimizer only
#define BACKWARD_ACTS(_)                                                                                         \
    _(d_res,     float,  BT * D,           1)       /* (BT,D) the residual stream's gradient */                 \
    _(d_ln,      float,  BT * D,           1)       /* (BT,D) the gradient at a norm's output */                \
    _(datty,     floatX, BT * HHd,         1)       /* (BT,HHd) */                                              \
    _(dqkv,      floatX, BT * 3 * HHd,     1)       /* (BT,3HHd) */                                             \
    _(dscore,    floatX, B * H * T * T,    !flash)  /* (B,H,T,T) */                                             \
    _(dgu,       floatX, 3 * ffn_elems,    1)       /* (BT,3F) or (BT*K,3Fe) */                                 \
    _(dh,        floatX, ffn_elems,        1)       /* (BT,F) or (BT*K,Fe) */                                   \
    _(dxe,       float,  BT * K * D,       any_moe) /* (BT*K,D) the experts' input gradients */                 \
    _(dye,       floatX, BT * K * D,       any_moe) /* (BT*K,D) their output gradients */                       \
    _(dp,        float,  BT * E,           any_moe) /* (BT,E) dLoss/dp, then dLoss/dz */                        \
    _(dlogits,   floatX, BT * V,           1)       /* (BT,V) */

// the batch, the loss sums, the RoPE tables and inference's buffers: no
// floatX, so that both backends keep them in the Model itself, where the
// forward, its losses and model_decode (fp32 in both) reach them
#define MODEL_BUFFERS(_)                                                                                         \
    _(x,         int,    BT,               1)       /* (BT) the tokens of the last forward */                   \
    _(y,         int,    BT,               1)       /* (BT) its targets, -1: none */                            \
    _(segment,   int,    BT,               1)       /* (BT) its segments, when the batch has them */            \
    _(position,  int,    BT,               1)       /* (BT) its positions, when the batch has them */           \
    _(sums,      double, 2 + 2 * n_moe,    1)       /* its ce and lz sums, then per MoE layer lb's and rz's */  \
    _(rope_cos,  float,  T * (Hd / 2),     1)       /* (T,Hd/2) positions 0..T-1 */                             \
    _(rope_sin,  float,  T * (Hd / 2),     1)       /* (T,Hd/2) */                                              \
    _(kcache,    float,  L * T * HHd,      1)       /* (L,T,HHd) the keys of the tokens prefilled and decoded */ \
    _(vcache,    float,  L * T * HHd,      1)       /* (L,T,HHd) their values */                                \
    _(t_x,       float,  D,                1)       /* one token's residual stream */                           \
    _(t_xn,      float,  D,                1)       /* its norm */                                              \
    _(t_qkv,     float,  3 * HHd,          1)                                                                    \
    _(t_att,     float,  H * T,            1)       /* (H,T) a row of scores per head */                        \
    _(t_aty,     float,  HHd,              1)                                                                    \
    _(t_gu,      float,  3 * ffn_width,    1)                                                                    \
    _(t_h,       float,  ffn_width,        1)                                                                    \
    _(t_out,     float,  D,                1)       /* an expert's output */                                    \
    _(t_acc,     float,  D,                1)       /* the MoE's output */                                      \
    _(t_z,       float,  E,                any_moe) /* router logits */                                         \
    _(t_p,       float,  E,                any_moe) /* their softmax */                                         \
    _(t_top,     int,    K,                any_moe) /* the experts chosen */                                    \
    _(t_logits,  float,  V,                1)

// ----------------------------------------------------------------------------
// 4. what both backends compute the same way. First the RNG and
// initialisation (SPEC §5). The RNG is splitmix64: a 64-bit state that
// checkpoints save, identical on every platform and backend.

typedef struct { uint64_t s; } Rng;

static inline uint64_t rng_u64(Rng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// uniform in [0, 1) with 24 random bits
static inline float rng_uniform(Rng *r) { return (float)(rng_u64(r) >> 40) * (1.0f / 16777216.0f); }
// standard normal (Box-Muller in double, one value per call)
static inline double rng_normal(Rng *r) {
    double u1 = ((rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);  // (0, 1]
    double u2 = (rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
// normal with std sigma, truncated at 2 sigma by resampling
static inline float rng_truncnormal(Rng *r, double sigma) {
    double z;
    do { z = rng_normal(r); } while (z > 2.0 || z < -2.0);
    return (float)(z * sigma);
}

// SPEC §5: wte ~ N(0,1); matrices ~ N(0, 0.1/fan_in) truncated at 2 sigma,
// wq also scaled by 1/sqrt(Hd) (OpenMoE's folded attention scale);
// router ~ N(0, 0.02^2); norm weights 1.
static inline void params_init(const ParamTable *p, const Config *c, float *params, uint64_t seed) {
    Rng r = {seed};
    for (int i = 0; i < p->n_tensors; i++) {
        const TensorInfo *t = &p->tensors[i];
        float *w = params + t->offset;
        size_t n = tensor_numel(t);
        const char *leaf = strchr(t->name, '.') ? strchr(t->name, '.') + 1 : t->name;
        if (!t->matrix) {
            for (size_t j = 0; j < n; j++) w[j] = 1.0f;
        } else if (strcmp(leaf, "wte") == 0) {
            for (size_t j = 0; j < n; j++) w[j] = (float)rng_normal(&r);
        } else if (strcmp(leaf, "router") == 0) {
            for (size_t j = 0; j < n; j++) w[j] = (float)(0.02 * rng_normal(&r));
        } else {
            double sigma = sqrt(0.1 / t->cols);
            if (strcmp(leaf, "wq") == 0) sigma /= sqrt((double)c->Hd);
            for (size_t j = 0; j < n; j++) w[j] = rng_truncnormal(&r, sigma);
        }
    }
}

// Routing groups, capacity, the router, RoPE, router statistics, argument
// checks, the losses and the optimizer state's layout. HOST_DEVICE functions
// also run inside openmoe.cu's kernels.

#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

// Routing groups (SPEC §3): the N tokens of a call in flattened order, cut
// into groups of group_size (0: one group of them all). With first_group > 0
// (MoeSettings), tokens 0..P-1, P = group_first(N, first_group), are group 0,
// and the groups of group_size follow from token P. G = group_len(N,
// group_size, P) is those groups' size (the last may be shorter).
static inline HOST_DEVICE int group_first(int N, int first_group) {
    return first_group <= 0 ? 0 : first_group < N ? first_group : N;
}
static inline HOST_DEVICE int group_len(int N, int group_size, int P) {
    int rest = N - P > 0 ? N - P : 1;
    return group_size <= 0 || group_size > rest ? rest : group_size;
}
static inline HOST_DEVICE int group_count(int N, int G, int P) { return (P > 0) + (N - P + G - 1) / G; }
// group g's first token, the group of token n, and the tokens of group g
static inline HOST_DEVICE int group_start(int g, int G, int P) {
    return P > 0 ? (g == 0 ? 0 : P + (g - 1) * G) : g * G;
}
static inline HOST_DEVICE int group_of(int n, int G, int P) { return P > 0 ? (n < P ? 0 : 1 + (n - P) / G) : n / G; }
static inline HOST_DEVICE int group_tokens(int g, int N, int G, int P) {
    int g0 = group_start(g, G, P), end = P > 0 && g == 0 ? P : g0 + G;
    return (end < N ? end : N) - g0;
}

// expert capacity of a group of n tokens, in integers, by rule (SPEC §3, §8):
//   t5x:        max(min_capacity, round(cf1000/1000 * n / E)), halves rounded up
//   colossalai: floor(K * cf1000/1000 * n / E), odd rounded up to even, then at least min_capacity
//   none:       n (dropless: no expert can be chosen by more than the group's n tokens)
static inline HOST_DEVICE int moe_capacity_of(int n, int E, int K, int cf1000, int min_capacity, int rule) {
    long long c;
    if (rule == CAP_NONE) return n;
    if (rule == CAP_COLOSSALAI) {
        c = (long long)K * cf1000 * n / (1000LL * E);
        c += c % 2;
    } else {
        c = ((long long)cf1000 * n + 500LL * E) / (1000LL * E);
    }
    return c > min_capacity ? (int)c : min_capacity;
}

// what the router ranks expert e by: p + bias (bias NULL: p)
static inline HOST_DEVICE float router_score(const float *p, const float *bias, int e) {
    return bias ? p[e] + bias[e] : p[e];
}

// the router of one token: logits z (E) -> p (E) = softmax(z) in fp32, top
// (K) the K experts of largest p + bias (bias NULL: 0), best first (ties keep
// the lower index); returns logsumexp(z) for the router z-loss. The experts
// are visited in order, top held sorted: e goes in front of the first
// expert it beats strictly, so that a tie keeps the lower index, in O(E*K).
static inline HOST_DEVICE float router_row(float *p, int *top, const float *z, const float *bias, int E, int K) {
    float maxz = -FLT_MAX;
    for (int e = 0; e < E; e++) maxz = z[e] > maxz ? z[e] : maxz;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        p[e] = expf(z[e] - maxz);
        sum += p[e];
    }
    for (int e = 0; e < E; e++) p[e] /= sum;
    int n = 0;  // experts in top so far
    for (int e = 0; e < E; e++) {
        float s = router_score(p, bias, e);
        int at = n;
        while (at > 0 && s > router_score(p, bias, top[at - 1])) at--;
        if (at == K) continue;
        if (n < K) n++;
        for (int j = n - 1; j > at; j--) top[j] = top[j - 1];
        top[at] = e;
    }
    return maxz + logf(sum);
}

// Drop policy probs (SPEC §8): each expert keeps the C assignments of its
// group with the largest p_e(n), ties to the lower rank r, then the lower n.
// probs_key orders them so, ascending, as one integer both backends compare:
// the complement of p's bits (p >= 0, so its bits grow with it; a NaN, whose
// bits differ between devices, counts as 0), then r (5 bits, K <= MAX_K),
// then i = n - g0, the token's place in its group (27 bits).
#define PROBS_MAX_GROUP ((1 << 27) - 1)
static inline HOST_DEVICE uint64_t probs_key(float p, int r, int i) {
    uint32_t bits;
    memcpy(&bits, &p, 4);
    if (p != p) bits = 0;
    return (uint64_t)(0xFFFFFFFFu - bits) << 32 | (uint64_t)r << 27 | (uint64_t)i;
}
static inline HOST_DEVICE int probs_key_rank(uint64_t key) { return (int)(key >> 27 & 31); }
static inline HOST_DEVICE int probs_key_index(uint64_t key) { return (int)(key & PROBS_MAX_GROUP); }
#if MAX_K > 32
#error "probs_key holds the rank r < MAX_K in 5 bits"
#endif

// router_row's backward for one token of N: d (E) holds dLoss/dp and becomes
// dLoss/dz through the softmax, with the router z-loss term (coefficient rz_w
// on mean lse^2) added; p (E) and lse as router_row gave them
static inline HOST_DEVICE void router_backward_row(float *d, const float *p, float lse, float rz_w, int N, int E) {
    float pd = 0.0f;
    for (int e = 0; e < E; e++) pd += p[e] * d[e];
    float zl = rz_w * 2.0f * lse / N;  // d(rz_w * mean lse^2)/dlse, and dlse/dz = p
    for (int e = 0; e < E; e++) d[e] = p[e] * (d[e] - pd) + zl * p[e];
}

// RoPE tables (SPEC §2): cos, sin (T, Hd/2) of pos * 10000^(-2i/Hd) for positions 0..T-1, computed in double
static inline void rope_tables(float *cosv, float *sinv, int T, int Hd) {
    for (int pos = 0; pos < T; pos++)
        for (int i = 0; i < Hd / 2; i++) {
            double theta = pos * pow(10000.0, -2.0 * i / Hd);
            cosv[(size_t)pos * (Hd / 2) + i] = (float)cos(theta);
            sinv[(size_t)pos * (Hd / 2) + i] = (float)sin(theta);
        }
}

// per MoE layer: routed[E] then kept[E] in one array (*ints); exits when out of memory
static inline RouterStats *router_stats_create(int n_moe, int E, int **ints) {
    int nm = n_moe > 0 ? n_moe : 1;
    RouterStats *stats = (RouterStats *)callocCheck(nm, sizeof(RouterStats));
    *ints = (int *)callocCheck(2 * (size_t)nm * E, sizeof(int));
    for (int i = 0; i < nm; i++) {
        stats[i].routed = *ints + (size_t)2 * i * E;
        stats[i].kept = *ints + (size_t)(2 * i + 1) * E;
    }
    return stats;
}

// the router statistics of a forward: stats[i].lb, .rz, .dropped of MoE layer
// i from its sums (layer_sums[2i] the lb sum over the n_groups groups,
// [2i+1] the sum of lse^2 over the N tokens) and its routed and kept counts
// (already in stats[i]). Returns the assignments dropped in all layers.
static inline long router_stats_from_sums(RouterStats *stats, const double *layer_sums, int n_moe, int n_groups,
                                          int N, int K, int E) {
    long dropped = 0;
    for (int i = 0; i < n_moe; i++) {
        RouterStats *st = &stats[i];
        st->lb = (float)(layer_sums[2 * i] / n_groups);
        st->rz = (float)(layer_sums[2 * i + 1] / N);
        long routed = 0, kept = 0;
        for (int e = 0; e < E; e++) {
            routed += st->routed[e];
            kept += st->kept[e];
        }
        st->dropped = (float)((double)(routed - kept) / ((double)N * K));
        dropped += routed - kept;
    }
    return dropped;
}

// Loss-free balancing (SPEC §8), after an optimizer step: per MoE layer,
// b_e += u * sign(mean load - load_e), load_e = the step's assignments to e
// before dropping (stats[i].routed), mean load = their total / E.
static inline void router_bias_update(float *bias, const RouterStats *stats, int n_moe, int E, float u) {
    for (int i = 0; i < n_moe; i++) {
        long total = 0;
        for (int e = 0; e < E; e++) total += stats[i].routed[e];
        double mean = (double)total / E;
        for (int e = 0; e < E; e++) {
            int load = stats[i].routed[e];
            bias[(size_t)i * E + e] += load < mean ? u : load > mean ? -u : 0.0f;
        }
    }
}

// model_forward's arguments, against the batch the model was created for
static inline void forward_args_check(int B, int T, int Bmax, int Tmax, const MoeSettings *s) {
    if (B <= 0 || T <= 0 || B > Bmax || T > Tmax)
        die("model_forward: batch %d x %d does not fit the model's %d x %d", B, T, Bmax, Tmax);
    if (s->cf1000 <= 0 || s->min_capacity < 0 || s->group_size < 0 || s->capacity_rule < 0 ||
        s->capacity_rule >= N_CAP_RULES || s->drop_policy < 0 || s->drop_policy >= N_DROP_POLICIES ||
        s->first_group < 0)
        die("model_forward: bad MoE settings (cf1000 %d, min_capacity %d, group_size %d, capacity rule %d, "
            "drop policy %d, first group %d)", s->cf1000, s->min_capacity, s->group_size, s->capacity_rule,
            s->drop_policy, s->first_group);
}

// the batch b checked against the vocabulary V and the model's positions
// [0, Tmax) (its RoPE tables), and copied: x, y to xd, yd (y NULL: no
// targets, yd all -1), its segments and positions, where it has them, to
// segd, posd; returns the number of targets
static inline int forward_batch_copy(int *xd, int *yd, int *segd, int *posd, const Batch *b, int V, int Tmax) {
    int n_targets = 0, BT = b->B * b->T;
    const int32_t *x = b->x, *y = b->y, *seg = b->segment, *pos = b->position;
    if (!x) die("model_forward: the batch has no tokens (x NULL)");
    if (!(b->loss_targets >= 0.0 && b->loss_targets <= DBL_MAX))
        die("model_forward: loss_targets %g, must be finite and >= 0", b->loss_targets);
    for (int n = 0; n < BT; n++) {
        if (x[n] < 0 || x[n] >= V) die("model_forward: token x[%d] = %d out of range [0, %d)", n, x[n], V);
        if (y && (y[n] < -1 || y[n] >= V)) die("model_forward: target y[%d] = %d out of range [-1, %d)", n, y[n], V);
        if (seg && seg[n] < -1) die("model_forward: segment[%d] = %d, must be >= -1 (-1: padding)", n, seg[n]);
        if (pos && (pos[n] < 0 || pos[n] >= Tmax))
            die("model_forward: position[%d] = %d outside the model's [0, %d)", n, pos[n], Tmax);
        xd[n] = x[n];
        yd[n] = y ? y[n] : -1;
        if (seg) segd[n] = seg[n];
        if (pos) posd[n] = pos[n];
        n_targets += yd[n] >= 0;
    }
    return n_targets;
}

// what a forward's CE and output z-loss are means over: b->loss_targets, or
// the n_targets of its y
static inline double forward_loss_targets(const Batch *b, int n_targets) {
    return b->loss_targets > 0.0 ? b->loss_targets : (double)n_targets;
}

// model_update's arguments, against the optimizer the model was created with
static inline void update_args_check(int has_grads, OptKind kind, int min_dim, const OptSettings *o, int t) {
    if (!has_grads) die("model_update: the model was created without an optimizer");
    if (o->kind != kind || (o->kind == OPT_ADAFACTOR && o->min_dim != min_dim))
        die("model_update: optimizer settings differ from those the model was created with");
    if (t < 1) die("model_update: step %d, steps count from 1", t);
}

// the losses (N_LOSSES) of a forward (SPEC §4) from its sums: ce and lz
// means over n_targets (forward_loss_targets); lb and rz, the means of the
// MoE layers' stats; dropped of the n_moe * BTK assignments
static inline void losses_from_sums(float *losses, double ce_sum, double lz_sum, double n_targets,
                                    const RouterStats *stats, int n_moe, long dropped, long BTK,
                                    const MoeSettings *s) {
    double lb = 0.0, rz = 0.0;
    for (int i = 0; i < n_moe; i++) {
        lb += stats[i].lb;
        rz += stats[i].rz;
    }
    double ce = n_targets ? ce_sum / n_targets : 0.0, lz = n_targets ? lz_sum / n_targets : 0.0;
    lb = n_moe ? lb / n_moe : 0.0;
    rz = n_moe ? rz / n_moe : 0.0;
    memset(losses, 0, N_LOSSES * sizeof(float));
    losses[LOSS_TOTAL] = (float)(ce + s->lb_coef * lb + s->rz_coef * rz + s->lz_coef * lz);
    losses[LOSS_CE] = (float)ce;
    losses[LOSS_LB] = (float)lb;
    losses[LOSS_RZ] = (float)rz;
    losses[LOSS_LZ] = (float)lz;
    losses[LOSS_DROPPED] = n_moe ? (float)((double)dropped / ((double)BTK * n_moe)) : 0.0f;
}

// a router matrix (frozen by OptSettings.freeze_router)
static inline int is_router_tensor(const TensorInfo *t) {
    const char *leaf = strchr(t->name, '.');
    return leaf && strcmp(leaf + 1, "router") == 0;
}

// Optimizer state layout, shared so that checkpoints move between backends.
// AdamW: m [n_params], then v [n_params]. Adafactor: per tensor, per slice in
// file order: factored slices r [rows] then c [cols], others v [rows*cols].
static inline int adafactor_factored(const TensorInfo *t, int min_dim) {
    return t->matrix && t->rows >= min_dim && t->cols >= min_dim;
}
// the state floats of the tensors that start in parameters [lo, hi) (a
// shard's tensors are whole: lo, hi are tensor offsets or n_params)
static inline size_t opt_state_floats_range(const ParamTable *p, OptKind kind, int min_dim, size_t lo, size_t hi) {
    if (kind == OPT_ADAMW) return 2 * (hi - lo);
    size_t n = 0;
    for (int i = 0; i < p->n_tensors; i++) {
        const TensorInfo *t = &p->tensors[i];
        if (t->offset < lo || t->offset >= hi) continue;
        n += adafactor_factored(t, min_dim) ? (size_t)t->slices * (t->rows + t->cols) : tensor_numel(t);
    }
    return n;
}
static inline size_t opt_state_floats(const ParamTable *p, OptKind kind, int min_dim) {
    return opt_state_floats_range(p, kind, min_dim, 0, p->n_params);
}

// ----------------------------------------------------------------------------
// 5. the model file (SPEC §6, §11): the header (utils.h), whose words 2 ..
// MODEL_HEADER_WORDS-1 hold the config (config_fields) and, in version 3,
// word MODEL_GROUP_WORD the group G; then the parameters in file order.
// Version 1 (what train writes and reads): fp32. Version 2: bf16. Version 3:
// each matrix but the routers as its fp32 scales [n/G], then its int8 values
// [n] in groups of G along its rows; the norms and routers fp32. run reads
// every version in place, mapped (model_file_map); train and test_cpu read
// version 1 into memory (model_file_load).

enum { MODEL_FP32 = 1, MODEL_BF16 = 2, MODEL_INT8 = 3 };  // the versions
#define MODEL_GROUP_WORD 14
#define MODEL_GROUP_ALIGN 4   // G is a multiple of this, so that every tensor starts 4-byte aligned
#define INT8_WEIGHT_MAX 127   // every int8 value is within +-127, every scale s >= 0 with s * 127 finite

static inline void config_to_header(const Config *c, int32_t *h) {
    memset(h, 0, HEADER_BYTES);
    h[0] = MODEL_MAGIC;
    h[1] = FILE_VERSION;
    for (int i = 0; i < N_CONFIG_FIELDS; i++) h[config_fields[i].word] = config_value(c, i);
}
static inline void config_from_header(const int32_t *h, Config *c) {
    for (int i = 0; i < N_CONFIG_FIELDS; i++) *config_field(c, i) = h[config_fields[i].word];
}

// version 3 stores every matrix but the routers in int8
static inline int tensor_quantized(const TensorInfo *t) { return t->matrix && !is_router_tensor(t); }

// the bytes tensor t takes in a file of this version (G: version 3's group)
static inline uint64_t tensor_file_bytes(const TensorInfo *t, int version, int G) {
    uint64_t n = tensor_numel(t);
    if (version == MODEL_BF16) return 2 * n;
    if (version == MODEL_INT8 && tensor_quantized(t)) return n + 4 * (n / G);
    return 4 * n;
}

// offset[i]: where tensor i of p starts in a file of this version
static inline void tensor_file_offsets(size_t *offset, const ParamTable *p, int version, int G) {
    size_t at = HEADER_BYTES;
    for (int i = 0; i < p->n_tensors; i++) {
        offset[i] = at;
        at += tensor_file_bytes(&p->tensors[i], version, G);
    }
}

// the size of a model file of config c in this version, from the config
// alone (saturating): version 3's fp32 parameters are the norms, D (2L + 1)
// and D per MoE layer with an extra FFN, and the routers, E D per MoE layer
static inline uint64_t model_file_bytes(const Config *c, int version, int G) {
    uint64_t n = config_n_params(c);
    if (version == MODEL_FP32) return size_add(HEADER_BYTES, size_mul(4, n));
    if (version == MODEL_BF16) return size_add(HEADER_BYTES, size_mul(2, n));
    uint64_t D = c->D, moe = size_add(size_mul(c->E, D), c->extra_ffn ? D : 0);
    uint64_t nf = size_add(size_mul(D, 2 * (uint64_t)c->L + 1), size_mul(n_moe_layers(c), moe)), nq = n - nf;
    return size_add(size_add(HEADER_BYTES, size_mul(4, nf)), size_add(nq, size_mul(4, nq / G)));
}

// why G cannot be version 3's group for config c (NULL: it can)
static inline const char *model_group_problem(const Config *c, int G, char *why, size_t nwhy) {
    if (G <= 0 || G % MODEL_GROUP_ALIGN) {
        snprintf(why, nwhy, "G = %d is not a positive multiple of %d", G, MODEL_GROUP_ALIGN);
        return why;
    }
    const char *names[4] = {"D", "H*Hd", "F", "Fe"};
    int widths[4] = {c->D, c->H * c->Hd, c->F, c->Fe};
    for (int i = 0; i < 4; i++)
        if (widths[i] % G) {
            snprintf(why, nwhy, "G = %d does not divide %s = %d", G, names[i], widths[i]);
            return why;
        }
    return NULL;
}

// reads the header of the open model file f into h and checks it as SPEC §6
// and §11 ask: the magic, a version 1 to 3, the config, version 3's group,
// zeros past them, and the file's size for its version; exits with a message
// naming PATH on any problem. Fills c, *version and *G (0 but in version 3)
// and returns the file's size.
static inline long model_header_read(FILE *f, const char *path, int32_t *h, Config *c, int *version, int *G) {
    long size = file_size(f, path);
    if (size < HEADER_BYTES)
        die("%s: not a model file: %ld bytes, shorter than the %d-byte header", path, size, HEADER_BYTES);
    freadCheck(h, sizeof(int32_t), HEADER_INTS, f, path);
    if (h[0] != MODEL_MAGIC) die("%s: bad magic %d (a model file starts with %d)", path, h[0], MODEL_MAGIC);
    *version = h[1];
    if (*version < MODEL_FP32 || *version > MODEL_INT8)
        die("%s: unknown version %d (versions 1, 2 and 3 are read)", path, *version);
    for (int i = *version == MODEL_INT8 ? MODEL_GROUP_WORD + 1 : MODEL_HEADER_WORDS; i < HEADER_INTS; i++)
        if (h[i] != 0) die("%s: header word %d is %d, must be 0", path, i, h[i]);
    config_from_header(h, c);
    char why[160];
    if (!config_check(c, why, sizeof(why))) die("%s: inconsistent header: %s", path, why);
    *G = *version == MODEL_INT8 ? h[MODEL_GROUP_WORD] : 0;
    if (*version == MODEL_INT8 && model_group_problem(c, *G, why, sizeof(why)))
        die("%s: header word %d: %s", path, MODEL_GROUP_WORD, why);
    uint64_t want = model_file_bytes(c, *version, *G);
    if ((uint64_t)size != want)
        die("%s: size %ld bytes, but its header describes %llu parameters in version %d (%llu bytes)", path, size,
            (unsigned long long)config_n_params(c), *version, (unsigned long long)want);
    return size;
}

// reads a version-1 model file into memory (train, test_cpu); exits with a
// message naming PATH on any problem. Returns the parameters (malloc'd,
// n_params floats) and fills *c.
static inline float *model_file_load(const char *path, Config *c) {
    FILE *f = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    int version, G;
    model_header_read(f, path, h, c, &version, &G);
    if (version != MODEL_FP32)
        die("%s: version %d (%s weights): train and test_cpu read version 1 (fp32) only; dev/convert_model.py "
            "--dtype fp32 converts it", path, version, version == MODEL_BF16 ? "bf16" : "int8");
    uint64_t n = config_n_params(c);
    float *params = (float *)mallocCheck(n * sizeof(float));
    freadCheck(params, sizeof(float), n, f, path);
    fcloseCheck(f, path);
    return params;
}

// A model file of any version, mapped read-only (run): the pages are read
// from the file as the model touches them and never copied, so that a machine
// with less memory than the file still runs it (more slowly).
struct ModelFile {
    const char *path;
    Config c;
    int version, group;         // MODEL_FP32, MODEL_BF16 or MODEL_INT8; version 3's G (else 0)
    const unsigned char *data;  // the file, from its header on
    size_t bytes;
};

// whether a version-3 scale is good: >= 0 with s * 127 finite (not a NaN,
// an infinity, a negative or a huge one)
static inline int int8_scale_ok(float s) { return s >= 0.0f && s * (float)INT8_WEIGHT_MAX <= FLT_MAX; }

// the first bad scale of a version-3 file: its tensor (returned; -1 when
// every scale is good), its index *at in the tensor's scales and its value
static inline int model_file_bad_scale(const ModelFile *f, const ParamTable *p, size_t *at, float *value) {
    size_t *offset = (size_t *)mallocCheck(p->n_tensors * sizeof(size_t));
    tensor_file_offsets(offset, p, f->version, f->group);
    int found = -1;
    for (int i = 0; i < p->n_tensors && found < 0; i++) {
        if (!tensor_quantized(&p->tensors[i])) continue;
        const float *s = (const float *)(f->data + offset[i]);
        size_t n = tensor_numel(&p->tensors[i]) / f->group;
        int bad = 0;
        for (size_t j = 0; j < n; j++) bad |= !int8_scale_ok(s[j]);  // one pass without a branch
        for (size_t j = 0; bad && j < n; j++)
            if (!int8_scale_ok(s[j])) {
                found = i, *at = j, *value = s[j];
                break;
            }
    }
    free(offset);
    return found;
}

static inline void model_file_unmap(ModelFile *f) {
    if (f->data && munmap((void *)f->data, f->bytes) != 0) die("%s: munmap failed: %s", f->path, strerror(errno));
    f->data = NULL;
}

// maps model file PATH, checked as model_header_read says and, in version 3,
// every scale; exits with a message naming PATH on any problem. (The int8
// values are read only as the model uses them: a -128, which no writer
// makes, decodes to s * -128.)
static inline void model_file_map(ModelFile *f, const char *path) {
    FILE *fp = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    f->path = path;
    f->bytes = (size_t)model_header_read(fp, path, h, &f->c, &f->version, &f->group);
    void *data = mmap(NULL, f->bytes, PROT_READ, MAP_PRIVATE, fileno(fp), 0);
    if (data == MAP_FAILED) die("%s: cannot map its %zu bytes: %s", path, f->bytes, strerror(errno));
    fcloseCheck(fp, path);  // the mapping stays
    f->data = (const unsigned char *)data;
    if (f->version != MODEL_INT8) return;
    ParamTable p;
    param_table_build(&p, &f->c);
    size_t at;
    float bad;
    int t = model_file_bad_scale(f, &p, &at, &bad);
    if (t >= 0) {
        char name[sizeof(p.tensors[t].name)];
        memcpy(name, p.tensors[t].name, sizeof(name));
        param_table_free(&p);
        model_file_unmap(f);
        die("%s: tensor %s: scale %zu is %g; a scale is >= 0 with s*127 finite", path, name, at, bad);
    }
    param_table_free(&p);
}

// the model file of c and params to f, an atomic_open'd tmp
static inline void model_file_write(FILE *f, const char *tmp, const Config *c, const float *params) {
    int32_t h[HEADER_INTS];
    config_to_header(c, h);
    fwriteCheck(h, sizeof(int32_t), HEADER_INTS, f, tmp);
    fwriteCheck(params, sizeof(float), config_n_params(c), f, tmp);
}

static inline void model_file_save(const char *path, const Config *c, const float *params) {
    char tmp[MAX_PATH_BYTES];
    FILE *f = atomic_open(path, tmp, sizeof(tmp));
    model_file_write(f, tmp, c, params);
    atomic_commit(f, tmp, path);
}

// ----------------------------------------------------------------------------
// 6. sampling, shared by train.c and run.c

// the index of the largest of v (n), the first on ties
static inline int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) best = v[i] > v[best] ? i : best;
    return best;
}

typedef struct {
    float p;
    int id;
} ProbIndex;

// qsort order of top-p: probability descending, then id ascending
static inline int prob_index_desc(const void *a, const void *b) {
    const ProbIndex *x = (const ProbIndex *)a, *y = (const ProbIndex *)b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

// topp of a Sampler that keeps the whole distribution and draws from it in id
// order, without sorting (train's samples)
#define TOPP_OFF 0.0f

// draws token ids 0..n-1 from logits: temp 0 is greedy (the argmax, no draw);
// else the softmax of logits / temp, cut to the smallest head of the sorted
// probabilities whose mass reaches topp (0 < topp <= 1: nucleus sampling) or
// kept whole (TOPP_OFF), then one uniform draw of rng
typedef struct {
    int n;
    float temp, topp;
    Rng rng;
    ProbIndex *probs;  // (n) scratch
} Sampler;

// probs (n) <- {exp((logits - max) / temp), id}; returns their sum
static inline float sampler_softmax(Sampler *s, const float *logits) {
    float maxl = logits[argmax(logits, s->n)], sum = 0.0f;
    for (int v = 0; v < s->n; v++) {
        s->probs[v].p = expf((logits[v] - maxl) / s->temp);
        s->probs[v].id = v;
        sum += s->probs[v].p;
    }
    return sum;
}

// the id at which the cumulative mass of probs[0..n) passes coin (the last if
// rounding leaves coin beyond it)
static inline int sampler_draw(const ProbIndex *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i].p;
        if (coin < cdf) return probs[i].id;
    }
    return probs[n - 1].id;
}

static inline int sample_token(Sampler *s, const float *logits) {
    if (s->temp == 0.0f) return argmax(logits, s->n);
    float sum = sampler_softmax(s, logits);
    if (s->topp == TOPP_OFF) return sampler_draw(s->probs, s->n, rng_uniform(&s->rng) * sum);
    qsort(s->probs, s->n, sizeof(ProbIndex), prob_index_desc);
    int head = 0;  // the smallest head of the sorted list whose mass reaches topp
    float mass = 0.0f;
    while (head < s->n && (head == 0 || mass < s->topp * sum)) mass += s->probs[head++].p;
    return sampler_draw(s->probs, head, rng_uniform(&s->rng) * mass);
}

#ifdef __cplusplus
}
#endif
#endif  // OPENMOE_H
