/** @module Which thread of a pipeline worker runs a component's session (AUX_THREADS), apart from the worker so it is testable. */
import type { AuxThreads } from '../config.js';
import { onGpu, type SessionProvider } from './provider.js';

/** An auxiliary session thread of a pipeline worker (aux.ts); the UNet always stays on the worker's own thread. */
export type AuxThread = 'encode' | 'image' | 'decode';

const ON_AUX: ReadonlyMap<string, AuxThread> = new Map([
  ['text_encoder', 'encode'],
  ['text_encoder_2', 'encode'],
  ['vae_encoder', 'image'],
  ['vae_decoder', 'decode'],
] as const);

/**
 * The auxiliary thread of `component`, or undefined for the worker's own: `auto` (or absent) puts the text encoders and
 * the VAEs on their threads on CUDA only, `on` everywhere, `off` nowhere.
 */
export function auxThreadOf(component: string, provider: SessionProvider, mode: AuxThreads | undefined): AuxThread | undefined {
  const onAux = mode === 'on' || (mode !== 'off' && onGpu(provider));
  return onAux ? ON_AUX.get(component) : undefined;
}
