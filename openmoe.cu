// openmoe.cu: OpenMoE on one NVIDIA GPU, CUDA kernels and cuBLAS. The same
// API (openmoe.h section 2) and the same math (../shared/SPEC.md) as the CPU
// backend openmoe.c. Every kernel is launched by a host function named after
// the CPU function doing the same job, with the CPU's arguments in the CPU's
// order (GPU-only arguments after them): rmsnorm_forward launches
// rmsnorm_forward_kernel, moe_rows launches moe_offsets_kernel and
// moe_rows_kernel, gemm is gemm.h's row-major gemm mapped onto cuBLAS.
// The functions sit in the same order, so that the two files can be read side
// by side.
//
// Reading order: checked calls, small device helpers and fixed-order
// reductions; the matmul (gemm on cuBLAS, one handle for the process); the
// layers, each _forward beside its _backward; the router and the MoE
// plumbing; the losses; the model (buffers, forward, backward); the
// optimizers; inference with a KV cache; data parallelism; last, the flash
// attention kernels of bf16 mode. Shapes as in openmoe.c: B batch, T time, D
// width, HHd = H*Hd, BT = B*T tokens, E experts, K experts per token, V
// vocabulary.
//
// Precision. PRECISION_FP32: every tensor fp32, cuBLAS in CUBLAS_COMPUTE_32F
// with the default math mode, so no TF32 (parity with the CPU at SPEC §7's
// tolerances). PRECISION_BF16: mixed precision. Master weights, gradients and
// optimizer state are fp32; the matmul operands (weights, and the activations
// a matmul reads) are bf16 with fp32 accumulation, and so are the logits;
// the residual stream, the norms' statistics, the router (its input, weights,
// logits, softmax), the attention scores and softmax, and all loss math are
// fp32. The code is one set of templates over X, the storage type of the
// matmul operands (float or __nv_bfloat16): the activation structs
// LayerActs<X> and Acts<X> hold openmoe.h's floatX rows as X. A bf16 copy
// of the weights (params_x) is refreshed after every change of the master
// weights (by the AdamW kernel itself). test/g_gpu.sh documents the bf16
// tolerances.
//
// Attention: in fp32 mode, cuBLAS products with the (T,T) scores in memory;
// in bf16 mode, flash-attention kernels (WMMA tensor cores, online softmax,
// no (T,T) matrices) for head widths 16/32/64/128. OPENMOE_ATTENTION=cublas
// selects the cuBLAS path in bf16 mode too.
//
// Routing on the GPU (SPEC §3), in the CPU's three steps moe_capacity,
// moe_rows, moe_dispatch. router_forward_kernel: softmax and top-K per
// token (one thread each). moe_capacity_kernel: one block per routing group,
// one thread per expert scans the group's assignments in priority order
// (rank 0 of every token in token order, then rank 1, ...) and numbers the
// assignments to its expert: pos = how many earlier ones chose the same
// expert. An assignment is kept iff pos < C, which is exactly "an expert
// holds at most C": the first C are kept, the rest dropped. With the drop
// policy probs (SPEC §8), moe_probs_rank_kernel renumbers pos by probability
// instead. The capacity rules colossalai and none (dropless) give more slots
// than the padded layout below fits, so they take the exact layout. The kept
// assignments become rows of the expert buffers (moe_offsets_kernel,
// moe_rows_kernel): by default the padded layout, expert e owning rows
// e*R .. e*R+R-1 with R = sum over groups of min(C, group size), its kept
// rows first (groups in order, each in priority order) and zero rows after,
// so that the experts' FFNs are strided-batched cuBLAS matmuls over E and the
// host needs no sync. Where E*R rows would not fit (routing groups smaller
// than the capacity) or with OPENMOE_MOE_LAYOUT=exact, the exact layout:
// expert e owns only its kept rows, the host reads the E+1 row offsets (one
// small copy per MoE layer) and runs one set of matmuls per expert.
//
// Determinism: one stream, cuBLAS with a fixed workspace, and no float
// atomics: every sum is done by one thread or one block in a fixed order, so
// the same build on the same GPU gives the same bits.
#include "openmoe.h"
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <mma.h>
#include <float.h>
#include <type_traits>

typedef __nv_bfloat16 bf16;
#ifndef DYNAMIC_SMEM  // (dev/cuda_emu defines its own)
#define DYNAMIC_SMEM(name) extern __shared__ __align__(128) char name[]
#endif

// ----------------------------------------------------------------------------
// checked CUDA and cuBLAS calls: print what failed, file:line, then exit 1

static void cuda_check(cudaError_t err, const char *what, const char *file, int line) {
    if (err != cudaSuccess) die("CUDA error: %s (%s)  [%s:%d]", cudaGetErrorString(err), what, file, line);
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)
// after a kernel launch: a bad configuration shows here, a fault at the next sync
#define launchCheck() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

static void cublas_check(cublasStatus_t st, const char *what, const char *file, int line) {
    if (st != CUBLAS_STATUS_SUCCESS) die("cuBLAS error: %s (%s)  [%s:%d]", cublasGetStatusString(st), what, file, line);
}
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }
#define MAX_GRID_Y 65535  // CUDA's limit on a grid's y (and z) dimension

// ----------------------------------------------------------------------------
// device helpers

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
template <typename X> __device__ __forceinline__ X from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16(x); }  // nearest even

// Sums over a warp or a block, returned to every thread. The order is fixed
// (butterfly shuffles, then the warps' sums in warp order), and every thread
// gets the same bits: a butterfly adds the same pairs in every lane, only
// swapped, and float addition is commutative. blockDim must be a multiple of 32.
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <typename T> __device__ T block_sum(T v) {
    __shared__ T s[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // s may still be read by the previous call
    if (lane == 0) s[warp] = v;
    __syncthreads();
    T t = 0;
    for (int w = 0; w < nw; w++) t += s[w];
    return t;
}
__device__ float block_max(float v) {
    __shared__ float s[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    float t = -FLT_MAX;
    for (int w = 0; w < nw; w++) t = fmaxf(t, s[w]);
    return t;
}

// ----------------------------------------------------------------------------
// reductions in a fixed order: one block of 1024 threads

#define RED_THREADS 1024

// out[0] = sum of x (n doubles)
__global__ void sum_kernel(double *out, const double *x, int n) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}
// out[0] = sum of x^2 (n floats, squared in double)
__global__ void sumsq_kernel(double *out, const float *x, int n) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += (double)x[i] * x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

// ----------------------------------------------------------------------------
// the model's buffers (all allocated in model_create). The activations are
// openmoe.h's tables, floatX the storage type X of the matmul operands
// (struct templates over X: fp32 mode carves Acts<float>, bf16 mode
// Acts<bf16>), and these of the GPU's own:
//  name         type    elements              when
#define GPU_LAYER_ACTS(_)                                                                                        \
    _(pos,         int,    BT * K,               moe)      /* (BT,K) place in the (group, expert) queue */       \
    _(count,       int,    BT * E,               moe)      /* (groups,E) assignments before dropping */          \
    _(goff,        int,    BT * E,               moe)      /* (groups,E) first row of (group, expert) */          \
    _(lb_group,    double, BT,                   moe)      /* (groups) E sum_e f_e P_e per group */               \
    _(att_lse,     float,  BT * H,               flash)    /* (B,H,T) logsumexp of each attention row */
#define GPU_ACTS(_)                                                                                              \
    _(scores,      float,  B * H * T * T,        !flash)   /* (B,H,T,T) scores (forward), dP (backward) */        \
    _(params_x,    floatX, n_params,             bf16_mode) /* the weights in bf16 (fp32 mode: params) */         \
    _(dres_x,      floatX, BT * D,               grads && bf16_mode) /* d_res in bf16 (fp32 mode: d_res) */       \
    _(dvec,        float,  BT * H,               grads && flash) /* (B,H,T) rowsum(dout * out) */                 \
    _(dw_partial,  float,  ceil_div(BT, DW_ROWS) * D, grads) /* RMSNorm weight-gradient partial sums */           \
    _(order,       int,    BT,                   grads)    /* (BT) the tokens grouped by id (encoder_backward) */ \
    _(ustart,      int,    BT + 1,               grads)    /* (BT+1) where each distinct token's positions begin */
#define GPU_MODEL_BUFFERS(_)                                                                                     \
    _(stat_counts, int,    n_moe * 2 * E,        any_moe)  /* (n_moe,2,E) routed and kept per expert */           \
    _(t_lse,       float,  1,                    any_moe)  /* decode's router logsumexp */                        \
    _(opt_partial, double, n_opt_partial + 1,    grads)    /* the optimizer's partial sums */                     \
    _(opt_scale,   float,  max_slices,           grads)    /* Adafactor per slice */                              \
    _(opt_clip,    float,  max_slices,           grads)                                                           \
    _(opt_rmean,   double, max_slices,           grads)

template <typename X> struct LayerActs {  // one layer's: LAYER_ACTS, GPU_LAYER_ACTS; NULL where unused
    typedef X floatX;
    float *in;                // (BT,D) the residual stream entering the layer: resid[l]
    LAYER_ACTS(ACT_POINTER)
    GPU_LAYER_ACTS(ACT_POINTER)
    int *start_host;          // host copy of start: the rows of each expert
    int R_pad;                // rows per expert in the padded layout, 0: the exact layout
};

template <typename X> struct Acts {  // FORWARD_ACTS, BACKWARD_ACTS (with an optimizer), GPU_ACTS
    typedef X floatX;
    LayerActs<X> *layer;      // [L]
    float *final_in;          // (BT,D) resid[L], the final norm's input
    FORWARD_ACTS(ACT_POINTER)
    BACKWARD_ACTS(ACT_POINTER)
    GPU_ACTS(ACT_POINTER)
};

#define STAGE_ELEMS (4u << 20)  // bf16 values per chunk of model_get_logits

struct Model {
    Config c;
    ParamTable table;
    int Bmax, Tmax;
    Precision precision;
    int flash;                // attention by the flash kernels (bf16 mode), else by cuBLAS with (T,T) matrices
    int moe_exact;            // always the exact expert-row layout (OPENMOE_MOE_LAYOUT=exact), see moe_rows_padded
    float *params;            // (n_params) fp32 master weights, NULL until set: never for a bf16 or int8 file's
    float *small;             // a model on a model file's weights: its norms and routers in fp32 (the forward
    size_t *small_at;         // reads them so); small_at [n_tensors] (host): where each is in small
    float *grads;             // (n_params), NULL without an optimizer
    float *opt_state;         // (n_opt_state), layout of opt_state_floats() for the tensors of the shard
    size_t n_opt_state;
    size_t shard_lo, shard_hi;  // ZeRO-1: model_update steps the tensors that start in [lo, hi)
    OptKind opt_kind;
    int opt_min_dim;
    char *buffer;             // every activation and buffer: one device allocation carved by acts_carve
    size_t buffer_bytes;
    Acts<float> a32;          // the activations in fp32 mode
    Acts<bf16> a16;           // in bf16 mode
    MODEL_BUFFERS(ACT_POINTER)
    GPU_MODEL_BUFFERS(ACT_POINTER)
    size_t n_opt_partial;
    float *router_bias;       // (n_moe, E) loss-free balancing bias, 0 unless set
    // host side
    int *h_x, *h_y;           // (BT) pinned staging of the batch
    int *h_segment, *h_position;  // (BT) pinned: its segments and positions
    int *h_order, *h_ustart;  // pinned: the encoder_backward buckets
    int *h_start;             // (L,E+1) each layer's start, copied to the host (LayerActs.start_host)
    int *h_bucket;            // (V) counting sort scratch
    int *h_ints;              // (BT*K) model_get_routing scratch
    float *h_p;               // (BT*E)
    float *h_logits;          // (V) pinned, model_decode's result
    bf16 *h_stage;            // pinned, bf16 mode: model_get_logits converts through it
    double *h_sums;           // host copy of sums
    cudaEvent_t buckets_copied;  // the last copy out of h_order etc. is done: they may be rewritten
    // the last forward
    int B, T, has_targets, n_targets;
    int has_logits;           // it was a model_forward (a prefill keeps only its last position's)
    int has_segment, has_position;  // the batch gave segments, positions (in segment, position)
    double loss_targets;            // what its CE and z-loss are means over
    MoeSettings s;
    RouterStats *stats;       // [n_moe]
    int *stat_ints;           // host: the routed and kept counts behind stats
};

// the activations in the matmul type X
template <typename X> static Acts<X> *acts(Model *m);
template <> Acts<float> *acts<float>(Model *m) { return &m->a32; }
template <> Acts<bf16> *acts<bf16>(Model *m) { return &m->a16; }

// ----------------------------------------------------------------------------
// matmul: one row-major gemm with gemm.h's arguments, mapped onto cuBLAS.
// cuBLAS is column-major, and a row-major (R,C) matrix with row stride ld is a
// column-major (C,R) matrix with leading dimension ld, so the row-major C = A B
// is the column-major C^T = B^T A^T, with no data moved. Operands of type TI
// (float or bf16), output TO, always fp32 accumulation (CUBLAS_COMPUTE_32F:
// no TF32 in fp32 mode).

// One cuBLAS handle for the process, as llm.c: created by the first
// model_create, destroyed by the last model_free. A fixed workspace, so that
// cuBLAS picks the same algorithms every run.
#define CUBLAS_WORKSPACE_BYTES (32u << 20)
static cublasHandle_t cublas_handle;
static void *cublas_workspace;
static int cublas_users;  // models alive

static void cublas_acquire(void) {
    if (cublas_users++ > 0) return;
    cublasCheck(cublasCreate(&cublas_handle));
    cublasCheck(cublasSetMathMode(cublas_handle, CUBLAS_DEFAULT_MATH));  // no TF32 for fp32 matmuls
    cudaCheck(cudaMalloc(&cublas_workspace, CUBLAS_WORKSPACE_BYTES));
    // the stream first: cublasSetStream puts the handle back on cuBLAS's own workspace pool
    cublasCheck(cublasSetStream(cublas_handle, 0));
    cublasCheck(cublasSetWorkspace(cublas_handle, cublas_workspace, CUBLAS_WORKSPACE_BYTES));
}
static void cublas_release(void) {
    if (--cublas_users > 0) return;
    cublasCheck(cublasDestroy(cublas_handle));
    cudaCheck(cudaFree(cublas_workspace));
}

template <typename T> struct CudaType;
template <> struct CudaType<float> { static const cudaDataType_t value = CUDA_R_32F; };
template <> struct CudaType<bf16> { static const cudaDataType_t value = CUDA_R_16BF; };

// C (M,N; row stride ldc) = (or += with accumulate) A (M,K) @ B (K,N), as
// gemm.h's gemm: A(i,k) = A[i*ars + k*aks], a row-major matrix (aks 1) or
// a transposed view (ars 1); B(k,n) = B[k*ldb + n], or with b_trans the
// transposed view B[n*ldb + k] (which the CPU materialises instead). With
// batch > 1, `batch` products, operand i at C + i*sC, A + i*sA, B + i*sB.
template <typename TI, typename TO>
static void gemm(TO *C, int ldc, const TI *A, int ars, int aks, const TI *B, int ldb, int M, int N, int K,
                 int accumulate, int b_trans = 0, int batch = 1, long long sC = 0, long long sA = 0, long long sB = 0) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    int a_trans = ars == 1 && (aks != 1 || M == 1);  // a vector A (ars = aks = 1) by its shape
    if (!a_trans && aks != 1) die("gemm: A needs unit stride along its rows or its columns (ars %d, aks %d)", ars, aks);
    // column-major C^T (N,M) = op(B) (N,K) op(A) (K,M), op = transposed where the view is
    cublasOperation_t opb = b_trans ? CUBLAS_OP_T : CUBLAS_OP_N, opa = a_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
    int lda = a_trans ? aks : ars;
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    cudaDataType_t ti = CudaType<TI>::value, to = CudaType<TO>::value;
    if (batch == 1)
        cublasCheck(cublasGemmEx(cublas_handle, opb, opa, N, M, K, &alpha, B, ti, ldb, A, ti, lda, &beta, C, to, ldc,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    else
        cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, opb, opa, N, M, K, &alpha, B, ti, ldb, sB, A, ti, lda, sA,
                                               &beta, C, to, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// out (N,OUT; rows ldo apart) = (or += with accumulate) inp (N,IN) @ w (OUT,IN)^T.
// With batch > 1, `batch` such products (the experts): operand i at i*s_out, i*s_inp, i*s_w.
template <typename TI, typename TO>
static void matmul_forward(TO *out, const TI *inp, const TI *w, int N, int IN, int OUT, int ldo, int accumulate,
                           int batch = 1, long long s_out = 0, long long s_inp = 0, long long s_w = 0) {
    gemm(out, ldo, inp, IN, 1, w, IN, N, OUT, IN, accumulate, 1, batch, s_out, s_inp, s_w);
}

// dinp (N,IN) = (or += with accumulate) dout (N,OUT; rows ldo apart) @ w (OUT,IN), when dinp is
// not NULL; dw (OUT,IN) += dout^T @ inp (N,IN). Batched as matmul_forward (dw at the weights' stride s_w).
template <typename TI, typename TD>
static void matmul_backward(TD *dinp, float *dw, const TI *dout, const TI *inp, const TI *w, int N, int IN, int OUT,
                            int ldo, int accumulate, int batch = 1, long long s_dinp = 0, long long s_dout = 0,
                            long long s_inp = 0, long long s_w = 0) {
    if (dinp) gemm(dinp, IN, dout, ldo, 1, w, IN, N, IN, OUT, accumulate, 0, batch, s_dinp, s_dout, s_w);
    gemm(dw, IN, dout, 1, ldo, inp, IN, OUT, IN, N, 1, 0, batch, s_w, s_dout, s_inp);
}

// ----------------------------------------------------------------------------
// elementwise helpers

template <typename X> __global__ void cast_kernel(X *out, const float *inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<X>(inp[i]);
}
// out (n) = X(inp); nothing when X is float and out is inp
template <typename X> static void cast_to_x(X *out, const float *inp, size_t n) {
    if ((const void *)out == (const void *)inp || n == 0) return;
    cast_kernel<X><<<ceil_div(n, 256), 256>>>(out, inp, n);
    launchCheck();
}

static void copy_floats(float *dst, const float *src, size_t n) {
    cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice));
}

// ----------------------------------------------------------------------------
// embedding

// out (BT,D) = wte[x], wte fp32 or the bf16 copy (a model on a bf16 file's weights): one block per token
template <typename W> __global__ void encoder_forward_kernel(float *out, const int *x, const W *wte, int D) {
    int n = blockIdx.x;
    const W *w = wte + (size_t)x[n] * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) out[(size_t)n * D + i] = to_float(w[i]);
}
template <typename W> static void encoder_forward(float *out, const int *x, const W *wte, int BT, int D) {
    encoder_forward_kernel<W><<<BT, 128>>>(out, x, wte, D);
    launchCheck();
}

// dwte[x[n]] += dout[n] over the positions n of each distinct token, in token
// order: one block per distinct token, its positions order[ustart[u] ..
// ustart[u+1]-1] ascending (sorted on the host), so no two blocks share a row
__global__ void encoder_backward_kernel(float *dwte, const float *dout, const int *x, const int *order,
                                        const int *ustart, int D) {
    int u = blockIdx.x;
    float *dw = dwte + (size_t)x[order[ustart[u]]] * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = dw[i];
        for (int j = ustart[u]; j < ustart[u + 1]; j++) acc += dout[(size_t)order[j] * D + i];
        dw[i] = acc;
    }
}
// x (BT) grouped by token id: order (BT) the positions of each of the
// n_unique distinct tokens, those of the u-th at ustart[u] .. ustart[u+1]-1
static void encoder_backward(float *dwte, const float *dout, const int *x, int BT, int D, const int *order,
                             const int *ustart, int n_unique) {
    encoder_backward_kernel<<<n_unique, 128>>>(dwte, dout, x, order, ustart, D);
    launchCheck();
}

