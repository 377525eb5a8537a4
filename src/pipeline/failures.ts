/**
 * @module What the pipeline tells of ONNX Runtime's failures: whether one ran out of memory (its allocation failures,
 * as onnxruntime-node hands them to JS), what a client is told of a failed generation, a failed adapter set build or
 * a session that could not be created. The binding (js/node/src/inference_session_wrap.cc, Run) catches ORT's C++ exception and throws
 * a JS Error whose message is its what(): the status text, inside the executor's wrapper when a kernel failed
 * (onnxruntime/core/framework/sequential_executor.cc: "Non-zero status code returned while running <Op> node.
 * Name:'<node>' Status Message: <text>"). The texts below are ORT's own (microsoft/onnxruntime, the files named);
 * test/out-of-memory.test.ts holds whole messages, two of them as measured here.
 */

import { closeSync, lstatSync, openSync, readdirSync, readlinkSync, readSync, statSync, type Stats } from 'node:fs';
import { open, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { processIdentity } from '../config.js';
import { LIMIT_ADVICE, shortage, shortageError } from '../descriptors.js';
import { isRuntimeError, RuntimeError } from '../errors.js';

const SIGNS: readonly RegExp[] = [
  // BFCArena::Extend (onnxruntime/core/framework/bfc_arena.cc), CPU and CUDA arenas alike: the allocator (malloc,
  // cudaMalloc) failed even after backing off, or the arena's own limit (CUDA's gpu_mem_limit) is reached.
  /Failed to allocate memory for requested buffer of size \d+/,
  /Available memory of \d+ is smaller than requested bytes of \d+/,
  // CudaCall (onnxruntime/core/providers/cuda/cuda_call.cc): "<lib> failure <code>: <text> ; GPU=… ; hostname=… ;
  // file=… ; line=… ; expr=…"; cudaErrorMemoryAllocation (2) reads "out of memory" (cudaGetErrorString).
  /\bCUDA failure 2: out of memory\b/,
  // CudaKernel::Compute (onnxruntime/core/providers/cuda/cuda_kernel.h): "CUDA error <name>:<text>".
  /\bcudaErrorMemoryAllocation\b/,
  // The same CudaCall for cuBLAS, cuDNN and cuFFT handles and workspaces (their status names, as printed there);
  // cuDNN 9 (what CUDA 12 builds of ORT load) splits cuDNN 8's ALLOC_FAILED into host and device allocations.
  /\bCUBLAS_STATUS_ALLOC_FAILED\b/,
  /\bCUDNN_STATUS_(?:ALLOC_FAILED|INTERNAL_ERROR_(?:HOST|DEVICE)_ALLOCATION_FAILED)\b/,
  /\bCUFFT_ALLOC_FAILED\b/,
  // A C++ allocation that threw inside a kernel or the default CPU allocator without an arena (AllocatorDefaultAlloc,
  // onnxruntime/core/framework/allocator.cc: ORT_THROW_EX(std::bad_alloc)); libstdc++'s what() is "std::bad_alloc".
  /\bstd::bad_alloc\b/,
  // V8 could not allocate a typed array's memory (the pipeline's latents and pixels): RangeError, same cause.
  /^Array buffer allocation failed$/,
];

/** The failure's text when `err` says the generation ran out of memory (for the log), else undefined. */
export function outOfMemory(err: unknown): string | undefined {
  const message = String((err as Error)?.message ?? err);
  if (!SIGNS.some((re) => re.test(message))) return undefined;
  // The first line: ORT's messages end with a blank line, and the stack adds nothing to an allocation failure.
  return message.split('\n')[0]!.trim();
}

/**
 * What the worker answers for a generation or an adapter set build that failed: our own refusals as they are; an
 * allocation failure as OUT_OF_MEMORY with `oom`; anything else, a defect, as INTERNAL with `defect`. ORT's text goes
 * in `detail`, for the log only: it names ORT's build paths and, from CUDA, the node's host name, and an auxiliary
 * session thread passes it on inside an INTERNAL RuntimeError.
 */
export function failureReply(err: unknown, defect: string, oom: string): { code: string; message: string; detail?: string } {
  if (isRuntimeError(err) && err.code !== 'INTERNAL') return { code: err.code, message: err.message };
  const allocation = outOfMemory(err);
  if (allocation) return { code: 'OUT_OF_MEMORY', message: oom, detail: allocation };
  return { code: 'INTERNAL', message: defect, detail: String((err as Error)?.stack ?? (err as Error)?.message ?? err) };
}

/**
 * The allocation failure alone, for a boot reason: what ORT's text says ran out (the arena's request and its size,
 * CUDA's status, std::bad_alloc), without the model's path, ORT's source locations and templates, or what CudaCall
 * appends (" ; GPU=… ; hostname=… ; file=…").
 */
export function allocationText(text: string): string {
  for (const re of SIGNS) {
    const m = re.exec(text);
    if (m) return m[0];
  }
  return 'out of memory';
}

/**
 * ORT's text without the source locations its C++ exceptions carry (ORT_WHERE: the build machine's
 * `/onnxruntime_src/…/model.cc:187`, then the throwing function's signature, templates included): a boot reason reaches
 * clients, and neither is about their model.
 */
export function withoutSourceLocations(text: string): string {
  const at = /\/onnxruntime_src\/\S*:\d+ /g;
  let out = '';
  let from = 0;
  for (let m = at.exec(text); m !== null; m = at.exec(text)) {
    // The signature (`__PRETTY_FUNCTION__`) ends at the first space outside brackets once its parameter list closed:
    // `void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*)`, `…Initialize()::<lambda()>`.
    let i = m.index + m[0].length;
    let depth = 0;
    let closed = false;
    for (; i < text.length && !(closed && depth === 0 && text[i] === ' '); i++) {
      if (text[i] === '(' || text[i] === '<') depth++;
      else if (text[i] === ')' || text[i] === '>') depth--;
      if (text[i] === ')' && depth === 0) closed = true;
    }
    if (!closed) break; // not a signature after all: the rest is kept as it is
    out += text.slice(from, m.index);
    from = i + /^ ?(?:const )?(?:\[with [^\]]*\] ?)?/.exec(text.slice(i))![0].length;
    at.lastIndex = from;
  }
  return out + text.slice(from);
}

