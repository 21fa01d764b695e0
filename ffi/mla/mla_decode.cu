// MLA decode over a paged bf16 KV cache (FlashMLA semantics) as an XLA FFI handler.
//
// Shapes: q [B, Sq, Hq, 576], kv [num_blocks, 64, 1, 576], block_table [B, max_blocks],
// seqlens [B]; out [B, Sq, Hq, 512] bf16, lse [B, Hq, Sq] f32. Query rows are packed per batch as
// row = s * Hq + h (q[b] viewed as [Sq * Hq, 576]), in tiles of 64 rows.
//
// Two launches on the stream, both inside the jitted program:
//   1. DecodeKernel, grid (head tiles, parts). The plan first: every CTA splits the batch's KV
//      blocks evenly over `num_parts` persistent parts, each a contiguous run over (batch, block)
//      with a fixed cost per batch touched (FlashMLA's balancing idea), by prefix sums over the
//      lengths, and keeps its own part's range. Then a producer thread streams 64-row KV blocks
//      through TMA into two shared-memory stages; warpgroup 0 computes S = Q K^T (WGMMA, Q
//      resident in shared memory), the online softmax in f32 (its running max moved only when a
//      block's max exceeds it by more than 8 in log2 units, so most blocks rescale nothing), and
//      hands P (bf16) plus the row rescale to warpgroup 1 through shared memory; both warpgroups
//      accumulate O = P V over their half of the 512 value columns (WGMMA with V read MN-major
//      straight from the K stage). A batch finished inside one part is written to out/lse
//      directly; a split batch writes normalized partials and lse.
//   2. CombineKernel: merges the partials of split batches (log-sum-exp weights), with the split
//      counts CTA (0, 0) of the decode kernel wrote. A programmatic dependent launch: its launch
//      overlaps the decode kernel (griddepcontrol.wait guards every read of the decode's output).
//      With `fuse_max_splits` = F > 0, a batch split into at most min(F, 4) pieces is merged
//      inside the decode kernel instead: each warpgroup counts its finished pieces per (batch,
//      head tile) in a global counter, and the one that finishes last merges that batch's
//      partials for its 256 value columns (the combine kernel's arithmetic, so the same bits).
//      The combine kernel then skips those batches (it still merges batches of more pieces: a
//      few long sequences over many parts, where its many CTAs share the work), and is not
//      launched when no batch can have more pieces (num_parts <= min(F, 4), or one part).
//
// Guards: block ids are clamped into [0, num_blocks), lengths into [0, max_blocks * 64]; cache
// rows at or past a length are zeroed in shared memory before P V (they may hold NaN) and masked
// out of S; query rows that see no key give out = 0, lse = +inf (FlashMLA's convention; the
// partials of a split keep the empty sum's log, -inf, which the merges weigh as zero).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/launch.h"
#include "common/sm90.cuh"
#include "common/status.h"
#include "common/tma.h"
#include "common/wgmma_bf16.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_ds::mla {
namespace {

using namespace jax_ds::sm90;

constexpr int kPage = 64;        // cache rows per block
constexpr int kDqk = 576;        // latent 512 + rope 64
constexpr int kDv = 512;         // value columns (the latent)
constexpr int kTileRows = 64;    // query rows per CTA (heads x Sq packed)
constexpr int kChunks = kDqk / 64;           // 64-column (128-byte) swizzled chunks per row
constexpr int kChunkBytes = 64 * 128;        // one [64 rows x 64 cols] bf16 chunk
constexpr int kTileBytes = kChunks * kChunkBytes;  // 73728: a Q tile or a KV block
constexpr int kPreciseMaxLen = 1024;  // sequences up to this length get P V in two passes
// The softmax's running max may lag a row's true max by up to kLazyLog2 (log2 units of the
// scaled scores), so P's weights stay under 2^kLazyLog2 (see the softmax).
constexpr float kLazyLog2 = 8.f;
constexpr int kMaxFixedCost = 64;  // planner: the most the `fixed_cost` attribute may ask
constexpr int kThreads = 384;    // 2 consumer warpgroups + 1 producer warpgroup (one thread)

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kKv = kTileBytes;                      // 2 stages
  static constexpr int kP = kKv + 2 * kTileBytes;             // [64 x 64] bf16, swizzled
  static constexpr int kStats = kP + kChunkBytes;             // float[128]: 1/l, then lse
  static constexpr int kFlags = kStats + 128 * 4;             // int[2]: "merge this batch", per WG
  static constexpr int kBars = kFlags + 2 * 4;                // mbarriers
  static constexpr int kNumBars = 8;
  static constexpr int kBytes = kBars + kNumBars * 8;
  static constexpr int kAlloc = kBytes + 1024;                // slack for 1024-byte alignment
};
static_assert(Smem::kP % 1024 == 0, "P tile must be 1024-byte aligned");
static_assert(Smem::kAlloc <= kMaxSmemBytes, "shared memory");

struct Params {
  const int32_t* block_table;
  const int32_t* seqlens;
  __nv_bfloat16* out;
  float* lse;
  float* o_acc;     // [2 * num_parts, rows, 512] partials of split batches
  float* lse_acc;   // [2 (warpgroup), 2 * num_parts, rows]; the combine kernel reads copy 0
  int32_t* plan;    // num_splits [B], then split_base [B] (for the combine kernel)
  int32_t* counters;  // [B, head tiles, 2]: pieces finished per warpgroup (zeroed before launch)
  int batch, sq, hq, rows, max_blocks, num_blocks, num_parts, tiles;
  int fuse_max;        // batches of 2..fuse_max pieces are merged in the decode kernel (0: none)
  int fixed_cost;      // planner: cost of touching a batch, in KV blocks (>= 1)
  int align_slack_pct; // planner: equal lengths cut at batch ends if parts grow <= this % (or
                       // fixed_cost blocks)
  int causal;
  int q_box_rows;      // Q rows one TMA box brings (rows < 64: only the batch's rows, rounded to 8)
  float scale, scale_log2;
};

// 2^x by the special-function unit alone (ex2.approx.ftz: 2 ulp, results under 2^-126 flushed to
// zero). exp2f adds range scaling for subnormal results (two FMULs and a compare per value in
// the softmax's inner loop); a softmax weight under 2^-126 changes neither the sum nor P V.
__device__ __forceinline__ float Exp2Ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The lse a query row reports: the empty sum's log (-inf: no key seen) becomes +inf, FlashMLA's
// convention. Only the final stores use it; partials keep -inf for the merges.
__device__ __forceinline__ float FinalLse(float lse) { return lse == -INFINITY ? INFINITY : lse; }

__device__ __forceinline__ int ClampedLen(const Params& p, int b) {
  return min(max(p.seqlens[b], 0), p.max_blocks * kPage);
}

