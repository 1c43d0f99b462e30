// fuzz_targets.c: libFuzzer harnesses of every C reader of untrusted input,
// one per build (make build/fuzz/fuzz_NAME compiles this file with -DFUZZ_NAME;
// test/t_fuzz.sh makes their seeds and runs them):
//
//   model        a model file of any version (SPEC §6, §11), as run reads it:
//                model_file_map, model_create, model_set_weights, a forward of
//                2 tokens, a prefill of 1 and a decode step
//   tokenizer    a tokenizer file (tokenizer.bin-spec 1): tokenizer_load, then
//                a fixed text encoded and its ids decoded
//   text         any bytes through the fixed tokenizers: run's --encode and
//                --decode (the bytes as lines of text, then as lines of ids), and
//                the whole input encoded and decoded back
//   tokens       a token data file (tokenizer.bin-spec 2): train.c's tokens_load
//   checkpoint   a training state file beside a fixed model file: train.c's -r
//                (resume_step, checkpoint_resume) for a fixed run
//   debug_state  a debug state file (SPEC §7) of a fixed model: test_cpu's
//                check_state (the reader, one forward and backward)
//
// Each input is written to a file and read by the programs' own code:
// train.c and test/test_model.c are included here, their main renamed. With
// -DFUZZING die() calls fuzz_die (utils.h), which jumps back here; what the
// reader had allocated and opened by then is freed and closed, so that a
// refusal is a clean return, while LeakSanitizer still reports what a reader
// that returned has leaked. FUZZ_FILES (default build/fuzz/files) holds the fixed inputs; the
// input file lives in a directory of its own in /dev/shm (else TMPDIR or /tmp).
#include <sanitizer/common_interface_defs.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

// ----------------------------------------------------------------------------
// what a reader holds when die() jumps out: while `on`, every allocation and
// open file of the code below (the readers included) is recorded until freed

#define MAX_HELD 4096
#define MAX_HELD_FILES 16
static struct {
    int on;
    void *mem[MAX_HELD];
    int n_mem;
    FILE *file[MAX_HELD_FILES];
    int n_file;
} held;

static void held_fail(const char *what) {
    fprintf(stderr, "fuzz harness: more than %s held at once\n", what);
    abort();
}
static void *held_mem_add(void *p) {
    if (!p || !held.on) return p;
    if (held.n_mem == MAX_HELD) held_fail("MAX_HELD allocations");
    held.mem[held.n_mem++] = p;
    return p;
}
static void held_mem_drop(void *p) {
    for (int i = held.n_mem - 1; i >= 0; i--)
        if (held.mem[i] == p) {
            held.mem[i] = held.mem[--held.n_mem];
            return;
        }
}
static void *held_malloc(size_t n) { return held_mem_add(malloc(n)); }
static void *held_calloc(size_t n, size_t size) { return held_mem_add(calloc(n, size)); }
static void *held_aligned_alloc(size_t align, size_t n) { return held_mem_add(aligned_alloc(align, n)); }
static void *held_realloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (q) {
        held_mem_drop(p);
        held_mem_add(q);
    }
    return q;
}
static void held_free(void *p) {
    held_mem_drop(p);
    free(p);
}
static FILE *held_fopen(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f && held.on) {
        if (held.n_file == MAX_HELD_FILES) held_fail("MAX_HELD_FILES files");
        held.file[held.n_file++] = f;
    }
    return f;
}
static int held_fclose(FILE *f) {
    for (int i = held.n_file - 1; i >= 0; i--)
        if (held.file[i] == f) {
            held.file[i] = held.file[--held.n_file];
            break;
        }
    return fclose(f);
}

#define malloc(n) held_malloc(n)
#define calloc(n, size) held_calloc(n, size)
#define aligned_alloc(align, n) held_aligned_alloc(align, n)
#define realloc(p, n) held_realloc(p, n)
#define free(p) held_free(p)
#define fopen(path, mode) held_fopen(path, mode)
#define fclose(f) held_fclose(f)

#include "openmoe.h"
#include "tokenizer.h"

// the backend allocates with its own (unrecorded) calls: the harness holds the
// one model a reader creates
static Model *held_model;
__attribute__((unused)) static Model *held_model_add(Model *m) {
    if (held.on) held_model = m;
    return m;
}
#define model_create(...) held_model_add(model_create(__VA_ARGS__))
#define model_free(m) (model_free(m), held_model = NULL)

// after die(): close and free what the reader held
static void held_release(void) {
    while (held.n_file) fclose(held.file[held.n_file - 1]);
    while (held.n_mem) free(held.mem[held.n_mem - 1]);
    if (held_model) model_free(held_model);
}

