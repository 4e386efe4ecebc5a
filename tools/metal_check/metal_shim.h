// Declarations of the Metal Shading Language subset that flash-moe's generated kernels
// use, so that clang in C++17 mode can check their syntax and types on Linux.
//
// It stands in for what mx.fast.metal_kernel prepends (metal_stdlib plus MLX's utils.h).
// Address spaces are real clang address spaces, so passing a `constant` pointer where a
// `device` one is expected fails here as it does in Metal. Limits of the emulation:
//  * `threadgroup` and `thread` are empty (clang rejects address spaces on local
//    variables in C++), so threadgroup-pointer mix-ups are not caught;
//  * half, float16_t, bfloat and bfloat16_t are all clang's __fp16 (storage type with
//    float conversions), so they are not distinct types here;
//  * built-ins are declared, not defined: this is a syntax/type check, not an emulator.
#pragma once

#include <cstddef>
#include <cstdint>

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup
#define thread

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef __fp16 half;
typedef __fp16 bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;

#define FM_VEC(T, N, NAME) typedef T NAME __attribute__((ext_vector_type(N)));
FM_VEC(float, 2, float2) FM_VEC(float, 3, float3) FM_VEC(float, 4, float4)
FM_VEC(int, 2, int2) FM_VEC(int, 3, int3) FM_VEC(int, 4, int4)
FM_VEC(uint, 2, uint2) FM_VEC(uint, 3, uint3) FM_VEC(uint, 4, uint4)
FM_VEC(ushort, 2, ushort2) FM_VEC(ushort, 4, ushort4)
FM_VEC(uchar, 2, uchar2) FM_VEC(uchar, 4, uchar4)
FM_VEC(half, 2, half2) FM_VEC(half, 4, half4)
#undef FM_VEC

// as_type<T>(v): a bit cast between types of the same size.
template <typename T, typename U>
T as_type(U v) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  return __builtin_bit_cast(T, v);
}

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

template <typename T> T simd_sum(T v);
template <typename T> T simd_max(T v);
template <typename T> T simd_min(T v);
template <typename T> T simd_prefix_exclusive_sum(T v);
template <typename T> T simd_shuffle(T v, ushort lane);
template <typename T> T simd_shuffle_xor(T v, ushort mask);
template <typename T> T simd_shuffle_down(T v, ushort delta);
template <typename T> T simd_shuffle_up(T v, ushort delta);
template <typename T> T simd_broadcast(T v, ushort lane);
template <typename T> T simd_broadcast_first(T v);

enum memory_order { memory_order_relaxed };
template <typename T> struct atomic { T value; };
typedef atomic<float> atomic_float;
template <typename T>
T atomic_fetch_add_explicit(device atomic<T>* object, T operand, memory_order order);

// 8x8 simdgroup matrices: each lane holds two elements (thread_elements), the product is a
// collective of the SIMD-group.
template <typename T, int Rows, int Cols>
struct simdgroup_matrix {
  typedef T elements_type __attribute__((ext_vector_type(2)));
  elements_type& thread_elements();
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
template <typename T, int R, int C>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, R, C>& d, thread const simdgroup_matrix<T, R, C>& a,
                                   thread const simdgroup_matrix<T, R, C>& b,
                                   thread const simdgroup_matrix<T, R, C>& c);

float exp(float x);
float exp2(float x);
float log(float x);
float sqrt(float x);
float rsqrt(float x);
float tanh(float x);
float abs(float x);
float fma(float a, float b, float c);
half2 fma(half2 a, half2 b, half2 c);
float max(float a, float b);
float min(float a, float b);
int max(int a, int b);
int min(int a, int b);
uint max(uint a, uint b);
uint min(uint a, uint b);
float select(float a, float b, bool c);
template <typename T> T clamp(T x, T lo, T hi);

namespace fast {
float exp(float x);
float log(float x);
float tanh(float x);
}  // namespace fast
namespace precise {
float exp(float x);
float log(float x);
float tanh(float x);
}  // namespace precise

}  // namespace metal

using namespace metal;
