/* lowbit.cpu.GroupQueryAttention: com.microsoft.GroupQueryAttention's float32 attention, as lowbit's converter emits
 * it, as an ONNX Runtime custom op (custom_ops/group_query_attention.py holds the contract and the numpy reference).
 *
 * Inputs (ORT's order): 0 query [B, S, Hq*D] or packed [B, S, (Hq + 2 Hkv) * D]; 1 key, 2 value [B, S, Hkv*D]
 * (optional: absent with a packed query); 3 past_key, 4 past_value [B, Hkv, L, D]; 5 seqlens_k int32 [B];
 * 6 total_sequence_length int32 (one value); 7 cos_cache, 8 sin_cache [P, R/2] (with do_rotary); 9 position_ids
 * (must be absent); 10 attention_bias [B or 1, Hq or 1, S, T] (optional). Outputs: output [B, S, Hq*D];
 * present_key, present_value [B, Hkv, max(L, T), D], written in place where ORT binds them to the past's buffer.
 * Attributes: num_heads, kv_num_heads, scale (0: 1/sqrt(D)), softcap (0: none), local_window_size (<= 0: none),
 * do_rotary (non-interleaved).
 *
 * Two passes, each split into tasks for ORT's thread pool: (1) per new token, its query heads rotated into a
 * scratch copy and its key and value heads (keys rotated) written into the present at their positions; (2) per
 * KV head, block of new tokens and chunk of keys, each token's attention for the KV head's query heads (three at a
 * time, each key row loaded once for them): scores 4 keys at a time (8-wide fused multiply-adds along D, one
 * horizontal reduction for the 4), softcap, bias, the row's max, exp (an 8-wide polynomial), and the weighted sum
 * of the values, divided once by the weights' sum. Only the keys a token sees are read (causal, window). One new
 * token splits its keys into chunks (flash-decoding): each chunk's max, sum and weighted values, combined into one
 * softmax at the end. A row whose every score is the float32 minimum (every key masked by the bias) outputs zeros,
 * or with a softcap the values' mean, as ORT's node does. */

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ort_api.h"
#include "simd.h"

enum { TYPE_INT32 = 6 };
enum { IN_QUERY, IN_KEY, IN_VALUE, IN_PAST_KEY, IN_PAST_VALUE, IN_SEQLENS, IN_TOTAL, IN_COS, IN_SIN, IN_POSITIONS,
       IN_BIAS, INPUT_COUNT };
#define QUERY_BLOCK 8   /* new tokens per task of the attention pass */
#define HEADS_AT_ONCE 3 /* query heads of one KV head scored together: each key row loaded once for them */
#define ONE_TOKEN_TASKS 8 /* one new token: the keys split into chunks until batch x KV heads x chunks reaches this */
#define MIN_CHUNK 64      /* ... keeping at least this many keys a chunk */

typedef struct {
  int64_t num_heads, kv_num_heads, window, rotary;
  float scale, softcap;
} Kernel;

typedef struct {
  const Kernel *kernel;
  int64_t batch, seq, d, total, present_len, half; /* half: R / 2, the rotary pairs per head (0: no rotary) */
  const float *q, *k, *v;                          /* each token's first query / key / value head */
  int64_t q_row, kv_row;                           /* floats from one token to the next: queries, keys and values */
  const int32_t *seqlens;
  const float *cos, *sin;
  const float *bias;
  int64_t bias_batch, bias_head; /* the bias's strides for b and h (0: broadcast) */
  float *rotated;                /* [B, S, Hq, D] rotated queries (NULL: the queries as they come) */
  float *present_k, *present_v, *out;
  float scale;
  int64_t chunks;    /* key chunks a task covers one of (one new token; else 1) */
  float *partials;   /* chunks > 1: [B, Hq, chunks, 2 + D] each chunk's top, sum and weighted values */
  int out_of_memory; /* set by a task that could not allocate its scores */
} Work;

static inline int64_t first_position(const Work *w, int64_t b) { return (int64_t)w->seqlens[b] + 1 - w->seq; }

