/* lowbit.cpu.MatMulNarrowFloat: Y[M, N] = A[M, K] @ W[K, N] for weights stored as float16, bfloat16, float8 e4m3fn or
 * float8 e5m2, read in their stored width and widened to float32 in registers (F16C), as an ONNX Runtime custom op.
 *
 * The arithmetic (custom_ops/matmul_narrow_float.py holds the numpy reference, equal bit for bit):
 *   w[k, n] = bfloat16: the float32 whose high half it is (exact); else the weight as a float16: itself; e5m2: its
 *             byte as the high byte of a float16 (exact); e4m3fn: sign and the other 7 bits shifted into a float16,
 *             which is the value / 256 (exact, subnormals included)
 *   f[n]    = scales[n] (or scales[0]), times 256 for e4m3fn (float32; w[k, n] * f[n] is the weight
 *             DequantizeLinear makes); FLOAT4E2M1: w = e2m1 value times its block's step, f = 1
 *   Y[m, n] = acc * f[n] after acc = 0; for k = 0 .. K-1 in order: acc = fma(A[m, k], w[k, n], acc)   (a fused
 *   multiply-add, one float32 rounding: one token on one core bf16 20.9 -> 23.5, e4m3 10.9 -> 11.3, e5m2
 *   13.9 -> 14.6 Gweights/s against a multiply then an add; the factor once on the finished sum, not on each
 *   weight: e4m3 8.7 -> 10.1, e5m2 10.9 -> 13.7 Gweights/s)
 * Every row and column is summed in the same order however M and the tasks split the work, so one token's logits
 * do not depend on the batch or the prompt around it.
 * With input_type 17 or 19, A is first fake-quantized as QuantizeLinear -> DequantizeLinear to that float8 type with
 * the scalar input_scale s and zero point 0 compute it in ONNX Runtime: A <- float(float8(clip(A / s, -max, max))) * s
 * (float32 division, round to nearest even, saturating at max = 448 for e4m3fn and 57344 for e5m2).
 * With input_type 23, A is fake-quantized as NVFP4 activations (lowbit.NVFP4ActivationQDQ, lowbit/nvfp4.py
 * fake_quantize_activations) with input_scale as the global scale gs, in blocks of 16 along K.
 *
 * Inputs: A float32 [..., K]; B uint8 [N_pad / 16, K, 16 * bytes], bytes = 2 for (b)float16 (little-endian), 1 for
 * float8: tile t, row k holds w[k, 16t .. 16t + 15] (columns >= N are 0), so each tile is one sequential stream
 * (bfloat16: in the order 0-3, 8-11, 4-7, 12-15 of the 16);
 * scales float32 [N_pad] or [1]; input_scale float32 [1] (optional: with input_type). Attributes K, N, weight_type
 * (ONNX TensorProto: 10 FLOAT16, 16 BFLOAT16, 17 FLOAT8E4M3FN, 19 FLOAT8E5M2), input_type (0: A as it is; 17 or 19).
 * Output Y float32 [..., N]. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_api.h"
#include "simd.h"

enum { FLOAT16 = 10, BFLOAT16 = 16, FLOAT8E4M3FN = 17, FLOAT8E5M2 = 19, FLOAT4E2M1 = 23 };
#define FP4_BLOCK 16 /* rows of K per float32 step of a FLOAT4E2M1 weight (NVFP4's block) */
/* bytes of one row of a tile: 16 weights of 2 bytes, 1 byte, or (FLOAT4E2M1) half a byte */
#define ROW_BYTES(type) ((type) == FLOAT16 || (type) == BFLOAT16 ? 32 : (type) == FLOAT4E2M1 ? 8 : 16)

#define TILE 16 /* columns per tile: two 256-bit registers of float32 */
#define ROWS 6  /* rows of A per block when M > 1: 12 accumulators */
#define TILES_AT_ONCE 4 /* tiles per pass when M == 1: 8 independent accumulators */
#define KC 1536 /* at most this many rows of K widened at once when M > 1 (96 KB on the stack, in L2): all of K in
                 * one chunk up to 1536 rows, no partial sums through Y (K = 1536: 1.30 -> 1.25 ms; 256 rows: 1.35) */
#define TASKS 64

typedef struct { /* k and n first: new_kernel (ort_api.h) */
  int64_t k, n, weight_type, input_type;
  int avx512; /* prompts on 512-bit registers (the CPU has AVX-512F, LOWBIT_KERNELS_AVX512 is not 0) */
} Kernel;

typedef struct {
  const uint8_t *b;
  const float *factors; /* [N_pad] f[n]; NULL: all 1 */
  const float *steps;   /* FLOAT4E2M1: [N_pad / 16, K / 16, 16] the blocks' float32 steps; else NULL */
  const float *a;       /* [M, K] */
  const float *packed;  /* M > 1 on AVX2: A by blocks of ROWS rows, [M / ROWS rounded up, K, ROWS] (zeros past M) */
  float *y;             /* [M, N] */
  int64_t m, k, n, n_pad, weight_type, tiles_per_task;
  int avx512;
  int float8_as_float32; /* M == 1, float8 weights, every |A| < 2^16: widen8_scaled (unless the thread has DAZ) */
} Work;

