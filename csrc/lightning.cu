// Lightning attention decode step (SPEC 2.1), one token per request, all heads, state in place:
//   S = exp(-slope_h) * S + k^T v,   o = scale * q S
// over SGLang's fp32 state pool state[slot, head, key, value]; slot -1 marks a CUDA-graph padding
// row, which touches no state (its output row is written as zeros). Where a request's track mask
// is set, the new state is also written to its track slot: the prefix cache's decode snapshot.
//
// The step is purely memory-bound: per request and head it moves a D x D fp32 state in and out
// and only a few hundred bytes of q, k, v, o. So every state element is read once and written
// once, with 16-byte accesses, and the grid is split along the value columns (independent outputs,
// no cross-block reduction) so that even batch 1 puts a block on most SMs.

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace {

constexpr int kSlice = 32;  // value columns per block
constexpr int kThreads = 256;
constexpr int kColThreads = kSlice / 4;               // threads along a state row, a float4 each
constexpr int kRowsPerPass = kThreads / kColThreads;  // state rows one pass of the block covers
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
struct TokenRows {  // q, k or v as [batch, heads, dim], contiguous in dim
  const scalar_t* ptr;
  int64_t stride_b, stride_h;
  __device__ float at(int64_t b, int h, int i) const {
    return static_cast<float>(ptr[b * stride_b + h * stride_h + i]);
  }
};

__device__ __forceinline__ int64_t load_index(const void* index, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(index)[i] : static_cast<const int32_t*>(index)[i];
}

template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads) lightning_decode_kernel(
    TokenRows<scalar_t> q, TokenRows<scalar_t> k, TokenRows<scalar_t> v, scalar_t* __restrict__ out,
    float* __restrict__ state, int64_t state_stride_slot, int64_t state_stride_head,
    int64_t state_stride_key, const void* __restrict__ slots, bool slots_int64,
    const void* __restrict__ track_slots, bool track_int64, const bool* __restrict__ track_mask,
    const float* __restrict__ slopes, float scale, int heads) {
  constexpr int kSlices = D / kSlice;
  constexpr int kPasses = D / kRowsPerPass;
  static_assert(D % kSlice == 0 && D % kRowsPerPass == 0, "head dim must be a multiple of 32");

  const int64_t request = blockIdx.x / (heads * kSlices);
  const int head = (blockIdx.x / kSlices) % heads;
  const int col0 = (blockIdx.x % kSlices) * kSlice;
  const int tx = threadIdx.x % kColThreads;
  const int ty = threadIdx.x / kColThreads;
  const int col = col0 + 4 * tx;
  scalar_t* o = out + (request * heads + head) * D;

  const int64_t slot = load_index(slots, slots_int64, request);
  if (slot < 0) {
    if (threadIdx.x < kSlice) o[col0 + threadIdx.x] = static_cast<scalar_t>(0.0f);
    return;
  }

  float* s = state + slot * state_stride_slot + head * state_stride_head + col;
  float* t = nullptr;  // the track slot's copy, when this step is a snapshot point
  if (track_mask != nullptr && track_mask[request]) {
    const int64_t track = load_index(track_slots, track_int64, request);
    if (track >= 0) t = state + track * state_stride_slot + head * state_stride_head + col;
  }
  // All of this thread's state loads go out before any is used; streaming hints, since the next
  // read of this state is a whole decode step (every other layer's traffic) away.
  float4 rows[kPasses];
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    rows[p] =
        __ldcs(reinterpret_cast<const float4*>(s + (ty + p * kRowsPerPass) * state_stride_key));
  }

  const float decay = expf(-slopes[head]);
  float vc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) vc[j] = v.at(request, head, col + j);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int row = ty + p * kRowsPerPass;
    const float kr = k.at(request, head, row);
    const float qr = q.at(request, head, row);
    float4 r = rows[p];
    r.x = fmaf(decay, r.x, kr * vc[0]);
    r.y = fmaf(decay, r.y, kr * vc[1]);
    r.z = fmaf(decay, r.z, kr * vc[2]);
    r.w = fmaf(decay, r.w, kr * vc[3]);
    __stcs(reinterpret_cast<float4*>(s + row * state_stride_key), r);
    if (t != nullptr) __stcs(reinterpret_cast<float4*>(t + row * state_stride_key), r);
    acc[0] = fmaf(qr, r.x, acc[0]);
    acc[1] = fmaf(qr, r.y, acc[1]);
    acc[2] = fmaf(qr, r.z, acc[2]);
    acc[3] = fmaf(qr, r.w, acc[3]);
  }

  // o[col] = sum over rows: first across the rows a warp holds (lanes with the same tx), then
  // across warps through shared memory.
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int offset = kColThreads; offset < 32; offset *= 2) {
      acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
    }
  }
  __shared__ float partial[kWarps][kSlice];
  const int lane = threadIdx.x % 32;
  if (lane < kColThreads) {
#pragma unroll
    for (int j = 0; j < 4; ++j) partial[threadIdx.x / 32][4 * lane + j] = acc[j];
  }
  __syncthreads();
  if (threadIdx.x < kSlice) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][threadIdx.x];
    o[col0 + threadIdx.x] = static_cast<scalar_t>(scale * sum);
  }
}

