// openmoe.c: OpenMoE on the CPU in plain C with OpenMP. Forward, backward,
// router, capacity, losses and optimizers, exactly as ../shared/SPEC.md says.
//
// Reading order: the matrix products (their plain definition), the layers,
// each _forward beside its _backward, then the router and the MoE plumbing,
// the losses, the model (forward, backward), the optimizers, and inference
// with a KV cache. Shapes use B batch, T time, D width, HHd = H*Hd, BT = B*T
// tokens, E experts, K experts per token, V vocabulary.
//
// Weights: a model with an optimizer owns its fp32 parameters; an inference
// model may instead read a mapped model file's (model_set_weights), where the
// products widen bf16 and int8 to the fp32 values of the decoded version-1
// file as they read them (gemm.h: Weight), with the same results.
//
// Determinism: every output element is summed by one thread in a fixed order,
// so results do not depend on the number of threads, and a token's result does
// not depend on which rows it was batched with (model_prefill and model_decode
// reproduce model_forward bit for bit).
#include "openmoe.h"
#include "gemm.h"
#include <float.h>
#include <limits.h>
#include <sys/mman.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// matrix products (gemm.h), plain: the definition. Every output element is
// one chain c = MADD(a, b, c) over k in order. Where k is not the innermost
// loop, the chains wait in the output itself between steps (storing a float
// rounds nothing). A normal build takes the same chains from gemm.c, tiled,
// vectorised and threaded (a reader can skip that file); make PLAIN=1 builds
// these loops instead, and both give the same bits.
#ifdef PLAIN

// out (N,OUT; rows ldo apart) = (or += with accumulate) inp (N,IN) @ w (OUT,IN)^T,
// w as stored: each weight decoded (weight_value) before its multiply-add
void matmul_forward(float *out, const float *inp, Weight w, int N, int IN, int OUT, int ldo, int accumulate) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OUT; o++) {
            const float *x = inp + (size_t)n * IN;
            float acc = accumulate ? out[(size_t)n * ldo + o] : 0.0f;
            for (int i = 0; i < IN; i++) acc = MADD(x[i], weight_value(w, (size_t)o * IN + i), acc);
            out[(size_t)n * ldo + o] = acc;
        }
}

// dinp (N,IN) = (or += with accumulate) dout (N,OUT; rows ldo apart) @ w
// (OUT,IN), unless dinp is NULL; dw (OUT,IN) += dout^T @ inp
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int N, int IN,
                     int OUT, int ldo, int accumulate) {
#pragma omp parallel for schedule(static)
    for (int o = 0; o < OUT; o++) {  // dw[o][i]: a chain over n
        float *d = dw + (size_t)o * IN;
        for (int n = 0; n < N; n++)
            for (int i = 0; i < IN; i++) d[i] = MADD(dout[(size_t)n * ldo + o], inp[(size_t)n * IN + i], d[i]);
    }
    if (!dinp) return;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {  // dinp[n][i]: a chain over o
        float *d = dinp + (size_t)n * IN;
        if (!accumulate) memset(d, 0, IN * sizeof(float));
        for (int o = 0; o < OUT; o++)
            for (int i = 0; i < IN; i++) d[i] = MADD(dout[(size_t)n * ldo + o], w[(size_t)o * IN + i], d[i]);
    }
}

// C (M,N; rows ldc apart) = (or += with accumulate) A (M,K) @ B (K,N),
// A(i,k) = A[i*ars + k*aks], B(k,n) = B[k*ldb + n]
void gemm(float *C, int ldc, const float *A, int ars, int aks, const float *B, int ldb, int M, int N, int K,
          int accumulate) {
    for (int i = 0; i < M; i++) {  // C[i][j]: a chain over k
        float *c = C + (size_t)i * ldc;
        if (!accumulate) memset(c, 0, N * sizeof(float));
        for (int k = 0; k < K; k++)
            for (int j = 0; j < N; j++) c[j] = MADD(A[(size_t)i * ars + (size_t)k * aks], B[(size_t)k * ldb + j], c[j]);
    }
}

// out (OUT) = (or += with accumulate) w (OUT,IN) @ inp (IN), w as stored
void matvec_forward(float *out, const float *inp, Weight w, int IN, int OUT, int accumulate) {
    for (int o = 0; o < OUT; o++) {  // out[o]: a chain over i
        float acc = accumulate ? out[o] : 0.0f;
        for (int i = 0; i < IN; i++) acc = MADD(inp[i], weight_value(w, (size_t)o * IN + i), acc);
        out[o] = acc;
    }
}

// out (OUT) = (or += with accumulate) inp (IN) @ w (IN,OUT), w's rows ldw apart
void vecmat_forward(float *out, const float *inp, const float *w, int IN, int OUT, int accumulate, int ldw) {
    if (!accumulate) memset(out, 0, OUT * sizeof(float));  // out[o]: a chain over i
    for (int i = 0; i < IN; i++)
        for (int o = 0; o < OUT; o++) out[o] = MADD(inp[i], w[(size_t)i * ldw + o], out[o]);
}

// wt (IN,OUT) = w (OUT,IN)^T, w's rows ldw apart
void transpose(float *wt, const float *w, int OUT, int IN, int ldw) {
    for (int o = 0; o < OUT; o++)
        for (int i = 0; i < IN; i++) wt[(size_t)i * OUT + o] = w[(size_t)o * ldw + i];
}
#endif  // PLAIN

// ----------------------------------------------------------------------------
// embedding