/* Row k of a tile (16 weights at p) as float32: lo = columns 0..7, hi = 8..15. */
__attribute__((always_inline)) static inline void widen16(const uint8_t *p, int64_t type, __m256 *lo, __m256 *hi) {
  __m128i h0, h1;
  if (type == BFLOAT16) { /* the high half of a float32: columns stored 0-3, 8-11, 4-7, 12-15 (pack), so that the
                            * in-lane unpacks with zeros give columns 0..7 and 8..15 */
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), zero = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
    return;
  }
  if (type == FLOAT8E4M3FN) { /* sign-extended to 16 bits and shifted up 7: the sign in bits 15 and 14, the other
                               * 7 bits in 13..7; bit 14 cleared. 3 instructions for 16 weights where unpacking,
                               * shifting and clearing each half took 6: one-token e4m3 10.2 -> 10.7 Gweights/s */
    const __m256i v = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)), 7),
                                       _mm256_set1_epi16((short)0xBFFF));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
    return;
  }
  if (type == FLOAT16) {
    h0 = _mm_loadu_si128((const __m128i *)p);
    h1 = _mm_loadu_si128((const __m128i *)(p + 16));
  } else { /* e5m2: each byte as a float16's high byte, unpacked with zeros in lane, is its float16 */
    const __m128i v = _mm_loadu_si128((const __m128i *)p), zero = _mm_setzero_si128();
    h0 = _mm_unpacklo_epi8(zero, v);
    h1 = _mm_unpackhi_epi8(zero, v);
  }
  *lo = _mm256_cvtph_ps(h0);
  *hi = _mm256_cvtph_ps(h1);
}

/* Columns of tile t in row `row` of Y (the product, or between chunks of K the partial sum). */
static inline void store_tile(const Work *w, int64_t t, int64_t row, __m256 lo, __m256 hi) {
  const int64_t n0 = t * TILE;
  store16(w->y + row * w->n + n0, lo, hi, w->n - n0 < TILE ? w->n - n0 : TILE);
}

/* Row k of a FLOAT4E2M1 tile (8 bytes: columns 0..7 in the low nibbles, 8..15 in the high ones) as float32:
 * e2m1(code) times the block's step. Every e2m1 value is a float16 whose low byte is 0: the 16 codes in column
 * order look up their float16's high byte (vpshufb; code 8, -0, gives +0), unpacked with zeros into float16s and
 * widened by F16C (11 instructions for 16 weights where two 8-entry vpermps tables and blends took 14). */
__attribute__((always_inline)) static inline void widen16_e2m1(const uint8_t *p, const float *step, __m256 *lo,
                                                               __m256 *hi) {
  const __m128i high_bytes = _mm_setr_epi8(0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46,
                                           0x00, (char)0xB8, (char)0xBC, (char)0xBE, (char)0xC0, (char)0xC2,
                                           (char)0xC4, (char)0xC6);
  const __m128i v = _mm_loadl_epi64((const __m128i *)p), zero = _mm_setzero_si128();
  const __m128i codes = _mm_and_si128(_mm_unpacklo_epi64(v, _mm_srli_epi16(v, 4)), _mm_set1_epi8(0x0F));
  const __m128i f16_high = _mm_shuffle_epi8(high_bytes, codes);
  *lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpacklo_epi8(zero, f16_high)), _mm256_loadu_ps(step));
  *hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm_unpackhi_epi8(zero, f16_high)), _mm256_loadu_ps(step + 8));
}

/* One token's float8 route: the 16 bytes of a row straight into float32 bit patterns, sign-extended to 32 bits,
 * shifted so that e4m3's 7 bits (e5m2's) fill the low 4 (5) bits of the exponent field and the mantissa's top, the
 * sign bits in between cleared: exactly the value times 2^-120 (e4m3) or 2^-112 (e5m2), subnormals becoming
 * float32 subnormals. The activation is multiplied by 2^112 instead (exact while |A| < 2^16), and since a fused
 * multiply-add rounds only the sum, fma(A * 2^112, value * 2^-120, acc) is fma(A, value / 256, acc) bit for bit
 * (e5m2: fma(A, value, acc)). 3 instructions for 8 weights and no F16C conversion: one token on one core, 576 x
 * 3072, e4m3 11.3 -> 15.8, e5m2 14.6 -> 15.9 Gweights/s. Not where the thread treats subnormal inputs as zero
 * (MXCSR DAZ), which would zero e4m3's subnormal weights here. */
#define FLOAT8_X_SCALE 0x1p112f
__attribute__((always_inline)) static inline void widen8_scaled(const uint8_t *p, const int64_t type, __m256 *lo,
                                                                __m256 *hi) {
  const int shift = type == FLOAT8E4M3FN ? 20 : 21;
  const __m256i keep = _mm256_set1_epi32((int)(type == FLOAT8E4M3FN ? 0x87F00000u : 0x8FE00000u));
  const __m256i b0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
  const __m256i b1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
  *lo = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b0, shift), keep));
  *hi = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b1, shift), keep));
}

