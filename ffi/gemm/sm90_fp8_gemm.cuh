// sm90_fp8_gemm: D[M,N] = (A[M,K] * sa[M,K/128]) @ (B[N,K] * sb[N/128,K/128])^T on Hopper.
//
// DeepSeek-V3's FP8 recipe: A is scaled per 1x128 token group, B per 128x128 block, and each
// 128-wide K slice is accumulated by the tensor cores (WGMMA, FP8 in, FP32 out) and then
// "promoted": scaled by sa*sb and added to a second FP32 accumulator on the CUDA cores, so
// the tensor cores' limited-precision accumulation never spans more than 128 products.
//
// Structure (one CTA per SM, persistent; optionally clusters of 2 CTAs):
//   warpgroup 0       producer: one thread issues TMA loads of A and B tiles into a ring of
//                     shared-memory stages (full/empty mbarriers), running ahead across tiles;
//   warpgroups 1..W   consumers: each owns 64 rows of the BM x BN tile, issues 4 WGMMAs of
//                     m64nBNk32 per stage, releases the stage, promotes, and at the end of a
//                     tile writes bf16/f32 (TMA store, or guarded register stores for tails).
// With kClusterN = 2 the two CTAs of a cluster compute horizontally adjacent tiles that share
// their A rows: each CTA loads half of the A tile and multicasts it to both, so A crosses L2
// once per pair (large shapes are bound by L2 -> SM traffic, small-M shapes re-read A per tile).
// A stage is refilled only after the consumers of *both* CTAs released it.
// BN divides 128, so a tile sees a single B scale per K block; or BN = 192, whose tiles span
// two scale blocks (the column where the second starts is the tile's `boundary`).
// BM is 64, 128 or 192 (one to three consumer warpgroups); 192-row tiles (dense, BN = 128) have
// 152 registers a consumer and so one accumulator set, as 128x192 has.
//
// Split-K of the tail (dense scheduler): the last work units, which would leave most SMs idle
// for a whole K loop in the last wave, are computed as K slices on different SMs; each slice
// stores its promoted sums to a workspace and counts itself in, and the last one adds all
// slices in slice order (deterministic) and stores the tile.
//
// Which tiles a CTA computes is the scheduler's business (template parameter `Sched`): the dense
// GEMM walks one [M, N] grid, the grouped GEMMs walk per-group row ranges over shared tensors.
// A scheduler maps a work unit (kClusterN tiles side by side in N) and a cluster rank to a
// TileCoord; every CTA of a cluster must see the same sequence of units.
//
// kBf16: the same kernel over bf16 operands (the bf16 grouped GEMM of the MoE experts): a stage
// holds 64 bf16 of K per row (the same 128 bytes), WGMMA m64nBNk16 bf16 (the same 32 bytes of K
// per instruction), no scales and no promotion: a tile's sum runs on in one accumulator set
// across its k blocks (bf16 products are exact, the tensor cores add them in float32).
// kBTrans (bf16 only): B is read MN-major, b[g] as [K, N] (the dgrad of out = a @ b[g]^T reads
// b[g] itself): a stage's B tile is BN/64 chunks of [64 k rows x 64 n columns] loaded through a
// 3-D tensor map over [G, K, N] (so a k block never reads into the next group's rows).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "common/fastdiv.h"
#include "common/sm90.cuh"
#include "common/wgmma_bf16.cuh"
#include "common/wgmma_fp8.cuh"

