// openmoe.c: OpenMoE on the CPU in plain C with OpenMP. Forward, backward,
// router, capacity, losses and optimizers, exactly as ../shared/SPEC.md says.
//
// Reading order: the matmul (the one kernel that matters for speed), then the
// layers, each _forward beside its _backward, then the router and the MoE
// plumbing, the losses, the model (forward, backward), the optimizers, and
// inference with a KV cache. Shapes use B batch, T time, D width, HHd = H*Hd,
// BT = B*T tokens, E experts, K experts per token, V vocabulary.
//
// Determinism: every output element is summed by one thread in a fixed order,
// so results do not depend on the number of threads, and a token's result does
// not depend on which rows it was batched with (model_decode reproduces
// model_forward bit for bit).
#include "openmoe.h"
#include <float.h>
#include <limits.h>
#include <sys/mman.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// matmul. One kernel: C[M,N] (+)= A[M,K] B[K,N], with C row-major, A read
// through strides (A[i*ars + k*aks]) so that it can be a transposed view, and
// B row-major or the transpose of a row-major W (gemm_bt).
// Each C element is one chain c = c + a*b over k in order (fused multiply-adds
// under -ffp-contract=fast), so any tiling, any thread count and the matvec
// below give identical bits.

// The register tile follows the compile target: VW floats per vector, a tile
// of MR x NR accumulators that fills the vector registers, and two vectors of
// B plus one broadcast of A beside them. GCC's generic vectors compile to one
// register each under AVX-512 (zmm) and AVX (ymm), and to pairs of xmm (or
// NEON q) registers elsewhere.
// A pass of a tile runs KC deep, with its KC x NR panel of B in L1. Under
// AVX-512, a product whose A is read in place (gemm_a_in_place: most
// forwards) runs KC_IN_PLACE deep: its panel (64 KB) streams from L2, and
// C is loaded and stored once per 512 of depth rather than twice, with
// half the tiles' fixed costs (measured on Zen 5: those forwards 2-8%
// faster). With packed A the deeper pass bought nothing and cost the
// 2048x512 @ 512x3072 backward 5%. Under AVX2 (run on the same Zen 5) it
// bought 1-3% on those forwards, within noise, so the AVX2 build keeps the
// pass that earlier rounds measured on AVX2 machines.
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

// the VW x VW block in rows r[0..VW-1] transposed in place. With AVX-512
// or AVX, the unpack and shuffle network of immediate-operand instructions
// (measured on Zen 5: 2.9x and 5x faster than the generic form, which GCC
// compiles to two-source permutes that each need an index register).
// Pairs of rows are interleaved by floats, then by pairs of floats, then
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
// asks for the next panel's rows meanwhile.
static void gemm_pack_panel(float *bp, const float *B, int ldb, int transposed, int j, int nr, int N, int k0, int kc) {
    if (!transposed) {
        gemm_pack_b(bp, B + (size_t)k0 * ldb + j, ldb, nr, kc);
        return;
    }
    const float *w = B + (size_t)j * ldb + k0;
    for (int r = NR; r < 2 * NR && j + r < N; r++)
        for (int k = 0; k < kc; k += 64 / sizeof(float)) __builtin_prefetch(w + (size_t)r * ldb + k);
    gemm_pack_bt(bp, w, ldb, nr, kc);
}

// The threaded matmul. C is cut into tasks, a range of columns times a
// group of rows, which the threads take in turn. A task packs its range of
// B itself, one depth slice at a time, into bblock (its thread's own, in
// L2), then its rows' A, a block at a time. Nothing packed is shared between
// threads: on the machines measured (README), a core that writes over lines
// another core has read, or reads lines another has written, runs at memory
// speed. A task runs its rows' chains to the end, so no task waits for
// another.
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
    const float *B;  // B (K,N) row-major or, transposed, W (N,K) row-major for B = W^T; rows ldb apart
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
            gemm_pack_panel(bblock + (size_t)k0 * cols + (size_t)(j - j0) * kc, g->B, g->ldb, g->transposed, j,
                            j1 - j < NR ? j1 - j : NR, g->N, d0 + k0, kc);
    }
}

// The cache lines of A that the tiles of rows i..i+rows-1 at depth
// k0..k0+kc-1 read (or gemm_pack_a does), numbered along A's unit stride:
// lines from..to-1 of them are prefetched, so that the next block of A comes
// from L2 rather than memory
#define LINE_FLOATS (64 / (int)sizeof(float))
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
// not outweigh packing (measured: 0.88x at K = 8), and a row stride that
// spreads a tile's rows over L1's sets. Rows a multiple of 4 KB apart share
// one set, and 14 of them with the B panel's lines overflow its 12 ways
// (measured: 0.85x where the rows are 12 KB apart).
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
// per tile (measured: the 3072x2048 @ 2048x512 dW 6% faster).
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
// output gradients) is read in place by whole tiles of rows: packing it
// cost about 7% of the time of the tiles it fed (a range of 256 columns);
// other A, and a last partial tile of rows, is packed. While one block of A
// runs, the next is prefetched, a share of its lines per tile.
// The tiles walk down the block's rows panel by panel, a panel of B staying
// in L1, except in the first pass of a later slice, whose C comes back from
// beyond L2 (the slice before has since written the other rows'): they walk
// along each row group's columns, so that each tile's C continues the rows
// the tile before read. Walking down, the rows of a tile's C are new and, as
// ldc is often a multiple of 512, a multiple of 4 KB from the rows just
// stored. Measured on Zen 5, one thread: the 2048x512 @ 512x3072 backward's
// input gradient 3-4% faster and its weight gradient 5-6%, the lm_head's
// weight gradient 5-7%, others within noise. Under AVX2 (its 6x16 tile) it
// read 1-2% slower, within noise, and that build always walks down.
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
// without that read the 2048x128 @ 128x4096 forward (32 MB of logits) ran
// 1.25x as fast, 2048x128 @ 128x768 (6 MB) 1.15x. Only the last pass: a
// streamed C that the next depth block reads back comes from memory (the
// 2048x512 @ 512x3072 forward lost 6% streaming the first of its two).
// AVX-512 only: the AVX2 tile writes C at half the rate, and streaming
// bought nothing there (0.97-0.99x, within noise).
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
// Where those groups would be small (the 320 rows of an expert), a single
// slice takes narrower ranges instead (320x512 @ 512x1536 forward 4-10%
// faster; with 2048 rows, groups were 2-4% faster). Packed A is packed
// again for every range, so a deep product with packed A and N that fits
// one range of GEMM_RANGE_COLS takes that one range, with slices as shallow
// as it needs, and groups of rows for the threads (measured: the 2048x512 @
// 512x3072 backward's dinp and dW 5-10% faster).
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
    static __thread float bblock[GEMM_B_FLOATS] __attribute__((aligned(64)));  // a thread's, made with it
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
    return (Gemm){.C = C, .ldc = ldc, .A = A, .ars = ars, .aks = aks, .B = B, .ldb = ldb, .transposed = transposed,
                  .M = M, .N = N, .K = K, .accumulate = accumulate};
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
// thread done with its share of one product goes on to the next rather than
// waiting at a barrier for the others (a backward's input and weight
// gradients: measured on Zen 5, two threads, the backwards of the bench's
// matmul table 1-7% faster). The bits do not depend on the tasks: every
// element is one chain in k order.
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

// C (M,N) (+)= A (M,K) @ B as Gemm says, on all threads (one for a small product)
static void gemm(float *C, int ldc, const float *A, int ars, int aks, const float *B, int ldb, int transposed,
                 int M, int N, int K, int accumulate) {
    Gemm g = gemm_product(C, ldc, A, ars, aks, B, ldb, transposed, M, N, K, accumulate);
    gemm_on(&g, 1, gemm_threads(&g));
}