/* Row k of tile t as the float32 values v that the sums take: widened (FLOAT4E2M1: times its block's step; the
 * columns' factors multiply the finished sums, `scale_sums`). */
__attribute__((always_inline)) static inline void weights16(const Work *w, int64_t t, int64_t k, const uint8_t *p,
                                                            const int64_t type, __m256 *lo, __m256 *hi) {
  if (type == FLOAT4E2M1) {
    widen16_e2m1(p, w->steps + (t * (w->k / FP4_BLOCK) + k / FP4_BLOCK) * TILE, lo, hi);
    return;
  }
  widen16(p, type, lo, hi);
}

/* A finished sum of tile t's columns times their factors (none: as it is). */
__attribute__((always_inline)) static inline void scale_sums(const Work *w, int64_t t, __m256 *lo, __m256 *hi) {
  if (w->factors == NULL) return;
  *lo = _mm256_mul_ps(*lo, _mm256_loadu_ps(w->factors + t * TILE));
  *hi = _mm256_mul_ps(*hi, _mm256_loadu_ps(w->factors + t * TILE + 8));
}

static inline void load_partial(const Work *w, int64_t t, int64_t row, __m256 *lo, __m256 *hi) {
  const int64_t n0 = t * TILE, width = w->n - n0 < TILE ? w->n - n0 : TILE;
  if (width == TILE) {
    *lo = _mm256_loadu_ps(w->y + row * w->n + n0);
    *hi = _mm256_loadu_ps(w->y + row * w->n + n0 + 8);
    return;
  }
  float in[TILE] = {0};
  memcpy(in, w->y + row * w->n + n0, sizeof(float) * (size_t)width);
  *lo = _mm256_loadu_ps(in);
  *hi = _mm256_loadu_ps(in + 8);
}

/* M == 1: tiles t0 .. t0 + T - 1 in one pass over K (T independent streams of weights); T and the weight type are
 * constants in each copy the compiler makes (one_row_typed). */