// ----------------------------------------------------------------------------
// RMSNorm: y = x * rsqrt(mean(x^2) + 1e-6) * w; one warp per row

template <typename X>
__global__ void rmsnorm_forward_kernel(X *out, float *rstd, const float *inp, const float *w, int N, int D) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;  // the whole warp
    const float *x = inp + (size_t)n * D;
    float ss = 0.0f;
    for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
    ss = warp_sum(ss);
    float r = 1.0f / sqrtf(ss / D + 1e-6f);
    for (int i = lane; i < D; i += 32) out[(size_t)n * D + i] = from_float<X>(x[i] * r * w[i]);
    if (lane == 0 && rstd) rstd[n] = r;
}
// inp (N,D) -> out (N,D), rstd (N) (rstd may be NULL)
template <typename X> static void rmsnorm_forward(X *out, float *rstd, const float *inp, const float *w, int N, int D) {
    rmsnorm_forward_kernel<X><<<ceil_div(N, 4), 128>>>(out, rstd, inp, w, N, D);
    launchCheck();
}

// dinp += d/dx (and dinp_x = X(dinp) unless it is dinp itself): one warp per row
template <typename X>
__global__ void rmsnorm_backward_kernel(float *dinp, X *dinp_x, const float *dout, const float *inp, const float *w,
                                        const float *rstd, int N, int D) {
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float *x = inp + (size_t)n * D, *dy = dout + (size_t)n * D;
    float r = rstd[n], dot = 0.0f;  // sum_i dy_i w_i x_i
    for (int i = lane; i < D; i += 32) dot += dy[i] * w[i] * x[i];
    dot = warp_sum(dot);
    float c = dot * r * r * r / D;
    float *dx = dinp + (size_t)n * D;
    int write_x = (void *)dinp_x != (void *)dinp;
    for (int i = lane; i < D; i += 32) {
        float v = dx[i] + (dy[i] * w[i] * r - x[i] * c);
        dx[i] = v;
        if (write_x) dinp_x[(size_t)n * D + i] = from_float<X>(v);
    }
}

#define DW_ROWS 64  // rows per partial sum of the weight gradient

// dw[i] = sum_n dy[n,i] x[n,i] rstd[n] in two fixed-order steps: partial sums
// over chunks of DW_ROWS rows (grid.y), then the chunks in order
__global__ void rmsnorm_dw_partial_kernel(float *partial, const float *dout, const float *inp, const float *rstd,
                                          int N, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    if (i >= D) return;
    int n0 = chunk * DW_ROWS, n1 = n0 + DW_ROWS < N ? n0 + DW_ROWS : N;
    float s = 0.0f;
    for (int n = n0; n < n1; n++) s += dout[(size_t)n * D + i] * inp[(size_t)n * D + i] * rstd[n];
    partial[(size_t)chunk * D + i] = s;
}
__global__ void rmsnorm_dw_sum_kernel(float *dw, const float *partial, int n_chunks, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D) return;
    float s = 0.0f;
    for (int ch = 0; ch < n_chunks; ch++) s += partial[(size_t)ch * D + i];
    dw[i] += s;
}

// dinp += d/dx (dinp_x its copy in X), dw += d/dw, from dout (N,D); dw_partial (ceil(N/DW_ROWS), D) scratch
template <typename X>
static void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                             const float *rstd, int N, int D, X *dinp_x, float *dw_partial) {
    rmsnorm_backward_kernel<X><<<ceil_div(N, 4), 128>>>(dinp, dinp_x, dout, inp, w, rstd, N, D);
    launchCheck();
    int n_chunks = ceil_div(N, DW_ROWS);
    rmsnorm_dw_partial_kernel<<<dim3(ceil_div(D, 128), n_chunks), 128>>>(dw_partial, dout, inp, rstd, N, D);
    launchCheck();
    rmsnorm_dw_sum_kernel<<<ceil_div(D, 128), 128>>>(dw, dw_partial, n_chunks, D);
    launchCheck();
}

// ----------------------------------------------------------------------------
// RoPE, rotate-half: element i pairs with i + Hd/2, angle pos * 10000^(-2i/Hd),
// from tables (T, Hd/2) made once on the host, as openmoe.c does.
// Applied in place to the q and k parts of qkv rows (row stride ld); token n
// is at position pos[n] (pos NULL: pos0 + n % T). sign -1 rotates back (the backward).

template <typename X>
__global__ void rope_forward_kernel(X *qkv, const float *cosv, const float *sinv, const int *pos, int N, int T, int H,
                                    int Hd, int pos0, float sign) {
    int half = Hd / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)N * 2 * H * half;
    if (idx >= total) return;
    int i = idx % half;
    size_t rest = idx / half;
    int h = rest % H;
    rest /= H;
    int part = rest % 2;  // 0: q, 1: k
    int n = (int)(rest / 2), p = pos ? pos[n] : pos0 + n % T;
    X *x = qkv + (size_t)n * 3 * H * Hd + (size_t)part * H * Hd + (size_t)h * Hd;
    float c = cosv[(size_t)p * half + i], s = sign * sinv[(size_t)p * half + i];
    float a = to_float(x[i]), b = to_float(x[i + half]);
    x[i] = from_float<X>(a * c - b * s);
    x[i + half] = from_float<X>(b * c + a * s);
}
template <typename X>
static void rope_forward(X *qkv, const float *cosv, const float *sinv, const int *pos, int N, int T, int H, int Hd,
                         int pos0, float sign) {
    size_t total = (size_t)N * 2 * H * (Hd / 2);
    rope_forward_kernel<X><<<ceil_div(total, 256), 256>>>(qkv, cosv, sinv, pos, N, T, H, Hd, pos0, sign);
    launchCheck();
}
template <typename X>
static void rope_backward(X *dqkv, const float *cosv, const float *sinv, const int *pos, int N, int T, int H, int Hd) {
    rope_forward(dqkv, cosv, sinv, pos, N, T, H, Hd, 0, -1.0f);
}

// ----------------------------------------------------------------------------
// causal attention, no 1/sqrt(Hd) (folded into Wq's init). Per batch b one
// strided-batched cuBLAS call over the H heads for each product: scores =
// q k^T (fp32), the softmax over the keys s <= t of t's segment (fp32,
// probabilities stored in X, 0 elsewhere), out = P v. Head h of token n is at
// qkv[n*3HHd + h*Hd] (q), + HHd (k), + 2HHd (v). The backward needs no mask:
// P is 0 where it would apply.

// whether query t sees key s of its row: s <= t, in t's segment (seg: the row's; NULL: one segment)
__device__ __forceinline__ bool attention_visible(const int *seg, int s, int t) {
    return s <= t && (!seg || seg[s] == seg[t]);
}

// one warp per row (b, h, t) of scores (B*H*T rows of T); seg (B,T) or NULL
template <typename X>
__global__ void attention_softmax_kernel(X *att, const float *scores, const int *seg, int T, int H, int rows) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % T;
    const int *sg = seg ? seg + (size_t)(row / T / H) * T : NULL;
    const float *sc = scores + (size_t)row * T;
    X *p = att + (size_t)row * T;
    float maxs = -FLT_MAX;
    for (int s = lane; s <= t; s += 32)
        if (attention_visible(sg, s, t)) maxs = fmaxf(maxs, sc[s]);
    maxs = warp_max(maxs);
    float sum = 0.0f;
    for (int s = lane; s <= t; s += 32)
        if (attention_visible(sg, s, t)) sum += expf(sc[s] - maxs);
    sum = warp_sum(sum);
    float inv = 1.0f / sum;
    for (int s = lane; s < T; s += 32)
        p[s] = from_float<X>(attention_visible(sg, s, t) ? expf(sc[s] - maxs) * inv : 0.0f);
}

// through the softmax: dS = P (dP - rowsum(P dP)) for s <= t, 0 above; one warp per row
template <typename X>
__global__ void attention_softmax_backward_kernel(X *dscore, const float *dP, const X *att, int T, int rows) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % T;
    const float *dp = dP + (size_t)row * T;
    const X *p = att + (size_t)row * T;
    X *ds = dscore + (size_t)row * T;
    float pdp = 0.0f;
    for (int s = lane; s <= t; s += 32) pdp += to_float(p[s]) * dp[s];
    pdp = warp_sum(pdp);
    for (int s = lane; s < T; s += 32) ds[s] = from_float<X>(s <= t ? to_float(p[s]) * (dp[s] - pdp) : 0.0f);
}

// qkv (BT,3HHd), seg (BT) or NULL -> out (BT,HHd), att (B,H,T,T); scores (B,H,T,T) fp32 scratch
template <typename X>
static void attention_forward(X *out, X *att, const X *qkv, const int *seg, int B, int T, int H, int Hd, float *scores) {
    int HHd = H * Hd, ld = 3 * HHd;
    long long TT = (long long)T * T;
    for (int b = 0; b < B; b++) {
        const X *q = qkv + (size_t)b * T * ld, *k = q + HHd, *v = q + 2 * HHd;
        float *S = scores + (size_t)b * H * TT;
        // S (T,T) = q (T,Hd) @ k (T,Hd)^T per head
        gemm(S, T, q, ld, 1, k, ld, T, T, Hd, 0, 1, H, TT, Hd, Hd);
    }
    int rows = B * H * T;
    attention_softmax_kernel<X><<<ceil_div(rows, 4), 128>>>(att, scores, seg, T, H, rows);
    launchCheck();
    for (int b = 0; b < B; b++) {
        const X *v = qkv + (size_t)b * T * ld + 2 * HHd;
        // out (T,Hd; ld HHd) = P (T,T) @ v (T,Hd) per head
        gemm(out + (size_t)b * T * HHd, HHd, att + (size_t)b * H * TT, T, 1, v, ld, T, Hd, T, 0, 0, H, Hd, TT, Hd);
    }
}

// dout (BT,HHd) -> dqkv (BT,3HHd), overwritten; dscore (B,H,T,T); dP (B,H,T,T) fp32 scratch
template <typename X>
static void attention_backward(X *dqkv, X *dscore, const X *dout, const X *att, const X *qkv, int B, int T, int H,
                               int Hd, float *dP) {
    int HHd = H * Hd, ld = 3 * HHd;
    long long TT = (long long)T * T;
    for (int b = 0; b < B; b++) {  // dP (T,T) = dout (T,Hd) @ v^T
        const X *v = qkv + (size_t)b * T * ld + 2 * HHd;
        gemm(dP + (size_t)b * H * TT, T, dout + (size_t)b * T * HHd, HHd, 1, v, ld, T, T, Hd, 0, 1, H, TT, Hd, Hd);
    }
    int rows = B * H * T;
    attention_softmax_backward_kernel<X><<<ceil_div(rows, 4), 128>>>(dscore, dP, att, T, rows);
    launchCheck();
    for (int b = 0; b < B; b++) {
        const X *q = qkv + (size_t)b * T * ld, *k = q + HHd;
        const X *dS = dscore + (size_t)b * H * TT, *P = att + (size_t)b * H * TT, *dy = dout + (size_t)b * T * HHd;
        X *dq = dqkv + (size_t)b * T * ld, *dk = dq + HHd, *dv = dq + 2 * HHd;
        // dq = dS k;  dk = dS^T q;  dv = P^T dout
        gemm(dq, ld, dS, T, 1, k, ld, T, Hd, T, 0, 0, H, Hd, TT, Hd);
        gemm(dk, ld, dS, 1, T, q, ld, T, Hd, T, 0, 0, H, Hd, TT, Hd);
        gemm(dv, ld, P, 1, T, dy, HHd, T, Hd, T, 0, 0, H, Hd, TT, Hd);
    }
}

// ----------------------------------------------------------------------------
// flash attention (bf16 mode): the same causal attention without the (T,T)
// matrices, on tensor cores; its kernels and launchers are the last section of
// this file. flash_supported: Hd has kernels; flash_smem_bytes: the shared
// memory they need; flash_init: once, before the first launch.

static int flash_supported(int Hd);
static size_t flash_smem_bytes(int Hd);
static void flash_init(int Hd);
// qkv (BT,3HHd), seg (BT) or NULL -> out (BT,HHd), lse (B,H,T)
static void attention_forward_flash(bf16 *out, float *lse, const bf16 *qkv, const int *seg, int B, int T, int H,
                                    int Hd);
static void attention_forward_flash(float *, float *, const float *, const int *, int, int, int, int);
// dout (BT,HHd) -> dqkv (BT,3HHd), overwritten; out, lse from the forward; dvec (B,H,T) scratch
static void attention_backward_flash(bf16 *dqkv, float *dvec, const bf16 *dout, const bf16 *out, const float *lse,
                                     const bf16 *qkv, const int *seg, int B, int T, int H, int Hd);
static void attention_backward_flash(float *, float *, const float *, const float *, const float *, const float *,
                                     const int *, int, int, int, int);

// ----------------------------------------------------------------------------
// the gated FFN of OpenMoE (dense, extra and every expert):
//   [a | b] = x Wg^T,  h = a * silu(b) * (x Wu^T),  out = h Wd^T
// The matmuls write a and b and u side by side, gu (N,3F) = [a | b | u]; when
// Wu follows Wg in the parameter buffer (dense and extra FFNs: w_gate, w_up
// are adjacent in the file order) that is one matmul with OUT = 3F.

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// h (N,F) = a * silu(b) * u, from gu (N,3F)
template <typename X> __global__ void ffn_gate_kernel(X *h, const X *gu, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t n = idx / F;
    int i = idx % F;
    const X *g = gu + n * 3 * F;
    float a = to_float(g[i]), b = to_float(g[F + i]), u = to_float(g[2 * F + i]);
    h[idx] = from_float<X>(a * (b * sigmoidf_(b)) * u);
}

// dgu (N,3F) from dh (N,F) and gu
template <typename X> __global__ void ffn_gate_backward_kernel(X *dgu, const X *dh, const X *gu, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t n = idx / F;
    int i = idx % F;
    const X *g = gu + n * 3 * F;
    X *dg = dgu + n * 3 * F;
    float a = to_float(g[i]), b = to_float(g[F + i]), u = to_float(g[2 * F + i]), d = to_float(dh[idx]);
    float s = sigmoidf_(b), silu = b * s;
    dg[i] = from_float<X>(d * silu * u);
    dg[F + i] = from_float<X>(d * a * u * s * (1.0f + b * (1.0f - s)));
    dg[2 * F + i] = from_float<X>(d * a * silu);
}

// inp (N,D) -> out (N,D) (= or += with accumulate); keeps gu (N,3F), h (N,F).
// batch > 1: that many FFNs (the experts), FFN i on rows i*N .. i*N+N-1 with
// weights wg + i*2FD, wu + i*FD, wd + i*DF.
template <typename X, typename TO>
static void ffn_forward(TO *out, X *gu, X *h, const X *inp, const X *wg, const X *wu, const X *wd, int N, int D, int F,
                        int accumulate, int batch = 1) {
    if (N <= 0) return;
    long long sD = (long long)N * D, sG = (long long)N * 3 * F, sH = (long long)N * F, FD = (long long)F * D;
    if (batch == 1 && wu == wg + 2 * FD) {
        matmul_forward(gu, inp, wg, N, D, 3 * F, 3 * F, 0);
    } else {
        matmul_forward(gu, inp, wg, N, D, 2 * F, 3 * F, 0, batch, sG, sD, 2 * FD);
        matmul_forward(gu + 2 * F, inp, wu, N, D, F, 3 * F, 0, batch, sG, sD, FD);
    }
    ffn_gate_kernel<X><<<ceil_div((size_t)batch * N * F, 256), 256>>>(h, gu, batch * N, F);
    launchCheck();
    matmul_forward(out, h, wd, N, F, D, D, accumulate, batch, sD, sH, FD);
}

// dout (N,D) -> dinp (N,D) overwritten; dwg, dwu, dwd accumulated (dwu follows
// dwg wherever wu follows wg); dgu (N,3F), dh (N,F) scratch. Batched as ffn_forward.
template <typename X>
static void ffn_backward(float *dinp, float *dwg, float *dwu, float *dwd, const X *dout, const X *inp, const X *gu,
                         const X *h, const X *wg, const X *wu, const X *wd, int N, int D, int F, X *dgu, X *dh,
                         int batch = 1) {
    if (N <= 0) return;
    long long sD = (long long)N * D, sG = (long long)N * 3 * F, sH = (long long)N * F, FD = (long long)F * D;
    matmul_backward(dh, dwd, dout, h, wd, N, F, D, D, 0, batch, sH, sD, sH, FD);
    ffn_gate_backward_kernel<X><<<ceil_div((size_t)batch * N * F, 256), 256>>>(dgu, dh, gu, batch * N, F);
    launchCheck();
    if (batch == 1 && wu == wg + 2 * FD) {
        matmul_backward(dinp, dwg, dgu, inp, wg, N, D, 3 * F, 3 * F, 0);
    } else {
        matmul_backward(dinp, dwg, dgu, inp, wg, N, D, 2 * F, 3 * F, 0, batch, sD, sG, sD, 2 * FD);
        matmul_backward(dinp, dwu, dgu + 2 * F, inp, wu, N, D, F, 3 * F, 1, batch, sD, sG, sD, FD);
    }
}

// ----------------------------------------------------------------------------
// router: fp32 softmax over all E experts, top-K (ties to the lower index)

// z (N,E), bias (E) -> p (N,E), lse (N), top (N,K) best by p + bias; one thread per token (router_row, openmoe.h)
__global__ void router_forward_kernel(float *p, float *lse, int *top, const float *z, const float *bias, int N, int E,
                                      int K) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    lse[n] = router_row(p + (size_t)n * E, top + (size_t)n * K, z + (size_t)n * E, bias, E, K);
}

// inp (N,D) fp32, wr (E,D) fp32, bias (E) -> z, p (N,E), lse (N), top (N,K)
static void router_forward(float *z, float *p, float *lse, int *top, const float *inp, const float *wr,
                           const float *bias, int N, int D, int E, int K) {
    matmul_forward(z, inp, wr, N, D, E, E, 0);
    router_forward_kernel<<<ceil_div(N, 128), 128>>>(p, lse, top, z, bias, N, E, K);
    launchCheck();
}

// rz_sum = sum of lse^2 over the N tokens: the router z-loss before its mean
static void router_z_loss_sum(double *rz_sum, const float *lse, int N) {
    sumsq_kernel<<<1, RED_THREADS>>>(rz_sum, lse, N);
    launchCheck();
}

// dp (N,E) holds dLoss/dp; adds the router z-loss term (coefficient rz_w on
// mean lse^2) and turns it into dz through the softmax, in place; one thread
// per token (router_backward_row, openmoe.h)
__global__ void router_backward_kernel(float *dp, const float *p, const float *lse, float rz_w, int N, int E) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    router_backward_row(dp + (size_t)n * E, p + (size_t)n * E, lse[n], rz_w, N, E);
}
static void router_backward(float *dp, const float *p, const float *lse, float rz_w, int N, int E) {
    router_backward_kernel<<<ceil_div(N, 128), 128>>>(dp, p, lse, rz_w, N, E);
    launchCheck();
}

// ----------------------------------------------------------------------------
// capacity (SPEC §3): slots in priority order within each group

#define CAP_CHUNK 1024  // assignments staged in shared memory at a time
#define MAX_EXPERTS 256 // one thread per expert in the capacity kernels