// rows i0..i1-1 of C, on the calling thread (attention: a (batch, head) per thread)
static void gemm_rows(float *C, int ldc, const float *A, int ars, int aks, const float *B, int ldb,
                      int i0, int i1, int N, int K, int accumulate) {
    Gemm g = gemm_product(C + (size_t)i0 * ldc, ldc, A + (size_t)i0 * ars, ars, aks, B, ldb, 0, i1 - i0, N, K,
                          accumulate);
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

// C (M,N) = A (M,K) @ W^T for W (N,K) row-major; wt_narrow holds K*VW
// floats, for the narrow case's W^T
static void gemm_bt(float *C, int ldc, const float *A, int lda, const float *W, float *wt_narrow, int M, int N, int K) {
    if (N > VW) {
        gemm(C, ldc, A, lda, 1, W, K, 1, M, N, K, 0);
        return;
    }
    for (int k = 0; k < K; k++)
        for (int j = 0; j < VW; j++) wt_narrow[k * VW + j] = j < N ? W[(size_t)j * K + k] : 0.0f;
    int tiles = (M + MR - 1) / MR;
#pragma omp parallel for schedule(static) if ((size_t)M * N * K > GEMM_PARALLEL_MIN)
    for (int t = 0; t < tiles; t++) gemm_narrow_rows(C, ldc, A, lda, wt_narrow, t * MR, t * MR + MR < M ? t * MR + MR : M, N, K);
}

// out [OUT] = wt [IN,OUT]^T @ inp [IN]: one token (inference), same bits as
// gemm. wt is the weight matrix transposed (decode keeps such a copy), so
// that a vector holds VW neighbouring outputs: each output is one chain of
// multiply-adds in i order, a + b*c as in gemm_tile (fused where the target
// fuses gemm's). A chain waits on its own latency, so MATVEC_VECS vectors of
// outputs run side by side.
#ifdef __FP_FAST_FMAF
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((c) + (a) * (b))
#endif
#define MATVEC_VECS 8                       // independent vector chains per block
#define MATVEC_COLS (MATVEC_VECS * VW)      // outputs per block
#define MATVEC_PARALLEL_MIN (1 << 20)       // multiply-adds below which one thread is faster

// outputs o0..o0+nv*VW-1, nv <= MATVEC_VECS whole vectors
static void matvec_vectors(float *out, const float *inp, const float *wt, int IN, int OUT, int o0, int nv) {
    vecf acc[MATVEC_VECS] = {{0}};
    for (int i = 0; i < IN; i++) {
        const float a = inp[i], *w = wt + (size_t)i * OUT + o0;
        for (int v = 0; v < nv; v++) acc[v] = acc[v] + a * *(const vecf *)(w + v * VW);
    }
    for (int v = 0; v < nv; v++) *(vecf *)(out + o0 + v * VW) = acc[v];
}
// outputs o0..OUT-1, fewer than one vector
static void matvec_scalars(float *out, const float *inp, const float *wt, int IN, int OUT, int o0) {
    for (int o = o0; o < OUT; o++) {
        float acc = 0.0f;
        for (int i = 0; i < IN; i++) acc = MADD(inp[i], wt[(size_t)i * OUT + o], acc);
        out[o] = acc;
    }
}
static void matvec_forward(float *out, const float *inp, const float *wt, int IN, int OUT) {
    int n_blocks = (OUT + MATVEC_COLS - 1) / MATVEC_COLS;
#pragma omp parallel for schedule(static) if ((size_t)OUT * IN >= MATVEC_PARALLEL_MIN)
    for (int b = 0; b < n_blocks; b++) {
        int o0 = b * MATVEC_COLS, nv = (OUT - o0) / VW;
        if (nv >= MATVEC_VECS) matvec_vectors(out, inp, wt, IN, OUT, o0, MATVEC_VECS);  // nv known: unrolled
        else {
            matvec_vectors(out, inp, wt, IN, OUT, o0, nv);
            matvec_scalars(out, inp, wt, IN, OUT, o0 + nv * VW);
        }
    }
}

// rows i0..i1-1 of wt [IN,OUT] = w [OUT,IN]^T, w's rows ldw apart: whole
// VW x VW blocks through the vector registers (transpose_block), the
// ragged edges element by element (measured on Zen 5, weights in cache:
// tiny's lm_head, 4096x128, 1.8 -> 0.08 ms; 3072x512 5.6 -> 0.25 ms; all
// of tiny's weights, as the first decode transposes them, 7 -> 2 ms)
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
static void transpose(float *wt, const float *w, int OUT, int IN) {
#pragma omp parallel for schedule(static) if ((size_t)OUT * IN > 65536)
    for (int i0 = 0; i0 < IN; i0 += TRANSPOSE_ROWS)
        transpose_rows(wt, w, OUT, IN, IN, i0, i0 + TRANSPOSE_ROWS < IN ? i0 + TRANSPOSE_ROWS : IN);
}

// out (N,OUT) = inp (N,IN) @ w (OUT,IN)^T; scratch holds IN*VW floats (a
// narrow w's transpose)
static void matmul_forward(float *out, const float *inp, const float *w, int N, int IN, int OUT,
                           float *scratch) {
    gemm_bt(out, OUT, inp, IN, w, scratch, N, OUT, IN);
}

// dinp (N,IN) = (or +=, with accumulate) dout (N,OUT) @ w (OUT,IN), unless
// NULL; dw (OUT,IN) += dout^T @ inp. The two products share one team.
static void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp,
                            const float *w, int N, int IN, int OUT, int accumulate) {
    Gemm g[2] = {gemm_product(dw, IN, dout, 1, OUT, inp, IN, 0, OUT, IN, N, 1),
                 gemm_product(dinp, IN, dout, OUT, 1, w, IN, 0, N, IN, OUT, accumulate)};
    gemm_on(g, dinp ? 2 : 1, gemm_threads(&g[0]));
}

// ----------------------------------------------------------------------------
// embedding

// out (BT,D) = wte[x]
static void encoder_forward(float *out, const int *x, const float *wte, int BT, int D) {
    for (int n = 0; n < BT; n++) memcpy(out + (size_t)n * D, wte + (size_t)x[n] * D, D * sizeof(float));
}

// dwte[x[n]] += dout[n], in token order
static void encoder_backward(float *dwte, const float *dout, const int *x, int BT, int D) {
    for (int n = 0; n < BT; n++) {
        float *dw = dwte + (size_t)x[n] * D;
        const float *d = dout + (size_t)n * D;
        for (int i = 0; i < D; i++) dw[i] += d[i];
    }
}

// ----------------------------------------------------------------------------
// RMSNorm: y = x * rsqrt(mean(x^2) + 1e-6) * w

static void rmsnorm_row(float *out, float *rstd, const float *x, const float *w, int D) {
    double ss = 0.0;
    for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / D + 1e-6));
    for (int i = 0; i < D; i++) out[i] = x[i] * r * w[i];
    if (rstd) *rstd = r;
}

// inp (N,D) -> out (N,D), rstd (N)
static void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) rmsnorm_row(out + (size_t)n * D, rstd + n, inp + (size_t)n * D, w, D);
}

// dinp += d/dx, dw += d/dw, from dout (N,D)
static void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int N, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * D, *dy = dout + (size_t)n * D;
        float r = rstd[n];
        double dot = 0.0;  // sum_i dy_i w_i x_i
        for (int i = 0; i < D; i++) dot += (double)dy[i] * w[i] * x[i];
        float c = (float)(dot * r * r * r / D);
        float *dx = dinp + (size_t)n * D;
        for (int i = 0; i < D; i++) dx[i] += dy[i] * w[i] * r - x[i] * c;
    }
    // dw[i] = sum_n dy[n,i] x[n,i] rstd[n]: threads own columns, rows summed in order
#pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < D; i0 += 16) {
        int i1 = i0 + 16 < D ? i0 + 16 : D;
        for (int n = 0; n < N; n++)
            for (int i = i0; i < i1; i++) dw[i] += dout[(size_t)n * D + i] * inp[(size_t)n * D + i] * rstd[n];
    }
}

// ----------------------------------------------------------------------------
// RoPE, rotate-half: element i pairs with i + Hd/2, angle pos * 10000^(-2i/Hd).
// The angles' cos and sin come from tables (max_seq_len, Hd/2) made once
// (rope_tables, openmoe.h).

// one head's vector x (Hd) at its position's table row; sign -1 rotates back
static void rope_row(float *x, const float *cosv, const float *sinv, int Hd, float sign) {
    int half = Hd / 2;
    for (int i = 0; i < half; i++) {
        float c = cosv[i], s = sign * sinv[i], a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

// in place on q or k (B,T,H,Hd); the backward is the rotation by -angle
static void rope_forward(float *x, const float *cosv, const float *sinv, int B, int T, int H, int Hd, float sign) {
    int half = Hd / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                rope_row(x + (((size_t)b * T + t) * H + h) * Hd, cosv + (size_t)t * half, sinv + (size_t)t * half, Hd, sign);
}
static void rope_backward(float *dx, const float *cosv, const float *sinv, int B, int T, int H, int Hd) {
    rope_forward(dx, cosv, sinv, B, T, H, Hd, -1.0f);
}

// ----------------------------------------------------------------------------
// causal attention, no 1/sqrt(Hd) (OpenMoE folds it into Wq's init). Per
// (batch, head) it is three small matmuls on strided views of q, k, v
// (rows H*Hd apart): scores = q k^T, softmax over s <= t, out = P v. The
// masked probabilities are exactly 0, so the sums equal those of the one-token
// path in model_decode bit for bit.

// scores att[0..t] -> probabilities in place; att[t+1..T-1] = 0
static void attention_softmax_row(float *att, int t, int T) {
    float maxs = -FLT_MAX;
    for (int s = 0; s <= t; s++) maxs = att[s] > maxs ? att[s] : maxs;
    float sum = 0.0f;
    for (int s = 0; s <= t; s++) {
        att[s] = expf(att[s] - maxs);
        sum += att[s];
    }
    float inv = 1.0f / sum;
    for (int s = 0; s <= t; s++) att[s] *= inv;
    for (int s = t + 1; s < T; s++) att[s] = 0.0f;
}

#define AB 64  // attention rows per block: a block needs keys 0..its last row only

// q, k, v (B,T,H,Hd) -> out (B,T,H,Hd), att (B,H,T,T) probabilities; kt (B,H,Hd,T) scratch
static void attention_forward(float *out, float *att, float *kt, const float *q, const float *k, const float *v,
                              int B, int T, int H, int Hd) {
    int ld = H * Hd;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t base = (size_t)b * T * ld + h * Hd, bh = (size_t)b * H + h;
            float *P = att + bh * T * T, *kT = kt + bh * Hd * T;
            transpose_rows(kT, k + base, T, Hd, ld, 0, Hd);
            for (int i0 = 0; i0 < T; i0 += AB) {
                int i1 = i0 + AB < T ? i0 + AB : T;
                gemm_rows(P + (size_t)i0 * T, T, q + base + (size_t)i0 * ld, ld, 1, kT, T, 0, i1 - i0, i1, Hd, 0);
                for (int t = i0; t < i1; t++) attention_softmax_row(P + (size_t)t * T, t, T);
                gemm_rows(out + base + (size_t)i0 * ld, ld, P + (size_t)i0 * T, T, 1, v + base, ld, 0, i1 - i0, Hd, i1, 0);
            }
        }
}

// dout (B,T,H,Hd) -> dq, dk, dv (B,T,H,Hd), overwritten; dscore (B,H,T,T), vt (B,H,Hd,T) scratch
static void attention_backward(float *dq, float *dk, float *dv, float *dscore, float *vt, const float *dout,
                               const float *att, const float *q, const float *k, const float *v,
                               int B, int T, int H, int Hd) {
    int ld = H * Hd;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t base = (size_t)b * T * ld + h * Hd, bh = (size_t)b * H + h;
            const float *P = att + bh * T * T;
            float *dS = dscore + bh * T * T, *vT = vt + bh * Hd * T;
            transpose_rows(vT, v + base, T, Hd, ld, 0, Hd);
            for (int i0 = 0; i0 < T; i0 += AB) {  // query rows i0..i1-1 see keys 0..i1-1
                int i1 = i0 + AB < T ? i0 + AB : T;
                // dP = dout v^T, then through the softmax: dS = P (dP - rowsum(P dP))
                gemm_rows(dS + (size_t)i0 * T, T, dout + base + (size_t)i0 * ld, ld, 1, vT, T, 0, i1 - i0, i1, Hd, 0);
                for (int t = i0; t < i1; t++) {
                    const float *p = P + (size_t)t * T;
                    float *ds = dS + (size_t)t * T, pdp = 0.0f;
                    for (int s = 0; s <= t; s++) pdp += p[s] * ds[s];
                    for (int s = 0; s <= t; s++) ds[s] = p[s] * (ds[s] - pdp);
                    for (int s = t + 1; s < T; s++) ds[s] = 0.0f;
                }
                gemm_rows(dq + base + (size_t)i0 * ld, ld, dS + (size_t)i0 * T, T, 1, k + base, ld, 0, i1 - i0, Hd, i1, 0);
            }
            for (int s0 = 0; s0 < T; s0 += AB) {  // key rows s0..s1-1 are seen by queries s0..T-1
                int s1 = s0 + AB < T ? s0 + AB : T;
                size_t at = (size_t)s0 * T + s0;
                gemm_rows(dk + base + (size_t)s0 * ld, ld, dS + at, 1, T, q + base + (size_t)s0 * ld, ld, 0, s1 - s0,
                          Hd, T - s0, 0);  // dk = dS^T q
                gemm_rows(dv + base + (size_t)s0 * ld, ld, P + at, 1, T, dout + base + (size_t)s0 * ld, ld, 0, s1 - s0,
                          Hd, T - s0, 0);  // dv = P^T dout
            }
        }
}