// out (BT,D) = wte[x], the rows decoded (weight_decode)
static void encoder_forward(float *out, const int *x, Weight wte, int BT, int D) {
    for (int n = 0; n < BT; n++) weight_decode(out + (size_t)n * D, wte, (size_t)x[n] * D, D);
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

// inp (N,D) -> out (N,D), rstd (N) (rstd may be NULL)
static void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int N, int D) {
#pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) rmsnorm_row(out + (size_t)n * D, rstd ? rstd + n : NULL, inp + (size_t)n * D, w, D);
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
// The angles' cos and sin come from tables (T, Hd/2) made once
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

// in place on the q and k parts of qkv (N,3HHd), token n at position pos[n]
// (pos NULL: pos0 + n % T); the backward is the rotation by -angle
static void rope_forward(float *qkv, const float *cosv, const float *sinv, const int *pos, int N, int T, int H, int Hd,
                         int pos0, float sign) {
    int half = Hd / 2, HHd = H * Hd;
#pragma omp parallel for schedule(static) if (N > 1)
    for (int n = 0; n < N; n++) {
        size_t p = pos ? pos[n] : pos0 + n % T;
        for (int h = 0; h < 2 * H; h++)  // q's heads, then k's
            rope_row(qkv + (size_t)n * 3 * HHd + (size_t)h * Hd, cosv + p * half, sinv + p * half, Hd, sign);
    }
}
static void rope_backward(float *dqkv, const float *cosv, const float *sinv, const int *pos, int N, int T, int H,
                          int Hd) {
    rope_forward(dqkv, cosv, sinv, pos, N, T, H, Hd, 0, -1.0f);
}

// ----------------------------------------------------------------------------
// causal attention, no 1/sqrt(Hd) (OpenMoE folds it into Wq's init). Per
// (batch, head) it is three small matmuls on strided views of q, k, v: head
// h of token n is at qkv[n*3HHd + h*Hd] (q), + HHd (k), + 2HHd (v).
// scores = q k^T, softmax over the keys s <= t of t's segment (all s <= t
// without segments), out = P v. The masked probabilities are exactly 0, so
// the sums equal those of the one-token path in model_decode bit for bit,
// and the backward needs no mask: P is 0 where it would apply.

// scores att[0..t] -> probabilities in place, 0 at the keys of other segments
// than t's (seg (T): the row's segments; NULL: one); att[t+1..T-1] = 0
static void attention_softmax_row(float *att, int t, int T, const int *seg) {
    float maxs = -FLT_MAX;
    for (int s = 0; s <= t; s++)
        if (!seg || seg[s] == seg[t]) maxs = att[s] > maxs ? att[s] : maxs;
    float sum = 0.0f;
    for (int s = 0; s <= t; s++) {
        att[s] = !seg || seg[s] == seg[t] ? expf(att[s] - maxs) : 0.0f;
        sum += att[s];
    }
    float inv = 1.0f / sum;
    for (int s = 0; s <= t; s++) att[s] *= inv;
    for (int s = t + 1; s < T; s++) att[s] = 0.0f;
}

#define AB 64  // attention rows per block: a block needs keys 0..its last row only

// qkv (BT,3HHd), seg (BT) or NULL -> out (BT,HHd), att (B,H,T,T) probabilities; kt (B,H,Hd,T) scratch
static void attention_forward(float *out, float *att, const float *qkv, const int *seg, int B, int T, int H, int Hd,
                              float *kt) {
    int HHd = H * Hd, ld = 3 * HHd;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t bh = (size_t)b * H + h;
            const float *q = qkv + (size_t)b * T * ld + h * Hd, *k = q + HHd, *v = q + 2 * HHd;
            const int *row_seg = seg ? seg + (size_t)b * T : NULL;
            float *P = att + bh * T * T, *kT = kt + bh * Hd * T, *o = out + (size_t)b * T * HHd + h * Hd;
            transpose(kT, k, T, Hd, ld);
            for (int i0 = 0; i0 < T; i0 += AB) {
                int i1 = i0 + AB < T ? i0 + AB : T;
                gemm(P + (size_t)i0 * T, T, q + (size_t)i0 * ld, ld, 1, kT, T, i1 - i0, i1, Hd, 0);
                for (int t = i0; t < i1; t++) attention_softmax_row(P + (size_t)t * T, t, T, row_seg);
                gemm(o + (size_t)i0 * HHd, HHd, P + (size_t)i0 * T, T, 1, v, ld, i1 - i0, Hd, i1, 0);
            }
        }
}

// dout (BT,HHd) -> dqkv (BT,3HHd), overwritten; dscore (B,H,T,T); vt (B,H,Hd,T) scratch
static void attention_backward(float *dqkv, float *dscore, const float *dout, const float *att, const float *qkv,
                               int B, int T, int H, int Hd, float *vt) {
    int HHd = H * Hd, ld = 3 * HHd;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            size_t bh = (size_t)b * H + h, base = (size_t)b * T * ld + h * Hd;
            const float *q = qkv + base, *k = q + HHd, *v = q + 2 * HHd, *P = att + bh * T * T;
            const float *dy = dout + (size_t)b * T * HHd + h * Hd;
            float *dq = dqkv + base, *dk = dq + HHd, *dv = dq + 2 * HHd;
            float *dS = dscore + bh * T * T, *vT = vt + bh * Hd * T;
            transpose(vT, v, T, Hd, ld);
            for (int i0 = 0; i0 < T; i0 += AB) {  // query rows i0..i1-1 see keys 0..i1-1
                int i1 = i0 + AB < T ? i0 + AB : T;
                // dP = dout v^T, then through the softmax: dS = P (dP - rowsum(P dP))
                gemm(dS + (size_t)i0 * T, T, dy + (size_t)i0 * HHd, HHd, 1, vT, T, i1 - i0, i1, Hd, 0);
                for (int t = i0; t < i1; t++) {
                    const float *p = P + (size_t)t * T;
                    float *ds = dS + (size_t)t * T, pdp = 0.0f;
                    for (int s = 0; s <= t; s++) pdp += p[s] * ds[s];
                    for (int s = 0; s <= t; s++) ds[s] = p[s] * (ds[s] - pdp);
                    for (int s = t + 1; s < T; s++) ds[s] = 0.0f;
                }
                gemm(dq + (size_t)i0 * ld, ld, dS + (size_t)i0 * T, T, 1, k, ld, i1 - i0, Hd, i1, 0);
            }
            for (int s0 = 0; s0 < T; s0 += AB) {  // key rows s0..s1-1 are seen by queries s0..T-1
                int s1 = s0 + AB < T ? s0 + AB : T;
                size_t at = (size_t)s0 * T + s0;
                gemm(dk + (size_t)s0 * ld, ld, dS + at, 1, T, q + (size_t)s0 * ld, ld, s1 - s0, Hd, T - s0,
                     0);  // dk = dS^T q
                gemm(dv + (size_t)s0 * ld, ld, P + at, 1, T, dy + (size_t)s0 * HHd, HHd, s1 - s0, Hd, T - s0,
                     0);  // dv = P^T dout
            }
        }
}

// ----------------------------------------------------------------------------
// the gated FFN of OpenMoE (dense, extra and every expert):
//   [a | b] = x Wg^T,  h = a * silu(b) * (x Wu^T),  out = h Wd^T
// The matmuls write a and b and u side by side, gu (N,3F) = [a | b | u]; when
// Wu follows Wg where they are stored (dense and extra FFNs: w_gate, w_up are
// adjacent in the file order, unless int8 scales lie between) that is one
// matmul with OUT = 3F.