/**
 * A session ONNX Runtime could not create (a truncated or missing weights file, a graph it cannot parse, no room for
 * its weights, a volume that failed a read), named by its component. ORT names files by their absolute path, and a
 * boot reason reaches clients: the model folder is cut from the message. Our own refusals (RuntimeErrors other than a
 * thread's INTERNAL) go up as they are.
 */
export async function loadError(component: string, modelPath: string, err: unknown): Promise<unknown> {
  if (isRuntimeError(err) && err.code !== 'INTERNAL') return err;
  if (outOfMemory(err)) {
    // Not MODEL_FORMAT: re-exporting the same model does not help, room does.
    return new RuntimeError('OUT_OF_MEMORY', `${component}/model.onnx could not be loaded: out of memory while its session was created (${allocationText(String((err as Error)?.message ?? err))}); it needs a GPU (or a memory limit) with more room, fewer WORKERS on one GPU, or a float16 export`, { cause: err });
  }
  const text = String((err as Error)?.message ?? err);
  // A weights file linked out of the graph's folder: ORT's message names both absolute paths (never in a boot reason).
  const escaped = /External data path escapes model directory\. External data path: "([^"]*)"/.exec(text);
  if (escaped) return escapedDataError(component, modelPath, escaped[1]!, err);
  // ORT tells no errno of most reads (an EIO reads "Protobuf parsing failed", as a corrupt graph does): reading the
  // files again tells the volume's fault from the format's. Only for a failure ORT's text ties to reading them: a
  // CUDA or provider error, a graph ORT rejects once parsed, reads no gigabytes of weights to be passed on.
  const reread = readFailure(text);
  const unreadable = reread && (await unreadableFile(path.dirname(modelPath), reread === 'graph'));
  const io = unreadable && readError(unreadable.name ? `${component}/${unreadable.name}` : component, unreadable.err);
  if (io) return io;
  const pointers = lfsPointers(path.dirname(modelPath));
  if (pointers.length > 0) {
    // ORT says only "Protobuf parsing failed" (or an external-data offset out of range) of what is a very common upload.
    return new RuntimeError(
      'MODEL_FORMAT',
      `${component}/model.onnx could not be loaded: ${pointers.map((f) => `${component}/${f}`).join(', ')} ${pointers.length === 1 ? 'is a Git LFS pointer' : 'are Git LFS pointers'}, ` +
        'not the weights (a repository cloned without git-lfs): fetch them (`git lfs pull`, or download the files) and upload the model again',
      { cause: err },
    );
  }
  const dir = path.dirname(path.dirname(modelPath)) + path.sep;
  const message = withoutSourceLocations(text.split(dir).join('')).trim();
  return new RuntimeError('MODEL_FORMAT', `${component}/model.onnx could not be loaded: ${message}`, { cause: err });
}

