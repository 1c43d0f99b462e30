// cuda_emu.h: just enough of CUDA and cuBLAS, on the CPU, to run openmoe.cu's
// kernels where there is no GPU. dev/cuda_emu/build.sh turns openmoe.cu into
// C++ (each `kernel<<<grid, block>>>(args)` becomes emu_launch(...)) and
// compiles it with this header, so that test/test_model.c can check the CUDA
// backend's logic and indexing against the PyTorch reference cases on any machine.
//
// Semantics kept: every CUDA thread is a fiber (ucontext); the threads of a
// block share the kernel's __shared__ arrays (static locals: blocks run one
// after another); __syncthreads is a barrier of the block's live threads;
// __shfl_xor_sync exchanges values within a warp of 32 (a barrier of the
// warp). Device memory is host memory. cuBLAS GEMMs are the BLAS definition
// (column-major, op(A) op(B), leading dimensions, batch strides), with the
// argument checks cuBLAS does, accumulating in fp32. bf16 is rounded to
// nearest even as on the GPU. Not emulated: timing, streams, atomics, and
// the GPU's exact float results (fma contraction, cuBLAS summation order).
#pragma once
#include <ucontext.h>
#include <setjmp.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <cfloat>
#include <functional>
#include <vector>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
// dynamic shared memory (openmoe.cu declares it with DYNAMIC_SMEM): one buffer, blocks run one at a time
alignas(256) static char emu_dynamic_smem[232448];
#define DYNAMIC_SMEM(name) char *name = emu_dynamic_smem
struct uint4 {
    unsigned x, y, z, w;
};

// ----------------------------------------------------------------------------
// bf16

struct __nv_bfloat16 {
    uint16_t bits;
};
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
        b.bits = (uint16_t)((u >> 16) | 0x40);
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    b.bits = (uint16_t)(u >> 16);
    return b;
}
static inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// ----------------------------------------------------------------------------
// threads as fibers

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct emu_uint3 {
    unsigned x, y, z;
};
static emu_uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

enum { EMU_STACK = 128 * 1024, EMU_MAX_THREADS = 1024 };
// a fiber starts with makecontext/swapcontext, then switches with
// _setjmp/_longjmp (no signal-mask system call per switch)
struct EmuFiber {
    ucontext_t ctx;
    jmp_buf jmp;
    char *stack;
    int done, started;
};
static EmuFiber emu_fiber[EMU_MAX_THREADS];
static jmp_buf emu_main;
static int emu_cur, emu_nthreads, emu_live, emu_arrived;
static long emu_gen;
static int emu_warp_live[EMU_MAX_THREADS / 32], emu_warp_arrived[EMU_MAX_THREADS / 32];
static long emu_warp_gen[EMU_MAX_THREADS / 32];
static double emu_shfl[EMU_MAX_THREADS / 32][32];
static const std::function<void()> *emu_body;

static inline void emu_yield() {
    if (!_setjmp(emu_fiber[emu_cur].jmp)) _longjmp(emu_main, 1);
}

static inline void __syncthreads() {
    long g = emu_gen;
    if (++emu_arrived == emu_live) {
        emu_arrived = 0;
        emu_gen++;
        return;
    }
    while (emu_gen == g) emu_yield();
}
static inline void emu_warp_sync(int w) {
    long g = emu_warp_gen[w];
    if (++emu_warp_arrived[w] == emu_warp_live[w]) {
        emu_warp_arrived[w] = 0;
        emu_warp_gen[w]++;
        return;
    }
    while (emu_warp_gen[w] == g) emu_yield();
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int o) {
    (void)mask;
    int t = emu_cur, w = t / 32, lane = t % 32;
    if (blockDim.x * blockDim.y * blockDim.z % 32) {
        fprintf(stderr, "cuda_emu: a shuffle in a block of %u threads (not whole warps)\n", blockDim.x);
        abort();
    }
    static_assert(sizeof(T) <= sizeof(double), "shuffle of a type wider than 8 bytes");
    memcpy(&emu_shfl[w][lane], &v, sizeof(T));
    emu_warp_sync(w);
    T r;
    memcpy(&r, &emu_shfl[w][lane ^ o], sizeof(T));
    emu_warp_sync(w);
    return r;
}