// ---- trace: a build with -DJAX_DS_MLA_TRACE only (CMake option JAX_DS_MLA_TRACE; read by
// scripts/mla_trace.py). Each decode CTA stamps %globaltimer (ns) at fixed points of its
// timeline into its own kTraceSlots slots; the combine kernel keeps its first start and last end.
// The default build compiles none of it.
#ifdef JAX_DS_MLA_TRACE
constexpr int kTraceCtas = 1024, kTraceSlots = 64, kTraceSegs = 6;
enum TraceSlot {
  kTrEntry = 0, kTrPlanned = 1, kTrProducerDone = 2, kTrWg0End = 3, kTrWg1End = 4,
  kTrSegments = 5, kTrBlocks = 6, kTrSplitMask = 7,
  kTrQIssue = 8, kTrQFull = 14, kTrFirstKv = 20, kTrLastS = 26, kTrEpiStart = 32,
  kTrEpiEnd = 38, kTrWg1FirstP = 44, kTrWg1SegEnd = 50,
};
// [0, kTraceCtas * kTraceSlots): the decode CTAs' slots; then the combine kernel's first start,
// first start after its dependency wait, last start after it, last end.
__device__ unsigned long long g_trace[kTraceCtas * kTraceSlots + 4];
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void TraceAt(int slot, unsigned long long v) {
  const int cta = blockIdx.y * gridDim.x + blockIdx.x;
  if (cta < kTraceCtas && slot < kTraceSlots) g_trace[cta * kTraceSlots + slot] = v;
}
// Each macro is a whole statement that the default build drops (an empty `if` left behind moved
// ptxas' register assignment of the decode kernel).
#define MLA_TRACE_IF(cond, slot) \
  if (cond) TraceAt((slot), GlobalTimer())
#define MLA_TRACE_SEG_IF(cond, slot, k) \
  if ((cond) && (k) < kTraceSegs) TraceAt((slot) + (k), GlobalTimer())
#define MLA_TRACE_COMBINE_IF(cond, i, op) \
  if (cond) op(&g_trace[kTraceCtas * kTraceSlots + (i)], GlobalTimer())
#else
#define MLA_TRACE_IF(cond, slot)
#define MLA_TRACE_SEG_IF(cond, slot, k)
#define MLA_TRACE_COMBINE_IF(cond, i, op)
#endif

// ---- 1. plan (computed by every decode CTA for its own part) ----------------------------------
// Batch b costs p.fixed_cost + nb_b blocks and occupies [cum_b, cum_b + cost_b) on a line of total
// cost; its blocks sit at cum_b + p.fixed_cost + j. Part i owns the positions [i * payload,
// (i + 1) * payload) with payload = ceil(total / parts): a contiguous run of (batch, block), cut
// evenly by cost (FlashMLA's balancing idea: a fixed price per batch touched, the rest per block).
// When every batch has the same block count, the payload is rounded up to a multiple of a batch's
// cost if that adds at most max(p.fixed_cost, p.align_slack_pct % of the payload): then no batch
// is split (some parts may get none).
// An empty batch belongs to the part holding cum_b. Split batches get consecutive partial slots.
// Each CTA derives its part's batch range from two scans over the batch (a few microseconds less
// than a separate plan kernel whose results every CTA would wait for); CTA (0, 0) also writes
// num_splits [B] and split_base [B] (first partial slot of a split batch) for the combine kernel.
__device__ __forceinline__ int BlocksOf(const Params& p, int b) {
  return (ClampedLen(p, b) + kPage - 1) / kPage;
}

// The split count of batch b given its start on the cost line.
__device__ __forceinline__ int SplitsOf(int64_t cum, int nb, int64_t payload, int fixed_cost) {
  if (nb == 0) return 1;
  const int64_t start = cum + fixed_cost;
  return static_cast<int>((start + nb - 1) / payload - start / payload + 1);
}

// Exclusive scan of one value per thread over the CTA (all its threads); also the total.
__device__ int64_t CtaExclusiveScan(int64_t v, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = static_cast<int>(blockDim.x) / 32;
  int64_t x = v;
  #pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffff, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < warps ? warp_sums[lane] : 0;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffff, w, o);
      if (lane >= o) w += y;
    }
    if (lane < warps) warp_sums[lane] = w;
  }
  __syncthreads();
  const int64_t excl = x - v + (warp > 0 ? warp_sums[warp - 1] : 0);
  *total = warp_sums[warps - 1];
  __syncthreads();
  return excl;
}

// A part's batch range [begin_b, end_b] (end_b < begin_b: none), the payload, and the cost-line
// start and first partial slot of batch begin_b.
struct PartPlan {
  int begin_b, end_b, payload, cum, slot;
};

// Called by every thread of the CTA; `scratch`: 288 bytes of shared memory, 8-byte aligned (static
// shared memory would lower the kernel's dynamic opt-in below the whole 227 KB).
__device__ PartPlan PlanPart(const Params& p, int part, bool write_splits, uint8_t* scratch) {
  int64_t* warp_sums = reinterpret_cast<int64_t*>(scratch);
  int32_t* found = reinterpret_cast<int32_t*>(scratch + 32 * sizeof(int64_t));
  int32_t* nb_range = found + 4;  // the fewest and most blocks of a batch
  const int per = (p.batch + blockDim.x - 1) / blockDim.x;  // batches per thread, in a run
  const int b0 = min(p.batch, static_cast<int>(threadIdx.x) * per), b1 = min(p.batch, b0 + per);
  int64_t local = 0;
  int nb_min = INT_MAX, nb_max = -1;
  for (int b = b0; b < b1; ++b) {
    const int nb = BlocksOf(p, b);
    local += nb + p.fixed_cost;
    nb_min = min(nb_min, nb);
    nb_max = max(nb_max, nb);
  }
  if (threadIdx.x == 0) {  // the scan's barriers order these before the atomics below
    nb_range[0] = INT_MAX;
    nb_range[1] = -1;
  }
  int64_t total;
  const int64_t cum0 = CtaExclusiveScan(local, warp_sums, &total);
  nb_min = __reduce_min_sync(0xffffffff, nb_min);
  nb_max = __reduce_max_sync(0xffffffff, nb_max);
  if (threadIdx.x % 32 == 0) {
    atomicMin(&nb_range[0], nb_min);
    atomicMax(&nb_range[1], nb_max);
  }
  __syncthreads();
  int64_t payload = max((total + p.num_parts - 1) / p.num_parts, int64_t(1));
  if (nb_range[0] == nb_range[1]) {
    // Every batch has the same block count (a uniform decode step): cuts at multiples of one
    // batch's cost split none, so no part pays a second batch's fixed cost and no partials are
    // written or merged. Taken when it lengthens the parts by at most that fixed cost, or by
    // align_slack_pct % of the payload (64-row tiles: a split's partials are 128 KB a piece,
    // written, read back and merged by the combine kernel).
    const int64_t cost = nb_range[0] + p.fixed_cost;
    const int64_t aligned = (payload + cost - 1) / cost * cost;
    const int64_t slack = max(int64_t(p.fixed_cost), payload * p.align_slack_pct / 100);
    if (aligned - payload <= slack) payload = aligned;
  }
  int64_t slots = 0, cum = cum0;
  for (int b = b0; b < b1; ++b) {
    const int nb = BlocksOf(p, b);
    const int n = SplitsOf(cum, nb, payload, p.fixed_cost);
    slots += n > 1 ? n : 0;
    cum += nb + p.fixed_cost;
  }
  int64_t unused;
  int64_t slot = CtaExclusiveScan(slots, warp_sums, &unused);
  const int64_t begin = int64_t(part) * payload, last = begin + payload - 1;
  if (threadIdx.x == 0 && begin >= total) {  // no batches
    found[0] = 0;
    found[1] = -1;
    found[2] = found[3] = 0;
  }
  cum = cum0;
  for (int b = b0; b < b1; ++b) {
    const int nb = BlocksOf(p, b);
    const int64_t cost = nb + p.fixed_cost;
    const int n = SplitsOf(cum, nb, payload, p.fixed_cost);
    if (write_splits) {
      p.plan[b] = n;
      p.plan[p.batch + b] = n > 1 ? static_cast<int32_t>(slot) : 0;
    }
    if (begin < total) {  // exactly one batch holds each position below total
      if (cum <= begin && begin < cum + cost) {
        found[0] = b;
        found[2] = static_cast<int32_t>(cum);
        found[3] = static_cast<int32_t>(slot);
      }
      if (cum <= last && (last < cum + cost || b == p.batch - 1)) found[1] = b;
    }
    slot += n > 1 ? n : 0;
    cum += cost;
  }
  __syncthreads();
  return PartPlan{found[0], found[1], static_cast<int>(payload), found[2], found[3]};
}