namespace jax_ds::gemm {

constexpr int kBlockK = 128;  // one scale block of K per pipeline stage (128 B per FP8 row)
constexpr int kBlockKBf16 = 64;  // bf16 operands: the same 128 bytes of a row per stage

struct TileCoord {
  int a_row;    // first row of A (and of the output) of the tile
  int row_end;  // rows >= row_end are not stored (end of the tile's group / of the tensor)
  int n_block;  // column block of the output (BN wide)
  int b_row;    // first row of B of the tile (a group's B sits at group * N)
  int sb_row;   // row of b_scale ([*, K/128]) holding this tile's 128-row block of B
  bool zero;    // no product: the tile's rows [a_row, row_end) are written as zeros
  // K slicing (dense scheduler, tail units only): this unit computes k blocks [kb_begin,
  // kb_end) (kb_end clamped to K/128) of its tile. The promoted sums of a slice go to a
  // workspace; the slice that finishes last adds all slices in slice order and stores the tile.
  // (The split and slice of a unit come from the scheduler's split_of, after the K loop.)
  int kb_begin = 0;
  int kb_end = 1 << 30;
};

// A tile as lane 0 of the warp computed it, read by every lane through shuffles, so the compiler
// knows it is warp-uniform: a scheduler whose tiles depend on data (group sizes in shared
// memory) otherwise leaves the K loop's trip count, and with it the stage ring's index and every
// WGMMA descriptor, in per-thread registers. Only where all 32 lanes run (consumer warps).
__device__ __forceinline__ TileCoord warp_uniform(const TileCoord& t) {
  constexpr unsigned kAll = 0xffffffffu;
  TileCoord u;
  u.a_row = __shfl_sync(kAll, t.a_row, 0);
  u.row_end = __shfl_sync(kAll, t.row_end, 0);
  u.n_block = __shfl_sync(kAll, t.n_block, 0);
  u.b_row = __shfl_sync(kAll, t.b_row, 0);
  u.sb_row = __shfl_sync(kAll, t.sb_row, 0);
  u.zero = __shfl_sync(kAll, static_cast<int>(t.zero), 0) != 0;
  u.kb_begin = __shfl_sync(kAll, t.kb_begin, 0);
  u.kb_end = __shfl_sync(kAll, t.kb_end, 0);
  return u;
}

// Where the K slices of split tiles meet (dense GEMM; all null / 0 without splits): f32
// partials [split units][splits][kClusterN][consumers][regs][128 threads], then one int
// counter per (split unit, cluster rank, consumer), zeroed before the launch.
struct SplitWorkspace {
  float* partials = nullptr;
  int* counters = nullptr;
};

// Work-unit order shared by the schedulers: bands of kBandM row tiles walked column by column,
// so the CTAs running at once share A rows and B columns in L2.
// `band` divides by kBandM * the column units, fixed per launch (FastDiv: a multiply-high, not a
// ~20-instruction division per tile: the tile's coordinates were 5% of the consumers' samples
// at k = 512, NOTES-gemm); every band but a short last one has kBandM rows, a constant divisor.
constexpr int kBandM = 8;
__device__ __forceinline__ void banded_order(int unit, int num_m_tiles, const FastDiv& band,
                                             int& m_tile, int& n_unit) {
  const uint32_t u = static_cast<uint32_t>(unit);
  const uint32_t band_index = band.div(u);
  const int first_m = static_cast<int>(band_index) * kBandM;
  const uint32_t in_band = band.mod(u, band_index);
  const int rows = min(num_m_tiles - first_m, kBandM);
  if (rows == kBandM) {
    m_tile = first_m + static_cast<int>(in_band % kBandM);
    n_unit = static_cast<int>(in_band / kBandM);
  } else {
    m_tile = first_m + static_cast<int>(in_band % static_cast<uint32_t>(rows));
    n_unit = static_cast<int>(in_band / static_cast<uint32_t>(rows));
  }
}

// Dense problem: one [M, N] grid of tiles. The last `split_units` units of the walk (the
// partial last wave) may each be cut into `splits` K slices, consecutive in the walk, so they
// run on different SMs at once instead of leaving most SMs idle for a whole tile's K loop.
// A tile of BN columns has one accumulator set when three (two WGMMA sets and the promoted sums)
// would pass 192 registers a thread: 128x192 (and 192x128, by its registers: kTileAccSets). Their
// k blocks are issued, waited and promoted one at a time, and only they have the epilogue overlap
// (kOverlap below; the handler's dispatch, kOneAccSetTile).
template <int BN>
inline constexpr bool kOneAccSet = 3 * WgmmaFp8<BN>::kRegs > 192;

// Accumulator sets of the narrow tiles (BN <= 64: 8-32 registers a set): kSmallTileAccSets - 1
// k blocks in flight while the block before is promoted. Measured on the H100 (NOTES-gemm,
// twenty-fourth session; kernel times, four input sets): 4 sets against 2 gained 4-10% on every
// m <= 128 shape whose pick is 64 wide or narrower (64x2112x7168 171 -> 185 TFLOP/s), 3 sets
// nothing, 6 sets -3..+5% against 4 at BN <= 32 but spills at BN = 64. Rebuild with
// -DJAX_DS_GEMM_SMALL_ACC_SETS=S (2..6) to compare.
#ifndef JAX_DS_GEMM_SMALL_ACC_SETS
#define JAX_DS_GEMM_SMALL_ACC_SETS 4
#endif
inline constexpr int kSmallTileAccSets = JAX_DS_GEMM_SMALL_ACC_SETS;
static_assert(kSmallTileAccSets >= 2 && kSmallTileAccSets <= 6, "2 to 6 sets");
// 192-row tiles run three consumer warpgroups (512 threads): at 65536 registers a CTA, a consumer
// gets 152 (the producer 40), room for one accumulator set and the promoted sums of BN <= 128
// (64 + 64). Its k blocks are issued, waited and promoted one at a time, as 128x192's are; the
// other two warpgroups' WGMMAs keep the tensor cores busy meanwhile.
template <int BM, int BN>
inline constexpr int kTileAccSets =
    BM > 128 || kOneAccSet<BN> ? 1 : BN <= 64 ? kSmallTileAccSets : 2;
template <int BM, int BN>
inline constexpr bool kOneAccSetTile = kTileAccSets<BM, BN> == 1;

// kOverlap_: kernels of one accumulator set (128x192, 192x128) store a tile while the next
// tile's first k block runs (attribute `overlap`; a separate instance: a runtime switch made
// ptxas spill in the epilogue and cost both variants 8-12% on the H200).
template <int BM, int BN, int kClusterN, bool kOverlap_ = false>
struct DenseScheduler {
  static constexpr bool kSplits = true;
  // Shared-memory pointers typed as such (LDS / STS; see sm90::align_smem_1024). Measured on the
  // H200 (NOTES-gemm, eleventh session): dense +3-5% on 4 of 7 shapes, the rest unchanged; the
  // grouped kernels -4% (contiguous), so they keep the generic pointers (kSharedSpace false).
  static constexpr bool kSharedSpace = true;
  static constexpr bool kOverlap = kOverlap_;
  static constexpr bool kUniformTiles = true;  // a tile is arithmetic on uniform values
  int M, N, num_m_blocks, num_n_units;
  int k_blocks = 1, split_units = 0, splits = 1;
  SplitWorkspace ws;
  FastDiv band;  // kBandM * num_n_units (banded_order)

