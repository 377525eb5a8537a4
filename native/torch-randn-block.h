/*
 * The Box-Muller block of torch-randn.c, included there twice: once for any x86-64 (__builtin_fmaf calls libm's
 * fmaf) and once compiled for CPUs with FMA (the same single rounding, as one instruction). NAME(f) and ATTR are set
 * by the includer.
 */
/* log256_ps for one lane (x > 0). */
ATTR static float NAME(log_ps)(float xin) {
  const float min_norm_pos = (float)1.1754943508222875e-38;
  float x = xin > min_norm_pos ? xin : min_norm_pos;
  uint32_t bits;
  memcpy(&bits, &x, 4);
  float e = (float)((int32_t)(bits >> 23) - 127 + 1);
  bits = (bits & ~0x7f800000u) | 0x3f000000u;
  memcpy(&x, &bits, 4);
  if (x < (float)0.707106781186547524) {
    e = e - 1.0f;
    x = (x - 1.0f) + x;
  } else {
    x = x - 1.0f;
  }
  float z = x * x;
  float y = (float)LOG_P_D[0];
  for (int k = 1; k < 9; k++) y = __builtin_fmaf(y, x, (float)LOG_P_D[k]);
  y = y * x;
  y = __builtin_fmaf(y, z, e * (float)-2.1219444e-4);
  y = __builtin_fmaf(-z, 0.5f, y);
  x = x + y;
  return __builtin_fmaf(e, (float)0.693359375, x);
}

/* Box-Muller on the 16 uniforms at d, in place (normal_fill_16_AVX2, mean 0, std 1). */
ATTR static void NAME(normal_fill16)(float *d) {
  const float dp1 = (float)-0.78515625, dp2 = (float)-2.4187564849853515625e-4, dp3 = (float)-3.77489497744594108e-8;
  const float sp0 = (float)-1.9515295891e-4, sp1 = (float)8.3321608736e-3, sp2 = (float)-1.6666654611e-1;
  const float cp0 = (float)2.443315711809948e-5, cp1 = (float)-1.388731625493765e-3, cp2 = (float)4.166664568298827e-2;
  const float fopi = (float)1.27323954473516, two_pi = (float)(2 * 3.141592653589793);
  for (int j = 0; j < 8; j++) {
    float u1 = 1.0f - d[j];
    float radius = sqrtf(-2.0f * NAME(log_ps)(u1));
    float x = two_pi * d[j + 8];
    int32_t q = ((int32_t)(x * fopi) + 1) & ~1;
    float qf = (float)q;
    x = __builtin_fmaf(qf, dp1, x);
    x = __builtin_fmaf(qf, dp2, x);
    x = __builtin_fmaf(qf, dp3, x);
    float z = x * x;
    float c = __builtin_fmaf(cp0, z, cp1);
    c = __builtin_fmaf(c, z, cp2);
    c = c * z;
    c = __builtin_fmaf(c, z, -(z * 0.5f));
    c = c + 1.0f;
    float s = __builtin_fmaf(sp0, z, sp1);
    s = __builtin_fmaf(s, z, sp2);
    s = s * z;
    s = __builtin_fmaf(s, x, x);
    int sin_poly = (q & 2) == 0;
    float sn = sin_poly ? s : c;
    float cs = sin_poly ? c : s;
    if ((q & 4) != 0) sn = -sn;
    if (((q - 2) & 4) == 0) cs = -cs;
    d[j] = radius * cs;
    d[j + 8] = radius * sn;
  }
}