// ----------------------------------------------------------------------------
// the gated FFN of OpenMoE (dense, extra and every expert):
//   [a | b] = x Wg^T,  h = a * silu(b) * (x Wu^T),  out = h Wd^T

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// gated product of one row: g (2F), u (F) -> h (F)
static void ffn_gate_row(float *h, const float *g, const float *u, int F) {
    for (int i = 0; i < F; i++) {
        float b = g[F + i];
        h[i] = g[i] * (b * sigmoidf(b)) * u[i];
    }
}

// inp (N,D) -> out (N,D); keeps g (N,2F), u (N,F), h (N,F) for the backward
static void ffn_forward(float *out, float *g, float *u, float *h, const float *inp, const float *wg,
                        const float *wu, const float *wd, int N, int D, int F, float *scratch) {
    matmul_forward(g, inp, wg, N, D, 2 * F, scratch);
    matmul_forward(u, inp, wu, N, D, F, scratch);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) ffn_gate_row(h + (size_t)n * F, g + (size_t)n * 2 * F, u + (size_t)n * F, F);
    matmul_forward(out, h, wd, N, F, D, scratch);
}

// dout (N,D) -> dinp (N,D) overwritten, dwg, dwu, dwd accumulated;
// dg (N,2F), du (N,F), dh (N,F) scratch
static void ffn_backward(float *dinp, float *dwg, float *dwu, float *dwd, const float *dout,
                         const float *inp, const float *g, const float *u, const float *h,
                         const float *wg, const float *wu, const float *wd, int N, int D, int F,
                         float *dg, float *du, float *dh) {
    matmul_backward(dh, dwd, dout, h, wd, N, F, D, 0);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *gn = g + (size_t)n * 2 * F, *un = u + (size_t)n * F, *dhn = dh + (size_t)n * F;
        float *dgn = dg + (size_t)n * 2 * F, *dun = du + (size_t)n * F;
        for (int i = 0; i < F; i++) {
            float a = gn[i], b = gn[F + i], s = sigmoidf(b), silu = b * s;
            dgn[i] = dhn[i] * silu * un[i];
            dgn[F + i] = dhn[i] * a * un[i] * s * (1.0f + b * (1.0f - s));
            dun[i] = dhn[i] * a * silu;
        }
    }
    matmul_backward(dinp, dwg, dg, inp, wg, N, D, 2 * F, 0);
    matmul_backward(dinp, dwu, du, inp, wu, N, D, F, 1);
}

// ----------------------------------------------------------------------------
// router: fp32 softmax over all E experts, top-K (ties to the lower index),
// one token at a time by router_row (openmoe.h)

// inp (N,D), wr (E,D), bias (E) -> z, p (N,E), lse (N), top (N,K) chosen by p + bias
static void router_forward(float *z, float *p, float *lse, int *top, const float *inp, const float *wr,
                           const float *bias, int N, int D, int E, int K, float *scratch) {
    matmul_forward(z, inp, wr, N, D, E, scratch);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        lse[n] = router_row(p + (size_t)n * E, top + (size_t)n * K, z + (size_t)n * E, bias, E, K);
}

// rz_sum = sum of lse^2 over the N tokens: the router z-loss before its mean
static void router_z_loss_sum(double *rz_sum, const float *lse, int N) {
    double rz = 0.0;
    for (int n = 0; n < N; n++) rz += (double)lse[n] * lse[n];
    *rz_sum = rz;
}

// dp (N,E) holds dLoss/dp; adds the router z-loss term (coefficient rz_w on
// mean lse^2) and returns dz (N,E) through the softmax, in place of dp
// (router_backward_row, openmoe.h)
static void router_backward(float *dp, const float *p, const float *lse, float rz_w, int N, int E) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) router_backward_row(dp + (size_t)n * E, p + (size_t)n * E, lse[n], rz_w, N, E);
}

// Drop policy "position" (SPEC §3 step 4) in one group [g0, n1): slots in
// priority order, all rank-0 choices in token order, then rank 1, ...; an
// assignment to a full expert (C held) is dropped. count (E) scratch.
static void moe_keep_by_position(int *kept, const int *top, int g0, int n1, int K, int E, int C, int *count) {
    memset(count, 0, E * sizeof(int));
    for (int r = 0; r < K; r++)
        for (int n = g0; n < n1; n++) {
            int e = top[(size_t)n * K + r];
            kept[(size_t)n * K + r] = count[e] < C;
            if (count[e] < C) count[e]++;
        }
}

static int compare_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

// Drop policy "probs" (SPEC §8) in one group [g0, n1): each expert keeps the
// C assignments with the largest p_e(n), ties to the lower rank, then the
// lower n, the order of their keys (probs_key, openmoe.h); each expert's keys
// are sorted in its own segment of key (N*K). seg (E+1), cursor (E) scratch.
static void moe_keep_by_probs(int *kept, const int *top, const float *p, int g0, int n1, int K, int E, int C,
                              uint64_t *key, int *seg, int *cursor) {
    memset(seg, 0, (E + 1) * sizeof(int));
    for (int i = g0 * K; i < n1 * K; i++) seg[top[i] + 1]++;
    for (int e = 0; e < E; e++) seg[e + 1] += seg[e];
    memcpy(cursor, seg, E * sizeof(int));
    for (int n = g0; n < n1; n++)
        for (int r = 0; r < K; r++) {
            int e = top[(size_t)n * K + r];
            key[cursor[e]++] = probs_key(p[(size_t)n * E + e], r, n - g0);
        }
    for (int e = 0; e < E; e++) {
        qsort(key + seg[e], seg[e + 1] - seg[e], sizeof(uint64_t), compare_u64);
        for (int j = seg[e]; j < seg[e + 1]; j++) {
            int r = probs_key_rank(key[j]), n = g0 + probs_key_index(key[j]);
            kept[(size_t)n * K + r] = j - seg[e] < C;
        }
    }
}

// Capacity and dropping within each routing group (group_len and
// moe_capacity_of in openmoe.h) by s's rule and policy. top (N,K), p (N,E)
// -> kept (N,K) 0/1; key (N*K), seg (E+1), count (E) scratch.
static void moe_capacity(int *kept, const int *top, const float *p, int N, int K, int E, const MoeSettings *s,
                         uint64_t *key, int *seg, int *count) {
    int G = group_len(N, s->group_size);
    for (int g0 = 0; g0 < N; g0 += G) {
        int n1 = g0 + G < N ? g0 + G : N;
        int C = moe_capacity_of(n1 - g0, E, K, s->cf1000, s->min_capacity, s->capacity_rule);
        if (s->drop_policy == DROP_PROBS && n1 - g0 > PROBS_MAX_GROUP)
            die("drop policy probs: a group of %d tokens does not fit its sort keys (group <= %d)", n1 - g0,
                PROBS_MAX_GROUP);
        if (s->drop_policy == DROP_PROBS) moe_keep_by_probs(kept, top, p, g0, n1, K, E, C, key, seg, count);
        else moe_keep_by_position(kept, top, g0, n1, K, E, C, count);
    }
}

// Load-balance loss (SPEC §4): per routing group E sum_e f_e P_e (f_e: share
// of the group's tokens whose top-K holds e, P_e: mean p_e); the layer's lb
// is the mean over the groups. lb_sum = the sum over the groups; lbf
// (groups,E) keeps f for the backward; P (E) scratch.
static void moe_load_balance_forward(double *lb_sum, float *lbf, const float *p, const int *top, int N, int K, int E,
                                     int group_size, float *P) {
    int G = group_len(N, group_size);
    double lb = 0.0;
    for (int g0 = 0; g0 < N; g0 += G) {
        int n1 = g0 + G < N ? g0 + G : N, len = n1 - g0;
        float *f = lbf + (size_t)(g0 / G) * E;
        for (int e = 0; e < E; e++) f[e] = P[e] = 0.0f;
        for (int n = g0; n < n1; n++) {
            for (int r = 0; r < K; r++) f[top[(size_t)n * K + r]] += 1.0f;
            for (int e = 0; e < E; e++) P[e] += p[(size_t)n * E + e];
        }
        double sum = 0.0;
        for (int e = 0; e < E; e++) {
            f[e] /= len;
            sum += (double)f[e] * (P[e] / len);
        }
        lb += E * sum;
    }
    *lb_sum = lb;
}

// dp (N,E) += d(lb_w * lb)/dp = lb_w E f_e / len / n_groups (d lb_group / d p[n,e] = E f_e / len)
static void moe_load_balance_backward(float *dp, const float *lbf, int N, int E, int group_size, float lb_w) {
    int G = group_len(N, group_size), n_groups = (N + G - 1) / G;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        int g = n / G, len = (g + 1) * G < N ? G : N - g * G;
        for (int e = 0; e < E; e++) dp[(size_t)n * E + e] += lb_w * E * lbf[(size_t)g * E + e] / len / n_groups;
    }
}

// ----------------------------------------------------------------------------
// MoE dispatch and combine. The kept assignments become rows of per-expert
// buffers: expert e owns rows start[e] .. start[e+1]-1, in token order, so each
// expert runs its FFN only on the tokens it keeps.

