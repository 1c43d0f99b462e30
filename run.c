// run.c: generates text from a model file with a KV cache (either backend:
// run, run_gpu), scores a token file, and the tokenizer's command-line modes.
//
//   ./run MODEL.bin -z TOK.bin -i "And God said" -n 200 -t 0.8 -p 0.9 -s 42
//   ./run MODEL.bin --score TOKENS.bin    the mean cross-entropy of a token file
//   ./run -z TOK.bin --encode < text     one line of ids per line, as spm_encode
//   ./run -z TOK.bin --decode < ids      text, as spm_decode
//
// The model file, of any version (SPEC §6, §11: fp32, bf16, int8 in groups),
// is mapped and read in place (model_file_map, model_set_weights): one copy
// of the weights, the file's pages, which the OS reads as they are used. The
// model's KV cache holds the prompt and the tokens asked for (-n), not the
// whole context.
//
// The prompt runs as one forward pass (model_prefill), then each new token
// alone (model_decode, a routing group of one, which capacity never drops).
// The prompt is routed token by token as decoding routes, or, for an
// imported OpenMoE model, as ColossalAI's generate routes it: one group at
// capacity colossalai (SPEC §9). --verify checks greedy output against the
// argmax of one full forward pass over the same tokens, routed alike (the
// prompt as prefilled, each generated token its own group), and (CPU) the
// logits of every position prefill and decode computed against that pass
// bit for bit.
//
// An imported OpenMoE model (dev/import_openmoe.py) is recognised by its
// tokenizer: umT5's has <pad> at id 0 and no BOS. Then the prompt starts with
// id 0 (OpenMoE's start token; -b chooses another) instead of EOS, and
// generation stops at EOS, or at the chat model's three pieces "▁</" "s" ">".
// A tokenizer may have fewer pieces than the model's vocabulary (umT5: 256000
// of 256384); ids at or above its size are never sampled.
#include "openmoe.h"
#include "tokenizer.h"

// flag range of the temperature
#define MAX_TEMPERATURE 100.0

// ----------------------------------------------------------------------------

static void usage(int status) {
    fprintf(status ? stderr : stdout,
            "usage: ./run MODEL.bin [options]      generate text\n"
            "       ./run MODEL.bin --score FILE    mean cross-entropy of a token data file\n"
            "       ./run -z TOK.bin --encode       stdin text -> one line of ids per line (as spm_encode)\n"
            "       ./run -z TOK.bin --decode       stdin ids -> text (as spm_decode)\n"
            "  -z FILE   tokenizer (data/kjv/tokenizer.bin)\n"
            "  -i TEXT   prompt, read after an EOS as a verse start (empty: generate from EOS)\n"
            "  -b ID     the id the prompt starts with (-1: none); default EOS, or 0 (<pad>) for an\n"
            "            imported OpenMoE model, whose tokenizer has <pad> at id 0 and no BOS;\n"
            "            such a model also stops generating at EOS\n"
            "  -n N      tokens to generate (200)\n"
            "  -t T      temperature, 0 = greedy (0.8)\n"
            "  -p P      top-p (0.9)\n"
            "  -s SEED   sampling seed (42)\n"
            "  -g CF     capacity factor (2.0; a token routed alone is never dropped)\n"
            "  --prompt-routing group|token\n"
            "            the prompt's routing in its forward pass: one group (capacity colossalai\n"
            "            for an imported OpenMoE model, as ColossalAI's generate; the default for\n"
            "            one) or each token alone, as decoding (the default otherwise)\n"
            "  --verify  with -t 0: check each generated token against the argmax of a\n"
            "            full forward pass over the same tokens, and (CPU) every position's\n"
            "            logits against that pass bit for bit (exit 1 on a mismatch)\n"
            "  --ids     print the token ids (prompt included) instead of text\n"
            "  --score FILE  with -T LEN: the mean cross-entropy of FILE's tokens (a token data\n"
            "            file), in windows of LEN tokens (the context) each predicting its next,\n"
            "            routed as validation is (capacity factor -g, groups of 4096)\n");
    exit(status);
}

// ----------------------------------------------------------------------------
// flags

#define START_BY_TOKENIZER -2  // RunArgs.start: EOS, BOS or OpenMoE's 0, as the tokenizer says
enum { ROUTE_BY_MODEL = -1, ROUTE_TOKEN = 0, ROUTE_GROUP = 1 };  // RunArgs.prompt_routing