// whether the n stored elements of a are followed by b's, so that the two are
// one matrix: the same type, b where a ends, no scales between them
static int weight_follows(Weight a, size_t n, Weight b) {
    if (a.type != b.type || a.type == WEIGHT_INT8) return 0;
    return b.values == (const void *)((const char *)a.values + n * (a.type == WEIGHT_BF16 ? 2 : 4));
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// gated product of one row: gu (3F) = [a | b | u] -> h (F)
static void ffn_gate_row(float *h, const float *gu, int F) {
    for (int i = 0; i < F; i++) {
        float b = gu[F + i];
        h[i] = gu[i] * (b * sigmoidf(b)) * gu[2 * F + i];
    }
}

// inp (N,D) -> out (N,D) (= or += with accumulate); keeps gu (N,3F), h (N,F) for the backward
static void ffn_forward(float *out, float *gu, float *h, const float *inp, Weight wg, Weight wu, Weight wd, int N,
                        int D, int F, int accumulate) {
    if (N <= 0) return;
    if (weight_follows(wg, 2 * (size_t)F * D, wu)) {
        matmul_forward(gu, inp, wg, N, D, 3 * F, 3 * F, 0);
    } else {
        matmul_forward(gu, inp, wg, N, D, 2 * F, 3 * F, 0);
        matmul_forward(gu + 2 * F, inp, wu, N, D, F, 3 * F, 0);
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) ffn_gate_row(h + (size_t)n * F, gu + (size_t)n * 3 * F, F);
    matmul_forward(out, h, wd, N, F, D, D, accumulate);
}

// dout (N,D) -> dinp (N,D) overwritten; dwg, dwu, dwd accumulated; dgu (N,3F), dh (N,F) scratch
static void ffn_backward(float *dinp, float *dwg, float *dwu, float *dwd, const float *dout, const float *inp,
                         const float *gu, const float *h, const float *wg, const float *wu, const float *wd, int N,
                         int D, int F, float *dgu, float *dh) {
    if (N <= 0) return;
    matmul_backward(dh, dwd, dout, h, wd, N, F, D, D, 0);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *g = gu + (size_t)n * 3 * F, *dhn = dh + (size_t)n * F;
        float *dg = dgu + (size_t)n * 3 * F;
        for (int i = 0; i < F; i++) {
            float a = g[i], b = g[F + i], u = g[2 * F + i], s = sigmoidf(b), silu = b * s;
            dg[i] = dhn[i] * silu * u;
            dg[F + i] = dhn[i] * a * u * s * (1.0f + b * (1.0f - s));
            dg[2 * F + i] = dhn[i] * a * silu;
        }
    }
    if (wu == wg + 2 * (size_t)F * D) {
        matmul_backward(dinp, dwg, dgu, inp, wg, N, D, 3 * F, 3 * F, 0);
    } else {
        matmul_backward(dinp, dwg, dgu, inp, wg, N, D, 2 * F, 3 * F, 0);
        matmul_backward(dinp, dwu, dgu + 2 * F, inp, wu, N, D, F, 3 * F, 1);
    }
}

// ----------------------------------------------------------------------------
// router: fp32 softmax over all E experts, top-K (ties to the lower index),
// one token at a time by router_row (openmoe.h)

// inp (N,D), wr (E,D), bias (E) -> z, p (N,E), lse (N), top (N,K) chosen by p + bias
static void router_forward(float *z, float *p, float *lse, int *top, const float *inp, const float *wr,
                           const float *bias, int N, int D, int E, int K) {
    matmul_forward(z, inp, weight_fp32(wr), N, D, E, E, 0);
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
// -> kept (N,K) 0/1; key (N*K), seg (E+1), cursor (E) scratch.
static void moe_capacity(int *kept, const int *top, const float *p, int N, int K, int E, const MoeSettings *s,
                         uint64_t *key, int *seg, int *cursor) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P);
    for (int g = 0; g < group_count(N, G, P); g++) {
        int g0 = group_start(g, G, P), n1 = g0 + group_tokens(g, N, G, P);
        int C = moe_capacity_of(n1 - g0, E, K, s->cf1000, s->min_capacity, s->capacity_rule);
        if (s->drop_policy == DROP_PROBS && n1 - g0 > PROBS_MAX_GROUP)
            die("drop policy probs: a group of %d tokens does not fit its sort keys (group <= %d)", n1 - g0,
                PROBS_MAX_GROUP);
        if (s->drop_policy == DROP_PROBS) moe_keep_by_probs(kept, top, p, g0, n1, K, E, C, key, seg, cursor);
        else moe_keep_by_position(kept, top, g0, n1, K, E, C, cursor);
    }
}

