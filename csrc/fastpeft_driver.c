/* The CUDA driver loaded at run time (dlopen of libcuda.so.1, as Triton's own launcher does), the state kept
 * per context (loaded binaries, device tables), and variant selection and launch. */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fastpeft_internal.h"

#define FP_STR_(x) #x
#define FP_STR(x) FP_STR_(x) /* the versioned symbol cuda.h maps a name to, e.g. cuMemAlloc -> cuMemAlloc_v2 */
#define FP_MAX_CONTEXTS 64

fp_driver fp_cu;
static CUresult g_load_result = CUDA_ERROR_NO_DEVICE;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static fp_state g_states[FP_MAX_CONTEXTS];

static void load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return; /* no driver: every launch answers CUDA_ERROR_NO_DEVICE */
#define FP_LOAD(field, name)                                   \
  if (!(*(void **)&fp_cu.field = dlsym(lib, FP_STR(name)))) { \
    return;                                                    \
  }
  FP_LOAD(ctx_get_current, cuCtxGetCurrent)
  FP_LOAD(ctx_get_device, cuCtxGetDevice)
  FP_LOAD(device_get_attribute, cuDeviceGetAttribute)
  FP_LOAD(module_load_data, cuModuleLoadData)
  FP_LOAD(module_unload, cuModuleUnload)
  FP_LOAD(module_get_function, cuModuleGetFunction)
  FP_LOAD(func_set_attribute, cuFuncSetAttribute)
  FP_LOAD(launch_kernel, cuLaunchKernel)
  FP_LOAD(memset_d32_async, cuMemsetD32Async)
  FP_LOAD(mem_alloc, cuMemAlloc)
  FP_LOAD(mem_free, cuMemFree)
  FP_LOAD(memcpy_htod, cuMemcpyHtoD)
#undef FP_LOAD
  g_load_result = CUDA_SUCCESS;
}