typedef struct {
    const char *model_path, *tok_path, *prompt, *score_path;
    int steps, encode, decode, verify, print_ids;
    int start;           // the id the prompt starts with, -1: none
    int prompt_routing;  // ROUTE_*
    int score_len;       // --score's window, 0: the context
    float temp, topp, cf;
    uint64_t seed;
} RunArgs;

static void args_default(RunArgs *a) {
    a->model_path = a->score_path = NULL;
    a->tok_path = "data/kjv/tokenizer.bin";
    a->prompt = "";
    a->steps = 200;
    a->encode = a->decode = a->verify = a->print_ids = 0;
    a->start = START_BY_TOKENIZER;
    a->prompt_routing = ROUTE_BY_MODEL;
    a->score_len = 0;
    a->temp = 0.8f;
    a->topp = 0.9f;
    a->cf = 2.0f;
    a->seed = 42;
}

static void args_parse(RunArgs *a, int argc, char **argv) {
    args_default(a);
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) usage(0);
        else if (strcmp(f, "--encode") == 0) a->encode = 1;
        else if (strcmp(f, "--decode") == 0) a->decode = 1;
        else if (strcmp(f, "--verify") == 0) a->verify = 1;
        else if (strcmp(f, "--ids") == 0) a->print_ids = 1;
        else if (strcmp(f, "--score") == 0 && i + 1 < argc) a->score_path = flag_path(f, argv[++i]);
        else if (strcmp(f, "--prompt-routing") == 0 && i + 1 < argc) {
            const char *v = argv[++i];
            if (strcmp(v, "group") == 0) a->prompt_routing = ROUTE_GROUP;
            else if (strcmp(v, "token") == 0) a->prompt_routing = ROUTE_TOKEN;
            else die("--prompt-routing %s: needs group or token", v);
        } else if (f[0] != '-') {
            if (a->model_path) die("two model files given: %s and %s", a->model_path, f);
            a->model_path = f;
        } else if (strlen(f) == 2 && i + 1 < argc) {
            const char *v = argv[++i];
            switch (f[1]) {
            case 'z': a->tok_path = flag_path(f, v); break;
            case 'b': a->start = (int)flag_int(f, v, -1, INT32_MAX); break;
            case 'i': a->prompt = v; break;
            case 'n': a->steps = (int)flag_int(f, v, 0, INT32_MAX); break;
            case 't': a->temp = (float)flag_float(f, v, 0.0, 0, MAX_TEMPERATURE); break;
            case 'p': a->topp = (float)flag_float(f, v, 0.0, 1, 1.0); break;
            case 's': a->seed = (uint64_t)flag_int(f, v, 0, INT64_MAX); break;
            case 'g': a->cf = (float)flag_float(f, v, MIN_CF, 0, MAX_CF); break;
            case 'T': a->score_len = (int)flag_int(f, v, 1, MAX_SEQ_LEN); break;
            default: fprintf(stderr, "error: unknown option '%s'\n", f); usage(2);
            }
        } else {
            fprintf(stderr, "error: unknown or incomplete option '%s'\n", f);
            usage(2);
        }
    }
}

// --encode, --decode: stdin to stdout through the tokenizer alone
static int tokenizer_mode(const RunArgs *a) {
    Tokenizer tok;
    tokenizer_load(&tok, a->tok_path);
    if (a->encode) tokenizer_encode_stream(&tok, stdin, stdout);
    else tokenizer_decode_stream(&tok, stdin, stdout);
    tokenizer_free(&tok);
    return 0;
}

// the flags of a generating or scoring run, which the tokenizer modes do not need
static void generation_args_check(const RunArgs *a) {
    if (!a->model_path) {
        fprintf(stderr, "error: no model file given\n");
        usage(2);
    }
    if (a->verify && a->temp != 0.0f) die("--verify needs greedy decoding (-t 0)");
    if (a->score_len && !a->score_path) die("-T %d: only --score takes a window length", a->score_len);
}

// ----------------------------------------------------------------------------
// generation: the prompt in one forward pass, then one sampled token a step

typedef struct {
    Config c;
    ModelFile file;      // the model file, mapped
    Model *m;
    Tokenizer tok;
    int openmoe;         // an imported OpenMoE model: umT5's tokenizer
    int chat_eos_id[3];  // its chat model's end "▁</" "s" ">", -1 for a piece the tokenizer lacks
    int start;           // the id the prompt starts with, -1: none
    int32_t *tokens;     // the prompt (n_prompt), then the generated tokens, n in all
    int n_prompt, n, steps;
    int first_text;      // the next piece printed is the text's first: it loses its dummy-prefix space
    MoeSettings route;   // the routing of the prompt's forward and of --verify's
    Sampler sampler;
    uint64_t *digest;    // --verify: the hash of each position's logits, else NULL
    double prefill_s, decode_s;
} Generation;

