// InfLLM-v2 block-sparse GQA attention (SPEC 2.2 step 5), the CUDA twin of the Triton
// `block_sparse_attention` in sala_sglang/ops/infllm_v2/attention.py, with the same arguments and
// semantics: query token t attends, causally (key position <= token_pos[t]), to the blocks
// selected[t, g, :] (-1 = none) when token_sparse[t], else to every block 0 .. pos / block_size.
// Block b of request r is one page of SGLang's paged cache: page = req_to_token[r, b * bs] / bs,
// slots page * bs .. page * bs + bs - 1.
//
// One CTA per (token, kv head, split). The group's query heads (at most 16) are the M = 16 rows
// of mma.sync m16n8k16, padding rows have zero queries. The whole CTA first resolves its blocks'
// index chain (selected -> req_to_token -> page start) into a shared table, up to kItemCap blocks
// at a time, so that the streaming loop issues its copies without waiting on dependent global
// loads. A block is cut into 16-key chunks and the CTA's chunk list is dealt round-robin to its
// warps; each warp streams its own chunks through its own slice of shared memory (cp.async,
// kStages deep), so the loop needs no CTA-wide barrier, and keeps its own online-softmax state
// in registers. The warps merge through shared memory at the end; with num_splits > 1 every
// split writes a normalized fp32 partial and its log2-sum-exp, and a second kernel merges the
// splits.
//
// The op runs exactly num_splits splits: how far to split (decode, where few tokens x kv heads
// leave most SMs idle) is the caller's per-forward plan (sala_sglang/ops/infllm_v2/plan.py), which
// knows the device, so nothing here queries it per call.

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ptx.cuh"

namespace {

namespace ptx = sala::ptx;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 3;  // chunks in flight per warp: kStages - 1 while one is computed
constexpr int kChunk = 16;  // keys per warp step (the k of the P.V mma)
constexpr int kRows = 16;   // mma rows: the group's query heads, padded
constexpr int kMaxGroup = kRows;
// Blocks resolved per table fill: every sparse token of the released model (96 selected) and
// every dense token up to 16K keys at block 64 fit in one fill; longer lists take several.
constexpr int kItemCap = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;        // [T, Hq, D] in q's dtype (num_splits == 1)
  float* part_o;    // [T, Hq, splits, D] (num_splits > 1)
  float* part_lse;  // [T, Hq, splits], log2 domain
  const int32_t* rt;
  const int32_t* token_req;
  const int32_t* token_pos;
  const int32_t* token_sparse;
  const int32_t* selected;
  int64_t q_st, q_sh;
  int64_t k_st, k_sg;
  int64_t v_st, v_sg;
  int64_t rt_s0, rt_s1, rt_rows, rt_cols;
  int64_t sel_st, sel_sg, sel_si;
  int64_t slots;   // rows of k/v_buffer
  int sel_groups;  // selected.size(1): the dense-only batch passes a [T, 1, 1] placeholder
  int n_sel;
  int block_size;
  int group_size;
  int query_heads;
  int num_splits;
  float qk_scale;  // scale * log2(e): the softmax runs on exp2
};

// A chunk tile is [kChunk keys][D] with the 16-byte units of key row r stored at unit ^ (r % 8):
// the 8 row addresses of one ldmatrix (8 consecutive keys, same logical unit) then fall in 8
// different bank quads, where unswizzled 128/256-byte rows would all hit the same 4 banks.
template <int D>
__device__ __forceinline__ int tile_offset(int key, int unit) {
  return key * D + ((unit ^ (key & 7)) << 3);
}

template <int D>
constexpr int pipeline_smem_bytes() {
  return kWarps * kStages * 2 * kChunk * D * 2;  // K and V chunk tiles, 2-byte elements
}

template <int D>
constexpr int merge_smem_bytes() {
  return kWarps * kRows * D * static_cast<int>(sizeof(float));
}

template <int D>
constexpr int smem_bytes() {
  return pipeline_smem_bytes<D>() > merge_smem_bytes<D>() ? pipeline_smem_bytes<D>()
                                                          : merge_smem_bytes<D>();
}

