// tokenizer.h: a SentencePiece tokenizer in C (unigram and BPE models), reading
// the tokenizer.bin format of tokenizer.bin-spec (written by
// dev/export_tokenizer.py from a SentencePiece .model file).
//
// Encoding and decoding give exactly what SentencePiece 0.1.97 (spm_encode
// --output_format=id, spm_decode --input_format=id) gives for the same model:
//
//   normalize   the normalizer of normalizer.cc: user-defined pieces pass
//               unchanged, else the longest match in the precompiled charsmap
//               (a darts-clone double-array trie over UTF-8 bytes, values are
//               offsets of NUL-terminated replacement strings), else one UTF-8
//               character unchanged (a malformed byte becomes U+FFFD);
//               remove_extra_whitespaces, add_dummy_prefix, escape_whitespaces
//               (' ' -> U+2581) and treat_whitespace_as_suffix as there.
//   unigram     Viterbi over the piece scores (unigram_model.cc
//               EncodeOptimized): user-defined pieces score
//               bytes * max_score - 0.1, a character no piece covers becomes
//               <unk> with score min_score - 10, unused pieces never match.
//   BPE         start from characters (user-defined pieces frozen), repeatedly
//               merge the adjacent pair whose concatenation is the piece with
//               the highest score, leftmost first on ties (bpe_model.cc).
//   then        <unk> pieces become their UTF-8 bytes (<0xAB> pieces) with
//               byte_fallback, otherwise runs of <unk> become one <unk>.
//   decode      control pieces -> "", <unk> -> the unk surface (" \u2047 "),
//               runs of byte pieces -> their bytes, one U+FFFD per byte that
//               is not part of valid UTF-8, U+2581 -> ' ', the first piece's
//               leading U+2581 dropped (all leading ones with
//               remove_extra_whitespaces), then the denormalizer if any.
//   sentinels   the last n_sentinels pieces, "\u2581<extra_id_k>" at id V-1-k
//               (SPEC §10), are user-defined pieces as OpenMoE's seqio appends
//               them, encoded and decoded as such.
//
// Piece lookup uses a byte trie whose edges live in one open-addressing hash
// table, so that encoding is linear in the line length times the longest
// piece. The tokenizer is read-only after tokenizer_load: encoding and
// decoding allocate their own work buffers, so threads may share one.
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include "utils.h"

#define TOKENIZER_VERSION 1

enum { TOK_UNIGRAM = 1, TOK_BPE = 2 };
// piece types, as ModelProto.SentencePiece.Type
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER_DEFINED = 4,
       TOK_UNUSED = 5, TOK_BYTE = 6 };
// flag bits of header[8] (bits 0-2 also of header[13], the denormalizer's)
enum { TOK_ADD_DUMMY_PREFIX = 1, TOK_REMOVE_EXTRA_WHITESPACES = 2, TOK_ESCAPE_WHITESPACES = 4,
       TOK_BYTE_FALLBACK = 8, TOK_TREAT_WHITESPACE_AS_SUFFIX = 16 };
#define TOK_NORMALIZER_FLAGS (TOK_ADD_DUMMY_PREFIX | TOK_REMOVE_EXTRA_WHITESPACES | TOK_ESCAPE_WHITESPACES)
#define TOK_ALL_FLAGS (TOK_NORMALIZER_FLAGS | TOK_BYTE_FALLBACK | TOK_TREAT_WHITESPACE_AS_SUFFIX)

typedef struct {
    uint32_t *units;       // the double array (NULL when there is no charsmap)
    size_t n_units;
    char *strings;         // NUL-terminated replacement strings
    size_t n_strings;
    int flags;             // TOK_ADD_DUMMY_PREFIX | TOK_REMOVE_EXTRA_WHITESPACES | TOK_ESCAPE_WHITESPACES
} TokNormalizer;

// a trie edge: key = (node << 8 | byte) + 1 (0 = empty slot), the child node, and the
// piece ending at the child (-1 if none), so that a walk touches one cache line a byte
typedef struct { uint32_t key; int32_t child; int32_t id; } TokEdge;

typedef struct {
    int vocab_size;
    int model_type;        // TOK_UNIGRAM or TOK_BPE
    int unk_id, bos_id, eos_id, pad_id;   // -1 when absent (unk_id never is)
    int flags;             // TOK_* flag bits
    int max_piece_bytes;
    int n_sentinels;       // S: the last S pieces are SPEC §10's sentinels, <extra_id_k> at id vocab_size - 1 - k
    float *scores;         // [vocab_size]
    uint8_t *types;        // [vocab_size] TOK_NORMAL ...
    int16_t *byte_of;      // [vocab_size] the byte of a TOK_BYTE piece, else -1
    uint32_t *offset;      // [vocab_size + 1] pieces in `pieces`, each NUL-terminated
    char *pieces;
    uint32_t *text_offset; // [vocab_size + 1] decoded piece text (U+2581 -> ' ') in `texts`
    char *texts;
    int byte_id[256];      // id of <0xAB> pieces, -1 when absent
    char byte_char[256];   // byte_char[b] = b, what tokenizer_piece_text returns for <0xAB>
    char *unk_surface;     // what decode writes for <unk>
    size_t unk_surface_len;
    char *normalizer_name;
    TokNormalizer norm;    // normalizer_spec
    TokNormalizer denorm;  // denormalizer_spec, used when denorm.units != NULL
    float min_score, max_score;  // over TOK_NORMAL pieces, as unigram_model.cc
    int has_user_defined, has_unused;
    // the piece trie: node 0 is the root (node_id: the piece ending at each node, only
    // while building; afterwards the edges carry it)
    int32_t *node_id;
    int n_nodes;
    TokEdge root[256];     // the root's edges, key 0 when absent
    TokEdge *edges;
    uint32_t edge_mask;
} Tokenizer;

// ----------------------------------------------------------------------------
// small helpers

typedef struct { char *p; size_t n, cap; } TokBuf;

static inline void tok_buf_reserve(TokBuf *b, size_t need) {
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *p = (char *)realloc(b->p, cap);
    if (!p) die("tokenizer: out of memory growing a buffer to %zu bytes", cap);
    b->p = p;
    b->cap = cap;
}
static inline void tok_buf_put(TokBuf *b, const char *s, size_t n) {
    tok_buf_reserve(b, b->n + n + 1);
    if (n) memcpy(b->p + b->n, s, n);  // s may be NULL when n is 0 (an empty buffer's text)
    b->n += n;
}
static inline void tok_buf_putc(TokBuf *b, char c) {
    if (b->n + 2 > b->cap) tok_buf_reserve(b, b->n + 2);
    b->p[b->n++] = c;
}

// sentencepiece util.h OneCharLen: length of a UTF-8 sequence from its first byte
static inline int tok_one_char_len(unsigned char c) {
    static const uint8_t len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return len[c >> 4];
}