// One block per group g, thread e < E owns expert e. The group's N_g*K
// assignments are visited in priority order q = r*N_g + (n - g0) (rank-major,
// then token order), CAP_CHUNK at a time staged in shared memory; thread e
// numbers the ones that chose e: pos = earlier assignments to e in the group.
// An assignment is kept iff pos < C (the first C of each expert). count (E per
// group) = assignments per expert before dropping.
__global__ void moe_capacity_kernel(int *kept, int *pos, int *count, const int *top, int N, int K, int E, int G, int P,
                                    int cf1000, int min_capacity, int rule) {
    __shared__ int s_top[CAP_CHUNK], s_pos[CAP_CHUNK];
    int g = blockIdx.x, g0 = group_start(g, G, P), len = group_tokens(g, N, G, P), e = threadIdx.x;
    int total = len * K, cnt = 0, C = moe_capacity_of(len, E, K, cf1000, min_capacity, rule);
    for (int q0 = 0; q0 < total; q0 += CAP_CHUNK) {
        int nq = total - q0 < CAP_CHUNK ? total - q0 : CAP_CHUNK;
        for (int j = threadIdx.x; j < nq; j += blockDim.x) {
            int q = q0 + j, r = q / len, n = g0 + q % len;
            s_top[j] = top[(size_t)n * K + r];
        }
        __syncthreads();
        if (e < E)
            for (int j = 0; j < nq; j++)
                if (s_top[j] == e) s_pos[j] = cnt++;
        __syncthreads();
        for (int j = threadIdx.x; j < nq; j += blockDim.x) {
            int q = q0 + j, r = q / len, n = g0 + q % len;
            pos[(size_t)n * K + r] = s_pos[j];
            kept[(size_t)n * K + r] = s_pos[j] < C;
        }
        __syncthreads();  // s_top and s_pos are refilled next
    }
    if (e < E) count[(size_t)g * E + e] = cnt;
}

// Drop policy probs (SPEC §8), one thread per assignment i = n*K + r: pos =
// how many assignments of its group to the same expert come before it by
// their keys (probs_key, openmoe.h: p desc, rank asc, token asc, as the CPU
// sorts them), so that again the first C are kept. The keys are distinct, a
// NaN p included, so no two assignments share a place. It scans the group's
// G*K assignments: O(G*K) per assignment.
__global__ void moe_probs_rank_kernel(int *kept, int *pos, const int *top, const float *p, int N, int K, int E, int G,
                                      int P, int cf1000, int min_capacity, int rule) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * K) return;
    int n = (int)(i / K), r = (int)(i % K), e = top[i], g = group_of(n, G, P);
    int g0 = group_start(g, G, P), n1 = g0 + group_tokens(g, N, G, P);
    uint64_t key = probs_key(p[(size_t)n * E + e], r, n - g0);
    int before = 0;
    for (int m = g0; m < n1; m++)
        for (int q = 0; q < K; q++)
            before += top[(size_t)m * K + q] == e && probs_key(p[(size_t)m * E + e], q, m - g0) < key;
    pos[i] = before;
    kept[i] = before < moe_capacity_of(n1 - g0, E, K, cf1000, min_capacity, rule);
}

// Capacity and dropping within each routing group (group_len and
// moe_capacity_of in openmoe.h) by s's rule and policy. top (N,K), p (N,E)
// -> kept (N,K) 0/1; pos (N,K) each assignment's place in its (group, expert)
// queue and count (groups,E) the queues' lengths, for moe_rows.
static void moe_capacity(int *kept, const int *top, const float *p, int N, int K, int E, const MoeSettings *s,
                         int *pos, int *count) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P), n_groups = group_count(N, G, P);
    if (s->drop_policy == DROP_PROBS && (G > PROBS_MAX_GROUP || P > PROBS_MAX_GROUP))
        die("drop policy probs: a group of %d tokens does not fit its sort keys (group <= %d)", G > P ? G : P,
            PROBS_MAX_GROUP);
    moe_capacity_kernel<<<n_groups, MAX_EXPERTS>>>(kept, pos, count, top, N, K, E, G, P, s->cf1000, s->min_capacity,
                                                   s->capacity_rule);
    launchCheck();
    if (s->drop_policy == DROP_PROBS) {  // the same counts, other places in the queues
        moe_probs_rank_kernel<<<ceil_div((size_t)N * K, 256), 256>>>(kept, pos, top, p, N, K, E, G, P, s->cf1000,
                                                                     s->min_capacity, s->capacity_rule);
        launchCheck();
    }
}

// ----------------------------------------------------------------------------
// load balance (SPEC §4): per group E sum_e f_e P_e; the layer's lb is the mean over groups

// one block per group: f_e (share of the group's tokens whose top-K holds e)
// and P_e (mean p_e). Thread t < E*S (S = blockDim / E slices) sums expert
// e = t % E over slice j = t / E of the group's tokens; thread e then adds the
// S slices in order, and thread 0 the E products in expert order.
__global__ void moe_load_balance_forward_kernel(double *lb_group, float *lbf, const float *p, const int *top, int N,
                                                int K, int E, int G, int first) {
    __shared__ float s_f[MAX_EXPERTS], s_P[MAX_EXPERTS];
    __shared__ double s_term[MAX_EXPERTS];
    int g = blockIdx.x, g0 = group_start(g, G, first), len = group_tokens(g, N, G, first);
    int S = blockDim.x / E, t = threadIdx.x, e = t % E, j = t / E;
    float f = 0.0f, P = 0.0f;
    if (j < S) {
        for (int n = g0 + (int)((long long)len * j / S); n < g0 + (int)((long long)len * (j + 1) / S); n++) {
            for (int r = 0; r < K; r++) f += top[(size_t)n * K + r] == e ? 1.0f : 0.0f;
            P += p[(size_t)n * E + e];
        }
    }
    // the slices' partial sums, in shared memory one slice at a time (t < E*S covers each (e, j) once)
    float fsum = 0.0f, Psum = 0.0f;
    for (int jj = 0; jj < S; jj++) {
        __syncthreads();
        if (j == jj) {
            s_f[e] = f;
            s_P[e] = P;
        }
        __syncthreads();
        if (t < E) {
            fsum += s_f[t];
            Psum += s_P[t];
        }
    }
    if (t < E) {
        float fe = fsum / len;
        lbf[(size_t)g * E + t] = fe;
        s_term[t] = (double)fe * (Psum / len);
    }
    __syncthreads();
    if (t == 0) {
        double sum = 0.0;
        for (int i = 0; i < E; i++) sum += s_term[i];
        lb_group[g] = E * sum;
    }
}
// lb_sum = the sum over the groups; lbf (groups,E) keeps f for the backward; lb_group (groups) scratch
static void moe_load_balance_forward(double *lb_sum, float *lbf, const float *p, const int *top, int N, int K, int E,
                                     const MoeSettings *s, double *lb_group) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P), n_groups = group_count(N, G, P);
    moe_load_balance_forward_kernel<<<n_groups, MAX_EXPERTS>>>(lb_group, lbf, p, top, N, K, E, G, P);
    launchCheck();
    sum_kernel<<<1, RED_THREADS>>>(lb_sum, lb_group, n_groups);
    launchCheck();
}

// dp (N,E) += d(lb_w * lb)/dp = lb_w E f_e / len / n_groups (d lb_group / d p[n,e] = E f_e / len)
__global__ void moe_load_balance_backward_kernel(float *dp, const float *lbf, int N, int E, int G, int P, int n_groups,
                                                 float lb_w) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * E) return;
    int n = (int)(idx / E), e = idx % E, g = group_of(n, G, P), len = group_tokens(g, N, G, P);
    dp[idx] += lb_w * E * lbf[(size_t)g * E + e] / len / n_groups;
}
static void moe_load_balance_backward(float *dp, const float *lbf, int N, int E, const MoeSettings *s, float lb_w) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P), n_groups = group_count(N, G, P);
    moe_load_balance_backward_kernel<<<ceil_div((size_t)N * E, 256), 256>>>(dp, lbf, N, E, G, P, n_groups, lb_w);
    launchCheck();
}

// ----------------------------------------------------------------------------
// MoE dispatch and combine. The kept assignments become rows of per-expert
// buffers: expert e owns rows start[e] .. start[e+1]-1, so each expert runs
// its FFN only on the tokens it keeps.

// The expert rows' layout. Padded (R_pad > 0): expert e owns rows e*R_pad ..
// (e+1)*R_pad - 1, R_pad = sum over groups of min(C_g, N_g), the most it can
// keep; its kept rows come first, the rest are zero. All experts then run as
// one strided-batched matmul, and the host knows the layout without a sync.
// When E*R_pad rows would not fit the buffers (BT*K rows; tiny routing groups,
// where min_capacity exceeds the group), the exact layout: expert e owns its
// kept rows only, and the host reads start[] to run one matmul per expert.
// Returns R_pad, or 0 for the exact layout.
static int moe_padded_rows(int N, int K, int E, const MoeSettings *s) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P);
    long long R = 0;
    for (int g = 0; g < group_count(N, G, P); g++) {
        int len = group_tokens(g, N, G, P);
        int C = moe_capacity_of(len, E, K, s->cf1000, s->min_capacity, s->capacity_rule);
        R += C < len ? C : len;
    }
    return (long long)E * R <= (long long)N * K ? (int)R : 0;
}

// One block, thread e < E: expert e keeps min(count, C_g) rows of each group;
// start (E+1) = where each expert's rows begin: the prefix over experts of
// their kept rows, or e * R_pad in the padded layout (R_pad > 0: every expert
// owns R_pad rows, its kept rows first); goff (groups,E) = first row of (g, e);
// routed/kept (E) the statistics of model_router_stats.
__global__ void moe_offsets_kernel(int *start, int *goff, int *routed, int *kept, const int *count, int n_groups,
                                   int N, int G, int P, int E, int K, int cf1000, int min_capacity, int rule,
                                   int R_pad) {
    __shared__ int s_rows[MAX_EXPERTS], s_start[MAX_EXPERTS + 1];
    int e = threadIdx.x;
    if (e < E) {
        int rows = 0, all = 0;
        for (int g = 0; g < n_groups; g++) {
            int len = group_tokens(g, N, G, P), C = moe_capacity_of(len, E, K, cf1000, min_capacity, rule);
            int cnt = count[(size_t)g * E + e];
            all += cnt;
            rows += cnt < C ? cnt : C;
        }
        s_rows[e] = rows;
        routed[e] = all;
        kept[e] = rows;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        s_start[0] = 0;
        for (int i = 0; i < E; i++) s_start[i + 1] = s_start[i] + (R_pad > 0 ? R_pad : s_rows[i]);
        for (int i = 0; i <= E; i++) start[i] = s_start[i];
    }
    __syncthreads();
    if (e < E) {
        int run = s_start[e];
        for (int g = 0; g < n_groups; g++) {
            int len = group_tokens(g, N, G, P), C = moe_capacity_of(len, E, K, cf1000, min_capacity, rule);
            int cnt = count[(size_t)g * E + e];
            goff[(size_t)g * E + e] = run;
            run += cnt < C ? cnt : C;
        }
    }
}

// one thread per assignment i = n*K + r: its row (or -1) and the row's token
__global__ void moe_rows_kernel(int *row_of, int *row_token, const int *top, const int *kept, const int *pos,
                                const int *goff, int N, int K, int E, int G, int P) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * K) return;
    int n = (int)(i / K), g = group_of(n, G, P);
    if (kept[i]) {
        int row = goff[(size_t)g * E + top[i]] + pos[i];
        row_of[i] = row;
        row_token[row] = n;
    } else {
        row_of[i] = -1;
    }
}

// the rows of the kept assignments: top, kept, pos (N,K), count (groups,E)
// (moe_capacity) -> start (E+1) on the device and in start_host, row_token
// (rows), row_of (N,K) (-1: dropped), each expert's rows group by group, in
// priority order; routed, kept_cnt (E) its assignments before and after
// dropping (model_router_stats). R_pad > 0: the padded layout (padding rows
// get token -1), else the exact one. goff (groups,E) scratch.
static void moe_rows(int *start, int *row_token, int *row_of, int *routed, int *kept_cnt, const int *top,
                     const int *kept, int N, int K, int E, int *start_host, const int *pos, const int *count,
                     const MoeSettings *s, int R_pad, int *goff) {
    int P = group_first(N, s->first_group), G = group_len(N, s->group_size, P), n_groups = group_count(N, G, P);
    moe_offsets_kernel<<<1, MAX_EXPERTS>>>(start, goff, routed, kept_cnt, count, n_groups, N, G, P, E, K, s->cf1000,
                                           s->min_capacity, s->capacity_rule, R_pad);
    launchCheck();
    if (R_pad > 0) cudaCheck(cudaMemsetAsync(row_token, 0xff, (size_t)E * R_pad * sizeof(int)));  // -1: a padding row
    moe_rows_kernel<<<ceil_div((size_t)N * K, 256), 256>>>(row_of, row_token, top, kept, pos, goff, N, K, E, G, P);
    launchCheck();
    if (R_pad > 0) {
        for (int e = 0; e <= E; e++) start_host[e] = e * R_pad;
    } else {  // the host needs each expert's rows to size its matmuls: the one sync of the MoE layer
        cudaCheck(cudaMemcpy(start_host, start, (E + 1) * sizeof(int), cudaMemcpyDeviceToHost));
    }
}

// xe (rows,D) = X(inp[row_token]), zero for a padding row (token -1): one block per row
template <typename X> __global__ void moe_dispatch_kernel(X *xe, const int *row_token, const float *inp, int D) {
    int row = blockIdx.x, n = row_token[row];
    const float *x = inp + (size_t)(n < 0 ? 0 : n) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) xe[(size_t)row * D + i] = from_float<X>(n < 0 ? 0.0f : x[i]);
}
template <typename X> static void moe_dispatch(X *xe, const int *row_token, const float *inp, int rows, int D) {
    if (rows <= 0) return;
    moe_dispatch_kernel<X><<<rows, 128>>>(xe, row_token, inp, D);
    launchCheck();
}

// out (N,D) = res + sum over kept (n, rank) of p[n, e] * ye[row], in rank order: one block per token
template <typename X>
__global__ void moe_combine_kernel(float *out, const float *res, const X *ye, const float *p, const int *top,
                                   const int *row_of, int K, int E, int D) {
    int n = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < K; r++) {
            int row = row_of[(size_t)n * K + r];
            if (row < 0) continue;
            float w = p[(size_t)n * E + top[(size_t)n * K + r]];
            acc = acc + w * to_float(ye[(size_t)row * D + i]);
        }
        out[(size_t)n * D + i] = acc + res[(size_t)n * D + i];
    }
}
template <typename X>
static void moe_combine(float *out, const float *res, const X *ye, const float *p, const int *top, const int *row_of,
                        int N, int K, int E, int D) {
    moe_combine_kernel<X><<<N, 128>>>(out, res, ye, p, top, row_of, K, E, D);
    launchCheck();
}

// from dout (N,D): dye (rows,D) = X(p * dout[token]), and dp (N,E) (overwritten)
// gets dout[n] . ye[row] at each kept choice, 0 elsewhere: one block per token
template <typename X>
__global__ void moe_combine_backward_kernel(X *dye, float *dp, const float *dout, const X *ye, const float *p,
                                            const int *top, const int *row_of, int K, int E, int D) {
    int n = blockIdx.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) dp[(size_t)n * E + e] = 0.0f;
    __syncthreads();
    const float *d = dout + (size_t)n * D;
    for (int r = 0; r < K; r++) {
        int row = row_of[(size_t)n * K + r];
        if (row < 0) continue;  // the same for the whole block
        int e = top[(size_t)n * K + r];
        float w = p[(size_t)n * E + e], dot = 0.0f;
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            dye[(size_t)row * D + i] = from_float<X>(w * d[i]);
            dot += d[i] * to_float(ye[(size_t)row * D + i]);
        }
        dot = block_sum(dot);
        if (threadIdx.x == 0) dp[(size_t)n * E + e] = dot;
    }
}
template <typename X>
static void moe_combine_backward(X *dye, float *dp, const float *dout, const X *ye, const float *p, const int *top,
                                 const int *row_of, int N, int K, int E, int D) {
    moe_combine_backward_kernel<X><<<N, 128>>>(dye, dp, dout, ye, p, top, row_of, K, E, D);
    launchCheck();
}

// dinp (N,D) += the rows' input gradients dxe (rows,D), in rank order: one block per token
__global__ void moe_dispatch_backward_kernel(float *dinp, const float *dxe, const int *row_of, int K, int D) {
    int n = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = dinp[(size_t)n * D + i];
        for (int r = 0; r < K; r++) {
            int row = row_of[(size_t)n * K + r];
            if (row >= 0) acc += dxe[(size_t)row * D + i];
        }
        dinp[(size_t)n * D + i] = acc;
    }
}
static void moe_dispatch_backward(float *dinp, const float *dxe, const int *row_of, int N, int K, int D) {
    moe_dispatch_backward_kernel<<<N, 128>>>(dinp, dxe, row_of, K, D);
    launchCheck();
}

// ----------------------------------------------------------------------------
// output losses: cross-entropy fused with the output z-loss (mean lse^2)

// logsumexp in one pass: each thread keeps (max, sum of exp(x - max)) of its
// values; two such pairs merge into one (the same bits in either order, so
// the butterfly still gives every lane the same result)
struct MaxSum {
    float m, s;
};
// a side that saw no value above -inf has s 0, or NaN when it saw a NaN, which
// the merge carries (as the CPU's sum does)
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    MaxSum r;
    r.m = fmaxf(a.m, b.m);
    r.s = (a.m == -INFINITY ? a.s : a.s * expf(a.m - r.m)) + (b.m == -INFINITY ? b.s : b.s * expf(b.m - r.m));
    return r;
}
__device__ MaxSum block_maxsum(MaxSum v) {
    __shared__ MaxSum s[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum u = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = maxsum_merge(v, u);
    }
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    MaxSum t = {-INFINITY, 0.0f};
    for (int w = 0; w < nw; w++) t = maxsum_merge(t, s[w]);
    return t;
}

// lse (N) of logits (N,V), reading each row once: one block per row. A NaN
// logit makes the row's lse NaN, as on the CPU (the sum s carries it)
template <typename X> __global__ void crossentropy_forward_kernel(float *lse, const X *logits, int V) {
    int n = blockIdx.x;
    const X *l = logits + (size_t)n * V;
    MaxSum a = {-INFINITY, 0.0f};
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = to_float(l[v]);
        if (x > a.m) {
            a.s = (a.m == -INFINITY ? a.s : a.s * expf(a.m - x)) + 1.0f;
            a.m = x;
        } else if (x != -INFINITY) {
            a.s += expf(x - a.m);
        }
    }
    a = block_maxsum(a);
    if (threadIdx.x == 0) lse[n] = a.m + logf(a.s);
}
// sums[0] = sum of ce, sums[1] = sum of lse^2 over the targets (y >= 0)
template <typename X>
__global__ void crossentropy_sum_kernel(double *sums, const float *lse, const X *logits, const int *y, int N, int V) {
    double ce = 0.0, lz = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        if (y[n] < 0) continue;
        ce += lse[n] - to_float(logits[(size_t)n * V + y[n]]);
        lz += (double)lse[n] * lse[n];
    }
    ce = block_sum(ce);
    lz = block_sum(lz);
    if (threadIdx.x == 0) {
        sums[0] = ce;
        sums[1] = lz;
    }
}
// logits (N,V), y (N) -> lse (N); sums[0..1] the sums of ce and lse^2 over the targets (y >= 0)
template <typename X>
static void crossentropy_forward(double *sums, float *lse, const X *logits, const int *y, int N, int V) {
    crossentropy_forward_kernel<X><<<N, 1024>>>(lse, logits, V);
    launchCheck();
    crossentropy_sum_kernel<X><<<1, RED_THREADS>>>(sums, lse, logits, y, N, V);
    launchCheck();
}