static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    (void)mask;
    emu_warp_sync(emu_cur / 32);
}

static void emu_thread_exit(int t) {  // a thread returned: barriers wait for one fewer
    emu_fiber[t].done = 1;
    emu_live--;
    if (emu_arrived > 0 && emu_arrived == emu_live) {
        emu_arrived = 0;
        emu_gen++;
    }
    int w = t / 32;
    emu_warp_live[w]--;
    if (emu_warp_arrived[w] > 0 && emu_warp_arrived[w] == emu_warp_live[w]) {
        emu_warp_arrived[w] = 0;
        emu_warp_gen[w]++;
    }
}
static void emu_entry() {
    (*emu_body)();
    emu_thread_exit(emu_cur);
    _longjmp(emu_main, 1);  // never returns
}
static inline void emu_set_thread(int t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

// the threads per block of a launch, which must be one a GPU would accept
static int emu_check_launch(dim3 grid, dim3 block) {
    int n = (int)(block.x * block.y * block.z);
    if (n <= 0 || n > EMU_MAX_THREADS || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535) {
        fprintf(stderr, "cuda_emu: invalid launch grid (%u,%u,%u) block (%u,%u,%u)\n", grid.x, grid.y, grid.z, block.x,
                block.y, block.z);
        abort();
    }
    return n;
}

static void emu_launch(dim3 grid, dim3 block, const std::function<void()> &body) {
    int n = emu_check_launch(grid, block);
    gridDim = grid;
    blockDim = block;
    emu_body = &body;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx.x = bx;
                blockIdx.y = by;
                blockIdx.z = bz;
                emu_nthreads = emu_live = n;
                emu_arrived = 0;
                for (int w = 0; w < (n + 31) / 32; w++) {
                    emu_warp_live[w] = n - 32 * w < 32 ? n - 32 * w : 32;
                    emu_warp_arrived[w] = 0;
                }
                for (int t = 0; t < n; t++) {
                    EmuFiber *f = &emu_fiber[t];
                    if (!f->stack) f->stack = (char *)malloc(EMU_STACK);
                    getcontext(&f->ctx);
                    f->ctx.uc_stack.ss_sp = f->stack;
                    f->ctx.uc_stack.ss_size = EMU_STACK;
                    f->ctx.uc_link = NULL;
                    makecontext(&f->ctx, emu_entry, 0);
                    f->done = f->started = 0;
                }
                while (emu_live > 0) {
                    for (int t = 0; t < n; t++) {
                        EmuFiber *f = &emu_fiber[t];
                        if (f->done) continue;
                        emu_cur = t;
                        emu_set_thread(t);
                        if (!_setjmp(emu_main)) {
                            if (f->started) _longjmp(f->jmp, 1);
                            f->started = 1;
                            ucontext_t unused;
                            swapcontext(&unused, &f->ctx);
                        }
                    }
                }
            }
}

// a kernel without barriers or shuffles (translate.py checks): each thread runs to its end in turn
static void emu_launch_simple(dim3 grid, dim3 block, const std::function<void()> &body) {
    int n = emu_check_launch(grid, block);
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx.x = bx;
                blockIdx.y = by;
                blockIdx.z = bz;
                for (int t = 0; t < n; t++) {
                    emu_cur = t;
                    emu_set_thread(t);
                    body();
                }
            }
}