// sentencepiece util.cc DecodeUTF8 + IsValidDecodeUTF8: returns 1 when s starts
// with a valid UTF-8 character (U+FFFD itself included), and its length in *mblen;
// a malformed byte gives 0 and *mblen = 1
static inline int tok_valid_utf8(const unsigned char *s, size_t n, int *mblen) {
    uint32_t c = s[0];
    if (c < 0x80) { *mblen = 1; return 1; }
    if (n >= 2 && (c & 0xE0) == 0xC0) {
        uint32_t cp = ((c & 0x1F) << 6) | (s[1] & 0x3F);
        if ((s[1] & 0xC0) == 0x80 && cp >= 0x80) { *mblen = 2; return 1; }
    } else if (n >= 3 && (c & 0xF0) == 0xE0) {
        uint32_t cp = ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && cp >= 0x800 &&
            (cp < 0xD800 || cp >= 0xE000)) { *mblen = 3; return 1; }
    } else if (n >= 4 && (c & 0xF8) == 0xF0) {
        uint32_t cp = ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        if ((s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 && (s[3] & 0xC0) == 0x80 &&
            cp >= 0x10000 && cp <= 0x10FFFF) { *mblen = 4; return 1; }
    }
    *mblen = 1;
    return 0;
}

static const char TOK_SPACE_SYMBOL[] = "\xe2\x96\x81";   // U+2581
static const char TOK_REPLACEMENT_CHAR[] = "\xef\xbf\xbd";  // U+FFFD

static inline int tok_is_space_symbol(const char *s, size_t n) {
    return n >= 3 && (unsigned char)s[0] == 0xe2 && (unsigned char)s[1] == 0x96 && (unsigned char)s[2] == 0x81;
}

// ----------------------------------------------------------------------------
// the piece trie

static inline uint32_t tok_edge_hash(uint32_t key) { return key * 2654435761u; }

// the edge from node by byte, or NULL
static inline const TokEdge *tok_edge(const Tokenizer *t, int node, unsigned char byte) {
    if (node == 0) return t->root[byte].key ? &t->root[byte] : NULL;
    uint32_t key = ((uint32_t)node << 8 | byte) + 1;
    uint32_t h = tok_edge_hash(key) & t->edge_mask;
    for (;;) {
        const TokEdge *e = &t->edges[h];
        if (e->key == key) return e;
        if (e->key == 0) return NULL;
        h = (h + 1) & t->edge_mask;
    }
}

// one step down the trie: the child (-1 if none) and, in *id, the piece ending there
static inline int tok_step(const Tokenizer *t, int node, unsigned char byte, int *id) {
    const TokEdge *e = tok_edge(t, node, byte);
    if (!e) return -1;
    *id = e->id;
    return e->child;
}

static inline int tok_child(const Tokenizer *t, int node, unsigned char byte) {
    const TokEdge *e = tok_edge(t, node, byte);
    return e ? e->child : -1;
}

static inline void tok_edge_insert(Tokenizer *t, int node, unsigned char byte, int child) {
    uint32_t key = ((uint32_t)node << 8 | byte) + 1;
    uint32_t h = tok_edge_hash(key) & t->edge_mask;
    while (t->edges[h].key != 0) h = (h + 1) & t->edge_mask;
    t->edges[h].key = key;
    t->edges[h].child = child;
    t->edges[h].id = -1;
}

// the id of the piece spelled exactly s[0..n), or -1
static inline int tok_piece_id(const Tokenizer *t, const char *s, size_t n) {
    int node = 0, id = -1;
    for (size_t i = 0; i < n; i++) {
        node = tok_step(t, node, (unsigned char)s[i], &id);
        if (node < 0) return -1;
    }
    return id;
}

// pieces of the model's piece map (model_interface.cc pieces_): what encoding matches
static inline int tok_is_normal_class(int type) {
    return type == TOK_NORMAL || type == TOK_USER_DEFINED || type == TOK_UNUSED;
}

static inline void tok_build_trie(Tokenizer *t, const char *path) {
    size_t total = 0;
    for (int i = 0; i < t->vocab_size; i++) total += t->offset[i + 1] - t->offset[i] - 1;
    if (total + 1 >= (1u << 23)) die("%s: pieces too long in all (%zu bytes) for the trie", path, total);
    size_t cap = 1024;
    while (cap < 2 * total + 2) cap *= 2;
    t->edges = (TokEdge *)callocCheck(cap, sizeof(TokEdge));
    t->edge_mask = (uint32_t)(cap - 1);
    t->node_id = (int32_t *)mallocCheck((total + 1) * sizeof(int32_t));
    t->node_id[0] = -1;
    t->n_nodes = 1;
    memset(t->root, 0, sizeof(t->root));
    for (int i = 0; i < t->vocab_size; i++) {
        const char *s = t->pieces + t->offset[i];
        size_t n = t->offset[i + 1] - t->offset[i] - 1;
        int node = 0;
        for (size_t k = 0; k < n; k++) {
            unsigned char c = (unsigned char)s[k];
            int next = tok_child(t, node, c);
            if (next < 0) {
                next = t->n_nodes++;
                t->node_id[next] = -1;
                if (node == 0) { t->root[c].key = 1; t->root[c].child = next; t->root[c].id = -1; }
                else tok_edge_insert(t, node, c, next);
            }
            node = next;
        }
        if (t->node_id[node] >= 0)
            die("%s: piece %d \"%s\" is already defined as piece %d", path, i, s, t->node_id[node]);
        t->node_id[node] = i;
    }
    // copy each node's piece into the edge that leads to it
    for (int b = 0; b < 256; b++)
        if (t->root[b].key) t->root[b].id = t->node_id[t->root[b].child];
    for (size_t k = 0; k < cap; k++)
        if (t->edges[k].key) t->edges[k].id = t->node_id[t->edges[k].child];
    free(t->node_id);
    t->node_id = NULL;
}

// ----------------------------------------------------------------------------
// loading

static inline uint32_t tok_rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

// checks a precompiled charsmap blob: <uint32 trie bytes><trie units><strings>
static inline void tok_load_charsmap(TokNormalizer *nz, const unsigned char *blob, size_t n,
                                     const char *path, const char *what) {
    if (n <= 4) die("%s: %s charsmap of %zu bytes is broken (at least 5 bytes)", path, what, n);
    uint32_t trie_bytes = tok_rd32(blob);
    if ((size_t)trie_bytes >= n - 4 + 1 || trie_bytes % 4 != 0 || trie_bytes == 0)
        die("%s: %s charsmap: trie of %u bytes does not fit its %zu byte blob", path, what, trie_bytes, n);
    nz->n_units = trie_bytes / 4;
    nz->units = (uint32_t *)mallocCheck(trie_bytes);
    for (size_t i = 0; i < nz->n_units; i++) nz->units[i] = tok_rd32(blob + 4 + 4 * i);
    nz->n_strings = n - 4 - trie_bytes;
    nz->strings = (char *)mallocCheck(nz->n_strings + 1);
    memcpy(nz->strings, blob + 4 + trie_bytes, nz->n_strings);
    nz->strings[nz->n_strings] = 0;
    if (nz->n_strings > 0 && nz->strings[nz->n_strings - 1] != 0)
        die("%s: %s charsmap: the replacement strings do not end with a NUL", path, what);
}