// ---- attention kernel --------------------------------------------------------------------------
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads) block_sparse_attention_kernel(const Params p) {
  static_assert(D % 64 == 0, "the swizzle needs at least 8 16-byte units per key row");
  constexpr int kUnits = D / 8;  // 16-byte units per key row
  constexpr int kTile = kChunk * D;
  constexpr int kSteps = D / 16;  // k-steps of q.K^T, and pairs of 8-wide output tiles of P.V

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int chunk_key0[kWarps][kStages];  // first key position of a staged chunk; -1: none
  __shared__ int item_page[kItemCap];   // first slot of the block's page; -1: nothing to load
  __shared__ int item_first[kItemCap];  // the block's first key position (valid entries only)
  __shared__ float warp_m[kWarps][kRows];
  __shared__ float warp_l[kWarps][kRows];
  scalar_t* smem = reinterpret_cast<scalar_t*>(smem_raw);

  const int64_t t = blockIdx.x;
  const int g = blockIdx.y;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int frag_row = lane >> 2;  // mma fragment row (and +8)
  const int frag_col = lane & 3;   // mma fragment column pair
  const int bs = p.block_size;
  const int splits = p.num_splits;

  const int pos = p.token_pos[t];
  const int req = p.token_req[t];
  const bool sparse = p.token_sparse[t] != 0;
  int n_items = sparse ? p.n_sel : (pos >= 0 ? pos / bs + 1 : 0);
  if (pos < 0 || req < 0 || req >= p.rt_rows) n_items = 0;
  // Items (blocks of the list) go to splits round-robin, as in the Triton kernel.
  const int my_items = n_items > split ? (n_items - split + splits - 1) / splits : 0;
  const int chunks_per_block = bs / kChunk;

  const scalar_t* kbase = static_cast<const scalar_t*>(p.k) + static_cast<int64_t>(g) * p.k_sg;
  const scalar_t* vbase = static_cast<const scalar_t*>(p.v) + static_cast<int64_t>(g) * p.v_sg;
  const int32_t* rt_row = p.rt + static_cast<int64_t>(req < 0 ? 0 : req) * p.rt_s0;
  const int32_t* sel_row = p.selected + t * p.sel_st + static_cast<int64_t>(g) * p.sel_sg;
  scalar_t* warp_smem = smem + warp * kStages * 2 * kTile;

  // Fill the table for the CTA's local items base .. base + count - 1 (global list index
  // split + local * splits), one item per thread. A -1 entry, a block starting past the query, or
  // an out-of-range table entry (which the Triton kernel would read blindly) gets page -1 and is
  // neither loaded nor computed.
  auto resolve = [&](int base, int count) {
    for (int li = threadIdx.x; li < count; li += kThreads) {
      const int i = split + (base + li) * splits;
      int64_t b = i;
      if (sparse) b = g < p.sel_groups ? sel_row[i * p.sel_si] : -1;
      const int64_t first = b * bs;
      int page0 = -1;
      if (b >= 0 && first <= pos && first < p.rt_cols) {
        const int entry = rt_row[first * p.rt_s1];
        if (entry >= 0) page0 = (entry / bs) * bs;
      }
      item_page[li] = page0;
      item_first[li] = page0 >= 0 ? static_cast<int>(first) : -1;  // first <= pos: fits
    }
  };

  // Stage the warp's step-th chunk of the current table: start its K/V copies, or mark it as
  // having no visible key (then it is neither loaded nor computed). Shared-memory reads only.
  auto issue = [&](int step) {
    const int stage = step % kStages;
    const int j = warp + step * kWarps;
    const int item = j / chunks_per_block;
    const int sub = j - item * chunks_per_block;
    const int page0 = item_page[item];
    const int64_t key0 = static_cast<int64_t>(item_first[item]) + sub * kChunk;
    int64_t slot0 = -1;
    if (page0 >= 0 && key0 <= pos) {
      const int64_t start = static_cast<int64_t>(page0) + sub * kChunk;
      if (start + kChunk <= p.slots) slot0 = start;
    }
    if (lane == 0) chunk_key0[warp][stage] = slot0 >= 0 ? static_cast<int>(key0) : -1;
    if (slot0 >= 0) {
      scalar_t* ks = warp_smem + stage * 2 * kTile;
      scalar_t* vs = ks + kTile;
#pragma unroll
      for (int r = 0; r < kChunk * kUnits / 32; ++r) {
        const int it = lane + 32 * r;
        const int key = it / kUnits;
        const int unit = it % kUnits;
        const int off = tile_offset<D>(key, unit);
        ptx::cp_async_16(ks + off, kbase + (slot0 + key) * p.k_st + unit * 8);
        ptx::cp_async_16(vs + off, vbase + (slot0 + key) * p.v_st + unit * 8);
      }
    }
  };

  float m[2] = {kNegInf, kNegInf};  // running max (log2 domain) of rows frag_row, frag_row + 8
  float l[2] = {0.f, 0.f};          // this thread's share of the running sums
  float o[2 * kSteps][4];
#pragma unroll
  for (int n = 0; n < 2 * kSteps; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  // The group's queries as mma A fragments, loaded once, while the table's
  // index loads are in flight (rows past the group stay 0).
  uint32_t qf[kSteps][4];
  {
    const scalar_t* qg = static_cast<const scalar_t*>(p.q) + t * p.q_st +
                         static_cast<int64_t>(g) * p.group_size * p.q_sh;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = frag_row + 8 * half;
      const bool live = row < p.group_size;
      const scalar_t* qr = qg + row * p.q_sh + 2 * frag_col;
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        qf[kk][half] = live ? *reinterpret_cast<const uint32_t*>(qr + kk * 16) : 0u;
        qf[kk][2 + half] = live ? *reinterpret_cast<const uint32_t*>(qr + kk * 16 + 8) : 0u;
      }
    }
  }

  for (int base = 0; base < my_items; base += kItemCap) {
    const int count = my_items - base < kItemCap ? my_items - base : kItemCap;
    __syncthreads();  // every warp is done issuing from the previous fill
    resolve(base, count);
    __syncthreads();
    const int chunks = count * chunks_per_block;
    const int steps = chunks > warp ? (chunks - warp + kWarps - 1) / kWarps : 0;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < steps) issue(s);
      ptx::cp_async_commit();  // empty groups too: the wait below counts groups
    }

    for (int step = 0; step < steps; ++step) {
      if (step + kStages - 1 < steps) issue(step + kStages - 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<kStages - 1>();
      __syncwarp();  // every lane's copies of this chunk (and its key0) are visible to the warp
      const int stage = step % kStages;
      const int key0 = chunk_key0[warp][stage];
      if (key0 >= 0) {  // warp-uniform
        const scalar_t* ks = warp_smem + stage * 2 * kTile;
        const scalar_t* vs = ks + kTile;

        // S = q . K^T for 16 keys: two 8-key n-tiles.
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        {
          const int mat = lane >> 3;  // ldmatrix: lanes 8i..8i+7 address the rows of matrix i
          const int key = (mat >> 1) * 8 + (lane & 7);
#pragma unroll
          for (int kk = 0; kk < kSteps; ++kk) {
            uint32_t kb[4];
            ptx::ldmatrix_x4(kb, ks + tile_offset<D>(key, 2 * kk + (mat & 1)));
            ptx::mma_m16n8k16<scalar_t>(s[0], qf[kk], kb[0], kb[1]);
            ptx::mma_m16n8k16<scalar_t>(s[1], qf[kk], kb[2], kb[3]);
          }
        }

        // Online softmax. Element e of n-tile n is row frag_row + 8 * (e / 2), key
        // n * 8 + 2 * frag_col + e % 2. The chunk's first key is visible (else it was not
        // staged), so every row's max below is finite.
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + n * 8 + 2 * frag_col + (e & 1);
            s[n][e] = key <= pos ? s[n][e] * p.qk_scale : kNegInf;
          }
        }
        float m_new[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float mx = fmaxf(fmaxf(s[0][2 * half], s[0][2 * half + 1]),
                           fmaxf(s[1][2 * half], s[1][2 * half + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          m_new[half] = fmaxf(m[half], mx);
        }
        // Once the running maxima settle most chunks raise none of them, and the rescale
        // (alpha = exp2(0) = 1 exactly) would change nothing: skip it, warp-uniformly.
        if (__any_sync(0xffffffffu, m_new[0] != m[0] || m_new[1] != m[1])) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float alpha =
                ptx::exp2_ftz(m[half] - m_new[half]);  // 0 on the first chunk (m = -inf)
            l[half] *= alpha;
#pragma unroll
            for (int n = 0; n < 2 * kSteps; ++n) {
              o[n][2 * half] *= alpha;
              o[n][2 * half + 1] *= alpha;
            }
          }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          m[half] = m_new[half];
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              s[n][e] = ptx::exp2_ftz(s[n][e] - m_new[half]);
              sum += s[n][e];
            }
          }
          l[half] += sum;
        }

        // O += P . V: P's accumulator layout is the A fragment of a 16-key k-step.
        const uint32_t pa[4] = {ptx::pack_float2<scalar_t>(s[0][0], s[0][1]),
                                ptx::pack_float2<scalar_t>(s[0][2], s[0][3]),
                                ptx::pack_float2<scalar_t>(s[1][0], s[1][1]),
                                ptx::pack_float2<scalar_t>(s[1][2], s[1][3])};
        {
          const int mat = lane >> 3;
          const int key = (mat & 1) * 8 + (lane & 7);
#pragma unroll
          for (int nd = 0; nd < kSteps; ++nd) {
            uint32_t vb[4];
            ptx::ldmatrix_x4_trans(vb, vs + tile_offset<D>(key, 2 * nd + (mat >> 1)));
            ptx::mma_m16n8k16<scalar_t>(o[2 * nd], pa, vb[0], vb[1]);
            ptx::mma_m16n8k16<scalar_t>(o[2 * nd + 1], pa, vb[2], vb[3]);
          }
        }
      }
      __syncwarp();  // all lanes are done with this stage before a later issue() refills it
    }
    // The last real group was waited for inside the loop: nothing of this fill is in flight.
  }
  ptx::cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
    l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
  }

  // Merge the warps: the pipeline's shared memory now holds each warp's O rows.
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem_raw);  // [kWarps][kRows][D]
  if (frag_col == 0) {
    warp_m[warp][frag_row] = m[0];
    warp_m[warp][frag_row + 8] = m[1];
    warp_l[warp][frag_row] = l[0];
    warp_l[warp][frag_row + 8] = l[1];
  }