// the rows of the kept assignments: top, kept (N,K) -> start (E+1),
// row_token (rows), row_of (N,K) (-1: dropped), each expert's rows in token
// order, then rank; routed, kept_cnt (E) its assignments before and after
// dropping (model_router_stats). cursor (E) scratch
static void moe_rows(int *start, int *row_token, int *row_of, int *routed, int *kept_cnt, const int *top,
                     const int *kept, int N, int K, int E, int *cursor) {
    memset(start, 0, (E + 1) * sizeof(int));
    memset(routed, 0, E * sizeof(int));
    for (int i = 0; i < N * K; i++) {
        routed[top[i]]++;
        if (kept[i]) start[top[i] + 1]++;
    }
    for (int e = 0; e < E; e++) {
        kept_cnt[e] = start[e + 1];
        start[e + 1] += start[e];
    }
    memcpy(cursor, start, E * sizeof(int));
    for (int i = 0; i < N * K; i++) {  // token order, then rank
        row_of[i] = kept[i] ? cursor[top[i]]++ : -1;
        if (kept[i]) row_token[row_of[i]] = i / K;
    }
}

// xe (rows,D) = inp[row_token]
static void moe_dispatch(float *xe, const int *row_token, const float *inp, int rows, int D) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++)
        memcpy(xe + (size_t)i * D, inp + (size_t)row_token[i] * D, D * sizeof(float));
}

// out (N,D) = res + sum over kept (n, rank) of p[n, e] * ye[row], in rank order
static void moe_combine(float *out, const float *res, const float *ye, const float *p, const int *top,
                        const int *row_of, int N, int K, int E, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * D;
        for (int i = 0; i < D; i++) o[i] = 0.0f;
        for (int r = 0; r < K; r++) {
            int row = row_of[n * K + r];
            if (row < 0) continue;
            float w = p[(size_t)n * E + top[n * K + r]];
            const float *y = ye + (size_t)row * D;
            for (int i = 0; i < D; i++) o[i] = o[i] + w * y[i];
        }
        for (int i = 0; i < D; i++) o[i] += res[(size_t)n * D + i];
    }
}

// from dout (N,D): dye (rows,D) = p * dout[token], and dp (N,E) (overwritten)
// gets dout[n] . ye[row] at each kept choice, 0 elsewhere
static void moe_combine_backward(float *dye, float *dp, const float *dout, const float *ye, const float *p,
                                 const int *top, const int *row_of, int N, int K, int E, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *dpn = dp + (size_t)n * E;
        for (int e = 0; e < E; e++) dpn[e] = 0.0f;
        const float *d = dout + (size_t)n * D;
        for (int r = 0; r < K; r++) {
            int row = row_of[n * K + r];
            if (row < 0) continue;
            int e = top[n * K + r];
            const float *y = ye + (size_t)row * D;
            float *dy = dye + (size_t)row * D, dot = 0.0f;
            for (int i = 0; i < D; i++) {
                dy[i] = p[(size_t)n * E + e] * d[i];
                dot += d[i] * y[i];
            }
            dpn[e] = dot;
        }
    }
}

// dinp (N,D) += the rows' input gradients dxe (rows,D), in rank order
static void moe_dispatch_backward(float *dinp, const float *dxe, const int *row_of, int N, int K, int D) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int r = 0; r < K; r++) {
            int row = row_of[n * K + r];
            if (row < 0) continue;
            for (int i = 0; i < D; i++) dinp[(size_t)n * D + i] += dxe[(size_t)row * D + i];
        }
}

// ----------------------------------------------------------------------------
// output losses: cross-entropy fused with the output z-loss (mean lse^2)

// logits (N,V), y (N) -> lse (N); sums[0..1] the sums of ce and lse^2 over the targets (y >= 0)
static void crossentropy_forward(double *sums, float *lse, const float *logits, const int *y, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float maxl = -FLT_MAX;
        for (int v = 0; v < V; v++) maxl = l[v] > maxl ? l[v] : maxl;
        double sum = 0.0;
        for (int v = 0; v < V; v++) sum += expf(l[v] - maxl);
        lse[n] = maxl + (float)log(sum);
    }
    double ce = 0.0, lz = 0.0;
    for (int n = 0; n < N; n++) {
        if (y[n] < 0) continue;
        ce += lse[n] - logits[(size_t)n * V + y[n]];
        lz += (double)lse[n] * lse[n];
    }
    sums[0] = ce;
    sums[1] = lz;
}

// dlogits (N,V) = d(ce + lz_coef * lz)/dlogits, with ce and lz means over the m targets
static void crossentropy_backward(float *dlogits, const float *logits, const float *lse, const int *y,
                                  int N, int V, int m, float lz_coef) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *d = dlogits + (size_t)n * V;
        if (y[n] < 0) {
            memset(d, 0, V * sizeof(float));
            continue;
        }
        const float *l = logits + (size_t)n * V;
        float scale = (1.0f + lz_coef * 2.0f * lse[n]) / m;  // softmax * (1 + 2 lz_coef lse) / m
        for (int v = 0; v < V; v++) d[v] = expf(l[v] - lse[n]) * scale;
        d[y[n]] -= 1.0f / m;
    }
}


