// gemm.c: the CPU's matrix products (gemm.h), fast. A reader of the model
// can skip this file: it computes exactly what openmoe.c's plain loops
// compute (make PLAIN=1 builds those instead), the same bits, only faster.
//
// What it does, for the curious: a BLIS-style engine in GCC vector
// extensions (AVX-512 or AVX2 intrinsics only for register transposes and
// streaming stores). C is cut into tasks, a range of columns times a group of
// rows, that the threads take from one pool; a task packs its range of B
// into its thread's own L2 block, a slice of depth at a time, and runs
// register tiles of MR x NR accumulators over it, A packed or read in place.
// Every element is still one chain of multiply-adds in k order: the tiling
// changes where a chain's partial sums wait (registers, then C between
// passes), never its order. Sections: the register tile; packing; the tasks
// and their plan; the products gemm.h names; decode's matvec and transposes.
// What was measured for each choice is in doc/engine-notes.md.
#include "gemm.h"
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// the register tile. One kernel: C[M,N] (+)= A[M,K] B[K,N], with C row-major,
// A read through strides (A[i*ars + k*aks]) so that it can be a transposed
// view, and B row-major or the transpose of a row-major W. Each C element is
// one chain c = c + a*b over k in order (fused multiply-adds under
// -ffp-contract=fast).
//
// The tile follows the compile target: VW floats per vector, MR x NR
// accumulators that fill the vector registers, and two vectors of B plus one
// broadcast of A beside them. GCC's generic vectors compile to one register
// each under AVX-512 (zmm) and AVX (ymm), and to pairs of xmm (or NEON q)
// registers elsewhere. A pass of a tile runs KC deep, with its KC x NR panel
// of B in L1. Under AVX-512, a product whose A is read in place
// (gemm_a_in_place: most forwards) runs KC_IN_PLACE deep: its panel streams
// from L2, and C is loaded and stored once per 512 of depth rather than
// twice. Packed A, and the AVX2 build, keep KC.
#if defined(__AVX512F__)
#define VW 16            // floats per vector: one zmm
#define MR 14            // rows of C per register tile: 28 of the 32 zmm registers
#define KC_IN_PLACE 512  // depth of one pass where A is read in place
#define GEMM_A_ROWS 112  // rows of A at a time at depth KC: GEMM_A_ROWS x KC of it (112 KB) stays in L2
#define TILES_ALONG_ROWS 1  // where C comes back from beyond L2 (gemm_range_rows)
#else
#define VW 8             // floats per vector: one ymm
#define MR 6             // rows of C per register tile: 12 of the 16 ymm registers
#define KC_IN_PLACE 256
#define GEMM_A_ROWS 96   // (96 KB)
#define TILES_ALONG_ROWS 0
#endif
#define KC 256                              // depth of one pass: a KC x NR panel of B (32 KB, AVX2 16) in L1
#define GEMM_A_FLOATS (GEMM_A_ROWS * KC)    // a block of A: rows x depth, the rows fewer where passes are deeper
#define NR (2 * VW)  // columns of C per register tile: two vectors
#define GEMM_PARALLEL_MIN (1 << 15)  // multiply-adds below which one thread is faster

typedef float vecf __attribute__((vector_size(VW * sizeof(float)), aligned(4)));  // any float alignment

// a: an MR x K panel of A, a[r*ars + k*aks]: packed k-major (ars 1, aks
// MR) or, for A with rows along k, read in place (ars its row stride, aks 1);
// bp: a K x NR panel of B packed k-major (bp[k*NR + j]); C (MR,NR) with
// leading dim ldc. The 2*MR accumulators live in vector registers. With
// `stream` (C's last pass; rows aligned to the vector), the tile goes to
// memory with non-temporal stores, without reading C's lines in first (see
// gemm_streams). Inlined, so that each caller's strides are constants where
// they can be.
static inline __attribute__((always_inline)) void gemm_tile(float *C, int ldc, const float *a, int ars, int aks,
                                                            const float *bp, int K, int load_c, int stream) {
    vecf acc[MR][2];
    for (int r = 0; r < MR; r++) {
        vecf zero = {0};
        acc[r][0] = load_c ? *(const vecf *)(C + (size_t)r * ldc) : zero;
        acc[r][1] = load_c ? *(const vecf *)(C + (size_t)r * ldc + VW) : zero;
    }
    for (int k = 0; k < K; k++) {
        vecf b0 = *(const vecf *)(bp + k * NR), b1 = *(const vecf *)(bp + k * NR + VW);
        for (int r = 0; r < MR; r++) {
            float a_rk = a[(size_t)r * ars + (size_t)k * aks];
            acc[r][0] = acc[r][0] + a_rk * b0;
            acc[r][1] = acc[r][1] + a_rk * b1;
        }
    }
#if defined(__AVX512F__)
    if (stream) {
        for (int r = 0; r < MR; r++)
            for (int h = 0; h < 2; h++) _mm512_stream_ps(C + (size_t)r * ldc + h * VW, (__m512)acc[r][h]);
        return;
    }
#endif
    for (int r = 0; r < MR; r++) {
        *(vecf *)(C + (size_t)r * ldc) = acc[r][0];
        *(vecf *)(C + (size_t)r * ldc + VW) = acc[r][1];
    }
}

// ----------------------------------------------------------------------------
// packing