/* dst[0 .. D) = src rotated at position p (the first 2 * half dims; the rest copied). */
static void rotate(const Work *w, const float *src, float *dst, int64_t p) {
  const float *c = w->cos + p * w->half, *s = w->sin + p * w->half;
  const int64_t h = w->half;
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 x1 = _mm256_loadu_ps(src + i), x2 = _mm256_loadu_ps(src + h + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(dst + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
    _mm256_storeu_ps(dst + h + i, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
  }
  for (; i < h; i++) {
    const float x1 = src[i], x2 = src[h + i];
    dst[i] = x1 * c[i] - x2 * s[i];
    dst[h + i] = x2 * c[i] + x1 * s[i];
  }
  memcpy(dst + 2 * h, src + 2 * h, sizeof(float) * (size_t)(w->d - 2 * h));
}

/* Pass 1, task = one new token (b, s). */
static void store_token(void *data, size_t task) {
  const Work *w = data;
  const Kernel *kn = w->kernel;
  const int64_t b = (int64_t)task / w->seq, s = (int64_t)task % w->seq, d = w->d;
  const int64_t p = first_position(w, b) + s;
  const float *q = w->q + (b * w->seq + s) * w->q_row, *k = w->k + (b * w->seq + s) * w->kv_row;
  const float *v = w->v + (b * w->seq + s) * w->kv_row;
  if (w->rotated != NULL)
    for (int64_t h = 0; h < kn->num_heads; h++)
      rotate(w, q + h * d, w->rotated + ((b * w->seq + s) * kn->num_heads + h) * d, p);
  for (int64_t h = 0; h < kn->kv_num_heads; h++) {
    float *pk = w->present_k + ((b * kn->kv_num_heads + h) * w->present_len + p) * d;
    float *pv = w->present_v + ((b * kn->kv_num_heads + h) * w->present_len + p) * d;
    if (w->half)
      rotate(w, k + h * d, pk, p);
    else
      memcpy(pk, k + h * d, sizeof(float) * (size_t)d);
    memcpy(pv, v + h * d, sizeof(float) * (size_t)d);
  }
}

/* e^x, 8 at a time: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, times 2^n; 0 below -87.3
 * (where 2^n would leave float32's normal range). */
static inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

static inline float sum8(__m256 x) {
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

/* scores[h * stride + j] = q[h] . keys[j] for h < H, j < n (D a multiple of 8): four keys a pass, each key row
 * loaded once for the H query heads. */
__attribute__((always_inline)) static inline void dot_keys(const float *const *q, const int H, const float *keys,
                                                           int64_t n, float *scores, int64_t stride, const int64_t d) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *k0 = keys + j * d;
    __m256 a[HEADS_AT_ONCE][4];
    for (int h = 0; h < H; h++)
      for (int c = 0; c < 4; c++) a[h][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 y0 = _mm256_loadu_ps(k0 + i), y1 = _mm256_loadu_ps(k0 + d + i);
      const __m256 y2 = _mm256_loadu_ps(k0 + 2 * d + i), y3 = _mm256_loadu_ps(k0 + 3 * d + i);
      for (int h = 0; h < H; h++) {
        const __m256 x = _mm256_loadu_ps(q[h] + i);
        a[h][0] = _mm256_fmadd_ps(x, y0, a[h][0]);
        a[h][1] = _mm256_fmadd_ps(x, y1, a[h][1]);
        a[h][2] = _mm256_fmadd_ps(x, y2, a[h][2]);
        a[h][3] = _mm256_fmadd_ps(x, y3, a[h][3]);
      }
    }
    for (int h = 0; h < H; h++) {
      const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
      _mm_storeu_ps(scores + h * stride + j, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    }
  }
  for (; j < n; j++)
    for (int h = 0; h < H; h++) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + i), _mm256_loadu_ps(keys + j * d + i), a);
      scores[h * stride + j] = sum8(a);
    }
}