// out = a + b, elementwise over n
static void residual_forward(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// ----------------------------------------------------------------------------
// the model: parameters, gradients and activations, each in one buffer

typedef struct {  // what one layer keeps for the backward; NULL where unused
    float *in;                // (BT,D) the residual stream entering the layer
    float *ln1, *rstd1;       // (BT,D), (BT)
    float *q, *k, *v;         // (BT,HHd), q and k after RoPE
    float *att;               // (B,H,T,T) attention probabilities
    float *atty;              // (BT,HHd) attention output before Wo
    float *mid;               // (BT,D) residual after attention
    float *ln2, *rstd2;       // (BT,D), (BT) the FFN's or the MoE's input
    float *g, *u, *h;         // dense FFN: (BT,2F), (BT,F), (BT,F)
    float *z, *p, *lse;       // MoE router: logits, probabilities (BT,E), logsumexp (BT)
    float *lbf;               // (groups,E) f_e of the load-balance loss
    int *top, *kept, *row_of; // (BT,K): choices best first, kept flags, row in the expert buffers (-1: dropped)
    int *start, *row_token;   // (E+1), (BT*K): expert e owns rows start[e]..start[e+1]-1
    float *xe, *ge, *ue, *he, *ye;  // (BT*K, D | 2Fe | Fe | Fe | D) the experts' rows
    float *moe_out;           // (BT,D) residual after the MoE (the layer's output without extra FFN)
    float *ln3, *rstd3;       // extra FFN: its norm,
    float *gx, *ux, *hx;      // and its hidden states
} LayerActs;

struct Model {
    Config c;
    ParamTable table;
    int Bmax, Tmax;
    float *params;            // (n_params)
    float *params_t;          // (n_params) decode's copy: each weight matrix transposed, at its own offset
    int params_t_fresh;       // params_t matches params (cleared by every change of params)
    float *grads;             // (n_params), NULL without an optimizer
    float *opt_state;         // (n_opt_state), layout of opt_state_floats() for the tensors of the shard
    size_t n_opt_state;
    size_t shard_lo, shard_hi;  // ZeRO-1: model_update steps the tensors that start in [lo, hi)
    OptKind opt_kind;
    int opt_min_dim;
    // activations: one float buffer and one int buffer, carved by acts_layout
    float *acts;
    int *iacts;
    LayerActs *la;            // [L]
    float *resid;             // (L+1, BT, D): layer l reads resid[l], writes resid[l+1]
    float *final_in;          // resid[L], the input of the final norm
    float *lnf, *rstdf, *logits, *lse;  // (BT,D), (BT), (BT,V), (BT)
    float *tmp;               // (BT,D) a sublayer's output before the residual add
    float *kt;                // (B,H,Hd,T) k (forward) or v (backward) transposed per head
    int *x, *y;               // (BT) the batch of the last forward
    float *scratch;           // a narrow weight transposed, for the matmul (matmul_scratch_floats)
    float *lbP;               // (E) load-balance scratch
    int *cursor, *seg;        // (E), (E+1)
    uint64_t *prio_key;       // (BT*K) the drop policy "probs"' sort keys
    float *router_bias;       // (n_moe, E) loss-free balancing bias, 0 unless set
    // backward scratch (with an optimizer only)
    float *d_res, *d_ln;      // (BT,D) residual gradient, gradient at a norm's output
    float *dq, *dk, *dv, *datty;  // (BT,HHd)
    float *dscore;            // (B,H,T,T)
    float *dg, *du, *dh;      // (BT*K, 2Fmax | Fmax | Fmax)
    float *dxe, *dye;         // (BT*K, D)
    float *dp;                // (BT,E)
    float *dlogits;           // (BT,V)
    // the last forward
    int B, T, has_targets, n_targets;
    MoeSettings s;
    double *sums;             // (2 + 2 n_moe): ce and lz sums, then per MoE layer the lb sum over groups and the rz sum
    RouterStats *stats;       // [n_moe]
    int *stat_ints;           // the routed and kept counts behind stats
    float *rope_cos, *rope_sin;  // (max_seq_len, Hd/2)
    // inference: KV cache (L, max_seq_len, HHd) and one token's buffers
    float *kcache, *vcache;
    float *t_x, *t_xn, *t_q, *t_att, *t_aty, *t_out, *t_acc, *t_g, *t_u, *t_h, *t_z, *t_p, *t_logits;
    int *t_top;
};

const Config *model_config(const Model *m) { return &m->c; }
const ParamTable *model_param_table(const Model *m) { return &m->table; }

// n floats for a large buffer, not zeroed and not yet touched: on Linux in
// transparent huge pages where the kernel allows them (madvise mode), as the
// first touch of each 4 KiB page can cost more than the work on it
#define HUGE_PAGE_BYTES (2u << 20)
static float *alloc_floats_huge(size_t n) {
    size_t bytes = (n * sizeof(float) + HUGE_PAGE_BYTES - 1) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;  // n: a checked size
    float *p = (float *)aligned_alloc(HUGE_PAGE_BYTES, bytes);
    if (!p) die("out of memory: %zu bytes for a buffer (%s:%d)", bytes, __FILE__, __LINE__);
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: where it fails, 4 KiB pages serve as well
#endif
    return p;
}

// a bump allocator over one buffer: a first pass with base NULL only counts.
// Arrays take whole cache lines (the buffer starts on one), so that each
// starts on a line: gemm_streams streams only aligned rows.
static float *carve(float *base, size_t *used, size_t n) {
    float *p = base ? base + *used : NULL;
    *used += (n + LINE_FLOATS - 1) / LINE_FLOATS * LINE_FLOATS;
    return p;
}
static int *carve_int(int *base, size_t *used, size_t n) {
    int *p = base ? base + *used : NULL;
    *used += n;
    return p;
}

// a narrow weight's transpose (matmul_forward): the widest input times VW
static size_t matmul_scratch_floats(const Config *c) {
    int ins[] = {c->D, c->H * c->Hd, c->F, c->Fe}, most = 0;
    for (size_t i = 0; i < sizeof(ins) / sizeof(ins[0]); i++) most = ins[i] > most ? ins[i] : most;
    return (size_t)most * VW;
}

// the MoE sublayer's buffers of layer l: router, routing and the experts' rows (BT*K at most)
static void moe_acts_layout(Model *m, LayerActs *a, int l, float *fb, int *ib, size_t *nf, size_t *ni) {
    const Config *c = &m->c;
    size_t BT = (size_t)m->Bmax * m->Tmax, D = c->D, E = c->E, K = c->K;
    a->z = carve(fb, nf, BT * E);
    a->p = carve(fb, nf, BT * E);
    a->lse = carve(fb, nf, BT);
    a->lbf = carve(fb, nf, BT * E);  // groups <= BT (group_size 1)
    a->top = carve_int(ib, ni, BT * K);
    a->kept = carve_int(ib, ni, BT * K);
    a->row_of = carve_int(ib, ni, BT * K);
    a->start = carve_int(ib, ni, E + 1);
    a->row_token = carve_int(ib, ni, BT * K);
    a->xe = carve(fb, nf, BT * K * D);
    a->ge = carve(fb, nf, BT * K * 2 * c->Fe);
    a->ue = carve(fb, nf, BT * K * c->Fe);
    a->he = carve(fb, nf, BT * K * c->Fe);
    a->ye = carve(fb, nf, BT * K * D);
    if (c->extra_ffn) {
        a->moe_out = carve(fb, nf, BT * D);
        a->ln3 = carve(fb, nf, BT * D);
        a->rstd3 = carve(fb, nf, BT);
        a->gx = carve(fb, nf, BT * 2 * c->F);
        a->ux = carve(fb, nf, BT * c->F);
        a->hx = carve(fb, nf, BT * c->F);
    } else {
        a->moe_out = m->resid ? m->resid + (l + 1) * BT * D : NULL;
    }
}

// what layer l keeps for the backward
static void layer_acts_layout(Model *m, int l, float *fb, int *ib, size_t *nf, size_t *ni) {
    const Config *c = &m->c;
    size_t BT = (size_t)m->Bmax * m->Tmax, HHd = (size_t)c->H * c->Hd, D = c->D;
    LayerActs *a = &m->la[l];
    memset(a, 0, sizeof(*a));
    a->in = m->resid ? m->resid + l * BT * D : NULL;  // BT here is the largest batch's
    a->ln1 = carve(fb, nf, BT * D);
    a->rstd1 = carve(fb, nf, BT);
    a->q = carve(fb, nf, BT * HHd);
    a->k = carve(fb, nf, BT * HHd);
    a->v = carve(fb, nf, BT * HHd);
    a->att = carve(fb, nf, BT * m->Tmax * c->H);
    a->atty = carve(fb, nf, BT * HHd);
    a->mid = carve(fb, nf, BT * D);
    a->ln2 = carve(fb, nf, BT * D);
    a->rstd2 = carve(fb, nf, BT);
    if (is_moe_layer(c, l)) {
        moe_acts_layout(m, a, l, fb, ib, nf, ni);
        return;
    }
    a->g = carve(fb, nf, BT * 2 * c->F);
    a->u = carve(fb, nf, BT * c->F);
    a->h = carve(fb, nf, BT * c->F);
}

// the backward's scratch (with an optimizer only)
static void backward_layout(Model *m, float *fb, size_t *nf) {
    const Config *c = &m->c;
    size_t BT = (size_t)m->Bmax * m->Tmax, HHd = (size_t)c->H * c->Hd, D = c->D, E = c->E, K = c->K;
    size_t Fmax = c->F > c->Fe ? c->F : c->Fe;
    m->d_res = carve(fb, nf, BT * D);
    m->d_ln = carve(fb, nf, BT * D);
    m->dq = carve(fb, nf, BT * HHd);
    m->dk = carve(fb, nf, BT * HHd);
    m->dv = carve(fb, nf, BT * HHd);
    m->datty = carve(fb, nf, BT * HHd);
    m->dscore = carve(fb, nf, BT * m->Tmax * c->H);
    m->dg = carve(fb, nf, BT * K * 2 * Fmax);
    m->du = carve(fb, nf, BT * K * Fmax);
    m->dh = carve(fb, nf, BT * K * Fmax);
    m->dxe = carve(fb, nf, BT * K * D);
    m->dye = carve(fb, nf, BT * K * D);
    m->dp = carve(fb, nf, BT * E);
    m->dlogits = carve(fb, nf, BT * c->V);
}

// every activation at its offset in fb (floats) and ib (ints)
static void acts_layout(Model *m, float *fb, int *ib, size_t *nf, size_t *ni) {
    const Config *c = &m->c;
    size_t BT = (size_t)m->Bmax * m->Tmax, HHd = (size_t)c->H * c->Hd, D = c->D, E = c->E;
    *nf = *ni = 0;
    m->resid = carve(fb, nf, (c->L + 1) * BT * D);
    for (int l = 0; l < c->L; l++) layer_acts_layout(m, l, fb, ib, nf, ni);
    m->final_in = m->resid ? m->resid + c->L * BT * D : NULL;
    m->lnf = carve(fb, nf, BT * D);
    m->rstdf = carve(fb, nf, BT);
    m->logits = carve(fb, nf, BT * c->V);
    m->lse = carve(fb, nf, BT);
    m->tmp = carve(fb, nf, BT * D);
    m->kt = carve(fb, nf, BT * HHd);
    m->x = carve_int(ib, ni, BT);
    m->y = carve_int(ib, ni, BT);
    m->scratch = carve(fb, nf, matmul_scratch_floats(c));
    m->lbP = carve(fb, nf, E);
    m->cursor = carve_int(ib, ni, E);
    m->seg = carve_int(ib, ni, E + 1);
    if (m->grads) backward_layout(m, fb, nf);
}

// the RoPE tables, the KV cache and one token's buffers for model_decode
static void decode_layout(Model *m, float *fb, int *ib, size_t *nf, size_t *ni) {
    const Config *c = &m->c;
    size_t HHd = (size_t)c->H * c->Hd, Fmax = c->F > c->Fe ? c->F : c->Fe;
    *nf = *ni = 0;
    m->rope_cos = carve(fb, nf, (size_t)c->max_seq_len * (c->Hd / 2));
    m->rope_sin = carve(fb, nf, (size_t)c->max_seq_len * (c->Hd / 2));
    m->kcache = carve(fb, nf, (size_t)c->L * c->max_seq_len * HHd);
    m->vcache = carve(fb, nf, (size_t)c->L * c->max_seq_len * HHd);
    m->t_x = carve(fb, nf, c->D);
    m->t_xn = carve(fb, nf, c->D);
    m->t_q = carve(fb, nf, HHd);
    m->t_att = carve(fb, nf, c->max_seq_len);
    m->t_aty = carve(fb, nf, HHd);
    m->t_out = carve(fb, nf, c->D);
    m->t_acc = carve(fb, nf, c->D);
    m->t_g = carve(fb, nf, 2 * Fmax);
    m->t_u = carve(fb, nf, Fmax);
    m->t_h = carve(fb, nf, Fmax);
    m->t_z = carve(fb, nf, c->E);
    m->t_p = carve(fb, nf, c->E);
    m->t_logits = carve(fb, nf, c->V);
    m->t_top = carve_int(ib, ni, c->K);
}

Model *model_create(const Config *c, int B, int T, Precision precision, const OptSettings *opt) {
    char why[128];
    if (!config_check(c, why, sizeof(why))) die("model_create: bad config: %s", why);
    if (precision != PRECISION_FP32) die("model_create: the CPU backend computes in fp32 only (bf16 is openmoe.cu's)");
    if (B <= 0 || T <= 0 || T > c->max_seq_len)
        die("model_create: B = %d, T = %d: need B > 0 and 0 < T <= max_seq_len = %d", B, T, c->max_seq_len);
    Model *m = (Model *)callocCheck(1, sizeof(Model));
    m->c = *c;
    param_table_build(&m->table, c);
    m->Bmax = B;
    m->Tmax = T;
    size_t n = m->table.n_params;
    m->params = (float *)callocAlignedCheck(n, sizeof(float), LINE_FLOATS * sizeof(float));
    m->params_t = alloc_floats_huge(n);  // untouched (not resident) until a decode
    if (opt) {
        m->opt_kind = opt->kind;
        m->opt_min_dim = opt->min_dim;
        m->grads = (float *)callocAlignedCheck(n, sizeof(float), LINE_FLOATS * sizeof(float));
        m->shard_lo = opt->shard_lo;
        m->shard_hi = opt->shard_hi ? opt->shard_hi : n;
        m->n_opt_state = opt_state_floats_range(&m->table, opt->kind, opt->min_dim, m->shard_lo, m->shard_hi);
        m->opt_state = (float *)callocCheck(m->n_opt_state, sizeof(float));
    }
    m->la = (LayerActs *)callocCheck(c->L, sizeof(LayerActs));
    size_t nf, ni, dnf, dni;
    acts_layout(m, NULL, NULL, &nf, &ni);
    decode_layout(m, NULL, NULL, &dnf, &dni);
    m->acts = (float *)callocAlignedCheck(nf + dnf, sizeof(float), LINE_FLOATS * sizeof(float));
    m->iacts = (int *)callocCheck(ni + dni, sizeof(int));
    acts_layout(m, m->acts, m->iacts, &nf, &ni);
    decode_layout(m, m->acts + nf, m->iacts + ni, &dnf, &dni);
    rope_tables(m->rope_cos, m->rope_sin, c->max_seq_len, c->Hd);
    m->sums = (double *)callocCheck(2 + 2 * (size_t)n_moe_layers(c), sizeof(double));
    m->stats = router_stats_create(n_moe_layers(c), c->E, &m->stat_ints);
    m->prio_key = (uint64_t *)mallocCheck((size_t)B * T * c->K * sizeof(uint64_t));
    m->router_bias = (float *)callocCheck((size_t)n_moe_layers(c) * c->E, sizeof(float));
    return m;
}

void model_free(Model *m) {
    if (!m) return;
    free(m->params);
    free(m->params_t);
    free(m->grads);
    free(m->opt_state);
    free(m->acts);
    free(m->iacts);
    free(m->la);
    free(m->sums);
    free(m->stats);
    free(m->stat_ints);
    free(m->prio_key);
    free(m->router_bias);
    param_table_free(&m->table);
    free(m);
}

void model_set_params(Model *m, const float *params) {
    memcpy(m->params, params, m->table.n_params * sizeof(float));
    m->params_t_fresh = 0;
}
void model_get_params(const Model *m, float *params) { memcpy(params, m->params, m->table.n_params * sizeof(float)); }
void model_get_grads(const Model *m, float *grads) {
    if (!m->grads) die("model_get_grads: the model was created without an optimizer, so it has no gradients");
    memcpy(grads, m->grads, m->table.n_params * sizeof(float));
}
void model_set_grads(Model *m, const float *grads) {
    if (!m->grads) die("model_set_grads: the model was created without an optimizer, so it has no gradients");
    memcpy(m->grads, grads, m->table.n_params * sizeof(float));
}
void model_get_logits(const Model *m, float *logits) {
    memcpy(logits, m->logits, (size_t)m->B * m->T * m->c.V * sizeof(float));
}
const RouterStats *model_router_stats(const Model *m) { return m->stats; }
void model_set_router_bias(Model *m, const float *bias) {
    memcpy(m->router_bias, bias, (size_t)n_moe_layers(&m->c) * m->c.E * sizeof(float));
}
void model_get_router_bias(const Model *m, float *bias) {
    memcpy(bias, m->router_bias, (size_t)n_moe_layers(&m->c) * m->c.E * sizeof(float));
}

void model_get_routing(const Model *m, int i, int32_t *expert, float *prob, uint8_t *kept) {
    int nm = n_moe_layers(&m->c), BTK = m->B * m->T * m->c.K, K = m->c.K;
    if (i < 0 || i >= nm) die("model_get_routing: MoE layer %d out of range [0, %d)", i, nm);
    const LayerActs *a = &m->la[(i + 1) * m->c.moe_every - 1];
    for (int j = 0; j < BTK; j++) {
        expert[j] = a->top[j];
        prob[j] = a->p[(size_t)(j / K) * m->c.E + a->top[j]];
        kept[j] = (uint8_t)a->kept[j];
    }
}

// ----------------------------------------------------------------------------
// forward

// the MoE sublayer im (0-based among MoE layers): moe_out (BT,D) = mid +
// MoE(RMSNorm(mid)). Leaves the layer's lb and rz sums in m->sums and its
// routed/kept counts in m->stats[im], for model_forward's router statistics.
static void moe_forward(Model *m, LayerActs *a, const LayerParams *lp, int im, int BT) {
    const Config *c = &m->c;
    int D = c->D, E = c->E, K = c->K, Fe = c->Fe;
    const float *W = m->params;
    rmsnorm_forward(a->ln2, a->rstd2, a->mid, W + lp->mlp_norm, BT, D);
    router_forward(a->z, a->p, a->lse, a->top, a->ln2, W + lp->router, m->router_bias + (size_t)im * E, BT, D, E, K,
                   m->scratch);
    moe_capacity(a->kept, a->top, a->p, BT, K, E, &m->s, m->prio_key, m->seg, m->cursor);
    moe_rows(a->start, a->row_token, a->row_of, m->stats[im].routed, m->stats[im].kept, a->top, a->kept, BT, K, E,
             m->cursor);
    moe_dispatch(a->xe, a->row_token, a->ln2, a->start[E], D);
    for (int e = 0; e < E; e++) {
        size_t r0 = a->start[e];
        int rows = a->start[e + 1] - a->start[e];
        if (rows == 0) continue;
        ffn_forward(a->ye + r0 * D, a->ge + r0 * 2 * Fe, a->ue + r0 * Fe, a->he + r0 * Fe, a->xe + r0 * D,
                    W + lp->w_gate + (size_t)e * 2 * Fe * D, W + lp->w_up + (size_t)e * Fe * D,
                    W + lp->w_down + (size_t)e * D * Fe, rows, D, Fe, m->scratch);
    }
    moe_combine(a->moe_out, a->mid, a->ye, a->p, a->top, a->row_of, BT, K, E, D);
    moe_load_balance_forward(m->sums + 2 + 2 * im, a->lbf, a->p, a->top, BT, K, E, m->s.group_size, m->lbP);
    router_z_loss_sum(m->sums + 3 + 2 * im, a->lse, BT);
}

void model_forward(Model *m, const int32_t *x, const int32_t *y, int B, int T, const MoeSettings *s,
                   float *losses) {
    const Config *c = &m->c;
    forward_args_check(B, T, m->Bmax, m->Tmax, s);
    int BT = B * T, D = c->D, HHd = c->H * c->Hd, V = c->V;
    m->B = B;
    m->T = T;
    m->s = *s;
    m->has_targets = y != NULL;
    m->n_targets = forward_tokens_copy(m->x, m->y, x, y, BT, V);
    const float *W = m->params;
    encoder_forward(m->resid, m->x, W + m->table.wte, BT, D);
    int im = 0;
    for (int l = 0; l < c->L; l++) {
        LayerActs *a = &m->la[l];
        const LayerParams *lp = &m->table.layer[l];
        float *out = l + 1 < c->L ? m->la[l + 1].in : m->final_in;
        // mid = in + Attn(RMSNorm(in))
        rmsnorm_forward(a->ln1, a->rstd1, a->in, W + lp->attn_norm, BT, D);
        matmul_forward(a->q, a->ln1, W + lp->wq, BT, D, HHd, m->scratch);
        matmul_forward(a->k, a->ln1, W + lp->wk, BT, D, HHd, m->scratch);
        matmul_forward(a->v, a->ln1, W + lp->wv, BT, D, HHd, m->scratch);
        rope_forward(a->q, m->rope_cos, m->rope_sin, B, T, c->H, c->Hd, 1.0f);
        rope_forward(a->k, m->rope_cos, m->rope_sin, B, T, c->H, c->Hd, 1.0f);
        attention_forward(a->atty, a->att, m->kt, a->q, a->k, a->v, B, T, c->H, c->Hd);
        matmul_forward(m->tmp, a->atty, W + lp->wo, BT, HHd, D, m->scratch);
        residual_forward(a->mid, a->in, m->tmp, (size_t)BT * D);
        if (!lp->moe) {  // out = mid + FFN(RMSNorm(mid))
            rmsnorm_forward(a->ln2, a->rstd2, a->mid, W + lp->mlp_norm, BT, D);
            ffn_forward(m->tmp, a->g, a->u, a->h, a->ln2, W + lp->w_gate, W + lp->w_up, W + lp->w_down, BT, D,
                        c->F, m->scratch);
            residual_forward(out, a->mid, m->tmp, (size_t)BT * D);
            continue;
        }
        // moe_out = mid + MoE(RMSNorm(mid)); then out = moe_out + FFN_extra(RMSNorm(moe_out))
        moe_forward(m, a, lp, im++, BT);
        if (c->extra_ffn) {
            rmsnorm_forward(a->ln3, a->rstd3, a->moe_out, W + lp->extra_norm, BT, D);
            ffn_forward(m->tmp, a->gx, a->ux, a->hx, a->ln3, W + lp->x_gate, W + lp->x_up, W + lp->x_down, BT, D,
                        c->F, m->scratch);
            residual_forward(out, a->moe_out, m->tmp, (size_t)BT * D);
        }
    }
    rmsnorm_forward(m->lnf, m->rstdf, m->final_in, W + m->table.final_norm, BT, D);
    matmul_forward(m->logits, m->lnf, W + m->table.lm_head, BT, D, V, m->scratch);

    crossentropy_forward(m->sums, m->lse, m->logits, m->y, BT, V);

    // the losses and router statistics from the sums and counts
    int G = group_len(BT, s->group_size), n_groups = (BT + G - 1) / G;
    long dropped = router_stats_from_sums(m->stats, m->sums + 2, im, n_groups, BT, c->K, c->E);
    losses_from_sums(losses, m->sums[0], m->sums[1], m->n_targets, m->stats, im, dropped, (long)BT * c->K, s);
}

// ----------------------------------------------------------------------------
// backward. d_res carries the gradient of the residual stream from the top
// down; each sublayer adds its input gradient to it through its RMSNorm.

// d_res holds d moe_out; adds the gradient through the MoE and its norm
static void moe_backward(Model *m, LayerActs *a, const LayerParams *lp, int BT) {
    const Config *c = &m->c;
    int D = c->D, E = c->E, K = c->K, Fe = c->Fe, nm = n_moe_layers(c);
    const float *W = m->params;
    float *G = m->grads;
    moe_combine_backward(m->dye, m->dp, m->d_res, a->ye, a->p, a->top, a->row_of, BT, K, E, D);
    for (int e = 0; e < E; e++) {
        size_t r0 = a->start[e];
        int rows = a->start[e + 1] - a->start[e];
        if (rows == 0) continue;
        size_t og = lp->w_gate + (size_t)e * 2 * Fe * D, ou = lp->w_up + (size_t)e * Fe * D,
               od = lp->w_down + (size_t)e * D * Fe;
        ffn_backward(m->dxe + r0 * D, G + og, G + ou, G + od, m->dye + r0 * D, a->xe + r0 * D, a->ge + r0 * 2 * Fe,
                     a->ue + r0 * Fe, a->he + r0 * Fe, W + og, W + ou, W + od, rows, D, Fe, m->dg, m->du, m->dh);
    }
    // the router: combine weights, load balance and z-loss all act on p
    moe_load_balance_backward(m->dp, a->lbf, BT, E, m->s.group_size, m->s.lb_coef / nm);
    router_backward(m->dp, a->p, a->lse, m->s.rz_coef / nm, BT, E);
    matmul_backward(m->d_ln, G + lp->router, m->dp, a->ln2, W + lp->router, BT, D, E, 0);
    moe_dispatch_backward(m->d_ln, m->dxe, a->row_of, BT, K, D);
    rmsnorm_backward(m->d_res, G + lp->mlp_norm, m->d_ln, a->mid, W + lp->mlp_norm, a->rstd2, BT, D);
}

void model_backward(Model *m) {
    const Config *c = &m->c;
    if (!m->grads) die("model_backward: the model was created without an optimizer, so it has no gradients");
    if (!m->has_targets) die("model_backward: the last model_forward had no targets (y == NULL)");
    int B = m->B, T = m->T, BT = B * T, D = c->D, HHd = c->H * c->Hd, V = c->V;
    const float *W = m->params;
    float *G = m->grads;
    const ParamTable *pt = &m->table;
    memset(G, 0, pt->n_params * sizeof(float));

    crossentropy_backward(m->dlogits, m->logits, m->lse, m->y, BT, V, m->n_targets, m->s.lz_coef);
    matmul_backward(m->d_ln, G + pt->lm_head, m->dlogits, m->lnf, W + pt->lm_head, BT, D, V, 0);
    memset(m->d_res, 0, (size_t)BT * D * sizeof(float));
    rmsnorm_backward(m->d_res, G + pt->final_norm, m->d_ln, m->final_in, W + pt->final_norm,
                     m->rstdf, BT, D);
    for (int l = c->L - 1; l >= 0; l--) {
        LayerActs *a = &m->la[l];
        const LayerParams *lp = &pt->layer[l];
        if (!lp->moe) {
            ffn_backward(m->d_ln, G + lp->w_gate, G + lp->w_up, G + lp->w_down, m->d_res, a->ln2, a->g, a->u, a->h,
                         W + lp->w_gate, W + lp->w_up, W + lp->w_down, BT, D, c->F, m->dg, m->du, m->dh);
            rmsnorm_backward(m->d_res, G + lp->mlp_norm, m->d_ln, a->mid, W + lp->mlp_norm, a->rstd2, BT, D);
        } else {
            if (c->extra_ffn) {
                ffn_backward(m->d_ln, G + lp->x_gate, G + lp->x_up, G + lp->x_down, m->d_res, a->ln3, a->gx, a->ux,
                             a->hx, W + lp->x_gate, W + lp->x_up, W + lp->x_down, BT, D, c->F, m->dg, m->du, m->dh);
                rmsnorm_backward(m->d_res, G + lp->extra_norm, m->d_ln, a->moe_out, W + lp->extra_norm, a->rstd3, BT, D);
            }
            moe_backward(m, a, lp, BT);
        }
        // d_res now holds d mid; attention: mid = in + Wo attn(...)
        matmul_backward(m->datty, G + lp->wo, m->d_res, a->atty, W + lp->wo, BT, HHd, D, 0);
        attention_backward(m->dq, m->dk, m->dv, m->dscore, m->kt, m->datty, a->att, a->q, a->k, a->v, B, T, c->H,
                           c->Hd);
        rope_backward(m->dq, m->rope_cos, m->rope_sin, B, T, c->H, c->Hd);
        rope_backward(m->dk, m->rope_cos, m->rope_sin, B, T, c->H, c->Hd);
        matmul_backward(m->d_ln, G + lp->wq, m->dq, a->ln1, W + lp->wq, BT, D, HHd, 0);
        matmul_backward(m->d_ln, G + lp->wk, m->dk, a->ln1, W + lp->wk, BT, D, HHd, 1);
        matmul_backward(m->d_ln, G + lp->wv, m->dv, a->ln1, W + lp->wv, BT, D, HHd, 1);
        rmsnorm_backward(m->d_res, G + lp->attn_norm, m->d_ln, a->in, W + lp->attn_norm, a->rstd1, BT, D);
    }
    encoder_backward(G + pt->wte, m->d_res, m->x, BT, D);
}

// ----------------------------------------------------------------------------
// optimizers (formulas in openmoe.h, section 6)

// sum of squares in double over fixed chunks, so the result does not depend on the threads
static double sum_squares(const float *x, size_t n) {
    enum { CHUNKS = 64 };
    double part[CHUNKS];
#pragma omp parallel for schedule(static)
    for (int ch = 0; ch < CHUNKS; ch++) {
        size_t i0 = n * ch / CHUNKS, i1 = n * (ch + 1) / CHUNKS;
        double s = 0.0;
        for (size_t i = i0; i < i1; i++) s += (double)x[i] * x[i];
        part[ch] = s;
    }
    double s = 0.0;
    for (int ch = 0; ch < CHUNKS; ch++) s += part[ch];
    return s;
}

// w, g, mom, vel (n); g is scaled by gscale (clipping); weight decay when decay
static void adamw_update(float *w, const float *g, float *mom, float *vel, size_t n, const OptSettings *o,
                         int t, float gscale, int decay) {
    float b1c = 1.0f - powf(o->beta1, (float)t), b2c = 1.0f - powf(o->beta2, (float)t);
    float wd = decay ? o->weight_decay : 0.0f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * gscale;
        mom[i] = o->beta1 * mom[i] + (1.0f - o->beta1) * gi;
        vel[i] = o->beta2 * vel[i] + (1.0f - o->beta2) * gi * gi;
        float mhat = mom[i] / b1c, vhat = vel[i] / b2c;
        w[i] -= o->lr * (mhat / (sqrtf(vhat) + o->eps) + wd * w[i]);
    }
}