/**
 * ORT's texts (onnxruntime 1.30.0, each measured on the demo model: docs/FAULTS.md) that tie a session's failure to
 * reading its files. The graph: Model::Load's "Protobuf parsing failed." (a short or failed read), "system error
 * number <errno>" (its open failed), "File doesn't exist". Its external data: "SystemError : <errno>" (an open or a read
 * of the weights failed), "External data path does not exist", "Failed to get the weakly canonical path: <path> -
 * <strerror>" (resolving the weights' path failed: EIO from the volume, EACCES on a folder a link leads into), "… are
 * out of bounds or can not be read in full" (a short weights file), and the posix Env's "<call> file "<path>" failed:
 * <strerror>" and ReadFileIntoBuffer's end of file. Anything else (a provider, an operator ORT does not know, a type
 * mismatch) is not about reading.
 */
const GRAPH_READ = /Protobuf parsing failed|failed:system error number \d+|File doesn't exist/;
const DATA_READ = /SystemError : \d+|External data path does not exist|Failed to get the weakly canonical path: |are out of bounds or can not be read in full|\b(?:open|read|lseek|mmap|fstat) file ".*" failed: |ReadFileIntoBuffer/;

/** Which files a failure's text says ORT could not read: the graph alone (weights come after it), all, or none. */
export function readFailure(text: string): 'graph' | 'all' | undefined {
  if (DATA_READ.test(text)) return 'all';
  return GRAPH_READ.test(text) ? 'graph' : undefined;
}

/**
 * ORT reads external data only from the folder its graph resolves in (tensorprotoutils.cc, ValidateExternalDataPath):
 * a weights file linked from elsewhere (a PVC's shared folder), or a graph linked into a folder that lacks the weights
 * it names, is refused. Said with the file's name inside the model, not ORT's two absolute paths.
 */
function escapedDataError(component: string, modelPath: string, location: string, err: unknown): RuntimeError {
  const isLink = (p: string) => {
    try {
      return lstatSync(p).isSymbolicLink();
    } catch {
      return false;
    }
  };
  const name = `${component}/${location}`;
  const why = isLink(path.join(path.dirname(modelPath), location)) || isLink(modelPath)
    ? `its weights file ${name} is a symbolic link to a file outside the folder of ${component}/model.onnx (or model.onnx is a link into a folder that lacks it), ` +
      `and ONNX Runtime reads weights only from the graph's own folder: put the file itself in ${component}/, or link model.onnx and its weights into one folder (as a Hugging Face cache does)`
    : `its graph names weights outside its folder (${JSON.stringify(location)}), and ONNX Runtime reads weights only from the graph's own folder: export the model again`;
  return new RuntimeError('MODEL_FORMAT', `${component}/model.onnx could not be loaded: ${why}`, { cause: err });
}

/**
 * A read of `rel` (a path inside the model folder) that the OS failed, as CACHE_IO with its errno as the cause (what
 * a boot retry looks at); undefined for an error with no errno (or ENOENT with `missingIsFormat`: a file the layout
 * requires is missing from the export). Named inside the model, never by the absolute path. A process out of
 * descriptors is TOO_MANY_OPEN_FILES, not the volume's fault: the boot waits that out (boot-sequence.ts). A file this
 * process may not read is how it was deployed (deniedError).
 */
export function readError(rel: string, err: unknown, opts: { missingIsFormat?: boolean } = {}): RuntimeError | undefined {
  const e = err as NodeJS.ErrnoException;
  if (typeof e?.code !== 'string' || typeof e.syscall !== 'string' || (opts.missingIsFormat && e.code === 'ENOENT')) return undefined;
  const short = shortage(e);
  if (short) return shortageError(`${rel} could not be read`, short, LIMIT_ADVICE, err);
  if (e.code === 'EACCES' || e.code === 'EPERM') return deniedError(rel, e);
  return new RuntimeError('CACHE_IO', `${rel} could not be read: ${e.syscall} failed with ${e.code} (the volume that holds the model failed, not its format)`, { cause: err });
}

/**
 * A model file this process may not read (EACCES, EPERM): a deployment's fault that no wait fixes (boot-retry.ts does not
 * retry it), most often files written by a warm-up Job of another uid without group read, or a volume mounted without
 * the pod's fsGroup. Says who this process is and, where it can be seen, whose the file (or the folder that closes it) is and
 * its mode; never its path.
 */