// the header words of tokenizer.bin-spec 1.1 after the magic and the version
enum {
    TOKH_V = 2, TOKH_MODEL_TYPE, TOKH_UNK_ID, TOKH_BOS_ID, TOKH_EOS_ID, TOKH_PAD_ID, TOKH_FLAGS, TOKH_NAME_BYTES,
    TOKH_UNK_BYTES, TOKH_PIECE_BYTES, TOKH_MAP_BYTES, TOKH_DENORM_FLAGS, TOKH_DEMAP_BYTES, TOKH_MAX_PIECE_BYTES,
    TOKH_SENTINELS, TOKENIZER_HEADER_WORDS
};
// a piece record: <float32 score><uint8 type><uint16 length>, then length > 0 bytes
#define TOK_PIECE_RECORD_BYTES 7

// the whole file at path, at least a header long (*size: its bytes)
static inline unsigned char *tok_read_file(const char *path, long *size) {
    FILE *f = fopenCheck(path, "rb");
    *size = file_size(f, path);
    if (*size < HEADER_BYTES)
        die("%s: truncated: %ld bytes, a tokenizer file has a %ld byte header", path, *size, (long)HEADER_BYTES);
    unsigned char *buf = (unsigned char *)mallocCheck((size_t)*size);
    freadCheck(buf, 1, (size_t)*size, f, path);
    fcloseCheck(f, path);
    return buf;
}

// the header of buf (a file of size bytes) into h, each word checked, and its
// sizes against the file's
static inline void tok_read_header(const unsigned char *buf, long size, const char *path, int32_t *h) {
    for (int i = 0; i < HEADER_INTS; i++) h[i] = (int32_t)tok_rd32(buf + 4 * i);
    if (h[0] != TOKENIZER_MAGIC) {
        if (h[0] == TOKENS_MAGIC) die("%s: this is a token data file, not a tokenizer file", path);
        die("%s: bad magic %d (a tokenizer file starts with %d; convert a SentencePiece model "
            "with dev/export_tokenizer.py)", path, h[0], TOKENIZER_MAGIC);
    }
    if (h[1] != TOKENIZER_VERSION) die("%s: version %d, this reader knows version %d", path, h[1], TOKENIZER_VERSION);
    if (h[TOKH_V] <= 0) die("%s: vocab size %d, must be > 0", path, h[TOKH_V]);
    if (h[TOKH_MODEL_TYPE] != TOK_UNIGRAM && h[TOKH_MODEL_TYPE] != TOK_BPE)
        die("%s: model type %d, must be 1 (unigram) or 2 (BPE)", path, h[TOKH_MODEL_TYPE]);
    if (h[TOKH_FLAGS] & ~TOK_ALL_FLAGS) die("%s: unknown flag bits 0x%x", path, h[TOKH_FLAGS]);
    if (h[TOKH_DENORM_FLAGS] & ~TOK_NORMALIZER_FLAGS)
        die("%s: unknown denormalizer flag bits 0x%x", path, h[TOKH_DENORM_FLAGS]);
    for (int i = TOKH_NAME_BYTES; i <= TOKH_MAX_PIECE_BYTES; i++)
        if (h[i] < 0) die("%s: header[%d] = %d, a size must be >= 0", path, i, h[i]);
    if (h[TOKH_SENTINELS] < 0 || h[TOKH_SENTINELS] > h[TOKH_V])
        die("%s: %d sentinels, must be in [0, %d] (the vocab size)", path, h[TOKH_SENTINELS], h[TOKH_V]);
    if (h[TOKH_DEMAP_BYTES] == 0 && h[TOKH_DENORM_FLAGS] != 0)
        die("%s: denormalizer flags 0x%x without a denormalizer (header[%d] = 0), must be 0", path,
            h[TOKH_DENORM_FLAGS], TOKH_DEMAP_BYTES);
    for (int i = TOKENIZER_HEADER_WORDS; i < HEADER_INTS; i++)
        if (h[i] != 0) die("%s: reserved header[%d] = %d, must be 0", path, i, h[i]);
    long long want = HEADER_BYTES + (long long)h[TOKH_NAME_BYTES] + h[TOKH_UNK_BYTES] + h[TOKH_PIECE_BYTES] +
                     h[TOKH_MAP_BYTES] + h[TOKH_DEMAP_BYTES];
    if (want != size)
        die("%s: inconsistent sizes: the header says %lld bytes (%d + name %d + unk surface %d + "
            "pieces %d + charsmap %d + denormalizer charsmap %d), the file has %ld%s", path, want, HEADER_BYTES,
            h[TOKH_NAME_BYTES], h[TOKH_UNK_BYTES], h[TOKH_PIECE_BYTES], h[TOKH_MAP_BYTES], h[TOKH_DEMAP_BYTES], size,
            size < want ? " (truncated)" : "");
    if ((long long)h[TOKH_V] * (TOK_PIECE_RECORD_BYTES + 1) > h[TOKH_PIECE_BYTES])
        die("%s: inconsistent sizes: %d pieces cannot fit in a %d byte piece table (%d bytes or more each)",
            path, h[TOKH_V], h[TOKH_PIECE_BYTES], TOK_PIECE_RECORD_BYTES + 1);
}

// the n bytes at p as a NUL-terminated string
static inline char *tok_strndup(const unsigned char *p, size_t n) {
    char *s = (char *)mallocCheck(n + 1);
    memcpy(s, p, n);
    s[n] = 0;
    return s;
}

// byte piece i, which must be spelled <0xAB>: its byte AB in byte_id, byte_of
static inline void tok_load_byte_piece(Tokenizer *t, int i, const char *path) {
    static const char hex[] = "0123456789ABCDEF";
    const char *s = t->pieces + t->offset[i];
    size_t len = strlen(s);
    const char *hi = len == 6 ? strchr(hex, s[3]) : NULL;
    const char *lo = len == 6 ? strchr(hex, s[4]) : NULL;
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>' || !hi || !lo || !s[3] || !s[4])
        die("%s: byte piece %d \"%s\" is invalid (must be <0xAB>)", path, i, s);
    int byte = (int)(hi - hex) * 16 + (int)(lo - hex);
    if (t->byte_id[byte] >= 0) die("%s: byte piece %d \"%s\" is already piece %d", path, i, s, t->byte_id[byte]);
    t->byte_id[byte] = i;
    t->byte_of[i] = (int16_t)byte;
}

