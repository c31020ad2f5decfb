/* The part of the ONNX Runtime C API lowbit's CPU kernels use, declared by us: ORT's wheels ship no C headers. The
 * API is used through the positions of its function table (OrtApi), which its ABI keeps fixed; only what the kernels
 * call is listed. Each kernel file defines one OrtCustomOp (`CustomOp`); register.c registers them all. */

#ifndef LOWBIT_ORT_API_H
#define LOWBIT_ORT_API_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;

typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum { API_VERSION = 17 };  /* KernelContext_ParallelFor: ONNX Runtime 1.17 */
enum { ORT_INVALID_ARGUMENT = 2, ORT_RUNTIME_EXCEPTION = 6 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2 };
enum { REQUIRED = 0, OPTIONAL = 1 };

/* positions in OrtApi */
enum {
  API_CreateStatus = 0,
  API_CreateCustomOpDomain = 26,
  API_CustomOpDomain_Add = 27,
  API_AddCustomOpDomain = 28,
  API_GetTensorMutableData = 51,
  API_GetDimensionsCount = 61,
  API_GetDimensions = 62,
  API_GetTensorTypeAndShape = 65,
  API_KernelInfoGetAttribute_float = 85,
  API_KernelInfoGetAttribute_int64 = 86,
  API_KernelContext_GetInput = 90,
  API_KernelContext_GetOutput = 91,
  API_ReleaseStatus = 93,
  API_ReleaseTensorTypeAndShapeInfo = 99,
  API_KernelContext_ParallelFor = 274,
};

extern const OrtApi *lowbit_ort_api;  /* set by RegisterCustomOps (register.c) */
#define API(name, type) ((type)(((void *const *)lowbit_ort_api)[API_##name]))

typedef OrtStatus *(*CreateStatusFn)(int code, const char *message);
typedef OrtStatus *(*CreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*CustomOpDomainAddFn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*GetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*GetDimensionsCountFn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*GetDimensionsFn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count);
typedef OrtStatus *(*GetTensorTypeAndShapeFn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*KernelInfoGetAttributeInt64Fn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*KernelContextGetInputFn)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*KernelContextGetOutputFn)(OrtKernelContext *context, size_t index, const int64_t *dims,
                                               size_t count, OrtValue **out);
typedef void (*ReleaseStatusFn)(OrtStatus *status);
typedef void (*ReleaseTensorTypeAndShapeInfoFn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*KernelContextParallelForFn)(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                 size_t total, size_t num_batch, void *user_data);

