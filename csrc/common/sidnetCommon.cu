#include "sidnetCommon.h"

extern "C" int sidnetKernelsAbiVersion(void) { return SIDNET_KERNELS_ABI_VERSION; }

extern "C" const char* sidnetGetErrorString(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }
