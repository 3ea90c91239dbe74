// InfLLM-v2 stage-1 block selection (SPEC 2.2), fused: the CUDA twin of `select_blocks` in
// sala_sglang/ops/infllm_v2/select.py, with the same result. One CTA per (query token, kv head):
//   pass 1  q . K1 over the windows the token sees -> each head's softmax max and sum (online);
//   pass 2  q . K1 again -> probabilities, summed over the group's heads, max-pooled straight into
//           per-block scores held in shared memory (no [T, G, windows] matrix in device memory);
//   select  radix select of the num_selected best 33-bit block keys, then a rank sort.
//
// Keys are exactly the Triton `_block_keys_kernel`'s upper half: hi = bits(score) + 1 for blocks
// b <= qb (forced blocks score +inf), 0 after the query's block; ties go to the lower block (the
// lower half of its int64 key is 0xFFFFFFFF - b). Each window's group probability is computed by
// one lane and pooled as that one float into both blocks it borders, so equal block scores are
// exactly equal.
//
// QK products: mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate); rows are the group's query
// heads padded to 16, columns the windows. K1 rows are gathered page by page with cp.async into
// a multi-stage shared-memory ring (rows padded by 16 bytes so ldmatrix is conflict-free).
//
// For prefill, select_blocks_tiled_kernel below does the same per token with 4 or 8 tokens per
// CTA sharing each staged K1 tile; this per-token kernel, 4 or 8 warps wide, serves decode and
// small batches. The op runs exactly the variant it is given (tile_tokens, warps, segment): the
// caller's per-forward plan (sala_sglang/ops/infllm_v2/plan.py) picks it, asking
// select_blocks_smem_bytes, which evaluates the layouts below, which variants fit the device. So
// the layouts are written here only, and no call reads the environment or the device.
//
// Dynamic shared memory (smem_bytes<D, NW>):
//   stages * window_tile * (D + 8) * 2   K1 ring
//   + align16(4 * width)                 block scores (float bits, atomicMax-pooled)
//   + align16(8 * num_selected)          chosen keys
//   + kScratchBytes                      softmax statistics and the radix histogram

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ptx.cuh"

namespace {

namespace ptx = sala::ptx;

constexpr int kMaxGroupHeads = 16;  // one m16 tile of query heads
constexpr int kScratchBytes = 8192;

// Few CTAs (decode): 8 warps put twice the windows in flight per CTA. Many CTAs: 4 warps and a
// deeper ring, several CTAs per SM.
template <int NW>
struct Tiling {
  static constexpr int kThreads = 32 * NW;
  static constexpr int kWindowTile = 16 * NW;  // each warp scores 16 windows (two n8 tiles)
  static constexpr int kStages = NW == 4 ? 3 : 2;
};

__host__ __device__ constexpr int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

template <int D, int NW>
__host__ __device__ constexpr int64_t ring_bytes() {
  return int64_t{Tiling<NW>::kStages} * Tiling<NW>::kWindowTile * (D + 8) * 2;
}

template <int D, int NW>
int64_t smem_bytes(int64_t width, int64_t num_selected) {
  return ring_bytes<D, NW>() + align16(4 * width) + align16(8 * num_selected) + kScratchBytes;
}

struct Geometry {
  int64_t stride_qt, stride_qh;             // q [T, Hq, D], contiguous in D
  int64_t stride_kp, stride_ks, stride_kg;  // k1 [pages, R, G, D], contiguous in D
  int64_t stride_rt;                        // req_to_token [R, L] int32
  int tokens, groups, group_heads;
  int kernel_size, kernel_stride, block_size;
  int k1_lag;  // kernel_size / kernel_stride - 1: window c is K1 row slot c + k1_lag of a request
  int init_blocks, local_blocks, num_selected, width;
  int segment;       // blocks per segment (token-tiled kernel only)
  float scale_log2;  // softmax scale * log2(e): exp2 throughout
};

// Upper half of the Triton kernel's int64 block key; 0 marks a block after the query's.
__device__ __forceinline__ uint32_t block_hi(uint32_t score_bits, int b, int qb, int init_blocks,
                                             int local_blocks) {
  if (b > qb) return 0u;
  const bool forced = b < init_blocks || b >= qb - local_blocks;
  return (forced ? 0x7F800000u : score_bits) + 1u;
}

// Where each K1 row of a staged tile of kWT windows starts (elements from the kv head's K1), -1
// past the n_vis visible windows, looked up one tile ahead: fetch(tile) starts thread tid's
// req_to_token read for window tile * kWT + tid into a register, place(tile) turns it into that
// row's offset in the tile's slot of `offsets` ([kStages][kWT]). One thread per row does the
// lookup, so the copy loop that follows does no division; placing a whole tile after fetching
// keeps the read's latency off the barrier every tile waits at. Window c lives beside the page
// of its last token kernel_stride * c + kernel_size - 1 (the layout compress_new_windows writes;
// Triton twin `page_of_window`): as kernel_size is a multiple of kernel_stride, that is row slot
// c + k1_lag of the request, ratio = block_size / kernel_stride slots per page.
template <int kWT, int kStages>
struct K1RowLocator {
  int64_t* offsets;
  const int32_t* rt_row;
  const Geometry& geo;
  int n_vis, ratio, tid;
  int slot = 0;
  bool visible = false;
  int32_t token = 0;  // req_to_token at the slot's page

  __device__ __forceinline__ void fetch(int tile) {
    const int c = tile * kWT + tid;
    visible = tid < kWT && c < n_vis;
    if (visible) {
      slot = c + geo.k1_lag;
      token = rt_row[int64_t{slot / ratio} * geo.block_size];  // block_size % stride == 0
    }
  }
  __device__ __forceinline__ void place(int tile) const {
    if (tid < kWT) {
      int64_t offset = -1;
      if (visible) {
        const int64_t page = token / geo.block_size;
        offset = page * geo.stride_kp + int64_t{slot % ratio} * geo.stride_ks;
      }
      offsets[(tile % kStages) * kWT + tid] = offset;
    }
  }
};

// Start the copies of a located tile into its ring slot: 16-byte chunk `chunk` of staged row
// `row` goes to element dst_offset(row, chunk) of dst (the per-token kernel's padded rows, the
// token-tiled kernel's swizzled_offset).
template <int kWT, int kChunks, int kThreads, typename T, typename DstOffset>
__device__ __forceinline__ void stage_k1_rows(T* dst, const int64_t* offsets, const T* k1_group,
                                              int tid, DstOffset&& dst_offset) {
  for (int i = tid; i < kWT * kChunks; i += kThreads) {
    const int row = i / kChunks;
    const int chunk = i % kChunks;
    const int64_t offset = offsets[row];
    // src_bytes 0 zero-fills the row; the source must still be a valid address
    const T* src = offset >= 0 ? k1_group + offset + chunk * 8 : k1_group;
    ptx::cp_async_16_zfill(dst + dst_offset(row, chunk), src, offset >= 0 ? 16 : 0);
  }
}

// Element offset, in a stage of kWT staged rows of D elements, of 16-byte chunk `chunk` of row
// `row`: the row's 64-element atom (chunk / 8) holds the stage's kWT rows 128 bytes apart, and
// 16-byte chunk c of row r sits at c ^ (r % 8) (the 128-byte swizzle wgmma reads, so ldmatrix's
// eight rows of one chunk also hit distinct banks).
template <int kWT>
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return (chunk / 8) * kWT * 64 + row * 64 + (((chunk % 8) ^ (row % 8)) * 8);
}

