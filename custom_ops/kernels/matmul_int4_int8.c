/* lowbit.cpu.MatMulInt4Int8: Y[M, N] = A[M, K] @ W[K, N] for weights stored as codes of 4 bits or fewer, computed
 * with int8 activations and integer dot products (AVX2), as an ONNX Runtime custom op; lowbit.cpu.MatMulInt8Int8:
 * the same for codes of 8 bits (the same arithmetic; B holds bytes, see the end of this comment).
 *
 * The arithmetic (custom_ops/matmul_int4_int8.py holds the numpy reference, equal bit for bit):
 *   groups of G rows of K (the last one partial where G does not divide K), per row m of A and group g:
 *     amax = max |A[m, k]| over the group;  sx = amax / 127;  xq[k] = rint(A[m, k] * (127 / amax))  (0 if amax == 0)
 *     xsum = sum of the group's xq
 *   per column n:  dot = sum over the group of q[k, n] * xq[k]  (exact, int32)
 *   Y[m, n] = sum over g, in order, of  float(dot - z[g, n] * xsum) * (s[g, n] * sx)   (float32, no fused multiply-add)
 *
 * Inputs: A float32 [..., K]; B uint8 [N_pad / 16, groups, G / 4, 32], the codes (0..15) as nibbles: byte 2c + h of
 * quad j of group g of tile t holds q[gG + 4j + h, 16t + c] in its low nibble and q[gG + 4j + 2 + h, 16t + c] in its
 * high nibble (codes of rows >= K and columns >= N are 0); scales float32 [N_pad / 16, groups, 16] and
 * zero_points uint8 [N_pad / 16, groups, 16], tile by tile as B (each tile's bytes are one sequential stream), or
 * [1] where all are equal. Attributes K, N, group_size, layout (0 AVX2 pairs, 1 VNNI fours: see the .py), e2m1 (1:
 * layout 1 and groups of 16, each code a FLOAT4E2M1 bit pattern standing for twice its value plus 12, 0..24, an
 * NVFP4 weight's exact integers), activation (1: NVFP4 activations instead of int8 ones, twice their e2m1 values with
 * half their block's step as sx, groups of 16; input 4, the global scale), float_zero_points (1: input 5, float32
 * zero points tiled as the scales, in place of input 3). Output Y float32 [..., N].
 * MatMulInt8Int8: codes 0..255 and zero points 0..255; B uint8 [N_pad / 16, groups, G / 2, 32]: pair p of group g
 * of tile t holds q[gG + 2p + h, 16t + c] at byte 8 * o(c / 4) + 2 (c % 4) + h, o = (0, 2, 1, 3) (group_size even).
 * Its activation may also be 2 (uint8 per tensor as DynamicQuantizeLinear) or 3 (uint8 with input 4 as the scale
 * and the attribute input_zero_point as the zero point, as QuantizeLinear): see quantize_tensor_uint8.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_api.h"
#include "simd.h"


/* ------------------------------------------------------------------------------------------------- the kernel */

#define TILE 16  /* columns per tile: one 256-bit register of int16 sums */
#ifndef TASKS
#define TASKS 64  /* tasks per call handed to ONNX Runtime's thread pool */
#endif
#define QUADS_PER_FLUSH 4  /* 4 quads of 4 rows: |sum| <= 16 * 15 * 127 = 30480 fits int16 */

typedef struct { /* k and n first: new_kernel (ort_api.h) */
  int64_t k, n, group_size, layout; /* layout: 0 AVX2 (pairs of rows), 1 VNNI (fours of rows), 2 bytes (8 bits) */
  int64_t dpbusd;                    /* layout 1 runs on vpdpbusd (AVX512-VNNI), else on vpmaddubsw */
  int64_t activation; /* 0 int8 per group, 1 NVFP4 (input 4: the global scale), 2 (bytes) DynamicQuantizeLinear,
                       * 3 (bytes) QuantizeLinear to uint8 (input 4: the scale; input_zero_point) */
  int64_t input_zero_point; /* activation 3 */
  int64_t float_zero_points; /* 1: input 5 holds float zero points (input 3 is ignored) */
  int64_t e2m1;                      /* MatMulInt4Int8, layout 1: codes are FLOAT4E2M1 bit patterns (E2M1_BYTES) */
  int64_t max_code;                  /* MatMulInt4Int8: no code is larger (15; 7 for 3-bit codes, 3 for 2-bit) */
} Kernel;

typedef struct {
  const uint8_t *b;
  const float *scales;
  const uint8_t *zero_points;  /* NULL: every zero point is `zero_point` */
  int32_t zero_point;
  const int8_t *xq;     /* [M, groups * G], zero beyond K */
  const int16_t *xw;    /* layout 2: xq widened to int16 (each two of a row one 32-bit broadcast); else NULL */
  const __m256i *pairs; /* M == 1, layout 0: [groups * G / 2] each pair of xq broadcast over a register */
  const float *sx;      /* [M, groups] */
  const int32_t *xsum;  /* [M, groups] */
  float *y;             /* [M, N] */
  int64_t m, n, n_pad, group_size, groups, k;
  int64_t tiles_per_task, layout, dpbusd; /* dpbusd: layout 1 on AVX512-VNNI instructions */
  int64_t e2m1;                           /* layout 1: each code stands for E2M1_BYTES[code] */
  int64_t octets_per_flush;               /* layout 1 without VNNI: octets summed in int16 (fours_int16) */
  const float *float_zero_points; /* [N_pad / 16, groups, 16] float zero points (the others then unused), or NULL */
} Work;

/* Group g's rows of K in steps of `step` rows (a pair, an octet): all of them but in a last group that K ends
 * early, where the steps past K (zero codes times zero activations) are skipped. */
static inline int64_t rows_in(const Work *w, int64_t g, int64_t step) {
  const int64_t left = w->k - g * w->group_size, rows = left < w->group_size ? left : w->group_size;
  return (rows + step - 1) / step;
}

/* Tile t for every row of A, 4 rows at a time, through ROWS_FN(w, t, m0, R, acc) with a constant R (each case compiles
 * to its own register allocation), stored to Y. */
