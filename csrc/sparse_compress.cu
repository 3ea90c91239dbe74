// Incremental key compression of the sparse layers (SPEC 2.2, step 1), the CUDA twin of the
// Triton `compress_new_windows` in sala_sglang/ops/infllm_v2/compress.py (same arguments, same
// writes): for request b, every window c with lo_b <= c < hi_b (lo/hi = complete windows at
// old_lens / new_lens keys, at most max_new_windows of them) gets
//   out[page, (last % block) / stride, g, :] = mean(k[req_to_token[req, stride*c + j], g, :])
// over j < kernel_size, with last = stride*c + kernel_size - 1 the window's last token and
// page = req_to_token[req, (last / block) * block] / block: a window lives beside the page of its
// last token, so a page's rows depend only on that page and earlier ones, and a request extending
// a shared (prefix-cached) page-aligned prefix writes only into its own pages. Rows per page stay
// block / stride: kernel_size is a multiple of stride, so last % stride == stride - 1.
//
// The op is purely bandwidth-bound, and with kernel_size = 2 * stride each key belongs to two
// windows. So one block handles a run of consecutive windows of one (request, kv head): it reads
// the run's keys once, 16 bytes per load, into fp32 sums of kPiece consecutive keys kept in shared
// memory, and then forms every window as the sum of its kernel_size / kPiece pieces. lo/hi are
// computed here from the lengths, which keeps the op a single launch with no host sync.

#include <ATen/Dispatch_v2.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int kThreads = 128;
// Keys one thread sums before they go to shared memory; stride and kernel_size must be multiples
// of it (the Python wrapper sends other geometries to Triton).
constexpr int kPiece = 8;
// Tokens one block aims to cover: neighbouring runs overlap by kernel_size - stride keys, read
// twice (from L2 mostly), so longer runs waste less; shorter runs put more blocks on the GPU for
// one 8192-token chunk (64 runs x 2 kv heads with the released geometry).
constexpr int kRunTokens = 128;
constexpr int kMinRunWindows = 4;
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // the default dynamic limit, no opt-in needed

// An index tensor (int32 or int64, contiguous) read as int64.
struct Index {
  const void* ptr;
  bool is64;
  __device__ int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(ptr)[i] : static_cast<const int32_t*>(ptr)[i];
  }
};

struct Geometry {
  int kernel_size, stride, block_size, run_windows;
  int64_t max_new_windows;
  __device__ int64_t windows(int64_t length) const {  // complete windows over `length` keys
    return length >= kernel_size ? (length - kernel_size) / stride + 1 : 0;
  }
};

template <typename scalar_t>
struct Args {
  const scalar_t* __restrict__ k;
  int64_t k_stride_slot, k_stride_group;
  scalar_t* __restrict__ out;
  int64_t out_stride_page, out_stride_row, out_stride_group;
  Index req_to_token;
  int64_t rt_stride;
  Index req_slots, old_lens, new_lens;
  Geometry geo;
};

// Dynamic shared memory of one block: fp32 piece sums [pieces][D], then the run's cache slots.
__host__ __device__ inline int run_tokens(const Geometry& geo, int windows) {
  return (windows - 1) * geo.stride + geo.kernel_size;
}

template <int D>
int64_t shared_bytes(const Geometry& geo, int windows) {
  const int tokens = run_tokens(geo, windows);
  return int64_t{tokens / kPiece} * D * sizeof(float) + int64_t{tokens} * sizeof(int64_t);
}