// Streams K1 tiles [first, end) through a kStages-deep cp.async ring and calls body(tile) once
// each tile is in shared memory (when score; a CTA's idle warps still copy and meet the
// barriers); kAsyncReads: body reads the ring through the async proxy (wgmma), so each tile's
// copies are fenced for it before the barrier. rows (a K1RowLocator) places a tile's row offsets
// one barrier before load(tile) reads them, from the lookup it fetched an iteration earlier; one
// barrier per tile. Nothing is in flight on return.
template <int kStages, bool kAsyncReads, typename Rows, typename Load, typename Body>
__device__ __forceinline__ void ring_sweep(int first, int end, bool score, Rows& rows, Load&& load,
                                           Body&& body) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (first + s < end) {
      rows.fetch(first + s);
      rows.place(first + s);
    }
  }
  if (first + kStages - 1 < end) rows.fetch(first + kStages - 1);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (first + s < end) load(first + s);
    ptx::cp_async_commit();
  }
  for (int tile = first; tile < end; ++tile) {
    const int next = tile + kStages - 1;
    if (next < end) {
      rows.place(next);
      if (next + 1 < end) rows.fetch(next + 1);
    }
    ptx::cp_async_wait<kStages - 2>();
    if constexpr (kAsyncReads) ptx::fence_proxy_async_shared();
    __syncthreads();  // tile is in; every warp is done with the slot refilled next
    if (next < end) load(next);
    ptx::cp_async_commit();
    if (score) body(tile);
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
}

template <int D, int NW, typename T>
__global__ void __launch_bounds__(Tiling<NW>::kThreads) select_blocks_kernel(
    const T* __restrict__ q, const T* __restrict__ k1, const int32_t* __restrict__ req_to_token,
    const int32_t* __restrict__ token_req, const int32_t* __restrict__ token_pos,
    int32_t* __restrict__ out, const Geometry geo) {
  using Tile = Tiling<NW>;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kWT = Tile::kWindowTile;
  constexpr int kStages = Tile::kStages;
  constexpr int kRow = D + 8;     // padded K1 row (elements): 16-byte rows, no bank conflict
  constexpr int kChunks = D / 8;  // 16-byte chunks per K1 row
  constexpr int kSteps = D / 16;  // mma k steps
  static_assert(kSteps % 2 == 0, "head dim must be a multiple of 32");

  extern __shared__ __align__(16) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);
  uint32_t* scores = reinterpret_cast<uint32_t*>(smem + ring_bytes<D, NW>());
  uint64_t* chosen =
      reinterpret_cast<uint64_t*>(smem + ring_bytes<D, NW>() + align16(4 * int64_t{geo.width}));
  unsigned char* scratch =
      reinterpret_cast<unsigned char*>(chosen) + align16(8 * int64_t{geo.num_selected});
  int64_t* row_offset = reinterpret_cast<int64_t*>(scratch);              // [stages][window tile]
  float* warp_m = reinterpret_cast<float*>(row_offset + kStages * kWT);   // [NW][16]
  float* warp_l = warp_m + NW * kMaxGroupHeads;                           // [NW][16]
  float* row_m = warp_l + NW * kMaxGroupHeads;                            // [16]
  float* row_il = row_m + kMaxGroupHeads;                                 // [16]
  uint32_t* hist = reinterpret_cast<uint32_t*>(row_il + kMaxGroupHeads);  // [256]
  int* shared_int = reinterpret_cast<int*>(hist + 256);                   // [NW + 4]
  static_assert((kStages * kWT * 8 + (2 * NW * kMaxGroupHeads + 2 * kMaxGroupHeads) * 4 + 256 * 4 +
                 (NW + 4) * 4) <= kScratchBytes,
                "scratch overflow");

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad_row = lane / 4;  // mma groupID: head rows quad_row, quad_row + 8
  const int quad_col = lane % 4;  // mma threadID_in_group: window columns 2*quad_col, +1
  const int64_t t = blockIdx.x / geo.groups;
  const int g = blockIdx.x % geo.groups;

  const int req = token_req[t];
  const int pos = token_pos[t];
  const int length = pos + 1;
  int n_vis = length >= geo.kernel_size ? (length - geo.kernel_size) / geo.kernel_stride + 1 : 0;
  if (req < 0) n_vis = 0;  // as the Triton kernel: a token of no request sweeps nothing
  const int qb = pos / geo.block_size;
  const int ratio = geo.block_size / geo.kernel_stride;
  // blocks b <= qb (inside the width) are eligible; every visible window pools into them only
  const int n_elig = pos < 0 ? 0 : min(qb + 1, geo.width);

  for (int b = tid; b < n_elig; b += kThreads) scores[b] = 0u;

  // The group's queries as mma A fragments (raw 16-bit pairs), rows past the group's heads zero.
  uint32_t qa[kSteps][4];
  {
    const uint16_t* q_tok = reinterpret_cast<const uint16_t*>(q) + t * geo.stride_qt +
                            int64_t{g} * geo.group_heads * geo.stride_qh;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // columns k, k + 8
#pragma unroll
        for (int up = 0; up < 2; ++up) {  // rows quad_row, quad_row + 8
          const int row = quad_row + 8 * up;
          const int col = 16 * s + 8 * half + 2 * quad_col;
          uint32_t pair = 0u;
          if (row < geo.group_heads) {
            const uint16_t* p = q_tok + row * geo.stride_qh + col;
            pair = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 16);
          }
          qa[s][2 * half + up] = pair;
        }
      }
    }
  }

  const int32_t* rt_row = req_to_token + (req < 0 ? 0 : int64_t{req}) * geo.stride_rt;
  const T* k1_group = k1 + int64_t{g} * geo.stride_kg;
  const int n_tiles = (n_vis + kWT - 1) / kWT;

  auto load_tile = [&](int tile) {
    stage_k1_rows<kWT, kChunks, kThreads>(
        ring + (tile % kStages) * kWT * kRow, row_offset + (tile % kStages) * kWT, k1_group, tid,
        [](int row, int chunk) { return row * kRow + chunk * 8; });
  };

  // This warp's 16 windows of the tile in shared memory -> logits (log2 units) of rows
  // quad_row (acc[n][0..1]) and quad_row + 8 (acc[n][2..3]), windows 8n + 2*quad_col + {0,1}.
  auto score_tile = [&](int tile, float(&acc)[2][4]) {
    const T* base = ring + (tile % kStages) * kWT * kRow + (warp * 16) * kRow;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    }
