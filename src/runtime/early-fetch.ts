/**
 * @module The S3 fetch started by `main` before the runtime module has loaded: the listing and the first ranged GETs
 * are in flight while the runtime's code is still being imported. Events arriving before the runtime attaches are
 * kept and replayed in order; the runtime owns everything after (boot state, announcements, errors).
 */
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import type { FetchProgress, ResolvedModel } from '../storage/index.js';

export interface FetchHandlers {
  onListing(files: ReadonlyArray<{ relPath: string; size: number }>): void;
  onFileReady(relPath: string, absPath: string): void;
  onRestart(): void;
  onProgress(p: FetchProgress): void;
}

export interface EarlyFetch {
  readonly result: Promise<ResolvedModel>;
  /** Aborts the fetch (SIGTERM): the cache entry stays uncommitted and resumes next time. */
  readonly abort: AbortController;
  /** Replays what happened so far, then forwards every later event. */
  attach(h: FetchHandlers): void;
  /** Settles once S3 has answered the download's first ranged GET, or the fetch settled without one (a hit, a failure). */
  readonly flowing: Promise<void>;
}

export async function startFetch(uri: string, cfg: Readonly<Config>, log: Logger): Promise<EarlyFetch> {
  const { resolveModel } = await import('../storage/index.js');
  const abort = new AbortController();
  const kept: Array<(h: FetchHandlers) => void> = [];
  let handlers: FetchHandlers | undefined;
  const deliver = (f: (h: FetchHandlers) => void) => (handlers ? f(handlers) : kept.push(f));
  let flow!: () => void;
  const flowing = new Promise<void>((r) => (flow = r));
  const result = resolveModel(uri, {
    cfg, log, signal: abort.signal,
    onListing: (files) => deliver((h) => h.onListing(files)),
    onFileReady: (rel, abs) => deliver((h) => h.onFileReady(rel, abs)),
    onRestart: () => deliver((h) => h.onRestart()),
    onProgress: (p) => deliver((h) => h.onProgress(p)),
    onFirstResponse: () => flow(),
  });
  result.catch(() => undefined); // the runtime awaits it and reports the failure
  void result.finally(flow).catch(() => undefined);
  return {
    result,
    abort,
    flowing,
    attach(h) {
      handlers = h;
      for (const f of kept.splice(0)) f(h);
    },
  };
}