template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads) compress_kernel(Args<scalar_t> a) {
  constexpr int kVec = 16 / sizeof(scalar_t);  // elements per 16-byte access
  constexpr int kVecs = D / kVec;              // 16-byte accesses per key row
  static_assert(D % kVec == 0, "head dim must fill whole 16-byte vectors");

  const Geometry& geo = a.geo;
  const int64_t b = blockIdx.z;
  const int g = blockIdx.y;
  const int64_t lo = geo.windows(a.old_lens[b]);
  const int64_t hi = min(geo.windows(a.new_lens[b]), lo + geo.max_new_windows);
  const int64_t c0 = lo + int64_t{blockIdx.x} * geo.run_windows;
  if (c0 >= hi) return;
  const int windows = static_cast<int>(min(hi - c0, int64_t{geo.run_windows}));
  const int tokens = run_tokens(geo, windows);
  const int pieces = tokens / kPiece;

  extern __shared__ float4 shared_raw[];  // float4: 16-byte aligned for the vector accesses
  float* piece_sum = reinterpret_cast<float*>(shared_raw);
  int64_t* slot = reinterpret_cast<int64_t*>(piece_sum + pieces * D);

  const int64_t row = a.req_slots[b] * a.rt_stride;
  const int64_t first = c0 * geo.stride;  // token position of the run's first key
  for (int i = threadIdx.x; i < tokens; i += kThreads) slot[i] = a.req_to_token[row + first + i];
  __syncthreads();

  // Adjacent threads take adjacent 16-byte pieces of one key row: coalesced loads. Default
  // caching: the sparse attention of this layer reads the same fresh keys right after.
  const scalar_t* k = a.k + g * a.k_stride_group;
  for (int item = threadIdx.x; item < pieces * kVecs; item += kThreads) {
    const int p = item / kVecs;
    const int v = item % kVecs;
    uint4 raw[kPiece];
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {  // all loads in flight before any is summed
      raw[j] =
          *reinterpret_cast<const uint4*>(k + slot[p * kPiece + j] * a.k_stride_slot + v * kVec);
    }
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
#pragma unroll
    for (int j = 0; j < kPiece; ++j) {
      const scalar_t* x = reinterpret_cast<const scalar_t*>(&raw[j]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += static_cast<float>(x[e]);
    }
    float4* dst = reinterpret_cast<float4*>(piece_sum + p * D + v * kVec);
#pragma unroll
    for (int e = 0; e < kVec; e += 4) {
      dst[e / 4] = make_float4(acc[e], acc[e + 1], acc[e + 2], acc[e + 3]);
    }
  }
  __syncthreads();

  // Window i of the run = its kernel_size / kPiece pieces, starting stride / kPiece pieces after
  // window i - 1's.
  const int step = geo.stride / kPiece;
  const int span = geo.kernel_size / kPiece;
  const float count = static_cast<float>(geo.kernel_size);
  for (int item = threadIdx.x; item < windows * kVecs; item += kThreads) {
    const int i = item / kVecs;
    const int v = item % kVecs;
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
    for (int q = 0; q < span; ++q) {
      const float4* src =
          reinterpret_cast<const float4*>(piece_sum + (i * step + q) * D + v * kVec);
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        const float4 s = src[e / 4];
        acc[e] += s.x;
        acc[e + 1] += s.y;
        acc[e + 2] += s.z;
        acc[e + 3] += s.w;
      }
    }
    // Each window is addressed on its own (a run may span pages): by its last token.
    const int64_t last = (c0 + i) * geo.stride + geo.kernel_size - 1;
    const int64_t page =
        a.req_to_token[row + (last / geo.block_size) * geo.block_size] / geo.block_size;
    const int64_t sub = (last % geo.block_size) / geo.stride;
    alignas(16) scalar_t mean[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) mean[e] = static_cast<scalar_t>(acc[e] / count);
    *reinterpret_cast<uint4*>(a.out + page * a.out_stride_page + sub * a.out_stride_row +
                              g * a.out_stride_group + v * kVec) =
        *reinterpret_cast<const uint4*>(mean);
  }
}

Index index_of(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type() == at::kLong}; }

