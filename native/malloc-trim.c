/*
 * Gives the free memory of glibc's malloc arenas back to the operating system: malloc_trim(0), which, unlike the
 * trimming free() does on its own, also releases the free pages inside an arena, not just at its top.
 *
 * An adapter set's thread allocates in an arena of its own (merge buffers, ONNX Runtime's session and its thread
 * pool's memory); when the thread ends, that memory is free but stays resident, scattered through the arena, and the
 * next threads fragment it further (docs/BENCHMARKS.md, "Long serving"). src/pipeline/lora-memory.ts calls trim()
 * once such threads have stopped ending for a while.
 *
 * trim() runs on libuv's thread pool (it takes each arena's lock in turn and walks its free chunks: tens of
 * milliseconds on a busy arena, which the calling thread's event loop should not wait for) and resolves to
 * { released, rssBefore, rssAfter, ms }: malloc_trim's answer (1 when it gave memory back), the process's resident
 * bytes before and after (/proc/self/statm), and how long it took. malloc_trim is looked up at load time, so the
 * module also loads on a C library without it (musl): `available` is then false and trim() is not exported.
 *
 * No Node headers: napi-min.h writes out the few Node-API declarations used; the symbols are resolved from the node
 * binary at load time.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef int (*MallocTrimFn)(size_t pad);
static MallocTrimFn malloc_trim_fn;
typedef int (*MalloptFn)(int param, int value);
static MalloptFn mallopt_fn;
/* glibc's M_MMAP_THRESHOLD (malloc.h), written out so that the module builds without glibc's headers too. */
#define MMAP_THRESHOLD_PARAM (-3)

#include "napi-min.h"

typedef struct {
  napi_deferred deferred;
  napi_async_work work;
  int released;
  double rss_before, rss_after, ms;
} Trim;

/* Resident bytes of the process (all threads): the second field of /proc/self/statm, in pages; -1 if unreadable. */
static double resident_bytes(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  if (!f) return -1;
  unsigned long size = 0, resident = 0;
  int n = fscanf(f, "%lu %lu", &size, &resident);
  fclose(f);
  return n == 2 ? (double)resident * (double)sysconf(_SC_PAGESIZE) : -1;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void execute(napi_env env, void *data) {
  (void)env;
  Trim *t = data;
  t->rss_before = resident_bytes();
  double t0 = now_ms();
  t->released = malloc_trim_fn(0);
  t->ms = now_ms() - t0;
  t->rss_after = resident_bytes();
}

static void set_number(napi_env env, napi_value obj, const char *key, double v) {
  napi_value x;
  napi_create_double(env, v, &x);
  napi_set_named_property(env, obj, key, x);
}

static void complete(napi_env env, napi_status status, void *data) {
  Trim *t = data;
  napi_value result;
  if (status != NAPI_OK) {
    napi_value msg;
    napi_create_string_utf8(env, "malloc_trim was not run (its work was cancelled)", NAPI_AUTO_LENGTH, &msg);
    napi_reject_deferred(env, t->deferred, msg);
  } else {
    napi_value b;
    napi_create_object(env, &result);
    napi_get_boolean(env, t->released != 0, &b);
    napi_set_named_property(env, result, "released", b);
    set_number(env, result, "rssBefore", t->rss_before);
    set_number(env, result, "rssAfter", t->rss_after);
    set_number(env, result, "ms", t->ms);
    napi_resolve_deferred(env, t->deferred, result);
  }
  napi_delete_async_work(env, t->work);
  free(t);
}

static napi_value trim(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value promise, name;
  Trim *t = calloc(1, sizeof *t);
  if (!t) {
    napi_throw_error(env, NULL, "malloc-trim: out of memory");
    return NULL;
  }
  if (napi_create_promise(env, &t->deferred, &promise) != NAPI_OK) {
    free(t);
    napi_throw_error(env, NULL, "malloc-trim: could not create a promise");
    return NULL;
  }
  napi_create_string_utf8(env, "malloc_trim", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, execute, complete, t, &t->work) != NAPI_OK ||
      napi_queue_async_work(env, t->work) != NAPI_OK) {
    napi_value msg;
    napi_create_string_utf8(env, "malloc_trim could not be queued on libuv's thread pool", NAPI_AUTO_LENGTH, &msg);
    napi_reject_deferred(env, t->deferred, msg);
    if (t->work) napi_delete_async_work(env, t->work);
    free(t);
  }
  return promise;
}

/*
 * setMmapThreshold(bytes): mallopt(M_MMAP_THRESHOLD, bytes); true when glibc took it. A fixed threshold also turns
 * off glibc's dynamic one, which otherwise rises (up to 32 MiB) each time a mapped chunk is freed, after which
 * buffers of that size are carved from the arenas instead of mapped, and stay there, fragmented, when freed.
 */
static napi_value set_mmap_threshold(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  double bytes = -1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != NAPI_OK || argc < 1 || napi_get_value_double(env, argv[0], &bytes) != NAPI_OK ||
      !(bytes >= 0 && bytes <= 32.0 * 1024 * 1024)) {
    napi_throw_error(env, NULL, "setMmapThreshold: bytes must be a number from 0 to 33554432");
    return NULL;
  }
  napi_get_boolean(env, mallopt_fn(MMAP_THRESHOLD_PARAM, (int)bytes) == 1, &result);
  return result;
}

napi_value napi_register_module_v1(napi_env env, napi_value exports) {
  if (!malloc_trim_fn) malloc_trim_fn = (MallocTrimFn)dlsym(RTLD_DEFAULT, "malloc_trim");
  if (!mallopt_fn) mallopt_fn = (MalloptFn)dlsym(RTLD_DEFAULT, "mallopt");
  napi_value available;
  napi_get_boolean(env, malloc_trim_fn != NULL, &available);
  napi_set_named_property(env, exports, "available", available);
  if (malloc_trim_fn) {
    napi_value fn;
    napi_create_function(env, "trim", NAPI_AUTO_LENGTH, trim, NULL, &fn);
    napi_set_named_property(env, exports, "trim", fn);
  }
  if (malloc_trim_fn && mallopt_fn) {
    napi_value fn;
    napi_create_function(env, "setMmapThreshold", NAPI_AUTO_LENGTH, set_mmap_threshold, NULL, &fn);
    napi_set_named_property(env, exports, "setMmapThreshold", fn);
  }
  return exports;
}