__attribute__((always_inline)) static inline void one_row(const Work *w, int64_t t0, const int T,
                                                          const int64_t type, const int scaled) {
  const int64_t row_bytes = ROW_BYTES(type), tile_bytes = w->k * row_bytes;
  const uint8_t *b = w->b + (size_t)(t0 * tile_bytes);
  __m256 acc[2 * TILES_AT_ONCE];
  _Pragma("GCC unroll 16")
  for (int j = 0; j < 2 * T; j++) acc[j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < w->k; k++) {
    const __m256 x = scaled ? _mm256_mul_ps(_mm256_broadcast_ss(w->a + k), _mm256_set1_ps(FLOAT8_X_SCALE))
                            : _mm256_broadcast_ss(w->a + k);
    if ((k * row_bytes) % 64 == 0) { /* a new cache line of every stream (ort_api.h) */
      _Pragma("GCC unroll 16")
      for (int j = 0; j < T; j++) prefetch_ahead(b + j * tile_bytes + k * row_bytes);
    }
    _Pragma("GCC unroll 16")
    for (int j = 0; j < T; j++) {
      __m256 lo, hi;
      if (scaled)
        widen8_scaled(b + j * tile_bytes + k * row_bytes, type, &lo, &hi);
      else
        weights16(w, t0 + j, k, b + j * tile_bytes + k * row_bytes, type, &lo, &hi);
      acc[2 * j] = _mm256_fmadd_ps(x, lo, acc[2 * j]);
      acc[2 * j + 1] = _mm256_fmadd_ps(x, hi, acc[2 * j + 1]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int j = 0; j < T; j++) {
    scale_sums(w, t0 + j, &acc[2 * j], &acc[2 * j + 1]);
    store_tile(w, t0 + j, 0, acc[2 * j], acc[2 * j + 1]);
  }
}

/* Rows k0 .. k1 - 1 of tile t as float32 weights v, into `tile` [k1 - k0, 16]. */
static inline void widen_rows(const Work *w, int64_t t, int64_t k0, int64_t k1, float *tile) {
  const int64_t row_bytes = ROW_BYTES(w->weight_type);
  const uint8_t *b = w->b + (size_t)(t * w->k * row_bytes);
  for (int64_t k = k0; k < k1; k++) {
    __m256 lo, hi;
    weights16(w, t, k, b + k * row_bytes, w->weight_type, &lo, &hi);
    _mm256_store_ps(tile + (k - k0) * TILE, lo);
    _mm256_store_ps(tile + (k - k0) * TILE + 8, hi);
  }
}

/* M > 1: rows m0 .. m0 + R - 1 against rows k0 .. k1 - 1 of one tile, already widened into `tile` [k1 - k0, 16];
 * the sums continue from Y's partial sums where k0 > 0. */
static inline void row_block(const Work *w, const float *tile, int64_t t, int64_t k0, int64_t k1, int64_t m0,
                             const int R) {
  __m256 acc[2 * ROWS];
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++) {
    if (k0 == 0) {
      acc[2 * r] = acc[2 * r + 1] = _mm256_setzero_ps();
    } else {
      __m256 lo, hi; /* through locals: acc's address never taken, so it stays in registers */
      load_partial(w, t, m0 + r, &lo, &hi);
      acc[2 * r] = lo;
      acc[2 * r + 1] = hi;
    }
  }
  const float *a = w->packed + m0 * w->k; /* m0 is a multiple of ROWS: block m0 / ROWS */
  for (int64_t k = k0; k < k1; k++) {
    const float *row = tile + (k - k0) * TILE;
    const __m256 lo = _mm256_load_ps(row), hi = _mm256_load_ps(row + 8);
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) {
      const __m256 x = _mm256_broadcast_ss(a + k * ROWS + r);
      acc[2 * r] = _mm256_fmadd_ps(x, lo, acc[2 * r]);
      acc[2 * r + 1] = _mm256_fmadd_ps(x, hi, acc[2 * r + 1]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++) {
    if (k1 == w->k) scale_sums(w, t, &acc[2 * r], &acc[2 * r + 1]);
    store_tile(w, t, m0 + r, acc[2 * r], acc[2 * r + 1]);
  }
}

/* M > 1: one tile, K in equal chunks of at most KC rows: each chunk widened once into a buffer, then every block
 * of rows of A against it. */
static void many_rows(const Work *w, int64_t t) {
  float tile[KC * TILE] __attribute__((aligned(32)));
  const int64_t chunks = (w->k + KC - 1) / KC, chunk = (w->k + chunks - 1) / chunks;
  for (int64_t k0 = 0; k0 < w->k; k0 += chunk) {
    const int64_t k1 = k0 + chunk < w->k ? k0 + chunk : w->k;
    widen_rows(w, t, k0, k1, tile);
    for (int64_t m0 = 0; m0 < w->m; m0 += ROWS) {
      switch (w->m - m0 < ROWS ? w->m - m0 : ROWS) { /* constant R: each case gets its own register allocation */
        case 1: row_block(w, tile, t, k0, k1, m0, 1); break;
        case 2: row_block(w, tile, t, k0, k1, m0, 2); break;
        case 3: row_block(w, tile, t, k0, k1, m0, 3); break;
        case 4: row_block(w, tile, t, k0, k1, m0, 4); break;
        case 5: row_block(w, tile, t, k0, k1, m0, 5); break;
        default: row_block(w, tile, t, k0, k1, m0, ROWS); break;
      }
    }
  }
}

/* A's fake quantization to float8 (see the top of the file): `count` values, 8 at a time. */
static void fake_quantize8(const float *x, float *y, float scale, int64_t type) {
  const int e4m3 = type == FLOAT8E4M3FN;
  const __m256 s = _mm256_set1_ps(scale), max = _mm256_set1_ps(e4m3 ? 448.0f : 57344.0f);
  const __m256 min_normal = _mm256_set1_ps(e4m3 ? 0x1p-6f : 0x1p-14f);
  const __m256 steps = _mm256_set1_ps(e4m3 ? 0x1p9f : 0x1p16f), step = _mm256_set1_ps(e4m3 ? 0x1p-9f : 0x1p-16f);
  const __m256 sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  __m256 v = _mm256_div_ps(_mm256_loadu_ps(x), s);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), max)), max);
  const __m256 sign = _mm256_and_ps(v, sign_bit), a = _mm256_andnot_ps(sign_bit, v);
  /* normal: round the float32 mantissa to 3 (e4m3) or 2 (e5m2) bits, to nearest even */
  const int shift = e4m3 ? 20 : 21;
  __m256i bits = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, shift), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32((1 << (shift - 1)) - 1), lsb));
  bits = _mm256_and_si256(bits, _mm256_set1_epi32((int)(0xFFFFFFFFu << shift)));
  /* subnormal: a multiple of the smallest step, to nearest even (exact: the scalings are powers of two) */
  const __m256 sub = _mm256_mul_ps(
      _mm256_round_ps(_mm256_mul_ps(a, steps), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), step);
  const __m256 r = _mm256_blendv_ps(_mm256_castsi256_ps(bits), sub, _mm256_cmp_ps(a, min_normal, _CMP_LT_OQ));
  _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_or_ps(r, sign), s));
}

static void fake_quantize(const float *x, float *y, int64_t count, float scale, int64_t type) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) fake_quantize8(x + i, y + i, scale, type);
  if (i < count) {
    float in[8] = {0}, out[8];
    memcpy(in, x + i, sizeof(float) * (size_t)(count - i));
    fake_quantize8(in, out, scale, type);
    memcpy(y + i, out, sizeof(float) * (size_t)(count - i));
  }
}

/* NVFP4 activations (see the top of the file) in blocks of FP4_BLOCK values with the global scale gs: each block's
 * step s / gs, block scale s = e4m3(min(gs * (amax / 6), 448)) (0 -> 0.125). */