// one slice w, g (rows,cols); state r (rows) then c (cols) when factored, else v (rows*cols)
static void adafactor_update(float *w, const float *g, float *state, int rows, int cols, int factored,
                             const OptSettings *o, int t) {
    size_t n = (size_t)rows * cols;
    float beta = 1.0f - powf((float)t, -o->decay);
    float scale = o->lr * fmaxf(o->eps2, sqrtf((float)(sum_squares(w, n) / n)));
    float *r = state, *cs = state + rows, *v = state;
    double rmean = 0.0;
    if (factored) {
#pragma omp parallel for schedule(static)
        for (int i = 0; i < rows; i++) {
            double s = 0.0;
            for (int j = 0; j < cols; j++) s += (double)g[(size_t)i * cols + j] * g[(size_t)i * cols + j] + o->eps1;
            r[i] = beta * r[i] + (1.0f - beta) * (float)(s / cols);
        }
#pragma omp parallel for schedule(static)
        for (int j0 = 0; j0 < cols; j0 += 16) {
            int j1 = j0 + 16 < cols ? j0 + 16 : cols;
            double s[16] = {0};
            for (int i = 0; i < rows; i++)
                for (int j = j0; j < j1; j++) s[j - j0] += (double)g[(size_t)i * cols + j] * g[(size_t)i * cols + j] + o->eps1;
            for (int j = j0; j < j1; j++) cs[j] = beta * cs[j] + (1.0f - beta) * (float)(s[j - j0] / rows);
        }
        for (int i = 0; i < rows; i++) rmean += r[i];
        rmean /= rows;
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) v[i] = beta * v[i] + (1.0f - beta) * (g[i] * g[i] + o->eps1);
    }
    // u = g / sqrt(second moment); two passes: rms(u) first, then the clipped update
    double uu = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : uu)
    for (int i = 0; i < rows; i++) {
        double s = 0.0;
        for (int j = 0; j < cols; j++) {
            size_t k = (size_t)i * cols + j;
            float u = factored ? g[k] / sqrtf((float)(r[i] / rmean)) / sqrtf(cs[j]) : g[k] / sqrtf(v[k]);
            s += (double)u * u;
        }
        uu += s;
    }
    float clip = fmaxf(1.0f, (float)sqrt(uu / n) / o->clip_threshold);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            size_t k = (size_t)i * cols + j;
            float u = factored ? g[k] / sqrtf((float)(r[i] / rmean)) / sqrtf(cs[j]) : g[k] / sqrtf(v[k]);
            w[k] -= scale * (u / clip);
        }
}