// the tokenizer, checked against the model, and what it says of the model's origin
static void tokenizer_open(Generation *g, const RunArgs *a) {
    tokenizer_load(&g->tok, a->tok_path);
    if (g->tok.vocab_size > g->c.V)
        die("%s: the tokenizer has %d pieces, more than %s's vocabulary %d", a->tok_path, g->tok.vocab_size,
            a->model_path, g->c.V);
    if (a->start >= g->c.V) die("-b %d: not an id of %s's vocabulary %d", a->start, a->model_path, g->c.V);
    g->openmoe = g->tok.pad_id == 0 && g->tok.bos_id < 0;
    const char *chat_eos[3] = {"\xe2\x96\x81</", "s", ">"};  // "▁</" "s" ">"
    for (int k = 0; k < 3; k++) g->chat_eos_id[k] = tok_piece_id(&g->tok, chat_eos[k], strlen(chat_eos[k]));
}

// the prompt: the start id, then its pieces. By default EOS, which ends every
// verse of the training data and so is what a verse follows (BOS when the
// tokenizer has no EOS), or OpenMoE's 0. tokens gets room for the prompt and
// the steps, which are cut to the context
static void prompt_encode(Generation *g, const RunArgs *a) {
    int max_len = g->c.max_seq_len;
    int room = 16 * (int)strlen(a->prompt) + 16;  // NFKC can expand a character, byte fallback splits it
    int32_t *prompt = (int32_t *)mallocCheck((size_t)(room + 1) * sizeof(int32_t));
    g->start = a->start;
    if (g->start == START_BY_TOKENIZER) g->start = g->openmoe ? 0 : g->tok.eos_id >= 0 ? g->tok.eos_id : g->tok.bos_id;
    g->n_prompt = 0;
    if (g->start >= 0) prompt[g->n_prompt++] = g->start;
    g->n_prompt += tokenizer_encode(&g->tok, a->prompt, strlen(a->prompt), prompt + g->n_prompt, room);
    if (g->n_prompt == 0) die("the prompt is empty and the tokenizer has no EOS or BOS to start from");
    if (g->n_prompt > max_len) die("the prompt is %d tokens, longer than the model's context %d", g->n_prompt, max_len);
    g->n = g->n_prompt;
    g->first_text = 1;
    g->steps = a->steps;
    if (g->steps > max_len - g->n_prompt) {
        fprintf(stderr, "note: -n %d with a %d-token prompt exceeds the context %d: generating %d tokens\n", g->steps,
                g->n_prompt, max_len, max_len - g->n_prompt);
        g->steps = max_len - g->n_prompt;
    }
    size_t len = (size_t)g->n_prompt + g->steps;
    g->tokens = (int32_t *)mallocCheck(len * sizeof(int32_t));
    memcpy(g->tokens, prompt, g->n_prompt * sizeof(int32_t));
    free(prompt);
    g->digest = a->verify ? (uint64_t *)mallocCheck(len * sizeof(uint64_t)) : NULL;
}

// How the prompt is routed in its forward pass (SPEC §9): as ColossalAI's
// generate routes an imported OpenMoE model's, one group at capacity
// colossalai; token by token (groups of one) as decoding, for a model of this
// project; --prompt-routing chooses. The generated tokens are groups of one.
static MoeSettings prompt_routing(const Generation *g, const RunArgs *a) {
    MoeSettings s = moe_settings_default();
    s.cf1000 = (int)lrintf(a->cf * 1000);
    s.group_size = 1;
    if (g->openmoe) s.capacity_rule = CAP_COLOSSALAI;
    int one_group = a->prompt_routing == ROUTE_BY_MODEL ? g->openmoe : a->prompt_routing == ROUTE_GROUP;
    s.first_group = one_group ? g->n_prompt : 0;
    return s;
}

// a model for one sequence of up to T tokens over the weights of f, mapped
static Model *model_open(const ModelFile *f, int T) {
    Model *m = model_create(&f->c, 1, T, model_file_precision(f->version), NULL);
    model_set_weights(m, f);
    return m;
}

