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
#include <time.h>

// flag range of the temperature
#define MAX_TEMPERATURE 100.0

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// ----------------------------------------------------------------------------
// sampling: temperature, then top-p (nucleus) over the sorted probabilities

typedef struct {
    float p;
    int id;
} ProbIndex;

static int cmp_prob_desc(const void *a, const void *b) {
    const ProbIndex *x = (const ProbIndex *)a, *y = (const ProbIndex *)b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) best = v[i] > v[best] ? i : best;
    return best;
}

// logits (V) -> a token; temp 0 is greedy. sorted (V) scratch
static int sample(const float *logits, int V, float temp, float topp, Rng *rng, ProbIndex *sorted) {
    if (temp == 0.0f) return argmax(logits, V);
    float maxl = logits[argmax(logits, V)], sum = 0.0f;
    for (int v = 0; v < V; v++) {
        sorted[v].p = expf((logits[v] - maxl) / temp);
        sorted[v].id = v;
        sum += sorted[v].p;
    }
    qsort(sorted, V, sizeof(ProbIndex), cmp_prob_desc);
    int n = 0;  // the smallest head of the sorted list whose mass reaches topp
    float mass = 0.0f;
    while (n < V && (n == 0 || mass < topp * sum)) mass += sorted[n++].p;
    float coin = rng_uniform(rng) * mass, cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += sorted[i].p;
        if (coin < cdf) return sorted[i].id;
    }
    return sorted[n - 1].id;
}

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

