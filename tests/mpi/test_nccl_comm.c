/* libmoe_nccl on one rank. Argument checks run everywhere; with a CUDA device, a size-1 NCCL
 * communicator (ncclCommInitAll over device 0: NCCL refuses two ranks on one device) checks that
 * both hooks move exactly the bytes they are given — a one-rank all-to-all is a copy — with
 * rank-tagged data, odd row sizes and empty exchanges, and that bad hook arguments are refused.
 * Without a device it says so and exits 77 (ctest: skipped; a failure under MOE_REQUIRE_GPU). */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/moe.h"
#include "moe/moe_nccl.h"

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                       \
  do {                                                         \
    ++checks;                                                  \
    if (!(cond)) {                                             \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
      fprintf(stderr, __VA_ARGS__);                            \
      fprintf(stderr, " [moe_nccl_last_error: %s]\n", moe_nccl_last_error()); \
      ++failures;                                              \
    }                                                          \
  } while (0)

#define CUDA(call)                                                                            \
  do {                                                                                        \
    cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess) {                                                                  \
      fprintf(stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      exit(1);                                                                                \
    }                                                                                         \
  } while (0)

/* Host-only checks: they must hold on a machine without a GPU too. */
static void check_arguments_without_device(void) {
  moe_comm *sentinel = (moe_comm *)&failures, *out = sentinel;
  moe_status s = moe_nccl_comm_create(NULL, NULL, &out);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "create(NULL comm) gave %s", moe_status_name(s));
  CHECK(out == sentinel, "create(NULL comm) wrote *out");
  CHECK(strstr(moe_nccl_last_error(), "nccl_comm") != NULL, "message does not name nccl_comm: '%s'",
        moe_nccl_last_error());
  s = moe_nccl_comm_create(NULL, NULL, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "create(NULL, NULL, NULL) gave %s", moe_status_name(s));
  moe_nccl_comm_destroy(NULL); /* a no-op */
  s = moe_nccl_comm_set_timeout(NULL, 5.0);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "set_timeout(NULL) gave %s", moe_status_name(s));
  moe_comm foreign = {sizeof(moe_comm), 1, 0, NULL, NULL, NULL, NULL};
  s = moe_nccl_comm_set_timeout(&foreign, 5.0);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT && strstr(moe_nccl_last_error(), "moe_nccl_comm_create"),
        "set_timeout(a comm of another library) gave %s: '%s'", moe_status_name(s), moe_nccl_last_error());
}

static unsigned char tag(size_t i, unsigned salt) { return (unsigned char)((i * 131u + salt * 17u + 7u) & 0xffu); }

/* One rows exchange of `rows` rows of row_bytes bytes through the comm; returns 1 if recv == send. */
static int rows_roundtrip(const moe_comm *c, cudaStream_t stream, int64_t rows, size_t row_bytes, unsigned salt) {
  const size_t bytes = (size_t)rows * row_bytes;
  unsigned char *host = malloc(bytes + 1), *back = malloc(bytes + 1);
  void *send = NULL, *recv = NULL;
  for (size_t i = 0; i < bytes; ++i) host[i] = tag(i, salt);
  CUDA(cudaMalloc(&send, bytes + 1));
  CUDA(cudaMalloc(&recv, bytes + 1));
  CUDA(cudaMemcpy(send, host, bytes, cudaMemcpyHostToDevice));
  CUDA(cudaMemset(recv, 0xA5, bytes + 1));
  /* the hook's contract: send is ready when it is called (the copies above may still be running
     on the legacy stream, which a non-blocking stream does not wait for) */
  CUDA(cudaDeviceSynchronize());
  const int64_t counts[1] = {rows};
  moe_status s = c->exchange_rows(c->user, send, counts, recv, counts, row_bytes, stream);
  CHECK(s == MOE_OK, "exchange_rows(%lld rows of %zu bytes) gave %s", (long long)rows, row_bytes, moe_status_name(s));
  CUDA(cudaStreamSynchronize(stream)); /* without a deadline the hook would not wait */
  CUDA(cudaMemcpy(back, recv, bytes + 1, cudaMemcpyDeviceToHost));
  int same = memcmp(back, host, bytes) == 0;
  CHECK(same, "exchange_rows(%lld rows of %zu bytes) did not copy the rows", (long long)rows, row_bytes);
  CHECK(back[bytes] == 0xA5, "exchange_rows wrote past the rows it was given");
  CUDA(cudaFree(send));
  CUDA(cudaFree(recv));
  free(host);
  free(back);
  return same;
}