/* out[0 .. D) = sum_j weights[j] * values[j] * factor, j < n. */
__attribute__((always_inline)) static inline void weigh_values(const float *weights, const float *values, int64_t n,
                                                               float factor, float *out, const int64_t d) {
  for (int64_t i0 = 0; i0 < d; i0 += 64) { /* 8 accumulators of 8 columns at a time */
    const int64_t width = d - i0 < 64 ? d - i0 : 64;
    __m256 acc[8];
    for (int a = 0; a < 8; a++) acc[a] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
      const __m256 x = _mm256_broadcast_ss(weights + j);
      const float *row = values + j * d + i0;
      for (int a = 0; a < 8; a++)
        if (8 * a < width) acc[a] = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 8 * a), acc[a]);
    }
    const __m256 f = _mm256_set1_ps(factor);
    for (int a = 0; a < 8; a++)
      if (8 * a < width) _mm256_storeu_ps(out + i0 + 8 * a, _mm256_mul_ps(acc[a], f));
  }
}

/* One head's raw dots scores[0 .. n) -> the weights e^(score - top) in place (score = scale * dot, softcapped, plus
 * `bias`); returns the sum of the weights and sets *top. Room for n rounded up to 8. */
static inline float exponentiate(const Work *w, float *scores, int64_t n, const float *bias, float *top_out) {
  const Kernel *kn = w->kernel;
  const int64_t n8 = n / 8 * 8;
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  if (kn->softcap <= 0.0f) { /* score * scale + bias, 8 at a time */
    const __m256 f = _mm256_set1_ps(w->scale);
    for (int64_t j = 0; j < n8; j += 8) {
      __m256 x = _mm256_mul_ps(_mm256_loadu_ps(scores + j), f);
      if (bias != NULL) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + j));
      _mm256_storeu_ps(scores + j, x);
      top8 = _mm256_max_ps(top8, x);
    }
  }
  float top = max8(top8);
  for (int64_t j = kn->softcap <= 0.0f ? n8 : 0; j < n; j++) {
    float x = scores[j] * w->scale;
    if (kn->softcap > 0.0f) x = kn->softcap * tanhf(x / kn->softcap);
    if (bias != NULL) x += bias[j];
    scores[j] = x;
    top = x > top ? x : top;
  }
  *top_out = top;
  if (n == 0) return 0.0f;
  for (int64_t j = n; j < (n + 7) / 8 * 8; j++) scores[j] = -INFINITY;
  const __m256 m = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m));
    _mm256_storeu_ps(scores + j, e);
    sums = _mm256_add_ps(sums, e);
  }
  return sum8(sums);
}

/* Whether a row whose largest score is `top` outputs zeros: every key masked by the bias (the float32 minimum),
 * without a softcap (with one, ORT's node weighs such keys equally, as the weights above do). */
static inline int masked_row(const Work *w, float top) { return top <= -FLT_MAX && w->kernel->softcap <= 0.0f; }

/* Token s of row b, keys k0 .. k1-1 of those it sees, query heads h0 .. h0+H-1 (of one KV head): each head's
 * output, or with chunks its partial (top, sum, unnormalized weighted values). `scores`: H rows of `stride`. */
__attribute__((always_inline)) static inline void attend(const Work *w, int64_t b, int64_t s, int64_t h0, const int H,
                                                         int64_t k0, int64_t k1, int64_t chunk, float *scores,
                                                         int64_t stride, const int64_t d) {
  const Kernel *kn = w->kernel;
  const int64_t kv = (b * kn->kv_num_heads + h0 / (kn->num_heads / kn->kv_num_heads)) * w->present_len + k0;
  const int64_t n = k1 > k0 ? k1 - k0 : 0;
  const float *q[HEADS_AT_ONCE];
  for (int h = 0; h < H; h++)
    q[h] = w->rotated != NULL ? w->rotated + ((b * w->seq + s) * kn->num_heads + h0 + h) * d
                              : w->q + (b * w->seq + s) * w->q_row + (h0 + h) * d;
  dot_keys(q, H, w->present_k + kv * d, n, scores, stride, d);
  for (int h = 0; h < H; h++) {
    const float *bias = w->bias != NULL ? w->bias + b * w->bias_batch + (h0 + h) * w->bias_head + s * w->total + k0
                                        : NULL;
    float top;
    const float sum = exponentiate(w, scores + h * stride, n, bias, &top);
    if (w->chunks > 1) { /* b, h, chunk: top, sum, then D floats */
      float *partial = w->partials + ((b * kn->num_heads + h0 + h) * w->chunks + chunk) * (d + 2);
      partial[0] = top;
      partial[1] = sum;
      weigh_values(scores + h * stride, w->present_v + kv * d, n, 1.0f, partial + 2, d);
      continue;
    }
    float *out = w->out + (b * w->seq + s) * kn->num_heads * d + (h0 + h) * d;
    if (masked_row(w, top))
      memset(out, 0, sizeof(float) * (size_t)d);
    else
      weigh_values(scores + h * stride, w->present_v + kv * d, n, 1.0f / sum, out, d);
  }
}

