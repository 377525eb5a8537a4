/**
 * @module Entry: parse config, listen, start boot. Only uWebSockets.js and the config parser load
 * before the socket is open; logging, metrics and the runtime are imported after.
 */
import { ConfigError, loadConfig, type Config } from './config.js';
import { listenBase, type BaseServer } from './server/base.js';
import { spawnWorkers } from './runtime/workers.js';

async function main(): Promise<void> {
  let cfg: Readonly<Config>;
  try {
    cfg = loadConfig(process.env);
  } catch (err) {
    // One clear line naming every bad variable, then a non-zero exit: Kubernetes shows it in the pod status.
    process.stderr.write(`diffusers-runtime: ${err instanceof ConfigError ? err.message : String(err)}\n`);
    process.exit(2);
  }
  let base: BaseServer;
  try {
    base = await listenBase(cfg.host, cfg.port);
  } catch (err) {
    process.stderr.write(`diffusers-runtime: ${(err as Error).message}\n`);
    process.exit(1);
  }
  // The pipeline workers start now: their onnxruntime-node/sharp imports overlap ours below.
  const workers = spawnWorkers(cfg);
  const [{ createLogger }, { Runtime }] = await Promise.all([import('./log.js'), import('./runtime/runtime.js')]);
  const log = createLogger(cfg.logLevel);
  // performance.now() counts from process start, so 0 is "the process started".
  const rt = new Runtime(cfg, log, { startedAt: 0, workers });
  rt.attach(base);
  let signals = 0;
  const stop = (sig: string) => {
    if (++signals > 1) {
      log.warn({ signal: sig }, 'second signal: exiting now');
      process.exit(1);
    }
    log.info({ signal: sig }, 'signal received');
    void rt.close().then(() => process.exit(process.exitCode ?? 0));
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  await rt.start();
  if (rt.boot.state === 'failed' && cfg.exitOnBootFailure) process.exit(1);
}

void main();
