/**
 * @module CLI: `node dist/src/demo/cli.js OUT_DIR [--family sd15|sd2|sdxl|lcm|turbo] [--fp16]
 * [--timestep float-scalar|int64-batch|float-batch] [--pad-mb N] [--pad-split sd15|unet] [--external-data] [--vae-encoder] [--inpainting] [--seed N]`.
 */
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { buildDemoModel, type DemoOptions } from './build.js';

const USAGE =
  'usage: cli.js OUT_DIR [--family sd15|sd2|sdxl|lcm|turbo] [--fp16] [--timestep float-scalar|int64-batch|float-batch]\n' +
  '              [--pad-mb N] [--pad-split sd15|unet] [--external-data] [--vae-encoder] [--inpainting] [--seed N]';

export async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        family: { type: 'string' },
        fp16: { type: 'boolean' },
        timestep: { type: 'string' },
        'pad-mb': { type: 'string' },
        'pad-split': { type: 'string' },
        'external-data': { type: 'boolean' },
        'vae-encoder': { type: 'boolean' },
        inpainting: { type: 'boolean' },
        seed: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help || positionals.length !== 1) {
    process.stderr.write(`${USAGE}\n`);
    return values.help ? 0 : 2;
  }
  const opts: DemoOptions = {
    family: values.family as DemoOptions['family'],
    fp16: values.fp16,
    timestep: values.timestep as DemoOptions['timestep'],
    padBytes: values['pad-mb'] !== undefined ? Math.round(Number(values['pad-mb']) * 1024 * 1024) : undefined,
    padSplit: values['pad-split'] as DemoOptions['padSplit'],
    externalData: values['external-data'],
    withVaeEncoder: values['vae-encoder'],
    inpainting: values.inpainting,
    seed: values.seed !== undefined ? Number(values.seed) : undefined,
  };
  try {
    const m = await buildDemoModel(positionals[0]!, opts);
    process.stdout.write(`${JSON.stringify(m, null, 2)}\n`);
    return 0;
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 1;
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
