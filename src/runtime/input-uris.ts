/**
 * @module Which S3 objects a request may point the server at. Inputs (`image`, `mask_image`) are read and outputs
 * (`output_uri`) written with the server's own credentials, so a client could otherwise make it read or overwrite
 * anything those credentials reach: inputs only under INPUT_URI_PREFIXES, neither under what the server loads.
 */
import type { Config } from '../config.js';
import { keyForms, keyProblem, parseStorageUri, underS3Prefix, type S3Url } from '../storage/uri.js';

/**
 * What of this server's own `loc` lies under: the model (STORAGE_URI) or the LoRA adapters (LORA_URI), when they come
 * from S3. The bucket and key are compared in any case, the key also percent-decoded, and any key under the prefix
 * counts (`prefix//x`, `prefix/./x`): a refusal that errs wide.
 */
export function servedFrom(loc: S3Url, cfg: Partial<Pick<Config, 'storageUri' | 'loraUri'>>): string | undefined {
  for (const [uri, what] of [[cfg.storageUri, 'model (STORAGE_URI)'], [cfg.loraUri, 'LoRA adapters (LORA_URI)']] as const) {
    if (uri === undefined) continue;
    let src;
    try {
      src = parseStorageUri(uri);
    } catch {
      continue;
    }
    if (src.kind !== 's3' || src.bucket.toLowerCase() !== loc.bucket.toLowerCase()) continue;
    // The key as a store that decodes it or ignores case would read it too.
    const prefix = src.prefix.toLowerCase();
    if (keyForms(loc.key).some((k) => k.toLowerCase().startsWith(prefix))) return what;
  }
  return undefined;
}

/**
 * Why the s3:// input `loc` (named `shown` in the message) may not be read, or undefined when it may. Decided from the
 * URI alone, before any request to S3: the answer says nothing of whether the object exists.
 */
export function inputRefusal(loc: S3Url, shown: string, cfg: Partial<Pick<Config, 'inputUriPrefixes' | 'storageUri' | 'loraUri'>>): string | undefined {
  const prefixes = cfg.inputUriPrefixes ?? [];
  if (prefixes.length === 0) return 's3:// input images are not enabled on this server (the operator lists the prefixes it may read in INPUT_URI_PREFIXES); send the image as base64';
  const unsafe = keyProblem(loc.key);
  if (unsafe !== undefined) return `${shown}: the key ${unsafe}; name the object by its plain key`;
  // The model's and the adapters' files are never an input, even where an allowed prefix spans them.
  const served = servedFrom(loc, cfg);
  if (served !== undefined) return `${shown} lies under the ${served} this server loads; input images are not read from there`;
  if (!prefixes.some((p) => underS3Prefix(loc, p))) {
    return `${shown} is not under a prefix this server reads input images from (INPUT_URI_PREFIXES: ${prefixes.map((p) => p.uri).join(', ')})`;
  }
  return undefined;
}