// ---- 2. decode ----------------------------------------------------------------------------------
// Byte offset of bf16 element (row, col) in a [64 x 64] tile stored with the 128-byte swizzle.
__device__ __forceinline__ int SwizzledOffset(int row, int col) {
  return row * 128 + ((((col * 2) >> 4) ^ (row & 7)) << 4) + ((col * 2) & 15);
}

// Shared-memory descriptor for B read MN-major from a KV stage: value columns [64 x c, ...) of a
// [64 tokens x 64 cols] chunk sequence; 64-column groups (chunks) 8192 B apart (leading byte
// offset), 8-token core groups 1024 B apart (stride byte offset), 128-byte swizzle.
// As sw128_kmajor_desc_lo / _from_lo (sm90.cuh), the low word (start address, leading byte
// offset) alone, so that steps inside a stage are 32-bit adds; the high word is the same.
__device__ __forceinline__ uint32_t Sw128MnMajorDescLo(const void* tile) {
  return ((smem_addr(tile) & 0x3FFFF) >> 4) | ((kChunkBytes >> 4) << 16);
}

// The segments (batch, block range, split index) of one part, in order (see the plan).
struct PartIter {
  int b, lo, hi, split;
  int nsplits, slot;           // the batch's split count and first partial slot
  int part, end_b, payload;    // positions fit in int32 (the handler checks them)
  int next_cum, next_slot;     // cost-line start and first partial slot of batch b + 1

  __device__ void init(const PartPlan& plan, int part_index) {
    part = part_index;
    b = plan.begin_b - 1;
    end_b = plan.end_b;
    payload = plan.payload;
    next_cum = plan.cum;
    next_slot = plan.slot;
  }
  // Advances to the next segment this part owns; false when the part is done.
  __device__ bool next(const Params& p) {
    while (++b <= end_b && b < p.batch) {
      const int nb = BlocksOf(p, b);
      const int cum = next_cum;
      nsplits = SplitsOf(cum, nb, payload, p.fixed_cost);
      slot = next_slot;
      next_cum = cum + nb + p.fixed_cost;
      next_slot = slot + (nsplits > 1 ? nsplits : 0);
      if (nb == 0) {
        if (cum / payload != part) continue;
        lo = hi = split = 0;
        return true;
      }
      const int start = cum + p.fixed_cost;
      const int64_t first = int64_t(part) * payload - start;
      const int64_t last = int64_t(part + 1) * payload - start;
      lo = static_cast<int>(first > 0 ? first : 0);
      hi = static_cast<int>(last < nb ? last : nb);
      if (lo >= hi) continue;
      split = part - start / payload;
      return true;
    }
    return false;
  }
};

// Zeroes cache rows [valid, 64) of chunks [c0, c0 + 4) of a KV stage (rows past a length may hold
// NaN, and P = 0 times NaN is NaN); 128 threads.
__device__ __forceinline__ void ZeroTailRows(uint8_t* stage, int valid, int c0, int t) {
  const int rows = kPage - valid;
  for (int i = t; i < rows * 4 * 8; i += 128) {  // 16-byte pieces
    const int chunk = c0 + i / (rows * 8);
    const int rem = i % (rows * 8);
    const int row = valid + rem / 8;
    *reinterpret_cast<uint4*>(stage + chunk * kChunkBytes + row * 128 + (rem % 8) * 16) =
        make_uint4(0, 0, 0, 0);
  }
}

struct Bars {
  uint64_t* full;     // [2] KV stage landed (TMA bytes)
  uint64_t* empty;    // [2] KV stage consumed (WG0 + WG1)
  uint64_t* q_full;   // Q tile landed
  uint64_t* q_empty;  // WG0 done reading the Q tile
  uint64_t* p_full;   // P + row stats published by WG0
  uint64_t* p_empty;  // WG1 done with P + row stats
};

// Writes a warpgroup's [64 x 256] accumulator (columns col0..col0+255), scaled per row.
template <bool kSplit>
__device__ __forceinline__ void StoreO(const Params& p, const float* acc, const float inv[2],
                                       int b, int tile_row0, int valid_rows, int col0,
                                       int slot, int t) {
  const int warp = t / 32, lane = t % 32;
  #pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + lane / 4 + half * 8;
    if (r >= valid_rows) continue;
    const int row = tile_row0 + r;
    #pragma unroll
    for (int g = 0; g < 32; ++g) {
      const int col = col0 + g * 8 + (lane % 4) * 2;
      const float v0 = acc[g * 4 + half * 2] * inv[half];
      const float v1 = acc[g * 4 + half * 2 + 1] * inv[half];
      if constexpr (kSplit) {
        float2* dst = reinterpret_cast<float2*>(
            p.o_acc + (static_cast<int64_t>(slot) * p.rows + row) * kDv + col);
        *dst = make_float2(v0, v1);
      } else {
        __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(
            p.out + (static_cast<int64_t>(b) * p.rows + row) * kDv + col);
        *dst = __floats2bfloat162_rn(v0, v1);
      }
    }
  }
}

// The log-sum-exp merge of one split batch's N pieces, for warpgroup `wg`'s 256 value columns of
// one head tile (128 threads): lse = log sum_j exp(lse_j), out = sum_j exp(lse_j - lse) o_j, with
// the combine kernel's arithmetic in its order (the sum of the exponentials by the same lane
// butterfly), so the same bits. Each warp takes R rows at a time and issues all their loads
// before using any (a row at a time would wait an L2 round trip per piece). Partials are read
// from L2 (ld.global.cg): other CTAs wrote them in this grid. Warpgroup 0 also writes the lse.
constexpr int kMaxFusedSplits = 4;