#pragma unroll
    for (int s = 0; s < kSteps; s += 2) {
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        // matrices: dims [16s, +8), [16s + 8, +8), [16s + 16, +8), [16s + 24, +8) of 8 windows
        uint32_t b[4];
        ptx::ldmatrix_x4(b, base + (8 * n + (lane % 8)) * kRow + 16 * s + 8 * (lane / 8));
        ptx::mma_m16n8k16<T>(acc[n], qa[s], b[0], b[1]);
        ptx::mma_m16n8k16<T>(acc[n], qa[s + 1], b[2], b[3]);
      }
    }
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] *= geo.scale_log2;
    }
  };

  auto sweep = [&](auto&& body) {
    K1RowLocator<kWT, kStages> rows{row_offset, rt_row, geo, n_vis, ratio, tid};
    ring_sweep<kStages, false>(0, n_tiles, true, rows, load_tile, body);
  };

  // ---- pass 1: per-head softmax max and sum (log2 units) ----
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  sweep([&](int tile) {
    float acc[2][4];
    score_tile(tile, acc);
    const int c0 = tile * kWT + warp * 16 + 2 * quad_col;
#pragma unroll
    for (int up = 0; up < 2; ++up) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (c0 + 8 * n + e < n_vis) tile_max = fmaxf(tile_max, acc[n][2 * up + e]);
        }
      }
      const float m_new = fmaxf(m[up], tile_max);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (c0 + 8 * n + e < n_vis) sum += ptx::exp2_ftz(acc[n][2 * up + e] - m_safe);
        }
      }
      l[up] = l[up] * ptx::exp2_ftz(m[up] - m_safe) + sum;
      m[up] = m_new;
    }
  });
  // merge over the quad's lanes, then over warps