  // smem [2] after the barriers: per consumer, "this slice finished its split tile last"
  static constexpr int extra_smem_bytes() { return 16; }
  // split_units in [0, units], splits in [1, k_blocks] (the handler checks; it also sets `ws`
  // when the split cuts something: split_units > 0 here).
  __host__ __device__ static DenseScheduler make(int M, int N, int k_blocks = 1,
                                                 int split_units = 0, int splits = 1) {
    const int n_blocks = (N + BN - 1) / BN;
    const bool split = split_units > 0 && splits > 1;
    DenseScheduler s{M, N, (M + BM - 1) / BM, (n_blocks + kClusterN - 1) / kClusterN, k_blocks,
                     split ? split_units : 0, split ? splits : 1};
    s.band = FastDiv::make(static_cast<uint32_t>(kBandM * s.num_n_units));
    return s;
  }
  __device__ __forceinline__ void init(int*) {}
  __host__ __device__ int num_tile_units() const { return num_m_blocks * num_n_units; }
  __host__ __device__ int num_units() const {
    return num_tile_units() + split_units * (splits - 1);
  }
  // Whether `unit` is a K slice; if so, of which split unit and which slice of it.
  __device__ __forceinline__ bool split_of(int unit, int& split, int& slice) const {
    const int whole = num_tile_units() - split_units;  // units computed whole come first
    if (unit < whole) return false;
    split = (unit - whole) / splits;
    slice = (unit - whole) % splits;
    return true;
  }
  __device__ __forceinline__ TileCoord tile(int unit, int rank) const {
    int split = -1, slice = 0;
    const bool sliced = split_of(unit, split, slice);
    if (sliced) unit = num_tile_units() - split_units + split;
    int m_block, n_unit;
    banded_order(unit, num_m_blocks, band, m_block, n_unit);
    // The second tile of a pair may lie past N (odd block count): its B box reads as zeros
    // and its stores are clipped; its b_scale row is clamped to stay in bounds.
    const int n_block = n_unit * kClusterN + static_cast<int>(rank);
    TileCoord c{m_block * BM, M, n_block, n_block * BN, min(n_block * BN, N - 1) / 128, false};
    if (sliced) {
      c.kb_begin = slice * k_blocks / splits;
      c.kb_end = (slice + 1) * k_blocks / splits;
    }
    return c;
  }
};

// Grouped problems over shared tensors: A [M, K] rows, B [G * N, K], out [M, N].
//   contiguous (mmax == 0): group g owns rows [end[g-1], end[g]), end = min(cumsum(max(size,
//     0)), M); rows [end[G-1], M) are a zero segment;
//   masked (mmax > 0): group g owns rows [g*mmax, g*mmax + clamp(size[g], 0, mmax)), the rest of
//     its mmax rows are a zero segment.
// The row segments (2G masked, G+1 contiguous) are cut into BM-row tiles from their own first
// row (no alignment needed), so a tile never mixes groups. Every CTA derives the segment table
// from `sizes` in shared memory at start (warp scans), then finds a unit's segment by binary
// search. Data-dependent sizes can only move rows inside [0, M): nothing is read or written out
// of bounds whatever `sizes` holds.
// kShared: shared-memory pointers typed as shared (see DenseScheduler). The contiguous kernels
// lost 3-5% with it on the H200; the masked 128x128 / 128x192 ones are built both ways
// (grouped_fp8_gemm.cu) to measure them apart.
template <int BM, int BN, int kClusterN, bool kShared = false>
struct GroupedScheduler {
  static constexpr bool kSplits = false;
  static constexpr bool kSharedSpace = kShared;
  static constexpr bool kOverlap = false;  // (zero tiles make the first issue data-dependent)
  static constexpr bool kUniformTiles = false;  // tiles depend on the sizes in shared memory
  static constexpr int kMaxGroups = 1024;
  const int* sizes;  // device [G]
  int G, M, N, mmax, num_n_units;
  int* bound = nullptr;        // smem [G]: contiguous end rows / masked valid rows
  int* tile_prefix = nullptr;  // smem [S + 1]: first m tile of each segment
  FastDiv band;                // kBandM * num_n_units (banded_order)

  __host__ __device__ int num_segments() const { return mmax > 0 ? 2 * G : G + 1; }
  __host__ static int extra_smem_bytes(int G, bool masked) {
    return 4 * (G + (masked ? 2 * G : G + 1) + 1);
  }
  __host__ static GroupedScheduler make(const int* sizes, int G, int M, int N, int mmax) {
    const int n_blocks = (N + BN - 1) / BN;
    GroupedScheduler s{sizes, G, M, N, mmax, (n_blocks + kClusterN - 1) / kClusterN};
    s.band = FastDiv::make(static_cast<uint32_t>(kBandM * s.num_n_units));
    return s;
  }

  __device__ __forceinline__ void segment(int s, int& start, int& end, int& group,
                                          bool& zero) const {
    if (mmax > 0) {
      group = s / 2;
      zero = s % 2;
      const int base = group * mmax, valid = base + bound[group];
      start = zero ? valid : base;
      end = zero ? base + mmax : valid;
    } else {
      group = min(s, G - 1);
      zero = s == G;
      start = s == 0 ? 0 : bound[s - 1];
      end = zero ? M : bound[s];
    }
  }

  // Warp 0 of every CTA builds the tables in `smem` (the caller synchronises afterwards).
  __device__ void init(int* smem) {
    bound = smem;
    tile_prefix = smem + G;
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    long long carry = 0;
    for (int base = 0; base < G; base += 32) {
      const int g = base + lane;
      const long long v = g < G ? max(__ldg(sizes + g), 0) : 0;
      if (mmax > 0) {
        if (g < G) bound[g] = static_cast<int>(min(v, static_cast<long long>(mmax)));
      } else {
        long long sum = v;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
          const long long o = __shfl_up_sync(0xffffffffu, sum, d);
          if (lane >= d) sum += o;
        }
        if (g < G) bound[g] = static_cast<int>(min(carry + sum, static_cast<long long>(M)));
        carry += __shfl_sync(0xffffffffu, sum, 31);
      }
    }
    __syncwarp();
    const int S = num_segments();
    int tiles_before = 0;
    if (lane == 0) tile_prefix[0] = 0;
    for (int base = 0; base < S; base += 32) {
      const int s = base + lane;
      int count = 0;
      if (s < S) {
        int start, end, group;
        bool zero;
        segment(s, start, end, group, zero);
        count = (end - start + BM - 1) / BM;
      }
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int o = __shfl_up_sync(0xffffffffu, count, d);
        if (lane >= d) count += o;
      }
      if (s < S) tile_prefix[s + 1] = tiles_before + count;
      tiles_before += __shfl_sync(0xffffffffu, count, 31);
    }
  }

  __device__ __forceinline__ int num_units() const {
    return tile_prefix[num_segments()] * num_n_units;
  }
  __device__ __forceinline__ TileCoord tile(int unit, int rank) const {
    int m_tile, n_unit;
    banded_order(unit, tile_prefix[num_segments()], band, m_tile, n_unit);
    int lo = 0, hi = num_segments() - 1;  // the segment s with prefix[s] <= m_tile < prefix[s+1]
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tile_prefix[mid] <= m_tile) lo = mid; else hi = mid - 1;
    }
    int start, end, group;
    bool zero;
    segment(lo, start, end, group, zero);
    const int n_block = n_unit * kClusterN + static_cast<int>(rank);
    const int sb_rows = (N + 127) / 128;
    return {start + (m_tile - tile_prefix[lo]) * BM, end, n_block, group * N + n_block * BN,
            group * sb_rows + min(n_block * BN, N - 1) / 128, zero};
  }
};

