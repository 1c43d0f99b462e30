// utils.h: what every program and tokenizer.h use, independent of the model.
//
//   1. checked C library calls (die, fopenCheck, mallocCheck, ...), a wall clock
//   2. file helpers: sizes, atomic write-then-rename, hashing, overflow-safe sizes
//   3. the files of the project: their magic numbers and the common header
//   4. command-line flags: whole values in a range, or exit naming the flag
//
// Everything is a static function, as in openmoe.h, so that each program is
// one translation unit plus one backend.
#ifndef UTILS_H
#define UTILS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <time.h>

// ----------------------------------------------------------------------------
// 1. checked calls: every failure names what failed and where, then exits 1

// the longest path the programs build (a checkpoint name, its .tmp)
#define MAX_PATH_BYTES 4096

// atomic_open's temporary files until they are renamed (at most
// MAX_PENDING_TMP at once: a checkpoint's model and state): die() removes
// them, so that a failed write (a full disk) leaves nothing behind
#define MAX_PENDING_TMP 2
static inline char *pending_tmp(int i) {
    static char paths[MAX_PENDING_TMP][MAX_PATH_BYTES];
    return paths[i];
}

#ifdef FUZZING
// the fuzz harnesses (test/fuzz_targets.c) turn die() into a return to the harness
__attribute__((noreturn)) void fuzz_die(void);
#endif

__attribute__((noreturn, format(printf, 1, 2))) static inline void die(const char *fmt, ...) {
    for (int i = 0; i < MAX_PENDING_TMP; i++)
        if (pending_tmp(i)[0]) remove(pending_tmp(i));
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
#ifdef FUZZING
    fuzz_die();
#endif
    exit(1);
}