// ----------------------------------------------------------------------------
// the runtime

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
typedef int cudaMemcpyKind;
enum { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
typedef void *cudaStream_t;
typedef int *cudaEvent_t;
enum { cudaEventDisableTiming = 2 };
static inline const char *cudaGetErrorString(cudaError_t e) { return e ? "emulated error" : "no error"; }
static inline cudaError_t cudaGetLastError() { return cudaSuccess; }
static inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDevice(int *d) {
    *d = 0;
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr, int) {
    *v = 232448;  // an H100's 227 KB
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
template <typename K> static inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int bytes) {
    return bytes <= (int)sizeof(emu_dynamic_smem) ? cudaSuccess : 1;
}
template <typename T> static inline cudaError_t cudaMalloc(T **p, size_t n) {
    *p = (T *)malloc(n ? n : 1);
    if (!*p) return cudaErrorMemoryAllocation;
    memset((void *)*p, 0xA5, n);  // garbage, as fresh device memory
    return cudaSuccess;
}
template <typename T> static inline cudaError_t cudaMallocHost(T **p, size_t n) { return cudaMalloc(p, n); }
static inline cudaError_t cudaFree(void *p) {
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaFreeHost(void *p) { return cudaFree(p); }
static inline cudaError_t cudaMemset(void *p, int v, size_t n) {
    memset(p, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t = 0) { return cudaMemset(p, v, n); }
static inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind) {
    memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t = 0) {
    return cudaMemcpy(d, s, n, k);
}
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) {
    *e = (int *)malloc(sizeof(int));
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = 0) { return cudaSuccess; }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    free(e);
    return cudaSuccess;
}

// ----------------------------------------------------------------------------
// cuBLAS: the GEMMs, from the BLAS definition

typedef int cublasStatus_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
typedef struct EmuCublas *cublasHandle_t;
typedef int cublasOperation_t;
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
typedef int cudaDataType_t;
enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
typedef int cublasComputeType_t;
enum { CUBLAS_COMPUTE_32F = 68 };
typedef int cublasGemmAlgo_t;
enum { CUBLAS_GEMM_DEFAULT = -1 };
typedef int cublasMath_t;
enum { CUBLAS_DEFAULT_MATH = 0 };

static inline const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_INVALID_VALUE ? "CUBLAS_STATUS_INVALID_VALUE (emulated)" : "cuBLAS error (emulated)";
}
static inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = NULL;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasDestroy(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void *, size_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }

static inline float emu_load(const void *p, cudaDataType_t t, size_t i) {
    return t == CUDA_R_32F ? ((const float *)p)[i] : __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
static inline void emu_store(void *p, cudaDataType_t t, size_t i, float v) {
    if (t == CUDA_R_32F) ((float *)p)[i] = v;
    else ((__nv_bfloat16 *)p)[i] = __float2bfloat16(v);
}

static cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                 int n, int k, const void *alpha, const void *A, cudaDataType_t at,
                                                 int lda, long long sA, const void *B, cudaDataType_t bt, int ldb,
                                                 long long sB, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                                 long long sC, int batch, cublasComputeType_t comp, cublasGemmAlgo_t) {
    // the checks cuBLAS makes (cublasGemmEx documentation)
    if (m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (lda < (ta == CUBLAS_OP_N ? (m > 1 ? m : 1) : (k > 1 ? k : 1))) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb < (tb == CUBLAS_OP_N ? (k > 1 ? k : 1) : (n > 1 ? n : 1))) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc < (m > 1 ? m : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    if (comp != CUBLAS_COMPUTE_32F || at != bt) return CUBLAS_STATUS_NOT_SUPPORTED;
    float al = *(const float *)alpha, be = *(const float *)beta;
    size_t ea = at == CUDA_R_32F ? 4 : 2, ec = ct == CUDA_R_32F ? 4 : 2;
    for (int b = 0; b < batch; b++) {
        const char *Ab = (const char *)A + (size_t)(b * sA) * ea, *Bb = (const char *)B + (size_t)(b * sB) * ea;
        char *Cb = (char *)C + (size_t)(b * sC) * ec;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                float acc = 0.0f;
                for (int p = 0; p < k; p++) {
                    // op(A)(i,p): A is m x k (N) or stored k x m (T); op(B)(p,j): B is k x n (N) or stored n x k (T)
                    float a = emu_load(Ab, at, ta == CUBLAS_OP_N ? (size_t)i + (size_t)p * lda : (size_t)p + (size_t)i * lda);
                    float bv = emu_load(Bb, bt, tb == CUBLAS_OP_N ? (size_t)p + (size_t)j * ldb : (size_t)j + (size_t)p * ldb);
                    acc += a * bv;
                }
                size_t ic = (size_t)i + (size_t)j * ldc;
                float c = al * acc + (be == 0.0f ? 0.0f : be * emu_load(Cb, ct, ic));  // beta 0: C is not read
                emu_store(Cb, ct, ic, c);
            }
    }
    return CUBLAS_STATUS_SUCCESS;
}
static cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void *alpha, const void *A, cudaDataType_t at, int lda, const void *B,
                                   cudaDataType_t bt, int ldb, const void *beta, void *C, cudaDataType_t ct, int ldc,
                                   cublasComputeType_t comp, cublasGemmAlgo_t algo) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1,
                                      comp, algo);
}