template <int N>
__device__ __forceinline__ void MergeSplits(const Params& p, int wg, int b, int tile_row0,
                                            int valid_rows, int base, int t) {
  constexpr int R = N == 2 ? 4 : 2;  // rows per warp and round: 2 N R float4 loads in flight
  const int warp = t / 32, lane = t % 32;
  const int64_t copy = wg * 2 * static_cast<int64_t>(p.num_parts);  // this warpgroup's lse copy
  const int col = wg * 256 + lane * 8;
  for (int first = warp * R; first < valid_rows; first += 4 * R) {
    float lj[R][N];
    float4 v[R][N][2];
    #pragma unroll
    for (int i = 0; i < R; ++i) {
      const int row = tile_row0 + min(first + i, valid_rows - 1);  // past valid: not stored
      #pragma unroll
      for (int j = 0; j < N; ++j) {
        lj[i][j] = __ldcg(p.lse_acc + (copy + base + j) * p.rows + row);
        const float4* src = reinterpret_cast<const float4*>(
            p.o_acc + ((base + j) * static_cast<int64_t>(p.rows) + row) * kDv + col);
        v[i][j][0] = __ldcg(src);
        v[i][j][1] = __ldcg(src + 1);
      }
    }
    #pragma unroll
    for (int i = 0; i < R; ++i) {
      if (first + i >= valid_rows) break;
      const int row = tile_row0 + first + i;
      float mx = -INFINITY;
      #pragma unroll
      for (int j = 0; j < N; ++j) mx = fmaxf(mx, lj[i][j]);
      const float m_use = mx == -INFINITY ? 0.f : mx;
      float sum = 0.f;  // lane j holds term j, as in the combine kernel
      #pragma unroll
      for (int j = 0; j < N; ++j) {
        if (lane == j) sum = expf(lj[i][j] - m_use);
      }
      #pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
      const float lse = sum != 0.f ? m_use + logf(sum) : -INFINITY;  // a NaN piece: NaN
      if (wg == 0 && lane == 0) {
        const int sq_i = row / p.hq, h_i = row % p.hq;
        p.lse[(static_cast<int64_t>(b) * p.hq + h_i) * p.sq + sq_i] = FinalLse(lse);
      }
      float4 o0 = make_float4(0.f, 0.f, 0.f, 0.f), o1 = o0;
      #pragma unroll
      for (int j = 0; j < N; ++j) {
        const float w = lse == -INFINITY ? 0.f : expf(lj[i][j] - lse);
        if (w == 0.f) continue;
        o0.x += w * v[i][j][0].x;
        o0.y += w * v[i][j][0].y;
        o0.z += w * v[i][j][0].z;
        o0.w += w * v[i][j][0].w;
        o1.x += w * v[i][j][1].x;
        o1.y += w * v[i][j][1].y;
        o1.z += w * v[i][j][1].z;
        o1.w += w * v[i][j][1].w;
      }
      const __nv_bfloat162 packed[4] = {
          __floats2bfloat162_rn(o0.x, o0.y), __floats2bfloat162_rn(o0.z, o0.w),
          __floats2bfloat162_rn(o1.x, o1.y), __floats2bfloat162_rn(o1.z, o1.w)};
      *reinterpret_cast<uint4*>(p.out + (static_cast<int64_t>(b) * p.rows + row) * kDv + col) =
          *reinterpret_cast<const uint4*>(packed);
    }
  }
}

// After a warpgroup stored its piece of a split batch (partials and its lse copy): counts the
// piece, and if it was the batch's last for this warpgroup, merges the batch (MergeSplits;
// n in [2, kMaxFusedSplits]). The fence before the count makes this warpgroup's stores visible
// to whichever one merges.
__device__ __forceinline__ void FinishPiece(const Params& p, int* flags, int wg, int b, int tile,
                                            int tile_row0, int valid_rows, int base, int n,
                                            int t) {
  __threadfence();
  named_barrier(1 + wg, 128);
  if (t == 0) {
    const int done = atomicAdd(p.counters + (static_cast<int64_t>(b) * p.tiles + tile) * 2 + wg, 1);
    if (done == n - 1) __threadfence();
    flags[wg] = done == n - 1;
  }
  named_barrier(1 + wg, 128);
  if (!flags[wg]) return;
  if (n == 2) {
    MergeSplits<2>(p, wg, b, tile_row0, valid_rows, base, t);
  } else if (n == 3) {
    MergeSplits<3>(p, wg, b, tile_row0, valid_rows, base, t);
  } else {
    MergeSplits<4>(p, wg, b, tile_row0, valid_rows, base, t);
  }
}

// O's accumulator [64 x 256] per warpgroup times this thread's two rows' rescale factors; a warp
// whose rows all kept their running max (factors 1, the usual case with the lazy max) skips it.
__device__ __forceinline__ void RescaleRows(float* acc, float s0, float s1) {
  if (!__any_sync(0xffffffff, s0 != 1.f || s1 != 1.f)) return;
  #pragma unroll
  for (int g = 0; g < 32; ++g) {
    acc[g * 4 + 0] *= s0;
    acc[g * 4 + 1] *= s0;
    acc[g * 4 + 2] *= s1;
    acc[g * 4 + 3] *= s1;
  }
}