// after a reader returned: it must have given everything back. What it kept is
// forgotten here, so that LeakSanitizer reports it with where it was made; a
// file left open ends the run
static void held_forget(void) {
    if (held.n_file) {
        __sanitizer_report_error_summary("fuzz harness: the reader returned with a file open");
        abort();
    }
    memset(held.mem, 0, sizeof(held.mem));
    held.n_mem = 0;
    held_model = NULL;
}

#if defined(FUZZ_tokens) || defined(FUZZ_checkpoint)
#define main train_main
#include "train.c"
#undef main
#elif defined(FUZZ_debug_state)
#define main test_model_main
#include "test/test_model.c"
#undef main
#endif

// ----------------------------------------------------------------------------
// the harness around each reader

static jmp_buf on_die;

void fuzz_die(void) {
    if (!held.on) exit(1);  // the setup failed: its message is out
    longjmp(on_die, 1);
}

static const char *files_dir;          // the fixed inputs
static char work_dir[MAX_PATH_BYTES];  // this process's: the input as a file
static char input_path[MAX_PATH_BYTES + 32];

__attribute__((unused)) static void fixed_path(char *out, size_t n, const char *name) {
    if ((size_t)snprintf(out, n, "%s/%s", files_dir, name) >= n) die("%s/%s: path too long", files_dir, name);
}

// at exit: the work directory and what is in it
static void work_remove(void) {
    char model[MAX_PATH_BYTES + 32];
    snprintf(model, sizeof(model), "%s/model_00000002.bin", work_dir);  // the checkpoint's
    remove(model);
    remove(input_path);
    rmdir(work_dir);
}

#ifdef FUZZ_model
// the floats model_create(c, 1, 2) and a forward hold, over-estimated: a
// copy of the parameters (the file's pages as they are read; a bf16 file's
// widened norms), and a few rows of every width per layer
static double model_floats(const Config *c) {
    double HHd = (double)c->H * c->Hd;
    double widths = c->D + HHd + 2.0 * c->F + 2.0 * c->Fe * c->K + c->E + c->V + c->H;
    return config_n_params(c) + 64.0 * (c->L + 2) * widths;
}
// models larger than this are skipped, not built (a bound on the fuzzer's memory)
#define MODEL_MAX_FLOATS (32.0 * 1024 * 1024)

static ModelFile held_file;  // mapped by the reader: unmapped after a refusal too

static void fuzz_setup(void) {}

static void fuzz_one(const char *path, const uint8_t *data, size_t size) {
    model_file_unmap(&held_file);
    model_file_map(&held_file, path);
    const Config c = held_file.c;
    if (model_floats(&c) > MODEL_MAX_FLOATS) {
        model_file_unmap(&held_file);
        return;
    }
    int T = c.max_seq_len < 2 ? c.max_seq_len : 2;
    Model *m = model_create(&c, 1, T, model_file_precision(held_file.version), NULL);
    model_set_weights(m, &held_file);
    int32_t x[2] = {0, c.V - 1};
    float losses[N_LOSSES];
    MoeSettings s = moe_settings_default();
    Batch batch = {x, NULL, NULL, NULL, 1, T, 0.0};
    model_forward(m, &batch, &s, losses);
    s.first_group = 1;
    model_prefill(m, x, 1, &s);
    if (T > 1) model_decode(m, x[1], 1);
    model_free(m);
    model_file_unmap(&held_file);
}
#endif

#if defined(FUZZ_tokenizer) || defined(FUZZ_text)
// ids -> text, kept (decoding a fuzzed tokenizer's ids may need any room)
static void decode_all(const Tokenizer *t, const int32_t *ids, size_t n) {
    TokBuf text = {0}, tmp = {0};
    tok_decode_work(t, ids, (int)n, &text, &tmp);
    free(text.p);
    free(tmp.p);
}
// text -> ids -> text
static void encode_decode(const Tokenizer *t, const char *text, size_t len) {
    TokWork w;
    memset(&w, 0, sizeof(w));
    tok_encode_work(t, &w, text, len);
    decode_all(t, w.ids, w.n_ids);
    tok_work_free(&w);
}
#endif

#ifdef FUZZ_tokenizer
// spaces to collapse, a tab, letters with and without a precomposed form,
// CJK, an emoji, a control character, bytes that are not UTF-8
static const char sample_text[] = "  In the beginning\tGod  created (1:1). Été, naïve café; "
                                  "ﬁne Ⅻ 中文 🙂\x01 \xff\xfe\x80 end ";

static void fuzz_setup(void) {}

static void fuzz_one(const char *path, const uint8_t *data, size_t size) {
    Tokenizer t;
    tokenizer_load(&t, path);
    encode_decode(&t, sample_text, sizeof(sample_text) - 1);
    tokenizer_free(&t);
}
#endif