static CUresult init_state(fp_state *st, CUcontext ctx) {
  CUdevice dev;
  int major, minor;
  CUresult r = fp_cu.ctx_get_device(&dev);
  if (r == CUDA_SUCCESS) r = fp_cu.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  if (r == CUDA_SUCCESS) r = fp_cu.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  if (r == CUDA_SUCCESS) r = fp_cu.device_get_attribute(&st->sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
  if (r != CUDA_SUCCESS) return r;
  /* sm_80 code runs on every 8.x device; sm_90a code only on 9.0 */
  if (major == 8) {
    st->arch = 80;
  } else if (major == 9 && minor == 0) {
    st->arch = 90;
  } else {
    return CUDA_ERROR_NO_BINARY_FOR_GPU;
  }
  unsigned char host[FP_CONST_BYTES];
  memset(host, 0, sizeof host);
  memcpy(host + FP_CONST_NF4_CODE, fp_nf4_code, sizeof fp_nf4_code);
  memcpy(host + FP_CONST_DYNAMIC_MAP, fp_dynamic_map, sizeof fp_dynamic_map);
  memcpy(host + FP_CONST_DECODE_F16, fp_decode_tables[0], sizeof fp_decode_tables[0]);
  memcpy(host + FP_CONST_DECODE_BF16, fp_decode_tables[1], sizeof fp_decode_tables[1]);
  st->modules = calloc((size_t)fp_nvariants + 1, sizeof(CUmodule));
  st->functions = calloc((size_t)fp_nvariants + 1, sizeof(CUfunction));
  if (!st->modules || !st->functions) {
    free(st->modules);
    free(st->functions);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  r = fp_cu.mem_alloc(&st->consts, FP_CONST_BYTES);
  if (r == CUDA_SUCCESS) r = fp_cu.memcpy_htod(st->consts, host, FP_CONST_BYTES);
  if (r != CUDA_SUCCESS) {
    if (st->consts) fp_cu.mem_free(st->consts);
    free(st->modules);
    free(st->functions);
    memset(st, 0, sizeof *st);
    return r;
  }
  st->ctx = ctx;
  return CUDA_SUCCESS;
}

CUresult fp_current(fp_state **state) {
  pthread_once(&g_once, load_driver);
  if (g_load_result != CUDA_SUCCESS) return g_load_result;
  CUcontext ctx = NULL;
  CUresult r = fp_cu.ctx_get_current(&ctx);
  if (r != CUDA_SUCCESS) return r;
  if (!ctx) return CUDA_ERROR_INVALID_CONTEXT;
  pthread_mutex_lock(&g_lock);
  fp_state *st = NULL, *free_slot = NULL;
  for (int i = 0; i < FP_MAX_CONTEXTS && !st; i++) {
    if (g_states[i].ctx == ctx) st = &g_states[i];
    if (!g_states[i].ctx && !free_slot) free_slot = &g_states[i];
  }
  if (!st) {
    r = free_slot ? init_state(free_slot, ctx) : CUDA_ERROR_OUT_OF_MEMORY;
    if (r == CUDA_SUCCESS) st = free_slot;
  }
  pthread_mutex_unlock(&g_lock);
  *state = st;
  return r;
}

/* Whether `value` fits what the binary assumes of this parameter. */
static int accepts(const fp_param *p, fp_arg a) {
  if (p->type == FP_PTR) return p->spec != FP_DIV16 || a.p % 16 == 0;
  if (p->type == FP_F32) return 1;
  if (p->type == FP_I32 && (a.i < INT_MIN || a.i > INT_MAX)) return 0;
  if (p->spec == FP_CONST) return a.i == p->value;
  return p->spec != FP_DIV16 || a.i % 16 == 0;
}

const fp_variant *fp_select(const fp_state *st, int family, int dtype, int double_quant, int block_m, int block_r,
                            const fp_arg *args, int nargs) {
  for (int i = 0; i < fp_nvariants; i++) {
    const fp_variant *v = &fp_variants[i];
    if (v->family != family || v->arch != st->arch || v->dtype != dtype || v->nparams != nargs) continue;
    if ((double_quant >= 0 && v->double_quant != double_quant) || (block_m >= 0 && v->block_m != block_m) ||
        (block_r >= 0 && v->block_r != block_r))
      continue;
    int ok = 1;
    for (int j = 0; j < nargs && ok; j++) ok = accepts(&v->params[j], args[j]);
    if (ok) return v;
  }
  return NULL;
}

static CUresult load_function(fp_state *st, int index, CUfunction *fn) {
  pthread_mutex_lock(&g_lock);
  CUresult r = CUDA_SUCCESS;
  if (!st->functions[index]) {
    const fp_variant *v = &fp_variants[index];
    CUmodule mod = NULL;
    CUfunction f = NULL;
    r = fp_cu.module_load_data(&mod, v->cubin);
    if (r == CUDA_SUCCESS) r = fp_cu.module_get_function(&f, mod, v->kernel);
    /* past 48 KB, dynamic shared memory must be opted into (the launch then fails if the device has less) */
    if (r == CUDA_SUCCESS && v->shared > 49152)
      r = fp_cu.func_set_attribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v->shared);
    if (r == CUDA_SUCCESS) {
      st->modules[index] = mod;
      st->functions[index] = f;
    } else if (mod) {
      fp_cu.module_unload(mod);
    }
  }
  *fn = st->functions[index];
  pthread_mutex_unlock(&g_lock);
  return r;
}

CUresult fp_launch(fp_state *st, const fp_variant *v, const fp_arg *args, unsigned gx, unsigned gy, unsigned gz,
                   CUstream stream) {
  CUfunction fn;
  CUresult r = load_function(st, (int)(v - fp_variants), &fn);
  if (r != CUDA_SUCCESS) return r;
  if ((unsigned long long)gx * gy * gz == 0) return CUDA_SUCCESS;
  /* the arguments the binary takes (constants folded away), then Triton's global and profile scratch
   * pointers, which every shipped kernel leaves unused (checked at build time) */
  union {
    CUdeviceptr p;
    int64_t i64;
    int32_t i32;
    float f;
  } slots[64];
  void *params[64];
  int n = 0;
  for (int j = 0; j < v->nparams; j++) {
    const fp_param *p = &v->params[j];
    if (p->spec == FP_CONST) continue;
    if (n >= 62) return CUDA_ERROR_INVALID_VALUE;
    if (p->type == FP_PTR) slots[n].p = args[j].p;
    if (p->type == FP_I64) slots[n].i64 = args[j].i;
    if (p->type == FP_I32) slots[n].i32 = (int32_t)args[j].i;
    if (p->type == FP_F32) slots[n].f = args[j].f;
    params[n] = &slots[n];
    n++;
  }
  slots[n].p = 0;
  params[n] = &slots[n];
  n++;
  slots[n].p = 0;
  params[n] = &slots[n];
  return fp_cu.launch_kernel(fn, gx, gy, gz, 32u * (unsigned)v->num_warps, 1, 1, (unsigned)v->shared, stream, params,
                             NULL);
}

CUresult fp_cast(fp_state *st, CUdeviceptr in, CUdeviceptr out, int64_t n, int dtype, CUstream stream) {
  pthread_mutex_lock(&g_lock);
  CUresult r = CUDA_SUCCESS;
  if (!st->cast_module) {
    r = CUDA_ERROR_NOT_FOUND;
    for (int i = 0; i < fp_nextra_blobs; i++) {
      if (fp_extra_blobs[i].arch != st->arch || strcmp(fp_extra_blobs[i].name, "csrc/cast.cu") != 0) continue;
      CUmodule mod = NULL;
      r = fp_cu.module_load_data(&mod, fp_extra_blobs[i].data);
      if (r == CUDA_SUCCESS) r = fp_cu.module_get_function(&st->cast_f16, mod, "fastpeft_cast_f32_f16");
      if (r == CUDA_SUCCESS) r = fp_cu.module_get_function(&st->cast_bf16, mod, "fastpeft_cast_f32_bf16");
      if (r == CUDA_SUCCESS) {
        st->cast_module = mod;
      } else if (mod) {
        fp_cu.module_unload(mod);
      }
      break;
    }
  }
  pthread_mutex_unlock(&g_lock);
  if (r != CUDA_SUCCESS) return r;
  if (n <= 0) return CUDA_SUCCESS;
  long long blocks = (n + 255) / 256, most = 32LL * st->sms;
  unsigned grid = (unsigned)(blocks < most ? blocks : most);
  long long count = n;
  void *params[] = {&in, &out, &count};
  return fp_cu.launch_kernel(dtype == FASTPEFT_FLOAT16 ? st->cast_f16 : st->cast_bf16, grid, 1, 1, 256, 1, 1, 0,
                             stream, params, NULL);
}

CUresult fastpeft_kernels_release(void) {
  pthread_once(&g_once, load_driver);
  if (g_load_result != CUDA_SUCCESS) return g_load_result;
  CUcontext ctx = NULL;
  CUresult r = fp_cu.ctx_get_current(&ctx);
  if (r != CUDA_SUCCESS || !ctx) return r != CUDA_SUCCESS ? r : CUDA_ERROR_INVALID_CONTEXT;
  pthread_mutex_lock(&g_lock);
  for (int i = 0; i < FP_MAX_CONTEXTS; i++) {
    fp_state *st = &g_states[i];
    if (st->ctx != ctx) continue;
    for (int j = 0; j < fp_nvariants; j++)
      if (st->modules[j]) fp_cu.module_unload(st->modules[j]);
    if (st->cast_module) fp_cu.module_unload(st->cast_module);
    fp_cu.mem_free(st->consts);
    free(st->modules);
    free(st->functions);
    memset(st, 0, sizeof *st);
  }
  pthread_mutex_unlock(&g_lock);
  return CUDA_SUCCESS;
}

int fastpeft_kernels_binary_count(void) { return fp_nvariants + fp_nextra_blobs; }

int fastpeft_kernels_binary(int index, const char **name, int *arch, const void **data, size_t *size) {
  if (index < 0 || index >= fp_nvariants + fp_nextra_blobs || !name || !arch || !data || !size) return -1;
  if (index < fp_nvariants) {
    const fp_variant *v = &fp_variants[index];
    *name = v->case_name;
    *arch = v->arch;
    *data = v->cubin;
    *size = (size_t)(v->cubin_end - v->cubin);
  } else {
    const fp_blob *b = &fp_extra_blobs[index - fp_nvariants];
    *name = b->name;
    *arch = b->arch;
    *data = b->data;
    *size = (size_t)(b->end - b->data);
  }
  return 0;
}