#pragma unroll
  for (int up = 0; up < 2; ++up) {
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[up], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[up], off);
      const float m_new = fmaxf(m[up], m_o);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      l[up] = l[up] * ptx::exp2_ftz(m[up] - m_safe) + l_o * ptx::exp2_ftz(m_o - m_safe);
      m[up] = m_new;
    }
    if (quad_col == 0) {
      warp_m[warp * kMaxGroupHeads + quad_row + 8 * up] = m[up];
      warp_l[warp * kMaxGroupHeads + quad_row + 8 * up] = l[up];
    }
  }
  __syncthreads();
  if (tid < kMaxGroupHeads) {
    float mm = -INFINITY;
    for (int w = 0; w < NW; ++w) mm = fmaxf(mm, warp_m[w * kMaxGroupHeads + tid]);
    const float m_safe = mm == -INFINITY ? 0.f : mm;
    float ll = 0.f;
    for (int w = 0; w < NW; ++w) {
      ll += warp_l[w * kMaxGroupHeads + tid] *
            ptx::exp2_ftz(warp_m[w * kMaxGroupHeads + tid] - m_safe);
    }
    row_m[tid] = m_safe;
    row_il[tid] = ll > 0.f ? 1.f / ll : 0.f;  // no visible window: every probability is 0
  }
  __syncthreads();

  // ---- pass 2: group probability of each window, max-pooled into its blocks ----
  const bool live_lo = quad_row < geo.group_heads;
  const bool live_hi = quad_row + 8 < geo.group_heads;
  const float m_lo = row_m[quad_row], il_lo = live_lo ? row_il[quad_row] : 0.f;
  const float m_hi = row_m[quad_row + 8], il_hi = live_hi ? row_il[quad_row + 8] : 0.f;
  sweep([&](int tile) {
    float acc[2][4];
    score_tile(tile, acc);
    const int c0 = tile * kWT + warp * 16 + 2 * quad_col;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = c0 + 8 * n + e;
        // a row past the group's heads has il 0 and a finite m (its q is 0): it adds 0
        float p = 0.f;
        if (c < n_vis) {
          p = fmaf(ptx::exp2_ftz(acc[n][2 + e] - m_hi), il_hi,
                   ptx::exp2_ftz(acc[n][e] - m_lo) * il_lo);
        }
        p += __shfl_xor_sync(0xffffffffu, p, 4);
        p += __shfl_xor_sync(0xffffffffu, p, 8);
        p += __shfl_xor_sync(0xffffffffu, p, 16);
        // one lane per window pools the one float: block (c + 1) / r, and block (c + 1) / r - 1
        // when the window is also the last of that block's range [r*b - 1, r*b + r)
        if (quad_row == 0 && c < n_vis) {
          const int b = (c + 1) / ratio;
          const uint32_t bits = __float_as_uint(p);
          if (b < n_elig) atomicMax(&scores[b], bits);
          if ((c + 1) % ratio == 0 && b >= 1 && b - 1 < n_elig) atomicMax(&scores[b - 1], bits);
        }
      }
    }
  });

  // ---- select: the num_selected largest keys (hi desc, block asc) ----
  // Blocks after the query's have hi 0 and can only pad; the chosen ones come out as -1.
  const int k = geo.num_selected;
  const int init_blocks = geo.init_blocks, local_blocks = geo.local_blocks;
  auto key_of = [&](int b) {
    const uint32_t hi = block_hi(scores[b], b, qb, init_blocks, local_blocks);
    return (static_cast<uint64_t>(hi) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(b));
  };
  int n_chosen = n_elig;  // candidates gathered in `chosen` (keys are distinct: blocks are)
  if (n_elig <= k) {
    for (int b = tid; b < n_elig; b += kThreads) chosen[b] = key_of(b);
  } else {
    // radix select of the k-th largest hi over the eligible blocks (all hi >= 1), a byte a pass
    n_chosen = k;
    uint32_t prefix = 0u, mask = 0u;
    int remaining = k;  // rank, among the keys matching prefix, of the k-th largest
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0u;
      __syncthreads();
      for (int b = tid; b < n_elig; b += kThreads) {
        const uint32_t h = block_hi(scores[b], b, qb, init_blocks, local_blocks);
        if ((h & mask) == prefix) atomicAdd(&hist[(h >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int cum = 0, d = 255;
        for (; d > 0; --d) {
          if (cum + static_cast<int>(hist[d]) >= remaining) break;
          cum += static_cast<int>(hist[d]);
        }
        shared_int[0] = d;
        shared_int[1] = remaining - cum;
      }
      __syncthreads();
      prefix |= static_cast<uint32_t>(shared_int[0]) << shift;
      mask |= 255u << shift;
      remaining = shared_int[1];
      __syncthreads();  // shared_int is rewritten by the next digit
    }
    const uint32_t kth = prefix;       // the k-th largest hi
    const int take_equal = remaining;  // how many keys with hi == kth are chosen: the lowest b
    const int n_greater = k - take_equal;
    int* greater_count = shared_int + 2;
    int* warp_equal = shared_int + 4;  // [NW]
    if (tid == 0) *greater_count = 0;
    __syncthreads();
    int equal_before = 0;  // keys with hi == kth in earlier chunks (same on every thread)
    for (int base = 0; base < n_elig; base += kThreads) {
      const int b = base + tid;
      const uint32_t h = b < n_elig ? block_hi(scores[b], b, qb, init_blocks, local_blocks) : 0u;
      const bool equal = b < n_elig && h == kth;
      if (b < n_elig && h > kth) chosen[atomicAdd(greater_count, 1)] = key_of(b);
      const uint32_t ballot = __ballot_sync(0xffffffffu, equal);
      if (lane == 0) warp_equal[warp] = __popc(ballot);
      __syncthreads();
      int before = equal_before + __popc(ballot & ((1u << lane) - 1u));
      int total = 0;
      for (int w = 0; w < NW; ++w) {
        const int cnt = warp_equal[w];
        if (w < warp) before += cnt;
        total += cnt;
      }
      if (equal && before < take_equal) chosen[n_greater + before] = key_of(b);
      equal_before += total;
      __syncthreads();  // warp_equal is rewritten by the next chunk
    }
  }
  __syncthreads();
  // rank sort of the candidates, best first; the rest of the row pads with -1
  int32_t* out_row = out + (t * geo.groups + g) * int64_t{k};
  for (int i = tid; i < n_chosen; i += kThreads) {
    const uint64_t key = chosen[i];
    int rank = 0;
    for (int j = 0; j < n_chosen; ++j) rank += chosen[j] > key;
    out_row[rank] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
  }
  for (int i = n_chosen + tid; i < k; i += kThreads) out_row[i] = -1;
}

// ---- token-tiled variant (prefill) ----
// The per-token kernel reads every visible K1 row from L2 twice per (token, kv head): at 128K
// context that is 2 x 2 MiB per pair, 64 GiB for an 8192-token chunk. Neighbouring tokens of one
// request see (almost) the same windows, so here a CTA takes TT consecutive tokens, one warp per
// token (its 16 head rows are one m16 tile), and every K1 tile staged in shared memory serves all
// TT of them: L2 traffic / TT. Each warp owns its token's softmax statistics, block scores and
// top-k, so nothing is merged across warps. Tokens of a tile that belong to different requests
// (a request's first or last tokens) are swept one request at a time.
//
// Block scores are kept for one segment of `segment` blocks at a time: the second pass sweeps
// the windows of a segment's blocks, and each warp merges the segment's blocks into its token's
// running num_selected best. So shared memory does not grow with the context: at 512K (8192
// blocks) 8 scores rows of the whole width would leave one CTA of 4 warps per SM. The result is
// the same for any segment length: scores are exact per block, and the merge keeps the order
// (score desc, block asc).
//
// Dynamic shared memory (tiled_smem_bytes<D, TT>):
//   max(K1 ring, TT * (1024 + align16(8 * num_selected)))
//       the ring (kTiledStages * kTiledWindows * (D + 8) * 2) while sweeping; each warp's radix
//       histogram and chosen keys while selecting (no copy is in flight then: each sweep ends
//       with cp.async.wait_group 0 and a barrier, and the next starts after one)
//   + TT * align16(8 * num_selected) each warp's best keys so far, sorted (kept across segments)
//   + TT * align16(4 * segment)      block scores of the current segment, one row per token
//   + tiled_scratch_bytes(TT)        row offsets, tile bookkeeping

constexpr int kTiledWindows = 32;  // windows per staged tile: 4 n8 tiles per warp
constexpr int kTiledStages = 4;

// A stage holds kTiledWindows K1 rows in 128-byte-swizzled atoms of 64 elements (the layout
// wgmma reads; see swizzled_offset), 1024-byte aligned: 1024 bytes of slack let the ring
// start at the first aligned address of the dynamic shared memory.
template <int D>
__host__ __device__ constexpr int64_t tiled_ring_bytes() {
  return int64_t{kTiledStages} * kTiledWindows * D * 2 + 1024;
}

// one warp's selection scratch: histogram, then chosen keys
__host__ __device__ constexpr int64_t tiled_select_bytes(int64_t num_selected) {
  return 256 * 4 + align16(8 * num_selected);
}

template <int D>
__host__ __device__ constexpr int64_t tiled_union_bytes(int tt, int64_t num_selected) {
  return tiled_ring_bytes<D>() > tt * tiled_select_bytes(num_selected)
             ? tiled_ring_bytes<D>()
             : tt * tiled_select_bytes(num_selected);
}

__host__ __device__ constexpr int64_t tiled_scratch_bytes(int tt) {
  return align16(int64_t{kTiledStages} * kTiledWindows * 8 + int64_t{4} * tt * 4);
}

template <int D, int TT>
int64_t tiled_smem_bytes(int64_t segment, int64_t num_selected) {
  return tiled_union_bytes<D>(TT, num_selected) + TT * align16(8 * num_selected) +
         TT * align16(4 * segment) + tiled_scratch_bytes(TT);
}

// Register cap from the CTAs per SM that shared memory allows at 128K context (a width and a
// segment of 2048 blocks, D 128): three of 4 warps, two of 8.
template <int D, int TT, typename T>
__global__ void __launch_bounds__(32 * TT, TT >= 8 ? 2 : 3) select_blocks_tiled_kernel(
    const T* __restrict__ q, const T* __restrict__ k1, const int32_t* __restrict__ req_to_token,
    const int32_t* __restrict__ token_req, const int32_t* __restrict__ token_pos,
    int32_t* __restrict__ out, const Geometry geo) {
  constexpr int kThreads = 32 * TT;
  constexpr int kWT = kTiledWindows;
  constexpr int kStages = kTiledStages;
  constexpr int kStage = kWT * D;  // elements per staged tile
  constexpr int kChunks = D / 8;
  constexpr int kSteps = D / 16;
  constexpr int kN = kWT / 8;  // n8 tiles per warp per staged tile
  static_assert(kSteps % 2 == 0 && D % 64 == 0, "head dim must be a multiple of 64");
  static_assert(kWT <= kThreads, "one thread per staged row looks up its page");
  static_assert(2 * kN == 8, "each quad row pools exactly one of the tile's (n, e) windows");
  static_assert(TT % 4 == 0, "wgmma scores whole warpgroups of 4 tokens");
  constexpr uint32_t kFull = 0xffffffffu;

  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t score_row = align16(4 * int64_t{geo.segment});  // bytes per token
  const int64_t best_row = align16(8 * int64_t{geo.num_selected});
  const int64_t union_bytes = tiled_union_bytes<D>(TT, geo.num_selected);
  T* ring = reinterpret_cast<T*>(smem + ((1024 - ptx::smem_addr(smem) % 1024) % 1024));
  unsigned char* best_all = smem + union_bytes;
  unsigned char* scores_all = best_all + TT * best_row;
  int64_t* row_offset = reinterpret_cast<int64_t*>(scores_all + TT * score_row);  // [stages][kWT]
  int* tile_req = reinterpret_cast<int*>(row_offset + kStages * kWT);             // [TT]
  int* tile_nvis = tile_req + TT;                                                 // [TT]
  int* tile_nelig = tile_nvis + TT;                                               // [TT]
  int* tile_pending = tile_nelig + TT;                                            // [TT]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad_row = lane / 4;
  const int quad_col = lane % 4;
  const int g = static_cast<int>(blockIdx.x % geo.groups);
  const int64_t t = int64_t{blockIdx.x / geo.groups} * TT + warp;
  const bool in_range = t < geo.tokens;
  uint32_t* scores = reinterpret_cast<uint32_t*>(scores_all + warp * score_row);
  uint64_t* best = reinterpret_cast<uint64_t*>(best_all + warp * best_row);  // sorted, best first
  // selection scratch, overlaying the ring (see the layout above)
  unsigned char* select_scratch = smem + warp * tiled_select_bytes(geo.num_selected);
  uint32_t* hist = reinterpret_cast<uint32_t*>(select_scratch);              // [256]
  uint64_t* chosen = reinterpret_cast<uint64_t*>(select_scratch + 256 * 4);  // [k]

  // this warp's token, exactly as the per-token kernel sees it
  const int req = in_range ? token_req[t] : -1;
  const int pos = in_range ? token_pos[t] : -1;
  const int length = pos + 1;
  int n_vis = length >= geo.kernel_size ? (length - geo.kernel_size) / geo.kernel_stride + 1 : 0;
  if (req < 0) n_vis = 0;
  const int qb = pos / geo.block_size;
  const int ratio = geo.block_size / geo.kernel_stride;
  const int n_elig = pos < 0 ? 0 : min(qb + 1, geo.width);
  if (lane == 0) {
    tile_req[warp] = req;
    tile_nvis[warp] = n_vis;
    tile_nelig[warp] = n_elig;
    tile_pending[warp] = in_range ? 1 : 0;
  }

  uint32_t qa[kSteps][4];
  {
    const uint16_t* q_tok = reinterpret_cast<const uint16_t*>(q) +
                            (in_range ? t : 0) * geo.stride_qt +
                            int64_t{g} * geo.group_heads * geo.stride_qh;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int up = 0; up < 2; ++up) {
          const int row = quad_row + 8 * up;
          const int col = 16 * s + 8 * half + 2 * quad_col;
          uint32_t pair = 0u;
          if (in_range && row < geo.group_heads) {
            const uint16_t* p = q_tok + row * geo.stride_qh + col;
            pair = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 16);
          }
          qa[s][2 * half + up] = pair;
        }
      }
    }
  }
  __syncthreads();  // tile bookkeeping is written

  const T* k1_group = k1 + int64_t{g} * geo.stride_kg;
  const float scale_log2 = geo.scale_log2;  // > 0 (checked on the host)
  const bool live_lo = quad_row < geo.group_heads;
  const bool live_hi = quad_row + 8 < geo.group_heads;
  bool pending = in_range;  // warp-uniform

  // One sweep per distinct request among the tile's tokens (one in the common case). Every
  // thread reads the same bookkeeping, so the loop and its barriers are uniform over the CTA.
  for (;;) {
    int leader = -1;
    for (int w = 0; w < TT; ++w) {
      if (tile_pending[w]) {
        leader = w;
        break;
      }
    }
    if (leader < 0) break;
    const int sweep_req = tile_req[leader];
    int sweep_vis = 0, sweep_elig = 0;
    for (int w = 0; w < TT; ++w) {
      if (tile_pending[w] && tile_req[w] == sweep_req) {
        sweep_vis = max(sweep_vis, tile_nvis[w]);
        sweep_elig = max(sweep_elig, tile_nelig[w]);
      }
    }
    const bool active = pending && req == sweep_req;
    __syncthreads();  // every thread has read tile_pending before it changes
    if (active && lane == 0) tile_pending[warp] = 0;
    pending = pending && !active;

    const int32_t* rt_row = req_to_token + (sweep_req < 0 ? 0 : int64_t{sweep_req}) * geo.stride_rt;
    const int n_tiles = (sweep_vis + kWT - 1) / kWT;

    auto load_tile = [&](int tile) {
      stage_k1_rows<kWT, kChunks, kThreads>(ring + (tile % kStages) * kStage,
                                            row_offset + (tile % kStages) * kWT, k1_group, tid,
                                            swizzled_offset<kWT>);
    };
    // the staged tile's kWT windows -> this token's raw q.k (times scale_log2 where used, fused
    // into the exp2 argument; the tile max is taken before scaling, which commutes with a
    // positive scale exactly): rows quad_row
    // (acc[n][0..1]) and quad_row + 8 (acc[n][2..3]), windows 8n + 2*quad_col + {0,1}.
    // On sm_90a each warpgroup's four tokens are one m64 wgmma tile over the staged windows
    // (the B operand read once from shared memory for the four), so every warp of the CTA
    // scores every tile, in or out of the sweep; elsewhere each warp runs its own mma.sync.
    auto score_tile = [&](int tile, float(&acc)[kN][4]) {
      const T* base = ring + (tile % kStages) * kStage;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
      }
#ifdef SALA_PTX_SM90A
      ptx::wgmma_fence();
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        // k-slice s: atom s / 4, 32 bytes per 16 elements into its swizzled rows
        const T* slice = base + (s / 4) * kWT * 64 + (s % 4) * 16;
        ptx::wgmma_m64n32k16<T>(acc, qa[s], ptx::wgmma_desc_sw128(slice), s > 0);
      }
      ptx::wgmma_commit();
      ptx::wgmma_wait<0>();
