/*
 * torch.randn's float path for 16 values and more (normal_fill_AVX2 in torch 1.13's DistributionTemplates.h), the
 * same arithmetic as src/pipeline/random.ts's JavaScript, here because DPM++ SDE's Brownian tree draws some 40 latents
 * a step: an mt19937 (Cokus' layout, torch's at::mt19937) fills 24-bit uniforms, then Box-Muller runs on blocks of 16
 * with avx_mathfun's float32 Cephes log and sincos, whose mul+add pairs GCC contracts into FMAs there.
 *
 * Float32 throughout (x86-64 evaluates float in float), built with -ffp-contract=off: an FMA is exactly where fmaf()
 * is written, nowhere else. Constants are written as double literals cast to float, as the JavaScript rounds them.
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
#define NAME(f) f##_fma
#define ATTR __attribute__((target("fma")))
#include "torch-randn-block.h"
#undef NAME
#undef ATTR

extern napi_status napi_get_typedarray_info(napi_env, napi_value, int *, size_t *, void **, napi_value *, size_t *);
#define NAPI_UINT32_ARRAY 6
#define NAPI_FLOAT32_ARRAY 7

/* The block for this CPU, chosen when the module loads. */
static void (*block16)(float *) = normal_fill16_generic;

static napi_value fill(napi_env env, napi_callback_info info) {
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
  if (st[N] > N || st[N + 1] == 0 || st[N + 1] > N) {
    napi_throw_error(env, NULL, "fill(state, out): not a generator's state");
    return NULL;
  }
  float *d = pd;
  fill_uniform24(st, d, 0, len_d);
  for (size_t i = 0; i + 16 <= len_d; i += 16) block16(d + i);
  if (len_d % 16 != 0) {
    fill_uniform24(st, d, len_d - 16, len_d);
    block16(d + len_d - 16);
  }
  return NULL;
}

napi_value napi_register_module_v1(napi_env env, napi_value exports) {
  // A shared object's constructors may run after this: the CPU model is read here first.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("fma")) block16 = normal_fill16_fma;
  napi_value fn, fma;
  napi_get_boolean(env, block16 == normal_fill16_fma, &fma);
  napi_set_named_property(env, exports, "fma", fma);
  napi_create_function(env, "fill", NAPI_AUTO_LENGTH, fill, NULL, &fn);
  napi_set_named_property(env, exports, "fill", fn);
  return exports;
}
