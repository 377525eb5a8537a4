/*
 * CUDA provider options for onnxruntime-node, whose binding passes only `deviceId` to the CUDA provider.
 *
 * Loaded with RTLD_GLOBAL before onnxruntime-node's binding (src/pipeline/provider-options.ts), this module's
 * OrtGetApiBase is the one the binding binds to. It hands out ONNX Runtime's own API table, with one entry changed:
 * SessionOptionsAppendExecutionProvider_CUDA_V2 first applies the key=value pairs of CUDA_PROVIDER_OPTIONS to the
 * provider options the binding made (OrtApi::UpdateCUDAProviderOptions, ONNX Runtime's public call for this), then
 * appends as before. Every other call goes straight to ONNX Runtime.
 *
 * No headers: the few C ABI facts used are declared here. OrtApi is append-only, so an entry's index is the same in
 * every release that has it (UpdateCUDAProviderOptions and the _V2 append since API version 11, ONNX Runtime 1.11).
 * Node-API functions are resolved from the node binary at load time.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct OrtStatus OrtStatus;
typedef void *OrtFn;
typedef struct {
  const OrtFn *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum {
  API_CREATE_STATUS = 0,
  API_GET_ERROR_CODE = 1,
  API_GET_ERROR_MESSAGE = 2,
  API_RELEASE_STATUS = 93,
  API_APPEND_CUDA_V2 = 204,
  API_UPDATE_CUDA_OPTIONS = 206,
  API_MIN_VERSION = 11,
};

typedef OrtStatus *(*CreateStatusFn)(int code, const char *msg);
typedef int (*GetErrorCodeFn)(const OrtStatus *status);
typedef const char *(*GetErrorMessageFn)(const OrtStatus *status);
typedef void (*ReleaseStatusFn)(OrtStatus *status);
typedef OrtStatus *(*AppendCudaV2Fn)(void *session_options, const void *cuda_options);
typedef OrtStatus *(*UpdateCudaOptionsFn)(void *cuda_options, const char *const *keys, const char *const *values, size_t n);

#define MAX_OPTIONS 32
#define ENV_NAME "CUDA_PROVIDER_OPTIONS"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static const OrtApiBase *real_base;
static const OrtFn *table;          /* the API table patched (ONNX Runtime returns one table for every version) */
static AppendCudaV2Fn real_append;
static unsigned appends, applied;
static char last_error[1024];
static char last_options[2048];
static char last_pairs[2048];       /* the pairs as parsed (key=value,...), whether or not ONNX Runtime took them */

static const OrtApiBase *real_api_base(void) {
  if (real_base) return real_base;
  /* The binding loads libonnxruntime.so.1 as its own dependency (not global): find it by its soname. */
  void *lib = dlopen("libonnxruntime.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!lib) return NULL;
  const OrtApiBase *(*get)(void) = (const OrtApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
  dlclose(lib);
  real_base = get ? get() : NULL;
  return real_base;
}

static OrtStatus *error_status(const OrtFn *api, int code, const char *what, const char *detail) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s: %s", what, detail);
  pthread_mutex_lock(&lock);
  snprintf(last_error, sizeof last_error, "%s", msg);
  pthread_mutex_unlock(&lock);
  return ((CreateStatusFn)api[API_CREATE_STATUS])(code, msg);
}

static char *trim(char *s) {
  while (isspace((unsigned char)*s)) s++;
  char *e = s + strlen(s);
  while (e > s && isspace((unsigned char)e[-1])) *--e = '\0';
  return s;
}

/* ONNX Runtime's messages read "<source file>:<line> <C++ signature> [ONNXRuntimeError] : 1 : FAIL : <message>":
 * only the message is the user's business (and the rest would run past a boot reason's length). */
static const char *ort_message(const char *m) {
  const char *p = strstr(m, "[ONNXRuntimeError] : ");
  if (!p) return m;
  for (int i = 0; i < 3 && p; i++) {
    p = strstr(p, " : ");
    if (p) p += 3;
  }
  return p && *p ? p : m;
}

/*
 * key=value pairs separated by ',' or ';', whitespace around keys and values ignored: the same rule as the runtime's
 * config check (src/config.ts), which refuses anything else before ONNX Runtime loads.
 */
static OrtStatus *append_cuda_v2(void *session_options, const void *cuda_options) {
  const OrtFn *api = table;
  const char *env = getenv(ENV_NAME);
  pthread_mutex_lock(&lock);
  appends++;
  pthread_mutex_unlock(&lock);
  if (env && *env) {
    char buf[2048], pairs[2048] = "";
    const char *keys[MAX_OPTIONS], *values[MAX_OPTIONS];
    size_t n = 0;
    if (strlen(env) >= sizeof buf) return error_status(api, 2, ENV_NAME, "longer than 2047 bytes");
    strcpy(buf, env);
    for (char *save = NULL, *entry = strtok_r(buf, ",;", &save); entry; entry = strtok_r(NULL, ",;", &save)) {
      entry = trim(entry);
      if (*entry == '\0') continue;
      char *eq = strchr(entry, '=');
      if (!eq) return error_status(api, 2, ENV_NAME, "each entry must be key=value");
      *eq = '\0';
      char *key = trim(entry), *value = trim(eq + 1);
      if (*key == '\0' || *value == '\0') return error_status(api, 2, ENV_NAME, "each entry must be key=value");
      if (n == MAX_OPTIONS) return error_status(api, 2, ENV_NAME, "more than 32 entries");
      keys[n] = key;
      values[n] = value;
      n++;
      size_t used = strlen(pairs);
      snprintf(pairs + used, sizeof pairs - used, "%s%s=%s", used ? "," : "", key, value);
    }
    pthread_mutex_lock(&lock);
    snprintf(last_pairs, sizeof last_pairs, "%s", pairs);
    pthread_mutex_unlock(&lock);
    if (n > 0) {
      /* device_id is the binding's (the struct's first field: the binding writes it there). It is not passed along:
       * the option's parser starts CUDA (cudaGetDeviceCount), so a driver problem would read as an options error. The
       * call resets every field it is not given to its default, device_id included, so it is put back after. */
      const int device = *(const int *)cuda_options;
      OrtStatus *st = ((UpdateCudaOptionsFn)api[API_UPDATE_CUDA_OPTIONS])((void *)cuda_options, keys, values, n);
      if (st) {
        int code = ((GetErrorCodeFn)api[API_GET_ERROR_CODE])(st);
        OrtStatus *out = error_status(api, code, ENV_NAME, ort_message(((GetErrorMessageFn)api[API_GET_ERROR_MESSAGE])(st)));
        ((ReleaseStatusFn)api[API_RELEASE_STATUS])(st);
        return out;
      }
      *(int *)cuda_options = device;
      pthread_mutex_lock(&lock);
      applied++;
      snprintf(last_options, sizeof last_options, "%s", pairs);
      pthread_mutex_unlock(&lock);
    }
  }
  return real_append(session_options, cuda_options);
}

/* The protection of the mapping holding `addr` (PROT_* bits), from /proc/self/maps; -1 if not found. */
static int protection_of(const void *addr) {
  FILE *f = fopen("/proc/self/maps", "r");
  if (!f) return -1;
  char line[512];
  int prot = -1;
  while (fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    char perms[5];
    if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) != 3) continue;
    if ((uintptr_t)addr >= lo && (uintptr_t)addr < hi) {
      prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) | (perms[2] == 'x' ? PROT_EXEC : 0);
      break;
    }
  }
  fclose(f);
  return prot;
}