// the piece table at p, of n bytes (tokenizer.bin-spec 1.2): V records
// <float32 score><uint8 type><uint16 length><bytes>, whose longest piece must
// have max_len bytes; also the score range of the normal pieces
static inline void tok_load_pieces(Tokenizer *t, const unsigned char *p, int n, int max_len, const char *path) {
    const int V = t->vocab_size;
    const unsigned char *table = p, *end = p + n;
    t->scores = (float *)mallocCheck((size_t)V * sizeof(float));
    t->types = (uint8_t *)mallocCheck((size_t)V);
    t->byte_of = (int16_t *)mallocCheck((size_t)V * sizeof(int16_t));
    t->offset = (uint32_t *)mallocCheck(((size_t)V + 1) * sizeof(uint32_t));
    t->pieces = (char *)mallocCheck((size_t)n + 1);
    for (int b = 0; b < 256; b++) { t->byte_id[b] = -1; t->byte_char[b] = (char)b; }
    size_t off = 0;
    int maxlen = 0;
    t->min_score = FLT_MAX;
    t->max_score = FLT_MIN;  // sic: unigram_model.cc starts from FLT_MIN, not -FLT_MAX
    for (int i = 0; i < V; i++) {
        if (end - p < TOK_PIECE_RECORD_BYTES)
            die("%s: inconsistent sizes: the piece table (%d bytes) ends inside piece %d of %d", path, n, i, V);
        uint32_t bits = tok_rd32(p);
        memcpy(&t->scores[i], &bits, 4);
        int type = p[4];
        int len = p[5] | p[6] << 8;
        p += TOK_PIECE_RECORD_BYTES;
        if (len == 0) die("%s: piece %d is empty", path, i);
        if (end - p < len)
            die("%s: inconsistent sizes: the piece table (%d bytes) ends inside piece %d of %d", path, n, i, V);
        if (type < TOK_NORMAL || type > TOK_BYTE) die("%s: piece %d has unknown type %d", path, i, type);
        t->types[i] = (uint8_t)type;
        t->offset[i] = (uint32_t)off;
        memcpy(t->pieces + off, p, len);
        t->pieces[off + len] = 0;
        if (memchr(p, 0, len)) die("%s: piece %d contains a NUL byte", path, i);
        off += len + 1;
        p += len;
        if (len > maxlen) maxlen = len;
        t->byte_of[i] = -1;
        if (type == TOK_USER_DEFINED) t->has_user_defined = 1;
        if (type == TOK_UNUSED) t->has_unused = 1;
        if (type == TOK_NORMAL) {
            if (t->scores[i] < t->min_score) t->min_score = t->scores[i];
            if (t->scores[i] > t->max_score) t->max_score = t->scores[i];
        }
        if (type == TOK_BYTE) tok_load_byte_piece(t, i, path);
    }
    t->offset[V] = (uint32_t)off;
    if (p != end)
        die("%s: inconsistent sizes: %d pieces take %ld bytes, the header says %d", path, V, (long)(p - table), n);
    if (maxlen != max_len)
        die("%s: inconsistent sizes: the longest piece has %d bytes, the header says %d", path, maxlen, max_len);
}

// the pieces of type unknown (exactly one: unk_id) and byte (256 with
// byte_fallback, else none), and the bos, eos, pad ids (-1 or control pieces)
static inline void tok_check_special_pieces(const Tokenizer *t, const char *path) {
    const int V = t->vocab_size;
    int n_unknown = 0, n_bytes = 0;
    for (int i = 0; i < V; i++) {
        n_unknown += t->types[i] == TOK_UNKNOWN;
        n_bytes += t->types[i] == TOK_BYTE;
    }
    if (n_unknown != 1) die("%s: %d pieces of type unknown, must be exactly 1", path, n_unknown);
    if (t->unk_id < 0 || t->unk_id >= V || t->types[t->unk_id] != TOK_UNKNOWN)
        die("%s: unk id %d is not the piece of type unknown", path, t->unk_id);
    const int special[3] = {t->bos_id, t->eos_id, t->pad_id};
    static const char *special_name[3] = {"bos", "eos", "pad"};
    for (int k = 0; k < 3; k++) {
        int id = special[k];
        if (id < -1 || id >= V || (id >= 0 && t->types[id] != TOK_CONTROL))
            die("%s: %s id %d is not -1 or a control piece of the %d", path, special_name[k], id, V);
    }
    if (t->flags & TOK_BYTE_FALLBACK) {
        if (n_bytes != 256) die("%s: byte_fallback is set but there are %d byte pieces, not 256", path, n_bytes);
    } else if (n_bytes != 0) {
        die("%s: %d byte pieces although byte_fallback is not set", path, n_bytes);
    }
}

// the sentinels (tokenizer.bin-spec 1.1 [16]): piece V-1-k is the user-defined
// "\u2581<extra_id_k>", as seqio appends them
static inline void tok_check_sentinels(const Tokenizer *t, const char *path) {
    for (int k = 0; k < t->n_sentinels; k++) {
        int id = t->vocab_size - 1 - k;
        char want[32];
        snprintf(want, sizeof(want), "%s<extra_id_%d>", TOK_SPACE_SYMBOL, k);
        if (t->types[id] != TOK_USER_DEFINED || strcmp(t->pieces + t->offset[id], want) != 0)
            die("%s: piece %d must be sentinel %d of %d, the user-defined piece \"%s\" (it is \"%s\", type %d)", path,
                id, k, t->n_sentinels, want, t->pieces + t->offset[id], t->types[id]);
    }
}

// the decoded text of each piece: U+2581 -> ' '
static inline void tok_build_texts(Tokenizer *t) {
    const int V = t->vocab_size;
    t->text_offset = (uint32_t *)mallocCheck(((size_t)V + 1) * sizeof(uint32_t));
    t->texts = (char *)mallocCheck((size_t)t->offset[V] + 1);
    size_t toff = 0;
    for (int i = 0; i < V; i++) {
        t->text_offset[i] = (uint32_t)toff;
        const char *s = t->pieces + t->offset[i];
        size_t n = t->offset[i + 1] - t->offset[i] - 1;
        for (size_t k = 0; k < n;) {
            if (tok_is_space_symbol(s + k, n - k)) { t->texts[toff++] = ' '; k += 3; }
            else t->texts[toff++] = s[k++];
        }
    }
    t->text_offset[V] = (uint32_t)toff;
}

// reads path (tokenizer.bin-spec section 1); exits naming it on any problem
static inline void tokenizer_load(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof(*t));
    long size;
    unsigned char *buf = tok_read_file(path, &size);
    int32_t h[HEADER_INTS];
    tok_read_header(buf, size, path, h);
    t->vocab_size = h[TOKH_V];
    t->model_type = h[TOKH_MODEL_TYPE];
    t->unk_id = h[TOKH_UNK_ID];
    t->bos_id = h[TOKH_BOS_ID];
    t->eos_id = h[TOKH_EOS_ID];
    t->pad_id = h[TOKH_PAD_ID];
    t->flags = h[TOKH_FLAGS];
    t->norm.flags = h[TOKH_FLAGS] & TOK_NORMALIZER_FLAGS;
    t->denorm.flags = h[TOKH_DENORM_FLAGS];
    t->max_piece_bytes = h[TOKH_MAX_PIECE_BYTES];
    t->n_sentinels = h[TOKH_SENTINELS];
    // the sections, in file order
    const unsigned char *p = buf + HEADER_BYTES;
    t->normalizer_name = tok_strndup(p, (size_t)h[TOKH_NAME_BYTES]);
    p += h[TOKH_NAME_BYTES];
    t->unk_surface_len = (size_t)h[TOKH_UNK_BYTES];
    t->unk_surface = tok_strndup(p, t->unk_surface_len);
    p += h[TOKH_UNK_BYTES];
    tok_load_pieces(t, p, h[TOKH_PIECE_BYTES], h[TOKH_MAX_PIECE_BYTES], path);
    p += h[TOKH_PIECE_BYTES];
    tok_check_special_pieces(t, path);
    tok_check_sentinels(t, path);
    tok_build_texts(t);
    if (h[TOKH_MAP_BYTES] > 0) tok_load_charsmap(&t->norm, p, (size_t)h[TOKH_MAP_BYTES], path, "normalizer");
    p += h[TOKH_MAP_BYTES];
    if (h[TOKH_DEMAP_BYTES] > 0) tok_load_charsmap(&t->denorm, p, (size_t)h[TOKH_DEMAP_BYTES], path, "denormalizer");
    free(buf);
    tok_build_trie(t, path);
}

