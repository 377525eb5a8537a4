/*
 * torch.randn's float path for 16 values and more (normal_fill_AVX2 in torch 1.13's DistributionTemplates.h), the
 * same arithmetic as src/pipeline/random.ts's JavaScript, here because DPM++ SDE's Brownian tree draws some 40 latents
 * a step: an mt19937 (Cokus' layout, torch's at::mt19937) fills 24-bit uniforms, then Box-Muller runs on blocks of 16
 * with avx_mathfun's float32 Cephes log and sincos, whose mul+add pairs GCC contracts into FMAs there.
 *
 * Float32 throughout (x86-64 evaluates float in float), built with -ffp-contract=off: an FMA is exactly where fmaf()
 * is written, nowhere else. Constants are written as double literals cast to float, as the JavaScript rounds them.
 *
 * Three builds of the 16-value block, chosen when the module loads: 8 lanes at a time with AVX2 and FMA, as torch's own
 * loop runs; one lane at a time with the FMA instruction; one lane at a time with libm's fmaf (any x86-64). The same
 * values from each.
 *
 * fill(state, out): state is the generator's Uint32Array of 626 words (624 of mt19937, then `next` and `left`),
 * updated in place; out is a Float32Array of at least 16 values. No Node headers: see napi-min.h.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "napi-min.h"

#define N 624
#define M 397

static void twist(uint32_t *s) {
  int k = 0;
  for (; k < N - M; k++) {
    uint32_t y = (s[k] & 0x80000000u) | (s[k + 1] & 0x7fffffffu);
    s[k] = s[k + M] ^ (y >> 1) ^ ((s[k + 1] & 1u) ? 0x9908b0dfu : 0u);
  }
  for (; k < N - 1; k++) {
    uint32_t y = (s[k] & 0x80000000u) | (s[k + 1] & 0x7fffffffu);
    s[k] = s[k + M - N] ^ (y >> 1) ^ ((s[k + 1] & 1u) ? 0x9908b0dfu : 0u);
  }
  uint32_t y = (s[N - 1] & 0x80000000u) | (s[0] & 0x7fffffffu);
  s[N - 1] = s[M - 1] ^ (y >> 1) ^ ((s[0] & 1u) ? 0x9908b0dfu : 0u);
}

/* d[from..to) = (random() & 0xffffff) * 2^-24; st[N] is `next`, st[N + 1] is `left`. */
static void fill_uniform24(uint32_t *st, float *d, size_t from, size_t to) {
  uint32_t next = st[N], left = st[N + 1];
  for (size_t i = from; i < to; i++) {
    if (--left == 0) {
      twist(st);
      next = 0;
      left = N;
    }
    uint32_t y = st[next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    d[i] = (float)(y & 0xffffffu) * (float)5.9604644775390625e-8;
  }
  st[N] = next;
  st[N + 1] = left;
}

static const double LOG_P_D[9] = {7.0376836292e-2, -1.151461031e-1, 1.167699874e-1, -1.2420140846e-1, 1.4249322787e-1,
                                  -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1};

#define NAME(f) f##_generic
#define ATTR
#include "torch-randn-block.h"
#undef NAME
#undef ATTR
#if defined(__x86_64__)
#define NAME(f) f##_fma
#define ATTR __attribute__((target("fma")))
#include "torch-randn-block.h"
#undef NAME
#undef ATTR

/*
 * The same 16 values 8 lanes at a time, as torch's own loop runs them (log256_ps and sincos256_ps of avx_mathfun.h,
 * FMAs where the scalar block has them): on CPUs with AVX2 and FMA. (Other architectures build the generic block
 * alone.)
 */
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static __m256 log8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  x = _mm256_max_ps(x, _mm256_set1_ps((float)1.1754943508222875e-38));
  __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)), _mm256_set1_epi32(1)));
  bits = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(~0x7f800000)), _mm256_set1_epi32(0x3f000000));
  x = _mm256_castsi256_ps(bits);
  __m256 mask = _mm256_cmp_ps(x, _mm256_set1_ps((float)0.707106781186547524), _CMP_LT_OQ);
  // below sqrt(1/2): e - 1 and (x - 1) + x; else x - 1 (adding 0 leaves it as it is)
  e = _mm256_sub_ps(e, _mm256_and_ps(one, mask));
  x = _mm256_add_ps(_mm256_sub_ps(x, one), _mm256_and_ps(x, mask));
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps((float)LOG_P_D[0]);
  for (int k = 1; k < 9; k++) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps((float)LOG_P_D[k]));
  y = _mm256_mul_ps(y, x);
  y = _mm256_fmadd_ps(y, z, _mm256_mul_ps(e, _mm256_set1_ps((float)-2.1219444e-4)));
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  x = _mm256_add_ps(x, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps((float)0.693359375), x);
}

