/* ctest: runs libfastpeft_kernels on the inputs csrc/test/write_vectors.py wrote with fastpeft's Python path
 * on this GPU, and compares: the dequantized bytes exactly; the forward by the oracle rule of
 * tests/conftest.py (the error against an fp64 result at most the bound the writer computed from the Python
 * path's own error). Exit 0: all pass; 1: a failure; 77 (ctest's skip): no CUDA GPU, or one this library
 * has no binaries for.
 *
 *   fastpeft_capi_test VECTORS_DIR */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastpeft_kernels.h"

#define SKIP 77

static const char *g_dir;

static void *read_file(const char *name, const char *part, size_t *size) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s.%s", g_dir, name, part);
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  void *buf = malloc(n > 0 ? (size_t)n : 1);
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (size) *size = (size_t)n;
  return buf;
}

/* A device copy of NAME.PART (NULL if the file is absent); the host copy is freed. */
static void *upload(const char *name, const char *part) {
  size_t n;
  void *host = read_file(name, part, &n), *dev = NULL;
  if (!host) return NULL;
  if (cudaMalloc(&dev, n) != cudaSuccess || cudaMemcpy(dev, host, n, cudaMemcpyHostToDevice) != cudaSuccess) {
    fprintf(stderr, "%s.%s: upload failed\n", name, part);
    exit(1);
  }
  free(host);
  return dev;
}

static double half_to_double(unsigned short h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(m + 1024, e - 25);
  return (h & 0x8000) ? -v : v;
}