template <int BM, int BN, typename OutT, bool kBf16 = false>
struct GemmSmem {
  static constexpr int kConsumers = BM / 64;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  // setmaxnreg: the producer warpgroup drops to kProducerRegs, the consumers take what is left
  // of the registers the CTA was launched with (a multiple of 8), at most 232. That pool is the
  // launch's count a thread times the threads, not 65536: a consumer count past it would wait in
  // `setmaxnreg.inc` forever (a 48-register producer with 232-register consumers hung on the
  // H100, NOTES-gemm). kLaunchRegs is the most the launch bound allows (65536 / threads down to
  // a multiple of 8, at most 248), what ptxas gives these kernels at 384 and 512 threads (168,
  // 128: "Used N registers"); at 256 threads it gives 232, and one consumer needs no more.
  static constexpr int kProducerRegs = 40;
  static constexpr int kLaunchRegs =
      65536 / kThreads / 8 * 8 < 255 ? 65536 / kThreads / 8 * 8 : 248;
  static constexpr int kConsumerRegsLeft =
      (kLaunchRegs * kThreads - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerRegsLeft < 232 ? kConsumerRegsLeft : 232;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= kLaunchRegs * kThreads,
                "setmaxnreg: the roles' registers must fit the launch's pool");
  // A stage: the A and B tiles and, for FP8, the k block's scales (BM of A's, then B's one or
  // two, padded to 16 bytes), copied in by the producer warpgroup's second warp.
  static constexpr int kScaleFloats = kBf16 ? 0 : BM + 4;
  static constexpr int kStageBytes = (BM + BN) * kBlockK + kScaleFloats * 4;
  // Output staging for the TMA store: the tile in 128-byte-wide column boxes, 128-byte swizzled
  // (see stage_tile). Tiles narrower than one box store straight from registers instead.
  static constexpr int kBoxCols = 128 / sizeof(OutT);
  static constexpr bool kTmaStore = BN % kBoxCols == 0;
  static constexpr int kOutBytes = kTmaStore ? BM * BN * sizeof(OutT) : 0;
  // Dynamic shared memory for `stages` stages: 1 KB alignment slack (128-byte swizzle atoms
  // must be 1024-byte aligned) + output tile + tiles + two mbarriers per stage.
  static constexpr int bytes(int stages, int extra = 0) {
    return 1024 + kOutBytes + stages * (kStageBytes + 16) + extra;
  }
};

template <typename T>
__device__ __forceinline__ void store_pair(T* out, int row, int col, int M, int N, float v0,
                                           float v1, bool even_n);

template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* out, int row, int col,
                                                          int M, int N, float v0, float v1,
                                                          bool even_n) {
  if (row >= M || col >= N) return;
  __nv_bfloat16* p = out + static_cast<int64_t>(row) * N + col;
  if (even_n) {  // col is even, so the pair is 4-byte aligned and col+1 < N
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
  } else {
    p[0] = __float2bfloat16_rn(v0);
    if (col + 1 < N) p[1] = __float2bfloat16_rn(v1);
  }
}

template <>
__device__ __forceinline__ void store_pair<float>(float* out, int row, int col, int M, int N,
                                                  float v0, float v1, bool even_n) {
  if (row >= M || col >= N) return;
  float* p = out + static_cast<int64_t>(row) * N + col;
  if (even_n) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  } else {
    p[0] = v0;
    if (col + 1 < N) p[1] = v1;
  }
}

// Writes one consumer's 64 x BN slice of the finished tile into the swizzled staging buffer:
// column box b holds columns [b*kBoxCols, (b+1)*kBoxCols) of 64 rows, 128 bytes per row, with
// 16-byte chunk c of row r stored at chunk c ^ (r % 8) (TMA's 128-byte swizzle). A warp's
// stores of one accumulator column group then hit 8 different chunks: no bank conflicts.
template <int BN, typename OutT, int kRegs>
__device__ __forceinline__ void stage_tile(uint8_t* slice, const float* total, int warp, int lane) {
  constexpr int kBoxCols = 128 / sizeof(OutT);
  const int r0 = warp * 16 + lane / 4;
#pragma unroll
  for (int j = 0; j < kRegs / 4; ++j) {
    const int col = 8 * j + (lane % 4) * 2;
    const int box = col / kBoxCols;
    const int byte = (col % kBoxCols) * sizeof(OutT);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r0 + 8 * half;
      uint8_t* p = slice + box * 64 * 128 + r * 128 + (((byte / 16) ^ (r % 8)) * 16) + byte % 16;
      const float v0 = total[4 * j + 2 * half], v1 = total[4 * j + 2 * half + 1];
      if constexpr (sizeof(OutT) == 2) {
        *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
      } else {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
      }
    }
  }
}

// One k block for a consumer: wait for the stage, call ready() (FP8: reads the block's scales
// from the stage), issue its 4 WGMMAs into `acc`, commit. The first WGMMA overwrites `acc`
// unless `carry` (bf16: the tile's sum runs on in the accumulator).
template <int BN, bool kBf16, bool kBTrans, typename Ready>
__device__ __forceinline__ void issue_k_block(float* acc, uint64_t* full_bar, uint32_t parity,
                                              const uint8_t* tile_a, const uint8_t* tile_b,
                                              bool carry, Ready&& ready) {
  using Mma = std::conditional_t<kBTrans, WgmmaBf16TransB<BN>,
                                 std::conditional_t<kBf16, WgmmaBf16<BN>, WgmmaFp8<BN>>>;
  // kBTrans: B's 64-column chunks are 64 rows x 128 B apart; a k16 step is 16 rows (2048 B)
  constexpr uint32_t kBStep = kBTrans ? 2048 >> 4 : 2;
  sm90::mbar_wait(full_bar, parity);
  ready();
  const uint32_t desc_a = sm90::sw128_kmajor_desc_lo(tile_a);
  const uint32_t desc_b = kBTrans ? sm90::sw128_mnmajor_desc_lo(tile_b, 64 * 128)
                                  : sm90::sw128_kmajor_desc_lo(tile_b);
#pragma unroll
  for (int i = 0; i < Mma::kRegs; ++i) sm90::fence_operand(acc[i]);
  sm90::wgmma_fence();
#pragma unroll
  for (int k = 0; k < kBlockK / 32; ++k) {
    // 32 FP8 (or 16 bf16) = 32 bytes of K per WGMMA: advance the start address by 2 x 16 bytes.
    Mma::mma(acc, sm90::sw128_kmajor_desc_from_lo(desc_a + 2 * k),
             sm90::sw128_kmajor_desc_from_lo(desc_b + kBStep * k), k > 0 || carry ? 1u : 0u);
  }
  sm90::wgmma_commit();
}

