/* fastpeft_kernels: fastpeft's Triton kernels compiled ahead of time, as a C library.
 *
 * The binaries are cubins for sm_80 (A100 and the other 8.x GPUs) and sm_90a (H100, H200), built by
 * fastpeft's compile gate from the same kernel sources the Python package runs. Each function launches on
 * `stream` and returns a CUresult; nothing is synchronized. The CUDA driver (libcuda.so.1) is loaded at run
 * time: the library links without it.
 *
 * Conventions for every function:
 *   - Call it with the stream's CUDA context current (the runtime API's cudaSetDevice does that for the
 *     device's primary context). The first call in a context loads the binaries it needs and copies 1.5 KB of
 *     tables to the device (synchronously): make it before capturing a CUDA graph.
 *   - Pointers are device pointers, 16-byte aligned (cudaMalloc gives 256), to contiguous row-major data.
 *   - Sizes are element counts. Every weight of an NF4 matrix [N, K] is addressed with 32-bit indices, so
 *     N*K < 2^31.
 *   - Errors: CUDA_ERROR_INVALID_VALUE for an argument outside this contract, CUDA_ERROR_NO_DEVICE when
 *     libcuda.so.1 cannot be loaded, CUDA_ERROR_INVALID_CONTEXT without a current context,
 *     CUDA_ERROR_NO_BINARY_FOR_GPU on a GPU that is neither compute capability 8.x nor 9.0,
 *     CUDA_ERROR_NOT_FOUND when the library was built without a kernel the call needs, otherwise the
 *     driver's own error.
 *   - Thread-safe.
 */
#ifndef FASTPEFT_KERNELS_H
#define FASTPEFT_KERNELS_H

#include <cuda.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FASTPEFT_API
#else
#define FASTPEFT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of a floating-point tensor. */
typedef enum {
  FASTPEFT_FLOAT32 = 0,
  FASTPEFT_FLOAT16 = 1,
  FASTPEFT_BFLOAT16 = 2
} fastpeft_dtype;

/* A weight quantized to NF4 in bitsandbytes' layout (what transformers saves as P.weight, P.weight.absmax,
 * P.weight.nested_absmax, ... for a "bnb-4bit" checkpoint, quant_type "nf4").
 *
 * The weight [N, K] is flattened row-major and cut into blocks of `blocksize` consecutive elements.
 *   packed           uint8 [(N*K + 1) / 2]: two 4-bit codes per byte, the even element in the high nibble;
 *                    the code indexes the NF4 codebook (the library's own copy: custom code maps are not
 *                    supported).
 *   absmax           the scale of each block: float32 [ceil(N*K / blocksize)], or with double quantization
 *                    uint8 codes of the same count.
 *   nested_absmax    double quantization only: float32 [ceil(n_blocks / 256)], one per 256 blocks.
 *   offset           double quantization only: float32 [1], the mean absmax added back.
 *   nested_quant_map double quantization only: float32 [256], the 8-bit code values, or NULL for
 *                    bitsandbytes' signed dynamic map (what every bitsandbytes checkpoint holds).
 *   blocksize        64, 128, 256, 512, 1024, 2048 or 4096.
 *   double_quant     0 or 1.
 * Dequantized: absmax_b = nested_quant_map[absmax[b]] * nested_absmax[b / 256] + offset (double
 * quantization), w_i = NF4[code_i] * absmax_b.
 */
typedef struct {
  const void *packed;
  const void *absmax;
  const float *nested_absmax;
  const float *offset;
  const float *nested_quant_map;
  int blocksize;
  int double_quant;
} fastpeft_nf4_weight;

/* out[0:numel] = the dequantized weight in `out_dtype` (float32, float16 or bfloat16), computed in float32
 * and rounded once; the bytes fastpeft.kernels.nf4.nf4_dequantize writes.
 * numel: elements of the weight (N*K), 1 <= numel < 2^31. */
FASTPEFT_API CUresult fastpeft_nf4_dequantize(CUstream stream, const fastpeft_nf4_weight *weight, int64_t numel,
                                              fastpeft_dtype out_dtype, void *out);

/* The NF4 + LoRA linear forward, fastpeft.kernels.lora_linear.lora_linear_fwd with an NF4 base:
 *
 *   y = x · dequant(W)ᵀ + bias + scaling · (x · Aᵀ) · Bᵀ
 *
 *   dtype    float16 or bfloat16: the type of x, bias, A, B and y; accumulation is float32.
 *   M, N, K  x is [M, K] (tokens x in-features), W is [N, K] (out-features x in-features), y is [M, N].
 *   x        [M, K]. weight: the NF4 W. bias: [N] or NULL.
 *   R        LoRA rank; 0 for no LoRA term (then lora_a and lora_b may be NULL).
 *   lora_a   A [R, K] (PEFT's lora_A.weight). lora_b: B [N, R] (lora_B.weight). scaling: s (lora_alpha / r,
 *            or lora_alpha / sqrt(r) for rsLoRA).
 *   y        [M, N], written.
 *   workspace, workspace_bytes: device scratch of at least fastpeft_nf4_lora_linear_workspace_bytes(...)
 *            bytes, 16-byte aligned; overwritten; may be reused once the call's work on `stream` is done.
 *
 * Paths, picked by shape as the Python launcher picks them: M <= 64 with K % 64 == 0 runs the decode kernel
 * (W decoded in registers, split over K into a float32 workspace, then rounded to dtype); other shapes
 * dequantize W into the workspace and run the tiled tensor-core GEMM with the LoRA term in its epilogue.
 * U = x · Aᵀ is computed first (float32, rounded to dtype). */
FASTPEFT_API CUresult fastpeft_nf4_lora_linear_forward(CUstream stream, fastpeft_dtype dtype, int64_t M, int64_t N,
                                                       int64_t K, const void *x, const fastpeft_nf4_weight *weight,
                                                       const void *bias, int64_t R, const void *lora_a,
                                                       const void *lora_b, float scaling, void *y, void *workspace,
                                                       size_t workspace_bytes);

/* Workspace bytes fastpeft_nf4_lora_linear_forward needs for these sizes (0 for sizes it refuses):
 * 4*M*R + 2*M*R for U, plus 4*M*N (decode path) or 2*N*K (dequantized W), each rounded up to 256 bytes. */
FASTPEFT_API size_t fastpeft_nf4_lora_linear_workspace_bytes(fastpeft_dtype dtype, int64_t M, int64_t N, int64_t K,
                                                             int64_t R);

/* Unloads the binaries and frees the tables of the current context (call before destroying it, if the
 * process goes on to create other contexts). */
FASTPEFT_API CUresult fastpeft_kernels_release(void);

/* Introspection, for tests and tools: the embedded binaries. fastpeft_kernels_binary gives binary `index`'s
 * compile-gate case name (or, for the C helper kernels, their source), its SM architecture (80 or 90, the
 * latter built for sm_90a) and its bytes; it returns 0, or -1 for an index out of range. */
FASTPEFT_API int fastpeft_kernels_binary_count(void);
FASTPEFT_API int fastpeft_kernels_binary(int index, const char **name, int *arch, const void **data, size_t *size);

#ifdef __cplusplus
}
#endif

#endif /* FASTPEFT_KERNELS_H */
