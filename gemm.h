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
#include <stdint.h>
#include <string.h>

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

// ----------------------------------------------------------------------------
// weights as the model files store them (../shared/SPEC.md §11): a matrix
// (OUT,IN) row-major in fp32, in bf16, or as int8 values with one fp32 scale
// per `group` consecutive elements of a row (the group divides IN). Element
// i stands for weight_value(w, i): the bf16 bits widened, or s * (float)q, one
// float product rounded on its own. The products below compute with exactly
// that value, so that a bf16 or int8 file gives the bits of the version-1
// file that holds its decoded weights.
typedef enum { WEIGHT_FP32, WEIGHT_BF16, WEIGHT_INT8 } WeightType;
typedef struct {
    WeightType type;
    const void *values;   // float, uint16_t (bf16 bits) or int8_t
    const float *scales;  // WEIGHT_INT8: one per group of `group` values
    int group;
} Weight;

static inline Weight weight_fp32(const float *w) {
    Weight v = {WEIGHT_FP32, w, NULL, 0};
    return v;
}

// a bf16 value (its 16 bits) as the float whose upper half it is
static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline float weight_value(Weight w, size_t i) {
    if (w.type == WEIGHT_BF16) return bf16_to_float(((const uint16_t *)w.values)[i]);
    if (w.type == WEIGHT_INT8) return w.scales[i / w.group] * (float)((const int8_t *)w.values)[i];
    return ((const float *)w.values)[i];
}

// the weights from element i on (i a multiple of the group): a block of rows
static inline Weight weight_at(Weight w, size_t i) {
    if (w.type == WEIGHT_BF16) w.values = (const uint16_t *)w.values + i;
    else if (w.type == WEIGHT_INT8) w.values = (const int8_t *)w.values + i, w.scales += i / w.group;
    else w.values = (const float *)w.values + i;
    return w;
}

// dst (n) = the values of elements i0 .. i0+n-1 (a run within one row)
static inline void weight_decode(float *dst, Weight w, size_t i0, int n) {
    if (w.type == WEIGHT_FP32) {
        memcpy(dst, (const float *)w.values + i0, n * sizeof(float));
    } else if (w.type == WEIGHT_BF16) {
        const uint16_t *b = (const uint16_t *)w.values + i0;
        for (int k = 0; k < n; k++) dst[k] = bf16_to_float(b[k]);
    } else {  // group by group: one scale each
        const int8_t *q = (const int8_t *)w.values;
        for (size_t i = i0, end = i0 + n; i < end;) {
            size_t next = (i / w.group + 1) * w.group;
            next = next < end ? next : end;
            float s = w.scales[i / w.group];
            for (; i < next; i++) dst[i - i0] = s * (float)q[i];
        }
    }
}

// ----------------------------------------------------------------------------
// the products

// out (N,OUT; rows ldo apart) = (or += with accumulate) inp (N,IN) @ w (OUT,IN)^T
void matmul_forward(float *out, const float *inp, Weight w, int N, int IN, int OUT, int ldo, int accumulate);

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

// out (OUT) = (or += with accumulate) w (OUT,IN) @ inp (IN): one token's
// product over a weight matrix as stored (decode), each output the chain of
// matmul_forward's row
void matvec_forward(float *out, const float *inp, Weight w, int IN, int OUT, int accumulate);

// out (OUT) = (or += with accumulate) inp (IN) @ w (IN,OUT), w's rows ldw
// apart: decode's attention over the cached values (pos+1, Hd), each output
// the chain of gemm's
void vecmat_forward(float *out, const float *inp, const float *w, int IN, int OUT, int accumulate, int ldw);

// wt (IN,OUT) = w (OUT,IN)^T, w's rows ldw apart; a copy
void transpose(float *wt, const float *w, int OUT, int IN, int ldw);

#ifdef __cplusplus
}
#endif
#endif  // GEMM_H