/* OrtCustomOp, as far as API_VERSION reads it */
typedef struct CustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct CustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct CustomOp *op);
  const char *(*GetExecutionProviderType)(const struct CustomOp *op);
  int (*GetInputType)(const struct CustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct CustomOp *op);
  int (*GetOutputType)(const struct CustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct CustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
  int (*GetVariadicInputMinArity)(const struct CustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
  OrtStatus *(*CreateKernelV2)(const struct CustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                               void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
  OrtStatus *(*InferOutputShapeFn)(const struct CustomOp *op, void *context);
  int (*GetStartVersion)(const struct CustomOp *op);
  int (*GetEndVersion)(const struct CustomOp *op);
} CustomOp;

#define CHECK(call)                    \
  do {                                 \
    OrtStatus *status_ = (call);       \
    if (status_ != NULL) return status_; \
  } while (0)

static inline OrtStatus *error(const char *message) { return API(CreateStatus, CreateStatusFn)(ORT_INVALID_ARGUMENT, message); }

static inline OrtStatus *input(OrtKernelContext *context, size_t index, const OrtValue **value, int64_t *dims,
                        size_t *rank) {
  CHECK(API(KernelContext_GetInput, KernelContextGetInputFn)(context, index, value));
  if (*value == NULL) return error("lowbit.cpu: an input is missing");
  OrtTensorTypeAndShapeInfo *info;
  CHECK(API(GetTensorTypeAndShape, GetTensorTypeAndShapeFn)(*value, &info));
  OrtStatus *status = API(GetDimensionsCount, GetDimensionsCountFn)(info, rank);
  if (status == NULL && *rank > 8) status = error("lowbit.cpu: inputs have at most 8 dimensions");
  if (status == NULL) status = API(GetDimensions, GetDimensionsFn)(info, dims, *rank);
  API(ReleaseTensorTypeAndShapeInfo, ReleaseTensorTypeAndShapeInfoFn)(info);
  return status;
}

static inline void *data_of(const OrtValue *value) {
  void *data = NULL;
  OrtStatus *status = API(GetTensorMutableData, GetTensorMutableDataFn)((OrtValue *)value, &data);
  if (status != NULL) {
    API(ReleaseStatus, ReleaseStatusFn)(status);
    return NULL;
  }
  return data;
}

/* An int64 attribute; `optional`: absent leaves `fallback` in *out instead of an error. */
static inline OrtStatus *int_attribute(const OrtKernelInfo *info, const char *name, int64_t *out, int optional,
                                       int64_t fallback) {
  OrtStatus *status = API(KernelInfoGetAttribute_int64, KernelInfoGetAttributeInt64Fn)(info, name, out);
  if (status != NULL && optional) {
    API(ReleaseStatus, ReleaseStatusFn)(status);
    *out = fallback;
    return NULL;
  }
  return status;
}

/* A kernel's state of `size` bytes, zeroed, that begins with int64 K and N: both read from the attributes (positive),
 * or an error (`op`: its message) and nothing allocated. */
static inline OrtStatus *new_kernel(const OrtKernelInfo *info, size_t size, const char *op, void **out) {
  int64_t *dims = calloc(1, size);
  if (dims == NULL) return API(CreateStatus, CreateStatusFn)(ORT_RUNTIME_EXCEPTION, "out of memory");
  OrtStatus *status = int_attribute(info, "K", &dims[0], 0, 0);
  if (status == NULL) status = int_attribute(info, "N", &dims[1], 0, 0);
  if (status == NULL && (dims[0] < 1 || dims[1] < 1)) status = error(op);
  if (status != NULL) {
    free(dims);
    return status;
  }
  *out = dims;
  return NULL;
}

/* Members every lowbit.cpu op shares: CPU provider, required inputs and outputs in CPU memory, one float32 output,
 * a kernel state freed with free(), any opset version. */
static inline const char *cpu_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static inline int required(const CustomOp *op, size_t index) { (void)op; (void)index; return REQUIRED; }
static inline int default_memory(const CustomOp *op, size_t index) { (void)op; (void)index; return 0; }
static inline int float_output(const CustomOp *op, size_t index) { (void)op; (void)index; return TYPE_FLOAT; }
static inline size_t one_output(const CustomOp *op) { (void)op; return 1; }
static inline void free_kernel(void *kernel) { free(kernel); }
static inline int since_version_1(const CustomOp *op) { (void)op; return 1; }
static inline int any_later_version(const CustomOp *op) { (void)op; return 0x7fffffff; }

/* One token's loops read each weight from memory once, with few instructions a cache line: alone, the hardware
 * prefetcher keeps too few lines in flight to reach the memory's bandwidth. Each loop asks for the cache line
 * PREFETCH_AHEAD bytes ahead of `p` in its weight stream, once per line (prefetcht0; past the end of a buffer it is
 * ignored: a prefetch never faults). 120 decode-shaped calls in one graph, two threads: 8-bit codes 5.9 -> 4.9 ms,
 * 4-bit 3.6 -> 2.7 ms; an lm_head 576 x 49152 in float16 / bfloat16 about -10% (docs/performance.md). */
#define PREFETCH_AHEAD 1024
static inline void prefetch_ahead(const void *p) { __builtin_prefetch((const char *)p + PREFETCH_AHEAD, 0, 3); }

/* One lowbit.cpu op's table: its name, input types and count, which inputs are optional, and its kernel. */
#define LOWBIT_CPU_OP(variable, name, input_type, input_count, input_characteristic, create, compute_fn) \
  const CustomOp variable = {                                                                             \
      .version = API_VERSION,                                                                             \
      .GetName = name,                                                                                    \
      .GetExecutionProviderType = cpu_provider,                                                           \
      .GetInputType = input_type,                                                                         \
      .GetInputTypeCount = input_count,                                                                   \
      .GetOutputType = float_output,                                                                      \
      .GetOutputTypeCount = one_output,                                                                   \
      .KernelDestroy = free_kernel,                                                                       \
      .GetInputCharacteristic = input_characteristic,                                                     \
      .GetOutputCharacteristic = required,                                                                \
      .GetInputMemoryType = default_memory,                                                               \
      .CreateKernelV2 = create,                                                                           \
      .KernelComputeV2 = compute_fn,                                                                      \
      .GetStartVersion = since_version_1,                                                                 \
      .GetEndVersion = any_later_version,                                                                 \
  }

#endif