// f(std::integral_constant<int, v>{}) for the runtime value v in [0, N): a compile-time body per
// value (the GEMM's last round of k blocks).
template <int N, int I = 0, typename F>
__device__ __forceinline__ void dispatch_below(int v, F& f) {
  if constexpr (I + 1 < N) {
    if (v == I) {
      f(std::integral_constant<int, I>{});
    } else {
      dispatch_below<N, I + 1>(v, f);
    }
  } else {
    f(std::integral_constant<int, I>{});
  }
}

template <int BM, int BN, int kClusterN, typename OutT, typename Sched, bool kBf16 = false,
          bool kBTrans = false>
__global__ void __launch_bounds__(GemmSmem<BM, BN, OutT, kBf16>::kThreads, 1)
    sm90_fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a,    // A [M, K] e4m3 / bf16
                         const __grid_constant__ CUtensorMap tmap_b,    // B [rows, K] (kBTrans:
                                                                        // [G, K, N] bf16, 3-D)
                         const __grid_constant__ CUtensorMap tmap_out,  // out [M, N] (if TMA)
                         const float* __restrict__ a_scale,             // [M, K/128] (FP8)
                         const float* __restrict__ b_scale,             // [sb rows, K/128] (FP8)
                         OutT* __restrict__ out,                        // [M, N]
                         const Sched sched_in, int M, int N, int K, int num_stages,
                         int out_bytes) {
  static_assert(BM == 64 || BM == 128 || BM == 192, "BM is 64 rows per consumer warpgroup");
  static_assert(BM <= 128 || (BN <= 128 && !kBf16),
                "192-row tiles: FP8, BN <= 128 (one set and the sums in 152 registers)");
  static_assert((128 % BN == 0 && BN >= 16) || BN == 192,
                "BN divides the 128-wide B scale block, or is 192 (two scale blocks per tile)");
  static_assert(kClusterN == 1 || kClusterN == 2, "clusters of 1 or 2 CTAs along N");
  static_assert(!kBf16 || !Sched::kSplits, "bf16: no split-K workspace (grouped schedulers)");
  static_assert(!kBTrans || (kBf16 && BN % 64 == 0), "kBTrans: bf16, whole 64-column chunks");
  using Smem = GemmSmem<BM, BN, OutT, kBf16>;
  constexpr int kKElems = kBf16 ? kBlockKBf16 : kBlockK;  // K elements per stage
  constexpr int kAccRegs = WgmmaFp8<BN>::kRegs;
  // BN = 192 spans two B scale blocks (columns past `boundary` take the second) and leaves no
  // registers for a second accumulator set: its k blocks are issued, waited and promoted one
  // at a time (the other consumer warpgroup's WGMMAs keep the tensor cores busy meanwhile).
  constexpr bool kTwoScales = 128 % BN != 0;
  // The tile's first column (a multiple of 64) that takes B's next scale row: the scale warp
  // copies that row as the second B scale (if the tile reaches it before N), the promotion
  // applies it from there on.
  auto scale_boundary = [](int n0) { return kTwoScales ? 128 - n0 % 128 : BN; };
  constexpr int kSets = kTileAccSets<BM, BN>;
  constexpr bool kDoubleAcc = kSets >= 2;  // (two or more sets)
  // With one set, a tile's epilogue may run under the next tile's first k block (dense GEMM,
  // Sched::kOverlap: its tiles are never zero tiles, so the first issue is unconditional;
  // ptxas serialises WGMMAs issued on a data-dependent path). Measured on the H200: +4-7% at
  // K >= 1536, -12% at K = 512 (not profiled; the staging writes contending with the WGMMAs'
  // shared-memory reads over a larger share of a short tile would explain it).
  constexpr bool kDefer = !kDoubleAcc && Sched::kOverlap;
  constexpr int kATileBytes = BM * kBlockK;
  constexpr int kBTileBytes = BN * kBlockK;
  constexpr int kASliceRows = BM / kClusterN;  // rows of A each CTA of a cluster loads

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = Sched::kSharedSpace ? sm90::align_smem_1024(smem_raw)
                                       : reinterpret_cast<uint8_t*>(
                                             (reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~uintptr_t(1023));
  uint8_t* out_tile = smem;
  uint8_t* tiles_a = out_tile + out_bytes;  // 0: no staging buffer, register stores
  uint8_t* tiles_b = tiles_a + num_stages * kATileBytes;
  constexpr int kScaleFloats = Smem::kScaleFloats;
  float* const scales = reinterpret_cast<float*>(tiles_b + num_stages * kBTileBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(scales + num_stages * kScaleFloats);
  uint64_t* empty = full + num_stages;
  Sched sched = sched_in;
  sched.init(reinterpret_cast<int*>(empty + num_stages));  // the scheduler's tables, if any
  // (dense: per consumer, whether its K slice was the split tile's last; in the same place)
  volatile int* const split_last = reinterpret_cast<int*>(empty + num_stages);

  // Read from lane 0, so the compiler knows it is the same in every lane of the warp: the
  // addresses, barriers and WGMMA descriptors derived from it then live in uniform registers
  // (UR), computed once per warp on the uniform datapath, instead of per thread in R registers
  // and moved over with R2UR before every WGMMA (cuobjdump -sass, NOTES-gemm).
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  // (bf16: K need not fill the last block; TMA reads the columns past K as zeros)
  const int k_blocks = kBf16 ? (K + kKElems - 1) / kKElems : K / kBlockK;
  // TMA stores (through the staging buffer) need 16-byte aligned output rows; the host passes
  // out_bytes = 0 for other N, and the tile goes out through guarded register stores.
  const bool tma_store = Smem::kTmaStore && out_bytes > 0;
  const uint32_t rank = kClusterN > 1 ? sm90::cluster_ctarank() : 0;
  const int cluster = blockIdx.x / kClusterN, num_clusters = gridDim.x / kClusterN;

  if (threadIdx.x == 0) {
    sm90::prefetch_tensormap(&tmap_a);
    sm90::prefetch_tensormap(&tmap_b);
    for (int s = 0; s < num_stages; ++s) {
      // the producer's expect_tx arrival (+ FP8: one per lane of the scale warp)
      sm90::mbar_init(&full[s], kBf16 ? 1 : 1 + 32);
      // one arrival per consumer warp of every CTA whose smem the stage's loads write into
      sm90::mbar_init(&empty[s], Smem::kConsumers * 4 * kClusterN);
    }
    sm90::fence_barrier_init();
  }
  // The peer CTA's barriers must be initialised before any multicast or remote arrival.
  if constexpr (kClusterN > 1) sm90::cluster_sync(); else __syncthreads();

  if (warpgroup == 0) {
    // ---------------- producer ----------------
    sm90::regs_dealloc<Smem::kProducerRegs>();
    if (threadIdx.x == 0) {  // the tiles, through TMA
      int stage = 0;
      uint32_t phase = 0;
      for (int u = cluster; u < sched.num_units(); u += num_clusters) {
        const TileCoord c = sched.tile(u, rank);
        if (c.zero) continue;  // nothing to load: the consumers write zeros
        const int kb_end = min(c.kb_end, k_blocks);
        // kBTrans: the tile's group, for the 3-D map of b (b_row = group * N + n_block * BN)
        const int b_group = kBTrans ? (c.b_row - c.n_block * BN) / N : 0;
        for (int kb = c.kb_begin; kb < kb_end; ++kb) {
          sm90::mbar_wait(&empty[stage], phase ^ 1);  // a fresh barrier passes parity 1
          sm90::mbar_arrive_expect_tx(&full[stage], kATileBytes + kBTileBytes);
          uint8_t* dst_a = tiles_a + stage * kATileBytes + rank * kASliceRows * kBlockK;
          const int a_row = c.a_row + static_cast<int>(rank) * kASliceRows;
          if constexpr (kClusterN > 1) {
            sm90::tma_load_2d_multicast(dst_a, &tmap_a, &full[stage], (1u << kClusterN) - 1,
                                        kb * kKElems, a_row);
          } else {
            sm90::tma_load_2d(dst_a, &tmap_a, &full[stage], kb * kKElems, a_row);
          }
          if constexpr (kBTrans) {  // B's rows [kb*64, +64) of the group, BN/64 column chunks
#pragma unroll
            for (int ch = 0; ch < BN / 64; ++ch) {
              sm90::tma_load_3d(tiles_b + stage * kBTileBytes + ch * 64 * 128, &tmap_b,
                                &full[stage], c.n_block * BN + 64 * ch, kb * kKElems, b_group);
            }
          } else {
            sm90::tma_load_2d(tiles_b + stage * kBTileBytes, &tmap_b, &full[stage],
                              kb * kKElems, c.b_row);
          }
          if (++stage == num_stages) stage = 0, phase ^= 1;
        }
      }
    } else if (!kBf16 && threadIdx.x / 32 == 1) {
      // FP8: the second warp copies each k block's scales into its stage (cp.async, 4 bytes a
      // lane), every lane arriving on the stage's full barrier once its copies land. Lane l
      // copies A's scales of the tile's rows l, l+32, ... (clamped to M - 1: rows past M read
      // as zero and are never stored), lane 0 B's scale row, lane 1 (BN = 192) the next one
      // if the tile reaches it before N (else the same). A loop of its own beside the TMA
      // thread's: in one loop the two roles' registers added up and ptxas spilled.
      const int lane = threadIdx.x % 32;
      int stage = 0;
      uint32_t phase = 0;
      for (int u = cluster; u < sched.num_units(); u += num_clusters) {
        const TileCoord c = sched.tile(u, rank);
        if (c.zero) continue;
        const int kb_end = min(c.kb_end, k_blocks);
        const int n0 = c.n_block * BN;
        const int sb_row = c.sb_row + (kTwoScales && lane == 1 && n0 + scale_boundary(n0) < N);
        for (int kb = c.kb_begin; kb < kb_end; ++kb) {
          sm90::mbar_wait(&empty[stage], phase ^ 1);
          float* dst = scales + stage * kScaleFloats;
#pragma unroll
          for (int i = 0; i < BM / 32; ++i) {
            const int row = min(c.a_row + lane + 32 * i, M - 1);
            sm90::cp_async_4(dst + lane + 32 * i,
                             a_scale + static_cast<int64_t>(row) * k_blocks + kb);
          }
          if (lane < (kTwoScales ? 2 : 1)) {
            sm90::cp_async_4(dst + BM + lane,
                             b_scale + static_cast<int64_t>(sb_row) * k_blocks + kb);
          }
          sm90::cp_async_mbar_arrive(&full[stage]);
          if (++stage == num_stages) stage = 0, phase ^= 1;
        }
      }
      sm90::cp_async_wait_all();  // no lane leaves with its copies in flight
    }
  } else {
    // ---------------- consumers ----------------
    sm90::regs_alloc<Smem::kConsumerRegs>();
    // Read again here rather than kept from the kernel's start: a value live into both roles
    // must fit the producer's 40 registers too, and ptxas spilled it (an LDL in the K loop of
    // the grouped 128x128 kernels).
    const int consumer = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0) - 1;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const bool leader = threadIdx.x % 128 == 0;
    const int row_in_tile = consumer * 64 + warp * 16 + lane / 4;  // and +8
    const int col_in_tile = (lane % 4) * 2;                         // and +8*j, +1
    const bool even_n = (N % 2) == 0;
    uint8_t* out_slice = out_tile + consumer * 64 * BN * sizeof(OutT);

    // kSets accumulator sets: the WGMMAs of k blocks kb .. kb+kSets-2 run while block kb-1 is
    // promoted. The scales of a block are read from its stage when its WGMMAs are issued, so
    // promotion never waits on them.
    float acc[kSets][kAccRegs];
    float scale_a0[kSets], scale_a1[kSets], scale_b[kSets], scale_b_hi[kSets];
    float total[kAccRegs];
    int stage = 0;
    uint32_t phase = 0;
    // Stores a finished tile from `total` (a K slice: its partial sums, and the tile if it is the
    // split's last slice).
    auto epilogue = [&](const TileCoord& t, int unit) {
      const int row0 = t.a_row + row_in_tile;
      const int row1 = row0 + 8;
      if constexpr (Sched::kSplits) {
        int split, slice;
        // A K slice leaves its partial sums; the split's last slice adds them all up.
        if (sched_in.split_of(unit, split, slice)) {
          const int tid = threadIdx.x % 128;
          constexpr int kSliceFloats = 64 * BN;  // one consumer's partial
          const int64_t stride = static_cast<int64_t>(kClusterN) * Smem::kConsumers * kSliceFloats;
          float* const first = sched_in.ws.partials +
                               static_cast<int64_t>(split) * sched_in.splits * stride +
                               (static_cast<int64_t>(rank) * Smem::kConsumers + consumer) *
                                   kSliceFloats;
          float* const mine = first + slice * stride;
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) __stcg(mine + i * 128 + tid, total[i]);
          __threadfence();  // this thread's partial is visible device-wide before the count
          sm90::named_barrier(1 + consumer, 128);
          if (leader) {
            int* counter = sched_in.ws.counters +
                           (split * kClusterN + static_cast<int>(rank)) * Smem::kConsumers +
                           consumer;
            split_last[consumer] = atomicAdd(counter, 1) == sched_in.splits - 1;
          }
          sm90::named_barrier(1 + consumer, 128);
          if (!split_last[consumer]) return;  // another slice stores the tile
          __threadfence();
          // Every slice's sums, in slice order (the same bits whichever slice finished last).
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) total[i] = __ldcg(first + i * 128 + tid);
          for (int sl = 1; sl < sched_in.splits; ++sl) {
#pragma unroll
            for (int i = 0; i < kAccRegs; ++i) {
              total[i] += __ldcg(first + sl * stride + i * 128 + tid);
            }
          }
        }
      }

      // A consumer's 64 rows go out through TMA when the tensor's edge clips them (dense) or they
      // all belong to the tile's group; otherwise through guarded register stores. A slice past
      // the tile's last row (192-row tiles at M's tail) stores nothing.
      const int slice_row = t.a_row + consumer * 64;
      if (slice_row >= t.row_end) return;
      if (tma_store && (t.row_end >= M || slice_row + 64 <= t.row_end)) {
        // The previous tile's store must have left the staging buffer before it is rewritten.
        if (leader) sm90::tma_store_wait_read();
        sm90::named_barrier(1 + consumer, 128);
        stage_tile<BN, OutT, kAccRegs>(out_slice, total, warp, lane);
        sm90::fence_proxy_async_smem();
        sm90::named_barrier(1 + consumer, 128);
        if (leader) {
#pragma unroll
          for (int box = 0; box < BN / Smem::kBoxCols; ++box) {
            sm90::tma_store_2d(&tmap_out, out_slice + box * 64 * 128,
                               t.n_block * BN + box * Smem::kBoxCols, slice_row);
          }
          sm90::tma_store_commit();
        }
      } else {
        const int col_base = t.n_block * BN + col_in_tile;
#pragma unroll
        for (int j = 0; j < kAccRegs / 4; ++j) {
          const int col = col_base + 8 * j;
          store_pair(out, row0, col, t.row_end, N, total[4 * j], total[4 * j + 1], even_n);
          store_pair(out, row1, col, t.row_end, N, total[4 * j + 2], total[4 * j + 3], even_n);
        }
      }
    };
    // kDefer: the previous tile's epilogue waits until the next tile's first k block is issued.
    TileCoord prev{};
    int prev_unit = 0;
    bool pending = false;
    // The unit count and every tile as warp-uniform values (warp_uniform): a grouped
    // scheduler reads them from shared memory. The dense one's are arithmetic on uniform values.
    const int num_units = Sched::kUniformTiles
                              ? sched.num_units()
                              : __shfl_sync(0xffffffffu, sched.num_units(), 0);
    for (int u = cluster; u < num_units; u += num_clusters) {
      const TileCoord c = Sched::kUniformTiles ? sched.tile(u, rank)
                                               : warp_uniform(sched.tile(u, rank));
      // kTwoScales: the tile's columns from `boundary` on (a multiple of 64) take the stage's
      // second B scale (the next scale row, or the same one if the tile ends before it).
      const int n0 = c.n_block * BN;
      const int boundary = scale_boundary(n0);
      if constexpr (!kDefer) {
#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) total[i] = 0.f;
      }

      auto issue = [&](int set, int /*kb: the stage holds it*/, bool carry = false) {
        // The block's scales come from its stage once the stage is full (shared memory, a few
        // cycles; read from global memory here, their latency showed in the K loop).
        auto read_scales = [&]() {
          if constexpr (!kBf16) {
            const float* ss = scales + stage * kScaleFloats;
            scale_a0[set] = ss[row_in_tile];
            scale_a1[set] = ss[row_in_tile + 8];
            scale_b[set] = ss[BM];
            if constexpr (kTwoScales) scale_b_hi[set] = ss[BM + 1];
          }
        };
        issue_k_block<BN, kBf16, kBTrans>(acc[set], &full[stage], phase,
                          tiles_a + stage * kATileBytes + consumer * 64 * kBlockK,
                          tiles_b + stage * kBTileBytes, carry, read_scales);
        if (++stage == num_stages) stage = 0, phase ^= 1;
      };
      int release_stage = stage;
      // Frees the oldest stage still held, in every CTA of the cluster.
      auto release = [&]() {
        __syncwarp();
        if (lane == 0) {
          if constexpr (kClusterN > 1) {
#pragma unroll
            for (int cta = 0; cta < kClusterN; ++cta) {
              sm90::mbar_arrive_cluster(&empty[release_stage], cta);
            }
          } else {
            sm90::mbar_arrive(&empty[release_stage]);
          }
        }
        if (++release_stage == num_stages) release_stage = 0;
      };
      // Called once the WGMMAs of a block (in set `set`) have completed: free its stage, promote.
      auto promote = [&](int set) {
        float* a = acc[set];
#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) sm90::fence_operand(a[i]);
        release();
        const float s0 = scale_a0[set] * scale_b[set];
        const float s1 = scale_a1[set] * scale_b[set];
        // Registers 4j, 4j+1 hold row0; 4j+2, 4j+3 hold row1, at columns 8j + (lane % 4) * 2.
        if constexpr (kTwoScales) {
          const float h0 = scale_a0[set] * scale_b_hi[set];
          const float h1 = scale_a1[set] * scale_b_hi[set];
          // BN = 192 (the only two-scale tile), boundary 64 or 128: columns 0-63 take the first
          // row's scale, 128-191 the second's, and only 64-127 depend on the tile (one select
          // per k block, not per value).
          const float m0 = boundary > 64 ? s0 : h0;
          const float m1 = boundary > 64 ? s1 : h1;
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) {
            const int third = i / 32;  // 4 registers per 8 columns: 32 per 64 columns
            const bool row1 = (i % 4) >= 2;
            const float sc = third == 0 ? (row1 ? s1 : s0)
                             : third == 1 ? (row1 ? m1 : m0) : (row1 ? h1 : h0);
            total[i] = fmaf(a[i], sc, total[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) {
            total[i] = fmaf(a[i], (i % 4) < 2 ? s0 : s1, total[i]);
          }
        }
      };

      // This unit's k blocks (all of them unless the tile is split along K); at least one.
      const int kb_first = c.kb_begin, kb_end = min(c.kb_end, k_blocks);
      if constexpr (kBf16) {
        // No promotion: the tile's sum runs on in one accumulator set (bf16 products are exact
        // and the tensor cores add them in float32), one k block's WGMMAs in flight while the
        // stage of the block before is released. A zero tile keeps total = 0.
        if (!c.zero) {
          issue(0, kb_first);
          for (int kb = kb_first + 1; kb < kb_end; ++kb) {
            issue(0, kb, true);
            sm90::wgmma_wait<1>();
            release();
          }
          sm90::wgmma_wait<0>();
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) sm90::fence_operand(acc[0][i]);
          release();
#pragma unroll
          for (int i = 0; i < kAccRegs; ++i) total[i] = acc[0][i];
        }
      } else if constexpr (kDefer) {  // one accumulator set, the previous tile's epilogue deferred
        issue(0, kb_first);
        if (pending) epilogue(prev, prev_unit);  // `total` still holds the previous tile
#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) total[i] = 0.f;
        sm90::wgmma_wait<0>();
        promote(0);
        for (int kb = kb_first + 1; kb < kb_end; ++kb) {
          issue(0, kb);
          sm90::wgmma_wait<0>();
          promote(0);
        }
      } else if constexpr (!kDoubleAcc) {  // one accumulator set: issue, wait, promote
        for (int kb = kb_first; kb < (c.zero ? kb_first : kb_end); ++kb) {
          issue(0, kb);
          sm90::wgmma_wait<0>();
          promote(0);
        }
      } else if (!c.zero) {  // a zero tile keeps total = 0 and goes straight to the stores
        // Block i of the unit (0-based) runs in set i % kSets and is promoted once block
        // i + kSets - 1 is issued (kSets - 1 blocks in flight), the last kSets - 1 after a full
        // wait. Register sets are named statically (rounds unrolled by kSets), and every path
        // that reads an accumulator has waited for it in straight-line code: ptxas serialises
        // the WGMMAs (C7514) when a read may meet a WGMMA in flight on any path.
        constexpr int S = kSets;
        const int n = kb_end - kb_first;
        if (n >= S - 1) {
#pragma unroll
          for (int s = 0; s < S - 1; ++s) issue(s, kb_first + s);
          int base = 0;  // first block of the round, a multiple of S
          for (; base + 2 * S - 2 < n; base += S) {  // rounds whose S issues all exist
#pragma unroll
            for (int s = 0; s < S; ++s) {
              issue((s + S - 1) % S, kb_first + base + s + S - 1);
              sm90::wgmma_wait<S - 1>();
              promote(s);
            }
          }
          // The last round: R = n - base - (S - 1) blocks left to issue (0 <= R < S), one
          // straight-line body per R.
          auto last_round = [&](auto r) {
            constexpr int R = decltype(r)::value;
#pragma unroll
            for (int s = 0; s < R; ++s) {
              issue((s + S - 1) % S, kb_first + base + s + S - 1);
              sm90::wgmma_wait<S - 1>();
              promote(s);
            }
            sm90::wgmma_wait<0>();
#pragma unroll
            for (int d = 0; d < S - 1; ++d) promote((R + d) % S);
          };
          dispatch_below<S>(n - base - (S - 1), last_round);
        } else {  // fewer blocks than sets in flight (S > 2 only): issue all, wait, promote all
#pragma unroll
          for (int s = 0; s < S - 1; ++s) {
            if (s < n) issue(s, kb_first + s);
          }
          sm90::wgmma_wait<0>();
#pragma unroll
          for (int s = 0; s < S - 1; ++s) {
            if (s < n) promote(s);
          }
        }
      }

      if constexpr (kDefer) {
        prev = c, prev_unit = u, pending = true;  // stored under the next tile's first k block
      } else {
        epilogue(c, u);
      }
    }
    if constexpr (kDefer) {
      if (pending) epilogue(prev, prev_unit);
    }
    if (tma_store && leader) sm90::tma_store_wait_all();
  }
  // No CTA may leave while its peer can still multicast into its shared memory or arrive on its
  // barriers.
  if constexpr (kClusterN > 1) sm90::cluster_sync();
}

}  // namespace jax_ds::gemm