// dlogits (N,V) = d(ce + lz_coef * lz)/dlogits, ce and lz means over m (forward_loss_targets): one block per row
template <typename X>
__global__ void crossentropy_backward_kernel(X *dlogits, const X *logits, const float *lse, const int *y, int V,
                                             float m, float lz_coef) {
    int n = blockIdx.x;
    X *d = dlogits + (size_t)n * V;
    if (y[n] < 0) {
        for (int v = threadIdx.x; v < V; v += blockDim.x) d[v] = from_float<X>(0.0f);
        return;
    }
    const X *l = logits + (size_t)n * V;
    float ln = lse[n], scale = (1.0f + lz_coef * 2.0f * ln) / m;  // softmax * (1 + 2 lz_coef lse) / m
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float dv = expf(to_float(l[v]) - ln) * scale;
        if (v == y[n]) dv -= 1.0f / m;
        d[v] = from_float<X>(dv);
    }
}
template <typename X>
static void crossentropy_backward(X *dlogits, const X *logits, const float *lse, const int *y, int N, int V, float m,
                                  float lz_coef) {
    crossentropy_backward_kernel<X><<<N, 256>>>(dlogits, logits, lse, y, V, m > 0.0f ? m : 1.0f, lz_coef);
    launchCheck();
}

// out = a + b, elementwise over n
__global__ void residual_forward_kernel(float *out, const float *a, const float *b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}
static void residual_forward(float *out, const float *a, const float *b, size_t n) {
    residual_forward_kernel<<<ceil_div(n, 256), 256>>>(out, a, b, n);
    launchCheck();
}

// ----------------------------------------------------------------------------
// the model: parameters, gradients and activations, each in one allocation

const Config *model_config(const Model *m) { return &m->c; }
const ParamTable *model_param_table(const Model *m) { return &m->table; }

// a bump allocator over one buffer, 256-byte aligned: a first pass with base NULL only counts
static void *carve(char *base, size_t *used, size_t bytes) {
    *used = size_add(*used, 255) & ~(size_t)255;
    void *p = base ? base + *used : NULL;
    *used = size_add(*used, bytes);
    return p;
}

// number of blocks of the two-step sums over n values (a function of n only, so the order is fixed)
static int partial_blocks(size_t n) {
    size_t nb = (n + 16383) / 16384;
    return (int)(nb < 1 ? 1 : nb > 1024 ? 1024 : nb);
}

#define ADAFACTOR_COL_ROWS 256  // rows per partial column sum of Adafactor's factored second moment

// the optimizer's scratch: the largest need over all tensors
static size_t opt_partial_size(const Model *m, int *max_slices) {
    const ParamTable *pt = &m->table;
    size_t need = partial_blocks(pt->n_params);
    *max_slices = 1;
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *t = &pt->tensors[i];
        size_t n = (size_t)t->rows * t->cols, s = t->slices;
        if (t->slices > *max_slices) *max_slices = t->slices;
        if (s * partial_blocks(n) > need) need = s * partial_blocks(n);
        if (m->opt_kind == OPT_ADAFACTOR && adafactor_factored(t, m->opt_min_dim)) {
            size_t cols_partial = s * ceil_div(t->rows, ADAFACTOR_COL_ROWS) * (size_t)t->cols;
            if (cols_partial > need) need = cols_partial;
        }
    }
    return need;
}

// every row of the tables at its offset in base, 256-byte aligned, the
// matmul operands in X; returns the bytes (base NULL: only counts)
template <typename X> static size_t acts_carve(Model *m, char *base) {
    typedef X floatX;
    const Config *c = &m->c;
    Acts<X> *A = acts<X>(m);
    size_t used = 0, n_params = m->table.n_params;
    int grads = m->grads != NULL, bf16_mode = sizeof(X) != sizeof(float), max_slices;
    size_t n_opt_partial = m->n_opt_partial = opt_partial_size(m, &max_slices);
    ACT_SIZES(c, m->Bmax, m->Tmax, m->flash, grads);
#define CARVE(name, type, n, when) A->name = (when) ? (type *)carve(base, &used, size_mul(n, sizeof(type))) : NULL;
    FORWARD_ACTS(CARVE)
    if (grads) {
        BACKWARD_ACTS(CARVE)
    }
    GPU_ACTS(CARVE)
#undef CARVE
#define CARVE(name, type, n, when) m->name = (when) ? (type *)carve(base, &used, size_mul(n, sizeof(type))) : NULL;
    MODEL_BUFFERS(CARVE)
    GPU_MODEL_BUFFERS(CARVE)
#undef CARVE
    // the layers' rows: every layer's with an optimizer, else once for all (openmoe.h: ACT_SHARED_LAYER)
#define CARVE(name, type, n, when) a->name = (when) ? (type *)carve(base, &used, size_mul(n, sizeof(type))) : NULL;
#define SHARE(name, type, n, when) a->name = (when) ? shared.name : NULL;
    LayerActs<X> shared;
    memset(&shared, 0, sizeof(shared));
    if (!grads) {
        LayerActs<X> *a = &shared;
        ACT_SHARED_LAYER(c);
        LAYER_ACTS(CARVE)
        GPU_LAYER_ACTS(CARVE)
    }
    for (int l = 0; l < c->L; l++) {
        LayerActs<X> *a = &A->layer[l];
        ACT_LAYER(c, l);
        if (grads) {
            LAYER_ACTS(CARVE)
            GPU_LAYER_ACTS(CARVE)
        } else {
            LAYER_ACTS(SHARE)
            GPU_LAYER_ACTS(SHARE)
        }
        a->in = A->resid ? A->resid + ACT_RESID(l) : NULL;
        if (moe && !extra) a->moe_out = A->resid ? A->resid + ACT_RESID(l + 1) : NULL;
        a->start_host = m->h_start + l * (E + 1);
    }
#undef SHARE
#undef CARVE
    A->final_in = A->resid ? A->resid + ACT_RESID(L) : NULL;
    if (!bf16_mode) {  // fp32 mode: the matmuls read the master weights and d_res themselves
        A->params_x = (X *)m->params;
        A->dres_x = (X *)A->d_res;
    }
    return used;
}

// refresh the matmul copy of the weights after the master weights changed
static void params_to_x(Model *m) {
    if (m->precision == PRECISION_BF16) cast_to_x(m->a16.params_x, m->params, m->table.n_params);
}

// model_create's arguments, against this backend's limits. The model lives
// on the current device: dp_init's choice with MPI, else CUDA's default 0.
static void create_args_check(const Config *c, int B, int T, Precision precision) {
    char why[128];
    if (!config_check(c, why, sizeof(why))) die("model_create: bad config: %s", why);
    if (precision != PRECISION_FP32 && precision != PRECISION_BF16) die("model_create: unknown precision %d", precision);
    if (B <= 0 || T <= 0 || T > c->max_seq_len)
        die("model_create: B = %d, T = %d: need B > 0 and 0 < T <= max_seq_len = %d", B, T, c->max_seq_len);
    if (c->E > MAX_EXPERTS) die("model_create: E = %d experts, the CUDA backend handles at most %d", c->E, MAX_EXPERTS);
    if ((long long)B * T * c->K >= (1LL << 31) || (long long)B * c->H * T >= (1LL << 31) ||
        ((long long)B * T + DW_ROWS - 1) / DW_ROWS > MAX_GRID_Y)
        die("model_create: batch %d x %d is too large for this backend's index types and grids", B, T);
    int ndev = 0;
    cudaError_t err = cudaGetDeviceCount(&ndev);
    if (err != cudaSuccess) die("no CUDA device: %s", cudaGetErrorString(err));
    if (ndev == 0) die("no CUDA device: cudaGetDeviceCount found none");
}

// m->flash and m->moe_exact from the precision, the head width, the batch, the
// GPU and the environment. Attention: the flash kernels in bf16 mode for the
// head widths they have and B*H within their grid's y; OPENMOE_ATTENTION=cublas
// forces the (T,T) path (fp32 mode always uses it).
static void kernel_choices(Model *m) {
    const Config *c = &m->c;
    const char *att = getenv("OPENMOE_ATTENTION");
    if (att && strcmp(att, "cublas") != 0 && strcmp(att, "flash") != 0)
        die("OPENMOE_ATTENTION=%s: use cublas or flash", att);
    m->flash = m->precision == PRECISION_BF16 && flash_supported(c->Hd) && !(att && strcmp(att, "cublas") == 0);
    const char *layout = getenv("OPENMOE_MOE_LAYOUT");
    if (layout && strcmp(layout, "exact") != 0 && strcmp(layout, "padded") != 0)
        die("OPENMOE_MOE_LAYOUT=%s: use padded (the default where it fits) or exact", layout);
    m->moe_exact = layout && strcmp(layout, "exact") == 0;
    if (att && strcmp(att, "flash") == 0 && !m->flash)
        die("OPENMOE_ATTENTION=flash: the flash kernels need bf16 mode and a head width of 16, 32, 64 or 128 (Hd = %d)",
            c->Hd);
    if (m->flash && (long long)m->Bmax * c->H > MAX_GRID_Y) {  // the flash grids' y is B*H: the cuBLAS path
        if (att && strcmp(att, "flash") == 0)
            die("OPENMOE_ATTENTION=flash: B*H = %lld is more than the flash kernels' grid takes (%d)",
                (long long)m->Bmax * c->H, MAX_GRID_Y);
        m->flash = 0;
    }
    if (m->flash) {
        int optin = 0, dev = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if ((size_t)optin < flash_smem_bytes(c->Hd)) m->flash = 0;  // too little shared memory: the cuBLAS path
        else flash_init(c->Hd);
    }
}

// the model's own fp32 parameters (zero), which fp32 mode's matmuls read too
static void params_own(Model *m) {
    size_t n = m->table.n_params;
    cudaCheck(cudaMalloc(&m->params, n * sizeof(float)));
    cudaCheck(cudaMemset(m->params, 0, n * sizeof(float)));
    if (m->precision == PRECISION_FP32) m->a32.params_x = m->params;
}

// with opt: the parameters (zero), the gradients and the optimizer state of the shard (zero)
static void params_alloc(Model *m, const OptSettings *opt) {
    const ParamTable *pt = &m->table;
    int HHd = m->c.H * m->c.Hd;
    for (int l = 0; l < m->c.L; l++) {  // the fused matmuls rely on the file order (SPEC §6)
        const LayerParams *lp = &pt->layer[l];
        if (lp->wk != lp->wq + (size_t)HHd * m->c.D || lp->wv != lp->wk + (size_t)HHd * m->c.D)
            die("model_create: layer %d: wq, wk, wv are not adjacent in the parameter table", l);
    }
    size_t n = pt->n_params;
    if (!opt) return;
    params_own(m);
    m->opt_kind = opt->kind;
    m->opt_min_dim = opt->min_dim;
    m->shard_lo = opt->shard_lo;
    m->shard_hi = opt->shard_hi ? opt->shard_hi : n;
    m->n_opt_state = opt_state_floats_range(pt, opt->kind, opt->min_dim, m->shard_lo, m->shard_hi);
    cudaCheck(cudaMalloc(&m->grads, n * sizeof(float)));
    cudaCheck(cudaMemset(m->grads, 0, n * sizeof(float)));
    cudaCheck(cudaMalloc(&m->opt_state, m->n_opt_state * sizeof(float)));
    cudaCheck(cudaMemset(m->opt_state, 0, m->n_opt_state * sizeof(float)));
}