#define ATTEND_HEADS(H)                                                                       \
  do {                                                                                        \
    if (w->d == 64)                                                                           \
      attend(w, b, s, h0, H, k0, k1, chunk, scores, stride, 64);                              \
    else if (w->d == 128)                                                                     \
      attend(w, b, s, h0, H, k0, k1, chunk, scores, stride, 128);                             \
    else                                                                                      \
      attend(w, b, s, h0, H, k0, k1, chunk, scores, stride, w->d);                            \
  } while (0)

/* Pass 2, task = one KV head's query heads, a block of QUERY_BLOCK new tokens and a chunk of the keys. */
static void attend_task(void *data, size_t task) {
  const Work *w = data;
  const Kernel *kn = w->kernel;
  const int64_t blocks = (w->seq + QUERY_BLOCK - 1) / QUERY_BLOCK, group = kn->num_heads / kn->kv_num_heads;
  int64_t rest = (int64_t)task;
  const int64_t chunk = rest % w->chunks;
  rest /= w->chunks;
  const int64_t s0 = rest % blocks * QUERY_BLOCK;
  rest /= blocks;
  const int64_t g = rest % kn->kv_num_heads, b = rest / kn->kv_num_heads;
  const int64_t s1 = s0 + QUERY_BLOCK < w->seq ? s0 + QUERY_BLOCK : w->seq;
  const int64_t stride = w->total + 8;
  float *scores = malloc(sizeof(float) * (size_t)(HEADS_AT_ONCE * stride));
  if (scores == NULL) {
    __atomic_store_n(&((Work *)data)->out_of_memory, 1, __ATOMIC_RELAXED);
    return;
  }
  for (int64_t s = s0; s < s1; s++) {
    const int64_t p = first_position(w, b) + s;
    const int64_t lo = kn->window > 0 && p - kn->window + 1 > 0 ? p - kn->window + 1 : 0;
    const int64_t size = (p + 1 - lo + w->chunks - 1) / w->chunks;
    const int64_t k0 = lo + chunk * size, k1 = k0 + size < p + 1 ? k0 + size : p + 1;
    for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += HEADS_AT_ONCE) {
      const int64_t left = (g + 1) * group - h0;
      if (left >= 3)
        ATTEND_HEADS(3);
      else if (left == 2)
        ATTEND_HEADS(2);
      else
        ATTEND_HEADS(1);
    }
  }
  free(scores);
}

/* With key chunks (one new token): each head's output from its chunks' partials, as one softmax over all keys. */
static void combine_chunks(const Work *w) {
  const int64_t d = w->d, heads = w->batch * w->kernel->num_heads;
  for (int64_t bh = 0; bh < heads; bh++) {
    const float *part = w->partials + bh * w->chunks * (d + 2);
    float top = -INFINITY, total = 0.0f;
    for (int64_t c = 0; c < w->chunks; c++) top = part[c * (d + 2)] > top ? part[c * (d + 2)] : top;
    float *out = w->out + bh * d; /* one new token: out[b, 0, h] */
    memset(out, 0, sizeof(float) * (size_t)d);
    if (masked_row(w, top)) continue;
    for (int64_t c = 0; c < w->chunks; c++) {
      const float *p = part + c * (d + 2);
      if (p[1] == 0.0f) continue; /* no keys in this chunk */
      const float f = expf(p[0] - top);
      total += f * p[1];
      const __m256 f8 = _mm256_set1_ps(f);
      for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(f8, _mm256_loadu_ps(p + 2 + i), _mm256_loadu_ps(out + i)));
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / total);
    for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), inverse));
  }
}