template <bool kFused>
__global__ void __launch_bounds__(kThreads, 1)
DecodeKernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap kv_map,
             Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = align_smem_1024(smem_raw);
  uint8_t* q_tile = smem + Smem::kQ;
  // The two KV stages, by arithmetic: a runtime-indexed pointer array would live in local memory
  // (an LDL per block and warp before the WGMMA descriptors, and generic stores through it).
  uint8_t* const kv_base = smem + Smem::kKv;
  const auto kv_stage = [kv_base](int s) { return kv_base + s * kTileBytes; };
  uint8_t* p_tile = smem + Smem::kP;
  float* stats = reinterpret_cast<float*>(smem + Smem::kStats);
  int* flags = reinterpret_cast<int*>(smem + Smem::kFlags);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + Smem::kBars);
  Bars bars{bar, bar + 2, bar + 4, bar + 5, bar + 6, bar + 7};

  const int tid = threadIdx.x;
  const int tile = blockIdx.x;
  const int part = blockIdx.y;
  MLA_TRACE_IF(tid == 0, kTrEntry);
  if (tid == 0) {
    mbar_init(&bars.full[0], 1);
    mbar_init(&bars.full[1], 1);
    mbar_init(&bars.empty[0], 2);
    mbar_init(&bars.empty[1], 2);
    mbar_init(bars.q_full, 1);
    mbar_init(bars.q_empty, 1);
    mbar_init(bars.p_full, 1);
    mbar_init(bars.p_empty, 1);
    fence_barrier_init();
  }
  // Q rows past the box are never loaded: zero them once (their S rows are computed, not stored).
  if (tid < 128 && p.q_box_rows < kTileRows) {
    const int rows = kTileRows - p.q_box_rows;
    for (int i = tid; i < kChunks * rows * 8; i += 128) {
      const int chunk = i / (rows * 8), rem = i % (rows * 8);
      *reinterpret_cast<uint4*>(q_tile + chunk * kChunkBytes + (p.q_box_rows + rem / 8) * 128 +
                                (rem % 8) * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async_smem();
  }
  __syncthreads();
  // A no-op unless launched as a programmatic dependent (then: before reading any input).
  grid_dependency_wait();
  // The combine kernel may be launched now: its CTAs wait for this grid to complete before
  // reading anything, and take SMs only as this one-wave grid's CTAs leave them.
  grid_dependency_launch_dependents();

  const int tile_row0 = tile * kTileRows;
  const int valid_rows = min(kTileRows, p.rows - tile_row0);
  PartIter seg;
  // The P tile is free until the first block: the plan's scratch.
  seg.init(PlanPart(p, part, tile == 0 && part == 0, p_tile), part);
  MLA_TRACE_IF(tid == 0, kTrPlanned);

  if (tid >= 256) {  // ---- producer warpgroup: one thread issues every TMA copy --------------------
    regs_dealloc<24>();
    if (tid != 256) return;
    prefetch_tensormap(&q_map);
    prefetch_tensormap(&kv_map);
    // A KV block read by one CTA only (one head tile) is not kept in L2 for long; with several
    // head tiles the other CTAs read it from L2 (NOTES-mla: h16 +2-4% with the hint, h128 -2%).
    const bool evict_kv_early = gridDim.x == 1;
    const uint64_t evict_first = l2_policy_evict_first();
    const uint32_t q_bytes = kChunks * p.q_box_rows * 128;
    int it = 0, nseg = 0;
    while (seg.next(p)) {
      if (nseg > 0) mbar_wait(bars.q_empty, (nseg - 1) & 1);
      MLA_TRACE_SEG_IF(true, kTrQIssue, nseg);
      mbar_arrive_expect_tx(bars.q_full, q_bytes);
      const int qrow = seg.b * p.rows + tile_row0;
      #pragma unroll 1
      for (int c = 0; c < kChunks; ++c) {
        tma_load_2d(q_tile + c * kChunkBytes, &q_map, bars.q_full, c * 64, qrow);
      }
      const int32_t* table = p.block_table + static_cast<int64_t>(seg.b) * p.max_blocks;
      for (int blk = seg.lo; blk < seg.hi; ++blk, ++it) {
        const int s = it & 1, use = it >> 1;
        if (use > 0) mbar_wait(&bars.empty[s], (use - 1) & 1);
        const int id = min(max(table[blk], 0), p.num_blocks - 1);
        mbar_arrive_expect_tx(&bars.full[s], kTileBytes);
        #pragma unroll 1
        for (int c = 0; c < kChunks; ++c) {
          if (evict_kv_early) {
            tma_load_2d_hint(kv_stage(s) + c * kChunkBytes, &kv_map, &bars.full[s], c * 64,
                             id * kPage, evict_first);
          } else {
            tma_load_2d(kv_stage(s) + c * kChunkBytes, &kv_map, &bars.full[s], c * 64, id * kPage);
          }
        }
      }
      ++nseg;
    }
    MLA_TRACE_IF(true, kTrProducerDone);
    return;
  }

  // ---- consumers: warpgroup 0 (S, softmax, O[:, :256]) and 1 (O[:, 256:]) ---------------------
  regs_alloc<240>();
  const int wg = tid / 128;
  const int t = tid % 128;
  const int warp = t / 32, lane = t % 32;
  const int r0 = warp * 16 + lane / 4;  // this thread's rows: r0 and r0 + 8
  float acc[128];
  int it = 0, handoff = 0, nseg = 0;
#ifdef JAX_DS_MLA_TRACE
  int nblocks_traced = 0;
  unsigned split_mask = 0;
#endif

  while (seg.next(p)) {
    const int len = ClampedLen(p, seg.b);
    const int nb = (len + kPage - 1) / kPage;
    const int nsplits = seg.nsplits;
    const bool split = nsplits > 1;
    const int slot = split ? seg.slot + seg.split : 0;
    const int tail_valid = len - (nb - 1) * kPage;  // rows of the last block inside the length
    // P V passes per block: bf16 P alone (as FlashMLA) leaves a 2^-9 relative error per weight
    // that only averages out over many keys; short sequences add P's rounding residual.
    // (from lane 0, warp-uniform for the compiler: the pass loops then keep their WGMMA
    // descriptors in uniform registers; `len` is read from memory)
    const int passes = __shfl_sync(0xffffffffu, len <= kPreciseMaxLen ? 2 : 1, 0);
    #pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;

    if (wg == 0) {
      // Keys a row sees: [0, vis); rows of query s = row / Hq (causal: len - (Sq - 1 - s)).
      int vis[2];
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int s = min((tile_row0 + r0 + h * 8) / p.hq, p.sq - 1);
        vis[h] = p.causal ? len - (p.sq - 1 - s) : len;
      }
      const int min_vis = p.causal ? len - (p.sq - 1) : len;
      const int mask_from = min_vis <= 0 ? 0 : min_vis / kPage;  // blocks from here need masking
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      mbar_wait(bars.q_full, nseg & 1);
      MLA_TRACE_SEG_IF(t == 0, kTrQFull, nseg);
      for (int blk = seg.lo; blk < seg.hi; ++blk, ++it) {
        // The stage from lane 0: the compiler then knows it is warp-uniform (`it` counts blocks
        // of segments read from memory), so its barrier and descriptors live in uniform
        // registers instead of being built per thread and moved over with R2UR per WGMMA.
        const int s = __shfl_sync(0xffffffffu, it & 1, 0);
        mbar_wait(&bars.full[s], (it >> 1) & 1);
        MLA_TRACE_SEG_IF(t == 0 && blk == seg.lo, kTrFirstKv, nseg);
        float sc[32];
        const uint32_t q_lo = sw128_kmajor_desc_lo(q_tile);
        const uint32_t kv_lo = sw128_kmajor_desc_lo(kv_stage(s));
        wgmma_fence();
        #pragma unroll
        for (int kk = 0; kk < kDqk / 16; ++kk) {
          const uint32_t off = ((kk / 4) * kChunkBytes + (kk % 4) * 32) >> 4;  // 16-byte units
          WgmmaBf16<64>::mma(sc, sw128_kmajor_desc_from_lo(q_lo + off),
                             sw128_kmajor_desc_from_lo(kv_lo + off), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        #pragma unroll
        for (int i = 0; i < 32; ++i) fence_operand(sc[i]);
        #pragma unroll
        for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
        if (blk == seg.hi - 1 && t == 0) mbar_arrive(bars.q_empty);
        MLA_TRACE_SEG_IF(blk == seg.hi - 1 && t == 0, kTrLastS, nseg);

        if (blk >= mask_from) {
          #pragma unroll
          for (int g = 0; g < 8; ++g) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = blk * kPage + g * 8 + (lane % 4) * 2 + (e & 1);
              if (key >= vis[e >> 1]) sc[g * 4 + e] = -INFINITY;
            }
          }
        }
        float scale_row[2];
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = -INFINITY;
          #pragma unroll
          for (int g = 0; g < 8; ++g) mx = fmaxf(mx, fmaxf(sc[g * 4 + h * 2], sc[g * 4 + h * 2 + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
          // The running max moves only when the block's max exceeds it by more than kLazyLog2
          // (log2 units of the scaled scores; always from -inf): weights stay under
          // 2^kLazyLog2 = 256, and most blocks need no rescale of O at all (the warps skip it
          // below; FlashAttention-4 does the same). NaN compares false: kept out of the max, as
          // fmaxf does. The lse, m * scale + log(l), is the same sum whichever max is used.
          const float m_new = (mx - m[h]) * p.scale_log2 > kLazyLog2 ? mx : m[h];
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          // (x - m) * c rather than x * c - m * c: the difference is exact near the max, so the
          // exponent carries one rounding (the lse bound is 1e-6 relative).
          scale_row[h] = m_new == m[h] ? 1.f : Exp2Ftz((m[h] - m_use) * p.scale_log2);
          float sum = 0.f;
          #pragma unroll
          for (int g = 0; g < 8; ++g) {
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = sc[g * 4 + h * 2 + e];
              x = Exp2Ftz((x - m_use) * p.scale_log2);
              sum += x;
            }
          }
          l[h] = l[h] * scale_row[h] + sum;
          m[h] = m_new;
        }
        RescaleRows(acc, scale_row[0], scale_row[1]);
        // Publish P and the row rescale once warpgroup 1 is done with the previous ones. Short
        // sequences also keep P's bf16 rounding residual for a second pass (P = hi + lo).
        uint32_t p_lo[16];
        if (handoff > 0) mbar_wait(bars.p_empty, (handoff - 1) & 1);
        #pragma unroll
        for (int g = 0; g < 8; ++g) {
          #pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = r0 + h * 8;
            const float a = sc[g * 4 + h * 2], c = sc[g * 4 + h * 2 + 1];
            const __nv_bfloat162 hi = __floats2bfloat162_rn(a, c);
            *reinterpret_cast<__nv_bfloat162*>(p_tile + SwizzledOffset(r, g * 8 + (lane % 4) * 2)) =
                hi;
            // Also computed when passes == 1 (not read then): a build skipping it ran 5% slower
            // at h128 (NOTES-mla).
            const float2 hf = __bfloat1622float2(hi);
            const __nv_bfloat162 lo = __floats2bfloat162_rn(a - hf.x, c - hf.y);
            p_lo[g * 2 + h] = *reinterpret_cast<const uint32_t*>(&lo);
          }
        }
        if (lane % 4 == 0) {
          stats[r0] = scale_row[0];
          stats[r0 + 8] = scale_row[1];
        }
        if (blk == nb - 1 && tail_valid < kPage) ZeroTailRows(kv_stage(s), tail_valid, 0, t);
        #pragma unroll 1
        for (int pass = 0; pass < passes; ++pass) {
          if (pass == 1) {  // the residual, once warpgroup 1 is done with hi; no rescale
            mbar_wait(bars.p_empty, (handoff - 1) & 1);
            #pragma unroll
            for (int g = 0; g < 8; ++g) {
              #pragma unroll
              for (int h = 0; h < 2; ++h) {
                *reinterpret_cast<uint32_t*>(
                    p_tile + SwizzledOffset(r0 + h * 8, g * 8 + (lane % 4) * 2)) = p_lo[g * 2 + h];
              }
            }
            if (lane % 4 == 0) {
              stats[r0] = 1.f;
              stats[r0 + 8] = 1.f;
            }
          }
          fence_proxy_async_smem();
          named_barrier(1, 128);
          if (t == 0) mbar_arrive(bars.p_full);
          ++handoff;
          wgmma_fence();
          const uint32_t p_desc = sw128_kmajor_desc_lo(p_tile);
          const uint32_t v_desc = Sw128MnMajorDescLo(kv_stage(s));
          #pragma unroll
          for (int kk = 0; kk < kPage / 16; ++kk) {
            WgmmaBf16TransB<256>::mma(acc, sw128_kmajor_desc_from_lo(p_desc + kk * 2),
                                      sw128_kmajor_desc_from_lo(v_desc + kk * (2048 >> 4)), 1);
          }
          wgmma_commit();
          // Free the stage as soon as this P V is done (the tensor cores are busy with it
          // anyway), so the next load overlaps the whole next S. (wait<1> after the next S would
          // do the same but makes ptxas serialize every WGMMA: C7514.)
          wgmma_wait<0>();
          #pragma unroll
          for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
        }
        if (t == 0) mbar_arrive(&bars.empty[s]);
      }
      if (seg.hi == seg.lo && t == 0) mbar_arrive(bars.q_empty);  // nothing read from this Q
      MLA_TRACE_SEG_IF(t == 0, kTrEpiStart, nseg);
      // Final row stats: 1/l for warpgroup 1, lse for the output.
      float inv[2], lse[2];
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
        // l == 0: no key seen (out 0, lse -inf); a NaN l (a NaN in a row seen) stays NaN
        inv[h] = l[h] != 0.f ? 1.f / l[h] : 0.f;
        lse[h] = l[h] != 0.f ? m[h] * p.scale + logf(l[h]) : -INFINITY;
      }
      if (handoff > 0) mbar_wait(bars.p_empty, (handoff - 1) & 1);
      if (lane % 4 == 0) {
        stats[r0] = inv[0];
        stats[r0 + 8] = inv[1];
        if constexpr (kFused) {  // warpgroup 1 keeps its own lse copy for its merge
          stats[64 + r0] = lse[0];
          stats[64 + r0 + 8] = lse[1];
        }
      }
      named_barrier(1, 128);
      if (t == 0) mbar_arrive(bars.p_full);
      ++handoff;
      if (lane % 4 == 0) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + h * 8;
          if (r >= valid_rows) continue;
          const int row = tile_row0 + r;
          if (split) {
            p.lse_acc[static_cast<int64_t>(slot) * p.rows + row] = lse[h];
          } else {
            const int sq_i = row / p.hq, h_i = row % p.hq;
            p.lse[(static_cast<int64_t>(seg.b) * p.hq + h_i) * p.sq + sq_i] = FinalLse(lse[h]);
          }
        }
      }
      if (split) {
        StoreO<true>(p, acc, inv, seg.b, tile_row0, valid_rows, 0, slot, t);
        if (kFused && nsplits <= p.fuse_max) {
          FinishPiece(p, flags, 0, seg.b, tile, tile_row0, valid_rows, seg.slot, nsplits, t);
        }
      } else {
        StoreO<false>(p, acc, inv, seg.b, tile_row0, valid_rows, 0, slot, t);
      }
      MLA_TRACE_SEG_IF(t == 0, kTrEpiEnd, nseg);
    } else {
      for (int blk = seg.lo; blk < seg.hi; ++blk, ++it) {
        const int s = __shfl_sync(0xffffffffu, it & 1, 0);  // (warp-uniform: see warpgroup 0)
        mbar_wait(&bars.full[s], (it >> 1) & 1);
        #pragma unroll 1
        for (int pass = 0; pass < passes; ++pass) {
          mbar_wait(bars.p_full, handoff & 1);
          MLA_TRACE_SEG_IF(t == 0 && pass == 0 && blk == seg.lo, kTrWg1FirstP, nseg);
          const float rs0 = stats[r0], rs1 = stats[r0 + 8];
          RescaleRows(acc, rs0, rs1);
          if (pass == 0 && blk == nb - 1 && tail_valid < kPage) {
            ZeroTailRows(kv_stage(s), tail_valid, 4, t);
            fence_proxy_async_smem();
          }
          named_barrier(2, 128);
          wgmma_fence();
          const uint32_t p_desc = sw128_kmajor_desc_lo(p_tile);
          const uint32_t v_desc = Sw128MnMajorDescLo(kv_stage(s) + 4 * kChunkBytes);
          #pragma unroll
          for (int kk = 0; kk < kPage / 16; ++kk) {
            WgmmaBf16TransB<256>::mma(acc, sw128_kmajor_desc_from_lo(p_desc + kk * 2),
                                      sw128_kmajor_desc_from_lo(v_desc + kk * (2048 >> 4)), 1);
          }
          wgmma_commit();
          wgmma_wait<0>();
          #pragma unroll
          for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
          if (t == 0) mbar_arrive(bars.p_empty);
          ++handoff;
        }
        if (t == 0) mbar_arrive(&bars.empty[s]);
      }
      mbar_wait(bars.p_full, handoff & 1);
      const float inv[2] = {stats[r0], stats[r0 + 8]};
      float lse[2] = {0.f, 0.f};
      if constexpr (kFused) {
        lse[0] = stats[64 + r0];
        lse[1] = stats[64 + r0 + 8];
      }
      named_barrier(2, 128);
      if (t == 0) mbar_arrive(bars.p_empty);
      ++handoff;
      if (split) {
        StoreO<true>(p, acc, inv, seg.b, tile_row0, valid_rows, 256, slot, t);
        if (kFused && nsplits <= p.fuse_max) {
          if (lane % 4 == 0) {  // warpgroup 1's lse copy (slots of copy 1)
            const int64_t copy = 2 * static_cast<int64_t>(p.num_parts) + slot;
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = r0 + h * 8;
              if (r < valid_rows) p.lse_acc[copy * p.rows + tile_row0 + r] = lse[h];
            }
          }
          FinishPiece(p, flags, 1, seg.b, tile, tile_row0, valid_rows, seg.slot, nsplits, t);
        }
      } else {
        StoreO<false>(p, acc, inv, seg.b, tile_row0, valid_rows, 256, slot, t);
      }
      MLA_TRACE_SEG_IF(t == 0, kTrWg1SegEnd, nseg);
    }