#define ROW_BLOCKS(ROWS_FN)                                                                                          \
  const int64_t n0 = t * TILE, width = w->n - n0 < TILE ? w->n - n0 : TILE;                                          \
  float acc[4 * TILE];                                                                                               \
  for (int64_t m0 = 0; m0 < w->m; m0 += 4) {                                                                         \
    const int64_t rows = w->m - m0 < 4 ? w->m - m0 : 4;                                                              \
    for (int i = 0; i < 4 * TILE; i += 8) _mm256_storeu_ps(acc + i, _mm256_setzero_ps()); /* not rep stos: 6% */  \
    switch (rows) {                                                                                                  \
      case 1: ROWS_FN(w, t, m0, 1, acc); break;                                                                      \
      case 2: ROWS_FN(w, t, m0, 2, acc); break;                                                                      \
      case 3: ROWS_FN(w, t, m0, 3, acc); break;                                                                      \
      default: ROWS_FN(w, t, m0, 4, acc); break;                                                                     \
    }                                                                                                                \
    for (int64_t r = 0; r < rows; r++) memcpy(w->y + (m0 + r) * w->n + n0, acc + r * TILE, sizeof(float) * width); \
  }

/* Group g's exact integer sums (lo32: columns 0..7, hi32: 8..15 of tile t) for rows m0..m0+R-1, added to acc in
 * float32: float(dot - z * xsum) * (s * sx). */
__attribute__((always_inline)) static inline void add_group(const Work *w, int64_t t, int64_t g, int64_t m0,
                                                             const int R, const __m256i *lo32, const __m256i *hi32,
                                                             float *acc) {
  const size_t at = ((size_t)t * w->groups + g) * TILE;
  __m256i zlo = _mm256_setzero_si256(), zhi = zlo;
  if (w->zero_points != NULL) {
    const __m128i z8 = _mm_loadu_si128((const __m128i *)(w->zero_points + at));
    zlo = _mm256_cvtepu8_epi32(z8);
    zhi = _mm256_cvtepu8_epi32(_mm_srli_si128(z8, 8));
  }
  const __m256 slo = _mm256_loadu_ps(w->scales + at), shi = _mm256_loadu_ps(w->scales + at + 8);
  if (w->float_zero_points != NULL) { /* (float(dot) - z * float(xsum)) * (s * sx) */
    const __m256 flo = _mm256_loadu_ps(w->float_zero_points + at), fhi = _mm256_loadu_ps(w->float_zero_points + at + 8);
    for (int r = 0; r < R; r++) {
      const int64_t row = (m0 + r) * w->groups + g;
      const __m256 sx = _mm256_set1_ps(w->sx[row]), xsum = _mm256_set1_ps((float)w->xsum[row]);
      const __m256 tlo = _mm256_sub_ps(_mm256_cvtepi32_ps(lo32[r]), _mm256_mul_ps(flo, xsum));
      const __m256 thi = _mm256_sub_ps(_mm256_cvtepi32_ps(hi32[r]), _mm256_mul_ps(fhi, xsum));
      float *a = acc + r * TILE;
      _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_mul_ps(tlo, _mm256_mul_ps(slo, sx))));
      _mm256_storeu_ps(a + 8, _mm256_add_ps(_mm256_loadu_ps(a + 8), _mm256_mul_ps(thi, _mm256_mul_ps(shi, sx))));
    }
    return;
  }
  for (int r = 0; r < R; r++) {
    const int64_t row = (m0 + r) * w->groups + g;
    const __m256 sx = _mm256_set1_ps(w->sx[row]);
    __m256i dlo, dhi;
    if (w->zero_points == NULL) {
      const __m256i offset = _mm256_set1_epi32(w->zero_point * w->xsum[row]);
      dlo = _mm256_sub_epi32(lo32[r], offset);
      dhi = _mm256_sub_epi32(hi32[r], offset);
    } else {
      const __m256i xsum = _mm256_set1_epi32(w->xsum[row]);
      dlo = _mm256_sub_epi32(lo32[r], _mm256_mullo_epi32(zlo, xsum));
      dhi = _mm256_sub_epi32(hi32[r], _mm256_mullo_epi32(zhi, xsum));
    }
    float *a = acc + r * TILE;
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_mul_ps(_mm256_cvtepi32_ps(dlo),
                                                                        _mm256_mul_ps(slo, sx))));
    _mm256_storeu_ps(a + 8, _mm256_add_ps(_mm256_loadu_ps(a + 8), _mm256_mul_ps(_mm256_cvtepi32_ps(dhi),
                                                                                _mm256_mul_ps(shi, sx))));
  }
}

/* Rows m0..m0+R-1 of A against tile t: adds each group's float term to acc[R][TILE] in group order. */
static inline void tile_rows(const Work *w, int64_t t, int64_t m0, const int R, float *acc) {
  const int64_t quads = w->group_size / 4, stride = w->groups * w->group_size;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const uint8_t *b = w->b + (size_t)t * w->groups * quads * 32;
  for (int64_t g = 0; g < w->groups; g++) {
    __m256i lo32[4], hi32[4];
    for (int r = 0; r < R; r++) lo32[r] = hi32[r] = _mm256_setzero_si256();
    for (int64_t j0 = 0; j0 < quads; j0 += QUADS_PER_FLUSH) {
      const int64_t j1 = j0 + QUADS_PER_FLUSH < quads ? j0 + QUADS_PER_FLUSH : quads;
      __m256i sum16[4];
      for (int r = 0; r < R; r++) sum16[r] = _mm256_setzero_si256();
      for (int64_t j = j0; j < j1; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + (size_t)(g * quads + j) * 32));
        const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if (R == 1 && w->pairs != NULL) {
          const __m256i *x = w->pairs + (g * quads + j) * 2;
          sum16[0] = _mm256_add_epi16(sum16[0], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x[0]),
                                                                 _mm256_maddubs_epi16(hi, x[1])));
          continue;
        }
        for (int r = 0; r < R; r++) {
          const int8_t *x = w->xq + (m0 + r) * stride + g * w->group_size + 4 * j;
          int16_t pair0, pair1;
          memcpy(&pair0, x, 2);
          memcpy(&pair1, x + 2, 2);
          sum16[r] = _mm256_add_epi16(sum16[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi16(pair0)),
                                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi16(pair1))));
        }
      }
      for (int r = 0; r < R; r++) {
        lo32[r] = _mm256_add_epi32(lo32[r], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum16[r])));
        hi32[r] = _mm256_add_epi32(hi32[r], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum16[r], 1)));
      }
    }
    add_group(w, t, g, m0, R, lo32, hi32, acc);
  }
}

/* One octet of the VNNI layout (64 bytes): l0/h0 columns 0..7 rows 0..3/4..7, l1/h1 columns 8..15. */
typedef struct {
  __m256i l0, h0, l1, h1;
} Octet;

