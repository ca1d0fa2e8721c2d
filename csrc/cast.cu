// The float32 -> 16-bit rounding after the kernels that accumulate into a float32 workspace (the decode
// kernel's split-K sum, the skinny U = X·Aᵀ): round to nearest even, as torch's .to(dtype) does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

extern "C" __global__ void fastpeft_cast_f32_f16(const float *__restrict__ in, __half *__restrict__ out,
                                                 long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    out[i] = __float2half_rn(in[i]);
}

extern "C" __global__ void fastpeft_cast_f32_bf16(const float *__restrict__ in, __nv_bfloat16 *__restrict__ out,
                                                  long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}
