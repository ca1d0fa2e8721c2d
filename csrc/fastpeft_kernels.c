/* The library's entry points: validate the arguments, pick the path and the kernel variant, launch.
 *
 * The launch rules (grids, split-K counts, tile choices) mirror the Python launchers they are named after;
 * a change there must be made here too (the GPU ctest compares both). The kernels' parameter orders come
 * from the generated fastpeft_kernels_params.h: a renamed parameter fails to compile, and the static
 * assertions below fail when a kernel gains or loses one. */
#include <string.h>

#include "fastpeft_internal.h"

#define FP_ALIGNED(ptr) (((uintptr_t)(ptr) & 15u) == 0)
#define FP_BAD(cond) \
  if (cond) return CUDA_ERROR_INVALID_VALUE

static const int64_t FP_I32_LIMIT = 2147483647;

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}
static inline size_t round256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }
static inline int dtype_bytes(int dtype) { return dtype == FASTPEFT_FLOAT32 ? 4 : 2; }

/* log2(blocksize) for a supported blocksize, else -1 */
static int blocksize_shift(int blocksize) {
  for (int s = 6; s <= 12; s++)
    if (blocksize == 1 << s) return s;
  return -1;
}

static CUresult check_weight(const fastpeft_nf4_weight *w) {
  FP_BAD(!w || !w->packed || !w->absmax || !FP_ALIGNED(w->packed) || !FP_ALIGNED(w->absmax));
  FP_BAD(blocksize_shift(w->blocksize) < 0 || (w->double_quant != 0 && w->double_quant != 1));
  if (w->double_quant) {
    FP_BAD(!w->nested_absmax || !w->offset || !FP_ALIGNED(w->nested_absmax) || !FP_ALIGNED(w->offset));
    FP_BAD(w->nested_quant_map && !FP_ALIGNED(w->nested_quant_map));
  }
  return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ */
/* NF4 dequantize: fastpeft.kernels.nf4.nf4_dequantize                                              */
/* ------------------------------------------------------------------------------------------------ */

#ifdef FP_DEQUANT_PRESENT
_Static_assert(FP_DEQUANT_NPARAMS == 10, "_nf4_dequantize_kernel's parameters changed: update dequantize()");
#endif

static CUresult dequantize(fp_state *st, CUstream stream, const fastpeft_nf4_weight *w, int64_t numel, int dtype,
                           CUdeviceptr out) {
#ifndef FP_DEQUANT_PRESENT
  (void)st, (void)stream, (void)w, (void)numel, (void)dtype, (void)out;
  return CUDA_ERROR_NOT_FOUND;
#else
  fp_arg a[FP_DEQUANT_NPARAMS];
  CUdeviceptr absmax = (CUdeviceptr)w->absmax;
  a[FP_DEQUANT_q_ptr].p = (CUdeviceptr)w->packed;
  a[FP_DEQUANT_absmax_ptr].p = absmax;
  a[FP_DEQUANT_code_ptr].p = st->consts + FP_CONST_NF4_CODE; /* 64-byte aligned: the kernel ORs the index in */
  a[FP_DEQUANT_out_ptr].p = out;
  if (w->double_quant) {
    a[FP_DEQUANT_qmap_ptr].p =
        w->nested_quant_map ? (CUdeviceptr)w->nested_quant_map : st->consts + FP_CONST_DYNAMIC_MAP;
    a[FP_DEQUANT_nested_absmax_ptr].p = (CUdeviceptr)w->nested_absmax;
    a[FP_DEQUANT_offset_ptr].p = (CUdeviceptr)w->offset;
  } else { /* unread placeholders of the signature's type, as the Python launcher passes */
    a[FP_DEQUANT_qmap_ptr].p = a[FP_DEQUANT_nested_absmax_ptr].p = a[FP_DEQUANT_offset_ptr].p = absmax;
  }
  a[FP_DEQUANT_numel].i = numel;
  a[FP_DEQUANT_n_bytes].i = (numel + 1) / 2;
  a[FP_DEQUANT_blocksize_shift].i = blocksize_shift(w->blocksize);
  const fp_variant *v = fp_select(st, FP_FAMILY_DEQUANT, dtype, w->double_quant, -1, -1, a, FP_DEQUANT_NPARAMS);
  if (!v) return CUDA_ERROR_NOT_FOUND;
  /* one program per 2 * BLOCK weights, at most 32 per SM (nf4._dequantize_programs; each strides over the rest) */
  int64_t grid = min64(cdiv(numel, 2 * (int64_t)v->block), 32 * (int64_t)st->sms);
  return fp_launch(st, v, a, (unsigned)grid, 1, 1, stream);
#endif
}

CUresult fastpeft_nf4_dequantize(CUstream stream, const fastpeft_nf4_weight *weight, int64_t numel,
                                 fastpeft_dtype out_dtype, void *out) {
  CUresult r = check_weight(weight);
  if (r != CUDA_SUCCESS) return r;
  FP_BAD(numel < 1 || numel > FP_I32_LIMIT || !out || !FP_ALIGNED(out));
  FP_BAD(out_dtype != FASTPEFT_FLOAT32 && out_dtype != FASTPEFT_FLOAT16 && out_dtype != FASTPEFT_BFLOAT16);
  fp_state *st;
  if ((r = fp_current(&st)) != CUDA_SUCCESS) return r;
  return dequantize(st, stream, weight, numel, out_dtype, (CUdeviceptr)out);
}

/* ------------------------------------------------------------------------------------------------ */
/* NF4 + LoRA forward: fastpeft.kernels.lora_linear.lora_linear_fwd                                 */
/* ------------------------------------------------------------------------------------------------ */

#define FP_DECODE_M_MAX 64 /* lora_linear_decode.DECODE_M_MAX */
#define FP_DECODE_K_STEP 64 /* its BLOCK_K: every absmax block lies inside one row */

static int takes_decode(int64_t M, int64_t K) { return M <= FP_DECODE_M_MAX && K % FP_DECODE_K_STEP == 0; }

/* Workspace layout: U float32 [M, R], U in dtype [M, R], then the decode path's float32 [M, N] or the
 * dequantized W [N, K] in dtype. */
static size_t workspace_layout(int dtype, int64_t M, int64_t N, int64_t K, int64_t R, size_t *u16_off,
                               size_t *rest_off) {
  size_t u32 = round256((size_t)(M * R) * 4), u16 = round256((size_t)(M * R) * (size_t)dtype_bytes(dtype));
  size_t rest = takes_decode(M, K) ? round256((size_t)(M * N) * 4) : round256((size_t)(N * K) * dtype_bytes(dtype));
  *u16_off = u32;
  *rest_off = u32 + u16;
  return u32 + u16 + rest;
}

static int sizes_ok(int dtype, int64_t M, int64_t N, int64_t K, int64_t R) {
  if (dtype != FASTPEFT_FLOAT16 && dtype != FASTPEFT_BFLOAT16) return 0;
  if (M < 1 || N < 1 || K < 1 || R < 0) return 0;
  if (M > FP_I32_LIMIT / K || N > FP_I32_LIMIT / K || M > FP_I32_LIMIT / N) return 0;
  return R == 0 || (M <= FP_I32_LIMIT / R && N <= FP_I32_LIMIT / R && K <= FP_I32_LIMIT / R);
}

size_t fastpeft_nf4_lora_linear_workspace_bytes(fastpeft_dtype dtype, int64_t M, int64_t N, int64_t K, int64_t R) {
  size_t u16_off, rest_off;
  return sizes_ok(dtype, M, N, K, R) ? workspace_layout(dtype, M, N, K, R, &u16_off, &rest_off) : 0;
}

#ifdef FP_SKINNY_PRESENT
_Static_assert(FP_SKINNY_NPARAMS == 16, "_lora_skinny_kernel's parameters changed: update skinny()");

/* u32 [M, R] = x [M, K] · Aᵀ in float32: lora_linear._skinny with lora_linear_kernels._skinny_config */
static CUresult skinny(fp_state *st, CUstream stream, int dtype, int64_t M, int64_t K, int64_t R, const void *x,
                       const void *lora_a, CUdeviceptr u32) {
  fp_arg a[FP_SKINNY_NPARAMS];
  a[FP_SKINNY_in_ptr].p = (CUdeviceptr)x;
  a[FP_SKINNY_mat_ptr].p = (CUdeviceptr)lora_a;
  a[FP_SKINNY_keep_ptr].p = st->consts + FP_CONST_KEEP;
  a[FP_SKINNY_out_ptr].p = u32;
  a[FP_SKINNY_M].i = M;
  a[FP_SKINNY_Q].i = K;
  a[FP_SKINNY_R].i = R;
  a[FP_SKINNY_stride_im].i = K;
  a[FP_SKINNY_stride_iq].i = 1;
  a[FP_SKINNY_stride_mq].i = 1; /* MAT[k, r] = A[r, k] */
  a[FP_SKINNY_stride_mr].i = K;
  a[FP_SKINNY_stride_km].i = 0;
  a[FP_SKINNY_stride_kq].i = 0;
  a[FP_SKINNY_scale].f = 1.0f;
  a[FP_SKINNY_has_mask].i = 0;
  int block_m = M <= 16 ? 16 : 64; /* SMALL_M_MAX rows: one 16-row tile */
  int block_r = (int)min64(64, max64(16, next_pow2(R)));
  a[FP_SKINNY_split_k].i = 1;
  const fp_variant *v = fp_select(st, FP_FAMILY_SKINNY, dtype, -1, block_m, block_r, a, FP_SKINNY_NPARAMS);
  if (!v) return CUDA_ERROR_NOT_FOUND;
  /* split K until about two programs per SM exist (decode: one row tile would leave the GPU idle) */
  int64_t tiles = cdiv(M, block_m) * cdiv(R, block_r), steps = cdiv(K, v->block_k);
  int64_t split = max64(1, min64(steps, cdiv(2 * (int64_t)st->sms, tiles)));
  a[FP_SKINNY_split_k].i = split;
  CUresult r = CUDA_SUCCESS;
  if (split > 1) r = fp_cu.memset_d32_async(u32, 0, (size_t)(M * R), stream);
  if (r != CUDA_SUCCESS) return r;
  return fp_launch(st, v, a, (unsigned)cdiv(M, block_m), (unsigned)cdiv(R, block_r), (unsigned)split, stream);
}
#endif

#ifdef FP_DECODE_PRESENT
_Static_assert(FP_DECODE_NPARAMS == 27, "_nf4_decode_kernel's parameters changed: update decode()");

/* acc [M, N] (float32, zeroed here) = x · dequant(W)ᵀ + s · U · Bᵀ + bias: lora_linear_decode.nf4_decode_fwd */
static CUresult decode(fp_state *st, CUstream stream, int dtype, int64_t M, int64_t N, int64_t K, const void *x,
                       const fastpeft_nf4_weight *w, const void *bias, int64_t R, CUdeviceptr u16, const void *lora_b,
                       float scaling, CUdeviceptr acc) {
  fp_arg a[FP_DECODE_NPARAMS];
  CUdeviceptr xp = (CUdeviceptr)x, absmax = (CUdeviceptr)w->absmax;
  a[FP_DECODE_x_ptr].p = xp;
  a[FP_DECODE_w_ptr].p = (CUdeviceptr)w->packed; /* read as int32 words of 8 codes */
  a[FP_DECODE_absmax_ptr].p = absmax;
  if (w->double_quant) {
    a[FP_DECODE_qmap_ptr].p = w->nested_quant_map ? (CUdeviceptr)w->nested_quant_map : st->consts + FP_CONST_DYNAMIC_MAP;
    a[FP_DECODE_nested_ptr].p = (CUdeviceptr)w->nested_absmax;
    a[FP_DECODE_offset_ptr].p = (CUdeviceptr)w->offset;
  } else {
    a[FP_DECODE_qmap_ptr].p = a[FP_DECODE_nested_ptr].p = a[FP_DECODE_offset_ptr].p = absmax;
  }
  a[FP_DECODE_table_ptr].p = st->consts + (dtype == FASTPEFT_FLOAT16 ? FP_CONST_DECODE_F16 : FP_CONST_DECODE_BF16);
  a[FP_DECODE_bias_ptr].p = bias ? (CUdeviceptr)bias : xp;
  /* R = 0: the epilogue loop runs no step; x stands in for U and B, with x's strides */
  a[FP_DECODE_u_ptr].p = R ? u16 : xp;
  a[FP_DECODE_b_ptr].p = R ? (CUdeviceptr)lora_b : xp;
  a[FP_DECODE_out_ptr].p = acc;
  a[FP_DECODE_M].i = M;
  a[FP_DECODE_N].i = N;
  a[FP_DECODE_K].i = K;
  a[FP_DECODE_R].i = R;
  a[FP_DECODE_blocksize_shift].i = blocksize_shift(w->blocksize);
  a[FP_DECODE_stride_xm].i = K;
  a[FP_DECODE_stride_xk].i = 1;
  a[FP_DECODE_stride_um].i = R ? R : K;
  a[FP_DECODE_stride_ur].i = 1;
  a[FP_DECODE_stride_bn].i = R ? R : K;
  a[FP_DECODE_stride_br].i = 1;
  a[FP_DECODE_stride_om].i = N;
  a[FP_DECODE_stride_on].i = 1;
  a[FP_DECODE_lora_scale].f = scaling;
  a[FP_DECODE_has_bias].i = bias != NULL;
  a[FP_DECODE_split_k].i = 1;
  int block_m = (int)max64(16, next_pow2(M));
  const fp_variant *v = fp_select(st, FP_FAMILY_DECODE, dtype, w->double_quant, block_m, -1, a, FP_DECODE_NPARAMS);
  if (!v) return CUDA_ERROR_NOT_FOUND;
  int64_t tiles = cdiv(N, v->block_n), steps = K / v->block_k;
  int64_t split = max64(1, min64(steps, cdiv(2 * (int64_t)st->sms, tiles)));
  a[FP_DECODE_split_k].i = split;
  CUresult r = fp_cu.memset_d32_async(acc, 0, (size_t)(M * N), stream);
  if (r != CUDA_SUCCESS) return r;
  return fp_launch(st, v, a, (unsigned)tiles, (unsigned)split, 1, stream);
}
#endif

#ifdef FP_GEMM_PRESENT
_Static_assert(FP_GEMM_NPARAMS == 35, "_lora_gemm_kernel's parameters changed: update gemm()");

/* y [M, N] = x · Wᵀ + s · U · Bᵀ + bias for a dense W [N, K] in dtype: lora_linear._gemm, tiled path */
static CUresult gemm(fp_state *st, CUstream stream, int dtype, int64_t M, int64_t N, int64_t K, const void *x,
                     CUdeviceptr w16, const void *bias, int64_t R, CUdeviceptr u16, const void *lora_b,
                     float scaling, void *y) {
  fp_arg a[FP_GEMM_NPARAMS];
  CUdeviceptr xp = (CUdeviceptr)x, code = st->consts + FP_CONST_NF4_CODE;
  a[FP_GEMM_in_ptr].p = xp;
  a[FP_GEMM_w_ptr].p = w16;
  /* a dense W reads none of the NF4 pointers: the codebook stands in for them, as in the Python launch */
  a[FP_GEMM_absmax_ptr].p = a[FP_GEMM_code_ptr].p = a[FP_GEMM_qmap_ptr].p = code;
  a[FP_GEMM_nested_ptr].p = a[FP_GEMM_offset_ptr].p = code;
  a[FP_GEMM_bias_ptr].p = bias ? (CUdeviceptr)bias : xp;
  a[FP_GEMM_l_ptr].p = R ? u16 : xp;
  a[FP_GEMM_rt_ptr].p = R ? (CUdeviceptr)lora_b : xp;
  a[FP_GEMM_keep_ptr].p = st->consts + FP_CONST_KEEP;
  a[FP_GEMM_out_ptr].p = (CUdeviceptr)y;
  a[FP_GEMM_M].i = M;
  a[FP_GEMM_P].i = N;
  a[FP_GEMM_Q].i = K;
  a[FP_GEMM_R].i = R;
  a[FP_GEMM_m_bucket].i = next_pow2(max64(M, 16)); /* keys Python's autotuner only */
  a[FP_GEMM_n_blocks].i = 16;                      /* the placeholder absmax's element count */
  a[FP_GEMM_blocksize_shift].i = 0;
  a[FP_GEMM_stride_im].i = K;
  a[FP_GEMM_stride_iq].i = 1;
  a[FP_GEMM_stride_wq].i = 1; /* Wt[k, n] = W[n, k] */
  a[FP_GEMM_stride_wp].i = K;
  a[FP_GEMM_stride_lm].i = R; /* R = 0: no step of the epilogue loop reads L or Rt */
  a[FP_GEMM_stride_lr].i = 1;
  a[FP_GEMM_stride_rr].i = 1; /* Rt[r, n] = B[n, r] */
  a[FP_GEMM_stride_rp].i = R;
  a[FP_GEMM_stride_km].i = 0;
  a[FP_GEMM_stride_kp].i = 0;
  a[FP_GEMM_stride_om].i = N;
  a[FP_GEMM_stride_op].i = 1;
  a[FP_GEMM_lora_scale].f = scaling;
  a[FP_GEMM_has_bias].i = bias != NULL;
  a[FP_GEMM_has_mask].i = 0;
  a[FP_GEMM_split_k].i = 1; /* the tiled configurations do not split K */
  const fp_variant *v = fp_select(st, FP_FAMILY_GEMM, dtype, -1, -1, -1, a, FP_GEMM_NPARAMS);
  if (!v) return CUDA_ERROR_NOT_FOUND;
  return fp_launch(st, v, a, (unsigned)(cdiv(M, v->block_m) * cdiv(N, v->block_n)), 1, 1, stream);
}
#endif

CUresult fastpeft_nf4_lora_linear_forward(CUstream stream, fastpeft_dtype dtype, int64_t M, int64_t N, int64_t K,
                                          const void *x, const fastpeft_nf4_weight *weight, const void *bias,
                                          int64_t R, const void *lora_a, const void *lora_b, float scaling, void *y,
                                          void *workspace, size_t workspace_bytes) {
  CUresult r = check_weight(weight);
  if (r != CUDA_SUCCESS) return r;
  FP_BAD(!sizes_ok(dtype, M, N, K, R));
  FP_BAD(!x || !y || !workspace || !FP_ALIGNED(x) || !FP_ALIGNED(y) || !FP_ALIGNED(workspace));
  FP_BAD(bias && !FP_ALIGNED(bias));
  FP_BAD(R > 0 && (!lora_a || !lora_b || !FP_ALIGNED(lora_a) || !FP_ALIGNED(lora_b)));
  size_t u16_off, rest_off;
  FP_BAD(workspace_bytes < workspace_layout(dtype, M, N, K, R, &u16_off, &rest_off));
  fp_state *st;
  if ((r = fp_current(&st)) != CUDA_SUCCESS) return r;
#if !defined(FP_SKINNY_PRESENT) || !defined(FP_DECODE_PRESENT) || !defined(FP_GEMM_PRESENT)
  (void)stream, (void)lora_a, (void)lora_b, (void)scaling, (void)bias;
  return CUDA_ERROR_NOT_FOUND; /* a library built with a reduced kernel set */
#else
  CUdeviceptr ws = (CUdeviceptr)workspace, u16 = ws + u16_off, rest = ws + rest_off;
  if (R > 0) { /* U = x · Aᵀ, rounded to dtype as the Python launcher rounds it */
    if ((r = skinny(st, stream, dtype, M, K, R, x, lora_a, ws)) != CUDA_SUCCESS) return r;
    if ((r = fp_cast(st, ws, u16, M * R, dtype, stream)) != CUDA_SUCCESS) return r;
  }
  if (takes_decode(M, K)) {
    r = decode(st, stream, dtype, M, N, K, x, weight, bias, R, u16, lora_b, scaling, rest);
    return r != CUDA_SUCCESS ? r : fp_cast(st, rest, (CUdeviceptr)y, M * N, dtype, stream);
  }
  /* past decode sizes: dequantize W once, then the dense tiled GEMM with the LoRA epilogue */
  if ((r = dequantize(st, stream, weight, N * K, dtype, rest)) != CUDA_SUCCESS) return r;
  return gemm(st, stream, dtype, M, N, K, x, rest, bias, R, u16, lora_b, scaling, y);
#endif
}