template <int D, typename scalar_t>
void launch(const at::Tensor& k_buffer, at::Tensor& out, const at::Tensor& req_to_token,
            const at::Tensor& req_slots, const at::Tensor& old_lens, const at::Tensor& new_lens,
            Geometry geo) {
  // Windows per run: about kRunTokens tokens, fewer if shared memory would not hold them.
  int windows = std::max(kMinRunWindows, kRunTokens / geo.stride);
  while (windows > 1 && shared_bytes<D>(geo, windows) > kMaxSharedBytes) --windows;
  const int64_t smem = shared_bytes<D>(geo, windows);
  TORCH_CHECK(smem <= kMaxSharedBytes, "compress_new_windows: kernel_size ", geo.kernel_size,
              " needs ", smem, " bytes of shared memory per block at head dim ", D, " (at most ",
              kMaxSharedBytes, "): use the Triton kernel");
  geo.run_windows = windows;
  const int64_t runs = (geo.max_new_windows + windows - 1) / windows;
  const int64_t batch = req_slots.size(0), groups = k_buffer.size(1);
  TORCH_CHECK(runs < (int64_t{1} << 31) && groups <= 65535 && batch <= 65535,
              "compress_new_windows: grid too large (", runs, " runs, ", groups, " kv heads, ",
              batch, " requests)");
  Args<scalar_t> args{k_buffer.data_ptr<scalar_t>(),
                      k_buffer.stride(0),
                      k_buffer.stride(1),
                      out.data_ptr<scalar_t>(),
                      out.stride(0),
                      out.stride(1),
                      out.stride(2),
                      index_of(req_to_token),
                      req_to_token.stride(0),
                      index_of(req_slots),
                      index_of(old_lens),
                      index_of(new_lens),
                      geo};
  const dim3 grid(static_cast<unsigned>(runs), static_cast<unsigned>(groups),
                  static_cast<unsigned>(batch));
  compress_kernel<D, scalar_t>
      <<<grid, kThreads, static_cast<size_t>(smem), c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t, std::initializer_list<int> dims) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d : dims) {
    if ((t.stride(d) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

void check_index(const at::Tensor& t, const char* name, const at::Tensor& k_buffer, int dims) {
  TORCH_CHECK(t.device() == k_buffer.device() && t.dim() == dims &&
                  (t.scalar_type() == at::kInt || t.scalar_type() == at::kLong),
              "compress_new_windows: ", name, " must be an int32 or int64 ", dims, "-d tensor on ",
              k_buffer.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void compress_new_windows(const at::Tensor& k_buffer, at::Tensor& out,
                          const at::Tensor& req_to_token, const at::Tensor& req_slots,
                          const at::Tensor& old_lens, const at::Tensor& new_lens,
                          int64_t kernel_size, int64_t stride, int64_t block_size,
                          int64_t max_new_windows) {
  TORCH_CHECK(k_buffer.is_cuda() && k_buffer.dim() == 3 && k_buffer.stride(2) == 1,
              "compress_new_windows: k_buffer must be a CUDA tensor [slots, kv_heads, dim] "
              "contiguous in dim, got ",
              k_buffer.sizes(), " on ", k_buffer.device());
  const int64_t groups = k_buffer.size(1), dim = k_buffer.size(2);
  TORCH_CHECK(stride > 0 && block_size > 0 && kernel_size >= stride && kernel_size % stride == 0 &&
                  stride % kPiece == 0,
              "compress_new_windows: kernel_size ", kernel_size, " / stride ", stride,
              " / block_size ", block_size, ": the CUDA kernel needs stride a multiple of ", kPiece,
              " and kernel_size a multiple of stride");
  TORCH_CHECK(kernel_size <= (int64_t{1} << 20) && stride <= (int64_t{1} << 20) &&
                  block_size <= (int64_t{1} << 30),
              "compress_new_windows: kernel_size ", kernel_size, ", stride ", stride,
              " or block_size ", block_size, " out of range");
  const int64_t rows = (block_size + stride - 1) / stride;
  TORCH_CHECK(out.device() == k_buffer.device() && out.scalar_type() == k_buffer.scalar_type() &&
                  out.dim() == 4 && out.size(1) == rows && out.size(2) == groups &&
                  out.size(3) == dim && out.stride(3) == 1,
              "compress_new_windows: out must be ", k_buffer.scalar_type(), " [pages, ", rows, ", ",
              groups, ", ", dim, "] contiguous in dim on ", k_buffer.device(), ", got ",
              out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK(aligned16(k_buffer, {0, 1}) && aligned16(out, {0, 1, 2}),
              "compress_new_windows: k_buffer and out rows must start on 16-byte boundaries, got "
              "strides ",
              k_buffer.strides(), " and ", out.strides());
  check_index(req_to_token, "req_to_token", k_buffer, 2);
  TORCH_CHECK(req_to_token.stride(1) == 1,
              "compress_new_windows: req_to_token must be contiguous along positions");
  check_index(req_slots, "req_slots", k_buffer, 1);
  check_index(old_lens, "old_lens", k_buffer, 1);
  check_index(new_lens, "new_lens", k_buffer, 1);
  const int64_t batch = req_slots.size(0);
  TORCH_CHECK(req_slots.is_contiguous() && old_lens.is_contiguous() && new_lens.is_contiguous() &&
                  old_lens.size(0) == batch && new_lens.size(0) == batch,
              "compress_new_windows: req_slots, old_lens and new_lens must be contiguous [", batch,
              "], got ", old_lens.sizes(), " and ", new_lens.sizes());
  if (max_new_windows <= 0 || batch == 0 || groups == 0) return;

  const c10::cuda::CUDAGuard guard(k_buffer.device());
  const Geometry geo{static_cast<int>(kernel_size), static_cast<int>(stride),
                     static_cast<int>(block_size), 0, max_new_windows};
  AT_DISPATCH_V2(k_buffer.scalar_type(), "compress_new_windows", AT_WRAP([&] {
                   switch (dim) {
                     case 64:
                       return launch<64, scalar_t>(k_buffer, out, req_to_token, req_slots, old_lens,
                                                   new_lens, geo);
                     case 128:
                       return launch<128, scalar_t>(k_buffer, out, req_to_token, req_slots,
                                                    old_lens, new_lens, geo);
                     default:
                       TORCH_CHECK(false, "compress_new_windows: head dim ", dim,
                                   " not compiled: use 64 or 128");
                   }
                 }),
                 at::kFloat, at::kHalf, at::kBFloat16);
}

// Writes in place only: nothing to shape for torch.compile's fake tensors.
void compress_new_windows_meta(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                               int64_t) {}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sala_sglang, m) {
  m.def(
      "compress_new_windows(Tensor k_buffer, Tensor(a!) out, Tensor req_to_token, "
      "Tensor req_slots, Tensor old_lens, Tensor new_lens, int kernel_size, int stride, "
      "int block_size, int max_new_windows) -> ()");
}

TORCH_LIBRARY_IMPL(sala_sglang, CUDA, m) { m.impl("compress_new_windows", &compress_new_windows); }
TORCH_LIBRARY_IMPL(sala_sglang, Meta, m) {
  m.impl("compress_new_windows", &compress_new_windows_meta);
}