// the model, its tokenizer, the prompt and the sampler
static void generation_load(Generation *g, const RunArgs *a) {
    model_file_map(&g->file, a->model_path);
    g->c = g->file.c;
    tokenizer_open(g, a);
    prompt_encode(g, a);
    g->route = prompt_routing(g, a);
    g->m = model_open(&g->file, g->n_prompt + g->steps);
    g->sampler.n = g->tok.vocab_size;  // ids at or above the tokenizer's size are never sampled
    g->sampler.temp = a->temp;
    g->sampler.topp = a->topp;
    g->sampler.rng.s = a->seed;
    g->sampler.probs = (ProbIndex *)mallocCheck(g->c.V * sizeof(ProbIndex));
}

static void generation_free(Generation *g) {
    free(g->digest);
    free(g->sampler.probs);
    free(g->tokens);
    tokenizer_free(&g->tok);
    model_free(g->m);
    model_file_unmap(&g->file);
}

// the prompt as text, without its start id
static void prompt_print(Generation *g) {
    for (int i = g->start >= 0; i < g->n_prompt; i++) {
        size_t len;
        const char *piece = tokenizer_piece_text(&g->tok, g->tokens[i], g->first_text, &len);
        fwrite(piece, 1, len, stdout);
        g->first_text = 0;
    }
}

// a generated token as text; EOS ends a verse: a new line
static void piece_print(Generation *g, int token) {
    size_t len = 1;
    const char *piece = token == g->tok.eos_id ? "\n" : tokenizer_piece_text(&g->tok, token, g->first_text, &len);
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    g->first_text = token == g->tok.eos_id;
}

// whether an OpenMoE chat model has just written its end "▁</" "s" ">"
static int chat_ended(const Generation *g) {
    if (!g->openmoe || g->n - g->n_prompt < 3 || g->chat_eos_id[0] < 0) return 0;
    const int32_t *t = g->tokens + g->n - 3;
    return t[0] == g->chat_eos_id[0] && t[1] == g->chat_eos_id[1] && t[2] == g->chat_eos_id[2];
}

// the prompt in one forward pass, then up to steps sampled tokens, each
// printed (unless print_ids) and fed back; an OpenMoE model also stops at
// EOS and at its chat end
static void generate(Generation *g, int print_ids) {
    if (g->steps == 0) return;
    double t0 = wall_seconds();
    const float *logits = model_prefill(g->m, g->tokens, g->n_prompt, &g->route);
    g->prefill_s = wall_seconds() - t0;
    t0 = wall_seconds();
    for (;;) {
        if (g->digest) g->digest[g->n - 1] = hash_bytes(FNV_BASIS, logits, (size_t)g->c.V * sizeof(float));
        int next = sample_token(&g->sampler, logits);
        g->tokens[g->n++] = next;
        if (g->openmoe && next == g->tok.eos_id) break;
        if (!print_ids) piece_print(g, next);
        if (chat_ended(g) || g->n == g->n_prompt + g->steps) break;
        logits = model_decode(g->m, next, g->n - 1);
    }
    g->decode_s = wall_seconds() - t0;
}

// --verify: one forward over tokens 0..n-2, routed as generation was (the
// prompt as prefilled, each generated token its own group); its argmax over
// the ids generation samples (the tokenizer's, when it has fewer than the
// model) must give every generated token and (where model_decode_bitwise) its
// logits at positions n_prompt-1..n-2 those of prefill and decode bit for bit
// (compared through their hashes). Returns the exit status, 1 on a mismatch
static int verify(Generation *g) {
    int n = g->n, V = g->c.V;
    float losses[N_LOSSES];
    Batch batch = {g->tokens, NULL, NULL, NULL, 1, n - 1, 0.0};
    model_forward(g->m, &batch, &g->route, losses);
    float *all = (float *)mallocCheck((size_t)(n - 1) * V * sizeof(float));
    model_get_logits(g->m, all);
    int match = 0, same = 0;
    uint64_t all_hash = FNV_BASIS;  // of decode's logits, to compare runs byte for byte (t_model_files.sh)
    for (int p = g->n_prompt - 1; p < n - 1; p++) {
        match += argmax(all + (size_t)p * V, g->sampler.n) == g->tokens[p + 1];
        same += hash_bytes(FNV_BASIS, all + (size_t)p * V, (size_t)V * sizeof(float)) == g->digest[p];
        all_hash = hash_bytes(all_hash, &g->digest[p], sizeof(uint64_t));
    }
    int generated = n - g->n_prompt;
    printf("verify: %d/%d positions match; logits bit-identical at %d/%d positions; their hash %016llx\n", match,
           generated, same, generated, (unsigned long long)all_hash);
    free(all);
    return match == generated && (same == generated || !model_decode_bitwise) ? 0 : 1;
}