void check_tokens(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.is_cuda() && x.device() == q.device(), "lightning_decode: ", name, " must be on ",
              q.device(), ", got ", x.device());
  TORCH_CHECK(x.sizes() == q.sizes() && x.scalar_type() == q.scalar_type(),
              "lightning_decode: ", name, " must match q (", q.sizes(), " ", q.scalar_type(),
              "), got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.stride(2) == 1, "lightning_decode: ", name, " must be contiguous in its last dim");
}

template <typename scalar_t>
TokenRows<scalar_t> rows_of(const at::Tensor& x) {
  return {x.data_ptr<scalar_t>(), x.stride(0), x.stride(1)};
}

struct Track {  // the optional snapshot destinations; null pointers when not tracking
  const void* slots = nullptr;
  bool int64 = false;
  const bool* mask = nullptr;
};

template <int D, typename scalar_t>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
            at::Tensor& state, const at::Tensor& slots, const Track& track,
            const at::Tensor& slopes, double scale) {
  const int64_t batch = q.size(0);
  const int heads = static_cast<int>(q.size(1));
  const int64_t blocks = batch * heads * (D / kSlice);
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "lightning_decode: batch ", batch, " too large");
  lightning_decode_kernel<D, scalar_t>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          rows_of<scalar_t>(q), rows_of<scalar_t>(k), rows_of<scalar_t>(v),
          out.data_ptr<scalar_t>(), state.data_ptr<float>(), state.stride(0), state.stride(1),
          state.stride(2), slots.data_ptr(), slots.scalar_type() == at::kLong, track.slots,
          track.int64, track.mask, slopes.data_ptr<float>(), static_cast<float>(scale), heads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_for_dim(int64_t dim, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& state, const at::Tensor& slots, const Track& track,
                    const at::Tensor& slopes, double scale) {
  switch (dim) {
    case 32: return launch<32, scalar_t>(q, k, v, out, state, slots, track, slopes, scale);
    case 64: return launch<64, scalar_t>(q, k, v, out, state, slots, track, slopes, scale);
    case 128: return launch<128, scalar_t>(q, k, v, out, state, slots, track, slopes, scale);
    case 256: return launch<256, scalar_t>(q, k, v, out, state, slots, track, slopes, scale);
    default:
      TORCH_CHECK(false, "lightning_decode: head dim ", dim,
                  " not compiled: use 32, 64, 128 or 256");
  }
}

bool is_index(const at::Tensor& x) {
  return x.scalar_type() == at::kInt || x.scalar_type() == at::kLong;
}