/* The table lives in ONNX Runtime's read-only data (RELRO): the one entry is swapped in place, with its page made
 * writable for the moment and then given back the protection it had. */
static void patch(const OrtFn *api) {
  pthread_mutex_lock(&lock);
  if (table == NULL) {
    long page = sysconf(_SC_PAGESIZE);
    OrtFn *slot = (OrtFn *)&api[API_APPEND_CUDA_V2];
    void *start = (void *)((uintptr_t)slot & ~(uintptr_t)(page - 1));
    int prot = protection_of(slot);
    if (prot < 0 || (prot & PROT_EXEC) || !(prot & PROT_READ)) {
      snprintf(last_error, sizeof last_error, "could not patch ONNX Runtime's API table (its page is not plain data)");
    } else if ((prot & PROT_WRITE) || mprotect(start, (size_t)page, prot | PROT_WRITE) == 0) {
      real_append = (AppendCudaV2Fn)*slot;
      *slot = (OrtFn)append_cuda_v2;
      if (!(prot & PROT_WRITE)) mprotect(start, (size_t)page, prot);
      table = api;
    } else {
      snprintf(last_error, sizeof last_error, "could not patch ONNX Runtime's API table (mprotect failed)");
    }
  }
  pthread_mutex_unlock(&lock);
}

static const OrtFn *get_api(uint32_t version) {
  const OrtFn *api = real_base->GetApi(version);
  if (api && version >= API_MIN_VERSION && (table == NULL || table == api)) patch(api);
  return api;
}

static OrtApiBase base;

const OrtApiBase *OrtGetApiBase(void) {
  const OrtApiBase *real = real_api_base();
  if (!real) return NULL;
  base.GetApi = get_api;
  base.GetVersionString = real->GetVersionString;
  return &base;
}

/* ---- Node-API: stats() for the runtime's log and the tests --------------------------------------------------- */

#include "napi-min.h"

static void set_u32(napi_env env, napi_value obj, const char *key, uint32_t v) {
  napi_value x;
  napi_create_uint32(env, v, &x);
  napi_set_named_property(env, obj, key, x);
}

static void set_str(napi_env env, napi_value obj, const char *key, const char *s) {
  napi_value x;
  napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &x);
  napi_set_named_property(env, obj, key, x);
}

static napi_value stats(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value obj, b;
  napi_create_object(env, &obj);
  pthread_mutex_lock(&lock);
  napi_get_boolean(env, table != NULL, &b);
  napi_set_named_property(env, obj, "patched", b);
  set_u32(env, obj, "appends", appends);
  set_u32(env, obj, "applied", applied);
  set_str(env, obj, "lastError", last_error);
  set_str(env, obj, "options", last_options);
  set_str(env, obj, "pairs", last_pairs);
  pthread_mutex_unlock(&lock);
  return obj;
}

napi_value napi_register_module_v1(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "stats", NAPI_AUTO_LENGTH, stats, NULL, &fn);
  napi_set_named_property(env, exports, "stats", fn);
  return exports;
}
