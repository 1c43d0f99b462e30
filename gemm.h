// gemm.h: the CPU's matrix products, what openmoe.c calls. gemm.c computes
// them fast; openmoe.c's plain loops (make PLAIN=1) compute them as the
// definition below says, and both builds give the same bits.
//
// The contract: every output element is one chain of multiply-adds in k
// order, c = MADD(a_k, b_k, c), from c = 0, or from the output's own value
// with accumulate. So the result depends neither on how the work is cut into
// tiles nor on the thread count, and a row's result not on the rows it was
// batched with: model_decode's one-token products give model_forward's bits.
#ifndef GEMM_H
#define GEMM_H

#include <math.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// one step of a chain: fused where the target fuses (as gemm.c's vector
// code then is, under -ffp-contract=fast), else a rounded product then a sum
#ifdef __FP_FAST_FMAF
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((c) + (a) * (b))
#endif

// floats per cache line: buffers the products write start on one
#define LINE_FLOATS (64 / (int)sizeof(float))

// out (N,OUT; rows ldo apart) = (or += with accumulate) inp (N,IN) @ w (OUT,IN)^T
void matmul_forward(float *out, const float *inp, const float *w, int N, int IN, int OUT, int ldo, int accumulate);

// dinp (N,IN) = (or += with accumulate) dout (N,OUT; rows ldo apart) @ w
// (OUT,IN), unless dinp is NULL; dw (OUT,IN) += dout^T @ inp
void matmul_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w, int N, int IN,
                     int OUT, int ldo, int accumulate);

// C (M,N; rows ldc apart) = (or += with accumulate) A (M,K) @ B (K,N), on
// the calling thread (attention runs one per thread). A(i,k) = A[i*ars +
// k*aks]: a row-major matrix (aks 1) or a transposed view (ars 1);
// B(k,n) = B[k*ldb + n].
void gemm(float *C, int ldc, const float *A, int ars, int aks, const float *B, int ldb, int M, int N, int K,
          int accumulate);

// out (OUT) = (or += with accumulate) inp (IN) @ w (IN,OUT), w's rows ldw
// apart: one token's product. model_decode keeps each weight matrix
// (OUT,IN) transposed to (IN,OUT) for it, and its attention reads the
// cached values (pos+1, Hd) so.
void matvec_forward(float *out, const float *inp, const float *w, int IN, int OUT, int accumulate, int ldw);

// wt (IN,OUT) = w (OUT,IN)^T, w's rows ldw apart; a copy
void transpose(float *wt, const float *w, int OUT, int IN, int ldw);

#ifdef __cplusplus
}
#endif
#endif  // GEMM_H