static void nvfp4_steps(const float *x, int64_t blocks, float gs, float *steps) {
  const __m256 sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  for (int64_t b = 0; b < blocks; b++) {
    const float *v = x + b * FP4_BLOCK;
    const __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign_bit, _mm256_loadu_ps(v)),
                                   _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(v + 8)));
    steps[b] = fminf(gs * (max8(m) / 6.0f), 448.0f);
  }
  fake_quantize(steps, steps, blocks, 1.0f, FLOAT8E4M3FN);  /* QuantizeLinear -> DequantizeLinear, scale 1 */
  for (int64_t b = 0; b < blocks; b++) steps[b] = (steps[b] == 0.0f ? 0.125f : steps[b]) / gs;
}

/* 8 values of a block with its step as e2m1 values with their signs (e2m1-rounded: half to even in each binade of
 * the grid, magnitude at most 6). */
static inline __m256 nvfp4_values8(const float *x, __m256 step) {
  const __m256 sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), six = _mm256_set1_ps(6.0f);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
  const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 scaled = _mm256_div_ps(_mm256_loadu_ps(x), step);
  const __m256 m = _mm256_min_ps(_mm256_andnot_ps(sign_bit, scaled), six);
  const __m256 halves = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(m, two), nearest), half);
  const __m256 ones = _mm256_round_ps(m, nearest);
  const __m256 twos = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(m, half), nearest), two);
  const __m256 rounded = _mm256_blendv_ps(_mm256_blendv_ps(twos, ones, _mm256_cmp_ps(m, four, _CMP_LT_OQ)), halves,
                                          _mm256_cmp_ps(m, two, _CMP_LT_OQ));
  const __m256 sign = _mm256_blendv_ps(one, minus_one, _mm256_cmp_ps(scaled, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_mul_ps(rounded, sign);
}

/* A's NVFP4 fake quantization (input_type 23): each value e2m1-rounded times its block's step, its sign kept;
 * `steps` holds `blocks` floats. */
static void fake_quantize_nvfp4(const float *x, float *y, int64_t blocks, float gs, float *steps) {
  nvfp4_steps(x, blocks, gs, steps);
  for (int64_t b = 0; b < blocks; b++) {
    const __m256 step = _mm256_set1_ps(steps[b]);
    for (int i = 0; i < FP4_BLOCK; i += 8)
      _mm256_storeu_ps(y + b * FP4_BLOCK + i, _mm256_mul_ps(nvfp4_values8(x + b * FP4_BLOCK + i, step), step));
  }
}

/* Block `blk` of A [M, K] by blocks of ROWS rows, [M / ROWS rounded up, K, ROWS] (zeros past M): row_block's
 * broadcasts of a block read one sequential stream instead of ROWS rows K apart. */
static void pack_row_block(const float *a, int64_t m, int64_t k, int64_t blk, float *packed) {
  float *out = packed + blk * ROWS * k;
  if (blk * ROWS + ROWS <= m) { /* a whole block: ROWS streams in, one sequential stream out */
    const float *row = a + blk * ROWS * k;
    for (int64_t i = 0; i < k; i++) {
      _Pragma("GCC unroll 8")
      for (int r = 0; r < ROWS; r++) out[i * ROWS + r] = row[r * k + i];
    }
    return;
  }
  for (int64_t i = 0; i < k; i++) {
    for (int r = 0; r < ROWS; r++) out[i * ROWS + r] = blk * ROWS + r < m ? a[(blk * ROWS + r) * k + i] : 0.0f;
  }
}

/* A's preparation for block `blk` of ROWS rows: fake-quantized (input_type; into `quantized`, which then stands for
 * A) and packed for the AVX2 prompt loop (`packed` not NULL). One task per block: in the calling thread alone this
 * took as long as a tile's products. */
typedef struct {
  const float *a;
  float *quantized, *steps, *packed; /* NULL where not needed */
  int64_t m, k, input_type;
  float input_scale;
} Prepare;

static void prepare_block(const Prepare *p, int64_t blk) {
  const int64_t r0 = blk * ROWS, rows = p->m - r0 < ROWS ? p->m - r0 : ROWS, k = p->k;
  if (p->input_type == FLOAT4E2M1)
    fake_quantize_nvfp4(p->a + r0 * k, p->quantized + r0 * k, rows * k / FP4_BLOCK, p->input_scale,
                        p->steps + r0 * k / FP4_BLOCK);
  else if (p->input_type)
    fake_quantize(p->a + r0 * k, p->quantized + r0 * k, rows * k, p->input_scale, p->input_type);
  if (p->packed != NULL) pack_row_block(p->input_type ? p->quantized : p->a, p->m, k, blk, p->packed);
}

static void prepare_task(void *data, size_t blk) { prepare_block(data, (int64_t)blk); }

/* The same quantization as integers, for the int8 kernels' activation 1 (matmul_int4_int8.c): per block, twice each
 * e2m1 value (int8, -12..12; the fake-quantized value is twice / 2 * step exactly) and the block's step. */
void lowbit_nvfp4_activations(const float *x, int64_t blocks, float gs, int8_t *twice, float *steps) {
  nvfp4_steps(x, blocks, gs, steps);
  const __m256 two = _mm256_set1_ps(2.0f);
  for (int64_t b = 0; b < blocks; b++) {
    const __m256 step = _mm256_set1_ps(steps[b]);
    for (int i = 0; i < FP4_BLOCK; i += 8) {
      const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(nvfp4_values8(x + b * FP4_BLOCK + i, step), two));
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64((__m128i *)(twice + b * FP4_BLOCK + i), _mm_packs_epi16(w16, w16));
    }
  }
}