static double bf16_to_double(unsigned short b) {
  unsigned int bits = (unsigned int)b << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static int parse_dtype(const char *s) {
  if (!strcmp(s, "float32")) return FASTPEFT_FLOAT32;
  if (!strcmp(s, "float16")) return FASTPEFT_FLOAT16;
  if (!strcmp(s, "bfloat16")) return FASTPEFT_BFLOAT16;
  fprintf(stderr, "unknown dtype %s\n", s);
  exit(1);
}

static fastpeft_nf4_weight load_weight(const char *name, int blocksize, int dq) {
  fastpeft_nf4_weight w = {0};
  w.packed = upload(name, "packed");
  w.absmax = upload(name, "absmax");
  w.nested_absmax = dq ? upload(name, "nested") : NULL;
  w.offset = dq ? upload(name, "offset") : NULL;
  w.blocksize = blocksize;
  w.double_quant = dq;
  return w;
}

/* 0: pass, 1: fail, SKIP: this GPU has no binaries */
static int check(CUresult r, const char *name) {
  if (r == CUDA_SUCCESS) return 0;
  if (r == CUDA_ERROR_NO_BINARY_FOR_GPU) return SKIP;
  fprintf(stderr, "%s: the library returned CUresult %d\n", name, (int)r);
  return 1;
}

static int run_dequant(const char *name, int dtype, long long numel, int blocksize, int dq) {
  fastpeft_nf4_weight w = load_weight(name, blocksize, dq);
  size_t bytes = (size_t)numel * (dtype == FASTPEFT_FLOAT32 ? 4 : 2), want_bytes;
  void *out, *got = malloc(bytes), *want = read_file(name, "expected", &want_bytes);
  cudaMalloc(&out, bytes);
  int rc = check(fastpeft_nf4_dequantize(0, &w, numel, dtype, out), name);
  if (rc) return rc;
  cudaMemcpy(got, out, bytes, cudaMemcpyDeviceToHost);
  if (!want || want_bytes != bytes) {
    fprintf(stderr, "%s: no expected output of %zu bytes\n", name, bytes);
    return 1;
  }
  size_t first = bytes;
  for (size_t i = 0; i < bytes && first == bytes; i++)
    if (((unsigned char *)got)[i] != ((unsigned char *)want)[i]) first = i;
  printf("%-24s %s (%lld weights)\n", name, first == bytes ? "ok, bytes equal the Python path's" : "FAIL", numel);
  if (first != bytes) fprintf(stderr, "%s: first differing byte at %zu\n", name, first);
  return first != bytes;
}

static int run_forward(const char *name, int dtype, long long M, long long N, long long K, long long R, int blocksize,
                       int dq, int has_bias, float scaling, double bound) {
  fastpeft_nf4_weight w = load_weight(name, blocksize, dq);
  void *x = upload(name, "x"), *bias = has_bias ? upload(name, "bias") : NULL;
  void *a = R ? upload(name, "a") : NULL, *b = R ? upload(name, "b") : NULL, *y, *ws;
  size_t ws_bytes = fastpeft_nf4_lora_linear_workspace_bytes(dtype, M, N, K, R), exact_bytes;
  double *exact = read_file(name, "exact", &exact_bytes);
  if (!ws_bytes || !exact || exact_bytes != (size_t)(M * N) * sizeof(double)) {
    fprintf(stderr, "%s: bad sizes or no exact output\n", name);
    return 1;
  }
  cudaMalloc(&y, (size_t)(M * N) * 2);
  cudaMalloc(&ws, ws_bytes);
  int rc = check(fastpeft_nf4_lora_linear_forward(0, dtype, M, N, K, x, &w, bias, R, a, b, scaling, y, ws, ws_bytes),
                 name);
  if (rc) return rc;
  unsigned short *got = malloc((size_t)(M * N) * 2);
  if (cudaMemcpy(got, y, (size_t)(M * N) * 2, cudaMemcpyDeviceToHost) != cudaSuccess) {
    fprintf(stderr, "%s: %s\n", name, cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
  double worst = 0;
  long long at = 0;
  for (long long i = 0; i < M * N; i++) {
    double v = dtype == FASTPEFT_FLOAT16 ? half_to_double(got[i]) : bf16_to_double(got[i]);
    double err = fabs(v - exact[i]);
    if (!(err <= worst)) { /* NaN counts as the worst */
      worst = err;
      at = i;
    }
  }
  int fail = !(worst <= bound);
  printf("%-24s %s: max error %.3e at (%lld, %lld), bound %.3e (M=%lld N=%lld K=%lld R=%lld)\n", name,
         fail ? "FAIL" : "ok", worst, at / N, at % N, bound, M, N, K, R);
  return fail;
}

int main(int argc, char **argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    printf("no CUDA device: skipped\n");
    return SKIP;
  }
  if (argc != 2) {
    fprintf(stderr, "usage: %s VECTORS_DIR\n", argv[0]);
    return 1;
  }
  g_dir = argv[1];
  char path[4096], kind[32], name[128], dtype[32];
  snprintf(path, sizeof path, "%s/index.txt", g_dir);
  FILE *index = fopen(path, "r");
  if (!index) {
    fprintf(stderr, "%s: missing (csrc/test/write_vectors.py writes it)\n", path);
    return 1;
  }
  cudaSetDevice(0);
  cudaFree(0); /* the primary context, current: the library launches in it */
  int failures = 0, cases = 0;
  while (fscanf(index, "%31s %127s %31s", kind, name, dtype) == 3) {
    int rc;
    long long numel, M, N, K, R;
    int blocksize, dq, has_bias;
    float scaling;
    double bound;
    if (!strcmp(kind, "dequant") && fscanf(index, "%lld %d %d", &numel, &blocksize, &dq) == 3) {
      rc = run_dequant(name, parse_dtype(dtype), numel, blocksize, dq);
    } else if (!strcmp(kind, "forward") && fscanf(index, "%lld %lld %lld %lld %d %d %d %f %lf", &M, &N, &K, &R,
                                                  &blocksize, &dq, &has_bias, &scaling, &bound) == 9) {
      rc = run_forward(name, parse_dtype(dtype), M, N, K, R, blocksize, dq, has_bias, scaling, bound);
    } else {
      fprintf(stderr, "%s: malformed line for %s\n", path, name);
      return 1;
    }
    if (rc == SKIP) {
      printf("this GPU runs neither sm_80 nor sm_90a binaries: skipped\n");
      return SKIP;
    }
    failures += rc;
    cases++;
  }
  fclose(index);
  if (cudaDeviceSynchronize() != cudaSuccess) {
    fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
  printf("%d of %d cases passed\n", cases - failures, cases);
  return failures || cases == 0;
}