/* FLOAT4E2M1 codes (e2m1 != 0): each code as twice its e2m1 value plus 12, 0..24 (code 8, -0, is 12), looked up by
 * vpshufb: NVFP4 weights as exact integers with zero point 12 and half the block's step as scale. */
#define NVFP4_ZERO_POINT 12 /* E2M1_BYTES' 0 */
#define E2M1_BYTES 12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0

__attribute__((always_inline)) static inline Octet octet_codes(const uint8_t *p, const int e2m1) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i v0 = _mm256_loadu_si256((const __m256i *)p), v1 = _mm256_loadu_si256((const __m256i *)(p + 32));
  Octet q = {_mm256_and_si256(v0, low), _mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
             _mm256_and_si256(v1, low), _mm256_and_si256(_mm256_srli_epi16(v1, 4), low)};
  if (e2m1) {
    const __m256i values = _mm256_setr_epi8(E2M1_BYTES, E2M1_BYTES);
    q = (Octet){_mm256_shuffle_epi8(values, q.l0), _mm256_shuffle_epi8(values, q.h0),
                _mm256_shuffle_epi8(values, q.l1), _mm256_shuffle_epi8(values, q.h1)};
  }
  return q;
}

/* A row's activations for rows 0..3 and 4..7 of an octet, each four broadcast as one 32-bit value. */
__attribute__((always_inline)) static inline void row_fours(const int8_t *x, __m256i *x0, __m256i *x1) {
  int32_t four0, four1;
  memcpy(&four0, x, 4);
  memcpy(&four1, x + 4, 4);
  *x0 = _mm256_set1_epi32(four0);
  *x1 = _mm256_set1_epi32(four1);
}

/* The VNNI layout (custom_ops/matmul_int4_int8.py, `pack`): per octet of rows, 8 columns a register, each 32-bit
 * lane one column's 4 rows (low nibbles: rows 0..3, high: 4..7); vpdpbusd adds the 4 products of unsigned codes and
 * signed int8 activations into int32 directly. The same exact integer sums as tile_rows, so the same results. */
#define VNNI_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))

VNNI_TARGET __attribute__((always_inline)) static inline void tile_rows_vnni(const Work *w, int64_t t, int64_t m0,
                                                                            const int R, float *acc, const int e2m1) {
  const int64_t octets = w->group_size / 8, stride = w->groups * w->group_size;
  const uint8_t *b = w->b + (size_t)t * w->groups * octets * 64;
  for (int64_t g = 0; g < w->groups; g++) {
    __m256i lo32[4], hi32[4];
    for (int r = 0; r < R; r++) lo32[r] = hi32[r] = _mm256_setzero_si256();
    for (int64_t j = 0; j < rows_in(w, g, 8); j++) {
      const Octet q = octet_codes(b + (size_t)(g * octets + j) * 64, e2m1);
      for (int r = 0; r < R; r++) {
        __m256i x0, x1;
        row_fours(w->xq + (m0 + r) * stride + g * w->group_size + 8 * j, &x0, &x1);
        lo32[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(lo32[r], q.l0, x0), q.h0, x1);
        hi32[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(hi32[r], q.l1, x0), q.h1, x1);
      }
    }
    add_group(w, t, g, m0, R, lo32, hi32, acc);
  }
}

/* The VNNI layout on CPUs without VNNI: the 4 products of a lane's column go to two int16 sums (vpmaddubsw, each
 * |pair| <= 2 * max_code * 127: 3810 for 4-bit codes), added in int16 for up to `octets_per_flush` octets (two
 * pairs an octet: 4 octets of 4-bit codes, |sum| <= 4 * 2 * 3810 = 30480; 9 of 3-bit codes, 9 * 2 * 1778 = 32004,
 * so MLC's groups of 40 rows take one flush, not two; 21 of 2-bit codes), then widened to int32 (vpmaddwd with
 * ones). Each row's four activations are one 32-bit broadcast from memory, which the load port does alone
 * (tile_rows' 16-bit broadcasts need a shuffle each). The same exact integer sums. */
static inline int64_t octets_per_flush(int64_t max_code) { return 32767 / (4 * 127 * max_code); } /* 1..15 */

/* Octets j0..j1-1 of group g (at most octets_per_flush) for rows m0..m0+R-1 into int16 sums (lo16: columns 0..7,
 * hi16: 8..15 of the tile, each 32-bit lane's two int16 halves one column's). */
__attribute__((always_inline)) static inline void fours_int16(const Work *w, const uint8_t *b, int64_t g, int64_t j0,
                                                              int64_t j1, int64_t m0, const int R, __m256i *lo16,
                                                              __m256i *hi16) {
  const int64_t octets = w->group_size / 8, stride = w->groups * w->group_size;
  for (int r = 0; r < R; r++) lo16[r] = hi16[r] = _mm256_setzero_si256();
  for (int64_t j = j0; j < j1; j++) {
    if (R == 1) prefetch_ahead(b + (size_t)(g * octets + j) * 64); /* one token: ort_api.h */
    const Octet q = octet_codes(b + (size_t)(g * octets + j) * 64, 0);
    for (int r = 0; r < R; r++) {
      __m256i x0, x1;
      row_fours(w->xq + (m0 + r) * stride + g * w->group_size + 8 * j, &x0, &x1);
      lo16[r] = _mm256_add_epi16(lo16[r], _mm256_add_epi16(_mm256_maddubs_epi16(q.l0, x0),
                                                           _mm256_maddubs_epi16(q.h0, x1)));
      hi16[r] = _mm256_add_epi16(hi16[r], _mm256_add_epi16(_mm256_maddubs_epi16(q.l1, x0),
                                                           _mm256_maddubs_epi16(q.h1, x1)));
    }
  }
}

