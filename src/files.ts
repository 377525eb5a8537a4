/** @module File-system questions every layer asks, with no dependency of its own. */
import { access } from 'node:fs/promises';

/**
 * Whether `p` exists (a link: what it points at); any error reads as no. Asked without blocking the event loop: the
 * path may be on a volume that stopped answering, and probes and a stop must still run.
 */
export const exists = (p: string): Promise<boolean> => access(p).then(() => true, () => false);