static inline void tokenizer_free(Tokenizer *t) {
    free(t->scores); free(t->types); free(t->byte_of); free(t->offset); free(t->pieces);
    free(t->text_offset); free(t->texts); free(t->unk_surface); free(t->normalizer_name);
    free(t->norm.units); free(t->norm.strings); free(t->denorm.units); free(t->denorm.strings);
    free(t->node_id); free(t->edges);
    memset(t, 0, sizeof(*t));
}

// ----------------------------------------------------------------------------
// normalization (normalizer.cc)

// darts-clone DoubleArray unit accessors
static inline int tok_da_has_leaf(uint32_t u) { return (u >> 8) & 1; }
static inline uint32_t tok_da_value(uint32_t u) { return u & ((1u << 31) - 1); }
static inline uint32_t tok_da_label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
static inline uint32_t tok_da_offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

// Normalizer::NormalizePrefix: the normalized form of the start of s[0..n) in
// (*out, *out_len); returns how many input bytes it consumed (n > 0)
static inline size_t tok_normalize_prefix(const Tokenizer *t, const TokNormalizer *nz, int use_matcher,
                                          const char *s, size_t n, const char **out, size_t *out_len) {
    if (use_matcher && t->has_user_defined) {
        // PrefixMatcher: the longest user-defined piece (among the first 64 matches)
        int node = 0, found = 0;
        size_t longest = 0;
        for (size_t i = 0; i < n && found < 64; i++) {
            int id;
            node = tok_step(t, node, (unsigned char)s[i], &id);
            if (node < 0) break;
            if (id >= 0 && t->types[id] == TOK_USER_DEFINED) { longest = i + 1; found++; }
        }
        if (found) { *out = s; *out_len = longest; return longest; }
    }
    size_t longest_length = 0;
    uint32_t longest_value = 0;
    if (nz->units) {
        // commonPrefixSearch, keeping the first 32 results (kMaxTrieResultsSize)
        const uint32_t *a = nz->units;
        size_t nu = nz->n_units, pos = 0;
        int results = 0;
        pos ^= tok_da_offset(a[0]);
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)s[i];
            pos ^= c;
            if (pos >= nu) break;
            uint32_t u = a[pos];
            if (tok_da_label(u) != c) break;
            pos ^= tok_da_offset(u);
            if (tok_da_has_leaf(u)) {
                if (pos >= nu) break;
                if (results < 32 && (longest_length == 0 || i + 1 > longest_length)) {
                    longest_length = i + 1;
                    longest_value = tok_da_value(a[pos]);
                }
                results++;
            }
        }
    }
    if (longest_length == 0) {
        int mblen;
        if (!tok_valid_utf8((const unsigned char *)s, n, &mblen)) {
            *out = TOK_REPLACEMENT_CHAR;
            *out_len = 3;
            return 1;
        }
        *out = s;
        *out_len = (size_t)mblen;
        return (size_t)mblen;
    }
    if (longest_value >= nz->n_strings)
        die("tokenizer: corrupt charsmap: replacement offset %u outside the %zu byte strings",
            longest_value, nz->n_strings);
    *out = nz->strings + longest_value;
    *out_len = strlen(*out);
    return longest_length;
}

// Normalizer::Normalize: s[0..n) -> out (replacing its contents)
static inline void tok_normalize(const Tokenizer *t, const TokNormalizer *nz, int use_matcher,
                                 int ws_suffix, const char *s, size_t n, TokBuf *out) {
    out->n = 0;
    const char *r;
    size_t rlen;
    const int remove_extra = nz->flags & TOK_REMOVE_EXTRA_WHITESPACES;
    const int escape = nz->flags & TOK_ESCAPE_WHITESPACES;
    const int dummy = nz->flags & TOK_ADD_DUMMY_PREFIX;
    if (n == 0) return;
    if (remove_extra) {  // leading whitespace
        while (n > 0) {
            size_t used = tok_normalize_prefix(t, nz, use_matcher, s, n, &r, &rlen);
            if (!(rlen == 1 && r[0] == ' ')) break;
            s += used;
            n -= used;
        }
    }
    if (n == 0) return;
    tok_buf_reserve(out, n * 3 + 8);
    if (!ws_suffix && dummy) {
        if (escape) tok_buf_put(out, TOK_SPACE_SYMBOL, 3);
        else tok_buf_putc(out, ' ');
    }
    int is_prev_space = remove_extra;
    while (n > 0) {
        size_t used = tok_normalize_prefix(t, nz, use_matcher, s, n, &r, &rlen);
        while (is_prev_space && rlen > 0 && r[0] == ' ') { r++; rlen--; }
        if (rlen > 0) {
            tok_buf_reserve(out, out->n + 3 * rlen + 1);
            for (size_t k = 0; k < rlen; k++) {
                if (escape && r[k] == ' ') {
                    memcpy(out->p + out->n, TOK_SPACE_SYMBOL, 3);
                    out->n += 3;
                } else {
                    out->p[out->n++] = r[k];
                }
            }
            is_prev_space = r[rlen - 1] == ' ';
        }
        s += used;
        n -= used;
        if (!remove_extra) is_prev_space = 0;
    }
    if (remove_extra) {  // trailing whitespace
        if (escape) {
            while (out->n >= 3 && tok_is_space_symbol(out->p + out->n - 3, 3)) out->n -= 3;
        } else {
            while (out->n >= 1 && out->p[out->n - 1] == ' ') out->n--;
        }
    }
    if (ws_suffix && dummy) {
        if (escape) tok_buf_put(out, TOK_SPACE_SYMBOL, 3);
        else tok_buf_putc(out, ' ');
    }
}

// ----------------------------------------------------------------------------
// encoding

typedef struct { int start, len, id; } TokSeg;            // a piece of the normalized text
typedef struct { float score; int start, id; } TokBest;    // unigram: best path ending here
typedef struct { int prev, next, freeze, start, len; } TokSym;  // BPE symbols
typedef struct { float score; int left, right, size; } TokPair; // BPE agenda entries
typedef struct { int merged_start, merged_len, l_start, l_len, r_start, r_len; } TokRevMerge;