__attribute__((always_inline)) static inline void tile_rows_fours(const Work *w, int64_t t, int64_t m0, const int R,
                                                                 float *acc) {
  const int64_t octets = w->group_size / 8;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t *b = w->b + (size_t)t * w->groups * octets * 64;
  __m256i lo16[4], hi16[4], lo32[4], hi32[4];
  if (octets <= w->octets_per_flush) { /* one flush a group (4-bit: up to 32 rows), no int32 sums across octets */
    for (int64_t g = 0; g < w->groups; g++) {
      fours_int16(w, b, g, 0, rows_in(w, g, 8), m0, R, lo16, hi16);
      for (int r = 0; r < R; r++) {
        lo32[r] = _mm256_madd_epi16(lo16[r], ones);
        hi32[r] = _mm256_madd_epi16(hi16[r], ones);
      }
      add_group(w, t, g, m0, R, lo32, hi32, acc);
    }
    return;
  }
  for (int64_t g = 0; g < w->groups; g++) {
    for (int r = 0; r < R; r++) lo32[r] = hi32[r] = _mm256_setzero_si256();
    const int64_t used = rows_in(w, g, 8);
    for (int64_t j0 = 0; j0 < used; j0 += w->octets_per_flush) {
      fours_int16(w, b, g, j0, j0 + w->octets_per_flush < used ? j0 + w->octets_per_flush : used, m0, R, lo16,
                  hi16);
      for (int r = 0; r < R; r++) {
        lo32[r] = _mm256_add_epi32(lo32[r], _mm256_madd_epi16(lo16[r], ones));
        hi32[r] = _mm256_add_epi32(hi32[r], _mm256_madd_epi16(hi16[r], ones));
      }
    }
    add_group(w, t, g, m0, R, lo32, hi32, acc);
  }
}

/* FLOAT4E2M1 codes on CPUs without VNNI, one group (16 rows of K: two octets, one flush; zero point 12 for every
 * column), one row of A: its activations x (16), their sum and scale against the octets q0, q1 (looked up), the
 * group's float term added to lo (columns 0..7) and hi (8..15); s: the group's 16 scales. The same integers and
 * float32 operations, in the same order, as add_group's (and tile_rows_vnni's with VNNI), so the same results. */
__attribute__((always_inline)) static inline void add_e2m1_group(const Octet *q0, const Octet *q1, const int8_t *x,
                                                                 int32_t xsum, float sx, const float *s, __m256 *lo,
                                                                 __m256 *hi) {
  __m256i x0, x1, x2, x3;
  row_fours(x, &x0, &x1);
  row_fours(x + 8, &x2, &x3);
  const __m256i lo16 = _mm256_add_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(q0->l0, x0), _mm256_maddubs_epi16(q0->h0, x1)),
      _mm256_add_epi16(_mm256_maddubs_epi16(q1->l0, x2), _mm256_maddubs_epi16(q1->h0, x3)));
  const __m256i hi16 = _mm256_add_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(q0->l1, x0), _mm256_maddubs_epi16(q0->h1, x1)),
      _mm256_add_epi16(_mm256_maddubs_epi16(q1->l1, x2), _mm256_maddubs_epi16(q1->h1, x3)));
  const __m256i ones = _mm256_set1_epi16(1), offset = _mm256_set1_epi32(NVFP4_ZERO_POINT * xsum);
  const __m256 scale = _mm256_set1_ps(sx);
  const __m256i dlo = _mm256_sub_epi32(_mm256_madd_epi16(lo16, ones), offset);
  const __m256i dhi = _mm256_sub_epi32(_mm256_madd_epi16(hi16, ones), offset);
  *lo = _mm256_add_ps(*lo, _mm256_mul_ps(_mm256_cvtepi32_ps(dlo), _mm256_mul_ps(_mm256_loadu_ps(s), scale)));
  *hi = _mm256_add_ps(*hi, _mm256_mul_ps(_mm256_cvtepi32_ps(dhi), _mm256_mul_ps(_mm256_loadu_ps(s + 8), scale)));
}

/* One token on FLOAT4E2M1 codes: tile t's sums in registers, both streams (codes, scales) prefetched, no branch in
 * the loop (tile_rows_fours and add_group test the zero points' kind every group and kept the sums in memory): one
 * thread, 576 x 3072 in cache, 25.2 -> 36.3 Gweights/s (two tiles a pass, sharing the activations' broadcasts, was
 * slower). */
static void one_row_e2m1(const Work *w, int64_t t) {
  const uint8_t *b = w->b + (size_t)t * w->groups * 128;
  const float *s = w->scales + (size_t)t * w->groups * TILE;
  __m256 lo = _mm256_setzero_ps(), hi = lo;
  for (int64_t g = 0; g < w->groups; g++, b += 128, s += TILE) {
    prefetch_ahead(b);
    prefetch_ahead(b + 64);
    prefetch_ahead(s);
    const Octet q0 = octet_codes(b, 1), q1 = octet_codes(b + 64, 1);
    add_e2m1_group(&q0, &q1, w->xq + 16 * g, w->xsum[g], w->sx[g], s, &lo, &hi);
  }
  const int64_t n0 = t * TILE;
  store16(w->y + n0, lo, hi, w->n - n0 < TILE ? w->n - n0 : TILE);
}

/* Prompts on FLOAT4E2M1 codes: rows m0 .. m0 + rows - 1 (at most E2M1_ROWS) against tile t. Each group's octets are
 * looked up once into 8 registers, then each row in turn takes the whole group (the row loop not unrolled: two rows
 * at once spilled the codes), its sums in `acc` (L1). Against ROW_BLOCKS' blocks of 4 rows with int16 sums of
 * every row live across octets (spilled): a layer's four prompt linears, M = 128, two threads, 1.0 -> 1.27x ONNX
 * Runtime's float32 MatMul (8 rows a block: 1.22x). */
#define E2M1_ROWS 16
static void rows_e2m1(const Work *w, int64_t t, int64_t m0, int64_t rows) {
  const uint8_t *b = w->b + (size_t)t * w->groups * 128;
  const float *s = w->scales + (size_t)t * w->groups * TILE;
  const int64_t stride = w->groups * 16;
  __m256 acc[2 * E2M1_ROWS];
  for (int64_t r = 0; r < 2 * rows; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w->groups; g++, b += 128, s += TILE) {
    const Octet q0 = octet_codes(b, 1), q1 = octet_codes(b + 64, 1);
    _Pragma("GCC unroll 1")
    for (int64_t r = 0; r < rows; r++) {
      const int64_t row = (m0 + r) * w->groups + g;
      add_e2m1_group(&q0, &q1, w->xq + (m0 + r) * stride + 16 * g, w->xsum[row], w->sx[row], s, &acc[2 * r],
                     &acc[2 * r + 1]);
    }
  }
  const int64_t n0 = t * TILE, width = w->n - n0 < TILE ? w->n - n0 : TILE;
  for (int64_t r = 0; r < rows; r++) store16(w->y + (m0 + r) * w->n + n0, acc[2 * r], acc[2 * r + 1], width);
}