at::Tensor lightning_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::Tensor& state, const at::Tensor& state_slots,
                            const at::Tensor& slopes, double scale,
                            const std::optional<at::Tensor>& track_slots,
                            const std::optional<at::Tensor>& track_mask) {
  TORCH_CHECK(
      q.is_cuda() && q.dim() == 3 && q.stride(2) == 1,
      "lightning_decode: q must be a CUDA tensor [batch, heads, dim] contiguous in dim, got ",
      q.sizes(), " on ", q.device());
  check_tokens(k, "k", q);
  check_tokens(v, "v", q);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  TORCH_CHECK(state.device() == q.device() && state.scalar_type() == at::kFloat &&
                  state.dim() == 4 && state.size(1) == heads && state.size(2) == dim &&
                  state.size(3) == dim,
              "lightning_decode: state must be float32 [slots, ", heads, ", ", dim, ", ", dim,
              "] on ", q.device(), ", got ", state.scalar_type(), " ", state.sizes());
  TORCH_CHECK(state.stride(3) == 1 && state.stride(0) % 4 == 0 && state.stride(1) % 4 == 0 &&
                  state.stride(2) % 4 == 0 &&
                  reinterpret_cast<uintptr_t>(state.data_ptr()) % 16 == 0,
              "lightning_decode: state rows must be contiguous and 16-byte aligned, got strides ",
              state.strides());
  TORCH_CHECK(state_slots.device() == q.device() && state_slots.dim() == 1 &&
                  state_slots.size(0) == batch && state_slots.is_contiguous() &&
                  is_index(state_slots),
              "lightning_decode: state_slots must be int32 or int64 [", batch, "] on ", q.device(),
              ", got ", state_slots.scalar_type(), " ", state_slots.sizes());
  TORCH_CHECK(slopes.device() == q.device() && slopes.scalar_type() == at::kFloat &&
                  slopes.dim() == 1 && slopes.size(0) == heads && slopes.is_contiguous(),
              "lightning_decode: slopes must be float32 [", heads, "] on ", q.device(), ", got ",
              slopes.scalar_type(), " ", slopes.sizes());

  TORCH_CHECK(track_slots.has_value() == track_mask.has_value(),
              "lightning_decode: pass track_slots and track_mask together, or neither");
  Track track;
  if (track_slots.has_value()) {
    const at::Tensor& ts = *track_slots;
    const at::Tensor& tm = *track_mask;
    TORCH_CHECK(ts.device() == q.device() && ts.dim() == 1 && ts.size(0) >= batch &&
                    ts.is_contiguous() && is_index(ts),
                "lightning_decode: track_slots must be int32 or int64 [>= ", batch, "] on ",
                q.device(), ", got ", ts.scalar_type(), " ", ts.sizes());
    TORCH_CHECK(tm.device() == q.device() && tm.dim() == 1 && tm.size(0) >= batch &&
                    tm.is_contiguous() && tm.scalar_type() == at::kBool,
                "lightning_decode: track_mask must be bool [>= ", batch, "] on ", q.device(),
                ", got ", tm.scalar_type(), " ", tm.sizes());
    track = {ts.data_ptr(), ts.scalar_type() == at::kLong, tm.data_ptr<bool>()};
  }

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  AT_DISPATCH_V2(q.scalar_type(), "lightning_decode", AT_WRAP([&] {
                   launch_for_dim<scalar_t>(dim, q, k, v, out, state, state_slots, track, slopes,
                                            scale);
                 }),
                 at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

// Shapes only, for torch.compile's fake tensors.
at::Tensor lightning_decode_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                 at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                 const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&) {
  return at::empty(q.sizes(), q.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sala_sglang, m) {
  m.def(
      "lightning_decode(Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor state_slots, "
      "Tensor slopes, float scale, Tensor? track_slots=None, Tensor? track_mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sala_sglang, CUDA, m) { m.impl("lightning_decode", &lightning_decode); }
TORCH_LIBRARY_IMPL(sala_sglang, Meta, m) { m.impl("lightning_decode", &lightning_decode_meta); }