int main(int argc, char **argv) {
    const char *model_path = NULL, *tok_path = "data/kjv/tokenizer.bin", *prompt = "";
    int steps = 200, encode = 0, decode = 0, verify = 0, print_ids = 0, start = -2;  // -2: by the tokenizer
    float temp = 0.8f, topp = 0.9f, cf = 2.0f;
    uint64_t seed = 42;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) usage(0);
        else if (strcmp(a, "--encode") == 0) encode = 1;
        else if (strcmp(a, "--decode") == 0) decode = 1;
        else if (strcmp(a, "--verify") == 0) verify = 1;
        else if (strcmp(a, "--ids") == 0) print_ids = 1;
        else if (a[0] != '-') {
            if (model_path) die("two model files given: %s and %s", model_path, a);
            model_path = a;
        } else if (strlen(a) == 2 && i + 1 < argc) {
            const char *v = argv[++i];
            switch (a[1]) {
            case 'z': tok_path = flag_path(a, v); break;
            case 'b': start = (int)flag_int(a, v, -1, INT32_MAX); break;
            case 'i': prompt = v; break;
            case 'n': steps = (int)flag_int(a, v, 0, INT32_MAX); break;
            case 't': temp = (float)flag_float(a, v, 0.0, 0, MAX_TEMPERATURE); break;
            case 'p': topp = (float)flag_float(a, v, 0.0, 1, 1.0); break;
            case 's': seed = (uint64_t)flag_int(a, v, 0, INT64_MAX); break;
            case 'g': cf = (float)flag_float(a, v, MIN_CF, 0, MAX_CF); break;
            default: fprintf(stderr, "error: unknown option '%s'\n", a); usage(2);
            }
        } else {
            fprintf(stderr, "error: unknown or incomplete option '%s'\n", a);
            usage(2);
        }
    }
    Tokenizer tok;
    if (encode || decode) {
        tokenizer_load(&tok, tok_path);
        if (encode) tokenizer_encode_stream(&tok, stdin, stdout);
        else tokenizer_decode_stream(&tok, stdin, stdout);
        tokenizer_free(&tok);
        return 0;
    }
    if (!model_path) {
        fprintf(stderr, "error: no model file given\n");
        usage(2);
    }
    if (verify && temp != 0.0f) die("--verify needs greedy decoding (-t 0)");

    Config c;
    float *params = model_file_load(model_path, &c);
    tokenizer_load(&tok, tok_path);
    if (tok.vocab_size > c.V) die("%s: the tokenizer has %d pieces, more than %s's vocabulary %d", tok_path, tok.vocab_size, model_path, c.V);
    if (start >= c.V) die("-b %d: not an id of %s's vocabulary %d", start, model_path, c.V);
    int openmoe = tok.pad_id == 0 && tok.bos_id < 0;  // umT5's layout: an imported OpenMoE model
    const char *chat_eos[3] = {"\xe2\x96\x81</", "s", ">"};   // "▁</" "s" ">"
    int chat_eos_id[3];
    for (int k = 0; k < 3; k++) chat_eos_id[k] = tok_piece_id(&tok, chat_eos[k], strlen(chat_eos[k]));

    // the prompt: the start id, then its pieces. By default EOS, which ends
    // every verse of the training data and so is what a verse follows (BOS
    // when the tokenizer has no EOS), or OpenMoE's 0
    int max_len = c.max_seq_len;
    int room = 16 * (int)strlen(prompt) + 16;  // NFKC can expand a character, byte fallback splits it
    int32_t *tokens = (int32_t *)mallocCheck((size_t)(max_len + room + 1) * sizeof(int32_t));
    if (start == -2) start = openmoe ? 0 : tok.eos_id >= 0 ? tok.eos_id : tok.bos_id;
    int n_prompt = 0;
    if (start >= 0) tokens[n_prompt++] = start;
    n_prompt += tokenizer_encode(&tok, prompt, strlen(prompt), tokens + n_prompt, room);
    if (n_prompt == 0) die("the prompt is empty and the tokenizer has no EOS or BOS to start from");
    if (n_prompt > max_len) die("the prompt is %d tokens, longer than the model's context %d", n_prompt, max_len);
    if (steps > max_len - n_prompt) {
        fprintf(stderr, "note: -n %d with a %d-token prompt exceeds the context %d: generating %d tokens\n", steps,
                n_prompt, max_len, max_len - n_prompt);
        steps = max_len - n_prompt;
    }

    // a verifying run also needs activations for one full sequence
    Model *m = model_create(&c, 1, verify ? max_len : 1, PRECISION_FP32, NULL);
    model_set_params(m, params);
    free(params);  // the model holds its own copy: do not keep two of a large model
    ProbIndex *sorted = (ProbIndex *)mallocCheck(c.V * sizeof(ProbIndex));
    Rng rng = {seed};
    int first_text = 1;  // the first piece printed loses its dummy-prefix space
    for (int i = start >= 0; i < n_prompt && !print_ids; i++) {
        size_t len;
        const char *piece = tokenizer_piece_text(&tok, tokens[i], first_text, &len);
        fwrite(piece, 1, len, stdout);
        first_text = 0;
    }
    fflush(stdout);
    // --verify compares decode's logits with the forward's bit for bit through their hashes
    uint64_t *digest = verify ? (uint64_t *)mallocCheck((size_t)(max_len + room) * sizeof(uint64_t)) : NULL;
    double t0 = now();
    int n = n_prompt;
    for (int pos = 0; n < n_prompt + steps; pos++) {
        const float *logits = model_decode(m, tokens[pos], pos);
        if (verify) digest[pos] = hash_bytes(FNV_BASIS, logits, (size_t)c.V * sizeof(float));
        if (pos + 1 < n) continue;  // still reading the prompt
        int next = sample(logits, tok.vocab_size, temp, topp, &rng, sorted);
        tokens[n++] = next;
        if (openmoe && next == tok.eos_id) break;
        if (!print_ids) {
            size_t len = 1;  // EOS ends a verse: a new line
            const char *piece = next == tok.eos_id ? "\n" : tokenizer_piece_text(&tok, next, first_text, &len);
            fwrite(piece, 1, len, stdout);
            fflush(stdout);
            first_text = next == tok.eos_id;
        }
        if (openmoe && n - n_prompt >= 3 && chat_eos_id[0] >= 0 && tokens[n - 3] == chat_eos_id[0] &&
            tokens[n - 2] == chat_eos_id[1] && tokens[n - 1] == chat_eos_id[2])
            break;
    }
    double secs = now() - t0;
    for (int i = 0; i < n && print_ids; i++) printf(i ? " %d" : "%d", tokens[i]);
    printf("\n");
    fprintf(stderr, "%d tokens (%d prompt, %d generated) in %.2f s: %.1f tokens/s\n", n, n_prompt, n - n_prompt, secs,
            n / secs);

    int status = 0;
    if (verify && n > n_prompt) {
        // one forward over tokens 0..n-2, each token its own routing group, as in model_decode
        MoeSettings s = moe_settings_default();
        s.cf1000 = (int)lrintf(cf * 1000);
        s.group_size = 1;
        float losses[N_LOSSES];
        model_forward(m, tokens, NULL, 1, n - 1, &s, losses);
        float *all = (float *)mallocCheck((size_t)(n - 1) * c.V * sizeof(float));
        model_get_logits(m, all);
        int match = 0, same = 0;
        for (int p = n_prompt - 1; p < n - 1; p++) match += argmax(all + (size_t)p * c.V, c.V) == tokens[p + 1];
        for (int p = 0; p < n - 1; p++)
            same += hash_bytes(FNV_BASIS, all + (size_t)p * c.V, (size_t)c.V * sizeof(float)) == digest[p];
        printf("verify: %d/%d positions match; logits bit-identical at %d/%d positions\n", match, n - n_prompt, same,
               n - 1);
        status = match == n - n_prompt && (same == n - 1 || !model_decode_bitwise) ? 0 : 1;
        free(all);
    }
    free(digest);
    free(sorted);
    free(tokens);
    tokenizer_free(&tok);
    model_free(m);
    return status;
}