// the activations and buffers (acts_carve) in one device allocation, zero, and the RoPE tables
static void acts_alloc(Model *m) {
    const Config *c = &m->c;
    int bf = m->precision == PRECISION_BF16;
    m->h_start = (int *)callocCheck((size_t)c->L * (c->E + 1), sizeof(int));
    if (bf) m->a16.layer = (LayerActs<bf16> *)callocCheck(c->L, sizeof(LayerActs<bf16>));
    else m->a32.layer = (LayerActs<float> *)callocCheck(c->L, sizeof(LayerActs<float>));
    size_t bytes = bf ? acts_carve<bf16>(m, NULL) : acts_carve<float>(m, NULL);
    cudaError_t aerr = cudaMalloc(&m->buffer, bytes);
    if (aerr != cudaSuccess)
        die("model_create: cannot allocate %.2f GB of activations for batch %d x %d on the GPU: %s", bytes / 1e9,
            m->Bmax, m->Tmax, cudaGetErrorString(aerr));
    cudaCheck(cudaMemset(m->buffer, 0, bytes));
    m->buffer_bytes = bytes;
    if (bf) acts_carve<bf16>(m, m->buffer);
    else acts_carve<float>(m, m->buffer);
    size_t half = (size_t)m->Tmax * (c->Hd / 2);
    float *cs = (float *)mallocCheck(2 * half * sizeof(float));
    rope_tables(cs, cs + half, m->Tmax, c->Hd);
    cudaCheck(cudaMemcpy(m->rope_cos, cs, half * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(m->rope_sin, cs + half, half * sizeof(float), cudaMemcpyHostToDevice));
    free(cs);
}

// the host side: pinned staging of the batch and the results, statistics, scratch
static void host_alloc(Model *m) {
    const Config *c = &m->c;
    size_t BT = (size_t)m->Bmax * m->Tmax;
    int nm = n_moe_layers(c) > 0 ? n_moe_layers(c) : 1;
    cudaCheck(cudaMallocHost(&m->h_x, BT * sizeof(int)));
    cudaCheck(cudaMallocHost(&m->h_y, BT * sizeof(int)));
    cudaCheck(cudaMallocHost(&m->h_segment, BT * sizeof(int)));
    cudaCheck(cudaMallocHost(&m->h_position, BT * sizeof(int)));
    cudaCheck(cudaMallocHost(&m->h_order, BT * sizeof(int)));
    cudaCheck(cudaMallocHost(&m->h_ustart, (BT + 1) * sizeof(int)));
    cudaCheck(cudaMallocHost(&m->h_logits, c->V * sizeof(float)));
    if (m->precision == PRECISION_BF16) cudaCheck(cudaMallocHost(&m->h_stage, STAGE_ELEMS * sizeof(bf16)));
    cudaCheck(cudaEventCreateWithFlags(&m->buckets_copied, cudaEventDisableTiming));
    m->h_bucket = (int *)callocCheck(c->V + 1, sizeof(int));
    m->h_ints = (int *)callocCheck(BT * c->K, sizeof(int));
    m->h_p = (float *)callocCheck(BT * c->E, sizeof(float));
    m->h_sums = (double *)callocCheck(2 + 2 * (size_t)nm, sizeof(double));
    m->stats = router_stats_create(n_moe_layers(c), c->E, &m->stat_ints);
}

Model *model_create(const Config *c, int B, int T, Precision precision, const OptSettings *opt) {
    create_args_check(c, B, T, precision);
    Model *m = (Model *)callocCheck(1, sizeof(Model));
    m->c = *c;
    param_table_build(&m->table, c);
    m->Bmax = B;
    m->Tmax = T;
    m->precision = precision;
    kernel_choices(m);
    params_alloc(m, opt);
    acts_alloc(m);
    cublas_acquire();
    host_alloc(m);
    size_t n_bias = (size_t)(n_moe_layers(c) > 0 ? n_moe_layers(c) : 1) * c->E;
    cudaCheck(cudaMalloc(&m->router_bias, n_bias * sizeof(float)));
    cudaCheck(cudaMemset(m->router_bias, 0, n_bias * sizeof(float)));
    cudaCheck(cudaDeviceSynchronize());
    return m;
}

void model_free(Model *m) {
    if (!m) return;
    cudaCheck(cudaDeviceSynchronize());
    cublas_release();
    cudaCheck(cudaFree(m->params));
    cudaCheck(cudaFree(m->small));
    free(m->small_at);
    cudaCheck(cudaFree(m->grads));
    cudaCheck(cudaFree(m->opt_state));
    cudaCheck(cudaFree(m->buffer));
    cudaCheck(cudaFree(m->router_bias));
    cudaCheck(cudaFreeHost(m->h_x));
    cudaCheck(cudaFreeHost(m->h_y));
    cudaCheck(cudaFreeHost(m->h_segment));
    cudaCheck(cudaFreeHost(m->h_position));
    cudaCheck(cudaFreeHost(m->h_order));
    cudaCheck(cudaFreeHost(m->h_ustart));
    cudaCheck(cudaFreeHost(m->h_logits));
    if (m->h_stage) cudaCheck(cudaFreeHost(m->h_stage));
    cudaCheck(cudaEventDestroy(m->buckets_copied));
    free(m->h_start);
    free(m->a32.layer);
    free(m->a16.layer);
    free(m->h_bucket);
    free(m->h_ints);
    free(m->h_p);
    free(m->h_sums);
    free(m->stats);
    free(m->stat_ints);
    param_table_free(&m->table);
    free(m);
}

void model_set_params(Model *m, const float *params) {
    if (m->small) die("model_set_params: the model computes with a model file's weights (model_set_weights)");
    if (!m->params) params_own(m);
    cudaCheck(cudaMemcpy(m->params, params, m->table.n_params * sizeof(float), cudaMemcpyHostToDevice));
    params_to_x(m);
    cudaCheck(cudaDeviceSynchronize());
}
void model_get_params(const Model *m, float *params) {
    if (!m->params) die("model_get_params: the model computes with a model file's weights and has no fp32 copy");
    cudaCheck(cudaMemcpy(params, m->params, m->table.n_params * sizeof(float), cudaMemcpyDeviceToHost));
}

// the fp32 values from parameter offset off on, on the device: the master
// weights, or (a model on a file's weights) the norms and routers in small
static const float *param_f32(const Model *m, size_t off) {
    if (m->params) return m->params + off;
    if (!m->small) die("the model has no weights: model_set_params or model_set_weights gives it some");
    int i = param_tensor_of(&m->table, off);
    if (m->small_at[i] == SIZE_MAX) die("param_f32: tensor %s is not kept in fp32", m->table.tensors[i].name);
    return m->small + m->small_at[i] + (off - m->table.tensors[i].offset);
}

Precision model_file_precision(int version) { return version == MODEL_FP32 ? PRECISION_FP32 : PRECISION_BF16; }

#define UPLOAD_BYTES (64u << 20)  // a model file goes to the device in pieces of at most this many bytes

// bf16 (n) = the int8 values q (n) times their scales s (one per G): s * q in fp32, rounded to bf16
__global__ void int8_to_bf16_kernel(bf16 *out, const int8_t *q, const float *s, int G, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(s[i / G] * (float)q[i]);
}

// tensor t of f (at its bytes `at`) into params_x (bf16 mode), through staging
// (UPLOAD_BYTES of device memory): bf16 as it is, int8 decoded (s * q
// rounded to bf16), fp32 rounded to bf16
static void tensor_upload_x(Model *m, const ModelFile *f, const TensorInfo *t, const unsigned char *at, char *staging) {
    bf16 *dst = m->a16.params_x + t->offset;
    size_t n = tensor_numel(t);
    if (f->version == MODEL_BF16) {
        cudaCheck(cudaMemcpy(dst, at, n * sizeof(bf16), cudaMemcpyHostToDevice));
        return;
    }
    if (f->version == MODEL_INT8 && tensor_quantized(t)) {  // G values and their scale: G + 4 bytes a group
        int G = f->group;
        size_t groups = UPLOAD_BYTES / (G + sizeof(float)), n_groups = n / G;
        const float *scales = (const float *)at;
        const int8_t *q = (const int8_t *)(at + n_groups * sizeof(float));
        for (size_t g0 = 0; g0 < n_groups; g0 += groups) {
            size_t k = n_groups - g0 < groups ? n_groups - g0 : groups;
            float *s_dev = (float *)staging;
            int8_t *q_dev = (int8_t *)(staging + k * sizeof(float));
            cudaCheck(cudaMemcpy(s_dev, scales + g0, k * sizeof(float), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemcpy(q_dev, q + g0 * G, k * G, cudaMemcpyHostToDevice));
            int8_to_bf16_kernel<<<ceil_div(k * G, 256), 256>>>(dst + g0 * G, q_dev, s_dev, G, k * G);
            launchCheck();
            cudaCheck(cudaDeviceSynchronize());  // staging is refilled next
        }
        return;
    }
    size_t per = UPLOAD_BYTES / sizeof(float);  // fp32
    for (size_t i0 = 0; i0 < n; i0 += per) {
        size_t k = n - i0 < per ? n - i0 : per;
        cudaCheck(cudaMemcpy(staging, (const float *)at + i0, k * sizeof(float), cudaMemcpyHostToDevice));
        cast_to_x(dst + i0, (const float *)staging, k);
        cudaCheck(cudaDeviceSynchronize());
    }
}

// Version 1 into the fp32 master weights (fp32 mode; bf16 mode makes its copy
// from them). Versions 2 and 3 (bf16 mode) straight into the bf16 copy, a
// piece at a time, with no fp32 copy of the weights on the device: the
// norms and routers, which the forward reads in fp32, go to small as well.
void model_set_weights(Model *m, const ModelFile *f) {
    if (memcmp(&m->c, &f->c, sizeof(Config)) != 0)
        die("model_set_weights: %s holds a model of another config than the model's", f->path);
    if (m->params || m->small) die("model_set_weights: the model has weights already");
    const ParamTable *pt = &m->table;
    size_t *offset = (size_t *)mallocCheck(pt->n_tensors * sizeof(size_t));
    tensor_file_offsets(offset, pt, f->version, f->group);
    if (f->version == MODEL_FP32) {
        params_own(m);  // the file's parameters are the master weights' layout
        cudaCheck(cudaMemcpy(m->params, f->data + HEADER_BYTES, pt->n_params * sizeof(float), cudaMemcpyHostToDevice));
        params_to_x(m);
        cudaCheck(cudaDeviceSynchronize());
        free(offset);
        return;
    }
    if (m->precision != PRECISION_BF16)
        die("model_set_weights: %s is version %d: the CUDA backend computes it in bf16 mode (model_file_precision)",
            f->path, f->version);
    size_t n_small = 0;
    m->small_at = (size_t *)mallocCheck(pt->n_tensors * sizeof(size_t));
    for (int i = 0; i < pt->n_tensors; i++) {
        m->small_at[i] = tensor_quantized(&pt->tensors[i]) ? SIZE_MAX : n_small;
        if (!tensor_quantized(&pt->tensors[i])) n_small += tensor_numel(&pt->tensors[i]);
    }
    float *h_small = (float *)mallocCheck(n_small * sizeof(float));
    char *staging;
    cudaCheck(cudaMalloc(&staging, UPLOAD_BYTES));
    for (int i = 0; i < pt->n_tensors; i++) {
        const TensorInfo *t = &pt->tensors[i];
        const unsigned char *at = f->data + offset[i];
        tensor_upload_x(m, f, t, at, staging);
        if (m->small_at[i] == SIZE_MAX) continue;
        float *dst = h_small + m->small_at[i];
        for (size_t j = 0; j < tensor_numel(t); j++) {  // a norm or a router in fp32: bf16 widened, or as stored
            uint32_t u = 0;
            if (f->version == MODEL_BF16) memcpy((char *)&u + 2, at + 2 * j, 2);  // the upper half (little-endian)
            else memcpy(&u, at + 4 * j, 4);
            memcpy(&dst[j], &u, 4);
        }
    }
    cudaCheck(cudaMalloc(&m->small, n_small * sizeof(float)));
    cudaCheck(cudaMemcpy(m->small, h_small, n_small * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaFree(staging));
    free(h_small);
    free(offset);
}
void model_get_grads(const Model *m, float *grads) {
    if (!m->grads) die("model_get_grads: the model was created without an optimizer, so it has no gradients");
    cudaCheck(cudaMemcpy(grads, m->grads, m->table.n_params * sizeof(float), cudaMemcpyDeviceToHost));
}
void model_set_grads(Model *m, const float *grads) {
    if (!m->grads) die("model_set_grads: the model was created without an optimizer, so it has no gradients");
    cudaCheck(cudaMemcpy(m->grads, grads, m->table.n_params * sizeof(float), cudaMemcpyHostToDevice));
}
void model_get_logits(const Model *m, float *logits) {
    if (!m->has_logits) die("model_get_logits: the last forward was a prefill, which keeps its last position's only");
    size_t n = (size_t)m->B * m->T * m->c.V;
    if (m->precision == PRECISION_FP32) {
        cudaCheck(cudaMemcpy(logits, m->a32.logits, n * sizeof(float), cudaMemcpyDeviceToHost));
        return;
    }
    for (size_t i0 = 0; i0 < n; i0 += STAGE_ELEMS) {  // bf16 on the GPU: in chunks through the staging buffer
        size_t k = n - i0 < STAGE_ELEMS ? n - i0 : STAGE_ELEMS;
        cudaCheck(cudaMemcpy(m->h_stage, m->a16.logits + i0, k * sizeof(bf16), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < k; i++) logits[i0 + i] = __bfloat162float(m->h_stage[i]);
    }
}
const RouterStats *model_router_stats(const Model *m) { return m->stats; }

void model_get_routing(const Model *m, int i, int32_t *expert, float *prob, uint8_t *kept) {
    int nm = n_moe_layers(&m->c), K = m->c.K, E = m->c.E;
    size_t BT = (size_t)m->B * m->T, BTK = BT * K;
    if (i < 0 || i >= nm) die("model_get_routing: MoE layer %d out of range [0, %d)", i, nm);
    if (!m->grads) die("model_get_routing: a model without an optimizer keeps one layer's activations, not each's");
    int l = (i + 1) * m->c.moe_every - 1, bf = m->precision == PRECISION_BF16;
    const int *top = bf ? m->a16.layer[l].top : m->a32.layer[l].top;
    const int *kp = bf ? m->a16.layer[l].kept : m->a32.layer[l].kept;
    const float *p = bf ? m->a16.layer[l].p : m->a32.layer[l].p;
    cudaCheck(cudaMemcpy(expert, top, BTK * sizeof(int32_t), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(m->h_ints, kp, BTK * sizeof(int), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(m->h_p, p, BT * E * sizeof(float), cudaMemcpyDeviceToHost));
    for (size_t j = 0; j < BTK; j++) {
        prob[j] = m->h_p[(j / K) * E + expert[j]];
        kept[j] = (uint8_t)m->h_ints[j];
    }
}

// ----------------------------------------------------------------------------
// forward

// the MoE sublayer im (0-based among MoE layers): moe_out (BT,D) = mid +
// MoE(RMSNorm(mid)). The router runs in fp32; the experts in X, each on its
// kept rows. Leaves the layer's lb and rz sums in m->sums and its routed/kept
// counts in m->stat_counts, for model_forward's router statistics.
template <typename X> static void moe_forward(Model *m, LayerActs<X> *a, const LayerParams *lp, int im, int BT) {
    const Config *c = &m->c;
    Acts<X> *A = acts<X>(m);
    int D = c->D, E = c->E, K = c->K, Fe = c->Fe;
    const X *WX = A->params_x;
    int *routed = m->stat_counts + (size_t)2 * im * E, *kept = routed + E;
    rmsnorm_forward(a->moe_in, a->rstd2, a->mid, param_f32(m, lp->mlp_norm), BT, D);
    router_forward(a->z, a->p, a->lse, a->top, a->moe_in, param_f32(m, lp->router), m->router_bias + (size_t)im * E, BT,
                   D, E, K);
    moe_capacity(a->kept, a->top, a->p, BT, K, E, &m->s, a->pos, a->count);
    a->R_pad = m->moe_exact ? 0 : moe_padded_rows(BT, K, E, &m->s);
    moe_rows(a->start, a->row_token, a->row_of, routed, kept, a->top, a->kept, BT, K, E, a->start_host, a->pos,
             a->count, &m->s, a->R_pad, a->goff);
    const int *start = a->start_host;
    moe_dispatch(a->xe, a->row_token, a->moe_in, start[E], D);
    if (a->R_pad > 0) {  // all experts in one batch of matmuls
        ffn_forward(a->ye, a->gue, a->he, a->xe, WX + lp->w_gate, WX + lp->w_up, WX + lp->w_down, a->R_pad, D, Fe,
                    0, E);
    } else {
        for (int e = 0; e < E; e++) {
            size_t r0 = start[e];
            int rows = start[e + 1] - start[e];
            ffn_forward(a->ye + r0 * D, a->gue + r0 * 3 * Fe, a->he + r0 * Fe, a->xe + r0 * D,
                        WX + lp->w_gate + (size_t)e * 2 * Fe * D, WX + lp->w_up + (size_t)e * Fe * D,
                        WX + lp->w_down + (size_t)e * D * Fe, rows, D, Fe, 0);
        }
    }
    moe_combine(a->moe_out, a->mid, a->ye, a->p, a->top, a->row_of, BT, K, E, D);
    moe_load_balance_forward(m->sums + 2 + 2 * im, a->lbf, a->p, a->top, BT, K, E, &m->s, a->lb_group);
    router_z_loss_sum(m->sums + 3 + 2 * im, a->lse, BT);
}

// the keys and values of qkv (T,3HHd), one sequence, into the cache kc, vc (T,HHd)
template <typename X> __global__ void kv_cache_fill_kernel(float *kc, float *vc, const X *qkv, int T, int HHd) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * HHd) return;
    size_t t = idx / HHd, i = idx % HHd;
    kc[idx] = to_float(qkv[t * 3 * HHd + HHd + i]);
    vc[idx] = to_float(qkv[t * 3 * HHd + 2 * HHd + i]);
}
template <typename X> static void kv_cache_fill(float *kc, float *vc, const X *qkv, int T, int HHd) {
    kv_cache_fill_kernel<X><<<ceil_div((size_t)T * HHd, 256), 256>>>(kc, vc, qkv, T, HHd);
    launchCheck();
}

// the layers and the final norm: A->lnf (BT,D) from the tokens m->x. With
// fill_cache (one sequence, B = 1), each layer's keys and values go to the KV
// cache at positions 0..T-1.
template <typename X> static void forward_layers(Model *m, int B, int T, int fill_cache) {
    const Config *c = &m->c;
    Acts<X> *A = acts<X>(m);
    int BT = B * T, D = c->D, H = c->H, Hd = c->Hd, HHd = H * Hd;
    const X *WX = A->params_x;
    const int *seg = m->has_segment ? m->segment : NULL, *pos = m->has_position ? m->position : NULL;
    if (m->params) encoder_forward(A->layer[0].in, m->x, m->params + m->table.wte, BT, D);
    else encoder_forward(A->layer[0].in, m->x, WX + m->table.wte, BT, D);  // a bf16 file's weights
    int im = 0;
    for (int l = 0; l < c->L; l++) {
        LayerActs<X> *a = &A->layer[l];
        const LayerParams *lp = &m->table.layer[l];
        float *out = l + 1 < c->L ? A->layer[l + 1].in : A->final_in;
        // mid = in + Attn(RMSNorm(in)): q, k, v in one matmul (wq, wk, wv are adjacent)
        rmsnorm_forward(a->ln1, a->rstd1, a->in, param_f32(m, lp->attn_norm), BT, D);
        matmul_forward(a->qkv, a->ln1, WX + lp->wq, BT, D, 3 * HHd, 3 * HHd, 0);
        rope_forward(a->qkv, m->rope_cos, m->rope_sin, pos, BT, T, H, Hd, 0, 1.0f);
        if (fill_cache)
            kv_cache_fill(m->kcache + (size_t)l * m->Tmax * HHd, m->vcache + (size_t)l * m->Tmax * HHd, a->qkv, T, HHd);
        if (m->flash) attention_forward_flash(a->atty, a->att_lse, a->qkv, seg, B, T, H, Hd);
        else attention_forward(a->atty, a->att, a->qkv, seg, B, T, H, Hd, A->scores);
        copy_floats(a->mid, a->in, (size_t)BT * D);  // the residual, then += atty Wo^T
        matmul_forward(a->mid, a->atty, WX + lp->wo, BT, HHd, D, D, 1);
        if (!lp->moe) {  // out = mid + FFN(RMSNorm(mid))
            rmsnorm_forward(a->ln2, a->rstd2, a->mid, param_f32(m, lp->mlp_norm), BT, D);
            copy_floats(out, a->mid, (size_t)BT * D);
            ffn_forward(out, a->gu, a->h, a->ln2, WX + lp->w_gate, WX + lp->w_up, WX + lp->w_down, BT, D, c->F, 1);
            continue;
        }
        // moe_out = mid + MoE(RMSNorm(mid)); then out = moe_out + FFN_extra(RMSNorm(moe_out))
        moe_forward(m, a, lp, im++, BT);
        if (c->extra_ffn) {
            rmsnorm_forward(a->ln3, a->rstd3, a->moe_out, param_f32(m, lp->extra_norm), BT, D);
            copy_floats(out, a->moe_out, (size_t)BT * D);
            ffn_forward(out, a->gux, a->hx, a->ln3, WX + lp->x_gate, WX + lp->x_up, WX + lp->x_down, BT, D, c->F, 1);
        }
    }
    rmsnorm_forward(A->lnf, A->rstdf, A->final_in, param_f32(m, m->table.final_norm), BT, D);
}

// the logits (BT,V) of the forward and its cross-entropy sums
template <typename X> static void forward_logits(Model *m, int BT) {
    Acts<X> *A = acts<X>(m);
    int D = m->c.D, V = m->c.V;
    matmul_forward(A->logits, A->lnf, A->params_x + m->table.lm_head, BT, D, V, V, 0);
    crossentropy_forward(m->sums, A->lse, A->logits, m->y, BT, V);
}

// the batch and settings of a forward, checked, kept and copied to the device
static void forward_begin(Model *m, const Batch *b, const MoeSettings *s) {
    forward_args_check(b->B, b->T, m->Bmax, m->Tmax, s);
    int BT = b->B * b->T;
    m->B = b->B;
    m->T = b->T;
    m->s = *s;
    m->has_targets = b->y != NULL;
    m->has_segment = b->segment != NULL;
    m->has_position = b->position != NULL;
    m->n_targets = forward_batch_copy(m->h_x, m->h_y, m->h_segment, m->h_position, b, m->c.V, m->Tmax);
    m->loss_targets = forward_loss_targets(b, m->n_targets);
    cudaCheck(cudaMemcpyAsync(m->x, m->h_x, BT * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpyAsync(m->y, m->h_y, BT * sizeof(int), cudaMemcpyHostToDevice));
    if (m->has_segment)
        cudaCheck(cudaMemcpyAsync(m->segment, m->h_segment, BT * sizeof(int), cudaMemcpyHostToDevice));
    if (m->has_position)
        cudaCheck(cudaMemcpyAsync(m->position, m->h_position, BT * sizeof(int), cudaMemcpyHostToDevice));
}

// the router statistics of the forward (model_router_stats) from the device's
// sums and counts, copied to the host here, after the whole forward: its one
// sync (in a MoE layer it would be one per layer). Returns the assignments dropped
static long forward_router_stats(Model *m) {
    int BT = m->B * m->T, K = m->c.K, E = m->c.E, nm = n_moe_layers(&m->c);
    cudaCheck(cudaMemcpy(m->h_sums, m->sums, (2 + 2 * (size_t)nm) * sizeof(double), cudaMemcpyDeviceToHost));
    if (nm > 0)
        cudaCheck(cudaMemcpy(m->stat_ints, m->stat_counts, (size_t)nm * 2 * E * sizeof(int), cudaMemcpyDeviceToHost));
    int P = group_first(BT, m->s.first_group), G = group_len(BT, m->s.group_size, P);
    return router_stats_from_sums(m->stats, m->h_sums + 2, nm, group_count(BT, G, P), BT, K, E);
}

void model_forward(Model *m, const Batch *batch, const MoeSettings *s, float *losses) {
    const Config *c = &m->c;
    int B = batch->B, T = batch->T;
    forward_begin(m, batch, s);
    if (m->precision == PRECISION_BF16) {
        forward_layers<bf16>(m, B, T, 0);
        forward_logits<bf16>(m, B * T);
    } else {
        forward_layers<float>(m, B, T, 0);
        forward_logits<float>(m, B * T);
    }
    m->has_logits = 1;
    long dropped = forward_router_stats(m);
    losses_from_sums(losses, m->h_sums[0], m->h_sums[1], m->loss_targets, m->stats, n_moe_layers(c), dropped,
                     (long)B * T * c->K, s);
}

// out (n) = inp (n) in fp32
template <typename X> __global__ void widen_kernel(float *out, const X *inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = to_float(inp[i]);
}

// the last position's logits: the first row of the logits buffer, in fp32 on the host
template <typename X> static const float *prefill_logits(Model *m, int T) {
    Acts<X> *A = acts<X>(m);
    int D = m->c.D, V = m->c.V;
    matmul_forward(A->logits, A->lnf + (size_t)(T - 1) * D, A->params_x + m->table.lm_head, 1, D, V, V, 0);
    widen_kernel<X><<<ceil_div(V, 256), 256>>>(m->t_logits, A->logits, V);
    launchCheck();
    cudaCheck(cudaMemcpy(m->h_logits, m->t_logits, V * sizeof(float), cudaMemcpyDeviceToHost));
    return m->h_logits;
}

const float *model_prefill(Model *m, const int32_t *x, int T, const MoeSettings *s) {
    Batch batch = {x, NULL, NULL, NULL, 1, T, 0.0};  // one segment at positions 0..T-1, as decode continues it
    forward_begin(m, &batch, s);
    const float *logits;
    if (m->precision == PRECISION_BF16) {
        forward_layers<bf16>(m, 1, T, 1);
        logits = prefill_logits<bf16>(m, T);
    } else {
        forward_layers<float>(m, 1, T, 1);
        logits = prefill_logits<float>(m, T);
    }
    m->has_logits = 0;
    forward_router_stats(m);
    return logits;
}

// ----------------------------------------------------------------------------
// backward. d_res carries the gradient of the residual stream from the top
// down (fp32; dres_x is its copy in X, written by each rmsnorm_backward for the
// matmuls that read it); each sublayer adds its input gradient through its RMSNorm.

// d_res holds d moe_out; adds the gradient through the MoE and its norm
template <typename X> static void moe_backward(Model *m, LayerActs<X> *a, const LayerParams *lp, int BT) {
    const Config *c = &m->c;
    Acts<X> *A = acts<X>(m);
    int D = c->D, E = c->E, K = c->K, Fe = c->Fe, nm = n_moe_layers(c);
    const float *W = m->params;
    const X *WX = A->params_x;
    float *G = m->grads;
    const int *start = a->start_host;  // each expert's rows, from the forward
    if (a->R_pad > 0)  // the padding rows' output gradients are 0
        cudaCheck(cudaMemsetAsync(A->dye, 0, (size_t)start[E] * D * sizeof(X)));
    moe_combine_backward(A->dye, A->dp, A->d_res, a->ye, a->p, a->top, a->row_of, BT, K, E, D);
    if (a->R_pad > 0) {
        ffn_backward(A->dxe, G + lp->w_gate, G + lp->w_up, G + lp->w_down, A->dye, a->xe, a->gue, a->he,
                     WX + lp->w_gate, WX + lp->w_up, WX + lp->w_down, a->R_pad, D, Fe, A->dgu, A->dh, E);
    } else {
        for (int e = 0; e < E; e++) {
            size_t r0 = start[e];
            int rows = start[e + 1] - start[e];
            size_t og = lp->w_gate + (size_t)e * 2 * Fe * D, ou = lp->w_up + (size_t)e * Fe * D,
                   od = lp->w_down + (size_t)e * D * Fe;
            ffn_backward(A->dxe + r0 * D, G + og, G + ou, G + od, A->dye + r0 * D, a->xe + r0 * D,
                         a->gue + r0 * 3 * Fe, a->he + r0 * Fe, WX + og, WX + ou, WX + od, rows, D, Fe, A->dgu, A->dh);
        }
    }
    // the router: combine weights, load balance and z-loss all act on p
    moe_load_balance_backward(A->dp, a->lbf, BT, E, &m->s, m->s.lb_coef / nm);
    router_backward(A->dp, a->p, a->lse, m->s.rz_coef / nm, BT, E);
    matmul_backward(A->d_ln, G + lp->router, A->dp, a->moe_in, W + lp->router, BT, D, E, E, 0);
    moe_dispatch_backward(A->d_ln, A->dxe, a->row_of, BT, K, D);
    rmsnorm_backward(A->d_res, G + lp->mlp_norm, A->d_ln, a->mid, W + lp->mlp_norm, a->rstd2, BT, D, A->dres_x,
                     A->dw_partial);
}

// encoder_backward's buckets, on the host: the positions of each distinct
// token, ascending (a counting sort by token id); returns the distinct tokens
static int encoder_buckets(Model *m, int BT) {
    int V = m->c.V, *cnt = m->h_bucket, U = 0;
    cudaCheck(cudaEventSynchronize(m->buckets_copied));  // the previous backward's copies
    memset(cnt, 0, (V + 1) * sizeof(int));
    for (int n = 0; n < BT; n++) cnt[m->h_x[n] + 1]++;
    for (int v = 0; v < V; v++) cnt[v + 1] += cnt[v];  // cnt[v] = first slot of token v
    for (int n = 0; n < BT; n++) m->h_order[cnt[m->h_x[n]]++] = n;  // cnt[v] ends at the slot after v's
    for (int j = 0; j < BT; j++)
        if (j == 0 || m->h_x[m->h_order[j]] != m->h_x[m->h_order[j - 1]]) m->h_ustart[U++] = j;
    m->h_ustart[U] = BT;
    return U;
}

template <typename X> static void backward_layers(Model *m) {
    const Config *c = &m->c;
    Acts<X> *A = acts<X>(m);
    int B = m->B, T = m->T, BT = B * T, D = c->D, H = c->H, Hd = c->Hd, HHd = H * Hd, V = c->V;
    const float *W = m->params;
    const X *WX = A->params_x;
    float *G = m->grads;
    const ParamTable *pt = &m->table;
    const int *seg = m->has_segment ? m->segment : NULL, *pos = m->has_position ? m->position : NULL;
    cudaCheck(cudaMemsetAsync(G, 0, pt->n_params * sizeof(float)));

    crossentropy_backward(A->dlogits, A->logits, A->lse, m->y, BT, V, (float)m->loss_targets, m->s.lz_coef);
    matmul_backward(A->d_ln, G + pt->lm_head, A->dlogits, A->lnf, WX + pt->lm_head, BT, D, V, V, 0);
    cudaCheck(cudaMemsetAsync(A->d_res, 0, (size_t)BT * D * sizeof(float)));
    rmsnorm_backward(A->d_res, G + pt->final_norm, A->d_ln, A->final_in, W + pt->final_norm, A->rstdf, BT, D,
                     A->dres_x, A->dw_partial);
    for (int l = c->L - 1; l >= 0; l--) {
        LayerActs<X> *a = &A->layer[l];
        const LayerParams *lp = &pt->layer[l];
        if (!lp->moe) {
            ffn_backward(A->d_ln, G + lp->w_gate, G + lp->w_up, G + lp->w_down, A->dres_x, a->ln2, a->gu, a->h,
                         WX + lp->w_gate, WX + lp->w_up, WX + lp->w_down, BT, D, c->F, A->dgu, A->dh);
            rmsnorm_backward(A->d_res, G + lp->mlp_norm, A->d_ln, a->mid, W + lp->mlp_norm, a->rstd2, BT, D,
                             A->dres_x, A->dw_partial);
        } else {
            if (c->extra_ffn) {
                ffn_backward(A->d_ln, G + lp->x_gate, G + lp->x_up, G + lp->x_down, A->dres_x, a->ln3, a->gux, a->hx,
                             WX + lp->x_gate, WX + lp->x_up, WX + lp->x_down, BT, D, c->F, A->dgu, A->dh);
                rmsnorm_backward(A->d_res, G + lp->extra_norm, A->d_ln, a->moe_out, W + lp->extra_norm, a->rstd3, BT,
                                 D, A->dres_x, A->dw_partial);
            }
            moe_backward(m, a, lp, BT);
        }
        // d_res now holds d mid; attention: mid = in + Wo attn(...)
        matmul_backward(A->datty, G + lp->wo, A->dres_x, a->atty, WX + lp->wo, BT, HHd, D, D, 0);
        if (m->flash)
            attention_backward_flash(A->dqkv, A->dvec, A->datty, a->atty, a->att_lse, a->qkv, seg, B, T, H, Hd);
        else attention_backward(A->dqkv, A->dscore, A->datty, a->att, a->qkv, B, T, H, Hd, A->scores);
        rope_backward(A->dqkv, m->rope_cos, m->rope_sin, pos, BT, T, H, Hd);
        matmul_backward(A->d_ln, G + lp->wq, A->dqkv, a->ln1, WX + lp->wq, BT, D, 3 * HHd, 3 * HHd, 0);
        rmsnorm_backward(A->d_res, G + lp->attn_norm, A->d_ln, a->in, W + lp->attn_norm, a->rstd1, BT, D, A->dres_x,
                         A->dw_partial);
    }
    // the host sorts the tokens while the GPU runs the layers above
    int U = encoder_buckets(m, BT);
    cudaCheck(cudaMemcpyAsync(A->order, m->h_order, BT * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpyAsync(A->ustart, m->h_ustart, (U + 1) * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaEventRecord(m->buckets_copied, 0));
    encoder_backward(G + pt->wte, A->d_res, m->x, BT, D, A->order, A->ustart, U);
}

void model_backward(Model *m) {
    if (!m->grads) die("model_backward: the model was created without an optimizer, so it has no gradients");
    if (!m->has_targets) die("model_backward: the last model_forward had no targets (y == NULL)");
    if (m->precision == PRECISION_BF16) backward_layers<bf16>(m);
    else backward_layers<float>(m);
}

// ----------------------------------------------------------------------------
// optimizers (formulas in openmoe.h, section 2). Sums of squares in double,
// in two fixed-order steps: per slice (blockIdx.y) nb partial sums over fixed
// chunks (blockIdx.x), then the partials in order.

// partial[s*nb + b] = sum of x^2 over chunk b of slice s (slices of n values, contiguous)
__global__ void sumsq_partial_kernel(double *partial, const float *x, size_t n, int nb) {
    int s = blockIdx.y, b = blockIdx.x;
    const float *xs = x + (size_t)s * n;
    size_t i0 = n * b / nb, i1 = n * (b + 1) / nb;
    double acc = 0.0;
    for (size_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) acc += (double)xs[i] * xs[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[(size_t)s * nb + b] = acc;
}
// sum of x^2 (n floats) in double: partial (partial_blocks(n) + 1) scratch; syncs, to return it
static double sum_squares(const float *x, size_t n, double *partial) {
    int nb = partial_blocks(n);
    sumsq_partial_kernel<<<dim3(nb, 1), 256>>>(partial, x, n, nb);
    launchCheck();
    sum_kernel<<<1, RED_THREADS>>>(partial + nb, partial, nb);
    launchCheck();
    double ss;
    cudaCheck(cudaMemcpy(&ss, partial + nb, sizeof(double), cudaMemcpyDeviceToHost));
    return ss;
}

// w, g, mom, vel (n); g is scaled by gscale (clipping); weight decay wd (0 for
// norm weights); wx (bf16 mode, else NULL) gets the new weights in bf16
__global__ void adamw_update_kernel(float *w, bf16 *wx, const float *g, float *mom, float *vel, size_t n, float lr,
                                    float beta1, float beta2, float b1c, float b2c, float eps, float wd, float gscale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * gscale;
    float mi = beta1 * mom[i] + (1.0f - beta1) * gi;
    float vi = beta2 * vel[i] + (1.0f - beta2) * gi * gi;
    mom[i] = mi;
    vel[i] = vi;
    float mhat = mi / b1c, vhat = vi / b2c, wi = w[i];
    wi -= lr * (mhat / (sqrtf(vhat) + eps) + wd * wi);
    w[i] = wi;
    if (wx) wx[i] = from_float<bf16>(wi);
}
static void adamw_update(float *w, const float *g, float *mom, float *vel, size_t n, const OptSettings *o, int t,
                         float gscale, int decay, bf16 *wx) {
    float b1c = 1.0f - powf(o->beta1, (float)t), b2c = 1.0f - powf(o->beta2, (float)t);
    adamw_update_kernel<<<ceil_div(n, 256), 256>>>(w, wx, g, mom, vel, n, o->lr, o->beta1, o->beta2, b1c, b2c, o->eps,
                                                   decay ? o->weight_decay : 0.0f, gscale);
    launchCheck();
}

// Adafactor, one tensor of S slices [rows, cols] at a time, slice s in blockIdx.y (or .z).
// state of slice s: factored r (rows) then c (cols) at state + s*(rows+cols); else v at state + s*rows*cols.

// scale[s] = lr * max(eps2, rms(w_s)), from the partial sums of w^2
__global__ void adafactor_scale_kernel(float *scale, const double *partial, int nb, size_t n, float lr, float eps2) {
    int s = blockIdx.x;
    if (threadIdx.x != 0) return;
    double ss = 0.0;
    for (int b = 0; b < nb; b++) ss += partial[(size_t)s * nb + b];
    scale[s] = lr * fmaxf(eps2, sqrtf((float)(ss / n)));
}

// r = beta r + (1-beta) rowmean(g^2 + eps1): one warp per row
__global__ void adafactor_rows_kernel(float *state, const float *g, int rows, int cols, float beta, float eps1) {
    int s = blockIdx.y, i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (i >= rows) return;
    const float *gs = g + (size_t)s * rows * cols + (size_t)i * cols;
    float *r = state + (size_t)s * (rows + cols);
    double acc = 0.0;
    for (int j = lane; j < cols; j += 32) acc += (double)gs[j] * gs[j] + eps1;
    acc = warp_sum(acc);
    if (lane == 0) r[i] = beta * r[i] + (1.0f - beta) * (float)(acc / cols);
}

// column sums of g^2 + eps1 over chunks of ADAFACTOR_COL_ROWS rows (blockIdx.y), slice blockIdx.z
__global__ void adafactor_cols_partial_kernel(double *partial, const float *g, int rows, int cols, float eps1) {
    int s = blockIdx.z, chunk = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x, n_chunks = gridDim.y;
    if (j >= cols) return;
    const float *gs = g + (size_t)s * rows * cols;
    int i0 = chunk * ADAFACTOR_COL_ROWS, i1 = i0 + ADAFACTOR_COL_ROWS < rows ? i0 + ADAFACTOR_COL_ROWS : rows;
    double acc = 0.0;
    for (int i = i0; i < i1; i++) acc += (double)gs[(size_t)i * cols + j] * gs[(size_t)i * cols + j] + eps1;
    partial[((size_t)s * n_chunks + chunk) * cols + j] = acc;
}
// c = beta c + (1-beta) colmean(g^2 + eps1)
__global__ void adafactor_cols_kernel(float *state, const double *partial, int n_chunks, int rows, int cols, float beta) {
    int s = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    double acc = 0.0;
    for (int ch = 0; ch < n_chunks; ch++) acc += partial[((size_t)s * n_chunks + ch) * cols + j];
    float *c = state + (size_t)s * (rows + cols) + rows;
    c[j] = beta * c[j] + (1.0f - beta) * (float)(acc / rows);
}
// rmean[s] = mean of r over the rows: one block per slice
__global__ void adafactor_rmean_kernel(double *rmean, const float *state, int rows, int cols) {
    int s = blockIdx.x;
    const float *r = state + (size_t)s * (rows + cols);
    double acc = 0.0;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) acc += r[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) rmean[s] = acc / rows;
}
// unfactored: v = beta v + (1-beta)(g^2 + eps1), all slices at once (n values)
__global__ void adafactor_v_kernel(float *v, const float *g, size_t n, float beta, float eps1) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) v[i] = beta * v[i] + (1.0f - beta) * (g[i] * g[i] + eps1);
}

// u = g / sqrt(second moment) of element k of slice s
__device__ __forceinline__ float adafactor_u(const float *g, const float *state, const double *rmean, int s, int rows,
                                             int cols, int factored, size_t k) {
    size_t n = (size_t)rows * cols;
    float gk = g[(size_t)s * n + k];
    if (!factored) return gk / sqrtf(state[(size_t)s * n + k]);
    const float *r = state + (size_t)s * (rows + cols), *c = r + rows;
    int i = (int)(k / cols), j = (int)(k % cols);
    return gk / sqrtf((float)(r[i] / rmean[s])) / sqrtf(c[j]);
}
// partial sums of u^2 (as sumsq_partial_kernel)
__global__ void adafactor_u_partial_kernel(double *partial, const float *g, const float *state, const double *rmean,
                                           int rows, int cols, int factored, int nb) {
    int s = blockIdx.y, b = blockIdx.x;
    size_t n = (size_t)rows * cols, k0 = n * b / nb, k1 = n * (b + 1) / nb;
    double acc = 0.0;
    for (size_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
        float u = adafactor_u(g, state, rmean, s, rows, cols, factored, k);
        acc += (double)u * u;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[(size_t)s * nb + b] = acc;
}
// clip[s] = max(1, rms(u) / clip_threshold)
__global__ void adafactor_clip_kernel(float *clip, const double *partial, int nb, size_t n, float clip_threshold) {
    int s = blockIdx.x;
    if (threadIdx.x != 0) return;
    double uu = 0.0;
    for (int b = 0; b < nb; b++) uu += partial[(size_t)s * nb + b];
    clip[s] = fmaxf(1.0f, (float)sqrt(uu / n) / clip_threshold);
}
// w -= scale * u / clip
__global__ void adafactor_apply_kernel(float *w, const float *g, const float *state, const double *rmean,
                                       const float *scale, const float *clip, int rows, int cols, int factored) {
    int s = blockIdx.y;
    size_t n = (size_t)rows * cols, k = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    float u = adafactor_u(g, state, rmean, s, rows, cols, factored, k);
    w[(size_t)s * n + k] -= scale[s] * (u / clip[s]);
}

// one tensor: S slices w, g (rows,cols) and their state; partial (opt_partial_size), scale, clip, rmean (S) scratch
static void adafactor_update(float *w, const float *g, float *state, int S, int rows, int cols, int factored,
                             const OptSettings *o, int t, double *partial, float *scale, float *clip, double *rmean) {
    size_t n = (size_t)rows * cols;
    int nb = partial_blocks(n);
    float beta = 1.0f - powf((float)t, -o->decay);
    sumsq_partial_kernel<<<dim3(nb, S), 256>>>(partial, w, n, nb);
    launchCheck();
    adafactor_scale_kernel<<<S, 32>>>(scale, partial, nb, n, o->lr, o->eps2);
    launchCheck();
    if (factored) {
        adafactor_rows_kernel<<<dim3(ceil_div(rows, 4), S), 128>>>(state, g, rows, cols, beta, o->eps1);
        launchCheck();
        int n_chunks = ceil_div(rows, ADAFACTOR_COL_ROWS);
        adafactor_cols_partial_kernel<<<dim3(ceil_div(cols, 128), n_chunks, S), 128>>>(partial, g, rows, cols, o->eps1);
        launchCheck();
        adafactor_cols_kernel<<<dim3(ceil_div(cols, 128), S), 128>>>(state, partial, n_chunks, rows, cols, beta);
        launchCheck();
        adafactor_rmean_kernel<<<S, 256>>>(rmean, state, rows, cols);
        launchCheck();
    } else {
        adafactor_v_kernel<<<ceil_div(n * S, 256), 256>>>(state, g, n * S, beta, o->eps1);
        launchCheck();
    }
    adafactor_u_partial_kernel<<<dim3(nb, S), 256>>>(partial, g, state, rmean, rows, cols, factored, nb);
    launchCheck();
    adafactor_clip_kernel<<<S, 32>>>(clip, partial, nb, n, o->clip_threshold);
    launchCheck();
    adafactor_apply_kernel<<<dim3(ceil_div(n, 256), S), 256>>>(w, g, state, rmean, scale, clip, rows, cols, factored);
    launchCheck();
}

float model_update(Model *m, const OptSettings *o, int t) {
    update_args_check(m->grads != NULL, m->opt_kind, m->opt_min_dim, o, t);
    const ParamTable *pt = &m->table;
    size_t n = pt->n_params;
    for (int i = 0; o->freeze_router && i < pt->n_tensors; i++)  // frozen routers: out of the norm
        if (is_router_tensor(&pt->tensors[i]))
            cudaCheck(cudaMemsetAsync(m->grads + pt->tensors[i].offset, 0,
                                      tensor_numel(&pt->tensors[i]) * sizeof(float)));
    float norm = (float)sqrt(sum_squares(m->grads, n, m->opt_partial));
    if (o->kind == OPT_ADAMW) {
        float gscale = o->grad_clip > 0.0f && norm > o->grad_clip ? o->grad_clip / norm : 1.0f;
        size_t lo = m->shard_lo;
        float *mom = m->opt_state, *vel = m->opt_state + (m->shard_hi - lo);  // the shard's m, then its v
        bf16 *wx = m->precision == PRECISION_BF16 ? m->a16.params_x : NULL;
        for (int i = 0; i < pt->n_tensors; i++) {
            const TensorInfo *ti = &pt->tensors[i];
            size_t off = ti->offset;
            if (off < lo || off >= m->shard_hi || (o->freeze_router && is_router_tensor(ti))) continue;
            adamw_update(m->params + off, m->grads + off, mom + (off - lo), vel + (off - lo), tensor_numel(ti), o, t,
                         gscale, ti->matrix, wx ? wx + off : NULL);
        }
        return norm;  // the bf16 weights were written by the update
    } else {
        float *state = m->opt_state;
        for (int i = 0; i < pt->n_tensors; i++) {
            const TensorInfo *ti = &pt->tensors[i];
            if (ti->offset < m->shard_lo || ti->offset >= m->shard_hi) continue;
            int factored = adafactor_factored(ti, o->min_dim);
            if (!(o->freeze_router && is_router_tensor(ti)))
                adafactor_update(m->params + ti->offset, m->grads + ti->offset, state, ti->slices, ti->rows, ti->cols,
                                 factored, o, t, m->opt_partial, m->opt_scale, m->opt_clip, m->opt_rmean);
            state += (size_t)ti->slices * (factored ? (size_t)ti->rows + ti->cols : (size_t)ti->rows * ti->cols);
        }
    }
    params_to_x(m);
    return norm;
}

void model_set_router_bias(Model *m, const float *bias) {
    size_t n = (size_t)n_moe_layers(&m->c) * m->c.E;
    cudaCheck(cudaMemcpy(m->router_bias, bias, n * sizeof(float), cudaMemcpyHostToDevice));
}
void model_get_router_bias(const Model *m, float *bias) {
    size_t n = (size_t)n_moe_layers(&m->c) * m->c.E;
    cudaCheck(cudaMemcpy(bias, m->router_bias, n * sizeof(float), cudaMemcpyDeviceToHost));
}

void model_get_opt_state(const Model *m, float *state) {
    if (!m->opt_state) die("model_get_opt_state: the model was created without an optimizer");
    cudaCheck(cudaMemcpy(state, m->opt_state, m->n_opt_state * sizeof(float), cudaMemcpyDeviceToHost));
}
void model_set_opt_state(Model *m, const float *state) {
    if (!m->opt_state) die("model_set_opt_state: the model was created without an optimizer");
    cudaCheck(cudaMemcpy(m->opt_state, state, m->n_opt_state * sizeof(float), cudaMemcpyHostToDevice));
}

// ----------------------------------------------------------------------------
// inference: one token at a time with a KV cache, in fp32, with the fp32
// master weights (in both precisions), or with the bf16 copy where that is
// all the model has (bf16 and int8 files): W, the weights' type, is float or
// bf16. Each step is the one-row version of the batched code above; the
// expert matrices are picked on the device (sel), so the only sync is the
// copy of the logits.

// out (OUT) = (or += with accumulate) w (OUT,IN) @ inp (IN), w advanced by
// sel[0] * sel_stride when sel is not NULL (an expert's slice): one warp per row
template <typename W>
__global__ void matvec_forward_kernel(float *out, const float *inp, const W *w, const int *sel, size_t sel_stride,
                                      int IN, int OUT, int accumulate) {
    int o = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (o >= OUT) return;
    if (sel) w += (size_t)sel[0] * sel_stride;
    const W *wo = w + (size_t)o * IN;
    float acc = 0.0f;
    for (int i = lane; i < IN; i += 32) acc += inp[i] * to_float(wo[i]);
    acc = warp_sum(acc);
    if (lane == 0) out[o] = accumulate ? out[o] + acc : acc;
}
template <typename W>
static void matvec_forward(float *out, const float *inp, const W *w, int IN, int OUT, int accumulate,
                           const int *sel = NULL, size_t sel_stride = 0) {
    matvec_forward_kernel<W><<<ceil_div(OUT, 8), 256>>>(out, inp, w, sel, sel_stride, IN, OUT, accumulate);
    launchCheck();
}

// one query per head (blockIdx.x) against the cached keys and values 0..pos
__global__ void attention_decode_kernel(float *out, float *att, const float *qkv, const float *kc, const float *vc,
                                        int pos, int H, int Hd, int Tmax) {
    int h = blockIdx.x, HHd = H * Hd;
    const float *q = qkv + (size_t)h * Hd;
    float *a = att + (size_t)h * Tmax;
    for (int s = threadIdx.x; s <= pos; s += blockDim.x) {
        const float *k = kc + (size_t)s * HHd + (size_t)h * Hd;
        float dot = 0.0f;
        for (int i = 0; i < Hd; i++) dot += q[i] * k[i];
        a[s] = dot;
    }
    __syncthreads();
    float maxs = -FLT_MAX;
    for (int s = threadIdx.x; s <= pos; s += blockDim.x) maxs = fmaxf(maxs, a[s]);
    maxs = block_max(maxs);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= pos; s += blockDim.x) sum += expf(a[s] - maxs);
    sum = block_sum(sum);
    float inv = 1.0f / sum;
    for (int s = threadIdx.x; s <= pos; s += blockDim.x) a[s] = expf(a[s] - maxs) * inv;  // each thread its own s
    __syncthreads();
    for (int i = threadIdx.x; i < Hd; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s <= pos; s++) acc += a[s] * vc[(size_t)s * HHd + (size_t)h * Hd + i];
        out[(size_t)h * Hd + i] = acc;
    }
}
// qkv (3HHd) of position pos, kc, vc (Tmax, HHd) -> out (HHd); att (H, Tmax) scratch
static void attention_decode(float *out, float *att, const float *qkv, const float *kc, const float *vc, int pos, int H,
                             int Hd, int Tmax) {
    attention_decode_kernel<<<H, 128>>>(out, att, qkv, kc, vc, pos, H, Hd, Tmax);
    launchCheck();
}

// router_row (openmoe.h) of one token on the device: z (E) -> p (E), lse, top (K)
static void router_token(float *p, float *lse, int *top, const float *z, const float *bias, int E, int K) {
    router_forward_kernel<<<1, 32>>>(p, lse, top, z, bias, 1, E, K);
    launchCheck();
}

// acc (D) = acc + p[top[0]] * y: one expert's weighted output
__global__ void moe_decode_accumulate_kernel(float *acc, const float *y, const float *p, const int *top, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < D) acc[i] = acc[i] + p[top[0]] * y[i];
}
static void moe_decode_accumulate(float *acc, const float *y, const float *p, const int *top, int D) {
    moe_decode_accumulate_kernel<<<ceil_div(D, 256), 256>>>(acc, y, p, top, D);
    launchCheck();
}

// one token's gated FFN: out (D) = (or += with accumulate) FFN(x); the weights of expert sel[0] when sel is not NULL
template <typename W>
static void ffn_token(Model *m, float *out, const float *x, const W *wg, const W *wu, const W *wd, int F,
                      int accumulate, const int *sel) {
    int D = m->c.D;
    if (!sel && wu == wg + 2 * (size_t)F * D) {
        matvec_forward(m->t_gu, x, wg, D, 3 * F, 0);
    } else {
        matvec_forward(m->t_gu, x, wg, D, 2 * F, 0, sel, (size_t)2 * F * D);
        matvec_forward(m->t_gu + 2 * F, x, wu, D, F, 0, sel, (size_t)F * D);
    }
    ffn_gate_kernel<float><<<ceil_div(F, 256), 256>>>(m->t_h, m->t_gu, 1, F);
    launchCheck();
    matvec_forward(out, m->t_h, wd, F, D, accumulate, sel, (size_t)D * F);
}

const int model_decode_bitwise = 0;  // cuBLAS sums the forward's products in its own order

// the token's logits into t_logits, the weight matrices read from WW (fp32 or bf16)
template <typename W> static void decode_token(Model *m, int token, int pos, const W *WW) {
    const Config *c = &m->c;
    int D = c->D, H = c->H, Hd = c->Hd, HHd = H * Hd, E = c->E, K = c->K, im = 0;
    const ParamTable *pt = &m->table;
    float *x = m->t_x, *xn = m->t_xn;
    widen_kernel<W><<<ceil_div(D, 256), 256>>>(x, WW + pt->wte + (size_t)token * D, D);  // the embedding's row
    launchCheck();
    for (int l = 0; l < c->L; l++) {
        const LayerParams *lp = &pt->layer[l];
        float *kc = m->kcache + (size_t)l * m->Tmax * HHd, *vc = m->vcache + (size_t)l * m->Tmax * HHd;
        rmsnorm_forward(xn, (float *)NULL, x, param_f32(m, lp->attn_norm), 1, D);
        matvec_forward(m->t_qkv, xn, WW + lp->wq, D, 3 * HHd, 0);  // q | k | v
        rope_forward(m->t_qkv, m->rope_cos, m->rope_sin, (const int *)NULL, 1, 1, H, Hd, pos, 1.0f);
        copy_floats(kc + (size_t)pos * HHd, m->t_qkv + HHd, HHd);
        copy_floats(vc + (size_t)pos * HHd, m->t_qkv + 2 * HHd, HHd);
        attention_decode(m->t_aty, m->t_att, m->t_qkv, kc, vc, pos, H, Hd, m->Tmax);
        matvec_forward(x, m->t_aty, WW + lp->wo, HHd, D, 1);  // x += Wo aty
        rmsnorm_forward(xn, (float *)NULL, x, param_f32(m, lp->mlp_norm), 1, D);
        if (!lp->moe) {
            ffn_token(m, x, xn, WW + lp->w_gate, WW + lp->w_up, WW + lp->w_down, c->F, 1, NULL);
            continue;
        }
        // a group of one token: capacity never binds, every choice is kept
        matvec_forward(m->t_z, xn, param_f32(m, lp->router), D, E, 0);
        router_token(m->t_p, m->t_lse, m->t_top, m->t_z, m->router_bias + (size_t)im++ * E, E, K);
        cudaCheck(cudaMemsetAsync(m->t_acc, 0, D * sizeof(float)));
        for (int r = 0; r < K; r++) {
            ffn_token(m, m->t_out, xn, WW + lp->w_gate, WW + lp->w_up, WW + lp->w_down, c->Fe, 0, m->t_top + r);
            moe_decode_accumulate(m->t_acc, m->t_out, m->t_p, m->t_top + r, D);
        }
        residual_forward(x, m->t_acc, x, D);
        if (c->extra_ffn) {
            rmsnorm_forward(xn, (float *)NULL, x, param_f32(m, lp->extra_norm), 1, D);
            ffn_token(m, x, xn, WW + lp->x_gate, WW + lp->x_up, WW + lp->x_down, c->F, 1, NULL);
        }
    }
    rmsnorm_forward(xn, (float *)NULL, x, param_f32(m, pt->final_norm), 1, D);
    matvec_forward(m->t_logits, xn, WW + pt->lm_head, D, c->V, 0);
}

const float *model_decode(Model *m, int token, int pos) {
    const Config *c = &m->c;
    if (token < 0 || token >= c->V) die("model_decode: token %d out of range [0, %d)", token, c->V);
    if (pos < 0 || pos >= m->Tmax) die("model_decode: position %d outside the model's [0, %d)", pos, m->Tmax);
    if (m->params) decode_token(m, token, pos, (const float *)m->params);
    else decode_token(m, token, pos, (const bf16 *)m->a16.params_x);  // a bf16 or int8 file's weights
    cudaCheck(cudaMemcpy(m->h_logits, m->t_logits, c->V * sizeof(float), cudaMemcpyDeviceToHost));
    return m->h_logits;
}

// ----------------------------------------------------------------------------
// data parallelism over NCCL (openmoe.h section 2; compiled with -DUSE_MPI):
// one GPU per rank, the ranks' local rank picks it; MPI only carries the
// NCCL id. Collectives run on the default stream, in order with the kernels.

#ifdef USE_MPI
#include <mpi.h>
#include <nccl.h>

static ncclComm_t dp_comm;
static int dp_ranks = 1;

static void ncclCheck(ncclResult_t r, const char *what) {
    if (r != ncclSuccess) die("%s failed: %s", what, ncclGetErrorString(r));
}

// NCCL picks each collective's algorithm and protocol from its size, the
// topology, its version's tuning tables and any tuner plugin, and each sums in
// its own order. dp_init pins the all-reduce to Ring and Simple, before any
// NCCL call reads them, so that the order is a function of the ranks, the
// topology and the buffer alone: reruns and resumed runs sum the gradients to
// the same bits. NCCL_ALGO or NCCL_PROTO set by the user win (faster choices
// exist on large clusters: Tree, NVLS).
void dp_init(int rank, int n_ranks, int local_rank) {
    if (setenv("NCCL_ALGO", "Ring", 0) != 0 || setenv("NCCL_PROTO", "Simple", 0) != 0)
        die("setenv of NCCL_ALGO, NCCL_PROTO failed: %s", strerror(errno));
    int n_dev;
    cudaCheck(cudaGetDeviceCount(&n_dev));
    cudaCheck(cudaSetDevice(local_rank % n_dev));
    ncclUniqueId id;
    if (rank == 0) ncclCheck(ncclGetUniqueId(&id), "ncclGetUniqueId");
    if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS) die("MPI_Bcast of the NCCL id failed");
    ncclCheck(ncclCommInitRank(&dp_comm, n_ranks, id, rank), "ncclCommInitRank");
    dp_ranks = n_ranks;
}

__global__ void scale_kernel(float *x, size_t n, float s) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// the sum over the ranks, then / n_ranks (see the CPU twin)
void model_grads_allreduce(Model *m) {
    size_t n = m->table.n_params;
    ncclCheck(ncclAllReduce(m->grads, m->grads, n, ncclFloat, ncclSum, dp_comm, 0), "ncclAllReduce");
    scale_kernel<<<(unsigned)((n + 255) / 256), 256>>>(m->grads, n, 1.0f / dp_ranks);
    launchCheck();
}

// each rank's shard broadcast from it, then the bf16 copy of all the weights
void model_params_allgather(Model *m, const size_t *shard) {
    ncclCheck(ncclGroupStart(), "ncclGroupStart");
    for (int r = 0; r < dp_ranks; r++)
        ncclCheck(ncclBroadcast(m->params + shard[r], m->params + shard[r], shard[r + 1] - shard[r], ncclFloat, r,
                                dp_comm, 0), "ncclBroadcast");
    ncclCheck(ncclGroupEnd(), "ncclGroupEnd");
    params_to_x(m);
}
#endif

// ----------------------------------------------------------------------------
// flash attention (bf16 mode): the same causal attention without the (T,T)
// matrices. A block owns 64 query rows (forward, dq) or 64 key rows (dk, dv)
// of one (batch, head); tiles of 64 keys or queries stream through shared
// memory, the next tile's loads in flight (in registers) while the current
// one is used; the products run on tensor cores (WMMA, bf16 in, fp32 out)
// from shared memory, and the softmax is done in fp32 on the stored scores
// (no reliance on WMMA's register layout). Warp w of 4 owns rows 16w..16w+15
// of its block's 64. The forward keeps the running max and sum of each row
// (online softmax; two lanes per row) and stores lse = max + log(sum); the
// backward recomputes P = exp(S - lse) and has two kernels, so that no two
// blocks add to the same gradient (no atomics: deterministic): one per key
// tile for dk, dv (over the query tiles that see it), one per query tile for
// dq; their accumulators stay in registers (WMMA fragments) across the loop.

#define FA_TILE 64     // query and key rows per tile
#define FA_THREADS 128 // 4 warps

// the shared-memory layout of the flash kernels for head width HD: NT bf16
// tiles of head rows (q, k, v, dout), NS fp32 score tiles (S, dP), NP bf16
// score tiles (P, dS), NO fp32 accumulators (out), 2 per-row vectors. Row
// strides are padded (fewer bank conflicts) and keep WMMA's rules: 32-byte
// aligned tiles, strides a multiple of 8 (bf16) or 4 (fp32).
template <int HD, int NT, int NS, int NP, int NO> struct FlashSmem {
    static const int LDH = HD + 8;       // bf16 tiles of head rows
    static const int LDS = FA_TILE + 4;  // fp32 score tiles
    static const int LDP = FA_TILE + 8;  // bf16 score tiles
    static const int LDO = HD + 4;       // fp32 accumulators
    bf16 *t[NT];
    float *s[NS];
    bf16 *p[NP];
    float *o[NO > 0 ? NO : 1];
    float *row[2];
    __host__ __device__ static size_t bytes() {
        return NT * (size_t)FA_TILE * LDH * 2 + NS * (size_t)FA_TILE * LDS * 4 + NP * (size_t)FA_TILE * LDP * 2 +
               NO * (size_t)FA_TILE * LDO * 4 + 2 * (size_t)FA_TILE * 4;
    }
    __device__ FlashSmem(char *base) {
        char *q = base;
        for (int i = 0; i < NT; i++, q += (size_t)FA_TILE * LDH * 2) t[i] = (bf16 *)q;
        for (int i = 0; i < NS; i++, q += (size_t)FA_TILE * LDS * 4) s[i] = (float *)q;
        for (int i = 0; i < NP; i++, q += (size_t)FA_TILE * LDP * 2) p[i] = (bf16 *)q;
        for (int i = 0; i < NO; i++, q += (size_t)FA_TILE * LDO * 4) o[i] = (float *)q;
        for (int i = 0; i < 2; i++, q += (size_t)FA_TILE * 4) row[i] = (float *)q;
    }
};
// each kernel's layout. The backward kernels stage their register
// accumulators through the two score tiles at the end (64 rows at stride LDO fit there).
template <int HD> struct FlashFwd : FlashSmem<HD, 3, 1, 1, 1> {  // q, k, v; S; P; out
    __device__ FlashFwd(char *b) : FlashSmem<HD, 3, 1, 1, 1>(b) {}
};
template <int HD> struct FlashDkv : FlashSmem<HD, 4, 2, 2, 0> {  // q, dout, k, v; S, dP; P, dS
    __device__ FlashDkv(char *b) : FlashSmem<HD, 4, 2, 2, 0>(b) {}
    static_assert(2 * (FA_TILE + 4) >= HD + 4, "the score tiles hold the staged accumulators");
};
template <int HD> struct FlashDq : FlashSmem<HD, 4, 2, 1, 0> {  // q, dout, k, v; S, dP; dS
    __device__ FlashDq(char *b) : FlashSmem<HD, 4, 2, 1, 0>(b) {}
};
// the strides, the same in every layout
template <int HD> struct FlashLd : FlashSmem<HD, 1, 1, 1, 1> {};

// a tile (64 rows, HD bf16) in flight: each thread's HD/16 pieces of 16 bytes
template <int HD> struct FlashTileRegs {
    static const int N = FA_TILE * HD / 8 / FA_THREADS;
    uint4 v[N];
};
// regs = rows r0..r0+63 of src (row stride ld), zero past row T: the loads only, so they overlap the work after
template <int HD> __device__ void flash_fetch_tile(FlashTileRegs<HD> &regs, const bf16 *src, int ld, int r0, int T) {
    const int per_row = HD / 8;
#pragma unroll
    for (int i = 0; i < FlashTileRegs<HD>::N; i++) {
        int idx = threadIdx.x + i * FA_THREADS, r = idx / per_row, c = (idx % per_row) * 8;
        uint4 v = {0, 0, 0, 0};
        if (r0 + r < T) v = *(const uint4 *)(src + (size_t)(r0 + r) * ld + c);
        regs.v[i] = v;
    }
}
// dst (64, HD; stride LDH) = the fetched tile
template <int HD> __device__ void flash_put_tile(bf16 *dst, const FlashTileRegs<HD> &regs) {
    const int per_row = HD / 8;
#pragma unroll
    for (int i = 0; i < FlashTileRegs<HD>::N; i++) {
        int idx = threadIdx.x + i * FA_THREADS, r = idx / per_row, c = (idx % per_row) * 8;
        *(uint4 *)(dst + r * FlashLd<HD>::LDH + c) = regs.v[i];
    }
}

// acc (NC fragments: the warp's 16 rows, 16 NC columns) += A (16, K) @ B (K, 16 NC).
// A: row-major a[r*lda + k], or transposed (A_T: A(r,k) = a[k*lda + r]).
// B: row-major b[k*ldb + n], or transposed (B_T: B(k,n) = b[n*ldb + k]).
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> FlashAcc;
template <int K, int NC, bool A_T, bool B_T>
__device__ void flash_mma_acc(FlashAcc *acc, const bf16 *a, int lda, const bf16 *b, int ldb) {
    using namespace nvcuda;
    typedef typename std::conditional<A_T, wmma::col_major, wmma::row_major>::type LA;
    typedef typename std::conditional<B_T, wmma::col_major, wmma::row_major>::type LB;
    for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> fa;
        wmma::load_matrix_sync(fa, A_T ? a + (size_t)k * lda : a + k, lda);
        for (int j = 0; j < NC; j++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> fb;
            wmma::load_matrix_sync(fb, B_T ? b + (size_t)j * 16 * ldb + k : b + (size_t)k * ldb + j * 16, ldb);
            wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
    }
}
// the same product into shared memory: C (fp32, stride ldc) = (or += with accumulate) A @ B
template <int K, int NC, bool A_T, bool B_T>
__device__ void flash_mma(float *c, int ldc, const bf16 *a, int lda, const bf16 *b, int ldb, bool accumulate) {
    using namespace nvcuda;
    FlashAcc acc[NC];
    for (int j = 0; j < NC; j++) {
        if (accumulate) wmma::load_matrix_sync(acc[j], c + j * 16, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(acc[j], 0.0f);
    }
    flash_mma_acc<K, NC, A_T, B_T>(acc, a, lda, b, ldb);
    for (int j = 0; j < NC; j++) wmma::store_matrix_sync(c + j * 16, acc[j], ldc, wmma::mem_row_major);
}

// out (B,T,HHd) and lse (B,H,T) from qkv (B,T,3HHd), the keys of each query
// those at or before it in its segment (seg (B,T); NULL: one per row): block
// (query tile, b*H + h)
template <int HD>
__global__ void attention_forward_flash_kernel(bf16 *out, float *lse, const bf16 *qkv, const int *seg, int T, int H) {
    typedef FlashFwd<HD> L;
    DYNAMIC_SMEM(smem);
    L sm(smem);
    bf16 *sQ = sm.t[0], *sK = sm.t[1], *sV = sm.t[2], *sP = sm.p[0];
    float *sS = sm.s[0], *sO = sm.o[0], *sMax = sm.row[0], *sSum = sm.row[1];
    int bh = blockIdx.y, b = bh / H, h = bh % H, HHd = H * HD, ld = 3 * HHd, q0 = blockIdx.x * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;
    const bf16 *q = qkv + (size_t)b * T * ld + (size_t)h * HD, *k = q + HHd, *v = q + 2 * HHd;
    const int *sg = seg ? seg + (size_t)b * T : NULL;
    FlashTileRegs<HD> nk, nv;  // the next key tile, in flight
    flash_fetch_tile<HD>(nk, q, ld, q0, T);
    flash_put_tile<HD>(sQ, nk);
    flash_fetch_tile<HD>(nk, k, ld, 0, T);
    flash_fetch_tile<HD>(nv, v, ld, 0, T);
    for (int i = threadIdx.x; i < FA_TILE * L::LDO; i += blockDim.x) sO[i] = 0.0f;
    for (int i = threadIdx.x; i < FA_TILE; i += blockDim.x) {
        sMax[i] = -INFINITY;
        sSum[i] = 0.0f;
    }
    // the softmax's share of each lane: row r (two lanes per row), every other column from `half`
    int r = r0 + lane / 2, half = lane % 2, t = q0 + r, seg_t = sg && t < T ? sg[t] : 0;
    int last = (q0 + FA_TILE < T ? q0 + FA_TILE : T) - 1;  // the last key any row of the tile sees
    for (int k0 = 0; k0 <= last; k0 += FA_TILE) {
        __syncthreads();  // the previous tiles are consumed
        flash_put_tile<HD>(sK, nk);
        flash_put_tile<HD>(sV, nv);
        __syncthreads();
        if (k0 + FA_TILE <= last) {
            flash_fetch_tile<HD>(nk, k, ld, k0 + FA_TILE, T);
            flash_fetch_tile<HD>(nv, v, ld, k0 + FA_TILE, T);
        }
        // S (the warp's 16 rows, 64 keys) = q k^T
        flash_mma<HD, FA_TILE / 16, false, true>(sS + r0 * L::LDS, L::LDS, sQ + r0 * L::LDH, L::LDH, sK, L::LDH, false);
        __syncwarp();
        // online softmax of row r: the new max, P = exp(S - max), out and sum rescaled
        float *sr = sS + r * L::LDS, mx = -INFINITY;
        for (int c = half; c < FA_TILE; c += 2) {
            int s = k0 + c;
            float x = s <= t && s < T && (!sg || sg[s] == seg_t) ? sr[c] : -INFINITY;
            sr[c] = x;
            mx = fmaxf(mx, x);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        // m_new is -inf while no key of the row's segment has come (never without segments: key 0 is in the first tile)
        float m_old = sMax[r], m_new = fmaxf(m_old, mx), sum = 0.0f;
        for (int c = half; c < FA_TILE; c += 2) {
            float pv = sr[c] == -INFINITY ? 0.0f : expf(sr[c] - m_new);
            sP[r * L::LDP + c] = from_float<bf16>(pv);
            sum += pv;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        float scale = m_new == -INFINITY ? 1.0f : expf(m_old - m_new);  // 0 at the row's first key (m_old = -inf)
        for (int i = half; i < HD; i += 2) sO[r * L::LDO + i] *= scale;
        __syncwarp();  // both lanes of the row have read sMax[r] and sSum[r]
        if (half == 0) {
            sMax[r] = m_new;
            sSum[r] = sSum[r] * scale + sum;
        }
        __syncwarp();
        // out (the warp's rows) += P v
        flash_mma<FA_TILE, HD / 16, false, false>(sO + r0 * L::LDO, L::LDO, sP + r0 * L::LDP, L::LDP, sV, L::LDH, true);
    }
    __syncwarp();
    for (int rr = r0; rr < r0 + 16; rr++) {
        int tt = q0 + rr;
        if (tt >= T) break;
        float inv = 1.0f / sSum[rr];
        for (int i = lane; i < HD; i += 32)
            out[((size_t)b * T + tt) * HHd + (size_t)h * HD + i] = from_float<bf16>(sO[rr * L::LDO + i] * inv);
        if (lane == 0) lse[(size_t)bh * T + tt] = sMax[rr] + logf(sSum[rr]);
    }
}

// dvec (B,H,T) = rowsum(dout * out) per head: one warp per (token, head)
__global__ void attention_backward_dot_kernel(float *dvec, const bf16 *dout, const bf16 *out, int BT, int T, int H,
                                              int Hd) {
    int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (w >= BT * H) return;
    int n = w / H, h = w % H, b = n / T, t = n % T;
    const bf16 *d = dout + (size_t)n * H * Hd + (size_t)h * Hd, *o = out + (size_t)n * H * Hd + (size_t)h * Hd;
    float s = 0.0f;
    for (int i = lane; i < Hd; i += 32) s += to_float(d[i]) * to_float(o[i]);
    s = warp_sum(s);
    if (lane == 0) dvec[((size_t)b * H + h) * T + t] = s;
}

// the backward's shared step for one (query tile, key tile) pair, on the warp's
// 16 query rows: S = q k^T, P = exp(S - lse) where t sees s (s <= t in t's
// segment, sg the row's segments or NULL; fp32, in sS), dP = dout v^T (sdP),
// dS = P (dP - dvec) -> sdS (bf16); P -> sP (bf16) when sP
template <int HD>
__device__ void flash_backward_scores(float *sS, float *sdP, bf16 *sP, bf16 *sdS, const bf16 *sQ, const bf16 *sdO,
                                      const bf16 *sK, const bf16 *sV, const float *sLse, const float *sDvec,
                                      const int *sg, int q0, int k0, int T) {
    typedef FlashLd<HD> L;
    int lane = threadIdx.x % 32, r0 = (threadIdx.x / 32) * 16;
    flash_mma<HD, FA_TILE / 16, false, true>(sS + r0 * L::LDS, L::LDS, sQ + r0 * L::LDH, L::LDH, sK, L::LDH, false);
    flash_mma<HD, FA_TILE / 16, false, true>(sdP + r0 * L::LDS, L::LDS, sdO + r0 * L::LDH, L::LDH, sV, L::LDH, false);
    __syncwarp();
    for (int r = r0; r < r0 + 16; r++) {
        int t = q0 + r;
        for (int c = lane; c < FA_TILE; c += 32) {
            int s = k0 + c;
            float pv = s <= t && t < T && (!sg || sg[s] == sg[t]) ? expf(sS[r * L::LDS + c] - sLse[r]) : 0.0f;
            if (sP) sP[r * L::LDP + c] = from_float<bf16>(pv);
            sdS[r * L::LDP + c] = from_float<bf16>(pv * (sdP[r * L::LDS + c] - sDvec[r]));
        }
    }
}

// the block's 64 rows of a register accumulator (each warp its 16 rows, HD
// columns) -> bf16 rows t0.. of dst (row stride ld), staged in stage (fp32, stride LDO)
template <int HD> __device__ void flash_store_acc(bf16 *dst, int ld, const FlashAcc *acc, float *stage, int t0, int T) {
    const int LDO = FlashLd<HD>::LDO;
    int r0 = (threadIdx.x / 32) * 16;
    __syncthreads();  // every warp is done with the staging area's earlier use
    for (int j = 0; j < HD / 16; j++)
        nvcuda::wmma::store_matrix_sync(stage + r0 * LDO + j * 16, acc[j], LDO, nvcuda::wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < FA_TILE * HD; idx += blockDim.x) {
        int r = idx / HD, i = idx % HD;
        if (t0 + r < T) dst[(size_t)(t0 + r) * ld + i] = from_float<bf16>(stage[r * LDO + i]);
    }
}

// lse and dvec of query rows q0..q0+63 in flight: thread i < 64 holds row q0 + i's
__device__ void flash_fetch_rows(float *l, float *d, const float *lse, const float *dvec, int q0, int T) {
    int i = threadIdx.x;
    *l = i < FA_TILE && q0 + i < T ? lse[q0 + i] : 0.0f;
    *d = i < FA_TILE && q0 + i < T ? dvec[q0 + i] : 0.0f;
}

// dk, dv of one key tile (blockIdx.x) of (b, h) = blockIdx.y, over the query tiles that see it
template <int HD>
__global__ void attention_backward_flash_dkv_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse,
                                                    const float *dvec, const int *seg, int T, int H) {
    typedef FlashDkv<HD> L;
    DYNAMIC_SMEM(smem);
    L sm(smem);
    bf16 *sQ = sm.t[0], *sdO = sm.t[1], *sK = sm.t[2], *sV = sm.t[3], *sP = sm.p[0], *sdS = sm.p[1];
    float *sS = sm.s[0], *sdP = sm.s[1], *sLse = sm.row[0], *sDvec = sm.row[1];
    int bh = blockIdx.y, b = bh / H, h = bh % H, HHd = H * HD, ld = 3 * HHd, k0 = blockIdx.x * FA_TILE;
    int r0 = (threadIdx.x / 32) * 16;
    const bf16 *q = qkv + (size_t)b * T * ld + (size_t)h * HD, *dy = dout + (size_t)b * T * HHd + (size_t)h * HD;
    const int *sg = seg ? seg + (size_t)b * T : NULL;
    const float *lse_bh = lse + (size_t)bh * T, *dvec_bh = dvec + (size_t)bh * T;
    FlashTileRegs<HD> nq, ndo;  // the next query tile, in flight
    float nl, nd;
    flash_fetch_tile<HD>(nq, q + HHd, ld, k0, T);
    flash_put_tile<HD>(sK, nq);
    flash_fetch_tile<HD>(nq, q + 2 * HHd, ld, k0, T);
    flash_put_tile<HD>(sV, nq);
    flash_fetch_tile<HD>(nq, q, ld, k0, T);
    flash_fetch_tile<HD>(ndo, dy, HHd, k0, T);
    flash_fetch_rows(&nl, &nd, lse_bh, dvec_bh, k0, T);
    FlashAcc dk[HD / 16], dv[HD / 16];  // the warp's 16 key rows
    for (int j = 0; j < HD / 16; j++) {
        nvcuda::wmma::fill_fragment(dk[j], 0.0f);
        nvcuda::wmma::fill_fragment(dv[j], 0.0f);
    }
    for (int q0 = k0; q0 < T; q0 += FA_TILE) {  // queries before k0 do not see these keys
        __syncthreads();
        flash_put_tile<HD>(sQ, nq);
        flash_put_tile<HD>(sdO, ndo);
        if (threadIdx.x < FA_TILE) {
            sLse[threadIdx.x] = nl;
            sDvec[threadIdx.x] = nd;
        }
        __syncthreads();
        if (q0 + FA_TILE < T) {
            flash_fetch_tile<HD>(nq, q, ld, q0 + FA_TILE, T);
            flash_fetch_tile<HD>(ndo, dy, HHd, q0 + FA_TILE, T);
            flash_fetch_rows(&nl, &nd, lse_bh, dvec_bh, q0 + FA_TILE, T);
        }
        flash_backward_scores<HD>(sS, sdP, sP, sdS, sQ, sdO, sK, sV, sLse, sDvec, sg, q0, k0, T);
        __syncthreads();  // dk, dv need every warp's rows of P and dS
        // the warp's 16 key rows: dv += P^T dout, dk += dS^T q
        flash_mma_acc<FA_TILE, HD / 16, true, false>(dv, sP + r0, L::LDP, sdO, L::LDH);
        flash_mma_acc<FA_TILE, HD / 16, true, false>(dk, sdS + r0, L::LDP, sQ, L::LDH);
    }
    bf16 *dq = dqkv + (size_t)b * T * ld + (size_t)h * HD;
    flash_store_acc<HD>(dq + HHd, ld, dk, sS, k0, T);
    flash_store_acc<HD>(dq + 2 * HHd, ld, dv, sS, k0, T);
}

// dq of one query tile (blockIdx.x) of (b, h) = blockIdx.y, over the key tiles it sees
template <int HD>
__global__ void attention_backward_flash_dq_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse,
                                                   const float *dvec, const int *seg, int T, int H) {
    typedef FlashDq<HD> L;
    DYNAMIC_SMEM(smem);
    L sm(smem);
    bf16 *sQ = sm.t[0], *sdO = sm.t[1], *sK = sm.t[2], *sV = sm.t[3], *sdS = sm.p[0];
    float *sS = sm.s[0], *sdP = sm.s[1], *sLse = sm.row[0], *sDvec = sm.row[1];
    int bh = blockIdx.y, b = bh / H, h = bh % H, HHd = H * HD, ld = 3 * HHd, q0 = blockIdx.x * FA_TILE;
    int r0 = (threadIdx.x / 32) * 16;
    const bf16 *q = qkv + (size_t)b * T * ld + (size_t)h * HD, *dy = dout + (size_t)b * T * HHd + (size_t)h * HD;
    const int *sg = seg ? seg + (size_t)b * T : NULL;
    FlashTileRegs<HD> nk, nv;  // the next key tile, in flight
    float nl, nd;
    flash_fetch_tile<HD>(nk, q, ld, q0, T);
    flash_put_tile<HD>(sQ, nk);
    flash_fetch_tile<HD>(nk, dy, HHd, q0, T);
    flash_put_tile<HD>(sdO, nk);
    flash_fetch_rows(&nl, &nd, lse + (size_t)bh * T, dvec + (size_t)bh * T, q0, T);
    if (threadIdx.x < FA_TILE) {
        sLse[threadIdx.x] = nl;
        sDvec[threadIdx.x] = nd;
    }
    flash_fetch_tile<HD>(nk, q + HHd, ld, 0, T);
    flash_fetch_tile<HD>(nv, q + 2 * HHd, ld, 0, T);
    FlashAcc dq[HD / 16];  // the warp's 16 query rows
    for (int j = 0; j < HD / 16; j++) nvcuda::wmma::fill_fragment(dq[j], 0.0f);
    int last = (q0 + FA_TILE < T ? q0 + FA_TILE : T) - 1;
    for (int k0 = 0; k0 <= last; k0 += FA_TILE) {
        __syncthreads();
        flash_put_tile<HD>(sK, nk);
        flash_put_tile<HD>(sV, nv);
        __syncthreads();
        if (k0 + FA_TILE <= last) {
            flash_fetch_tile<HD>(nk, q + HHd, ld, k0 + FA_TILE, T);
            flash_fetch_tile<HD>(nv, q + 2 * HHd, ld, k0 + FA_TILE, T);
        }
        flash_backward_scores<HD>(sS, sdP, NULL, sdS, sQ, sdO, sK, sV, sLse, sDvec, sg, q0, k0, T);
        __syncwarp();
        // the warp's 16 query rows: dq += dS k
        flash_mma_acc<FA_TILE, HD / 16, false, false>(dq, sdS + r0 * L::LDP, L::LDP, sK, L::LDH);
    }
    flash_store_acc<HD>(dqkv + (size_t)b * T * ld + (size_t)h * HD, ld, dq, sS, q0, T);
}

template <int HD> static void flash_set_smem(void) {
    cudaCheck(cudaFuncSetAttribute(attention_forward_flash_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)FlashFwd<HD>::bytes()));
    cudaCheck(cudaFuncSetAttribute(attention_backward_flash_dkv_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)FlashDkv<HD>::bytes()));
    cudaCheck(cudaFuncSetAttribute(attention_backward_flash_dq_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)FlashDq<HD>::bytes()));
}
// the largest shared memory the flash kernels of head width HD need
template <int HD> static size_t flash_smem_bytes_hd(void) {
    size_t f = FlashFwd<HD>::bytes(), kv = FlashDkv<HD>::bytes(), q = FlashDq<HD>::bytes();
    return f > kv ? (f > q ? f : q) : (kv > q ? kv : q);
}
template <int HD>
static void attention_forward_flash_hd(bf16 *out, float *lse, const bf16 *qkv, const int *seg, int B, int T, int H) {
    dim3 grid(ceil_div(T, FA_TILE), B * H);
    attention_forward_flash_kernel<HD><<<grid, FA_THREADS, FlashFwd<HD>::bytes()>>>(out, lse, qkv, seg, T, H);
    launchCheck();
}
template <int HD>
static void attention_backward_flash_hd(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse,
                                        const float *dvec, const int *seg, int B, int T, int H) {
    dim3 grid(ceil_div(T, FA_TILE), B * H);
    attention_backward_flash_dkv_kernel<HD><<<grid, FA_THREADS, FlashDkv<HD>::bytes()>>>(dqkv, dout, qkv, lse, dvec,
                                                                                         seg, T, H);
    launchCheck();
    attention_backward_flash_dq_kernel<HD><<<grid, FA_THREADS, FlashDq<HD>::bytes()>>>(dqkv, dout, qkv, lse, dvec,
                                                                                       seg, T, H);
    launchCheck();
}

// The head widths with flash kernels, the one place that lists them (WMMA: a
// multiple of 16; one warp's lanes span <= 128 columns): calls
// f(std::integral_constant<int, HD>()) for HD = Hd and returns 1, or returns
// 0 when Hd has no kernels.
template <typename F> static int flash_head_width(int Hd, F f) {
    switch (Hd) {
    case 16: f(std::integral_constant<int, 16>()); return 1;
    case 32: f(std::integral_constant<int, 32>()); return 1;
    case 64: f(std::integral_constant<int, 64>()); return 1;
    case 128: f(std::integral_constant<int, 128>()); return 1;
    default: return 0;
    }
}
template <typename F> static void flash_dispatch(int Hd, F f) {
    if (!flash_head_width(Hd, f)) die("flash attention: head width %d not supported", Hd);
}

static int flash_supported(int Hd) {
    return flash_head_width(Hd, [](auto) {});
}
static size_t flash_smem_bytes(int Hd) {
    size_t bytes = 0;
    flash_dispatch(Hd, [&](auto hd) { bytes = flash_smem_bytes_hd<decltype(hd)::value>(); });
    return bytes;
}
static void flash_init(int Hd) {
    flash_dispatch(Hd, [](auto hd) { flash_set_smem<decltype(hd)::value>(); });
}