static OrtStatus *get_output(OrtKernelContext *context, size_t index, const int64_t *dims, size_t rank, float **out) {
  OrtValue *value;
  CHECK(API(KernelContext_GetOutput, KernelContextGetOutputFn)(context, index, dims, rank, &value));
  *out = data_of(value);
  return *out == NULL ? error("lowbit.cpu.GroupQueryAttention: an output has no data") : NULL;
}

/* An optional input: *value NULL where absent. */
static OrtStatus *optional_input(OrtKernelContext *context, size_t index, const OrtValue **value, int64_t *dims,
                                 size_t *rank) {
  CHECK(API(KernelContext_GetInput, KernelContextGetInputFn)(context, index, value));
  *rank = 0;
  return *value == NULL ? NULL : input(context, index, value, dims, rank);
}

#define FAIL(message) return error("lowbit.cpu.GroupQueryAttention: " message)

static OrtStatus *compute(void *state, OrtKernelContext *context) {
  const Kernel *kn = state;
  const OrtValue *values[INPUT_COUNT];
  int64_t dims[INPUT_COUNT][8];
  size_t rank[INPUT_COUNT];
  for (size_t i = 0; i < INPUT_COUNT; i++) CHECK(optional_input(context, i, &values[i], dims[i], &rank[i]));
  const int64_t hq = kn->num_heads, hkv = kn->kv_num_heads;
  const int packed = values[IN_KEY] == NULL;
  if (values[IN_QUERY] == NULL || values[IN_PAST_KEY] == NULL || values[IN_PAST_VALUE] == NULL ||
      values[IN_SEQLENS] == NULL || values[IN_TOTAL] == NULL)
    FAIL("query, past_key, past_value, seqlens_k and total_sequence_length are required");
  if (packed != (values[IN_VALUE] == NULL)) FAIL("key and value come together");
  if (values[IN_POSITIONS] != NULL) FAIL("position_ids are not supported (rotary by the sequence lengths)");
  if (rank[IN_QUERY] != 3 || rank[IN_PAST_KEY] != 4 || rank[IN_PAST_VALUE] != 4) FAIL("query is 3-D, the past 4-D");
  const int64_t batch = dims[IN_QUERY][0], seq = dims[IN_QUERY][1];
  const int64_t d = dims[IN_QUERY][2] / (packed ? hq + 2 * hkv : hq);
  if (d < 8 || d % 8 || dims[IN_QUERY][2] != d * (packed ? hq + 2 * hkv : hq))
    FAIL("head size must be a multiple of 8");
  if (!packed && (rank[IN_KEY] != 3 || rank[IN_VALUE] != 3 || dims[IN_KEY][0] != batch || dims[IN_KEY][1] != seq ||
                  dims[IN_KEY][2] != hkv * d || memcmp(dims[IN_KEY], dims[IN_VALUE], 3 * sizeof(int64_t))))
    FAIL("key and value must be [B, S, kv_num_heads * D]");
  const int64_t past_len = dims[IN_PAST_KEY][2];
  if (dims[IN_PAST_KEY][0] != batch || dims[IN_PAST_KEY][1] != hkv || dims[IN_PAST_KEY][3] != d ||
      memcmp(dims[IN_PAST_KEY], dims[IN_PAST_VALUE], 4 * sizeof(int64_t)))
    FAIL("past_key and past_value must be [B, kv_num_heads, L, D]");
  int64_t count = 1;
  for (size_t i = 0; i < rank[IN_SEQLENS]; i++) count *= dims[IN_SEQLENS][i];
  if (count != batch) FAIL("seqlens_k holds one length per row");
  const int32_t *seqlens = data_of(values[IN_SEQLENS]);
  const int64_t total = *(const int32_t *)data_of(values[IN_TOTAL]);
  if (total != past_len + seq && total > past_len)
    FAIL("total_sequence_length must be past_sequence_length + S (a growing cache) or at most past_sequence_length "
         "(a buffer of fixed capacity)");
  const int64_t present_len = past_len > total ? past_len : total;
  for (int64_t b = 0; b < batch; b++)
    if (seqlens[b] + 1 < seq || seqlens[b] + 1 > total) FAIL("seqlens_k[b] + 1 must lie in [S, total_sequence_length]");
  int64_t half = 0;
  const float *cos = NULL, *sin = NULL;
  if (kn->rotary) {
    if (values[IN_COS] == NULL || values[IN_SIN] == NULL || rank[IN_COS] != 2 ||
        memcmp(dims[IN_COS], dims[IN_SIN], 2 * sizeof(int64_t)) || 2 * dims[IN_COS][1] > d)
      FAIL("do_rotary needs cos_cache and sin_cache [P, R / 2], R <= D");
    if (total > dims[IN_COS][0]) FAIL("positions past the end of cos_cache");
    half = dims[IN_COS][1];
    cos = data_of(values[IN_COS]);
    sin = data_of(values[IN_SIN]);
  }
  const float *bias = NULL;
  int64_t bias_batch = 0, bias_head = 0;
  if (values[IN_BIAS] != NULL) {
    const int64_t *bd = dims[IN_BIAS];
    if (rank[IN_BIAS] != 4 || (bd[0] != 1 && bd[0] != batch) || (bd[1] != 1 && bd[1] != hq) || bd[2] != seq ||
        bd[3] != total)
      FAIL("attention_bias must be [B or 1, num_heads or 1, S, total_sequence_length]");
    bias = data_of(values[IN_BIAS]);
    bias_head = bd[1] == 1 ? 0 : seq * total;
    bias_batch = bd[0] == 1 ? 0 : bd[1] * seq * total;
  }
  const int64_t out_dims[3] = {batch, seq, hq * d}, present_dims[4] = {batch, hkv, present_len, d};
  Work w = {kn, batch, seq, d, total, present_len, half, NULL, NULL, NULL, 0, 0, seqlens, cos, sin, bias,
            bias_batch, bias_head, NULL, NULL, NULL, NULL, kn->scale > 0.0f ? kn->scale : 1.0f / sqrtf((float)d),
            1, NULL, 0};
  CHECK(get_output(context, 0, out_dims, 3, &w.out));
  CHECK(get_output(context, 1, present_dims, 4, &w.present_k));
  CHECK(get_output(context, 2, present_dims, 4, &w.present_v));
  const float *query = data_of(values[IN_QUERY]);
  w.q = query;
  w.q_row = dims[IN_QUERY][2];
  w.k = packed ? query + hq * d : data_of(values[IN_KEY]);
  w.v = packed ? query + (hq + hkv) * d : data_of(values[IN_VALUE]);
  w.kv_row = packed ? w.q_row : hkv * d;
  const float *past[2] = {data_of(values[IN_PAST_KEY]), data_of(values[IN_PAST_VALUE])};
  float *present[2] = {w.present_k, w.present_v};
  for (int kv = 0; kv < 2; kv++) /* a present of its own: the past's positions before the new tokens, zeros after */
    if (present[kv] != past[kv])
      for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < hkv; h++) {
          const int64_t keep = first_position(&w, b) < past_len ? first_position(&w, b) : past_len;
          float *to = present[kv] + (b * hkv + h) * present_len * d;
          memcpy(to, past[kv] + (b * hkv + h) * past_len * d, sizeof(float) * (size_t)(keep * d));
          memset(to + keep * d, 0, sizeof(float) * (size_t)((present_len - keep) * d));
        }
  if (seq == 1) { /* one token: enough tasks for the threads by splitting the keys */
    const int64_t keys = total < kn->window || kn->window <= 0 ? total : kn->window;
    const int64_t want = (ONE_TOKEN_TASKS + batch * hkv - 1) / (batch * hkv), most = keys / MIN_CHUNK;
    w.chunks = want < most ? want : most > 1 ? most : 1;
  }
  float *scratch = half ? malloc(sizeof(float) * (size_t)(batch * seq * hq * d)) : NULL;
  w.partials = w.chunks > 1 ? malloc(sizeof(float) * (size_t)(batch * hq * w.chunks * (d + 2))) : NULL;
  if ((half && scratch == NULL) || (w.chunks > 1 && w.partials == NULL)) {
    free(scratch);
    free(w.partials);
    return API(CreateStatus, CreateStatusFn)(ORT_RUNTIME_EXCEPTION, "lowbit.cpu: out of memory");
  }
  w.rotated = scratch;
  OrtStatus *status = NULL;
  if (batch * seq == 1)
    store_token(&w, 0);
  else
    status = API(KernelContext_ParallelFor, KernelContextParallelForFn)(context, store_token, (size_t)(batch * seq),
                                                                       0, &w);
  const int64_t tasks = batch * hkv * ((seq + QUERY_BLOCK - 1) / QUERY_BLOCK) * w.chunks;
  if (status == NULL)
    status = API(KernelContext_ParallelFor, KernelContextParallelForFn)(context, attend_task, (size_t)tasks, 0, &w);
  if (status == NULL && w.out_of_memory)
    status = API(CreateStatus, CreateStatusFn)(ORT_RUNTIME_EXCEPTION, "lowbit.cpu: out of memory");
  if (status == NULL && w.chunks > 1) combine_chunks(&w);
  free(scratch);
  free(w.partials);
  return status;
}