typedef struct {           // buffers of one encoder, grown as needed
    TokBuf norm;
    TokSeg *segs; size_t n_segs, cap_segs;
    TokBest *best; size_t cap_best;
    TokSym *syms; size_t cap_syms;
    TokPair *heap; size_t n_heap, cap_heap;
    TokRevMerge *rev; size_t n_rev, cap_rev;
    int32_t *ids; size_t n_ids, cap_ids;
} TokWork;

static inline void *tok_grow(void *p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(p, c * elem);
    if (!q) die("tokenizer: out of memory growing a buffer to %zu x %zu bytes", c, elem);
    *cap = c;
    return q;
}

static inline void tok_work_free(TokWork *w) {
    free(w->norm.p); free(w->segs); free(w->best); free(w->syms); free(w->heap); free(w->rev); free(w->ids);
    memset(w, 0, sizeof(*w));
}

static inline void tok_seg_push(TokWork *w, int start, int len, int id) {
    if (w->n_segs == w->cap_segs) w->segs = (TokSeg *)tok_grow(w->segs, &w->cap_segs, w->n_segs + 1, sizeof(TokSeg));
    w->segs[w->n_segs].start = start;
    w->segs[w->n_segs].len = len;
    w->segs[w->n_segs].id = id;
    w->n_segs++;
}

// unigram_model.cc Model::EncodeOptimized, with its float/double arithmetic
static inline void tok_encode_unigram(const Tokenizer *t, TokWork *w, const char *s, int size) {
    w->best = (TokBest *)tok_grow(w->best, &w->cap_best, (size_t)size + 1, sizeof(TokBest));
    TokBest *best = w->best;
    for (int i = 0; i <= size; i++) { best[i].score = 0; best[i].start = -1; best[i].id = -1; }
    const float unk_score = t->min_score - 10.0f;
    const float max_score = t->max_score;
    int starts_at = 0;
    while (starts_at < size) {
        const float till_here = best[starts_at].score;
        int has_single_node = 0;
        int mblen = tok_one_char_len((unsigned char)s[starts_at]);
        if (mblen > size - starts_at) mblen = size - starts_at;
        int node = 0;
        for (int key_pos = starts_at; key_pos < size;) {
            int id;
            node = tok_step(t, node, (unsigned char)s[key_pos], &id);
            if (node < 0) break;
            key_pos++;
            if (id < 0) continue;
            int type = t->types[id];
            if (!tok_is_normal_class(type) || type == TOK_UNUSED) continue;
            TokBest *target = &best[key_pos];
            const int length = key_pos - starts_at;
            double score = type == TOK_USER_DEFINED ? (double)((float)length * max_score) - 0.1
                                                    : (double)t->scores[id];
            double candidate = score + (double)till_here;
            if (target->start == -1 || candidate > (double)target->score) {
                target->score = (float)candidate;
                target->start = starts_at;
                target->id = id;
            }
            if (!has_single_node && length == mblen) has_single_node = 1;
        }
        if (!has_single_node) {
            TokBest *target = &best[starts_at + mblen];
            float candidate = unk_score + till_here;
            if (target->start == -1 || candidate > target->score) {
                target->score = candidate;
                target->start = starts_at;
                target->id = t->unk_id;
            }
        }
        starts_at += mblen;
    }
    // backtrack, then reverse
    size_t first = w->n_segs;
    for (int ends_at = size; ends_at > 0;) {
        const TokBest *b = &best[ends_at];
        if (b->start < 0 || b->start >= ends_at) die("tokenizer: internal error: broken Viterbi path");
        tok_seg_push(w, b->start, ends_at - b->start, b->id);
        ends_at = b->start;
    }
    for (size_t i = first, j = w->n_segs - 1; i < j; i++, j--) {
        TokSeg tmp = w->segs[i]; w->segs[i] = w->segs[j]; w->segs[j] = tmp;
    }
}

// BPE agenda: a binary max-heap, highest score first, then smallest left
static inline int tok_pair_before(const TokPair *a, const TokPair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static inline void tok_heap_push(TokWork *w, TokPair p) {
    if (w->n_heap == w->cap_heap) w->heap = (TokPair *)tok_grow(w->heap, &w->cap_heap, w->n_heap + 1, sizeof(TokPair));
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!tok_pair_before(&p, &w->heap[parent])) break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = p;
}

static inline TokPair tok_heap_pop(TokWork *w) {
    TokPair top = w->heap[0];
    TokPair last = w->heap[--w->n_heap];
    size_t n = w->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && tok_pair_before(&w->heap[c + 1], &w->heap[c])) c++;
        if (!tok_pair_before(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0) w->heap[i] = last;
    return top;
}

static inline void tok_bpe_maybe_add(const Tokenizer *t, TokWork *w, const char *s, int left, int right) {
    if (left == -1 || right == -1) return;
    const TokSym *l = &w->syms[left], *r = &w->syms[right];
    if (l->freeze || r->freeze) return;
    int len = l->len + r->len;
    int id = tok_piece_id(t, s + l->start, (size_t)len);
    if (id < 0 || !tok_is_normal_class(t->types[id])) return;
    TokPair p;
    p.score = t->scores[id];
    p.left = left;
    p.right = right;
    p.size = len;
    tok_heap_push(w, p);
    if (t->types[id] == TOK_UNUSED) {  // remember how to split it again (rev_merge)
        size_t k;
        for (k = 0; k < w->n_rev; k++) {
            const TokRevMerge *m = &w->rev[k];
            if (m->merged_len == len && memcmp(s + m->merged_start, s + l->start, len) == 0) break;
        }
        if (k == w->n_rev) {
            w->rev = (TokRevMerge *)tok_grow(w->rev, &w->cap_rev, w->n_rev + 1, sizeof(TokRevMerge));
            w->n_rev++;
        }
        TokRevMerge *m = &w->rev[k];
        m->merged_start = l->start; m->merged_len = len;
        m->l_start = l->start; m->l_len = l->len;
        m->r_start = r->start; m->r_len = r->len;
    }
}

static inline void tok_bpe_resegment(const Tokenizer *t, TokWork *w, const char *s, int start, int len, int depth) {
    int id = tok_piece_id(t, s + start, (size_t)len);
    if (id < 0) id = t->unk_id;
    if (t->types[id] == TOK_UNUSED && depth < 1000) {
        for (size_t k = 0; k < w->n_rev; k++) {
            const TokRevMerge m = w->rev[k];
            if (m.merged_len == len && memcmp(s + m.merged_start, s + start, len) == 0) {
                tok_bpe_resegment(t, w, s, m.l_start, m.l_len, depth + 1);
                tok_bpe_resegment(t, w, s, m.r_start, m.r_len, depth + 1);
                return;
            }
        }
    }
    tok_seg_push(w, start, len, id);
}