/* Layout 2 (8-bit codes): per pair of rows of K, 32 bytes, widened to int16 by in-lane unpacks with zeros (the
 * quarters' order o puts columns 0..7 in the low halves of the two 128-bit lanes), each 32-bit lane one column's
 * two rows, and vpmaddwd with the row's two activations as int16 (one 32-bit broadcast) adds both products into
 * int32: exact, |dot| <= G * 255 * 127. (Unpacking in lane instead of vpmovzxbw: prompts 8% faster.) */
__attribute__((always_inline)) static inline void tile_rows_bytes(const Work *w, int64_t t, int64_t m0, const int R,
                                                                 float *acc) {
  const int64_t pairs = w->group_size / 2, stride = w->groups * w->group_size;
  const uint8_t *b = w->b + (size_t)t * w->groups * pairs * 32;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t g = 0; g < w->groups; g++) {
    __m256i lo32[4], hi32[4];
    for (int r = 0; r < R; r++) lo32[r] = hi32[r] = _mm256_setzero_si256();
    for (int64_t p = 0; p < rows_in(w, g, 2); p++) {
      const __m256i v = _mm256_loadu_si256((const __m256i *)(b + (size_t)(g * pairs + p) * 32));
      if (R == 1 && (p & 1) == 0) prefetch_ahead(b + (size_t)(g * pairs + p) * 32); /* one token: ort_api.h */
      const __m256i c0 = _mm256_unpacklo_epi8(v, zero), c1 = _mm256_unpackhi_epi8(v, zero);
      for (int r = 0; r < R; r++) {
        int32_t two;
        memcpy(&two, w->xw + (m0 + r) * stride + g * w->group_size + 2 * p, 4);
        const __m256i x = _mm256_set1_epi32(two);
        lo32[r] = _mm256_add_epi32(lo32[r], _mm256_madd_epi16(c0, x));
        hi32[r] = _mm256_add_epi32(hi32[r], _mm256_madd_epi16(c1, x));
        /* Each row's sums pinned to registers here: without it GCC hoists all R rows' broadcasts and products
         * ahead of the sums and spills one sum to the stack, a store-to-load chain every pair (prompts 1.5x slower). */
        __asm__("" : "+x"(lo32[r]), "+x"(hi32[r]));
      }
    }
    add_group(w, t, g, m0, R, lo32, hi32, acc);
  }
}

static void run_tile_bytes(const Work *w, int64_t t) {
  ROW_BLOCKS(tile_rows_bytes);
}

/* Each copy with e2m1 constant (without VNNI, FLOAT4E2M1 codes take one_row_e2m1 and rows_e2m1). */
#define VNNI_CODES(w, t, m0, R, acc) tile_rows_vnni(w, t, m0, R, acc, 0)
#define VNNI_E2M1(w, t, m0, R, acc) tile_rows_vnni(w, t, m0, R, acc, 1)

static void run_tile_fours(const Work *w, int64_t t) {
  ROW_BLOCKS(tile_rows_fours);
}

VNNI_TARGET static void run_tile_vnni(const Work *w, int64_t t) {
  ROW_BLOCKS(VNNI_CODES);
}

VNNI_TARGET static void run_tile_vnni_e2m1(const Work *w, int64_t t) {
  ROW_BLOCKS(VNNI_E2M1);
}

static void run_tile(const Work *w, int64_t t) {
  if (w->layout == 2) {
    run_tile_bytes(w, t);
    return;
  }
  if (w->layout == 1) {
    if (w->dpbusd)
      (w->e2m1 ? run_tile_vnni_e2m1 : run_tile_vnni)(w, t);
    else if (w->e2m1 && w->m == 1)
      one_row_e2m1(w, t);
    else if (w->e2m1)
      for (int64_t m0 = 0; m0 < w->m; m0 += E2M1_ROWS)
        rows_e2m1(w, t, m0, w->m - m0 < E2M1_ROWS ? w->m - m0 : E2M1_ROWS);
    else
      run_tile_fours(w, t);
    return;
  }
  ROW_BLOCKS(tile_rows);
}

static void run_task(void *data, size_t task) {
  const Work *w = data;
  const int64_t tiles = w->n_pad / TILE, t0 = (int64_t)task * w->tiles_per_task;
  const int64_t t1 = t0 + w->tiles_per_task < tiles ? t0 + w->tiles_per_task : tiles;
  for (int64_t t = t0; t < t1; t++) run_tile(w, t);
}

/* Per row and group: the int8 activations, their scale and their sum. Eight values at a time: vcvtps2dq rounds to
 * nearest even as lrintf does (the default rounding mode), so the tail's scalar code gives the same integers. */
static void quantize_rows(const float *a, int64_t m, int64_t k, int64_t group_size, int64_t groups, int8_t *xq,
                          float *sx, int32_t *xsum) {
  const int64_t stride = groups * group_size;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
  for (int64_t i = 0; i < m; i++) {
    const float *x = a + i * k;
    int8_t *q = xq + i * stride;
    memset(q, 0, (size_t)stride);
    for (int64_t g = 0; g < groups; g++) {
      const int64_t k0 = g * group_size, k1 = k0 + group_size < k ? k0 + group_size : k;
      const int64_t k8 = k0 + (k1 - k0) / 8 * 8;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t kk = k0; kk < k8; kk += 8)  /* a NaN value is skipped (vmaxps returns vmax) */
        vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + kk), magnitude), vmax);
      float lanes[8];
      _mm256_storeu_ps(lanes, vmax);
      float amax = 0.0f;
      for (int l = 0; l < 8; l++) amax = lanes[l] > amax ? lanes[l] : amax;
      for (int64_t kk = k8; kk < k1; kk++) amax = fabsf(x[kk]) > amax ? fabsf(x[kk]) : amax;
      int32_t sum = 0;
      if (amax > 0.0f) {
        const float inv = 127.0f / amax;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i vsum = _mm256_setzero_si256();
        for (int64_t kk = k0; kk < k8; kk += 8) {
          __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + kk), vinv));
          v = _mm256_max_epi32(_mm256_min_epi32(v, top), bottom);
          vsum = _mm256_add_epi32(vsum, v);
          const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
          _mm_storel_epi64((__m128i *)(q + kk), _mm_packs_epi16(w16, w16));
        }
        int32_t parts[8];
        _mm256_storeu_si256((__m256i *)parts, vsum);
        for (int l = 0; l < 8; l++) sum += parts[l];
        for (int64_t kk = k8; kk < k1; kk++) {
          long v = lrintf(x[kk] * inv);
          v = v > 127 ? 127 : (v < -127 ? -127 : v);
          q[kk] = (int8_t)v;
          sum += (int32_t)v;
        }
      }
      sx[i * groups + g] = amax / 127.0f;
      xsum[i * groups + g] = sum;
    }
  }
}