#ifdef JAX_DS_MLA_TRACE
    if (tid == 0) {
      nblocks_traced += seg.hi - seg.lo;
      if (split && nseg < 32) split_mask |= 1u << nseg;
    }
#endif
    ++nseg;
  }
#ifdef JAX_DS_MLA_TRACE
  MLA_TRACE_IF(t == 0, wg == 0 ? kTrWg0End : kTrWg1End);
  if (tid == 0) {
    TraceAt(kTrSegments, nseg);
    TraceAt(kTrBlocks, nblocks_traced);
    TraceAt(kTrSplitMask, split_mask);
  }
#endif
}

// ---- 3. combine ---------------------------------------------------------------------------------
// One warp per (batch, row) of a split batch: lse = log sum_j exp(lse_j), out = sum_j
// exp(lse_j - lse) o_j.
__global__ void CombineKernel(Params p) {
  MLA_TRACE_COMBINE_IF(threadIdx.x == 0, 0, atomicMin);
  grid_dependency_wait();
  MLA_TRACE_COMBINE_IF(threadIdx.x == 0, 1, atomicMin);
  MLA_TRACE_COMBINE_IF(threadIdx.x == 0, 2, atomicMax);
  const int b = blockIdx.x;
  const int row = blockIdx.y * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;
  const int n = p.plan[b];
  // Written by the decode kernel: unsplit (the plan gives every batch >= 1 split), or merged
  // there (at most fuse_max pieces).
  if (n == 1 || n <= p.fuse_max) return;
  const int base = p.plan[p.batch + b];
  const int sq_i = row / p.hq, h_i = row % p.hq;
  float* lse_out = p.lse + (static_cast<int64_t>(b) * p.hq + h_i) * p.sq + sq_i;
  __nv_bfloat16* out = p.out + (static_cast<int64_t>(b) * p.rows + row) * kDv;
  float mx = -INFINITY;
  for (int j = lane; j < n; j += 32) mx = fmaxf(mx, p.lse_acc[static_cast<int64_t>(base + j) * p.rows + row]);
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int j = lane; j < n; j += 32) {
    sum += expf(p.lse_acc[static_cast<int64_t>(base + j) * p.rows + row] - m_use);
  }
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  const float lse = sum != 0.f ? m_use + logf(sum) : -INFINITY;  // a NaN piece: NaN
  if (lane == 0) *lse_out = FinalLse(lse);
  float4 o[4] = {};
  for (int j = 0; j < n; ++j) {
    const int64_t slot = base + j;
    const float lj = p.lse_acc[slot * p.rows + row];
    const float w = lse == -INFINITY ? 0.f : expf(lj - lse);
    if (w == 0.f) continue;
    const float4* src = reinterpret_cast<const float4*>(p.o_acc + (slot * p.rows + row) * kDv);
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 v = src[lane + 32 * k];
      o[k].x += w * v.x;
      o[k].y += w * v.y;
      o[k].z += w * v.z;
      o[k].w += w * v.w;
    }
  }
  #pragma unroll
  for (int k = 0; k < 4; ++k) {
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + (lane + 32 * k) * 4);
    dst[0] = __floats2bfloat162_rn(o[k].x, o[k].y);
    dst[1] = __floats2bfloat162_rn(o[k].z, o[k].w);
  }
  MLA_TRACE_COMBINE_IF(lane == 0, 3, atomicMax);
}