#ifdef FUZZ_text
static const char *const text_tokenizers[] = {"tok_unigram.bin", "tok_bpe.bin", "tok_nfkc.bin"};
#define N_TEXT_TOKENIZERS (int)(sizeof(text_tokenizers) / sizeof(text_tokenizers[0]))
static Tokenizer toks[N_TEXT_TOKENIZERS];
static FILE *devnull;

static void fuzz_setup(void) {
    for (int i = 0; i < N_TEXT_TOKENIZERS; i++) {
        char path[MAX_PATH_BYTES];
        fixed_path(path, sizeof(path), text_tokenizers[i]);
        tokenizer_load(&toks[i], path);
    }
    devnull = fopenCheck("/dev/null", "wb");
}

static void fuzz_one(const char *path, const uint8_t *data, size_t size) {
    for (int i = 0; i < N_TEXT_TOKENIZERS; i++) {
        FILE *in = fopenCheck(path, "rb");
        tokenizer_encode_stream(&toks[i], in, devnull);
        fclose(in);
        encode_decode(&toks[i], (const char *)data, size);
    }
    for (int i = 0; i < N_TEXT_TOKENIZERS; i++) {  // most inputs are not ids: the first refusal ends it
        FILE *in = fopenCheck(path, "rb");
        tokenizer_decode_stream(&toks[i], in, devnull);
        fclose(in);
    }
}
#endif

#ifdef FUZZ_tokens
static void fuzz_setup(void) {}

static void fuzz_one(const char *path, const uint8_t *data, size_t size) {
    TokenData d;
    tokens_load(&d, path);
    free(d.tokens);
}
#endif

#ifdef FUZZ_checkpoint
// a run of train as test/t_fuzz.sh made the seed checkpoint (step 2), set up
// as train's main does; its output directory holds that model file, and the
// input becomes the state file beside it
static Run run;

static void fuzz_setup(void) {
    char model[MAX_PATH_BYTES], tokens[MAX_PATH_BYTES], saved[MAX_PATH_BYTES];
    fixed_path(model, sizeof(model), "nano.bin");
    fixed_path(tokens, sizeof(tokens), "tokens.bin");
    char *argv[] = {"train", "-c", model, "-i", tokens, "-j", tokens, "-b", "2", "-t", "4", "-n", "2", "-V", "1",
                    "--router-bias", "0.001", "-o", work_dir, "-r", NULL};
    int argc = (int)(sizeof(argv) / sizeof(argv[0])) - 1;
    char **av = argv;
    memset(&run, 0, sizeof(run));
    Run *r = &run;
    dp_start(&r->dp, &argc, &av);
    r->lead = 1;
    args_parse(&r->a, argc, argv);
    batch_split(r);
    data_load(r);
    float *init_params = config_load(r);
    free(init_params);
    data_check(r);
    settings_make(r);
    model_make(r);
    // the model of the seed checkpoint, beside the input
    fixed_path(saved, sizeof(saved), "checkpoint/model_00000002.bin");
    Config c;
    float *params = model_file_load(saved, &c);
    snprintf(model, sizeof(model), "%s/model_00000002.bin", work_dir);
    model_file_save(model, &c, params);
    free(params);
    snprintf(input_path, sizeof(input_path), "%s/state_00000002.bin", work_dir);
}

static void fuzz_one(const char *path, const uint8_t *data, size_t size) {
    int step = resume_step(&run);
    if (step >= 0) checkpoint_resume(&run, step);
}
#endif

#ifdef FUZZ_debug_state
static char model_path[MAX_PATH_BYTES];

static void fuzz_setup(void) { fixed_path(model_path, sizeof(model_path), "nano.bin"); }

static void fuzz_one(const char *path, const uint8_t *data, size_t size) {
    check_state(model_path, path, NULL, PRECISION_FP32);
}
#endif

// ----------------------------------------------------------------------------
// libFuzzer's entry points

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    files_dir = getenv("FUZZ_FILES") ? getenv("FUZZ_FILES") : "build/fuzz/files";
    // in memory where there is a tmpfs: rewriting a file on ext4 costs milliseconds
    const char *tmp = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    if ((size_t)snprintf(work_dir, sizeof(work_dir), "%s/openmoe_fuzz.%d", tmp, (int)getpid()) >= sizeof(work_dir))
        die("TMPDIR %s: path too long", tmp);
    if (mkdir(work_dir, 0755) != 0) die("%s: cannot make it: %s", work_dir, strerror(errno));
    snprintf(input_path, sizeof(input_path), "%s/input.bin", work_dir);
    atexit(work_remove);
    fuzz_setup();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FILE *f = fopenCheck(input_path, "wb");
    fwriteCheck(data, 1, size, f, input_path);
    fcloseCheck(f, input_path);
    held.on = 1;
    if (setjmp(on_die) == 0) {
        fuzz_one(input_path, data, size);
        held_forget();
    } else {
        held_release();
    }
    held.on = 0;
    return 0;
}