// the VW x VW block in rows r[0..VW-1] transposed in place. With AVX-512
// or AVX, a network of immediate-operand unpacks and shuffles (the generic
// form compiles to two-source permutes that each need an index register):
// pairs of rows are interleaved by floats, then by pairs of floats, then
// (AVX-512) 128-bit lanes are gathered twice, each lane of the result from
// its own row group.
#if defined(__AVX512F__)
static inline void transpose_block(vecf *r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {  // t: (r[i][c], r[i+1][c]) pairs, per 128-bit lane
        t[i] = _mm512_unpacklo_ps((__m512)r[i], (__m512)r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps((__m512)r[i], (__m512)r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // u[i+m], lane L: rows i..i+3 of column 4L+m
        __m512d t0 = (__m512d)t[i], t1 = (__m512d)t[i + 1], t2 = (__m512d)t[i + 2], t3 = (__m512d)t[i + 3];
        u[i] = (__m512)_mm512_unpacklo_pd(t0, t2);
        u[i + 1] = (__m512)_mm512_unpackhi_pd(t0, t2);
        u[i + 2] = (__m512)_mm512_unpacklo_pd(t1, t3);
        u[i + 3] = (__m512)_mm512_unpackhi_pd(t1, t3);
    }
    for (int m = 0; m < 4; m++) {  // column 4L+m: lane L of u[m], u[4+m], u[8+m], u[12+m]
        __m512 even = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), odd = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
        __m512 even2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
        __m512 odd2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
        r[m] = (vecf)_mm512_shuffle_f32x4(even, even2, 0x88);
        r[4 + m] = (vecf)_mm512_shuffle_f32x4(odd, odd2, 0x88);
        r[8 + m] = (vecf)_mm512_shuffle_f32x4(even, even2, 0xDD);
        r[12 + m] = (vecf)_mm512_shuffle_f32x4(odd, odd2, 0xDD);
    }
}
#elif defined(__AVX__)
static inline void transpose_block(vecf *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {  // t: (r[i][c], r[i+1][c]) pairs, per 128-bit lane
        t[i] = _mm256_unpacklo_ps((__m256)r[i], (__m256)r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps((__m256)r[i], (__m256)r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  // u[i+m], lane L: rows i..i+3 of column 4L+m
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) {  // column 4L+m: lane L of u[m] and u[4+m]
        r[m] = (vecf)_mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
        r[4 + m] = (vecf)_mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
}
#else
// generic: log2(VW) stages, each swapping the off-diagonal h x h blocks of
// the row pairs (i, i+h); the shuffles are constants once the loops unroll
typedef int veci __attribute__((vector_size(VW * sizeof(int))));
static inline void transpose_block(vecf *r) {
#pragma GCC unroll 8
    for (int h = VW / 2; h >= 1; h /= 2) {
        veci lo, hi;
#pragma GCC unroll 16
        for (int p = 0; p < VW; p++) {
            lo[p] = (p & h) ? VW + p - h : p;
            hi[p] = (p & h) ? VW + p : p + h;
        }
#pragma GCC unroll 16
        for (int i = 0; i < VW; i++)
            if (!(i & h)) {
                vecf a = r[i], b = r[i + h];
                r[i] = __builtin_shuffle(a, b, lo);
                r[i + h] = __builtin_shuffle(a, b, hi);
            }
    }
}
#endif

// ap (kc,MR) k-major = rows i..i+mr-1, columns k0..k0+kc-1 of A, zero rows
// below mr. Where VW rows of A can be read from i (avail of them) and A runs
// along k (aks 1), whole VW x VW blocks go through the vector registers: k's
// VW values land at ap + k*MR, and the VW-MR past the tile's rows are
// overwritten by k+1's (so the buffer keeps VW floats to spare past its last
// tile). Whole tiles of A along i (ars 1) never come here: gemm_pack_block
// copies them.
static void gemm_pack_a(float *ap, const float *A, int ars, int aks, int i, int mr, int avail, int k0, int kc) {
    const float *a = A + (size_t)i * ars + (size_t)k0 * aks;
    int k = 0;
    if (mr == MR && avail >= VW && aks == 1)
        for (; k + VW <= kc; k += VW) {
            vecf r[VW];
            for (int t = 0; t < VW; t++) r[t] = *(const vecf *)(a + (size_t)t * ars + k);
            transpose_block(r);
            for (int t = 0; t < VW; t++) *(vecf *)(ap + (k + t) * MR) = r[t];
        }
    if (mr == MR) {  // no test per element
        for (; k < kc; k++)
            for (int r = 0; r < MR; r++) ap[k * MR + r] = a[(size_t)r * ars + (size_t)k * aks];
        return;
    }
    for (; k < kc; k++)
        for (int r = 0; r < MR; r++) ap[k * MR + r] = r < mr ? a[(size_t)r * ars + (size_t)k * aks] : 0.0f;
}

// bp (kc,NR) = rows 0..kc-1, columns 0..nr-1 of B (rows ldb apart), zero columns past nr
static void gemm_pack_b(float *bp, const float *B, int ldb, int nr, int kc) {
    for (int k = 0; k < kc; k++) {
        const float *b = B + (size_t)k * ldb;
        if (nr == NR) {
            *(vecf *)(bp + k * NR) = *(const vecf *)b;
            *(vecf *)(bp + k * NR + VW) = *(const vecf *)(b + VW);
        } else {
            for (int j = 0; j < NR; j++) bp[k * NR + j] = j < nr ? b[j] : 0.0f;
        }
    }
}

// The same panel of B^T: bp (kc,NR) = columns 0..kc-1 of rows 0..nr-1 of W
// (rows ldw apart), zero columns past nr. A full panel goes VW x VW block
// by block through the vector registers; the rest element by element.
static void gemm_pack_bt(float *bp, const float *W, int ldw, int nr, int kc) {
    int k0 = 0;
    if (nr == NR)
        for (; k0 + VW <= kc; k0 += VW)
            for (int j0 = 0; j0 < NR; j0 += VW) {
                vecf r[VW];
                for (int t = 0; t < VW; t++) r[t] = *(const vecf *)(W + (size_t)(j0 + t) * ldw + k0);
                transpose_block(r);
                for (int t = 0; t < VW; t++) *(vecf *)(bp + (k0 + t) * NR + j0) = r[t];
            }
    for (int k = k0; k < kc; k++)
        for (int j = 0; j < NR; j++) bp[k * NR + j] = j < nr ? W[(size_t)j * ldw + k] : 0.0f;
}

// One tile of C, mr x nr of it inside C (an edge tile runs in a buffer, so
// that one kernel serves every tile); A as gemm_tile reads it
static inline __attribute__((always_inline)) void gemm_tile_edge(float *C, int ldc, const float *a, int ars, int aks,
                                                                  const float *bp, int kc, int load_c, int stream,
                                                                  int mr, int nr) {
    if (mr == MR && nr == NR) {
        gemm_tile(C, ldc, a, ars, aks, bp, kc, load_c, stream);
        return;
    }
    float tile[MR * NR] = {0};
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) tile[r * NR + j] = C[(size_t)r * ldc + j];
    gemm_tile(tile, NR, a, ars, aks, bp, kc, load_c, 0);
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) C[(size_t)r * ldc + j] = tile[r * NR + j];
}

// bp (kc,NR): the panel of columns j..j+nr-1 of B at depth k0..k0+kc-1, from
// B (K,N) row-major or, transposed, from W (N,K) row-major (B = W^T); rows
// ldb apart. Reading W's rows is what the transposed packing waits on, so it
// asks for the next panel's rows meanwhile. W stored in bf16 or int8 is
// widened row by row into fp32 first (weight_decode: the values a version-1
// file holds), then packed as fp32 is.
static void gemm_pack_panel(float *bp, const float *B, Weight W, int ldb, int transposed, int j, int nr, int N, int k0,
                            int kc) {
    if (!transposed) {
        gemm_pack_b(bp, B + (size_t)k0 * ldb + j, ldb, nr, kc);
        return;
    }
    size_t bytes = W.type == WEIGHT_FP32 ? 4 : W.type == WEIGHT_BF16 ? 2 : 1, at = (size_t)j * ldb + k0;
    const char *next = (const char *)W.values + at * bytes;
    for (int r = NR; r < 2 * NR && j + r < N; r++)
        for (size_t k = 0; k < kc * bytes; k += 64) __builtin_prefetch(next + (size_t)r * ldb * bytes + k);
    if (W.type == WEIGHT_FP32) {
        gemm_pack_bt(bp, (const float *)W.values + at, ldb, nr, kc);
        return;
    }
    float rows[NR * KC_IN_PLACE];  // kc <= a pass <= KC_IN_PLACE
    for (int r = 0; r < nr; r++) weight_decode(rows + (size_t)r * kc, W, at + (size_t)r * ldb, kc);
    gemm_pack_bt(bp, rows, kc, nr, kc);
}

// ----------------------------------------------------------------------------
// the tasks. C is cut into tasks, a range of columns times a group of rows,
// which the threads take in turn. A task packs its range of B itself, one
// depth slice at a time, into bblock (its thread's own, in L2), then its
// rows' A, a block at a time. Nothing packed is shared between threads: a
// core that writes over lines another core has read, or reads lines another
// has written, runs at memory speed. A task runs its rows' chains to the
// end, so no task waits for another.
#define GEMM_B_FLOATS (1 << 17)       // a thread's packed B, 512 KB: half of L2
#define GEMM_MIN_RANGE_COLS 256       // a slice is shallow enough for a range this wide
#define GEMM_RANGE_COLS 512           // and a range at most this wide
#define GEMM_TASKS_PER_THREAD 4       // rows are cut into groups (whole tiles) until there are this many tasks
#define GEMM_MIN_NARROWED_COLS 192    // a range narrowed to make tasks keeps this many columns
#define GEMM_GROUP_TILES 16           // rows cut into groups of at least this many tiles are cut evenly enough

typedef struct {  // C (M,N) (+)= A (M,K) @ B
    float *C;
    int ldc;
    const float *A;  // A[i*ars + k*aks]: A or a transposed view
    int ars, aks;
    const float *B;  // B (K,N) row-major, rows ldb apart
    Weight W;        // transposed: W (N,K) row-major as stored, rows ldb apart, for B = W^T
    int ldb, transposed;
    int M, N, K, accumulate;
    int pass, block_rows;                     // depth of a tile's pass; rows of A per block
    int depth, range, ranges, groups, tiles;  // the tasks, as gemm_plan cuts them
    int stream;                               // gemm_streams
} Gemm;

// bblock: the panels of columns j0..j1-1 of B at depth d0..d0+dk-1; pass
// k0 (from d0, g->pass deep), panel j at bblock + k0*cols + (j-j0)*kc,
// cols = j1-j0 rounded up to NR
static void gemm_pack_range(float *bblock, const Gemm *g, int j0, int j1, int d0, int dk) {
    int cols = (j1 - j0 + NR - 1) / NR * NR;
    for (int k0 = 0; k0 < dk; k0 += g->pass) {
        int kc = dk - k0 < g->pass ? dk - k0 : g->pass;
        for (int j = j0; j < j1; j += NR)
            gemm_pack_panel(bblock + (size_t)k0 * cols + (size_t)(j - j0) * kc, g->B, g->W, g->ldb, g->transposed,
                            j, j1 - j < NR ? j1 - j : NR, g->N, d0 + k0, kc);
    }
}

// The cache lines of A that the tiles of rows i..i+rows-1 at depth
// k0..k0+kc-1 read (or gemm_pack_a does), numbered along A's unit stride:
// lines from..to-1 of them are prefetched, so that the next block of A comes
// from L2 rather than memory
static int gemm_a_lines(const Gemm *g, int rows, int kc) {
    if (g->aks == 1) return rows * ((kc + LINE_FLOATS - 1) / LINE_FLOATS);
    if (g->ars == 1) return kc * ((rows + LINE_FLOATS - 1) / LINE_FLOATS);
    return 0;
}
static void gemm_prefetch_a(const Gemm *g, int i, int rows, int k0, int kc, int from, int to) {
    const float *base = g->A + (size_t)i * g->ars + (size_t)k0 * g->aks;
    size_t step = g->aks == 1 ? g->ars : g->aks;  // from one run of lines to the next
    int per = ((g->aks == 1 ? kc : rows) + LINE_FLOATS - 1) / LINE_FLOATS, run = from / per, l = from % per;
    for (int n = from; n < to; n++) {
        __builtin_prefetch(base + run * step + (size_t)l * LINE_FLOATS, 0, 2);
        if (++l == per) l = 0, run++;
    }
}

// A read in place: rows along k, deep enough that a tile's fixed costs do
// not outweigh packing, and a row stride that spreads a tile's rows over
// L1's sets (rows a multiple of 4 KB apart share one set, and 14 of them
// with the B panel's lines overflow its 12 ways).
#define L1_SET_SPAN 4096         // bytes after which L1's set index repeats
#define GEMM_IN_PLACE_MIN_K 64   // shallower A is packed
static int gemm_a_in_place(const Gemm *g) {
    size_t stride = (size_t)g->ars * sizeof(float), same = L1_SET_SPAN;  // same: gcd(stride, L1_SET_SPAN)
    while (stride % same) same /= 2;
    return g->aks == 1 && g->K >= GEMM_IN_PLACE_MIN_K && MR * same / L1_SET_SPAN <= MR / 2;
}

// apack: the tiles of rows ib..ie-1 of A at depth k0..k0+kc-1 that are not
// read in place, MR*kc floats each. A along i (ars 1: dout^T in dW) is
// copied k by k across all of the block's whole tiles, so that each row of
// A (a k, rows often pages apart) is visited once per block rather than once
// per tile.
static void gemm_pack_block(float *apack, const Gemm *g, int ib, int ie, int k0, int kc, int in_place) {
    int i = ib;
    if (!in_place && g->ars == 1) {
        int whole = (ie - ib) / MR;  // tiles of MR rows with VW rows of A to read
        while (whole > 0 && g->M - (ib + (whole - 1) * MR) < VW) whole--;
        const float *a = g->A + ib + (size_t)k0 * g->aks;
        for (int k = 0; k < kc - 1; k++, a += g->aks)  // VW-MR floats spill over into k+1's, written next
            for (int t = 0; t < whole; t++)
                *(vecf *)(apack + (size_t)t * MR * kc + k * MR) = *(const vecf *)(a + t * MR);
        for (int t = 0; t < whole; t++)  // the last k would spill over into the next tile's first
            memcpy(apack + (size_t)t * MR * kc + (size_t)(kc - 1) * MR, a + t * MR, MR * sizeof(float));
        i = ib + whole * MR;
    }
    for (; i < ie; i += MR)
        if (!in_place || ie - i < MR)
            gemm_pack_a(apack + (size_t)(i - ib) * kc, g->A, g->ars, g->aks, i, ie - i < MR ? ie - i : MR, g->M - i,
                        k0, kc);
}

// rows i0..i1-1 times columns j0..j1-1 of C at depth d0..d0+dk-1, B's range
// packed in bblock: g->block_rows at a time, their A and C's block staying
// in L2 while the passes go by. A that gemm_a_in_place allows (activations,
// output gradients) is read in place by whole tiles of rows, saving the
// packing; other A, and a last partial tile of rows, is packed. While one
// block of A runs, the next is prefetched, a share of its lines per tile.
// The tiles walk down the block's rows panel by panel, a panel of B staying
// in L1, except (TILES_ALONG_ROWS, AVX-512) in the first pass of a later
// slice, whose C comes back from beyond L2 (the slice before has since
// written the other rows'): they walk along each row group's columns, so
// that each tile's C continues the rows the tile before read. Walking down,
// the rows of a tile's C are new and, as ldc is often a multiple of 512, a
// multiple of 4 KB from the rows just stored.
static void gemm_range_rows(const Gemm *g, const float *bblock, int i0, int i1, int j0, int j1, int d0, int dk) {
    float apack[GEMM_A_FLOATS + VW] __attribute__((aligned(64)));  // VW to spare: gemm_pack_a
    int cols = (j1 - j0 + NR - 1) / NR * NR, in_place = gemm_a_in_place(g), mc = g->block_rows, pass = g->pass;
    for (int ib = i0; ib < i1; ib += mc) {
        int ie = ib + mc < i1 ? ib + mc : i1;
        for (int k0 = 0; k0 < dk; k0 += pass) {
            int kc = dk - k0 < pass ? dk - k0 : pass, load_c = g->accumulate || d0 + k0 > 0;
            int stream = g->stream && d0 + k0 + kc == g->K;  // C's last pass
            gemm_pack_block(apack, g, ib, ie, d0 + k0, kc, in_place);
            // the next block of A: these rows' next depth block, else the next rows
            int nb = k0 + pass < dk ? ib : ie, nk = k0 + pass < dk ? k0 + pass : 0;
            int n_rows = (nb + mc < i1 ? nb + mc : i1) - nb, n_kc = dk - nk < pass ? dk - nk : pass;
            int lines = nb < i1 ? gemm_a_lines(g, n_rows, n_kc) : 0, issued = 0;
            int panels = (j1 - j0 + NR - 1) / NR, rows = (ie - ib + MR - 1) / MR, tiles = panels * rows;
            int per_tile = (lines + tiles - 1) / tiles, along_rows = TILES_ALONG_ROWS && load_c && k0 == 0;
            for (int t = 0; t < tiles; t++) {
                int j = j0 + (along_rows ? t % panels : t / rows) * NR;
                int i = ib + (along_rows ? t / panels : t % rows) * MR;
                int mr = ie - i < MR ? ie - i : MR, nr = j1 - j < NR ? j1 - j : NR;
                if (issued < lines) {
                    int upto = issued + per_tile < lines ? issued + per_tile : lines;
                    gemm_prefetch_a(g, nb, n_rows, d0 + nk, n_kc, issued, upto);
                    issued = upto;
                }
                float *c = g->C + (size_t)i * g->ldc + j;
                const float *bp = bblock + (size_t)k0 * cols + (size_t)(j - j0) * kc;
                if (in_place && mr == MR)
                    gemm_tile_edge(c, g->ldc, g->A + (size_t)i * g->ars + d0 + k0, g->ars, 1, bp, kc, load_c, stream,
                                   MR, nr);
                else
                    gemm_tile_edge(c, g->ldc, apack + (size_t)(i - ib) * kc, 1, MR, bp, kc, load_c, stream, mr, nr);
            }
        }
    }
}

// Whether C's last pass goes to memory with non-temporal stores: a C too
// big to stay in cache for whoever reads it next, whose rows are aligned to
// the vector. Ordinary stores first read each line of C in from memory;
// streaming stores do not. Only the last pass: a streamed C that the next
// depth block reads back would come from memory. AVX-512 only: the AVX2 tile
// writes C at half the rate, too slowly for the saved reads to matter.
#define GEMM_STREAM_BYTES (4 << 20)  // C at least this big
static int gemm_streams(const Gemm *g) {
#if defined(__AVX512F__)
    size_t align = VW * sizeof(float);
    return (size_t)g->M * g->N * sizeof(float) >= GEMM_STREAM_BYTES && (uintptr_t)g->C % align == 0 &&
           g->ldc % VW == 0;
#else
    return 0;
#endif
}

// The tasks for `threads` threads: the slice as deep as a range of
// GEMM_MIN_RANGE_COLS allows, the range as wide as the slice allows, then
// the rows cut into groups (whole tiles) until there are tasks enough.
// Where those groups would be small (under GEMM_GROUP_TILES tiles: the 320
// rows of an expert), a single slice takes narrower ranges instead, as the
// threads of several groups would each pack the same range. Packed A is
// packed again for every range, so a deep product with packed A and N that
// fits one range of GEMM_RANGE_COLS takes that one range, with slices as
// shallow as it needs, and groups of rows for the threads.
static void gemm_plan(Gemm *g, int threads) {
    int in_place = gemm_a_in_place(g);
    g->pass = in_place ? KC_IN_PLACE : KC;
    g->block_rows = GEMM_A_FLOATS / g->pass;  // a multiple of MR
    int deepest = GEMM_B_FLOATS / GEMM_MIN_RANGE_COLS / g->pass * g->pass, widest = GEMM_RANGE_COLS / NR;
    int panels = (g->N + NR - 1) / NR, want = threads * GEMM_TASKS_PER_THREAD;
    g->tiles = (g->M + MR - 1) / MR;
    if (!in_place && g->K > deepest && panels <= widest && g->tiles >= GEMM_GROUP_TILES * threads) {
        int d = GEMM_B_FLOATS / (panels * NR) / KC * KC;  // packed A, packed once per range: one range of all N
        deepest = d > KC ? d : KC;
    }
    g->depth = g->K < deepest ? g->K : deepest;
    g->range = GEMM_B_FLOATS / (g->depth * NR) < widest ? GEMM_B_FLOATS / (g->depth * NR) : widest;  // in panels
    g->ranges = (panels + g->range - 1) / g->range;
    int small_groups = g->ranges < want && g->tiles / ((want + g->ranges - 1) / g->ranges) < GEMM_GROUP_TILES;
    if (g->K <= g->depth && small_groups && panels / (GEMM_MIN_NARROWED_COLS / NR) >= want)
        g->ranges = want;  // narrower ranges rather than small groups, whose threads would each pack the same range
    g->groups = g->ranges >= want ? 1 : (want + g->ranges - 1) / g->ranges;
    if (g->K > g->depth) {  // a group packs its range anew slice by slice: only groups enough for a task per thread
        int one_each = (threads + g->ranges - 1) / g->ranges;
        g->groups = g->groups < one_each ? g->groups : one_each;
    }
    g->groups = g->groups < g->tiles ? g->groups : g->tiles;
    g->stream = gemm_streams(g);
}

// a thread's packed range of B (gemm_task), or a narrow W^T (gemm_bt), made with the thread
static __thread float gemm_bblock[GEMM_B_FLOATS] __attribute__((aligned(64)));

// what a thread's bblock holds: product g's range and slice `block`
typedef struct {
    const Gemm *g;
    int block;
} GemmHeld;

// task t of a pool of products g[0], g[1], ..., their tasks one after
// another: a range of columns times a group of rows of C, slice by slice of
// depth. *held says what this thread's bblock holds, so that a thread
// taking the next group of the same range (a single slice) does not pack it
// again.
static void gemm_task(const Gemm *g, int t, GemmHeld *held) {
    float *bblock = gemm_bblock;
    for (; t >= g->ranges * g->groups; g++) t -= g->ranges * g->groups;
    int r = t / g->groups, p = t % g->groups, panels = (g->N + NR - 1) / NR;
    int slices = (g->K + g->depth - 1) / g->depth;
    int j0 = panels * r / g->ranges * NR, j1 = panels * (r + 1) / g->ranges * NR;  // the panels spread evenly
    j1 = j1 < g->N ? j1 : g->N;
    int i0 = g->tiles * p / g->groups * MR, i1 = g->tiles * (p + 1) / g->groups * MR;
    for (int d0 = 0; d0 < g->K; d0 += g->depth) {
        int dk = g->K - d0 < g->depth ? g->K - d0 : g->depth, block = r * slices + d0 / g->depth;
        if (held->g != g || held->block != block) gemm_pack_range(bblock, g, j0, j1, d0, dk);
        *held = (GemmHeld){g, block};
        gemm_range_rows(g, bblock, i0, i1 < g->M ? i1 : g->M, j0, j1, d0, dk);
    }
#if defined(__AVX512F__)
    if (g->stream) _mm_sfence();  // streamed stores are weakly ordered: done before whoever reads C
#endif
}

// C (M,N) (+)= A (M,K) @ B, as Gemm says: a product for gemm_on
static Gemm gemm_product(float *C, int ldc, const float *A, int ars, int aks, const float *B, int ldb, int transposed,
                         int M, int N, int K, int accumulate) {
    return (Gemm){.C = C, .ldc = ldc, .A = A, .ars = ars, .aks = aks, .B = B, .W = weight_fp32(B), .ldb = ldb,
                  .transposed = transposed, .M = M, .N = N, .K = K, .accumulate = accumulate};
}

// all threads for a product of g's size, one for a small one
static int gemm_threads(const Gemm *g) {
#ifdef _OPENMP
    if ((size_t)g->M * g->N * g->K > GEMM_PARALLEL_MIN) return omp_get_max_threads();
#endif
    return 1;
}

// the n products g[0..n-1], independent of each other, on `threads` threads
// (1: on the calling thread, without a team), their tasks in one pool: a
// thread done with its share of one product (a backward's input gradient)
// goes on to the next (its weight gradient) rather than waiting at a barrier
// for the others. The bits do not depend on the tasks: every element is one
// chain in k order.
static void gemm_on(Gemm *g, int n, int threads) {
    int tasks = 0;
    for (int p = 0; p < n; p++) {
        if (g[p].K <= 0) {  // an empty sum: no tasks
            if (!g[p].accumulate)
                for (int i = 0; i < g[p].M; i++) memset(g[p].C + (size_t)i * g[p].ldc, 0, g[p].N * sizeof(float));
            g[p].ranges = g[p].groups = 0;
            continue;
        }
        gemm_plan(&g[p], threads);
        tasks += g[p].ranges * g[p].groups;
    }
    if (threads == 1) {  // attention runs many small ones, each on a thread of its own loop
        GemmHeld held = {NULL, -1};
        for (int t = 0; t < tasks; t++) gemm_task(g, t, &held);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        GemmHeld held = {NULL, -1};
#pragma omp for schedule(dynamic, 1) nowait
        for (int t = 0; t < tasks; t++) gemm_task(g, t, &held);
    }
}

// ----------------------------------------------------------------------------
// the products gemm.h names


void gemm(float *C, int ldc, const float *A, int ars, int aks, const float *B, int ldb, int M, int N, int K,
          int accumulate) {
    Gemm g = gemm_product(C, ldc, A, ars, aks, B, ldb, 0, M, N, K, accumulate);
    gemm_on(&g, 1, 1);
}

// Narrow C (N <= VW, a router's E columns): one vector of columns per row,
// MR rows side by side, A read in place (packing it would cost more than the
// multiply-adds it feeds). bp (K,VW) is W^T zero-padded; rows i0..i1-1.
static void gemm_narrow_rows(float *C, int ldc, const float *A, int lda, const float *bp, int i0, int i1, int N,
                             int K) {
    for (int i = i0; i < i1; i += MR) {
        int mr = i1 - i < MR ? i1 - i : MR;
        const float *a = A + (size_t)i * lda;
        vecf acc[MR] = {{0}};
        if (mr == MR)  // mr known: unrolled
            for (int k = 0; k < K; k++)
                for (int r = 0; r < MR; r++) acc[r] = acc[r] + a[(size_t)r * lda + k] * *(const vecf *)(bp + k * VW);
        else
            for (int k = 0; k < K; k++)
                for (int r = 0; r < mr; r++) acc[r] = acc[r] + a[(size_t)r * lda + k] * *(const vecf *)(bp + k * VW);
        for (int r = 0; r < mr; r++) {
            float row[VW] __attribute__((aligned(64)));
            *(vecf *)row = acc[r];
            memcpy(C + (size_t)(i + r) * ldc, row, N * sizeof(float));
        }
    }
}

// C (M,N) = (or += with accumulate) A (M,K) @ W^T for W (N,K) row-major as
// stored, on all threads (one for a small product). A narrow W's transpose
// goes to the calling thread's bblock, which every thread then reads.
static void gemm_bt(float *C, int ldc, const float *A, int lda, Weight W, int M, int N, int K, int accumulate) {
    if (N > VW || accumulate || (size_t)K * VW > GEMM_B_FLOATS) {
        Gemm g = gemm_product(C, ldc, A, lda, 1, NULL, K, 1, M, N, K, accumulate);
        g.W = W;
        gemm_on(&g, 1, gemm_threads(&g));
        return;
    }
    float *wt_narrow = gemm_bblock;
    for (int k = 0; k < K; k++)
        for (int j = 0; j < VW; j++) wt_narrow[k * VW + j] = j < N ? weight_value(W, (size_t)j * K + k) : 0.0f;
    int tiles = (M + MR - 1) / MR;
#pragma omp parallel for schedule(static) if ((size_t)M * N * K > GEMM_PARALLEL_MIN)
    for (int t = 0; t < tiles; t++) gemm_narrow_rows(C, ldc, A, lda, wt_narrow, t * MR, t * MR + MR < M ? t * MR + MR : M, N, K);
}

// ----------------------------------------------------------------------------
// decode: one token's products and the transposes

// out (OUT) (+)= w (OUT,IN) @ inp (IN) over w as stored: one token's product,
// the bits of matmul_forward's row. Each output is one chain in i order, and
// a vector holds VW outputs' chains, so w is read VW rows at a time: per row
// one vector's worth of bytes (VW fp32 values, 2VW bf16, 4VW int8), the VW x
// VW block of 32-bit words transposed in registers (transpose_block), so that
// word t of the result holds each row's values at inputs t*per .. t*per+per-1
// (per = 1, 2, 4 values a word), which are widened to fp32 where they lie (a
// bf16 is a shift or a mask away from its float; an int8 two shifts, a
// conversion and its row's scale) and multiply-added in input order.
// MATVEC_BLOCKS blocks of VW rows run side by side, word by word, as a chain
// waits on its own latency. A thread's rows are one run of memory, and a
// task asks for the next task's rows while it runs, a block's bytes for each
// block it reads: the hardware's prefetchers do not follow VW rows read side
// by side. Int8 takes this path where each row's 4VW inputs of a block share
// a scale (its group a multiple of 4VW); other groups, and inputs past the
// last whole block, are decoded element by element first.
#define MATVEC_BLOCKS 2                    // blocks of VW rows side by side
#define MATVEC_PARALLEL_MIN (1 << 15)      // multiply-adds below which one thread is faster
#define LINE 64                            // bytes of a cache line
#define BLOCK_BYTES (VW * VW * 4)          // bytes of a block: VW rows, a vector each

typedef uint32_t vecu __attribute__((vector_size(VW * sizeof(float)), aligned(4)));
typedef int32_t vecs __attribute__((vector_size(VW * sizeof(float)), aligned(4)));

// the values of a type in one 32-bit word
static inline int values_per_word(WeightType type) { return type == WEIGHT_FP32 ? 1 : type == WEIGHT_BF16 ? 2 : 4; }

// acc (+)= one word of a transposed block times x, the word's inputs in order
// (one, two or four per row); sv: the rows' scales (int8)
static inline __attribute__((always_inline)) vecf matvec_word(vecf acc, vecf word, const float *x, WeightType type,
                                                              vecf sv) {
    if (type == WEIGHT_FP32) return acc + x[0] * word;
    vecu u = (vecu)word;
    if (type == WEIGHT_BF16) {  // the lower half of a word is the earlier input
        acc = acc + x[0] * (vecf)(u << 16);
        return acc + x[1] * (vecf)(u & 0xFFFF0000u);
    }
    for (int k = 0; k < 4; k++) {  // bytes 0..3: inputs 0..3
        vecs q = (vecs)(u << (24 - 8 * k)) >> 24;  // the byte, sign-extended
        acc = acc + x[k] * (sv * __builtin_convertvector(q, vecf));
    }
    return acc;
}

// acc[b] (+)= the transposed blocks r[b] times x, the blocks' chains side by
// side so that each waits on its own latency only
static inline __attribute__((always_inline)) void matvec_blocks(vecf *acc, vecf r[][VW], const float *x, int nb,
                                                                WeightType type, const vecf *sv) {
    int per = values_per_word(type);
    for (int t = 0; t < VW; t++)
        for (int b = 0; b < nb; b++) acc[b] = matvec_word(acc[b], r[b][t], x + t * per, type, sv[b]);
}

// outputs o0 .. o0 + nb*VW - 1, nb <= MATVEC_BLOCKS whole blocks of rows;
// type is w.type, a constant where inlined
static inline __attribute__((always_inline)) void matvec_rows(float *out, const float *x, Weight w, int IN, int o0,
                                                              int nb, int accumulate, WeightType type) {
    vecf acc[MATVEC_BLOCKS], r[MATVEC_BLOCKS][VW], sv[MATVEC_BLOCKS] = {{0}};
    for (int b = 0; b < nb; b++) {
        vecf zero = {0};
        acc[b] = accumulate ? *(const vecf *)(out + o0 + b * VW) : zero;
    }
    int per = values_per_word(type), step = VW * per, i = 0;
    size_t bytes = 4 / per;
    const char *next = (const char *)w.values + ((size_t)o0 + nb * VW) * IN * bytes;  // the next task's rows
    if (type != WEIGHT_INT8 || w.group % step == 0)
        for (; i + step <= IN; i += step) {
            for (int b = 0; b < nb; b++) {
                size_t row = (size_t)o0 + b * VW;
                const char *v = (const char *)w.values + (row * IN + i) * bytes;
                for (int t = 0; t < VW; t++) r[b][t] = *(const vecf *)(v + (size_t)t * IN * bytes);
                const char *ask = next + ((size_t)(i / step) * nb + b) * BLOCK_BYTES;
                for (int l = 0; l < BLOCK_BYTES; l += LINE) __builtin_prefetch(ask + l, 0, 2);  // into L2
                if (type == WEIGHT_INT8) {  // the rows' scales, IN / group apart
                    const float *s = w.scales + row * (IN / w.group) + i / w.group;
                    for (int t = 0; t < VW; t++) sv[b][t] = s[(size_t)t * (IN / w.group)];
                }
                transpose_block(r[b]);
            }
            matvec_blocks(acc, r, x + i, nb, type, sv);
        }
    for (; i + VW <= IN; i += VW) {  // decoded first
        for (int b = 0; b < nb; b++) {
            float dec[VW * VW] __attribute__((aligned(64)));
            for (int t = 0; t < VW; t++) weight_decode(dec + t * VW, w, ((size_t)o0 + b * VW + t) * IN + i, VW);
            for (int t = 0; t < VW; t++) r[b][t] = *(const vecf *)(dec + t * VW);
            transpose_block(r[b]);
        }
        matvec_blocks(acc, r, x + i, nb, WEIGHT_FP32, sv);
    }
    for (; i < IN; i++)  // one input at a time
        for (int b = 0; b < nb; b++) {
            vecf col;
            for (int t = 0; t < VW; t++) col[t] = weight_value(w, ((size_t)o0 + b * VW + t) * IN + i);
            acc[b] = acc[b] + x[i] * col;
        }
    for (int b = 0; b < nb; b++) *(vecf *)(out + o0 + b * VW) = acc[b];
}

// rows o0 .. o0 + n*VW - 1, the loops compiled for each type
static inline __attribute__((always_inline)) void matvec_typed(float *out, const float *x, Weight w, int IN, int o0, int n, int accumulate) {
    if (w.type == WEIGHT_FP32) matvec_rows(out, x, w, IN, o0, n, accumulate, WEIGHT_FP32);
    else if (w.type == WEIGHT_BF16) matvec_rows(out, x, w, IN, o0, n, accumulate, WEIGHT_BF16);
    else matvec_rows(out, x, w, IN, o0, n, accumulate, WEIGHT_INT8);
}
// a task's nb blocks of rows from o0: MATVEC_BLOCKS side by side (a constant: unrolled), or one at a time
static void matvec_task(float *out, const float *x, Weight w, int IN, int o0, int nb, int accumulate) {
    if (nb == MATVEC_BLOCKS) {
        matvec_typed(out, x, w, IN, o0, MATVEC_BLOCKS, accumulate);
        return;
    }
    for (int b = 0; b < nb; b++) matvec_typed(out, x, w, IN, o0 + b * VW, 1, accumulate);
}

void matvec_forward(float *out, const float *inp, Weight w, int IN, int OUT, int accumulate) {
    int blocks = OUT / VW, tasks = (blocks + MATVEC_BLOCKS - 1) / MATVEC_BLOCKS;
    // static: a thread's tasks are neighbours, so that each asks for the next one's rows
#pragma omp parallel for schedule(static) if ((size_t)OUT * IN >= MATVEC_PARALLEL_MIN)
    for (int t = 0; t < tasks; t++) {
        int b0 = t * MATVEC_BLOCKS, nb = blocks - b0 < MATVEC_BLOCKS ? blocks - b0 : MATVEC_BLOCKS;
        matvec_task(out, inp, w, IN, b0 * VW, nb, accumulate);
    }
    for (int o = blocks * VW; o < OUT; o++) {  // the rows past the last whole block
        float acc = accumulate ? out[o] : 0.0f;
        for (int i = 0; i < IN; i++) acc = MADD(inp[i], weight_value(w, (size_t)o * IN + i), acc);
        out[o] = acc;
    }
}

// out [OUT] (+)= inp [IN] @ w [IN,OUT], w input-major (decode's cached
// values), so that a vector holds VW neighbouring outputs: each output is one
// chain of multiply-adds in i order, a + b*c as in gemm_tile. VECMAT_VECS
// vectors of outputs run side by side.
#define VECMAT_VECS 8                    // independent vector chains per block
#define VECMAT_COLS (VECMAT_VECS * VW)   // outputs per block
#define VECMAT_PARALLEL_MIN (1 << 20)    // multiply-adds below which one thread is faster

// outputs o0..o0+nv*VW-1, nv <= VECMAT_VECS whole vectors
static void vecmat_vectors(float *out, const float *inp, const float *wt, int IN, int ldw, int o0, int nv,
                           int accumulate) {
    vecf acc[VECMAT_VECS] = {{0}};
    for (int v = 0; accumulate && v < nv; v++) acc[v] = *(const vecf *)(out + o0 + v * VW);
    for (int i = 0; i < IN; i++) {
        const float a = inp[i], *w = wt + (size_t)i * ldw + o0;
        for (int v = 0; v < nv; v++) acc[v] = acc[v] + a * *(const vecf *)(w + v * VW);
    }
    for (int v = 0; v < nv; v++) *(vecf *)(out + o0 + v * VW) = acc[v];
}
// outputs o0..OUT-1, fewer than one vector
static void vecmat_scalars(float *out, const float *inp, const float *wt, int IN, int OUT, int ldw, int o0,
                           int accumulate) {
    for (int o = o0; o < OUT; o++) {
        float acc = accumulate ? out[o] : 0.0f;
        for (int i = 0; i < IN; i++) acc = MADD(inp[i], wt[(size_t)i * ldw + o], acc);
        out[o] = acc;
    }
}
void vecmat_forward(float *out, const float *inp, const float *w, int IN, int OUT, int accumulate, int ldw) {
    int n_blocks = (OUT + VECMAT_COLS - 1) / VECMAT_COLS;
#pragma omp parallel for schedule(static) if ((size_t)OUT * IN >= VECMAT_PARALLEL_MIN)
    for (int b = 0; b < n_blocks; b++) {
        int o0 = b * VECMAT_COLS, nv = (OUT - o0) / VW;
        if (nv >= VECMAT_VECS) vecmat_vectors(out, inp, w, IN, ldw, o0, VECMAT_VECS, accumulate);  // nv known: unrolled
        else {
            vecmat_vectors(out, inp, w, IN, ldw, o0, nv, accumulate);
            vecmat_scalars(out, inp, w, IN, OUT, ldw, o0 + nv * VW, accumulate);
        }
    }
}

// rows i0..i1-1 of wt [IN,OUT] = w [OUT,IN]^T, w's rows ldw apart: whole
// VW x VW blocks through the vector registers (transpose_block), the
// ragged edges element by element
static void transpose_rows(float *wt, const float *w, int OUT, int IN, int ldw, int i0, int i1) {
    int o = 0;
    for (; o + VW <= OUT; o += VW) {
        int i = i0;
        for (; i + VW <= i1; i += VW) {
            vecf r[VW];
            for (int t = 0; t < VW; t++) r[t] = *(const vecf *)(w + (size_t)(o + t) * ldw + i);
            transpose_block(r);
            for (int t = 0; t < VW; t++) *(vecf *)(wt + (size_t)(i + t) * OUT + o) = r[t];
        }
        for (; i < i1; i++)
            for (int t = 0; t < VW; t++) wt[(size_t)i * OUT + o + t] = w[(size_t)(o + t) * ldw + i];
    }
    for (; o < OUT; o++)
        for (int i = i0; i < i1; i++) wt[(size_t)i * OUT + o] = w[(size_t)o * ldw + i];
}
#define TRANSPOSE_ROWS 32  // rows of wt per task
void transpose(float *wt, const float *w, int OUT, int IN, int ldw) {
#ifdef _OPENMP
    if (omp_in_parallel()) {  // attention: a (batch, head) per thread
        transpose_rows(wt, w, OUT, IN, ldw, 0, IN);
        return;
    }
#endif
#pragma omp parallel for schedule(static) if ((size_t)OUT * IN > 65536)
    for (int i0 = 0; i0 < IN; i0 += TRANSPOSE_ROWS)
        transpose_rows(wt, w, OUT, IN, ldw, i0, i0 + TRANSPOSE_ROWS < IN ? i0 + TRANSPOSE_ROWS : IN);
}

// A product of a few rows (an expert's share of a short prompt, a prompt of
// one token) runs as that many matvecs, each reading W where it lies, which
// is cheaper than packing panels of W (widened to fp32) for so few rows.
#define MATVEC_ROWS_FP32 2     // rows up to which matvecs beat the packing, fp32 weights
#define MATVEC_ROWS_NARROW 3   // the same, bf16 and int8 weights (their packing widens)

void matmul_forward(float *out, const float *inp, Weight w, int N, int IN, int OUT, int ldo, int accumulate) {
    if (N <= (w.type == WEIGHT_FP32 ? MATVEC_ROWS_FP32 : MATVEC_ROWS_NARROW)) {
        for (int n = 0; n < N; n++) matvec_forward(out + (size_t)n * ldo, inp + (size_t)n * IN, w, IN, OUT, accumulate);
        return;
    }
    gemm_bt(out, ldo, inp, IN, w, N, OUT, IN, accumulate);
}

// the input and the weight gradient share one team
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int N, int IN,
                     int OUT, int ldo, int accumulate) {
    Gemm g[2] = {gemm_product(dw, IN, dout, 1, ldo, inp, IN, 0, OUT, IN, N, 1),
                 gemm_product(dinp, IN, dout, ldo, 1, w, IN, 0, N, IN, OUT, accumulate)};
    gemm_on(g, dinp ? 2 : 1, gemm_threads(&g[0]));
}