function deniedError(rel: string, e: NodeJS.ErrnoException): RuntimeError {
  const who = processIdentity();
  const mode = (st: Stats) => `0${(st.mode & 0o7777).toString(8)}`;
  let whose = '';
  let modeAllows = false;
  if (typeof e.path === 'string') {
    // A link (a Hugging Face snapshot's into blobs/) is closed by the folder it leads into, not by its own.
    let into: string | undefined;
    try {
      into = path.dirname(path.resolve(path.dirname(e.path), readlinkSync(e.path)));
    } catch {
      // not a link
    }
    for (const [p, own] of [[e.path, true], [into ?? path.dirname(e.path), false]] as const) {
      try {
        const st = statSync(p);
        const what = own ? (st.isDirectory() ? 'the folder' : 'the file') : into ? 'the folder it links into' : 'its folder';
        whose = ` (${what} is owned by uid ${st.uid}, gid ${st.gid}, mode ${mode(st)})`;
        modeAllows = own && readable(st);
        break;
      } catch {
        // its folder may not be searched: the folder is what closes it
      }
    }
  }
  const advice = modeAllows
    ? 'its mode lets this process read it, so an ACL, a security label (SELinux) or the volume\'s export (root_squash) refuses it: fix that on the volume'
    : 'the model\'s files must be readable by that uid or one of those groups: set the pod\'s securityContext.fsGroup to the group the files belong to, ' +
      'or run the warm-up Job that wrote them with the same runAsUser (or runAsGroup) as the server; files already written without group read: chmod -R g+rX them once';
  return new RuntimeError('CACHE_IO', `${rel} could not be read: ${e.syscall} failed with ${e.code}: this process (${who}) may not read it${whose}, a permission of the deployment that no retry fixes; ${advice}`, { cause: e });
}

/** Whether a file's mode bits grant this process read (root reads any). */
function readable(st: Stats): boolean {
  const uid = process.getuid?.();
  if (uid === undefined || uid === 0) return true;
  if (st.uid === uid) return (st.mode & 0o400) !== 0;
  if ([process.getgid!(), ...(process.getgroups?.() ?? [])].includes(st.gid)) return (st.mode & 0o040) !== 0;
  return (st.mode & 0o004) !== 0;
}

/**
 * The first file of component folder `dir` (its model.onnx first: ORT opens it before any other; with `graphOnly`, only
 * it) that cannot be read to its end, with the error; undefined when all can. Asked only after ORT failed, so its cost (reading the weights once
 * more, mostly from the page cache) is paid on that path alone.
 */
async function unreadableFile(dir: string, graphOnly: boolean): Promise<{ name: string; err: unknown } | undefined> {
  let names: string[] = [];
  try {
    // A link counts as the file it leads to (weights linked in from elsewhere on the volume are read through it too).
    // One whose stat fails other than for leading nowhere (EIO, a folder it leads into that this uid may not search)
    // is kept: opening it tells why.
    const isFile = (n: string) => stat(path.join(dir, n)).then((st) => st.isFile(), (err: NodeJS.ErrnoException) => !['ENOENT', 'ENOTDIR', 'ELOOP'].includes(String(err.code)));
    if (!graphOnly) names = (await Promise.all((await readdir(dir)).map(async (n) => ((await isFile(n)) ? n : '')))).filter(Boolean).sort();
  } catch (err) {
    return { name: '', err };
  }
  const buf = Buffer.alloc(1 << 20);
  for (const name of ['model.onnx', ...names.filter((n) => n !== 'model.onnx')]) {
    try {
      const fh = await open(path.join(dir, name), 'r');
      try {
        while ((await fh.read(buf, 0, buf.length, null)).bytesRead > 0);
      } finally {
        await fh.close();
      }
    } catch (err) {
      return { name, err };
    }
  }
  return undefined;
}

/** The spec line every Git LFS pointer file starts with (git-lfs docs/spec.md); a pointer is at most a few hundred bytes. */
const LFS_POINTER = 'version https://git-lfs.github.com/spec/v1';

/** The files of a component folder that are Git LFS pointers in place of their content. */
function lfsPointers(dir: string): string[] {
  const found: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return found;
  }
  const head = Buffer.alloc(LFS_POINTER.length);
  for (const name of names.sort()) {
    const file = path.join(dir, name);
    try {
      const st = statSync(file);
      if (!st.isFile() || st.size > 1024 || st.size < head.length) continue;
      const fd = openSync(file, 'r');
      try {
        if (readSync(fd, head, 0, head.length, 0) === head.length && head.toString('latin1') === LFS_POINTER) found.push(name);
      } finally {
        closeSync(fd);
      }
    } catch {
      // unreadable: ORT's own message stands
    }
  }
  return found;
}