#pragma unroll
  for (int n = 0; n < 2 * kSteps; ++n) {
    const int col = n * 8 + 2 * frag_col;
    *reinterpret_cast<float2*>(so + (warp * kRows + frag_row) * D + col) =
        make_float2(o[n][0], o[n][1]);
    *reinterpret_cast<float2*>(so + (warp * kRows + frag_row + 8) * D + col) =
        make_float2(o[n][2], o[n][3]);
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < p.group_size * D; idx += kThreads) {
    const int row = idx / D;
    const int d = idx % D;
    float big = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) big = fmaxf(big, warp_m[w][row]);
    float sum = 0.f, acc = 0.f;
    if (big != kNegInf) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        if (warp_m[w][row] != kNegInf) {
          const float f = ptx::exp2_ftz(warp_m[w][row] - big);
          sum += warp_l[w][row] * f;
          acc += so[(w * kRows + row) * D + d] * f;
        }
      }
    }
    const float value = sum > 0.f ? acc / sum : 0.f;  // no visible key: 0, as the Triton kernel
    const int64_t head_row = t * p.query_heads + static_cast<int64_t>(g) * p.group_size + row;
    if (splits == 1) {
      static_cast<scalar_t*>(p.out)[head_row * D + d] = static_cast<scalar_t>(value);
    } else {
      p.part_o[(head_row * splits + split) * D + d] = value;
      if (d == 0) p.part_lse[head_row * splits + split] = sum > 0.f ? big + log2f(sum) : kNegInf;
    }
  }
}