static void check_bad_hook_arguments(const moe_comm *c, cudaStream_t stream) {
  int64_t one[1] = {1}, negative[1] = {-1};
  float host[4] = {1, 2, 3, 4};
  void *dev = NULL;
  CUDA(cudaMalloc(&dev, sizeof host));
  moe_status s = c->exchange_rows(c->user, host, one, dev, one, sizeof host, stream);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "exchange_rows from host memory gave %s", moe_status_name(s));
  CHECK(strstr(moe_nccl_last_error(), "device memory") != NULL, "message: '%s'", moe_nccl_last_error());
  /* the comm keeps the reason too: what libmoe puts in moe_last_error() */
  CHECK(strstr(c->last_error(c->user), "device memory") != NULL, "comm's reason: '%s'", c->last_error(c->user));
  s = c->exchange_rows(c->user, dev, negative, dev, negative, sizeof host, stream);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "exchange_rows with count -1 gave %s", moe_status_name(s));
  s = c->exchange_rows(c->user, dev, one, dev, one, 0, stream);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "exchange_rows with row_bytes 0 gave %s", moe_status_name(s));
  CHECK(strstr(c->last_error(c->user), "row_bytes") != NULL, "comm's reason: '%s'", c->last_error(c->user));
  s = c->exchange_rows(c->user, dev, NULL, dev, one, sizeof host, stream);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "exchange_rows with NULL send_counts gave %s", moe_status_name(s));
  s = c->exchange_counts(c->user, NULL, one);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "exchange_counts(NULL send) gave %s", moe_status_name(s));
  CUDA(cudaFree(dev));
}

int main(void) {
  check_arguments_without_device();

  /* The GPU battery's rule (tests/gpu/device_rules.h): skip only where there is no GPU (no device,
   * or no NVIDIA driver at all), fail where one cannot be used, and fail every skip under
   * MOE_REQUIRE_GPU. */
  int devices = 0;
  cudaError_t e = cudaGetDeviceCount(&devices);
  int no_gpu = (e == cudaSuccess && devices == 0) || e == cudaErrorNoDevice;
  if (e == cudaErrorInsufficientDriver) {
    void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (driver) dlclose(driver);
    no_gpu = driver == NULL;
  }
  if (e != cudaSuccess && !no_gpu) {
    fprintf(stderr, "FAIL: cudaGetDeviceCount failed with %s: %s (a GPU may be there but cannot be used)\n",
            cudaGetErrorName(e), cudaGetErrorString(e));
    return 1;
  }
  if (no_gpu) {
    const char *require = getenv("MOE_REQUIRE_GPU");
    const int required = require && require[0] && strcmp(require, "0") != 0;
    printf("%s: no CUDA device (%s); %d host-side argument checks ran, %d failed\n",
           required ? "FAIL: MOE_REQUIRE_GPU is set" : "SKIPPED",
           e != cudaSuccess ? cudaGetErrorName(e) : "0 devices", checks, failures);
    return failures || required ? 1 : 77;
  }

  const int dev0 = 0;
  ncclComm_t nccl = NULL;
  ncclResult_t r = ncclCommInitAll(&nccl, 1, &dev0);
  if (r != ncclSuccess) {
    fprintf(stderr, "FAIL: ncclCommInitAll over device 0: %s\n", ncclGetErrorString(r));
    return 1;
  }
  CUDA(cudaSetDevice(dev0));
  cudaStream_t counts_stream, rows_stream;
  CUDA(cudaStreamCreateWithFlags(&counts_stream, cudaStreamNonBlocking));
  CUDA(cudaStreamCreateWithFlags(&rows_stream, cudaStreamNonBlocking));

  moe_status s = moe_nccl_comm_create(nccl, counts_stream, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "create(NULL out) gave %s", moe_status_name(s));
  moe_comm *c = NULL;
  s = moe_nccl_comm_create(nccl, counts_stream, &c);
  CHECK(s == MOE_OK && c, "create gave %s", moe_status_name(s));
  if (!c) return 1;
  CHECK(c->struct_size == sizeof(moe_comm) && c->size == 1 && c->rank == 0, "comm: struct_size %zu size %d rank %d",
        c->struct_size, c->size, c->rank);
  CHECK(c->exchange_counts && c->exchange_rows, "hooks missing");
  CHECK(c->last_error != NULL, "last_error missing");
  if (!c->last_error) return 1;
  CHECK(strcmp(c->last_error(c->user), "") == 0, "last_error before any failure: '%s'", c->last_error(c->user));

  /* counts: values beyond 32 bits, several calls in a row (the staging buffers are reused) */
  for (int64_t v = 0; v < 3; ++v) {
    const int64_t send[1] = {((int64_t)1 << 40) + 977 * v + 3};
    int64_t recv[1] = {-1};
    s = c->exchange_counts(c->user, send, recv);
    CHECK(s == MOE_OK && recv[0] == send[0], "exchange_counts sent %lld, received %lld (%s)", (long long)send[0],
          (long long)recv[0], moe_status_name(s));
  }
  /* rows: a layer's float rows, odd byte sizes, one row, and nothing at all */
  const struct { int64_t rows; size_t row_bytes; } cases[] = {{37, 4096 * 4}, {5, 7}, {1, 3}, {1000, 2 * 14}, {0, 16}};
  for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; ++i)
    rows_roundtrip(c, rows_stream, cases[i].rows, cases[i].row_bytes, i);
  /* the default stream too (what a layer without moe_layer_set_stream passes) */
  rows_roundtrip(c, NULL, 9, 40, 99);
  check_bad_hook_arguments(c, rows_stream);
  /* still usable after refused calls */
  rows_roundtrip(c, rows_stream, 3, 12, 7);

  moe_nccl_comm_destroy(c);
  ncclCommDestroy(nccl);
  CUDA(cudaStreamDestroy(counts_stream));
  CUDA(cudaStreamDestroy(rows_stream));
  printf("libmoe_nccl on one rank: %d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