void lowbit_nvfp4_activations(const float *x, int64_t blocks, float gs, int8_t *twice, float *steps);

/* activation 1: per row and block of 16 (the group), NVFP4's activations as integers (matmul_narrow_float.c: twice
 * each e2m1 value, -12..12), their scale (half the block's step) and their sum. */
static void quantize_rows_nvfp4(const float *a, int64_t m, int64_t k, float gs, int8_t *xq, float *sx,
                                int32_t *xsum) {
  const int64_t blocks = k / 16;
  lowbit_nvfp4_activations(a, m * blocks, gs, xq, sx);
  for (int64_t b = 0; b < m * blocks; b++) {
    int32_t sum = 0;
    for (int i = 0; i < 16; i++) sum += xq[b * 16 + i];
    xsum[b] = sum;
    sx[b] *= 0.5f;
  }
}

/* activation 2 (MatMulInt8Int8): the uint8 scale and zero point ONNX DynamicQuantizeLinear takes for all of A:
 * lo = min(0, min A), hi = max(0, max A), scale = hi == lo ? 1 : (hi - lo) / 255, zero point
 * z = rint(clamp(-lo / scale, 0, 255)) (half to even, float32 division). */
static void dynamic_uint8_range(const float *a, int64_t count, float *scale_out, float *zero_out) {
  const int64_t count8 = count / 8 * 8;
  __m256 vmin = _mm256_setzero_ps(), vmax = vmin;  /* the range includes 0 */
  for (int64_t i = 0; i < count8; i += 8) {
    const __m256 v = _mm256_loadu_ps(a + i);
    vmin = _mm256_min_ps(vmin, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  float mins[8], maxs[8], lo = 0.0f, hi = 0.0f;
  _mm256_storeu_ps(mins, vmin);
  _mm256_storeu_ps(maxs, vmax);
  for (int l = 0; l < 8; l++) {
    lo = mins[l] < lo ? mins[l] : lo;
    hi = maxs[l] > hi ? maxs[l] : hi;
  }
  for (int64_t i = count8; i < count; i++) {
    lo = a[i] < lo ? a[i] : lo;
    hi = a[i] > hi ? a[i] : hi;
  }
  const float scale = hi == lo ? 1.0f : (hi - lo) / 255.0f, start = -lo / scale;
  *scale_out = scale;
  *zero_out = nearbyintf(start < 0.0f ? 0.0f : (start > 255.0f ? 255.0f : start));
}

/* Activations 2 and 3 (MatMulInt8Int8): A quantized to uint8 with one scale and zero point z for the whole tensor, as
 * QuantizeLinear does: codes clamp(rint(A / scale) + z, 0, 255) (half to even, float32 division). xw holds the
 * codes minus z (int16, -255..255), per row and group with sx = scale and xsum their sum: then
 * float(dot - zw * xsum) * (s * scale) is ONNX Runtime's DynamicQuantizeMatMul (and its QDQ MatMul fusion): the
 * int32 sum times a_scale * b_scale. */
static void quantize_tensor_uint8(const float *a, int64_t m, int64_t k, int64_t group_size, int64_t groups,
                                  float scale, float zero, int16_t *xw, float *sx, int32_t *xsum) {
  const int64_t stride = groups * group_size;
  const __m256 vscale = _mm256_set1_ps(scale), bottom = _mm256_set1_ps(-zero), top = _mm256_set1_ps(255.0f - zero);
  for (int64_t i = 0; i < m; i++) {
    int16_t *q = xw + i * stride;
    memset(q, 0, sizeof(int16_t) * (size_t)stride);
    for (int64_t g = 0; g < groups; g++) {
      const int64_t k0 = g * group_size, k1 = k0 + group_size < k ? k0 + group_size : k, k8 = k0 + (k1 - k0) / 8 * 8;
      __m256i vsum = _mm256_setzero_si256();
      for (int64_t kk = k0; kk < k8; kk += 8) { /* clamping to [-z, 255 - z] before rounding: the same integers */
        const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(a + i * k + kk), vscale), bottom),
                                       top);
        const __m256i c = _mm256_cvtps_epi32(v); /* round half to even */
        vsum = _mm256_add_epi32(vsum, c);
        const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storeu_si128((__m128i *)(q + kk), c16);
      }
      int32_t parts[8], sum = 0;
      _mm256_storeu_si256((__m256i *)parts, vsum);
      for (int l = 0; l < 8; l++) sum += parts[l];
      for (int64_t kk = k8; kk < k1; kk++) {
        const float v = a[i * k + kk] / scale;
        const int32_t c = (int32_t)nearbyintf(v < -zero ? -zero : (v > 255.0f - zero ? 255.0f - zero : v));
        q[kk] = (int16_t)c;
        sum += c;
      }
      sx[i * groups + g] = scale;
      xsum[i * groups + g] = sum;
    }
  }
}

/* The activations' preparation for rows r0..r1-1 of A: quantized per the kernel's activation (into xq, or for uint8
 * activations straight into xw) with their scales and sums, and for 8-bit codes widened to int16 (xw). */
typedef struct {
  const Kernel *kernel;
  const float *a;
  int64_t m, k, groups, stride, rows_per_task;
  float scale, zero, gs; /* uint8 activations: their scale and zero point; NVFP4 activations: the global scale */
  int8_t *xq;
  int16_t *xw;
  float *sx;
  int32_t *xsum;
} Activations;

static void prepare_rows(const Activations *p, int64_t r0, int64_t r1) {
  const Kernel *kernel = p->kernel;
  const int64_t rows = r1 - r0, k = p->k, g = kernel->group_size, groups = p->groups, stride = p->stride;
  float *sx = p->sx + r0 * groups;
  int32_t *xsum = p->xsum + r0 * groups;
  if (kernel->activation >= 2) {
    quantize_tensor_uint8(p->a + r0 * k, rows, k, g, groups, p->scale, p->zero, p->xw + r0 * stride, sx, xsum);
    return;
  }
  int8_t *xq = p->xq + r0 * stride;
  if (kernel->activation)
    quantize_rows_nvfp4(p->a + r0 * k, rows, k, p->gs, xq, sx, xsum);
  else
    quantize_rows(p->a + r0 * k, rows, k, g, groups, xq, sx, xsum);
  if (p->xw == NULL) return;
  int16_t *xw = p->xw + r0 * stride;
  for (int64_t i = 0; i < rows * stride; i += 16)  /* a tail of 8 at most */
    if (i + 16 <= rows * stride)
      _mm256_storeu_si256((__m256i *)(xw + i), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xq + i))));
    else
      for (int64_t j = i; j < rows * stride; j++) xw[j] = xq[j];
}

