// Errors: every entry point returns a status (AQUA_OK or AQUA_ERR_*) and leaves a message
// for aqua_last_error(), kept per thread (core.cpp).
#pragma once

#include <string>

#include "backend.h"

namespace aqua {

const std::string& last_error();
void set_last_error(const std::string& message);

// Sets the calling thread's message and returns `code`: `return fail(...)`.
inline int fail(int code, const std::string& message) {
  set_last_error(message);
  return code;
}

// AQUA_ERR_DRIVER, with "<what> failed: <the driver's name for code>".
inline int driver_fail(const Backend& backend, const char* what, int code) {
  return fail(AQUA_ERR_DRIVER, std::string(what) + " failed: " + backend.error_name(code));
}

}  // namespace aqua
