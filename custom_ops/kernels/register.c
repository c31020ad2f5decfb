/* RegisterCustomOps: the entry point ONNX Runtime calls (SessionOptions.register_custom_ops_library(path)); it adds
 * every lowbit.cpu op to the session. */

#include "ort_api.h"

const OrtApi *lowbit_ort_api;

extern const CustomOp lowbit_matmul_int4_int8;
extern const CustomOp lowbit_matmul_int8_int8;
extern const CustomOp lowbit_matmul_narrow_float;
extern const CustomOp lowbit_group_query_attention;

__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                     const OrtApiBase *base) {
  const OrtApi *table = base->GetApi(API_VERSION);
  if (table == NULL) return NULL;  /* an ONNX Runtime older than 1.17 has no such table: register nothing */
  lowbit_ort_api = table;
  OrtCustomOpDomain *domain;
  CHECK(API(CreateCustomOpDomain, CreateCustomOpDomainFn)("lowbit.cpu", &domain));
  CHECK(API(CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &lowbit_matmul_int4_int8));
  CHECK(API(CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &lowbit_matmul_int8_int8));
  CHECK(API(CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &lowbit_matmul_narrow_float));
  CHECK(API(CustomOpDomain_Add, CustomOpDomainAddFn)(domain, &lowbit_group_query_attention));
  return API(AddCustomOpDomain, AddCustomOpDomainFn)(options, domain);
}