static void prepare_task(void *data, size_t task) {
  const Activations *p = data;
  const int64_t r0 = (int64_t)task * p->rows_per_task, r1 = r0 + p->rows_per_task < p->m ? r0 + p->rows_per_task : p->m;
  prepare_rows(p, r0, r1);
}

/* Prompts prepare their activations in parallel tasks of this many values or more (one thread took a tenth of a
 * 128 x 576 x 576 call on two); fewer (a token) in the calling thread. */
#define PREPARE_TASK_VALUES 16384

/* An error of this kernel's op (MSG a string literal). */
#define OP_ERROR(kernel, MSG) \
  error((kernel)->layout == 2 ? "lowbit.cpu.MatMulInt8Int8: " MSG : "lowbit.cpu.MatMulInt4Int8: " MSG)

static OrtStatus *compute(void *state, OrtKernelContext *context) {
  const Kernel *kernel = state;
  const int64_t k = kernel->k, n = kernel->n, g = kernel->group_size, bytes = kernel->layout == 2;
  const int64_t groups = (k + g - 1) / g, n_pad = (n + TILE - 1) / TILE * TILE;
  const OrtValue *values[6];
  int64_t dims[6][8];
  size_t ranks[6];
  const int scaled_input = kernel->activation == 1 || kernel->activation == 3; /* input 4: input_scale */
  for (size_t i = 0; i < 6; i++)
    if (i < 4 || (i == 4 && scaled_input) || (i == 5 && kernel->float_zero_points))
      CHECK(input(context, i, &values[i], dims[i], &ranks[i]));
  if (ranks[0] < 1 || dims[0][ranks[0] - 1] != k) return OP_ERROR(kernel, "A's last dimension is not K");
  if (scaled_input && (ranks[4] > 1 || (ranks[4] == 1 && dims[4][0] != 1) || data_of(values[4]) == NULL))
    return OP_ERROR(kernel, "input_scale is not one value");
  const int64_t b_dims[4] = {n_pad / TILE, groups, bytes ? g / 2 : g / 4, 32};
  if (ranks[1] != 4 || memcmp(dims[1], b_dims, sizeof b_dims) != 0)
    return bytes ? OP_ERROR(kernel, "B is not [N_pad / 16, groups, group_size / 2, 32]")
                 : OP_ERROR(kernel, "B is not [N_pad / 16, groups, group_size / 4, 32]");
  const int uniform = ranks[3] == 1 && dims[3][0] == 1;
  for (size_t i = 2; i < (uniform ? 3 : 4); i++)
    if (ranks[i] != 3 || dims[i][0] != n_pad / TILE || dims[i][1] != groups || dims[i][2] != TILE)
      return OP_ERROR(kernel, "scales or zero_points are not [N_pad / 16, groups, 16]");
  if (kernel->float_zero_points && (ranks[5] != 3 || dims[5][0] != n_pad / TILE || dims[5][1] != groups ||
                                    dims[5][2] != TILE || data_of(values[5]) == NULL))
    return OP_ERROR(kernel, "float_zero_points are not [N_pad / 16, groups, 16]");
  int64_t m = 1, out_dims[8];
  for (size_t i = 0; i + 1 < ranks[0]; i++) {
    m *= dims[0][i];
    out_dims[i] = dims[0][i];
  }
  out_dims[ranks[0] - 1] = n;
  OrtValue *output;
  CHECK(API(KernelContext_GetOutput, KernelContextGetOutputFn)(context, 0, out_dims, ranks[0], &output));
  float *y = data_of(output);
  const float *a = data_of(values[0]);
  if (y == NULL || a == NULL) return OP_ERROR(kernel, "no tensor data");
  if (m == 0) return NULL;
  const int64_t stride = groups * g;
  const int uint8_input = kernel->activation >= 2; /* quantized straight into xw, no xq */
  int8_t *xq = uint8_input ? NULL : malloc((size_t)(m * stride));
  float *sx = malloc(sizeof(float) * (size_t)(m * groups));
  int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(m * groups));
  const int with_pairs = m == 1 && kernel->layout == 0; /* tile_rows' one-row case */
  __m256i *pairs = with_pairs ? aligned_alloc(32, sizeof(__m256i) * (size_t)(stride / 2)) : NULL;
  int16_t *xw = bytes ? malloc(sizeof(int16_t) * (size_t)(m * stride)) : NULL;
  const uint8_t *zero_points = data_of(values[3]);
  OrtStatus *status = NULL;
  if ((xq == NULL && !uint8_input) || sx == NULL || xsum == NULL || (with_pairs && pairs == NULL) ||
      (bytes && xw == NULL) || zero_points == NULL) {
    status = API(CreateStatus, CreateStatusFn)(ORT_RUNTIME_EXCEPTION, "lowbit.cpu: out of memory");
  } else {
    Activations prepared = {kernel, a, m, k, groups, stride, 1 + PREPARE_TASK_VALUES / k, 1.0f,
                            (float)kernel->input_zero_point, 0.0f, xq, xw, sx, xsum};
    if (kernel->activation == 3)
      prepared.scale = *(const float *)data_of(values[4]);
    else if (kernel->activation == 2)
      dynamic_uint8_range(a, m * k, &prepared.scale, &prepared.zero);
    else if (kernel->activation == 1)
      prepared.gs = *(const float *)data_of(values[4]);
    if (m <= prepared.rows_per_task)
      prepare_rows(&prepared, 0, m);
    else
      status = API(KernelContext_ParallelFor, KernelContextParallelForFn)(
          context, prepare_task, (size_t)((m + prepared.rows_per_task - 1) / prepared.rows_per_task), 0, &prepared);
    for (int64_t i = 0; pairs != NULL && i < stride / 2; i++) {
      int16_t pair;
      memcpy(&pair, xq + 2 * i, 2);
      pairs[i] = _mm256_set1_epi16(pair);
    }
    const int64_t tiles = n_pad / TILE, per_task = (tiles + TASKS - 1) / TASKS;
    Work work = {data_of(values[1]), data_of(values[2]), uniform ? NULL : zero_points, zero_points[0], xq, xw, pairs,
                 sx, xsum, y, m, n, n_pad, g, groups, k, per_task, kernel->layout, kernel->dpbusd, kernel->e2m1,
                 octets_per_flush(kernel->max_code),
                 kernel->float_zero_points ? data_of(values[5]) : NULL};
    if (status == NULL)
      status = API(KernelContext_ParallelFor, KernelContextParallelForFn)(context, run_task,
                                                                         (size_t)((tiles + per_task - 1) / per_task),
                                                                         0, &work);
  }
  free(xq);
  free(xw);
  free(pairs);
  free(sx);
  free(xsum);
  return status;
}