// bpe_model.cc Model::SampleEncode with alpha = 0
static inline void tok_encode_bpe(const Tokenizer *t, TokWork *w, const char *s, int size) {
    w->syms = (TokSym *)tok_grow(w->syms, &w->cap_syms, (size_t)size, sizeof(TokSym));
    w->n_heap = 0;
    w->n_rev = 0;
    int n = 0;
    for (int pos = 0; pos < size;) {
        TokSym *sym = &w->syms[n];
        int mblen = 0, freeze = 0;
        if (t->has_user_defined) {  // PrefixMatcher over user-defined pieces
            int node = 0, found = 0;
            for (int i = pos; i < size && found < 64; i++) {
                int id;
                node = tok_step(t, node, (unsigned char)s[i], &id);
                if (node < 0) break;
                if (id >= 0 && t->types[id] == TOK_USER_DEFINED) { mblen = i + 1 - pos; found++; }
            }
            freeze = found > 0;
        }
        if (!freeze) {
            mblen = tok_one_char_len((unsigned char)s[pos]);
            if (mblen > size - pos) mblen = size - pos;
        }
        sym->start = pos;
        sym->len = mblen;
        sym->freeze = freeze;
        sym->prev = n - 1;
        pos += mblen;
        sym->next = pos < size ? n + 1 : -1;
        n++;
    }
    if (n == 0) return;
    TokSym *syms = w->syms;
    for (int i = 1; i < n; i++) tok_bpe_maybe_add(t, w, s, i - 1, i);
    while (w->n_heap > 0) {
        TokPair top = tok_heap_pop(w);
        TokSym *l = &syms[top.left], *r = &syms[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue;
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) syms[r->next].prev = top.left;
        r->len = 0;
        tok_bpe_maybe_add(t, w, s, l->prev, top.left);
        tok_bpe_maybe_add(t, w, s, top.left, l->next);
    }
    for (int i = 0; i != -1; i = syms[i].next) tok_bpe_resegment(t, w, s, syms[i].start, syms[i].len, 0);
}

static inline void tok_push_id(TokWork *w, int id) {
    if (w->n_ids == w->cap_ids) w->ids = (int32_t *)tok_grow(w->ids, &w->cap_ids, w->n_ids + 1, sizeof(int32_t));
    w->ids[w->n_ids++] = id;
}

// one line -> w->ids[0..w->n_ids)
static inline void tok_encode_work(const Tokenizer *t, TokWork *w, const char *text, size_t len) {
    w->n_ids = 0;
    w->n_segs = 0;
    tok_normalize(t, &t->norm, 1, t->flags & TOK_TREAT_WHITESPACE_AS_SUFFIX, text, len, &w->norm);
    if (w->norm.n == 0) return;
    if (w->norm.n > (size_t)INT32_MAX / 2) die("tokenizer: a line of %zu bytes is too long to encode", len);
    const char *s = w->norm.p;
    if (t->model_type == TOK_UNIGRAM) tok_encode_unigram(t, w, s, (int)w->norm.n);
    else tok_encode_bpe(t, w, s, (int)w->norm.n);
    // sentencepiece_processor.cc PopulateSentencePieceText
    int prev_unk = 0;
    const int byte_fallback = t->flags & TOK_BYTE_FALLBACK;
    for (size_t i = 0; i < w->n_segs; i++) {
        const TokSeg *g = &w->segs[i];
        const int is_unk = t->types[g->id] == TOK_UNKNOWN;
        if (is_unk && byte_fallback) {
            for (int k = 0; k < g->len; k++) tok_push_id(w, t->byte_id[(unsigned char)s[g->start + k]]);
        } else if (!(is_unk && prev_unk)) {
            tok_push_id(w, g->id);
        }
        prev_unk = is_unk;
    }
}

static inline int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int32_t *ids, int max_ids) {
    TokWork w;
    memset(&w, 0, sizeof(w));
    tok_encode_work(t, &w, text, len);
    if (w.n_ids > (size_t)(max_ids < 0 ? 0 : max_ids))
        die("tokenizer_encode: the text (%zu bytes) needs %zu ids, room for %d", len, w.n_ids, max_ids);
    if (w.n_ids) memcpy(ids, w.ids, w.n_ids * sizeof(int32_t));
    int n = (int)w.n_ids;
    tok_work_free(&w);
    return n;
}

// ----------------------------------------------------------------------------
// decoding (sentencepiece_processor.cc Decode)

static inline int tok_starts_with_space_symbol(const Tokenizer *t, int id) {
    return tok_is_space_symbol(t->pieces + t->offset[id], t->offset[id + 1] - t->offset[id] - 1);
}

static inline const char *tokenizer_piece_text(const Tokenizer *t, int id, int is_first, size_t *len) {
    if (id < 0 || id >= t->vocab_size)
        die("tokenizer: id %d is out of range [0, %d)", id, t->vocab_size);
    int type = t->types[id];
    if (type == TOK_CONTROL) { *len = 0; return ""; }
    if (type == TOK_UNKNOWN) { *len = t->unk_surface_len; return t->unk_surface; }
    if (type == TOK_BYTE) {
        *len = 1;
        return &t->byte_char[t->byte_of[id]];
    }
    const char *s = t->texts + t->text_offset[id];
    size_t n = t->text_offset[id + 1] - t->text_offset[id];
    if (is_first && (t->flags & (TOK_ADD_DUMMY_PREFIX | TOK_REMOVE_EXTRA_WHITESPACES)) &&
        tok_starts_with_space_symbol(t, id)) { s++; n--; }
    *len = n;
    return s;
}

// byte pieces ids[b..e) -> their bytes, a U+FFFD for each byte outside valid UTF-8
static inline void tok_decode_bytes(const Tokenizer *t, const int32_t *ids, int b, int e, TokBuf *out, TokBuf *tmp) {
    if (b >= e) return;
    tmp->n = 0;
    for (int i = b; i < e; i++) tok_buf_putc(tmp, (char)t->byte_of[ids[i]]);
    const unsigned char *p = (const unsigned char *)tmp->p;
    size_t n = tmp->n, off = 0;
    while (off < n) {
        int mblen;
        if (!tok_valid_utf8(p + off, n - off, &mblen)) tok_buf_put(out, TOK_REPLACEMENT_CHAR, 3);
        else tok_buf_put(out, (const char *)p + off, (size_t)mblen);
        off += (size_t)mblen;
    }
}

static inline void tok_check_id(const Tokenizer *t, int id) {
    if (id < 0 || id >= t->vocab_size) die("tokenizer: id %d is out of range [0, %d)", id, t->vocab_size);
}

// the piece of id as the model spells it ("\u2581the", "<0x0A>", "<unk>")
static inline const char *tokenizer_piece(const Tokenizer *t, int id) {
    tok_check_id(t, id);
    return t->pieces + t->offset[id];
}