// ---- handler ------------------------------------------------------------------------------------
ffi::Error MlaDecodeImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv,
                         ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> seqlens,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::Buffer<ffi::S32>> plan,
                         ffi::Result<ffi::Buffer<ffi::F32>> o_acc,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse_acc,
                         ffi::Result<ffi::Buffer<ffi::S32>> counters, float softmax_scale,
                         bool causal, int32_t num_parts, int32_t fixed_cost,
                         int32_t fuse_max_splits, int32_t align_slack_pct) {
  auto qd = q.dimensions(), kd = kv.dimensions(), td = block_table.dimensions(),
       sd = seqlens.dimensions(), od = out->dimensions(), ld = lse->dimensions();
  JAX_DS_CHECK_ARG(qd.size() == 4 && kd.size() == 4 && td.size() == 2 && sd.size() == 1 &&
                       od.size() == 4 && ld.size() == 3,
                   "mla_decode: q [B,Sq,Hq,576], kv_cache [N,64,1,576], block_table [B,M], "
                   "cache_seqlens [B], out [B,Sq,Hq,512], lse [B,Hq,Sq]");
  JAX_DS_CHECK_ARG(q.element_type() == ffi::BF16 && kv.element_type() == ffi::BF16 &&
                       out->element_type() == ffi::BF16,
                   "mla_decode: q, kv_cache and out must be bfloat16");
  const int64_t B = qd[0], Sq = qd[1], Hq = qd[2], NB = kd[0], MB = td[1];
  JAX_DS_CHECK_ARG(qd[3] == kDqk && kd[1] == kPage && kd[2] == 1 && kd[3] == kDqk,
                   "mla_decode: need q [..., 576] and kv_cache [N, 64, 1, 576]");
  JAX_DS_CHECK_ARG(Hq >= 16 && Hq <= 128 && Sq >= 1, "mla_decode: the kernel takes Hq in [16, 128]");
  JAX_DS_CHECK_ARG(td[0] == B && sd[0] == B, "mla_decode: block_table and cache_seqlens need B rows");
  JAX_DS_CHECK_ARG(od[0] == B && od[1] == Sq && od[2] == Hq && od[3] == kDv && ld[0] == B &&
                       ld[1] == Hq && ld[2] == Sq,
                   "mla_decode: out must be [B,Sq,Hq,512] and lse [B,Hq,Sq]");
  JAX_DS_CHECK_ARG(NB >= 1, "mla_decode: kv_cache needs at least one block");
  JAX_DS_CHECK_ARG(num_parts >= 1, "mla_decode: num_parts must be >= 1");
  JAX_DS_CHECK_ARG(fixed_cost >= 1 && fixed_cost <= kMaxFixedCost,
                   "mla_decode: fixed_cost must be in [1, 64]");
  JAX_DS_CHECK_ARG(fuse_max_splits >= 0, "mla_decode: fuse_max_splits must be >= 0");
  JAX_DS_CHECK_ARG(align_slack_pct >= 0 && align_slack_pct <= 100,
                   "mla_decode: align_slack_pct must be in [0, 100]");
  JAX_DS_CHECK_ARG(softmax_scale > 0.f && std::isfinite(softmax_scale),
                   "mla_decode: softmax_scale must be positive and finite");
  const int64_t rows = Sq * Hq;
  JAX_DS_CHECK_ARG(B * rows < (int64_t(1) << 31) && NB * kPage < (int64_t(1) << 31) &&
                       B * (MB + fixed_cost) < (int64_t(1) << 31) &&
                       MB * kPage < (int64_t(1) << 31),
                   "mla_decode: sizes must fit in int32");
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  JAX_DS_CHECK_ARG(plan->element_count() >= 2 * B &&
                       o_acc->element_count() >= 2 * num_parts * rows * kDv &&
                       lse_acc->element_count() >= 2 * 2 * num_parts * rows &&
                       counters->element_count() >= 2 * B * tiles,
                   "mla_decode: workspace buffers are too small for num_parts");
  if (B == 0) return ffi::Error::Success();

  Params p{};
  p.block_table = block_table.typed_data();
  p.seqlens = seqlens.typed_data();
  p.out = reinterpret_cast<__nv_bfloat16*>(out->untyped_data());
  p.lse = lse->typed_data();
  p.o_acc = o_acc->typed_data();
  p.lse_acc = lse_acc->typed_data();
  p.plan = plan->typed_data();
  p.counters = counters->typed_data();
  p.tiles = static_cast<int>(tiles);
  // At most kMaxFusedSplits pieces are merged in the decode kernel (a bound under 2 merges
  // nothing there: the unfused instance, no counters); a batch has at most num_parts pieces, so
  // with num_parts <= fuse_max (or a single part: nothing is split) the combine kernel has no
  // work and is not launched.
  p.fuse_max = std::min({fuse_max_splits, kMaxFusedSplits, num_parts});
  if (p.fuse_max < 2) p.fuse_max = 0;
  const bool combine_needed = num_parts > std::max(p.fuse_max, 1);
  p.batch = static_cast<int>(B);
  p.sq = static_cast<int>(Sq);
  p.hq = static_cast<int>(Hq);
  p.rows = static_cast<int>(rows);
  p.max_blocks = static_cast<int>(MB);
  p.num_blocks = static_cast<int>(NB);
  p.num_parts = num_parts;
  p.fixed_cost = fixed_cost;
  p.align_slack_pct = align_slack_pct;
  p.causal = causal ? 1 : 0;
  // A batch's rows only, when they are fewer than a tile (h16: 16 of 64 rows); 8-row granules.
  p.q_box_rows = rows < kTileRows ? static_cast<int>((rows + 7) / 8 * 8) : kTileRows;
  p.scale = softmax_scale;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;

  CUtensorMap q_map, kv_map;
  if (auto err = EncodeTileMap(&q_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, q.untyped_data(),
                               B * rows, kDqk, p.q_box_rows, 64);
      err.failure())
    return err;
  if (auto err = EncodeTileMap(&kv_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, kv.untyped_data(),
                               NB * kPage, kDqk, kPage, 64);
      err.failure())
    return err;
  static KernelDeviceState decode_state[2][64];  // the shared-memory opt-in, once per device
  int unused_clusters = 0;
  const dim3 grid(static_cast<unsigned>(tiles), num_parts);
  if (p.fuse_max > 0) {
    JAX_DS_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(p.counters, 0, 2 * B * tiles * sizeof(int32_t), stream));
    if (auto err = PrepareKernel(DecodeKernel<true>, decode_state[1], kThreads, 1, 1,
                                 &unused_clusters);
        err.failure())
      return err;
    DecodeKernel<true><<<grid, kThreads, Smem::kAlloc, stream>>>(q_map, kv_map, p);
  } else {
    if (auto err = PrepareKernel(DecodeKernel<false>, decode_state[0], kThreads, 1, 1,
                                 &unused_clusters);
        err.failure())
      return err;
    DecodeKernel<false><<<grid, kThreads, Smem::kAlloc, stream>>>(q_map, kv_map, p);
  }
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (!combine_needed) return ffi::Error::Success();  // every split batch merged (or none)
  // The combine kernel is a programmatic dependent of the decode kernel (it waits for it with
  // griddepcontrol.wait before reading its results): its launch and prologue overlap it.
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t combine = DependentLaunch(
      dim3(static_cast<unsigned>(B), static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream,
      &attr);
  JAX_DS_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&combine, CombineKernel, p));
  return ffi::Error::Success();
}

}  // namespace