#else
#pragma unroll
      for (int s = 0; s < kSteps; s += 2) {
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          // lanes 8i .. 8i + 7: rows 8n + [0, 8) at 16-byte chunk 2s + i
          uint32_t b[4];
          ptx::ldmatrix_x4(b, base + swizzled_offset<kWT>(8 * n + lane % 8, 2 * s + lane / 8));
          ptx::mma_m16n8k16<T>(acc[n], qa[s], b[0], b[1]);
          ptx::mma_m16n8k16<T>(acc[n], qa[s + 1], b[2], b[3]);
        }
      }
#endif
    };
#ifdef SALA_PTX_SM90A
    constexpr bool kWgmma = true;
#else
    constexpr bool kWgmma = false;
#endif
    // warps not in this sweep copy and wait and (but for wgmma's warpgroups) score nothing;
    // bodies return after scoring for them
    auto sweep = [&](int first, int end, auto&& body) {
      K1RowLocator<kWT, kStages> rows{row_offset, rt_row, geo, sweep_vis, ratio, tid};
      ring_sweep<kStages, kWgmma>(first, end, active || kWgmma, rows, load_tile, body);
    };

    // ---- pass 1: this token's per-head softmax max and sum (log2 units) ----
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};
    // Tiles wholly inside the token's windows (all but its last) skip the per-window masks.
    sweep(0, n_tiles, [&](int tile) {
      float acc[kN][4];
      score_tile(tile, acc);
      if (!active) return;
      const int c0 = tile * kWT + 2 * quad_col;
      auto accumulate = [&](auto whole) {
        constexpr bool kWhole = decltype(whole)::value;
#pragma unroll
        for (int up = 0; up < 2; ++up) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int n = 0; n < kN; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (kWhole || c0 + 8 * n + e < n_vis) {
                tile_max = fmaxf(tile_max, acc[n][2 * up + e]);
              }
            }
          }
          const float m_new = fmaxf(m[up], tile_max * scale_log2);
          const float m_safe = m_new == -INFINITY ? 0.f : m_new;
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < kN; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (kWhole || c0 + 8 * n + e < n_vis) {
                sum += ptx::exp2_ftz(fmaf(acc[n][2 * up + e], scale_log2, -m_safe));
              }
            }
          }
          l[up] = l[up] * ptx::exp2_ftz(m[up] - m_safe) + sum;
          m[up] = m_new;
        }
      };
      if ((tile + 1) * kWT <= n_vis) {
        accumulate(std::true_type{});
      } else {
        accumulate(std::false_type{});
      }
    });
    // merge over the quad's lanes: the warp then holds its rows' full statistics
    float m_row[2], il_row[2];
