/**
 * One inference step with Karras sigmas (euler_karras, dpmpp_2m_karras) was a 500: np.linspace's one-point case gave
 * 0/0, a NaN timestep reached the UNet's int64 input. Found by the long-serving soak (scripts/bench-soak.ts).
 */
import { describe, expect, it } from 'vitest';
import { npLinspace } from '../src/pipeline/schedulers/common.js';
import { createScheduler } from '../src/pipeline/schedulers/index.js';

/** The scheduler config of SD 1.5 (and of the demo model). */
const SD15 = {
  _class_name: 'PNDMScheduler', beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear', num_train_timesteps: 1000,
  prediction_type: 'epsilon', steps_offset: 1, timestep_spacing: 'leading', skip_prk_steps: true, set_alpha_to_one: false,
};

describe('one step', () => {
  it('npLinspace of one point is its start, as numpy gives it', () => {
    expect(npLinspace(0, 1, 1)).toEqual([0]);
    expect(npLinspace(5, 1, 1)).toEqual([5]);
    expect(npLinspace(0, 1, 1, false)).toEqual([0]);
    expect(npLinspace(0, 1, 0)).toEqual([]);
    expect(npLinspace(2, 2, 3)).toEqual([2, 2, 2]);
  });

  // diffusers (EulerDiscreteScheduler / DPMSolverMultistepScheduler with use_karras_sigmas=True on this config,
  // set_timesteps(1)): timesteps [1.0000001192092896] and [999].
  it.each([
    ['euler_karras', 1.0000001192092896],
    ['dpmpp_2m_karras', 999],
  ])('%s with 1 step has a finite timestep (diffusers: %d)', (name, t) => {
    const s = createScheduler(SD15, 1, { name }) as unknown as { timesteps: ArrayLike<number>; sigmas: ArrayLike<number> };
    expect(Array.from(s.timesteps)).toEqual([t]);
    expect(Array.from(s.sigmas).every(Number.isFinite)).toBe(true);
  });
});
