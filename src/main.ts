/** @module Entry: parse config, listen, start boot. Nothing heavy is imported before the socket is open. */
import { ConfigError, loadConfig } from './config.js';
import { createLogger } from './log.js';
import { Runtime } from './runtime/runtime.js';

async function main(): Promise<void> {
  let cfg;
  try {
    cfg = loadConfig(process.env);
  } catch (err) {
    // One clear line naming every bad variable, then a non-zero exit: Kubernetes shows it in the pod status.
    process.stderr.write(`diffusers-runtime: ${err instanceof ConfigError ? err.message : String(err)}\n`);
    process.exit(2);
  }
  const log = createLogger(cfg.logLevel);
  // performance.now() counts from process start, so 0 is "the process started".
  const rt = new Runtime(cfg, log, { startedAt: 0 });
  try {
    await rt.listen();
  } catch (err) {
    log.fatal({ err: (err as Error).message }, 'cannot listen');
    process.exit(1);
  }
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