float model_update(Model *m, const OptSettings *o, int t) {
    update_args_check(m->grads != NULL, m->opt_kind, m->opt_min_dim, o, t);
    m->params_t_fresh = 0;
    const ParamTable *pt = &m->table;
    for (int i = 0; o->freeze_router && i < pt->n_tensors; i++)  // frozen routers: out of the norm
        if (is_router_tensor(&pt->tensors[i]))
            memset(m->grads + pt->tensors[i].offset, 0, tensor_numel(&pt->tensors[i]) * sizeof(float));
    float norm = (float)sqrt(sum_squares(m->grads, pt->n_params));
    if (o->kind == OPT_ADAMW) {
        float gscale = o->grad_clip > 0.0f && norm > o->grad_clip ? o->grad_clip / norm : 1.0f;
        size_t lo = m->shard_lo;
        float *mom = m->opt_state, *vel = m->opt_state + (m->shard_hi - lo);  // the shard's m, then its v
        for (int i = 0; i < pt->n_tensors; i++) {
            const TensorInfo *ti = &pt->tensors[i];
            size_t off = ti->offset;
            if (off < lo || off >= m->shard_hi || (o->freeze_router && is_router_tensor(ti))) continue;
            adamw_update(m->params + off, m->grads + off, mom + (off - lo), vel + (off - lo), tensor_numel(ti), o, t,
                         gscale, ti->matrix);
        }
        return norm;
    }
    float *state = m->opt_state;
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *ti = &pt->tensors[i];
        if (ti->offset < m->shard_lo || ti->offset >= m->shard_hi) continue;
        int factored = adafactor_factored(ti, o->min_dim), skip = o->freeze_router && is_router_tensor(ti);
        for (int sl = 0; sl < ti->slices; sl++) {
            size_t off = ti->offset + (size_t)sl * ti->rows * ti->cols;
            if (!skip) adafactor_update(m->params + off, m->grads + off, state, ti->rows, ti->cols, factored, o, t);
            state += factored ? (size_t)ti->rows + ti->cols : (size_t)ti->rows * ti->cols;
        }
    }
    return norm;
}

