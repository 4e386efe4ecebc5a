// Stand-in for MLX's mlx/backend/cuda/device/utils.cuh when compiling the generated
// CUDA kernels with nvcc off the GPU machine: only the headers those kernels rely on.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/limits>