// ----------------------------------------------------------------------------
// WMMA (mma.h), 16x16x16 tiles. Every lane holds the whole tile (the real
// layout is opaque, so layout-independent code cannot tell); loads and stores
// are warp-collective as on the GPU: a warp barrier before a store (every lane
// has read what it may overwrite) and after it (nobody reads a half-stored tile).

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: 16x16x16 tiles only");
    float v[256];  // element (r, c) at r*16 + c
};
static inline float emu_wmma_load(const float *p, size_t i) { return p[i]; }
static inline float emu_wmma_load(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
template <typename Use, int M, int N, int K, typename T, typename L>
static inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, float x) {
    for (int i = 0; i < 256; i++) f.v[i] = x;
}
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const P *p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load needs a layout");
    const int col = std::is_same<L, col_major>::value;
    if (((uintptr_t)p) % 32 || ldm % (16 / sizeof(P))) {
        fprintf(stderr, "cuda_emu: wmma load from %p with ldm %u: needs 32-byte alignment and ldm a multiple of %zu\n",
                (const void *)p, ldm, 16 / sizeof(P));
        abort();
    }
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
            f.v[r * 16 + c] = emu_wmma_load(p, col ? (size_t)r + (size_t)c * ldm : (size_t)r * ldm + c);
    __syncwarp();
}
template <int M, int N, int K>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, float> &f, const float *p, unsigned ldm,
                                    layout_t layout) {
    if (((uintptr_t)p) % 32 || ldm % 4) {
        fprintf(stderr, "cuda_emu: wmma accumulator load from %p with ldm %u\n", (const void *)p, ldm);
        abort();
    }
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
            f.v[r * 16 + c] = p[layout == mem_col_major ? (size_t)r + (size_t)c * ldm : (size_t)r * ldm + c];
    __syncwarp();
}
template <int M, int N, int K>
static inline void store_matrix_sync(float *p, const fragment<accumulator, M, N, K, float> &f, unsigned ldm,
                                     layout_t layout) {
    if (((uintptr_t)p) % 32 || ldm % 4) {
        fprintf(stderr, "cuda_emu: wmma store to %p with ldm %u\n", (void *)p, ldm);
        abort();
    }
    __syncwarp();
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) p[layout == mem_col_major ? (size_t)r + (size_t)c * ldm : (size_t)r * ldm + c] = f.v[r * 16 + c];
    __syncwarp();
}
template <typename TA, typename LA, typename TB, typename LB>
static inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
                            const fragment<matrix_b, 16, 16, 16, TB, LB> &b,
                            const fragment<accumulator, 16, 16, 16, float> &c) {
    float out[256];
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 16; n++) {
            float acc = c.v[r * 16 + n];
            for (int k = 0; k < 16; k++) acc += a.v[r * 16 + k] * b.v[k * 16 + n];
            out[r * 16 + n] = acc;
        }
    memcpy(d.v, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