// ----------------------------------------------------------------------------
// --score: the mean cross-entropy of a token data file (tokenizer.bin-spec
// section 2: the header, then the ids as uint16 or int32)

// the tokens of PATH (malloc'd, *n of them), checked against the vocabulary V
static int32_t *tokens_read(const char *path, int V, long *n) {
    FILE *f = fopenCheck(path, "rb");
    int32_t h[HEADER_INTS];
    long size = header_read(f, path, "token data", TOKENS_MAGIC, 5, h);
    int bytes = h[2];
    *n = h[4];
    if ((bytes != 2 && bytes != 4) || h[3] <= 0 || *n <= 0)
        die("%s: bad header: %d bytes per token, vocab %d, %ld tokens", path, bytes, h[3], *n);
    if ((uint64_t)size != size_add(HEADER_BYTES, size_mul(*n, bytes)))
        die("%s: size %ld bytes, but its header describes %ld tokens of %d bytes", path, size, *n, bytes);
    int32_t *t = (int32_t *)mallocCheck(*n * sizeof(int32_t));
    if (bytes == 4) {
        freadCheck(t, 4, *n, f, path);
    } else {
        uint16_t *u = (uint16_t *)mallocCheck(*n * sizeof(uint16_t));
        freadCheck(u, 2, *n, f, path);
        for (long i = 0; i < *n; i++) t[i] = u[i];
        free(u);
    }
    fcloseCheck(f, path);
    for (long i = 0; i < *n; i++)
        if (t[i] < 0 || t[i] >= V) die("%s: token %ld is %d, outside the model's vocabulary [0, %d)", path, i, t[i], V);
    return t;
}

// the windows of T+1 tokens at 0, T, 2T, ... (the rest, shorter, left out),
// each one forward with targets, routed as train's validation (groups of
// 4096, capacity factor -g); prints the mean over the windows
static int score(const RunArgs *a) {
    ModelFile f;
    model_file_map(&f, a->model_path);
    long n;
    int32_t *tokens = tokens_read(a->score_path, f.c.V, &n);
    int T = a->score_len ? a->score_len : f.c.max_seq_len;
    if (T > f.c.max_seq_len) die("-T %d: longer than %s's context %d", T, a->model_path, f.c.max_seq_len);
    long windows = (n - 1) / T;
    if (windows < 1) die("%s: %ld tokens, fewer than one window of %d and its next token", a->score_path, n, T);
    Model *m = model_open(&f, T);
    MoeSettings s = moe_settings_default();
    s.cf1000 = (int)lrintf(a->cf * 1000);
    double ce = 0.0;
    float losses[N_LOSSES];
    for (long w = 0; w < windows; w++) {
        Batch batch = {tokens + w * T, tokens + w * T + 1, NULL, NULL, 1, T, 0.0};
        model_forward(m, &batch, &s, losses);
        ce += losses[LOSS_CE];
    }
    printf("score: %s: %ld windows of %d tokens, cross-entropy %.6f\n", a->score_path, windows, T, ce / windows);
    model_free(m);
    model_file_unmap(&f);
    free(tokens);
    return 0;
}

// ----------------------------------------------------------------------------

int main(int argc, char **argv) {
    RunArgs a;
    args_parse(&a, argc, argv);
    if (a.encode || a.decode) return tokenizer_mode(&a);
    generation_args_check(&a);
    if (a.score_path) return score(&a);
    Generation g;
    memset(&g, 0, sizeof(g));
    generation_load(&g, &a);
    if (!a.print_ids) prompt_print(&g);
    fflush(stdout);
    generate(&g, a.print_ids);
    for (int i = 0; i < g.n && a.print_ids; i++) printf(i ? " %d" : "%d", g.tokens[i]);
    printf("\n");
    int made = g.n - g.n_prompt;
    fprintf(stderr, "prompt: %d tokens in %.2f s (%.1f tokens/s); generated: %d tokens in %.2f s (%.1f tokens/s)\n",
            g.n_prompt, g.prefill_s, g.prefill_s > 0 ? g.n_prompt / g.prefill_s : 0.0, made, g.decode_s,
            g.decode_s > 0 ? made / g.decode_s : 0.0);
    int status = a.verify && made > 0 ? verify(&g) : 0;
    generation_free(&g);
    return status;
}