/* The same as many_rows on 512-bit registers (one tile row each): blocks of ROWS512 rows of A, each output the
 * same float32 multiply and add in the same order, so the results are equal bit for bit; fewer instructions per
 * product, where the AVX2 loop is bound by issuing them. */
#define ROWS512 12
#define KC512 128 /* 8 KB of widened rows a tile */
#define TILES512 4 /* tiles a block of rows of A meets per chunk: 32 KB of widened rows */

__attribute__((target("avx512f"), always_inline)) static inline void row_block512(
    const Work *w, const float *tile, int64_t t, int64_t k0, int64_t k1, int64_t m0, const int R) {
  const int64_t n0 = t * TILE, width = w->n - n0 < TILE ? w->n - n0 : TILE;
  const __mmask16 mask = (__mmask16)((1u << width) - 1u);
  __m512 acc[ROWS512];
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++)
    acc[r] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, w->y + (m0 + r) * w->n + n0);
  const float *a = w->a + m0 * w->k;
  for (int64_t k = k0; k < k1; k++) {
    const __m512 v = _mm512_load_ps(tile + (k - k0) * TILE);
    _Pragma("GCC unroll 16")
    for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * w->k + k]), v, acc[r]);
  }
  const int scaled = k1 == w->k && w->factors != NULL; /* the finished sums times the columns' factors */
  const __m512 f = scaled ? _mm512_loadu_ps(w->factors + n0) : _mm512_set1_ps(1.0f);
  _Pragma("GCC unroll 16")
  for (int r = 0; r < R; r++)
    _mm512_mask_storeu_ps(w->y + (m0 + r) * w->n + n0, mask, scaled ? _mm512_mul_ps(acc[r], f) : acc[r]);
}

/* Tiles t0 .. t1 - 1 (at most TILES512) together: each chunk of K widened for all of them, then each block of rows
 * of A against every tile in turn, so the block (12 rows x 128 floats) is read from memory once per chunk for
 * TILES512 tiles instead of once per tile. */
__attribute__((target("avx512f"))) static void many_rows512(const Work *w, int64_t t0, int64_t t1) {
  float tiles[TILES512][KC512 * TILE] __attribute__((aligned(64)));
  for (int64_t k0 = 0; k0 < w->k; k0 += KC512) {
    const int64_t k1 = k0 + KC512 < w->k ? k0 + KC512 : w->k;
    for (int64_t t = t0; t < t1; t++) widen_rows(w, t, k0, k1, tiles[t - t0]);
    for (int64_t m0 = 0; m0 < w->m; m0 += ROWS512) {
      for (int64_t t = t0; t < t1; t++) {
        const float *tile = tiles[t - t0];
        switch (w->m - m0 < ROWS512 ? w->m - m0 : ROWS512) {
#define ROWS_CASE(R) case R: row_block512(w, tile, t, k0, k1, m0, R); break;
          ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
          ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11)
#undef ROWS_CASE
          default: row_block512(w, tile, t, k0, k1, m0, ROWS512); break;
        }
      }
    }
  }
}

__attribute__((always_inline)) static inline void one_row_typed(const Work *w, int64_t t, const int T,
                                                                const int scaled) {
  switch (w->weight_type) {
    case FLOAT16: one_row(w, t, T, FLOAT16, 0); break;
    case BFLOAT16: one_row(w, t, T, BFLOAT16, 0); break;
    case FLOAT8E4M3FN: (scaled ? one_row(w, t, T, FLOAT8E4M3FN, 1) : one_row(w, t, T, FLOAT8E4M3FN, 0)); break;
    case FLOAT8E5M2: (scaled ? one_row(w, t, T, FLOAT8E5M2, 1) : one_row(w, t, T, FLOAT8E5M2, 0)); break;
    default: one_row(w, t, T, FLOAT4E2M1, 0); break;
  }
}

static void run_task(void *data, size_t task) {
  const Work *w = data;
  const int64_t tiles = w->n_pad / TILE, t0 = (int64_t)task * w->tiles_per_task;
  const int64_t t1 = t0 + w->tiles_per_task < tiles ? t0 + w->tiles_per_task : tiles;
  if (w->m == 1) {
    const int scaled = w->float8_as_float32 && !(_mm_getcsr() & 0x0040); /* MXCSR DAZ: this thread's setting */
    for (int64_t t = t0; t < t1; t += TILES_AT_ONCE) {
      switch (t1 - t < TILES_AT_ONCE ? t1 - t : TILES_AT_ONCE) {
        case 1: one_row_typed(w, t, 1, scaled); break;
        case 2: one_row_typed(w, t, 2, scaled); break;
        case 3: one_row_typed(w, t, 3, scaled); break;
        default: one_row_typed(w, t, TILES_AT_ONCE, scaled); break;
      }
    }
    return;
  }
  if (w->avx512) {
    for (int64_t t = t0; t < t1; t += TILES512) many_rows512(w, t, t + TILES512 < t1 ? t + TILES512 : t1);
    return;
  }
  for (int64_t t = t0; t < t1; t++) many_rows(w, t);
}

