/**
 * @module OpenAI's error shape, `{"error":{"message","type","param","code"}}`, apart from its routes (openai.ts) and
 * importing nothing, so the base server (base.ts) answers under /openai in it too: the 503 before the routes attach
 * and the refusals before any route runs (past MAX_CONNECTIONS, a head it will not serve).
 */

/** A path under KServe's OpenAI prefix: its errors, a 404 or 405 included, come in OpenAI's shape. */
export const isOpenAI = (path: string): boolean => path === '/openai' || path.startsWith('/openai/');

/**
 * Codes a retry of the same request meets again. OpenAI's SDKs retry every 5xx twice by default, a 507 or a 504 after
 * REQUEST_TIMEOUT_S too (three times the GPU time for one error), unless the answer says `x-should-retry: false`.
 * A 503 (not ready, BUSY) is theirs to retry, as they do.
 */
const NO_RETRY: ReadonlySet<string> = new Set(['OUT_OF_MEMORY', 'TIMEOUT', 'UNSUPPORTED']);

/** The headers an error of `code` adds in OpenAI's shape: `x-should-retry: false` where a retry meets it again. */
export const openaiErrorHeaders = (code: string): Record<string, string> => (NO_RETRY.has(code) ? { 'x-should-retry': 'false' } : {});

/**
 * An error body in OpenAI's shape: OpenAI's type for the status (its 404 for an unknown model is an
 * `invalid_request_error` too), our code as its code, `param` the request field it is about where that is known.
 */
export const openaiErrorBody = (status: number, code: string, message: string, param: string | null = null): string =>
  JSON.stringify({ error: { message, type: status >= 500 ? 'server_error' : 'invalid_request_error', param, code } });
