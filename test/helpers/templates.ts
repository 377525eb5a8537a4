/** templates/ rendered as `make render` does: envsubst restricted to the names in templates/params.env. */
import { readFileSync } from 'node:fs';
import path from 'node:path';

export const TEMPLATES = path.resolve(import.meta.dirname, '..', '..', 'templates');

/** templates/params.env: NAME=value lines (no quotes), comments and blank lines ignored. */
export function loadParams(): Map<string, string> {
  const params = new Map<string, string>();
  for (const line of readFileSync(path.join(TEMPLATES, 'params.env'), 'utf8').split('\n')) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line);
    if (m) params.set(m[1]!, m[2]!);
  }
  return params;
}

/** envsubst 'SHELL-FORMAT' semantics: `${NAME}` and `$NAME` for listed names only; all else verbatim. */
export function render(text: string, params: Map<string, string>): string {
  return text.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (all, a?: string, b?: string) => {
    const name = (a ?? b)!;
    return params.has(name) ? params.get(name)! : all;
  });
}