/* ---------------------------------------------------------------------------------------------- registration */

typedef OrtStatus *(*KernelInfoGetAttributeFloatFn)(const OrtKernelInfo *info, const char *name, float *out);

static OrtStatus *float_attribute(const OrtKernelInfo *info, const char *name, float *out) {
  OrtStatus *status = API(KernelInfoGetAttribute_float, KernelInfoGetAttributeFloatFn)(info, name, out);
  if (status != NULL) { /* absent: 0 */
    API(ReleaseStatus, ReleaseStatusFn)(status);
    *out = 0.0f;
  }
  return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const OrtApi *unused, const OrtKernelInfo *info, void **out) {
  (void)op;
  (void)unused;
  Kernel *kn = calloc(1, sizeof(Kernel));
  if (kn == NULL) return API(CreateStatus, CreateStatusFn)(ORT_RUNTIME_EXCEPTION, "out of memory");
  OrtStatus *status = int_attribute(info, "num_heads", &kn->num_heads, 0, 0);
  if (status == NULL) status = int_attribute(info, "kv_num_heads", &kn->kv_num_heads, 0, 0);
  if (status == NULL) status = int_attribute(info, "local_window_size", &kn->window, 1, -1);
  if (status == NULL) status = int_attribute(info, "do_rotary", &kn->rotary, 1, 0);
  if (status == NULL) status = float_attribute(info, "scale", &kn->scale);
  if (status == NULL) status = float_attribute(info, "softcap", &kn->softcap);
  if (status == NULL && (kn->num_heads < 1 || kn->kv_num_heads < 1 || kn->num_heads % kn->kv_num_heads))
    status = error("lowbit.cpu.GroupQueryAttention: num_heads must be a positive multiple of kv_num_heads");
  if (status != NULL) {
    free(kn);
    return status;
  }
  *out = kn;
  return NULL;
}