#pragma unroll
    for (int up = 0; up < 2; ++up) {
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        const float m_o = __shfl_xor_sync(kFull, m[up], off);
        const float l_o = __shfl_xor_sync(kFull, l[up], off);
        const float m_new = fmaxf(m[up], m_o);
        const float m_safe = m_new == -INFINITY ? 0.f : m_new;
        l[up] = l[up] * ptx::exp2_ftz(m[up] - m_safe) + l_o * ptx::exp2_ftz(m_o - m_safe);
        m[up] = m_new;
      }
      m_row[up] = m[up] == -INFINITY ? 0.f : m[up];
      il_row[up] = l[up] > 0.f ? 1.f / l[up] : 0.f;
    }
    const float m_lo = m_row[0], il_lo = live_lo ? il_row[0] : 0.f;
    const float m_hi = m_row[1], il_hi = live_hi ? il_row[1] : 0.f;
    // ---- pass 2, a segment of blocks at a time: the group probability of each window,
    // max-pooled into its blocks [b0, b1), then merged into the token's best keys ----
    for (int b0 = 0; b0 < sweep_elig; b0 += geo.segment) {
      const int b1 = min(b0 + geo.segment, sweep_elig);
      // block b pools windows [ratio * b - 1, ratio * b + ratio)
      const int c_lo = max(0, ratio * b0 - 1);
      const int c_hi = min(sweep_vis, ratio * b1);
      const int first = c_lo / kWT;
      const int end = c_hi > c_lo ? (c_hi - 1) / kWT + 1 : first;
      const int n_seg = max(0, min(b1, n_elig) - b0);  // this token's blocks in the segment
      if (active) {
        for (int i = lane; i < n_seg; i += 32) scores[i] = 0u;
        __syncwarp();
      }
      sweep(first, end, [&](int tile) {
        float acc[kN][4];
        score_tile(tile, acc);
        if (!active) return;
        const int c0 = tile * kWT + 2 * quad_col;
        // v[2n + e]: this lane's head rows' share of window c0 + 8n + e
        float v[8];
        auto shares = [&](auto whole) {
          constexpr bool kWhole = decltype(whole)::value;
#pragma unroll
          for (int n = 0; n < kN; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              // a row past the group's heads has il 0 and a finite m (its q is 0): it adds 0
              float p = 0.f;
              if (kWhole || c0 + 8 * n + e < n_vis) {
                p = fmaf(ptx::exp2_ftz(fmaf(acc[n][2 + e], scale_log2, -m_hi)), il_hi,
                         ptx::exp2_ftz(fmaf(acc[n][e], scale_log2, -m_lo)) * il_lo);
              }
              v[2 * n + e] = p;
            }
          }
        };
        if ((tile + 1) * kWT <= n_vis) {
          shares(std::true_type{});
        } else {
          shares(std::false_type{});
        }
        // Sum each window over the 8 quad rows as a reduce-scatter: at each step a lane keeps
        // half of its values and adds its partner's share of them, so quad row r ends with the
        // one sum v[r] (7 shuffles instead of 3 per window), and one atomic instruction pools
        // all 32.
        const bool r2 = (quad_row & 4) != 0, r1 = (quad_row & 2) != 0, r0 = (quad_row & 1) != 0;
        float w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float give = r2 ? v[i] : v[i + 4];
          w[i] = (r2 ? v[i + 4] : v[i]) + __shfl_xor_sync(kFull, give, 16);
        }  // w[i]: j = i + 4 * r2
        float x[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float give = r1 ? w[i] : w[i + 2];
          x[i] = (r1 ? w[i + 2] : w[i]) + __shfl_xor_sync(kFull, give, 8);
        }  // x[i]: j = i + 2 * r1 + 4 * r2
        const float give_last = r0 ? x[0] : x[1];
        const float mine = (r0 ? x[1] : x[0]) + __shfl_xor_sync(kFull, give_last, 4);  // j = r
        const int my_c = c0 + 8 * (quad_row / 2) + quad_row % 2;
        if (my_c < n_vis) {
          // this segment's part of [0, n_elig): blocks b0 + [0, n_seg)
          const int b = (my_c + 1) / ratio - b0;
          const uint32_t bits = __float_as_uint(mine);
          if (b >= 0 && b < n_seg) atomicMax(&scores[b], bits);
          if ((my_c + 1) % ratio == 0 && b >= 1 && b - 1 < n_seg) {
            atomicMax(&scores[b - 1], bits);
          }
        }
      });

      // ---- merge (one warp per token): the k largest keys (hi desc, block asc) among the
      // best so far and the segment's blocks. Items i < n_best are the best keys, sorted; the
      // rest are blocks b0 + i - n_best, all above every earlier block, so taking items with
      // equal hi in item order takes the lower blocks first. A token whose blocks end before
      // b0 has nothing to merge. ----
      if (active && n_seg > 0) {
        __syncwarp();  // this warp's pooling is complete
        const int k = geo.num_selected;
        const int init_blocks = geo.init_blocks, local_blocks = geo.local_blocks;
        const uint32_t lanes_below = (1u << lane) - 1u;
        // every eligible block before b0 has been merged, and each merge keeps the k best
        const int n_best = min(k, min(b0, n_elig));
        const int n_items = n_best + n_seg;
        auto key_of = [&](int i) -> uint64_t {
          if (i < n_best) return best[i];
          const int b = b0 + i - n_best;
          const uint32_t hi = block_hi(scores[i - n_best], b, qb, init_blocks, local_blocks);
          return (static_cast<uint64_t>(hi) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(b));
        };
        auto hi_of = [&](int i) { return static_cast<uint32_t>(key_of(i) >> 32); };
        int n_chosen = n_items;
        if (n_items <= k) {
          for (int i = lane; i < n_items; i += 32) chosen[i] = key_of(i);
        } else {
          n_chosen = k;
          uint32_t prefix = 0u, mask = 0u;
          int remaining = k;  // rank, among the keys matching prefix, of the k-th largest
          for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = lane; i < 256; i += 32) hist[i] = 0u;
            __syncwarp();
            for (int base = 0; base < n_items; base += 32) {
              const int i = base + lane;
              const uint32_t h = i < n_items ? hi_of(i) : 0u;
              const bool in = i < n_items && (h & mask) == prefix;
              const uint32_t digit = (h >> shift) & 255u;
              const uint32_t in_lanes = __ballot_sync(kFull, in);
              // one atomic per distinct digit: the top digits of similar scores mostly coincide
              if (in) {
                const uint32_t peers = __match_any_sync(in_lanes, digit);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
              }
            }
            __syncwarp();
            // lane j holds bins [8j, 8j + 8); the digit is where the count from the top reaches
            // `remaining`
            uint32_t bins[8];
            uint32_t own = 0u;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              bins[j] = hist[8 * lane + j];
              own += bins[j];
            }
            uint32_t from_here = own;  // keys with digit >= 8 * lane
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
              const uint32_t v = __shfl_down_sync(kFull, from_here, off);
              if (lane + off < 32) from_here += v;
            }
            const uint32_t above = from_here - own;  // keys with digit >= 8 * (lane + 1)
            const uint32_t want = static_cast<uint32_t>(remaining);
            const bool crossing = above < want && want <= from_here;
            int digit_found = 0, rest = 0;
            if (crossing) {
              uint32_t cum = above;
#pragma unroll
              for (int j = 7; j >= 0; --j) {
                if (cum + bins[j] >= want) {
                  digit_found = 8 * lane + j;
                  rest = static_cast<int>(want - cum);
                  break;
                }
                cum += bins[j];
              }
            }
            const int src = __ffs(__ballot_sync(kFull, crossing)) - 1;
            digit_found = __shfl_sync(kFull, digit_found, src);
            rest = __shfl_sync(kFull, rest, src);
            prefix |= static_cast<uint32_t>(digit_found) << shift;
            mask |= 255u << shift;
            remaining = rest;
            __syncwarp();  // the histogram is cleared for the next digit
          }
          const uint32_t kth = prefix;
          const int take_equal = remaining;  // the first items (lowest blocks) with hi == kth
          const int n_greater = k - take_equal;
          int greater_before = 0, equal_before = 0;
          for (int base = 0; base < n_items; base += 32) {
            const int i = base + lane;
            const uint32_t h = i < n_items ? hi_of(i) : 0u;
            const bool greater = i < n_items && h > kth;
            const bool equal = i < n_items && h == kth;
            const uint32_t greater_lanes = __ballot_sync(kFull, greater);
            const uint32_t equal_lanes = __ballot_sync(kFull, equal);
            if (greater) chosen[greater_before + __popc(greater_lanes & lanes_below)] = key_of(i);
            const int rank_equal = equal_before + __popc(equal_lanes & lanes_below);
            if (equal && rank_equal < take_equal) chosen[n_greater + rank_equal] = key_of(i);
            greater_before += __popc(greater_lanes);
            equal_before += __popc(equal_lanes);
          }
        }
        __syncwarp();  // `chosen` is complete
        // rank sort into `best` (keys are distinct: blocks are), best first
        for (int i = lane; i < n_chosen; i += 32) {
          const uint64_t key = chosen[i];
          int rank = 0;
          for (int j = 0; j < n_chosen; ++j) rank += chosen[j] > key;
          best[rank] = key;
        }
        __syncwarp();  // `best` is complete before the next merge or the output reads it
      }
    }

    if (active) {
      const int k = geo.num_selected;
      const int n_best = min(k, n_elig);  // keys in `best`
      int32_t* out_row = out + (t * geo.groups + g) * int64_t{k};
      for (int i = lane; i < k; i += 32) {
        out_row[i] =
            i < n_best ? static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(best[i])) : -1;
      }
    }
    __syncthreads();  // tile_pending is read again by the next sweep's leader search
  }
}