/* ----------------------------------------------------------------------------------------------- registration */

/* MatMulInt4Int8 (bytes 0: attribute layout 0 or 1) or MatMulInt8Int8 (bytes 1: layout 2). */
static OrtStatus *create(const OrtKernelInfo *info, const int bytes, void **out) {
  Kernel *kernel = NULL;
  OrtStatus *status = new_kernel(info, sizeof(Kernel),
                                 bytes ? "lowbit.cpu.MatMulInt8Int8: K and N must be positive"
                                       : "lowbit.cpu.MatMulInt4Int8: K and N must be positive",
                                 (void **)&kernel);
  if (status != NULL) return status;
  status = int_attribute(info, "group_size", &kernel->group_size, 0, 0);
  const int64_t multiple = bytes ? 2 : 4;
  if (status == NULL && (kernel->group_size < multiple || kernel->group_size % multiple != 0))
    status = bytes ? error("lowbit.cpu.MatMulInt8Int8: group_size must be a positive even number")
                   : error("lowbit.cpu.MatMulInt4Int8: group_size must be a positive multiple of 4");
  if (status == NULL && !bytes) status = int_attribute(info, "layout", &kernel->layout, 1, 0); /* optional: AVX2 */
  if (status == NULL && !bytes && kernel->layout != 0 && kernel->layout != 1)
    status = error("lowbit.cpu.MatMulInt4Int8: layout must be 0 (AVX2) or 1 (VNNI)");
  if (status == NULL && kernel->layout == 1 && kernel->group_size % 8 != 0)
    status = error("lowbit.cpu.MatMulInt4Int8: layout 1 needs a group_size multiple of 8");
  if (bytes) kernel->layout = 2;
  if (status == NULL) status = int_attribute(info, "activation", &kernel->activation, 1, 0);
  if (status == NULL && !(kernel->activation == 0 || ((kernel->activation == 2 || kernel->activation == 3) && bytes) ||
                          (kernel->activation == 1 && kernel->group_size == 16 && kernel->k % 16 == 0)))
    status = bytes ? OP_ERROR(kernel, "activation must be 0 (int8), 1 (NVFP4: group_size 16, K a multiple of 16), 2 "
                                      "(uint8 per tensor, DynamicQuantizeLinear) or 3 (uint8, QuantizeLinear)")
                   : OP_ERROR(kernel, "activation must be 0 (int8) or 1 (NVFP4: group_size 16, K a multiple of 16)");
  if (status == NULL && kernel->activation == 3)
    status = int_attribute(info, "input_zero_point", &kernel->input_zero_point, 0, 0);
  if (status == NULL) status = int_attribute(info, "float_zero_points", &kernel->float_zero_points, 1, 0);
  if (status == NULL && kernel->float_zero_points != 0 && kernel->float_zero_points != 1)
    status = OP_ERROR(kernel, "float_zero_points must be 0 or 1");
  if (status == NULL && kernel->activation == 3 && (kernel->input_zero_point < 0 || kernel->input_zero_point > 255))
    status = OP_ERROR(kernel, "input_zero_point must be 0..255");
  if (status == NULL && !bytes) status = int_attribute(info, "e2m1", &kernel->e2m1, 1, 0);
  if (status == NULL) status = int_attribute(info, "max_code", &kernel->max_code, 1, 15);
  if (status == NULL && (kernel->max_code < 1 || kernel->max_code > 15 || (kernel->e2m1 && kernel->max_code != 15)))
    status = OP_ERROR(kernel, "max_code must be 1..15 (15 with e2m1)");
  /* int16 sums of vpmaddubsw: 2 octets of 2 pairs of products <= 24 * 127 each: 24384 */
  if (status == NULL && kernel->e2m1 != 0 && (kernel->e2m1 != 1 || kernel->layout != 1 || kernel->group_size != 16))
    status = error("lowbit.cpu.MatMulInt4Int8: e2m1 must be 0 or 1 (FLOAT4E2M1 codes: layout 1, group_size 16)");
  const char *avx512 = getenv("LOWBIT_KERNELS_AVX512");  /* "0": no AVX-512 instructions (tests of both paths) */
  kernel->dpbusd = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                   !(avx512 != NULL && strcmp(avx512, "0") == 0);
  if (status != NULL) {
    free(kernel);
    return status;
  }
  *out = kernel;
  return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const OrtApi *unused, const OrtKernelInfo *info, void **out) {
  (void)op;
  (void)unused;
  return create(info, 0, out);
}

static OrtStatus *create_kernel_bytes(const CustomOp *op, const OrtApi *unused, const OrtKernelInfo *info,
                                      void **out) {
  (void)op;
  (void)unused;
  return create(info, 1, out);
}

static const char *op_name(const CustomOp *op) { (void)op; return "MatMulInt4Int8"; }
static const char *op_name_bytes(const CustomOp *op) { (void)op; return "MatMulInt8Int8"; }
static int op_input_type(const CustomOp *op, size_t index) {
  (void)op;
  return index == 1 || index == 3 ? TYPE_UINT8 : TYPE_FLOAT;
}
static size_t op_input_count(const CustomOp *op) { (void)op; return 6; }
static int input_characteristic(const CustomOp *op, size_t index) {
  (void)op;
  return index >= 4 ? OPTIONAL : REQUIRED;
}

LOWBIT_CPU_OP(lowbit_matmul_int4_int8, op_name, op_input_type, op_input_count, input_characteristic, create_kernel,
              compute);
LOWBIT_CPU_OP(lowbit_matmul_int8_int8, op_name_bytes, op_input_type, op_input_count, input_characteristic,
              create_kernel_bytes, compute);
