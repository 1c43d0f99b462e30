// run.c: generates text from a trained model with a KV cache (either backend:
// run, run_gpu), and the tokenizer's command-line modes.
//
//   ./run MODEL.bin -z TOK.bin -i "And God said" -n 200 -t 0.8 -p 0.9 -s 42
//   ./run -z TOK.bin --encode < text     one line of ids per line, as spm_encode
//   ./run -z TOK.bin --decode < ids      text, as spm_decode
//
// Each token is routed on its own (a group of one), as model_decode does, so
// capacity never drops a token at generation time. --verify checks greedy
// output against the argmax of one full forward pass over the same tokens,
// and the logits of every position against that pass bit for bit.
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
            "  --verify  with -t 0: check each generated token against the argmax of a\n"
            "            full forward pass over the same tokens, and (CPU) every position's\n"
            "            logits against that pass bit for bit (exit 1 on a mismatch)\n"
            "  --ids     print the token ids (prompt included) instead of text\n");
    exit(status);
}

// ----------------------------------------------------------------------------
// flags

#define START_BY_TOKENIZER -2  // RunArgs.start: EOS, BOS or OpenMoE's 0, as the tokenizer says

typedef struct {
    const char *model_path, *tok_path, *prompt;
    int steps, encode, decode, verify, print_ids;
    int start;  // the id the prompt starts with, -1: none
    float temp, topp, cf;
    uint64_t seed;
} RunArgs;

static void args_default(RunArgs *a) {
    a->model_path = NULL;
    a->tok_path = "data/kjv/tokenizer.bin";
    a->prompt = "";
    a->steps = 200;
    a->encode = a->decode = a->verify = a->print_ids = 0;
    a->start = START_BY_TOKENIZER;
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
        else if (f[0] != '-') {
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

// the flags of a generating run, which the tokenizer modes do not need
static void generation_args_check(const RunArgs *a) {
    if (!a->model_path) {
        fprintf(stderr, "error: no model file given\n");
        usage(2);
    }
    if (a->verify && a->temp != 0.0f) die("--verify needs greedy decoding (-t 0)");
}

// ----------------------------------------------------------------------------
// generation: the prompt through the KV cache, then one sampled token a step

typedef struct {
    Config c;
    Model *m;
    Tokenizer tok;
    int openmoe;         // an imported OpenMoE model: umT5's tokenizer
    int chat_eos_id[3];  // its chat model's end "▁</" "s" ">", -1 for a piece the tokenizer lacks
    int start;           // the id the prompt starts with, -1: none
    int32_t *tokens;     // the prompt (n_prompt), then the generated tokens, n in all
    int n_prompt, n, steps;
    int first_text;      // the next piece printed is the text's first: it loses its dummy-prefix space
    Sampler sampler;
    uint64_t *digest;    // --verify: the hash of each position's logits, else NULL
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
// the context; steps is cut to the context
static void prompt_encode(Generation *g, const RunArgs *a) {
    int max_len = g->c.max_seq_len;
    int room = 16 * (int)strlen(a->prompt) + 16;  // NFKC can expand a character, byte fallback splits it
    g->tokens = (int32_t *)mallocCheck((size_t)(max_len + room + 1) * sizeof(int32_t));
    g->start = a->start;
    if (g->start == START_BY_TOKENIZER) g->start = g->openmoe ? 0 : g->tok.eos_id >= 0 ? g->tok.eos_id : g->tok.bos_id;
    g->n_prompt = 0;
    if (g->start >= 0) g->tokens[g->n_prompt++] = g->start;
    g->n_prompt += tokenizer_encode(&g->tok, a->prompt, strlen(a->prompt), g->tokens + g->n_prompt, room);
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
    g->digest = a->verify ? (uint64_t *)mallocCheck((size_t)(max_len + room) * sizeof(uint64_t)) : NULL;
}

// the model, its tokenizer, the prompt and the sampler
static void generation_load(Generation *g, const RunArgs *a) {
    float *params = model_file_load(a->model_path, &g->c);
    tokenizer_open(g, a);
    prompt_encode(g, a);
    // a verifying run also needs activations for one full sequence
    g->m = model_create(&g->c, 1, a->verify ? g->c.max_seq_len : 1, PRECISION_FP32, NULL);
    model_set_params(g->m, params);
    free(params);  // the model holds its own copy: do not keep two of a large model
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

// feeds the prompt, then samples up to steps tokens, printing each (unless
// print_ids); an OpenMoE model also stops at EOS and at its chat end
static void generate(Generation *g, int print_ids) {
    for (int pos = 0; g->n < g->n_prompt + g->steps; pos++) {
        const float *logits = model_decode(g->m, g->tokens[pos], pos);
        if (g->digest) g->digest[pos] = hash_bytes(FNV_BASIS, logits, (size_t)g->c.V * sizeof(float));
        if (pos + 1 < g->n) continue;  // still reading the prompt
        int next = sample_token(&g->sampler, logits);
        g->tokens[g->n++] = next;
        if (g->openmoe && next == g->tok.eos_id) break;
        if (!print_ids) piece_print(g, next);
        if (chat_ended(g)) break;
    }
}

// --verify: one forward over tokens 0..n-2, each token its own routing group
// as in model_decode; its argmax over the ids generation samples (the
// tokenizer's, when it has fewer than the model) must give every generated
// token and (where model_decode_bitwise) its logits those of decode bit for
// bit (compared through their hashes). Returns the exit status, 1 on a mismatch
static int verify(Generation *g, float cf) {
    int n = g->n, V = g->c.V;
    MoeSettings s = moe_settings_default();
    s.cf1000 = (int)lrintf(cf * 1000);
    s.group_size = 1;
    float losses[N_LOSSES];
    Batch batch = {g->tokens, NULL, NULL, NULL, 1, n - 1, 0.0};
    model_forward(g->m, &batch, &s, losses);
    float *all = (float *)mallocCheck((size_t)(n - 1) * V * sizeof(float));
    model_get_logits(g->m, all);
    int match = 0, same = 0;
    for (int p = g->n_prompt - 1; p < n - 1; p++)
        match += argmax(all + (size_t)p * V, g->sampler.n) == g->tokens[p + 1];
    for (int p = 0; p < n - 1; p++)
        same += hash_bytes(FNV_BASIS, all + (size_t)p * V, (size_t)V * sizeof(float)) == g->digest[p];
    printf("verify: %d/%d positions match; logits bit-identical at %d/%d positions\n", match, n - g->n_prompt, same,
           n - 1);
    free(all);
    return match == n - g->n_prompt && (same == n - 1 || !model_decode_bitwise) ? 0 : 1;
}

// ----------------------------------------------------------------------------

int main(int argc, char **argv) {
    RunArgs a;
    args_parse(&a, argc, argv);
    if (a.encode || a.decode) return tokenizer_mode(&a);
    generation_args_check(&a);
    Generation g;
    generation_load(&g, &a);
    if (!a.print_ids) prompt_print(&g);
    fflush(stdout);
    double t0 = wall_seconds();
    generate(&g, a.print_ids);
    double secs = wall_seconds() - t0;
    for (int i = 0; i < g.n && a.print_ids; i++) printf(i ? " %d" : "%d", g.tokens[i]);
    printf("\n");
    fprintf(stderr, "%d tokens (%d prompt, %d generated) in %.2f s: %.1f tokens/s\n", g.n, g.n_prompt,
            g.n - g.n_prompt, secs, g.n / secs);
    int status = a.verify && g.n > g.n_prompt ? verify(&g, a.cf) : 0;
    generation_free(&g);
    return status;
}