// ids -> text in out (replacing its contents; not NUL-terminated)
static inline void tok_decode_work(const Tokenizer *t, const int32_t *ids, int n, TokBuf *out, TokBuf *tmp) {
    out->n = 0;
    for (int i = 0; i < n; i++) tok_check_id(t, ids[i]);
    int is_bos_ws = 1, bos_ws_seen = 0, byte_start = 0;
    const int strip = t->flags & (TOK_ADD_DUMMY_PREFIX | TOK_REMOVE_EXTRA_WHITESPACES);
    const int remove_extra = t->flags & TOK_REMOVE_EXTRA_WHITESPACES;
    for (int i = 0; i < n; i++) {
        int id = ids[i], type = t->types[id];
        if (type == TOK_BYTE) continue;
        tok_decode_bytes(t, ids, byte_start, i, out, tmp);
        if (bos_ws_seen || out->n > 0) is_bos_ws = 0;
        byte_start = i + 1;
        bos_ws_seen = 0;
        if (type == TOK_CONTROL) continue;
        if (type == TOK_UNKNOWN) { tok_buf_put(out, t->unk_surface, t->unk_surface_len); continue; }
        const char *s = t->texts + t->text_offset[id];
        size_t len = t->text_offset[id + 1] - t->text_offset[id];
        if (is_bos_ws && strip && tok_starts_with_space_symbol(t, id)) {
            s++; len--;
            bos_ws_seen = !remove_extra;
        }
        tok_buf_put(out, s, len);
    }
    tok_decode_bytes(t, ids, byte_start, n, out, tmp);
    if (t->denorm.units) {
        tok_normalize(t, &t->denorm, 0, 0, out->p, out->n, tmp);
        out->n = 0;
        tok_buf_put(out, tmp->p, tmp->n);
    }
}

static inline void tokenizer_decode(const Tokenizer *t, const int32_t *ids, int n, char *out, size_t outsize) {
    TokBuf text, tmp;
    memset(&text, 0, sizeof(text));
    memset(&tmp, 0, sizeof(tmp));
    tok_decode_work(t, ids, n, &text, &tmp);
    if (text.n + 1 > outsize)
        die("tokenizer_decode: %d ids decode to %zu bytes, the output buffer holds %zu (with its NUL)",
            n, text.n, outsize);
    if (text.n) memcpy(out, text.p, text.n);
    out[text.n] = 0;
    free(text.p);
    free(tmp.p);
}

// ----------------------------------------------------------------------------
// the CLI modes of ./run -z TOK.bin --encode | --decode

// reads lines of a FILE in 64 KiB blocks: NUL bytes and '\r' are kept as they are
typedef struct { FILE *f; char *buf; size_t pos, len; int eof; } TokReader;

// one line of r without its '\n' (as std::getline) into line; returns its length, -1 at the end
static inline long tok_read_line(TokReader *r, TokBuf *line) {
    const size_t block = 1 << 16;
    if (!r->buf) r->buf = (char *)mallocCheck(block);
    line->n = 0;
    int got = 0;
    for (;;) {
        if (r->pos == r->len) {
            if (r->eof) break;
            r->len = fread(r->buf, 1, block, r->f);
            r->pos = 0;
            if (r->len < block) {
                if (ferror(r->f)) die("tokenizer: read error on the input: %s", strerror(errno));
                r->eof = 1;
            }
            if (r->len == 0) break;
        }
        got = 1;
        const char *p = r->buf + r->pos;
        size_t avail = r->len - r->pos;
        const char *nl = (const char *)memchr(p, '\n', avail);
        size_t take = nl ? (size_t)(nl - p) : avail;
        tok_buf_put(line, p, take);
        r->pos += take + (nl ? 1 : 0);
        if (nl) return (long)line->n;
    }
    return got ? (long)line->n : -1;
}

static inline void tokenizer_encode_stream(const Tokenizer *t, FILE *in, FILE *out) {
    TokWork w;
    TokBuf line, o;
    TokReader r;
    memset(&r, 0, sizeof(r));
    r.f = in;
    memset(&w, 0, sizeof(w));
    memset(&line, 0, sizeof(line));
    memset(&o, 0, sizeof(o));
    for (;;) {
        long n = tok_read_line(&r, &line);
        if (n < 0) break;
        tok_encode_work(t, &w, line.p, (size_t)n);
        o.n = 0;
        tok_buf_reserve(&o, w.n_ids * 12 + 2);
        for (size_t i = 0; i < w.n_ids; i++) {
            if (i) o.p[o.n++] = ' ';
            char digits[12];
            int k = 0;
            uint32_t v = (uint32_t)w.ids[i];
            do { digits[k++] = (char)('0' + v % 10); v /= 10; } while (v);
            while (k) o.p[o.n++] = digits[--k];
        }
        o.p[o.n++] = '\n';
        if (fwrite(o.p, 1, o.n, out) != o.n) die("tokenizer: write error: %s", strerror(errno));
    }
    if (fflush(out) != 0) die("tokenizer: write error: %s", strerror(errno));
    tok_work_free(&w);
    free(line.p);
    free(o.p);
    free(r.buf);
}

static inline void tokenizer_decode_stream(const Tokenizer *t, FILE *in, FILE *out) {
    TokBuf line, text, tmp;
    TokReader r;
    memset(&r, 0, sizeof(r));
    r.f = in;
    memset(&line, 0, sizeof(line));
    memset(&text, 0, sizeof(text));
    memset(&tmp, 0, sizeof(tmp));
    int32_t *ids = NULL;
    size_t cap = 0;
    long lineno = 0;
    for (;;) {
        long n = tok_read_line(&r, &line);
        if (n < 0) break;
        lineno++;
        // split on ' ' (spm_decode: absl::StrSplit(line, " "), empty fields skipped)
        size_t nids = 0;
        for (size_t i = 0; i < (size_t)n;) {
            if (line.p[i] == ' ') { i++; continue; }
            size_t j = i;
            while (j < (size_t)n && line.p[j] != ' ') j++;
            const char *tok = line.p + i;
            size_t tl = j - i;
            size_t k = (tok[0] == '-' || tok[0] == '+') ? 1 : 0;
            int ok = k < tl;
            long long v = 0;
            for (size_t q = k; ok && q < tl; q++) {
                if (tok[q] < '0' || tok[q] > '9') ok = 0;
                else if (v < 1000000000000LL) v = v * 10 + (tok[q] - '0');
            }
            int shown = tl > 40 ? 40 : (int)tl;
            if (!ok)
                die("decode: line %ld: \"%.*s%s\" is not an id (a decimal integer)", lineno, shown, tok,
                    tl > 40 ? "..." : "");
            if (tok[0] == '-') v = -v;
            if (v < 0 || v >= t->vocab_size)
                die("decode: line %ld: id %.*s%s is out of range [0, %d)", lineno, shown, tok,
                    tl > 40 ? "..." : "", t->vocab_size);
            if (nids == cap) ids = (int32_t *)tok_grow(ids, &cap, nids + 1, sizeof(int32_t));
            ids[nids++] = (int32_t)v;
            i = j;
        }
        tok_decode_work(t, ids, (int)nids, &text, &tmp);
        tok_buf_putc(&text, '\n');
        if (fwrite(text.p, 1, text.n, out) != text.n) die("tokenizer: write error: %s", strerror(errno));
    }
    if (fflush(out) != 0) die("tokenizer: write error: %s", strerror(errno));
    free(ids);
    free(r.buf);
    free(line.p);
    free(text.p);
    free(tmp.p);
}

#endif  // TOKENIZER_H
