/*
 * exit(status): ends the process at once with _exit(2), for a stop that calls on a cache volume which stopped answering
 * never returned to (src/storage/pending-io.ts). process.exit() would first join the worker threads and libuv's pool
 * threads blocked in those calls (for good) and run ONNX Runtime's static destructors under a worker still inside it.
 *
 * The server ends such a stop by its signal's default action, but where node is PID 1 of its pid namespace (the
 * image's entrypoint: no init) a signal it has no handler for is not delivered, whoever sends it; _exit() with the
 * status the signal would have given (128 + its number) is what is left.
 */
#include <unistd.h>

#include "napi-min.h"

static napi_value exit_now(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  double status = 1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != NAPI_OK || argc < 1 || napi_get_value_double(env, argv[0], &status) != NAPI_OK ||
      !(status >= 0 && status <= 255)) {
    napi_throw_error(env, NULL, "exit: status must be a number from 0 to 255");
    return NULL;
  }
  _exit((int)status);
}

napi_value napi_register_module_v1(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "exit", NAPI_AUTO_LENGTH, exit_now, NULL, &fn);
  napi_set_named_property(env, exports, "exit", fn);
  return exports;
}