static const char *op_name(const CustomOp *op) { (void)op; return "GroupQueryAttention"; }
static int op_input_type(const CustomOp *op, size_t index) {
  (void)op;
  return index == IN_SEQLENS || index == IN_TOTAL ? TYPE_INT32 : TYPE_FLOAT;
}
static size_t op_input_count(const CustomOp *op) { (void)op; return INPUT_COUNT; }
static int input_characteristic(const CustomOp *op, size_t index) {
  (void)op;
  return index == IN_QUERY || index == IN_PAST_KEY || index == IN_PAST_VALUE || index == IN_SEQLENS ||
                 index == IN_TOTAL ? REQUIRED : OPTIONAL;
}
static size_t three_outputs(const CustomOp *op) { (void)op; return 3; }

const CustomOp lowbit_group_query_attention = {
    .version = API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = cpu_provider,
    .GetInputType = op_input_type,
    .GetInputTypeCount = op_input_count,
    .GetOutputType = float_output,
    .GetOutputTypeCount = three_outputs,
    .KernelDestroy = free_kernel,
    .GetInputCharacteristic = input_characteristic,
    .GetOutputCharacteristic = required,
    .GetInputMemoryType = default_memory,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
    .GetStartVersion = since_version_1,
    .GetEndVersion = any_later_version,
};