// Load-balance loss (SPEC §4): per routing group E sum_e f_e P_e (f_e: share
// of the group's tokens whose top-K holds e, P_e: mean p_e); the layer's lb
// is the mean over the groups. lb_sum = the sum over the groups; lbf
// (groups,E) keeps f for the backward; P (E) scratch.
static void moe_load_balance_forward(double *lb_sum, float *lbf, const float *p, const int *top, int N, int K, int E,
                                     const MoeSettings *s, float *P) {
    int first = group_first(N, s->first_group), G = group_len(N, s->group_size, first);
    double lb = 0.0;
    for (int g = 0; g < group_count(N, G, first); g++) {
        int g0 = group_start(g, G, first), len = group_tokens(g, N, G, first), n1 = g0 + len;
        float *f = lbf + (size_t)g * E;
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
static void moe_load_balance_backward(float *dp, const float *lbf, int N, int E, const MoeSettings *s, float lb_w) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P), n_groups = group_count(N, G, P);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        int g = group_of(n, G, P), len = group_tokens(g, N, G, P);
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

// dlogits (N,V) = d(ce + lz_coef * lz)/dlogits, with ce and lz means over m (forward_loss_targets)
static void crossentropy_backward(float *dlogits, const float *logits, const float *lse, const int *y,
                                  int N, int V, float m, float lz_coef) {
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

// dst (n) = src: a residual, which the next matmul then adds to
static void copy_floats(float *dst, const float *src, size_t n) { memcpy(dst, src, n * sizeof(float)); }

// ----------------------------------------------------------------------------
// the model: parameters, gradients and activations, each in one buffer. The
// activations are openmoe.h's tables, and these of the CPU's own:
//  name       type      elements          when
#define CPU_ACTS(_)                                                                                             \
    _(kt,        float,    B * H * Hd * T,   1)       /* (B,H,Hd,T) k (forward) or v (backward) transposed */   \
    _(lbP,       float,    E,                any_moe) /* (E) load-balance scratch */                              \
    _(cursor,    int,      E,                any_moe) /* (E) */                                                   \
    _(seg,       int,      E + 1,            any_moe) /* (E+1) */                                                 \
    _(prio_key,  uint64_t, BT * K,           any_moe) /* (BT*K) the drop policy probs' sort keys */

typedef float floatX;  // the matmul operands' type in the tables: fp32 on the CPU

typedef struct {       // one layer's activations: LAYER_ACTS, NULL where the layer has none
    float *in;         // (BT,D) the residual stream entering the layer: resid[l]
    LAYER_ACTS(ACT_POINTER)
} LayerActs;

typedef struct {       // the model's: FORWARD_ACTS, BACKWARD_ACTS (with an optimizer) and CPU_ACTS
    LayerActs *layer;  // [L]
    float *final_in;   // (BT,D) resid[L], the final norm's input
    FORWARD_ACTS(ACT_POINTER)
    BACKWARD_ACTS(ACT_POINTER)
    CPU_ACTS(ACT_POINTER)
} Acts;

struct Model {
    Config c;
    ParamTable table;
    int Bmax, Tmax;
    float *params;            // (n_params) its own parameters (with an optimizer, or model_set_params), else NULL
    Weight *weight;           // [n_tensors] each tensor as the forward and decode read it: in params, or where a
                              // mapped model file holds it; NULL until the model has weights
    float *widened;           // a version-2 file's norms and routers in fp32, which the forward reads so
    float *grads;             // (n_params), NULL without an optimizer
    float *opt_state;         // (n_opt_state), layout of opt_state_floats() for the tensors of the shard
    size_t n_opt_state;
    size_t shard_lo, shard_hi;  // ZeRO-1: model_update steps the tensors that start in [lo, hi)
    OptKind opt_kind;
    int opt_min_dim;
    char *buffer;             // every activation and buffer, carved by acts_carve
    size_t buffer_bytes;
    Acts acts;
    MODEL_BUFFERS(ACT_POINTER)
    float *router_bias;       // (n_moe, E) loss-free balancing bias, 0 unless set
    // the last forward
    int B, T, has_targets, n_targets;
    int has_logits;           // it was a model_forward (a prefill keeps only its last position's)
    int has_segment, has_position;  // the batch gave segments, positions (in segment, position)
    double loss_targets;            // what its CE and z-loss are means over
    MoeSettings s;
    RouterStats *stats;       // [n_moe]
    int *stat_ints;           // the routed and kept counts behind stats
};

const Config *model_config(const Model *m) { return &m->c; }
const ParamTable *model_param_table(const Model *m) { return &m->table; }

// the weights from parameter offset off on (a tensor, or an expert's slice
// of one), as they are stored
static Weight param_weight(const Model *m, size_t off) {
    if (!m->weight) die("the model has no weights: model_set_params or model_set_weights gives it some");
    int i = param_tensor_of(&m->table, off);
    return weight_at(m->weight[i], off - m->table.tensors[i].offset);
}
// the fp32 values from parameter offset off on: the norms and routers (in
// every version, after model_set_weights' widening), any parameter of a model
// with its own
static const float *param_f32(const Model *m, size_t off) {
    Weight w = param_weight(m, off);
    if (w.type != WEIGHT_FP32) die("param_f32: the parameter at %zu is not stored in fp32", off);
    return (const float *)w.values;
}

// bytes of zeros, not resident until touched (an anonymous mapping): an
// inference model's KV cache and its logits for a whole sequence (run
// --verify) take memory only as they are used
static char *alloc_zeroed(size_t bytes) {
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("out of memory: %zu bytes for the activations (%s)", bytes, strerror(errno));
    return (char *)p;
}

// a bump allocator over one buffer: a first pass with base NULL only counts.
// Arrays take whole cache lines (the buffer starts on one), so that each
// starts on a line: gemm.c streams only aligned rows.
#define LINE_BYTES (LINE_FLOATS * sizeof(float))
static void *carve(char *base, size_t *used, size_t bytes) {
    void *p = base ? base + *used : NULL;
    *used = size_add(*used, size_add(bytes, LINE_BYTES - 1) / LINE_BYTES * LINE_BYTES);
    return p;
}

// every row of the tables at its offset in base; returns the bytes (base NULL:
// only counts). The layers' rows for every layer with an optimizer, else once
// for all layers (openmoe.h: ACT_SHARED_LAYER)
static size_t acts_carve(Model *m, char *base) {
    const Config *c = &m->c;
    Acts *A = &m->acts;
    size_t used = 0;
    int keep = m->grads != NULL;
    ACT_SIZES(c, m->Bmax, m->Tmax, 0, keep);
#define CARVE(name, type, n, when) A->name = (when) ? (type *)carve(base, &used, size_mul(n, sizeof(type))) : NULL;
    FORWARD_ACTS(CARVE)
    if (m->grads) {
        BACKWARD_ACTS(CARVE)
    }
    CPU_ACTS(CARVE)
#undef CARVE
#define CARVE(name, type, n, when) m->name = (when) ? (type *)carve(base, &used, size_mul(n, sizeof(type))) : NULL;
    MODEL_BUFFERS(CARVE)
#undef CARVE
#define CARVE(name, type, n, when) a->name = (when) ? (type *)carve(base, &used, size_mul(n, sizeof(type))) : NULL;
#define SHARE(name, type, n, when) a->name = (when) ? shared.name : NULL;
    LayerActs shared;
    memset(&shared, 0, sizeof(shared));
    if (!keep) {
        LayerActs *a = &shared;
        ACT_SHARED_LAYER(c);
        LAYER_ACTS(CARVE)
    }
    for (int l = 0; l < c->L; l++) {
        LayerActs *a = &A->layer[l];
        ACT_LAYER(c, l);
        if (keep) {
            LAYER_ACTS(CARVE)
        } else {
            LAYER_ACTS(SHARE)
        }
        a->in = A->resid ? A->resid + ACT_RESID(l) : NULL;
        if (moe && !extra) a->moe_out = A->resid ? A->resid + ACT_RESID(l + 1) : NULL;
    }
#undef SHARE
#undef CARVE
    A->final_in = A->resid ? A->resid + ACT_RESID(L) : NULL;
    return used;
}

// the model's own parameters (zero), which the forward and decode then read
static void params_own(Model *m) {
    const ParamTable *pt = &m->table;
    m->params = (float *)callocAlignedCheck(pt->n_params, sizeof(float), LINE_BYTES);
    if (!m->weight) m->weight = (Weight *)callocCheck(pt->n_tensors, sizeof(Weight));
    for (int i = 0; i < pt->n_tensors; i++) m->weight[i] = weight_fp32(m->params + pt->tensors[i].offset);
    free(m->widened);
    m->widened = NULL;
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
    if (opt) {
        size_t n = m->table.n_params;
        params_own(m);
        m->opt_kind = opt->kind;
        m->opt_min_dim = opt->min_dim;
        m->grads = (float *)callocAlignedCheck(n, sizeof(float), LINE_BYTES);
        m->shard_lo = opt->shard_lo;
        m->shard_hi = opt->shard_hi ? opt->shard_hi : n;
        m->n_opt_state = opt_state_floats_range(&m->table, opt->kind, opt->min_dim, m->shard_lo, m->shard_hi);
        m->opt_state = (float *)callocCheck(m->n_opt_state, sizeof(float));
    }
    m->acts.layer = (LayerActs *)callocCheck(c->L, sizeof(LayerActs));
    m->buffer_bytes = acts_carve(m, NULL);
    m->buffer = alloc_zeroed(m->buffer_bytes);
    acts_carve(m, m->buffer);
    rope_tables(m->rope_cos, m->rope_sin, T, c->Hd);
    m->stats = router_stats_create(n_moe_layers(c), c->E, &m->stat_ints);
    m->router_bias = (float *)callocCheck((size_t)n_moe_layers(c) * c->E, sizeof(float));
    return m;
}

void model_free(Model *m) {
    if (!m) return;
    free(m->params);
    free(m->weight);
    free(m->widened);
    free(m->grads);
    free(m->opt_state);
    if (m->buffer && munmap(m->buffer, m->buffer_bytes ? m->buffer_bytes : 1) != 0)
        die("model_free: munmap failed: %s", strerror(errno));
    free(m->acts.layer);
    free(m->stats);
    free(m->stat_ints);
    free(m->router_bias);
    param_table_free(&m->table);
    free(m);
}

void model_set_params(Model *m, const float *params) {
    if (!m->params) params_own(m);
    memcpy(m->params, params, m->table.n_params * sizeof(float));
}
void model_get_params(const Model *m, float *params) {
    if (!m->params) die("model_get_params: the model reads a model file's weights and has no parameters of its own");
    memcpy(params, m->params, m->table.n_params * sizeof(float));
}

Precision model_file_precision(int version) { return PRECISION_FP32; }

// Each tensor where f holds it: fp32 (version 1; version 3's norms and
// routers), bf16 (version 2), int8 and its scales (version 3's matrices). A
// version-2 file's norms and routers are widened into m->widened, as the
// norms and the router's softmax read fp32.
void model_set_weights(Model *m, const ModelFile *f) {
    if (memcmp(&m->c, &f->c, sizeof(Config)) != 0)
        die("model_set_weights: %s holds a model of another config than the model's", f->path);
    if (m->params) die("model_set_weights: the model has parameters of its own (it was made with an optimizer)");
    const ParamTable *pt = &m->table;
    size_t *offset = (size_t *)mallocCheck(pt->n_tensors * sizeof(size_t)), n_wide = 0;
    tensor_file_offsets(offset, pt, f->version, f->group);
    for (int i = 0; i < pt->n_tensors; i++)
        if (f->version == MODEL_BF16 && !tensor_quantized(&pt->tensors[i])) n_wide += tensor_numel(&pt->tensors[i]);
    free(m->widened);
    m->widened = n_wide ? (float *)mallocCheck(n_wide * sizeof(float)) : NULL;
    if (!m->weight) m->weight = (Weight *)callocCheck(pt->n_tensors, sizeof(Weight));
    float *wide = m->widened;
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *t = &pt->tensors[i];
        const unsigned char *at = f->data + offset[i];
        size_t n = tensor_numel(t);
        Weight w = weight_fp32((const float *)at);
        if (f->version == MODEL_BF16) {
            Weight b = {WEIGHT_BF16, at, NULL, 0};
            w = b;
            if (!tensor_quantized(t)) {  // a norm or a router: widened
                weight_decode(wide, b, 0, (int)n);
                w = weight_fp32(wide);
                wide += n;
            }
        } else if (f->version == MODEL_INT8 && tensor_quantized(t)) {
            Weight q = {WEIGHT_INT8, at + n / f->group * sizeof(float), (const float *)at, f->group};
            w = q;
        }
        m->weight[i] = w;
    }
    free(offset);
}

void model_get_grads(const Model *m, float *grads) {
    if (!m->grads) die("model_get_grads: the model was created without an optimizer, so it has no gradients");
    memcpy(grads, m->grads, m->table.n_params * sizeof(float));
}
void model_set_grads(Model *m, const float *grads) {
    if (!m->grads) die("model_set_grads: the model was created without an optimizer, so it has no gradients");
    memcpy(m->grads, grads, m->table.n_params * sizeof(float));
}
void model_get_logits(const Model *m, float *logits) {
    if (!m->has_logits) die("model_get_logits: the last forward was a prefill, which keeps its last position's only");
    memcpy(logits, m->acts.logits, (size_t)m->B * m->T * m->c.V * sizeof(float));
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
    if (!m->grads) die("model_get_routing: a model without an optimizer keeps one layer's activations, not each's");
    const LayerActs *a = &m->acts.layer[(i + 1) * m->c.moe_every - 1];
    for (int j = 0; j < BTK; j++) {
        expert[j] = a->top[j];
        prob[j] = a->p[(size_t)(j / K) * m->c.E + a->top[j]];
        kept[j] = (uint8_t)a->kept[j];
    }
}

// ----------------------------------------------------------------------------
// forward

// q | k | v (N,3HHd) = inp (N,D) times wq, wk, wv: one matmul where they are
// stored as one matrix (adjacent in the file order, no int8 scales between)
static void qkv_forward(float *qkv, const float *inp, Weight wq, Weight wk, Weight wv, int N, int D, int HHd) {
    size_t n = (size_t)HHd * D;
    if (weight_follows(wq, n, wk) && weight_follows(wk, n, wv)) {
        matmul_forward(qkv, inp, wq, N, D, 3 * HHd, 3 * HHd, 0);
        return;
    }
    matmul_forward(qkv, inp, wq, N, D, HHd, 3 * HHd, 0);
    matmul_forward(qkv + HHd, inp, wk, N, D, HHd, 3 * HHd, 0);
    matmul_forward(qkv + 2 * HHd, inp, wv, N, D, HHd, 3 * HHd, 0);
}

// the keys and values of qkv (T,3HHd), one sequence, into the cache kc, vc (T,HHd)
static void kv_cache_fill(float *kc, float *vc, const float *qkv, int T, int HHd) {
    for (int t = 0; t < T; t++) {
        copy_floats(kc + (size_t)t * HHd, qkv + (size_t)t * 3 * HHd + HHd, HHd);
        copy_floats(vc + (size_t)t * HHd, qkv + (size_t)t * 3 * HHd + 2 * HHd, HHd);
    }
}

// the MoE sublayer im (0-based among MoE layers): moe_out (BT,D) = mid +
// MoE(RMSNorm(mid)). Leaves the layer's lb and rz sums in m->sums and its
// routed/kept counts in m->stats[im], for model_forward's router statistics.
// An expert's weights are read only when it has rows.
static void moe_forward(Model *m, LayerActs *a, const LayerParams *lp, int im, int BT) {
    const Config *c = &m->c;
    Acts *A = &m->acts;
    int D = c->D, E = c->E, K = c->K, Fe = c->Fe;
    int *routed = m->stats[im].routed, *kept = m->stats[im].kept;
    rmsnorm_forward(a->moe_in, a->rstd2, a->mid, param_f32(m, lp->mlp_norm), BT, D);
    router_forward(a->z, a->p, a->lse, a->top, a->moe_in, param_f32(m, lp->router), m->router_bias + (size_t)im * E,
                   BT, D, E, K);
    moe_capacity(a->kept, a->top, a->p, BT, K, E, &m->s, A->prio_key, A->seg, A->cursor);
    moe_rows(a->start, a->row_token, a->row_of, routed, kept, a->top, a->kept, BT, K, E, A->cursor);
    const int *start = a->start;
    moe_dispatch(a->xe, a->row_token, a->moe_in, start[E], D);
    for (int e = 0; e < E; e++) {
        size_t r0 = start[e];
        int rows = start[e + 1] - start[e];
        if (rows == 0) continue;
        ffn_forward(a->ye + r0 * D, a->gue + r0 * 3 * Fe, a->he + r0 * Fe, a->xe + r0 * D,
                    param_weight(m, lp->w_gate + (size_t)e * 2 * Fe * D), param_weight(m, lp->w_up + (size_t)e * Fe * D),
                    param_weight(m, lp->w_down + (size_t)e * D * Fe), rows, D, Fe, 0);
    }
    moe_combine(a->moe_out, a->mid, a->ye, a->p, a->top, a->row_of, BT, K, E, D);
    moe_load_balance_forward(m->sums + 2 + 2 * im, a->lbf, a->p, a->top, BT, K, E, &m->s, A->lbP);
    router_z_loss_sum(m->sums + 3 + 2 * im, a->lse, BT);
}

// the layers and the final norm: A->lnf (BT,D) from the tokens m->x. With
// fill_cache (one sequence, B = 1), each layer's keys and values go to the
// KV cache at positions 0..T-1.
static void forward_layers(Model *m, int B, int T, int fill_cache) {
    const Config *c = &m->c;
    Acts *A = &m->acts;
    int BT = B * T, D = c->D, H = c->H, Hd = c->Hd, HHd = H * Hd;
    const int *seg = m->has_segment ? m->segment : NULL, *pos = m->has_position ? m->position : NULL;
    encoder_forward(A->layer[0].in, m->x, param_weight(m, m->table.wte), BT, D);
    int im = 0;
    for (int l = 0; l < c->L; l++) {
        LayerActs *a = &A->layer[l];
        const LayerParams *lp = &m->table.layer[l];
        float *out = l + 1 < c->L ? A->layer[l + 1].in : A->final_in;
        // mid = in + Attn(RMSNorm(in))
        rmsnorm_forward(a->ln1, a->rstd1, a->in, param_f32(m, lp->attn_norm), BT, D);
        qkv_forward(a->qkv, a->ln1, param_weight(m, lp->wq), param_weight(m, lp->wk), param_weight(m, lp->wv), BT,
                    D, HHd);
        rope_forward(a->qkv, m->rope_cos, m->rope_sin, pos, BT, T, H, Hd, 0, 1.0f);
        if (fill_cache)
            kv_cache_fill(m->kcache + (size_t)l * m->Tmax * HHd, m->vcache + (size_t)l * m->Tmax * HHd, a->qkv, T, HHd);
        attention_forward(a->atty, a->att, a->qkv, seg, B, T, H, Hd, A->kt);
        copy_floats(a->mid, a->in, (size_t)BT * D);  // the residual, then += atty Wo^T
        matmul_forward(a->mid, a->atty, param_weight(m, lp->wo), BT, HHd, D, D, 1);
        if (!lp->moe) {  // out = mid + FFN(RMSNorm(mid))
            rmsnorm_forward(a->ln2, a->rstd2, a->mid, param_f32(m, lp->mlp_norm), BT, D);
            copy_floats(out, a->mid, (size_t)BT * D);
            ffn_forward(out, a->gu, a->h, a->ln2, param_weight(m, lp->w_gate), param_weight(m, lp->w_up),
                        param_weight(m, lp->w_down), BT, D, c->F, 1);
            continue;
        }
        // moe_out = mid + MoE(RMSNorm(mid)); then out = moe_out + FFN_extra(RMSNorm(moe_out))
        moe_forward(m, a, lp, im++, BT);
        if (c->extra_ffn) {
            rmsnorm_forward(a->ln3, a->rstd3, a->moe_out, param_f32(m, lp->extra_norm), BT, D);
            copy_floats(out, a->moe_out, (size_t)BT * D);
            ffn_forward(out, a->gux, a->hx, a->ln3, param_weight(m, lp->x_gate), param_weight(m, lp->x_up),
                        param_weight(m, lp->x_down), BT, D, c->F, 1);
        }
    }
    rmsnorm_forward(A->lnf, A->rstdf, A->final_in, param_f32(m, m->table.final_norm), BT, D);
}

// the batch and settings of a forward, checked and kept
static void forward_begin(Model *m, const Batch *b, const MoeSettings *s) {
    forward_args_check(b->B, b->T, m->Bmax, m->Tmax, s);
    m->B = b->B;
    m->T = b->T;
    m->s = *s;
    m->has_targets = b->y != NULL;
    m->has_segment = b->segment != NULL;
    m->has_position = b->position != NULL;
    m->n_targets = forward_batch_copy(m->x, m->y, m->segment, m->position, b, m->c.V, m->Tmax);
    m->loss_targets = forward_loss_targets(b, m->n_targets);
}

// the router statistics of the forward (model_router_stats); returns the assignments dropped
static long forward_router_stats(Model *m) {
    int BT = m->B * m->T, P = group_first(BT, m->s.first_group), G = group_len(BT, m->s.group_size, P);
    return router_stats_from_sums(m->stats, m->sums + 2, n_moe_layers(&m->c), group_count(BT, G, P), BT, m->c.K,
                                  m->c.E);
}

void model_forward(Model *m, const Batch *batch, const MoeSettings *s, float *losses) {
    const Config *c = &m->c;
    Acts *A = &m->acts;
    forward_begin(m, batch, s);
    forward_layers(m, batch->B, batch->T, 0);
    int BT = batch->B * batch->T;
    matmul_forward(A->logits, A->lnf, param_weight(m, m->table.lm_head), BT, c->D, c->V, c->V, 0);
    crossentropy_forward(m->sums, A->lse, A->logits, m->y, BT, c->V);
    m->has_logits = 1;
    long dropped = forward_router_stats(m);
    losses_from_sums(losses, m->sums[0], m->sums[1], m->loss_targets, m->stats, n_moe_layers(c), dropped,
                     (long)BT * c->K, s);
}

// the last position's logits as decode computes them (a matvec: the chains of the forward's matmul row)
const float *model_prefill(Model *m, const int32_t *x, int T, const MoeSettings *s) {
    const Config *c = &m->c;
    Batch batch = {x, NULL, NULL, NULL, 1, T, 0.0};  // one segment at positions 0..T-1, as decode continues it
    forward_begin(m, &batch, s);
    forward_layers(m, 1, T, 1);
    matvec_forward(m->t_logits, m->acts.lnf + (size_t)(T - 1) * c->D, param_weight(m, m->table.lm_head), c->D, c->V,
                   0);
    m->has_logits = 0;
    forward_router_stats(m);
    return m->t_logits;
}

// ----------------------------------------------------------------------------
// backward. d_res carries the gradient of the residual stream from the top
// down; each sublayer adds its input gradient to it through its RMSNorm.

// d_res holds d moe_out; adds the gradient through the MoE and its norm
static void moe_backward(Model *m, LayerActs *a, const LayerParams *lp, int BT) {
    const Config *c = &m->c;
    Acts *A = &m->acts;
    int D = c->D, E = c->E, K = c->K, Fe = c->Fe, nm = n_moe_layers(c);
    const float *W = m->params;
    const floatX *WX = W;
    float *G = m->grads;
    const int *start = a->start;
    moe_combine_backward(A->dye, A->dp, A->d_res, a->ye, a->p, a->top, a->row_of, BT, K, E, D);
    for (int e = 0; e < E; e++) {
        size_t r0 = start[e];
        int rows = start[e + 1] - start[e];
        size_t og = lp->w_gate + (size_t)e * 2 * Fe * D, ou = lp->w_up + (size_t)e * Fe * D,
               od = lp->w_down + (size_t)e * D * Fe;
        ffn_backward(A->dxe + r0 * D, G + og, G + ou, G + od, A->dye + r0 * D, a->xe + r0 * D, a->gue + r0 * 3 * Fe,
                     a->he + r0 * Fe, WX + og, WX + ou, WX + od, rows, D, Fe, A->dgu, A->dh);
    }
    // the router: combine weights, load balance and z-loss all act on p
    moe_load_balance_backward(A->dp, a->lbf, BT, E, &m->s, m->s.lb_coef / nm);
    router_backward(A->dp, a->p, a->lse, m->s.rz_coef / nm, BT, E);
    matmul_backward(A->d_ln, G + lp->router, A->dp, a->moe_in, W + lp->router, BT, D, E, E, 0);
    moe_dispatch_backward(A->d_ln, A->dxe, a->row_of, BT, K, D);
    rmsnorm_backward(A->d_res, G + lp->mlp_norm, A->d_ln, a->mid, W + lp->mlp_norm, a->rstd2, BT, D);
}

static void backward_layers(Model *m) {
    const Config *c = &m->c;
    Acts *A = &m->acts;
    int B = m->B, T = m->T, BT = B * T, D = c->D, H = c->H, Hd = c->Hd, HHd = H * Hd, V = c->V;
    const float *W = m->params;
    const floatX *WX = W;
    float *G = m->grads;
    const ParamTable *pt = &m->table;
    memset(G, 0, pt->n_params * sizeof(float));

    crossentropy_backward(A->dlogits, A->logits, A->lse, m->y, BT, V, (float)m->loss_targets, m->s.lz_coef);
    matmul_backward(A->d_ln, G + pt->lm_head, A->dlogits, A->lnf, WX + pt->lm_head, BT, D, V, V, 0);
    memset(A->d_res, 0, (size_t)BT * D * sizeof(float));
    rmsnorm_backward(A->d_res, G + pt->final_norm, A->d_ln, A->final_in, W + pt->final_norm, A->rstdf, BT, D);
    for (int l = c->L - 1; l >= 0; l--) {
        LayerActs *a = &A->layer[l];
        const LayerParams *lp = &pt->layer[l];
        if (!lp->moe) {
            ffn_backward(A->d_ln, G + lp->w_gate, G + lp->w_up, G + lp->w_down, A->d_res, a->ln2, a->gu, a->h,
                         WX + lp->w_gate, WX + lp->w_up, WX + lp->w_down, BT, D, c->F, A->dgu, A->dh);
            rmsnorm_backward(A->d_res, G + lp->mlp_norm, A->d_ln, a->mid, W + lp->mlp_norm, a->rstd2, BT, D);
        } else {
            if (c->extra_ffn) {
                ffn_backward(A->d_ln, G + lp->x_gate, G + lp->x_up, G + lp->x_down, A->d_res, a->ln3, a->gux, a->hx,
                             WX + lp->x_gate, WX + lp->x_up, WX + lp->x_down, BT, D, c->F, A->dgu, A->dh);
                rmsnorm_backward(A->d_res, G + lp->extra_norm, A->d_ln, a->moe_out, W + lp->extra_norm, a->rstd3, BT,
                                 D);
            }
            moe_backward(m, a, lp, BT);
        }
        // d_res now holds d mid; attention: mid = in + Wo attn(...)
        matmul_backward(A->datty, G + lp->wo, A->d_res, a->atty, WX + lp->wo, BT, HHd, D, D, 0);
        attention_backward(A->dqkv, A->dscore, A->datty, a->att, a->qkv, B, T, H, Hd, A->kt);
        rope_backward(A->dqkv, m->rope_cos, m->rope_sin, m->has_position ? m->position : NULL, BT, T, H, Hd);
        matmul_backward(A->d_ln, G + lp->wq, A->dqkv, a->ln1, WX + lp->wq, BT, D, 3 * HHd, 3 * HHd, 0);
        rmsnorm_backward(A->d_res, G + lp->attn_norm, A->d_ln, a->in, W + lp->attn_norm, a->rstd1, BT, D);
    }
    encoder_backward(G + pt->wte, A->d_res, m->x, BT, D);
}

void model_backward(Model *m) {
    if (!m->grads) die("model_backward: the model was created without an optimizer, so it has no gradients");
    if (!m->has_targets) die("model_backward: the last model_forward had no targets (y == NULL)");
    backward_layers(m);
}

// ----------------------------------------------------------------------------
// optimizers (formulas in openmoe.h, section 2)

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
static void adafactor_slice(float *w, const float *g, float *state, int rows, int cols, int factored,
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

// one tensor: S slices w, g (rows,cols), one after another, and their state
// (factored: r then c per slice, else v per slice)
static void adafactor_update(float *w, const float *g, float *state, int S, int rows, int cols, int factored,
                             const OptSettings *o, int t) {
    size_t n = (size_t)rows * cols, per_slice = factored ? (size_t)rows + cols : n;
    for (int sl = 0; sl < S; sl++)
        adafactor_slice(w + sl * n, g + sl * n, state + sl * per_slice, rows, cols, factored, o, t);
}

float model_update(Model *m, const OptSettings *o, int t) {
    update_args_check(m->grads != NULL, m->opt_kind, m->opt_min_dim, o, t);
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
        int factored = adafactor_factored(ti, o->min_dim);
        if (!(o->freeze_router && is_router_tensor(ti)))
            adafactor_update(m->params + ti->offset, m->grads + ti->offset, state, ti->slices, ti->rows, ti->cols,
                             factored, o, t);
        state += (size_t)ti->slices * (factored ? (size_t)ti->rows + ti->cols : (size_t)ti->rows * ti->cols);
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
// inference: one token at a time with a KV cache (model_prefill above fills
// it with a prompt's keys and values). Every step is the row version of the
// batched code above, with the same order of operations.

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

#define ATTENTION_DECODE_PARALLEL_MIN (1 << 18)  // multiply-adds of a token's attention above which heads go to threads

// one token's attention, the row pos of attention_forward's three steps: q
// of qkv (3HHd) against the cached kc, vc (pos+1 rows of HHd) -> out (HHd);
// att (H, Tmax) scratch
static void attention_decode(float *out, float *att, const float *qkv, const float *kc, const float *vc, int pos, int H,
                             int Hd, int Tmax) {
#pragma omp parallel for schedule(static) if ((size_t)H * (pos + 1) * Hd >= ATTENTION_DECODE_PARALLEL_MIN)
    for (int h = 0; h < H; h++) {
        float *a = att + (size_t)h * Tmax;
        attention_scores_row(a, qkv + h * Hd, kc + h * Hd, pos + 1, Hd, H * Hd);
        attention_softmax_row(a, pos, pos + 1, NULL);
        vecmat_forward(out + h * Hd, a, vc + h * Hd, pos + 1, Hd, 0, H * Hd);
    }
}

// acc (D) += p[e] * y (D) for the expert e = *top: one expert's share of a token's MoE output
static void moe_decode_accumulate(float *acc, const float *y, const float *p, const int *top, int D) {
    for (int i = 0; i < D; i++) acc[i] = acc[i] + p[*top] * y[i];
}

// one token's q | k | v (3HHd) = wq, wk, wv times x (D), as qkv_forward
static void qkv_token(float *qkv, const float *x, Weight wq, Weight wk, Weight wv, int D, int HHd) {
    size_t n = (size_t)HHd * D;
    if (weight_follows(wq, n, wk) && weight_follows(wk, n, wv)) {
        matvec_forward(qkv, x, wq, D, 3 * HHd, 0);
        return;
    }
    matvec_forward(qkv, x, wq, D, HHd, 0);
    matvec_forward(qkv + HHd, x, wk, D, HHd, 0);
    matvec_forward(qkv + 2 * HHd, x, wv, D, HHd, 0);
}

// one token's gated FFN: out (D) = (or += with accumulate) FFN(x), as ffn_forward
static void ffn_token(Model *m, float *out, const float *x, Weight wg, Weight wu, Weight wd, int F, int accumulate) {
    int D = m->c.D;
    if (weight_follows(wg, 2 * (size_t)F * D, wu)) {
        matvec_forward(m->t_gu, x, wg, D, 3 * F, 0);
    } else {
        matvec_forward(m->t_gu, x, wg, D, 2 * F, 0);
        matvec_forward(m->t_gu + 2 * F, x, wu, D, F, 0);
    }
    ffn_gate_row(m->t_h, m->t_gu, F);
    matvec_forward(out, m->t_h, wd, F, D, accumulate);
}

const int model_decode_bitwise = 1;  // matvec_forward sums as gemm does

// Every product reads the weights as stored (matvec_forward), so a token
// touches the weights of its K experts and of no other.
const float *model_decode(Model *m, int token, int pos) {
    const Config *c = &m->c;
    if (token < 0 || token >= c->V) die("model_decode: token %d out of range [0, %d)", token, c->V);
    if (pos < 0 || pos >= m->Tmax) die("model_decode: position %d outside the model's [0, %d)", pos, m->Tmax);
    int D = c->D, H = c->H, Hd = c->Hd, HHd = H * Hd, E = c->E, K = c->K, Fe = c->Fe, im = 0;
    const ParamTable *pt = &m->table;
    float *x = m->t_x, *xn = m->t_xn;
    encoder_forward(x, &token, param_weight(m, pt->wte), 1, D);
    for (int l = 0; l < c->L; l++) {
        const LayerParams *lp = &pt->layer[l];
        float *kc = m->kcache + (size_t)l * m->Tmax * HHd, *vc = m->vcache + (size_t)l * m->Tmax * HHd;
        rmsnorm_forward(xn, NULL, x, param_f32(m, lp->attn_norm), 1, D);
        qkv_token(m->t_qkv, xn, param_weight(m, lp->wq), param_weight(m, lp->wk), param_weight(m, lp->wv), D, HHd);
        rope_forward(m->t_qkv, m->rope_cos, m->rope_sin, NULL, 1, 1, H, Hd, pos, 1.0f);
        copy_floats(kc + (size_t)pos * HHd, m->t_qkv + HHd, HHd);
        copy_floats(vc + (size_t)pos * HHd, m->t_qkv + 2 * HHd, HHd);
        attention_decode(m->t_aty, m->t_att, m->t_qkv, kc, vc, pos, H, Hd, m->Tmax);
        matvec_forward(x, m->t_aty, param_weight(m, lp->wo), HHd, D, 1);  // x += Wo aty
        rmsnorm_forward(xn, NULL, x, param_f32(m, lp->mlp_norm), 1, D);
        if (!lp->moe) {
            ffn_token(m, x, xn, param_weight(m, lp->w_gate), param_weight(m, lp->w_up), param_weight(m, lp->w_down),
                      c->F, 1);
            continue;
        }
        // a group of one token: capacity never binds, every choice is kept
        matvec_forward(m->t_z, xn, weight_fp32(param_f32(m, lp->router)), D, E, 0);
        router_row(m->t_p, m->t_top, m->t_z, m->router_bias + (size_t)im++ * E, E, K);
        memset(m->t_acc, 0, D * sizeof(float));
        for (int r = 0; r < K; r++) {
            size_t e = m->t_top[r];
            ffn_token(m, m->t_out, xn, param_weight(m, lp->w_gate + e * 2 * Fe * D),
                      param_weight(m, lp->w_up + e * Fe * D), param_weight(m, lp->w_down + e * D * Fe), Fe, 0);
            moe_decode_accumulate(m->t_acc, m->t_out, m->t_p, m->t_top + r, D);
        }
        residual_forward(x, m->t_acc, x, D);
        if (c->extra_ffn) {
            rmsnorm_forward(xn, NULL, x, param_f32(m, lp->extra_norm), 1, D);
            ffn_token(m, x, xn, param_weight(m, lp->x_gate), param_weight(m, lp->x_up), param_weight(m, lp->x_down),
                      c->F, 1);
        }
    }
    rmsnorm_forward(xn, NULL, x, param_f32(m, pt->final_norm), 1, D);
    matvec_forward(m->t_logits, xn, param_weight(m, pt->lm_head), D, c->V, 0);
    return m->t_logits;
}

// ----------------------------------------------------------------------------
// data parallelism over MPI (openmoe.h section 2; compiled with -DUSE_MPI)

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
    int n_ranks;
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &n_ranks), "MPI_Comm_size");
    for (int r = 0; r < n_ranks; r++) {
        if (shard[r + 1] - shard[r] > INT_MAX) die("model_params_allgather: a shard beyond one MPI call");
        mpiCheck(MPI_Bcast(m->params + shard[r], (int)(shard[r + 1] - shard[r]), MPI_FLOAT, r, MPI_COMM_WORLD),
                 "MPI_Bcast");
    }
}
#endif