void model_get_opt_state(const Model *m, float *state) {
    if (!m->opt_state) die("model_get_opt_state: the model was created without an optimizer");
    memcpy(state, m->opt_state, m->n_opt_state * sizeof(float));
}
void model_set_opt_state(Model *m, const float *state) {
    if (!m->opt_state) die("model_set_opt_state: the model was created without an optimizer");
    memcpy(m->opt_state, state, m->n_opt_state * sizeof(float));
}

// ----------------------------------------------------------------------------
// inference: one token at a time with a KV cache. Every step is the row
// version of the batched code above, with the same order of operations.

// att (n) = the dot products of q (Hd) with n keys (rows ld apart), each
// gemm's chain over i: DOTS_SIDE_BY_SIDE keys at a time, as a chain waits on
// its own latency
#define DOTS_SIDE_BY_SIDE 8
static void attention_scores_row(float *att, const float *q, const float *k, int n, int Hd, int ld) {
    int s = 0;
    for (; s + DOTS_SIDE_BY_SIDE <= n; s += DOTS_SIDE_BY_SIDE) {
        float dot[DOTS_SIDE_BY_SIDE] = {0.0f};
        for (int i = 0; i < Hd; i++)
            for (int j = 0; j < DOTS_SIDE_BY_SIDE; j++) dot[j] = MADD(q[i], k[(size_t)(s + j) * ld + i], dot[j]);
        for (int j = 0; j < DOTS_SIDE_BY_SIDE; j++) att[s + j] = dot[j];
    }
    for (; s < n; s++) {
        float dot = 0.0f;
        for (int i = 0; i < Hd; i++) dot = MADD(q[i], k[(size_t)s * ld + i], dot);
        att[s] = dot;
    }
}

// out (Hd) = sum over n values v (rows ld apart) weighted by att, each
// output gemm's chain over s
static void attention_values_row(float *out, const float *att, const float *v, int n, int Hd, int ld) {
    int i = 0;
    for (; i + VW <= Hd; i += VW) {
        vecf acc = {0};
        for (int s = 0; s < n; s++) acc = acc + att[s] * *(const vecf *)(v + (size_t)s * ld + i);
        *(vecf *)(out + i) = acc;
    }
    for (; i < Hd; i++) {
        float acc = 0.0f;
        for (int s = 0; s < n; s++) acc = MADD(att[s], v[(size_t)s * ld + i], acc);
        out[i] = acc;
    }
}

// one token's attention, the row pos of attention_forward's three steps:
// q (H,Hd) -> out (H,Hd) over the cached kc, vc (pos+1 rows of H*Hd); att (pos+1) scratch
static void attention_decode(float *out, float *att, const float *q, const float *kc, const float *vc, int pos, int H,
                             int Hd) {
    for (int h = 0; h < H; h++) {
        attention_scores_row(att, q + h * Hd, kc + h * Hd, pos + 1, Hd, H * Hd);
        attention_softmax_row(att, pos, pos + 1);
        attention_values_row(out + h * Hd, att, vc + h * Hd, pos + 1, Hd, H * Hd);
    }
}

// acc (D) += p[e] * y (D) for the expert e = *top: one expert's share of a token's MoE output
static void moe_decode_accumulate(float *acc, const float *y, const float *p, const int *top, int D) {
    for (int i = 0; i < D; i++) acc[i] = acc[i] + p[*top] * y[i];
}

// params_t: every weight matrix but the embedding (decode reads its rows),
// each slice (rows, cols) transposed to (cols, rows) for matvec_forward.
// Made on the first decode after the parameters change, not before: a
// model that never decodes never touches these pages.
static void params_t_refresh(Model *m) {
    if (m->params_t_fresh) return;
    const ParamTable *pt = &m->table;
    for (int t = 0; t < pt->n_tensors; t++) {
        const TensorInfo *ti = &pt->tensors[t];
        if (!ti->matrix || ti->offset == pt->wte) continue;
        for (int s = 0; s < ti->slices; s++) {
            size_t off = ti->offset + (size_t)s * ti->rows * ti->cols;
            transpose(m->params_t + off, m->params + off, ti->rows, ti->cols);
        }
    }
    m->params_t_fresh = 1;
}

// one token's gated FFN: x (D) -> out (D); wg, wu, wd transposed (params_t)
static void ffn_token(Model *m, float *out, const float *x, const float *wg, const float *wu, const float *wd, int F) {
    int D = m->c.D;
    matvec_forward(m->t_g, x, wg, D, 2 * F);
    matvec_forward(m->t_u, x, wu, D, F);
    ffn_gate_row(m->t_h, m->t_g, m->t_u, F);
    matvec_forward(out, m->t_h, wd, F, D);
}

const int model_decode_bitwise = 1;  // matvec_forward sums as gemm does

const float *model_decode(Model *m, int token, int pos) {
    const Config *c = &m->c;
    if (token < 0 || token >= c->V) die("model_decode: token %d out of range [0, %d)", token, c->V);
    if (pos < 0 || pos >= c->max_seq_len) die("model_decode: position %d outside the context [0, %d)", pos, c->max_seq_len);
    int D = c->D, HHd = c->H * c->Hd, E = c->E, K = c->K, im = 0;
    params_t_refresh(m);
    const float *W = m->params, *WT = m->params_t;  // norms and embedding; the weight matrices
    const ParamTable *pt = &m->table;
    float *x = m->t_x, *xn = m->t_xn;
    memcpy(x, W + pt->wte + (size_t)token * D, D * sizeof(float));
    for (int l = 0; l < c->L; l++) {
        const LayerParams *lp = &pt->layer[l];
        float *kc = m->kcache + (size_t)l * c->max_seq_len * HHd, *vc = m->vcache + (size_t)l * c->max_seq_len * HHd;
        rmsnorm_row(xn, NULL, x, W + lp->attn_norm, D);
        matvec_forward(m->t_q, xn, WT + lp->wq, D, HHd);
        matvec_forward(kc + (size_t)pos * HHd, xn, WT + lp->wk, D, HHd);
        matvec_forward(vc + (size_t)pos * HHd, xn, WT + lp->wv, D, HHd);
        const float *cs = m->rope_cos + (size_t)pos * (c->Hd / 2), *sn = m->rope_sin + (size_t)pos * (c->Hd / 2);
        for (int h = 0; h < c->H; h++) {
            rope_row(m->t_q + h * c->Hd, cs, sn, c->Hd, 1.0f);
            rope_row(kc + (size_t)pos * HHd + h * c->Hd, cs, sn, c->Hd, 1.0f);
        }
        attention_decode(m->t_aty, m->t_att, m->t_q, kc, vc, pos, c->H, c->Hd);
        matvec_forward(m->t_out, m->t_aty, WT + lp->wo, HHd, D);
        residual_forward(x, x, m->t_out, D);
        rmsnorm_row(xn, NULL, x, W + lp->mlp_norm, D);
        if (!lp->moe) {
            ffn_token(m, m->t_out, xn, WT + lp->w_gate, WT + lp->w_up, WT + lp->w_down, c->F);
            residual_forward(x, x, m->t_out, D);
            continue;
        }
        // a group of one token: capacity never binds, every choice is kept
        matvec_forward(m->t_z, xn, WT + lp->router, D, E);
        router_row(m->t_p, m->t_top, m->t_z, m->router_bias + (size_t)im++ * E, E, K);
        for (int i = 0; i < D; i++) m->t_acc[i] = 0.0f;
        for (int r = 0; r < K; r++) {
            int e = m->t_top[r];
            ffn_token(m, m->t_out, xn, WT + lp->w_gate + (size_t)e * 2 * c->Fe * D, WT + lp->w_up + (size_t)e * c->Fe * D,
                      WT + lp->w_down + (size_t)e * D * c->Fe, c->Fe);
            moe_decode_accumulate(m->t_acc, m->t_out, m->t_p, m->t_top + r, D);
        }
        residual_forward(x, m->t_acc, x, D);
        if (c->extra_ffn) {
            rmsnorm_row(xn, NULL, x, W + lp->extra_norm, D);
            ffn_token(m, m->t_out, xn, WT + lp->x_gate, WT + lp->x_up, WT + lp->x_down, c->F);
            residual_forward(x, x, m->t_out, D);
        }
    }
    rmsnorm_row(xn, NULL, x, W + pt->final_norm, D);
    matvec_forward(m->t_logits, xn, WT + pt->lm_head, D, c->V);
    return m->t_logits;
}

// ----------------------------------------------------------------------------
// data parallelism over MPI (openmoe.h section 6; compiled with -DUSE_MPI)

#ifdef USE_MPI
#include <mpi.h>

static void mpiCheck(int err, const char *what) {
    if (err != MPI_SUCCESS) die("%s failed (MPI error %d)", what, err);
}

void dp_init(int rank, int n_ranks, int local_rank) {}

// the sum over the ranks, then / n_ranks: with the same batch share per rank
// (train.c), the mean of the ranks' gradients is the gradient of the whole batch
void model_grads_allreduce(Model *m) {
    int n_ranks;
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &n_ranks), "MPI_Comm_size");
    size_t n = m->table.n_params;
    if (n > INT_MAX) die("model_grads_allreduce: %zu parameters, more than one MPI call can carry", n);
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, m->grads, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
    float inv = 1.0f / n_ranks;
    for (size_t i = 0; i < n; i++) m->grads[i] *= inv;
}

// each rank's shard broadcast from it, in rank order
void model_params_allgather(Model *m, const size_t *shard) {
    m->params_t_fresh = 0;
    int n_ranks;
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &n_ranks), "MPI_Comm_size");
    for (int r = 0; r < n_ranks; r++) {
        if (shard[r + 1] - shard[r] > INT_MAX) die("model_params_allgather: a shard beyond one MPI call");
        mpiCheck(MPI_Bcast(m->params + shard[r], (int)(shard[r + 1] - shard[r]), MPI_FLOAT, r, MPI_COMM_WORLD),
                 "MPI_Bcast");
    }
}
#endif