// qkv (BT,3HHd), seg (BT) or NULL -> out (BT,HHd), lse (B,H,T)
static void attention_forward_flash(bf16 *out, float *lse, const bf16 *qkv, const int *seg, int B, int T, int H,
                                    int Hd) {
    flash_dispatch(Hd, [&](auto hd) { attention_forward_flash_hd<decltype(hd)::value>(out, lse, qkv, seg, B, T, H); });
}
static void attention_forward_flash(float *, float *, const float *, const int *, int, int, int, int) {
    die("flash attention runs in bf16 mode only");
}

// dout (BT,HHd) -> dqkv (BT,3HHd), overwritten; out, lse from the forward; dvec (B,H,T) scratch
static void attention_backward_flash(bf16 *dqkv, float *dvec, const bf16 *dout, const bf16 *out, const float *lse,
                                     const bf16 *qkv, const int *seg, int B, int T, int H, int Hd) {
    int BT = B * T;
    attention_backward_dot_kernel<<<ceil_div((size_t)BT * H, 4), 128>>>(dvec, dout, out, BT, T, H, Hd);
    launchCheck();
    flash_dispatch(Hd, [&](auto hd) {
        attention_backward_flash_hd<decltype(hd)::value>(dqkv, dout, qkv, lse, dvec, seg, B, T, H);
    });
}
static void attention_backward_flash(float *, float *, const float *, const float *, const float *, const float *,
                                     const int *, int, int, int, int) {
    die("flash attention runs in bf16 mode only");
}