__attribute__((target("avx2,fma"))) static void normal_fill16_avx2(float *d) {
  const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(d));
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(u1)));
  __m256 x = _mm256_mul_ps(_mm256_set1_ps((float)(2 * 3.141592653589793)), _mm256_loadu_ps(d + 8));
  __m256i q = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps((float)1.27323954473516)));
  q = _mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  x = _mm256_fmadd_ps(qf, _mm256_set1_ps((float)-0.78515625), x);
  x = _mm256_fmadd_ps(qf, _mm256_set1_ps((float)-2.4187564849853515625e-4), x);
  x = _mm256_fmadd_ps(qf, _mm256_set1_ps((float)-3.77489497744594108e-8), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 c = _mm256_fmadd_ps(_mm256_set1_ps((float)2.443315711809948e-5), z, _mm256_set1_ps((float)-1.388731625493765e-3));
  c = _mm256_fmadd_ps(c, z, _mm256_set1_ps((float)4.166664568298827e-2));
  c = _mm256_mul_ps(c, z);
  c = _mm256_fmadd_ps(c, z, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, _mm256_set1_ps(0.5f))));
  c = _mm256_add_ps(c, _mm256_set1_ps(1.0f));
  __m256 s = _mm256_fmadd_ps(_mm256_set1_ps((float)-1.9515295891e-4), z, _mm256_set1_ps((float)8.3321608736e-3));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps((float)-1.6666654611e-1));
  s = _mm256_mul_ps(s, z);
  s = _mm256_fmadd_ps(s, x, x);
  // (q & 2) == 0: sin from the sine polynomial, cos from the cosine one; else swapped
  const __m256 sin_poly = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), _mm256_setzero_si256()));
  __m256 sn = _mm256_blendv_ps(c, s, sin_poly);
  __m256 cs = _mm256_blendv_ps(s, c, sin_poly);
  // sin negated where q & 4, cos where (q - 2) & 4 is 0
  sn = _mm256_xor_ps(sn, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(4)), 29)));
  cs = _mm256_xor_ps(cs, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_andnot_si256(_mm256_sub_epi32(q, _mm256_set1_epi32(2)), _mm256_set1_epi32(4)), 29)));
  _mm256_storeu_ps(d, _mm256_mul_ps(radius, cs));
  _mm256_storeu_ps(d + 8, _mm256_mul_ps(radius, sn));
}
#endif

extern napi_status napi_get_typedarray_info(napi_env, napi_value, int *, size_t *, void **, napi_value *, size_t *);
#define NAPI_UINT32_ARRAY 6
#define NAPI_FLOAT32_ARRAY 7

/* The block for this CPU, chosen when the module loads. */
static void (*block16)(float *) = normal_fill16_generic;
static const char *block_name = "generic";

/* The fill with `block`: argument checks, then the uniforms and the blocks (a ragged tail redraws its last 16). */
static napi_value fill_with(napi_env env, napi_callback_info info, void (*block)(float *)) {
  size_t argc = 2;
  napi_value argv[2];
  int type_s = -1, type_d = -1;
  size_t len_s = 0, len_d = 0;
  void *ps = NULL, *pd = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != NAPI_OK || argc < 2 ||
      napi_get_typedarray_info(env, argv[0], &type_s, &len_s, &ps, NULL, NULL) != NAPI_OK ||
      napi_get_typedarray_info(env, argv[1], &type_d, &len_d, &pd, NULL, NULL) != NAPI_OK || type_s != NAPI_UINT32_ARRAY ||
      len_s != N + 2 || type_d != NAPI_FLOAT32_ARRAY || len_d < 16) {
    napi_throw_error(env, NULL, "fill(state, out): state must be a Uint32Array of 626 words and out a Float32Array of at least 16 values");
    return NULL;
  }
  uint32_t *st = ps;
  // left 1: the next draw twists (and sets next); otherwise next + left is N + 1 (every draw reads state[next]).
  uint32_t next = st[N], left = st[N + 1];
  if (left == 0 || left > N || next > N || (left != 1 && next + left != N + 1)) {
    napi_throw_error(env, NULL, "fill(state, out): not a generator's state");
    return NULL;
  }
  if ((char *)pd < (char *)ps + len_s * 4 && (char *)ps < (char *)pd + len_d * 4) {
    napi_throw_error(env, NULL, "fill(state, out): out overlaps the state");
    return NULL;
  }
  float *d = pd;
  fill_uniform24(st, d, 0, len_d);
  for (size_t i = 0; i + 16 <= len_d; i += 16) block(d + i);
  if (len_d % 16 != 0) {
    fill_uniform24(st, d, len_d - 16, len_d);
    block(d + len_d - 16);
  }
  return NULL;
}

static napi_value fill(napi_env env, napi_callback_info info) { return fill_with(env, info, block16); }
static napi_value fill_generic(napi_env env, napi_callback_info info) { return fill_with(env, info, normal_fill16_generic); }
#if defined(__x86_64__)
static napi_value fill_fma(napi_env env, napi_callback_info info) { return fill_with(env, info, normal_fill16_fma); }
static napi_value fill_avx2(napi_env env, napi_callback_info info) { return fill_with(env, info, normal_fill16_avx2); }
#endif

static void export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn);
  napi_set_named_property(env, exports, name, fn);
}

/*
 * fill: the block this CPU runs best; `path` names it (avx2, fma or generic). The variants this CPU can run are
 * exported too (fillGeneric, fillFma, fillAvx2), for the tests that hold them to each other.
 */
napi_value napi_register_module_v1(napi_env env, napi_value exports) {
#if defined(__x86_64__)
  // A shared object's constructors may run after this: the CPU model is read here first.
  __builtin_cpu_init();
  int fma = __builtin_cpu_supports("fma"), avx2 = fma && __builtin_cpu_supports("avx2");
  if (avx2) block16 = normal_fill16_avx2, block_name = "avx2";
  else if (fma) block16 = normal_fill16_fma, block_name = "fma";
  if (fma) export_fn(env, exports, "fillFma", fill_fma);
  if (avx2) export_fn(env, exports, "fillAvx2", fill_avx2);
#endif
  napi_value path;
  napi_create_string_utf8(env, block_name, NAPI_AUTO_LENGTH, &path);
  napi_set_named_property(env, exports, "path", path);
  export_fn(env, exports, "fill", fill);
  export_fn(env, exports, "fillGeneric", fill_generic);
  return exports;
}