template <int D, int NW, typename T>
void launch(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& req_to_token,
            const at::Tensor& token_req, const at::Tensor& token_pos, at::Tensor& out,
            const Geometry& geo, int64_t smem) {
  auto kernel = select_blocks_kernel<D, NW, T>;
  // Above 48 KiB a kernel must opt in; more than the device allows fails here, loudly.
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const int64_t ctas = int64_t{geo.tokens} * geo.groups;
  kernel<<<static_cast<unsigned>(ctas), Tiling<NW>::kThreads, static_cast<size_t>(smem),
           c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k1.data_ptr()),
      req_to_token.data_ptr<int32_t>(), token_req.data_ptr<int32_t>(),
      token_pos.data_ptr<int32_t>(), out.data_ptr<int32_t>(), geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D, int TT, typename T>
void launch_tiled(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& req_to_token,
                  const at::Tensor& token_req, const at::Tensor& token_pos, at::Tensor& out,
                  const Geometry& geo, int64_t smem) {
  auto kernel = select_blocks_tiled_kernel<D, TT, T>;
  // Above 48 KiB a kernel must opt in; more than the device allows fails here, loudly.
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const int64_t ctas = (int64_t{geo.tokens} + TT - 1) / TT * geo.groups;
  kernel<<<static_cast<unsigned>(ctas), 32 * TT, static_cast<size_t>(smem),
           c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k1.data_ptr()),
      req_to_token.data_ptr<int32_t>(), token_req.data_ptr<int32_t>(),
      token_pos.data_ptr<int32_t>(), out.data_ptr<int32_t>(), geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The dynamic shared memory of a variant's launch: tile_tokens 8 or 4 is the token-tiled kernel
// with `segment` blocks of scores per token, 0 the per-token kernel `warps` warps wide. The launch
// and select_blocks_smem_bytes both take it from here.
template <int D>
int64_t variant_smem_bytes(int64_t tile_tokens, int64_t warps, int64_t width, int64_t segment,
                           int64_t num_selected) {
  if (tile_tokens == 8) return tiled_smem_bytes<D, 8>(segment, num_selected);
  if (tile_tokens == 4) return tiled_smem_bytes<D, 4>(segment, num_selected);
  if (warps == 8) return smem_bytes<D, 8>(width, num_selected);
  return smem_bytes<D, 4>(width, num_selected);
}

template <int D, typename T>
void launch_variant(int64_t tile_tokens, int64_t warps, const at::Tensor& q, const at::Tensor& k1,
                    const at::Tensor& req_to_token, const at::Tensor& token_req,
                    const at::Tensor& token_pos, at::Tensor& out, const Geometry& geo) {
  const int64_t smem =
      variant_smem_bytes<D>(tile_tokens, warps, geo.width, geo.segment, geo.num_selected);
  if (tile_tokens == 8) {
    launch_tiled<D, 8, T>(q, k1, req_to_token, token_req, token_pos, out, geo, smem);
  } else if (tile_tokens == 4) {
    launch_tiled<D, 4, T>(q, k1, req_to_token, token_req, token_pos, out, geo, smem);
  } else if (warps == 8) {
    launch<D, 8, T>(q, k1, req_to_token, token_req, token_pos, out, geo, smem);
  } else {
    launch<D, 4, T>(q, k1, req_to_token, token_req, token_pos, out, geo, smem);
  }
}

template <typename T>
void launch_for_dim(int64_t dim, int64_t tile_tokens, int64_t warps, const at::Tensor& q,
                    const at::Tensor& k1, const at::Tensor& req_to_token,
                    const at::Tensor& token_req, const at::Tensor& token_pos, at::Tensor& out,
                    const Geometry& geo) {
  if (dim == 64) {
    launch_variant<64, T>(tile_tokens, warps, q, k1, req_to_token, token_req, token_pos, out, geo);
  } else {
    launch_variant<128, T>(tile_tokens, warps, q, k1, req_to_token, token_req, token_pos, out, geo);
  }
}

// What select_blocks and select_blocks_smem_bytes accept: the compiled head dims and variants,
// and the sizes the layouts assume.
void check_variant(const char* op, int64_t dim, int64_t tile_tokens, int64_t warps, int64_t segment,
                   int64_t num_selected, int64_t width) {
  TORCH_CHECK(dim == 64 || dim == 128, op, ": head dim ", dim, " not compiled: use 64 or 128");
  TORCH_CHECK(tile_tokens == 0 || tile_tokens == 4 || tile_tokens == 8, op, ": tile_tokens ",
              tile_tokens,
              " not compiled: use 0 (the per-token kernel) or 4 or 8 (tokens per CTA of the "
              "token-tiled kernel)");
  TORCH_CHECK(warps == 4 || warps == 8, op, ": warps ", warps,
              " not compiled: use 4 or 8 (the per-token kernel's warps per CTA)");
  TORCH_CHECK(segment >= 1, op, ": segment ", segment,
              " must be at least 1 (blocks of scores the token-tiled kernel keeps at a time)");
  TORCH_CHECK(num_selected >= 1 && width >= num_selected && width < (int64_t{1} << 30), op,
              ": need 1 <= num_selected <= width < 2^30, got ", num_selected, " and ", width);
}