#ifdef JAX_DS_MLA_TRACE
// The trace's size in bytes; reset (decode slots 0, the combine kernel's minima all ones); read.
size_t TraceBytes() { return sizeof(g_trace); }
cudaError_t TraceReset() {
  static unsigned long long host[kTraceCtas * kTraceSlots + 4];
  std::fill(host, host + kTraceCtas * kTraceSlots, 0ull);
  host[kTraceCtas * kTraceSlots + 0] = host[kTraceCtas * kTraceSlots + 1] = ~0ull;
  host[kTraceCtas * kTraceSlots + 2] = host[kTraceCtas * kTraceSlots + 3] = 0ull;
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return e;
  return cudaMemcpyToSymbol(g_trace, host, sizeof(g_trace));
}
cudaError_t TraceRead(void* host) {
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return e;
  return cudaMemcpyFromSymbol(host, g_trace, sizeof(g_trace));
}
#endif
}  // namespace jax_ds::mla

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxDsMlaDecode, jax_ds::mla::MlaDecodeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()                      // q
                                  .Arg<xla::ffi::AnyBuffer>()                      // kv_cache
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()          // block_table
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()          // cache_seqlens
                                  .Ret<xla::ffi::AnyBuffer>()                      // out
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()          // lse
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()          // plan
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()          // o partials
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()          // lse partials
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()          // counters
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<int32_t>("num_parts")
                                  .Attr<int32_t>("fixed_cost")
                                  .Attr<int32_t>("fuse_max_splits")
                                  .Attr<int32_t>("align_slack_pct"),
                              {xla::ffi::Traits::kCmdBufferCompatible});