static OrtStatus *compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  const int64_t k = kernel->k, n = kernel->n, n_pad = (n + TILE - 1) / TILE * TILE;
  const int e2m1 = kernel->weight_type == FLOAT4E2M1;
  const OrtValue *values[4];
  int64_t dims[4][8];
  size_t ranks[4];
  for (size_t i = 0; i < (kernel->input_type ? 4 : 3); i++) CHECK(input(context, i, &values[i], dims[i], &ranks[i]));
  if (kernel->input_type && (ranks[3] > 1 || (ranks[3] == 1 && dims[3][0] != 1)))
    return error("lowbit.cpu.MatMulNarrowFloat: input_scale is not one value");
  if (ranks[0] < 1 || dims[0][ranks[0] - 1] != k)
    return error("lowbit.cpu.MatMulNarrowFloat: A's last dimension is not K");
  const int64_t b_dims[3] = {n_pad / TILE, k, ROW_BYTES(kernel->weight_type)};
  if (ranks[1] != 3 || memcmp(dims[1], b_dims, sizeof b_dims) != 0)
    return error("lowbit.cpu.MatMulNarrowFloat: B is not [N_pad / 16, K, row bytes]");
  const int64_t step_dims[3] = {n_pad / TILE, k / FP4_BLOCK, TILE};
  if (e2m1 && (ranks[2] != 3 || memcmp(dims[2], step_dims, sizeof step_dims) != 0))
    return error("lowbit.cpu.MatMulNarrowFloat: FLOAT4E2M1 steps are not [N_pad / 16, K / 16, 16]");
  const int uniform = ranks[2] == 1 && dims[2][0] == 1;
  if (!e2m1 && !uniform && (ranks[2] != 1 || dims[2][0] != n_pad))
    return error("lowbit.cpu.MatMulNarrowFloat: scales are not [N_pad] or [1]");
  int64_t m = 1, out_dims[8];
  for (size_t i = 0; i + 1 < ranks[0]; i++) {
    m *= dims[0][i];
    out_dims[i] = dims[0][i];
  }
  out_dims[ranks[0] - 1] = n;
  OrtValue *output;
  CHECK(API(KernelContext_GetOutput, KernelContextGetOutputFn)(context, 0, out_dims, ranks[0], &output));
  float *y = data_of(output);
  const float *a = data_of(values[0]), *scales = data_of(values[2]);
  const uint8_t *b = data_of(values[1]);
  if (y == NULL || a == NULL || b == NULL || scales == NULL)
    return error("lowbit.cpu.MatMulNarrowFloat: no tensor data");
  if (m == 0) return NULL;
  const float *input_scale = kernel->input_type ? data_of(values[3]) : NULL;
  if (kernel->input_type && input_scale == NULL) return error("lowbit.cpu.MatMulNarrowFloat: no tensor data");
  const int nvfp4 = kernel->input_type == FLOAT4E2M1, pack = m > 1 && !kernel->avx512;
  float *factors = malloc(sizeof(float) * (size_t)n_pad);
  float *quantized = kernel->input_type ? malloc(sizeof(float) * (size_t)(m * k)) : NULL;
  float *steps = nvfp4 ? malloc(sizeof(float) * (size_t)(m * k / FP4_BLOCK)) : NULL;
  float *packed = pack ? malloc(sizeof(float) * (size_t)((m + ROWS - 1) / ROWS * ROWS * k)) : NULL;
  if (factors == NULL || (kernel->input_type && quantized == NULL) || (nvfp4 && steps == NULL) ||
      (pack && packed == NULL)) {
    free(factors);
    free(quantized);
    free(steps);
    free(packed);
    return API(CreateStatus, CreateStatusFn)(ORT_RUNTIME_EXCEPTION, "lowbit.cpu.MatMulNarrowFloat: out of memory");
  }
  Prepare prepare = {a, quantized, steps, packed, m, k, kernel->input_type, input_scale ? input_scale[0] : 0.0f};
  OrtStatus *status = NULL;
  if (m <= ROWS)
    prepare_block(&prepare, 0);
  else if (kernel->input_type || pack)
    status = API(KernelContext_ParallelFor, KernelContextParallelForFn)(context, prepare_task,
                                                                        (size_t)((m + ROWS - 1) / ROWS), 0, &prepare);
  if (kernel->input_type) a = quantized;
  const float unit = kernel->weight_type == FLOAT8E4M3FN ? 256.0f : 1.0f;
  /* the columns' factors, 8 at a time (n_pad is a multiple of 16): a per-call loop over N, serial before the tasks
   * (an lm_head's 49152 columns one by one took about as long as its one-token product on a thread) */
  const __m256 unit8 = _mm256_set1_ps(unit), one8 = _mm256_set1_ps(1.0f);
  __m256 all_ones = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t i = 0; i < n_pad; i += 8) {
    const __m256 f = e2m1 ? one8 : _mm256_mul_ps(uniform ? _mm256_broadcast_ss(scales) : _mm256_loadu_ps(scales + i),
                                                 unit8);
    _mm256_storeu_ps(factors + i, f);
    all_ones = _mm256_and_ps(all_ones, _mm256_cmp_ps(f, one8, _CMP_EQ_OQ));
  }
  const int ones = _mm256_movemask_ps(all_ones) == 0xFF;
  const int64_t tiles = n_pad / TILE;
  int64_t per_task = (tiles + TASKS - 1) / TASKS;
  if (m == 1 || kernel->avx512)  /* whole groups of TILES_AT_ONCE (TILES512 too); AVX2 prompts: tile by tile */
    per_task = (per_task + TILES_AT_ONCE - 1) / TILES_AT_ONCE * TILES_AT_ONCE;
  int float8_as_float32 = m == 1 && (kernel->weight_type == FLOAT8E4M3FN || kernel->weight_type == FLOAT8E5M2);
  for (int64_t i = 0; float8_as_float32 && i < k; i++) float8_as_float32 = fabsf(a[i]) < 0x1p16f;
  Work work = {b, ones ? NULL : factors, e2m1 ? scales : NULL, a, packed, y, m, k, n, n_pad, kernel->weight_type,
               per_task, kernel->avx512, float8_as_float32};
  if (status == NULL)
    status = API(KernelContext_ParallelFor, KernelContextParallelForFn)(
        context, run_task, (size_t)((tiles + per_task - 1) / per_task), 0, &work);
  free(packed);
  free(steps);
  free(factors);
  free(quantized);
  return status;
}