void check_index(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.device() == q.device() && x.scalar_type() == at::kInt, "select_blocks: ", name,
              " must be int32 on ", q.device(), ", got ", x.scalar_type(), " on ", x.device());
}

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& req_to_token,
                         const at::Tensor& token_req, const at::Tensor& token_pos,
                         int64_t kernel_size, int64_t kernel_stride, int64_t block_size,
                         int64_t init_blocks, int64_t local_blocks, int64_t num_selected,
                         int64_t width, double scale, int64_t tile_tokens, int64_t warps,
                         int64_t segment) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1,
              "select_blocks: q must be a CUDA tensor [tokens, heads, dim] contiguous in dim, got ",
              q.sizes(), " on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "select_blocks: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k1.device() == q.device() && k1.scalar_type() == q.scalar_type() && k1.dim() == 4 &&
                  k1.size(3) == q.size(2),
              "select_blocks: k1 must be ", q.scalar_type(), " [pages, rows, groups, ", q.size(2),
              "] on ", q.device(), ", got ", k1.scalar_type(), " ", k1.sizes());
  TORCH_CHECK(k1.stride(3) == 1 && k1.stride(0) % 8 == 0 && k1.stride(1) % 8 == 0 &&
                  k1.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(k1.data_ptr()) % 16 == 0,
              "select_blocks: k1 rows must be contiguous and 16-byte aligned, got strides ",
              k1.strides());
  TORCH_CHECK(req_to_token.dim() == 2 && req_to_token.stride(1) == 1,
              "select_blocks: req_to_token must be [requests, tokens] contiguous in tokens");
  check_index(req_to_token, "req_to_token", q);
  check_index(token_req, "token_req", q);
  check_index(token_pos, "token_pos", q);
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2), groups = k1.size(2);
  TORCH_CHECK(token_req.dim() == 1 && token_req.size(0) == tokens && token_req.is_contiguous() &&
                  token_pos.dim() == 1 && token_pos.size(0) == tokens && token_pos.is_contiguous(),
              "select_blocks: token_req and token_pos must be contiguous [", tokens, "]");
  TORCH_CHECK(groups > 0 && heads % groups == 0 && heads / groups <= kMaxGroupHeads,
              "select_blocks: ", heads, " query heads over ", groups,
              " kv heads: need at most 16 query heads per kv head");
  TORCH_CHECK(kernel_stride > 0 && kernel_size >= kernel_stride && block_size > 0 &&
                  kernel_size % kernel_stride == 0 && block_size % kernel_stride == 0 &&
                  k1.size(1) >= block_size / kernel_stride,
              "select_blocks: need kernel_size >= kernel_stride > 0 and kernel_size and block_size "
              "multiples of kernel_stride (k1 holding block_size / kernel_stride rows per page), "
              "got kernel ",
              kernel_size, ", stride ", kernel_stride, ", block ", block_size, ", rows ",
              k1.size(1));
  check_variant("select_blocks", dim, tile_tokens, warps, segment, num_selected, width);
  TORCH_CHECK(init_blocks >= 0 && local_blocks >= 0,
              "select_blocks: init_blocks and local_blocks must be >= 0, got ", init_blocks,
              " and ", local_blocks);
  TORCH_CHECK(tokens * groups < (int64_t{1} << 31), "select_blocks: ", tokens, " tokens too many");
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "select_blocks: scale must be positive, got ",
              scale);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({tokens, groups, num_selected}, q.options().dtype(at::kInt));
  if (tokens == 0) return out;

  Geometry geo;
  geo.stride_qt = q.stride(0);
  geo.stride_qh = q.stride(1);
  geo.stride_kp = k1.stride(0);
  geo.stride_ks = k1.stride(1);
  geo.stride_kg = k1.stride(2);
  geo.stride_rt = req_to_token.stride(0);
  geo.tokens = static_cast<int>(tokens);
  geo.groups = static_cast<int>(groups);
  geo.group_heads = static_cast<int>(heads / groups);
  geo.kernel_size = static_cast<int>(kernel_size);
  geo.kernel_stride = static_cast<int>(kernel_stride);
  geo.block_size = static_cast<int>(block_size);
  geo.k1_lag = static_cast<int>(kernel_size / kernel_stride - 1);
  geo.init_blocks = static_cast<int>(std::min<int64_t>(init_blocks, 1 << 30));
  geo.local_blocks = static_cast<int>(std::min<int64_t>(local_blocks, 1 << 30));
  geo.num_selected = static_cast<int>(num_selected);
  geo.width = static_cast<int>(width);
  geo.segment = static_cast<int>(std::min(segment, width));  // a longer one holds nothing more
  geo.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  if (q.scalar_type() == at::kBFloat16) {
    launch_for_dim<__nv_bfloat16>(dim, tile_tokens, warps, q, k1, req_to_token, token_req,
                                  token_pos, out, geo);
  } else {
    launch_for_dim<__half>(dim, tile_tokens, warps, q, k1, req_to_token, token_req, token_pos, out,
                           geo);
  }
  return out;
}

// Host arithmetic only: the plan asks it on any process, GPU or not, which variants fit.
int64_t select_blocks_smem_bytes(int64_t head_dim, int64_t tile_tokens, int64_t warps,
                                 int64_t width, int64_t segment, int64_t num_selected) {
  check_variant("select_blocks_smem_bytes", head_dim, tile_tokens, warps, segment, num_selected,
                width);
  segment = std::min(segment, width);  // as select_blocks clamps it
  if (head_dim == 64) {
    return variant_smem_bytes<64>(tile_tokens, warps, width, segment, num_selected);
  }
  return variant_smem_bytes<128>(tile_tokens, warps, width, segment, num_selected);
}

// Shapes only, for torch.compile's fake tensors.
at::Tensor select_blocks_meta(const at::Tensor& q, const at::Tensor& k1, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t num_selected, int64_t, double, int64_t,
                              int64_t, int64_t) {
  return at::empty_symint({q.sym_size(0), k1.sym_size(2), c10::SymInt(num_selected)},
                          q.options().dtype(at::kInt));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sala_sglang, m) {
  m.def(
      "select_blocks(Tensor q, Tensor k1, Tensor req_to_token, Tensor token_req, "
      "Tensor token_pos, int kernel_size, int kernel_stride, int block_size, int init_blocks, "
      "int local_blocks, int num_selected, int width, float scale, int tile_tokens, int warps, "
      "int segment) -> Tensor");
  // No tensor argument: one catch-all kernel, so a CPU-only process can call it too.
  m.def(
      "select_blocks_smem_bytes(int head_dim, int tile_tokens, int warps, int width, "
      "int segment, int num_selected) -> int",
      &select_blocks_smem_bytes);
}

TORCH_LIBRARY_IMPL(sala_sglang, CUDA, m) { m.impl("select_blocks", &select_blocks); }
TORCH_LIBRARY_IMPL(sala_sglang, Meta, m) { m.impl("select_blocks", &select_blocks_meta); }