static inline FILE *fopen_check(const char *path, const char *mode, const char *file, int line) {
    FILE *f = fopen(path, mode);
    if (!f) die("%s: cannot open (mode %s): %s  [%s:%d]", path, mode, strerror(errno), file, line);
    return f;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

// fread that names the file and says how much was missing (a truncated file)
static inline void fread_check(void *ptr, size_t size, size_t n, FILE *f, const char *path,
                               const char *file, int line) {
    size_t got = fread(ptr, size, n, f);
    if (got != n) die("%s: truncated: wanted %zu items of %zu bytes, got %zu  [%s:%d]",
                      path, n, size, got, file, line);
}
#define freadCheck(ptr, size, n, f, path) fread_check(ptr, size, n, f, path, __FILE__, __LINE__)

static inline void fwrite_check(const void *ptr, size_t size, size_t n, FILE *f, const char *path,
                                const char *file, int line) {
    if (fwrite(ptr, size, n, f) != n)
        die("%s: write failed: %s  [%s:%d]", path, strerror(errno), file, line);
}
#define fwriteCheck(ptr, size, n, f, path) fwrite_check(ptr, size, n, f, path, __FILE__, __LINE__)

static inline void fclose_check(FILE *f, const char *path, const char *file, int line) {
    if (fclose(f) != 0) die("%s: close failed: %s  [%s:%d]", path, strerror(errno), file, line);
}
#define fcloseCheck(f, path) fclose_check(f, path, __FILE__, __LINE__)

// what was written to f reached the OS (a full disk shows here, not at fwrite)
static inline void fflush_check(FILE *f, const char *path, const char *file, int line) {
    if (fflush(f) != 0 || ferror(f)) die("%s: write failed: %s  [%s:%d]", path, strerror(errno), file, line);
}
#define fflushCheck(f, path) fflush_check(f, path, __FILE__, __LINE__)

static inline void *malloc_check(size_t size, const char *file, int line) {
    void *p = malloc(size ? size : 1);
    if (!p) die("out of memory allocating %zu bytes  [%s:%d]", size, file, line);
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static inline void *calloc_check(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes  [%s:%d]", n, size, file, line);
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

// zeroed, starting on a multiple of `align` bytes (a power of two)
static inline void *calloc_aligned_check(size_t n, size_t size, size_t align, const char *file, int line) {
    if (size && n > ((size_t)-1 - align) / size)
        die("allocating %zu x %zu bytes overflows  [%s:%d]", n, size, file, line);
    size_t bytes = (n * size + align - 1) / align * align;
    void *p = aligned_alloc(align, bytes ? bytes : align);
    if (!p) die("out of memory allocating %zu x %zu bytes  [%s:%d]", n, size, file, line);
    memset(p, 0, bytes);
    return p;
}
#define callocAlignedCheck(n, size, align) calloc_aligned_check(n, size, align, __FILE__, __LINE__)

// seconds on a monotonic clock, for the time a step or a generation takes
static inline double wall_seconds(void) {
    struct timespec t;
    if (clock_gettime(CLOCK_MONOTONIC, &t) != 0) die("clock_gettime failed: %s", strerror(errno));
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// ----------------------------------------------------------------------------
// 2. file helpers

// FNV-1a-style over 8-byte words, then the bytes left, chained through h
// (start: FNV_BASIS); words, so that hashing a model's weights stays quick
#define FNV_BASIS 0xCBF29CE484222325ull
#define FNV_PRIME 0x100000001B3ull
static inline uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    size_t i = 0;
    for (uint64_t w; i + 8 <= n; i += 8) {
        memcpy(&w, b + i, 8);
        h = (h ^ w) * FNV_PRIME;
    }
    for (; i < n; i++) h = (h ^ b[i]) * FNV_PRIME;
    return h;
}

// size of an open file in bytes, which must be a regular file (not a directory)
static inline long file_size(FILE *f, const char *path) {
    struct stat st;
    if (fstat(fileno(f), &st) != 0) die("%s: cannot stat: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) die("%s: is a directory, not a file", path);
    if (!S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    return (long)st.st_size;
}

// write to PATH.tmp, then rename over PATH, so that PATH is never half written;
// die() removes the .tmp of a write that failed. atomic_commit closes and
// renames; atomic_close then atomic_rename do it in two steps, so that several
// files (MAX_PENDING_TMP) are all written before any is renamed; fflushCheck
// then atomic_rename leave the file open, to go on writing what was renamed. The
// .tmp is made anew (O_EXCL, O_NOFOLLOW): a link planted under its name is
// removed, never followed, and one planted again after that makes the open
// fail. A fixed name rather than mkstemp's: a killed run's .tmp is replaced by
// the next write instead of piling up, and the file gets fopen's mode (0666
// less the umask; mkstemp's 0600 would hide the checkpoints from the group).
static inline FILE *atomic_open(const char *path, char *tmp, size_t ntmp) {
    if ((size_t)snprintf(tmp, ntmp, "%s.tmp", path) >= ntmp) die("%s: path too long", path);
    if (unlink(tmp) != 0 && errno != ENOENT) die("%s: cannot remove the old temporary file: %s", tmp, strerror(errno));
    int slot = 0;
    while (slot < MAX_PENDING_TMP && pending_tmp(slot)[0]) slot++;
    if (slot == MAX_PENDING_TMP) die("%s: more than %d files written at once", path, MAX_PENDING_TMP);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0666);
    if (fd < 0) die("%s: cannot create: %s", tmp, strerror(errno));
    snprintf(pending_tmp(slot), MAX_PATH_BYTES, "%s", tmp);
    FILE *f = fdopen(fd, "wb");
    if (!f) die("%s: fdopen failed: %s", tmp, strerror(errno));
    return f;
}
static inline void atomic_close(FILE *f, const char *tmp) {
    fflushCheck(f, tmp);
    fcloseCheck(f, tmp);
}
static inline void atomic_rename(const char *tmp, const char *path) {
    if (rename(tmp, path) != 0) die("%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    for (int i = 0; i < MAX_PENDING_TMP; i++)
        if (strcmp(pending_tmp(i), tmp) == 0) pending_tmp(i)[0] = '\0';
}
static inline void atomic_commit(FILE *f, const char *tmp, const char *path) {
    atomic_close(f, tmp);
    atomic_rename(tmp, path);
}

// Sizes computed from header values saturate at SIZE_OVERFLOW, so that a header
// whose sizes overflow can never match the size of a real file. Every file
// reader compares such a size with the file's before it allocates anything.
#define SIZE_OVERFLOW UINT64_MAX
static inline uint64_t size_mul(uint64_t a, uint64_t b) {
    return a != 0 && b > SIZE_OVERFLOW / a ? SIZE_OVERFLOW : a * b;
}
static inline uint64_t size_add(uint64_t a, uint64_t b) { return b > SIZE_OVERFLOW - a ? SIZE_OVERFLOW : a + b; }

// ----------------------------------------------------------------------------
// 3. the files. Every file of the project starts with int32 header[256]: a
// magic number, a version (1), the file's own words, then zeros. The magics
// count up from OpenMoE's arXiv number, one per kind of file.

#define TOKENIZER_MAGIC 240201738  // tokenizer files, tokenizer.h (tokenizer.bin-spec section 1)
#define MODEL_MAGIC 240201739      // model files, openmoe.h (SPEC §6)
#define STATE_MAGIC 240201740      // debug state files, test/test_model.c (SPEC §7)
#define TOKENS_MAGIC 240201741     // token data files, train.c (tokenizer.bin-spec section 2)
#define TRACE_MAGIC 240201742      // routing traces, train.c (dev/analyze_routing.py)
#define CKPT_MAGIC 240201743       // training state checkpoints, train.c
#define HEADER_INTS 256
#define HEADER_BYTES (HEADER_INTS * (int)sizeof(int32_t))
#define FILE_VERSION 1             // header word 1 of every file this build writes and reads

// reads and checks the header of an open file (kind names it in messages);
// words n_used.. must be 0. Returns the file's size in bytes.
static inline long header_read(FILE *f, const char *path, const char *kind, int32_t magic, int n_used, int32_t *h) {
    long size = file_size(f, path);
    if (size < HEADER_BYTES)
        die("%s: not a %s file: %ld bytes, shorter than the %d-byte header", path, kind, size, HEADER_BYTES);
    freadCheck(h, sizeof(int32_t), HEADER_INTS, f, path);
    if (h[0] != magic) die("%s: bad magic %d (a %s file starts with %d)", path, h[0], kind, magic);
    if (h[1] != FILE_VERSION)
        die("%s: unknown version %d (this build reads version %d)", path, h[1], FILE_VERSION);
    for (int i = n_used; i < HEADER_INTS; i++)
        if (h[i] != 0) die("%s: header word %d is %d, must be 0", path, i, h[i]);
    return size;
}

// ----------------------------------------------------------------------------
// 4. command-line flags: the whole value must parse, be finite and lie in the
// range, else exit naming the flag, the value and the range.

static inline long long flag_int(const char *flag, const char *v, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi) die("%s %s: needs a whole number in [%lld, %lld]", flag, v, lo, hi);
    return x;
}
// lo_open: lo itself is excluded, (lo, hi]; else [lo, hi]
static inline double flag_float(const char *flag, const char *v, double lo, int lo_open, double hi) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || strpbrk(v, "xX") || errno == ERANGE || !isfinite(x) || x < lo || (lo_open && x == lo) || x > hi)
        die("%s %s: needs a finite decimal number in %c%g, %g]", flag, v, lo_open ? '(' : '[', lo, hi);
    return x;
}
// path flags: not empty
static inline const char *flag_path(const char *flag, const char *v) {
    if (!*v) die("%s '': needs a path", flag);
    return v;
}

#endif  // UTILS_H