/* ----------------------------------------------------------------------------------------------- registration */

static OrtStatus *create_kernel(const CustomOp *op, const OrtApi *unused, const OrtKernelInfo *info, void **out) {
  (void)op;
  (void)unused;
  Kernel *kernel = NULL;
  OrtStatus *status = new_kernel(info, sizeof(Kernel), "lowbit.cpu.MatMulNarrowFloat: K and N must be positive",
                                 (void **)&kernel);
  if (status != NULL) return status;
  status = int_attribute(info, "weight_type", &kernel->weight_type, 0, 0);
  if (status == NULL) status = int_attribute(info, "input_type", &kernel->input_type, 1, 0);  /* optional: A as is */
  if (status == NULL && kernel->input_type != 0 && kernel->input_type != FLOAT8E4M3FN &&
      kernel->input_type != FLOAT8E5M2 && kernel->input_type != FLOAT4E2M1)
    status = error("lowbit.cpu.MatMulNarrowFloat: input_type must be 0, 17 (e4m3fn), 19 (e5m2) or 23 (e2m1)");
  if (status == NULL && kernel->input_type == FLOAT4E2M1 && kernel->k % FP4_BLOCK != 0)
    status = error("lowbit.cpu.MatMulNarrowFloat: NVFP4 activations (input_type 23) need K a multiple of 16");
  if (status == NULL && kernel->weight_type != FLOAT16 && kernel->weight_type != BFLOAT16 &&
      kernel->weight_type != FLOAT8E4M3FN && kernel->weight_type != FLOAT8E5M2 && kernel->weight_type != FLOAT4E2M1)
    status = error("lowbit.cpu.MatMulNarrowFloat: weight_type must be 10 (float16), 16 (bfloat16), 17 (e4m3fn), "
                   "19 (e5m2) or 23 (e2m1)");
  if (status == NULL && kernel->weight_type == FLOAT4E2M1 && kernel->k % FP4_BLOCK != 0)
    status = error("lowbit.cpu.MatMulNarrowFloat: a FLOAT4E2M1 weight needs K a multiple of 16");
  if (status != NULL) {
    free(kernel);
    return status;
  }
  const char *avx512 = getenv("LOWBIT_KERNELS_AVX512");
  kernel->avx512 = __builtin_cpu_supports("avx512f") && !(avx512 != NULL && strcmp(avx512, "0") == 0);
  *out = kernel;
  return NULL;
}

static const char *op_name(const CustomOp *op) { (void)op; return "MatMulNarrowFloat"; }
static int op_input_type(const CustomOp *op, size_t index) { (void)op; return index == 1 ? TYPE_UINT8 : TYPE_FLOAT; }
static size_t op_input_count(const CustomOp *op) { (void)op; return 4; }
static int input_characteristic(const CustomOp *op, size_t index) { (void)op; return index == 3 ? OPTIONAL : REQUIRED; }

LOWBIT_CPU_OP(lowbit_matmul_narrow_float, op_name, op_input_type, op_input_count, input_characteristic, create_kernel,
              compute);
