// The PTX the kernels use directly: mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate),
// ldmatrix, cp.async and shared-memory addresses, all under the architecture guard
// SALA_PTX_SM80 (sm_80 or newer); and Hopper's warpgroup MMA (wgmma, sm_90a only) under
// SALA_PTX_SM90A. The device pass of an older architecture still compiles: its mma, ldmatrix and
// copies trap, so a launch there fails loudly instead of computing garbage, and commit / wait,
// which have nothing left to order, do nothing. Kernels branch on SALA_PTX_SM90A themselves to
// pick wgmma where the pass has it.

#ifndef SALA_SGLANG_CSRC_PTX_CUH_
#define SALA_SGLANG_CSRC_PTX_CUH_

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SALA_PTX_SM80 1
#endif
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SALA_PTX_SM90A 1
#endif

namespace sala::ptx {

// The 16-bit float format of an element type. Kernels templated on CUDA's types and kernels
// dispatched by AT_DISPATCH on ATen's reach the same instructions; any other type has no
// definition and does not compile.
template <typename T>
struct Float16Format;
template <>
struct Float16Format<__nv_bfloat16> {
  static constexpr bool kBF16 = true;
};
template <>
struct Float16Format<c10::BFloat16> {
  static constexpr bool kBF16 = true;
};
template <>
struct Float16Format<__half> {
  static constexpr bool kBF16 = false;
};
template <>
struct Float16Format<c10::Half> {
  static constexpr bool kBF16 = false;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// c += a . b for one m16n8k16 tile in T, accumulated in fp32: a is the 16x16 A fragment, b0 / b1
// the 16x8 B fragment, c the 16x8 accumulator, all in the PTX ISA's register layout.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#ifdef SALA_PTX_SM80
  if constexpr (Float16Format<T>::kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// lo and hi rounded to T (to nearest) in one register, lo in the low half: a register of an mma
// fragment built from fp32 values.
template <typename T>
__device__ __forceinline__ uint32_t pack_float2(float lo, float hi) {
  uint32_t r;
  if constexpr (Float16Format<T>::kBF16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, sizeof(r));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, sizeof(r));
  }
  return r;
}

// Four 8x8 matrices of 16-bit elements from shared memory: lanes 8i .. 8i + 7 give the row
// addresses of matrix i, whose fragment lands in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#ifdef SALA_PTX_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#else
  __trap();
#endif
}

// As ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#ifdef SALA_PTX_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#else
  __trap();
#endif
}

// 16 bytes global -> shared, asynchronously (complete after the cp_async_wait that covers their
// group). .cg keeps the data out of L1: every caller streams rows that a CTA reads once.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
#ifdef SALA_PTX_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
               : "memory");
#else
  __trap();
#endif
}

// As cp_async_16, reading only the first src_bytes (at most 16) and writing zeros for the rest:
// src_bytes 0 zero-fills dst, though src must still be a valid address.
__device__ __forceinline__ void cp_async_16_zfill(void* dst, const void* src, int src_bytes) {
#ifdef SALA_PTX_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef SALA_PTX_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SALA_PTX_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// ---- warpgroup MMA (sm_90a) ----
// A shared-memory matrix descriptor for wgmma, 128-byte swizzle, K-major: rows of 64 16-bit
// elements (128 bytes), 8-row groups 1024 bytes apart, the 16-byte chunk j of row r stored at
// chunk j ^ (r % 8) of its row, the group 1024-byte aligned (so the base offset is 0). p is where
// the k-slice starts: the group's base plus 32 bytes per 16 elements of k.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* p) {
  const uint64_t addr = smem_addr(p);
  return ((addr & 0x3FFFFu) >> 4)       // start address
         | (uint64_t{1} << 16)          // leading-dimension offset: unused by K-major swizzles
         | (uint64_t{1024 >> 4} << 32)  // stride offset: one 8-row group
         | (uint64_t{1} << 62);         // 128-byte swizzle
}

// 2^x by the SFU alone (MUFU.EX2), results below 2^-126 flushed to zero: exp2f adds a range check
// and two predicated multiplies around the same MUFU.EX2 to produce those denormals, four
// instructions per exponential where softmax-style loops, whose arguments are <= 0 and whose
// sums a denormal cannot move, need one.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Orders this thread's earlier generic-proxy writes to shared memory (st.shared, cp.async) before
// later async-proxy reads (wgmma operands); a barrier after it extends that to the CTA.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef SALA_PTX_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Makes the registers a following wgmma reads or accumulates into ready for it.
__device__ __forceinline__ void wgmma_fence() {
#ifdef SALA_PTX_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef SALA_PTX_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most kPending of the warpgroup's committed wgmma groups are in flight; the
// accumulators of the others may then be read.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef SALA_PTX_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// d (+)= a . b for the warpgroup's m64n32k16 tile, fp32 accumulate, asynchronously (read d only
// after wgmma_commit and wgmma_wait): a is this warp's 16 rows as an mma.sync m16n8k16 A
// fragment (rows 16 * (warp % 4) + ...), b the 16 x 32 B tile, K-major in shared memory
// (`desc`), d this thread's accumulators in the m16n8 layout of each of the four n8 tiles
// (d[n] = the mma.sync c of n8 tile n). accumulate false overwrites d.
template <typename T>
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[4][4], const uint32_t (&a)[4],
                                                uint64_t desc, bool accumulate) {
#ifdef SALA_PTX_SM90A
  const int scale_d = accumulate ? 1 : 0;
#define SALA_WGMMA_M64N32K16(TYPE)                                                                \
  asm volatile(                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE                                 \
      " "                                                                                         \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                  \
      "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                               \
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])                                \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d))
  if constexpr (Float16Format<T>::kBF16) {
    SALA_WGMMA_M64N32K16("bf16");
  } else {
    SALA_WGMMA_M64N32K16("f16");
  }
#undef SALA_WGMMA_M64N32K16
#else
  __trap();
#endif
}

}  // namespace sala::ptx

#endif  // SALA_SGLANG_CSRC_PTX_CUH_
