// Shared by conmim's C++ shims (shim.cpp, dist_shim.cpp): the exception-to-error-code
// convention. Every exported function returns 0 on success, or 1 with the C++
// exception's message copied into `err` (NUL-terminated, truncated to `err_len`).
// libtorch's own errors (c10::Error) give their message without the C++ backtrace
// that `what()` appends: the backtrace says nothing a user can act on, and it would
// fill the buffer before the context the Rust side adds.
#pragma once

#include <c10/util/Exception.h>

#include <cstring>
#include <exception>

namespace conmim {
inline void copy_err(const char* what, char* err, size_t err_len) {
    if (err == nullptr || err_len == 0) return;
    std::strncpy(err, what, err_len - 1);
    err[err_len - 1] = '\0';
}
}  // namespace conmim

#define CONMIM_TRY try {
#define CONMIM_CATCH                                               \
    }                                                              \
    catch (const c10::Error& e) {                                  \
        conmim::copy_err(e.what_without_backtrace(), err, err_len); \
        return 1;                                                  \
    }                                                              \
    catch (const std::exception& e) {                              \
        conmim::copy_err(e.what(), err, err_len);                  \
        return 1;                                                  \
    }                                                              \
    catch (...) {                                                  \
        conmim::copy_err("unknown C++ exception", err, err_len);   \
        return 1;                                                  \
    }                                                              \
    return 0;
