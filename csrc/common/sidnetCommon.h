// Shared definitions of the SIDNet CUDA launchers: dtype codes and the exported error helpers.
// Every launcher is a plain C function over raw device pointers so that ctypes, a TensorRT plugin or any other host
// code can call it without PyTorch.
#pragma once

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of a tensor handed to a launcher.
enum SidnetDType {
    SIDNET_DTYPE_FLOAT32 = 0,
    SIDNET_DTYPE_FLOAT16 = 1,
};

// Bumped whenever a launcher's signature or semantics change; the Python binding refuses a stale library.
#define SIDNET_KERNELS_ABI_VERSION 1

int sidnetKernelsAbiVersion(void);

// cudaGetErrorString, exported so that callers without the CUDA runtime (ctypes) can print launcher errors.
const char* sidnetGetErrorString(int error);

#ifdef __cplusplus
}
#endif