// Log-sum-exp merge of the splits' normalized partials: one CTA per (token, query head).
template <typename scalar_t>
__global__ void __launch_bounds__(128) merge_splits_kernel(const float* __restrict__ part_o,
                                                           const float* __restrict__ part_lse,
                                                           scalar_t* __restrict__ out, int splits,
                                                           int dim) {
  const int64_t row = blockIdx.x;
  const float* lse = part_lse + row * splits;
  float big = kNegInf;
  for (int s = 0; s < splits; ++s) big = fmaxf(big, lse[s]);
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float sum = 0.f, acc = 0.f;
    if (big != kNegInf) {
      for (int s = 0; s < splits; ++s) {
        if (lse[s] != kNegInf) {
          const float w = ptx::exp2_ftz(lse[s] - big);
          sum += w;
          acc += w * part_o[(row * splits + s) * dim + d];
        }
      }
    }
    out[row * dim + d] = static_cast<scalar_t>(sum > 0.f ? acc / sum : 0.f);
  }
}

// ---- host side ---------------------------------------------------------------------------------
template <typename scalar_t, int D>
void launch(const Params& params, int64_t tokens, int64_t groups, const at::Tensor& out,
            const at::Tensor& part_o, const at::Tensor& part_lse) {
  constexpr int smem = smem_bytes<D>();
  auto kernel = block_sparse_attention_kernel<scalar_t, D>;
  // Above 48 KiB a kernel must opt in, per device; not a stream operation, so also fine while a
  // CUDA graph is being captured.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(groups),
                  static_cast<unsigned>(params.num_splits));
  kernel<<<grid, kThreads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (params.num_splits > 1) {
    const int64_t rows = tokens * params.query_heads;
    merge_splits_kernel<scalar_t><<<static_cast<unsigned>(rows), 128, 0, stream>>>(
        part_o.data_ptr<float>(), part_lse.data_ptr<float>(), out.data_ptr<scalar_t>(),
        params.num_splits, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_index_vector(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.device() == q.device() && x.scalar_type() == at::kInt && x.dim() == 1 &&
                  x.size(0) == q.size(0) && x.is_contiguous(),
              "block_sparse_attention: ", name, " must be a contiguous int32 [", q.size(0),
              "] tensor on ", q.device(), ", got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
}

void check_cache(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.device() == q.device() && x.scalar_type() == q.scalar_type() && x.dim() == 3 &&
                  x.size(2) == q.size(2),
              "block_sparse_attention: ", name, " must be ", q.scalar_type(), " [slots, groups, ",
              q.size(2), "] on ", q.device(), ", got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.stride(2) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "block_sparse_attention: ", name,
              " rows must be contiguous and 16-byte aligned (strides multiples of 8), got strides ",
              x.strides());
}

at::Tensor block_sparse_attention(const at::Tensor& q, const at::Tensor& k_buffer,
                                  const at::Tensor& v_buffer, const at::Tensor& req_to_token,
                                  const at::Tensor& token_req, const at::Tensor& token_pos,
                                  const at::Tensor& token_sparse, const at::Tensor& selected,
                                  int64_t block_size, double scale, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf),
              "block_sparse_attention: q must be a bfloat16 or float16 CUDA tensor [tokens, "
              "heads, dim], got ",
              q.scalar_type(), " ", q.sizes(), " on ", q.device());
  TORCH_CHECK(q.stride(2) == 1 && q.stride(0) % 2 == 0 && q.stride(1) % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 4 == 0,
              "block_sparse_attention: q must be contiguous in dim with even strides, got ",
              q.strides());
  const int64_t tokens = q.size(0), query_heads = q.size(1), dim = q.size(2);
  TORCH_CHECK(dim == 64 || dim == 128, "block_sparse_attention: head dim ", dim,
              " not compiled: use 64 or 128");
  check_cache(k_buffer, "k_buffer", q);
  check_cache(v_buffer, "v_buffer", q);
  TORCH_CHECK(v_buffer.sizes() == k_buffer.sizes(), "block_sparse_attention: v_buffer ",
              v_buffer.sizes(), " must match k_buffer ", k_buffer.sizes());
  const int64_t groups = k_buffer.size(1);
  TORCH_CHECK(groups > 0 && query_heads % groups == 0 && query_heads / groups <= kMaxGroup,
              "block_sparse_attention: ", query_heads, " query heads over ", groups,
              " kv heads: the group size must be a whole number of at most ", kMaxGroup);
  TORCH_CHECK(block_size > 0 && block_size % kChunk == 0 && block_size <= (1 << 20),
              "block_sparse_attention: block_size ", block_size, " must be a positive multiple of ",
              kChunk);
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65535, "block_sparse_attention: num_splits ",
              num_splits, " must be in 1..65535");
  TORCH_CHECK(tokens < (int64_t{1} << 31) && groups <= 65535,
              "block_sparse_attention: too many tokens (", tokens, ") or kv heads (", groups, ")");
  TORCH_CHECK(req_to_token.device() == q.device() && req_to_token.scalar_type() == at::kInt &&
                  req_to_token.dim() == 2,
              "block_sparse_attention: req_to_token must be int32 [requests, tokens] on ",
              q.device(), ", got ", req_to_token.scalar_type(), " ", req_to_token.sizes());
  check_index_vector(token_req, "token_req", q);
  check_index_vector(token_pos, "token_pos", q);
  check_index_vector(token_sparse, "token_sparse", q);
  TORCH_CHECK(selected.device() == q.device() && selected.scalar_type() == at::kInt &&
                  selected.dim() == 3 && selected.size(0) == tokens && selected.size(1) >= 1 &&
                  selected.size(2) < (int64_t{1} << 31),
              "block_sparse_attention: selected must be int32 [", tokens, ", groups, n_sel] on ",
              q.device(), ", got ", selected.scalar_type(), " ", selected.sizes());

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({tokens, query_heads, dim}, q.options());
  if (tokens == 0) return out;
  at::Tensor part_o, part_lse;
  if (num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_o = at::empty({tokens, query_heads, num_splits, dim}, f32);
    part_lse = at::empty({tokens, query_heads, num_splits}, f32);
  }

  Params params{};
  params.q = q.data_ptr();
  params.k = k_buffer.data_ptr();
  params.v = v_buffer.data_ptr();
  params.out = out.data_ptr();
  params.part_o = num_splits > 1 ? part_o.data_ptr<float>() : nullptr;
  params.part_lse = num_splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  params.rt = req_to_token.data_ptr<int32_t>();
  params.token_req = token_req.data_ptr<int32_t>();
  params.token_pos = token_pos.data_ptr<int32_t>();
  params.token_sparse = token_sparse.data_ptr<int32_t>();
  params.selected = selected.data_ptr<int32_t>();
  params.q_st = q.stride(0);
  params.q_sh = q.stride(1);
  params.k_st = k_buffer.stride(0);
  params.k_sg = k_buffer.stride(1);
  params.v_st = v_buffer.stride(0);
  params.v_sg = v_buffer.stride(1);
  params.rt_s0 = req_to_token.stride(0);
  params.rt_s1 = req_to_token.stride(1);
  params.rt_rows = req_to_token.size(0);
  params.rt_cols = req_to_token.size(1);
  params.sel_st = selected.stride(0);
  params.sel_sg = selected.stride(1);
  params.sel_si = selected.stride(2);
  params.slots = k_buffer.size(0);
  params.sel_groups = static_cast<int>(std::min<int64_t>(selected.size(1), groups));
  params.n_sel = static_cast<int>(selected.size(2));
  params.block_size = static_cast<int>(block_size);
  params.group_size = static_cast<int>(query_heads / groups);
  params.query_heads = static_cast<int>(query_heads);
  params.num_splits = static_cast<int>(num_splits);
  params.qk_scale = static_cast<float>(scale) * kLog2e;

  AT_DISPATCH_V2(q.scalar_type(), "block_sparse_attention", AT_WRAP([&] {
                   if (dim == 64) {
                     launch<scalar_t, 64>(params, tokens, groups, out, part_o, part_lse);
                   } else {
                     launch<scalar_t, 128>(params, tokens, groups, out, part_o, part_lse);
                   }
                 }),
                 at::kHalf, at::kBFloat16);
  return out;
}

// Shapes only, for torch.compile's fake tensors.
at::Tensor block_sparse_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, int64_t, double,
                                       int64_t) {
  return at::empty(q.sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sala_sglang, m) {
  m.def(
      "block_sparse_attention(Tensor q, Tensor k_buffer, Tensor v_buffer, Tensor req_to_token, "
      "Tensor token_req, Tensor token_pos, Tensor token_sparse, Tensor selected, int block_size, "
      "float scale, int num_splits=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(sala_sglang, CUDA, m) {
  m.impl("block_sparse_attention", &block_sparse_attention);
}
TORCH_LIBRARY_IMPL(sala_sglang, Meta, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_meta);
}
