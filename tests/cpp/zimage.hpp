// zimage.hpp: a small C++17 RAII wrapper over the zimage C API (zimage.h).
//
// Header-only and self-contained: copy it into your project (game engine plugin, service) and
// adapt it. It adds no behaviour of its own:
// - every handle is a move-only object that frees itself;
// - a failed call throws zimage::Error, which carries the zimage_result code;
// - callbacks are std::function; an exception thrown by the progress callback stops the
//   generation and is rethrown from generate() (exceptions never cross the C boundary).
//
// Thread safety is the C API's: a Pipeline may generate from several threads at once, and
// cancel() may be called from any thread.
#ifndef ZIMAGE_HPP
#define ZIMAGE_HPP

#include "zimage.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

namespace zimage {

class Error : public std::runtime_error {
public:
    Error(zimage_result code, const std::string &message) : std::runtime_error(message), code_(code) {}
    zimage_result code() const noexcept { return code_; }

private:
    zimage_result code_;
};

// Throws for anything but ZIMAGE_RESULT_OK, with the calling thread's last error message.
inline void check(zimage_result result) {
    if (result != ZIMAGE_RESULT_OK) throw Error(result, zimage_last_error_message());
}

inline zimage_load_params load_params() {
    zimage_load_params params;
    check(zimage_load_params_init(&params));
    return params;
}

inline zimage_generate_params generate_params() {
    zimage_generate_params params;
    check(zimage_generate_params_init(&params));
    return params;
}

namespace detail {
template <typename T, void (*Free)(T *)>
struct Deleter {
    void operator()(T *handle) const noexcept { Free(handle); }
};
}  // namespace detail

// An encoded prompt (zimage_encode_prompt); use get() as prompt_embedding in the parameters.
class PromptEmbedding {
public:
    explicit PromptEmbedding(zimage_prompt_embedding *handle) : handle_(handle) {}
    const zimage_prompt_embedding *get() const noexcept { return handle_.get(); }
    std::size_t token_count() const noexcept { return zimage_prompt_embedding_token_count(get()); }
    bool truncated() const noexcept { return zimage_prompt_embedding_truncated(get()); }

private:
    std::unique_ptr<zimage_prompt_embedding, detail::Deleter<zimage_prompt_embedding, zimage_prompt_embedding_free>>
        handle_;
};

// The images of one generation. The pixels of every zimage_image obtained from it live as long
// as this object.
class Images {
public:
    explicit Images(zimage_image_list *handle) : handle_(handle) {}
    std::size_t size() const noexcept { return zimage_image_list_count(handle_.get()); }
    std::uint64_t seed() const noexcept { return zimage_image_list_seed(handle_.get()); }
    zimage_image operator[](std::size_t index) const {
        zimage_image image;
        check(zimage_image_list_get(handle_.get(), index, &image));
        return image;
    }
    // Only when the generation set return_latents.
    zimage_latents latents() const {
        zimage_latents latents;
        check(zimage_image_list_latents(handle_.get(), &latents));
        return latents;
    }

private:
    std::unique_ptr<zimage_image_list, detail::Deleter<zimage_image_list, zimage_image_list_free>> handle_;
};

// Called with a zimage_log_level and the message; possibly from several threads at once.
using LogFunction = std::function<void(std::uint32_t level, const char *message)>;
// Called after each denoising step; return false to stop (generate() then throws
// Error(ZIMAGE_RESULT_CANCELLED)).
using ProgressFunction = std::function<bool(std::uint32_t step, std::uint32_t total, double elapsed_seconds)>;

class Pipeline {
public:
    // `params.log_callback` is replaced by `log` when one is given.
    static Pipeline load(const std::string &package_dir, zimage_load_params params = load_params(),
                         LogFunction log = nullptr) {
        Pipeline pipeline;
        if (log) {
            pipeline.log_ = std::make_unique<LogFunction>(std::move(log));
            params.log_callback = &Pipeline::log_trampoline;
            params.log_user_data = pipeline.log_.get();
        }
        zimage_pipeline *handle = nullptr;
        check(zimage_pipeline_load(package_dir.c_str(), &params, &handle));
        pipeline.handle_.reset(handle);
        return pipeline;
    }

    Images generate(zimage_generate_params params, const ProgressFunction &progress = nullptr) const {
        ProgressContext context{&progress, nullptr};
        if (progress) {
            params.progress_callback = &Pipeline::progress_trampoline;
            params.progress_user_data = &context;
        }
        zimage_image_list *images = nullptr;
        zimage_result result = zimage_generate(handle_.get(), &params, &images);
        if (context.exception) std::rethrow_exception(context.exception);
        check(result);
        return Images(images);
    }

    PromptEmbedding encode_prompt(const std::string &prompt, std::uint32_t max_sequence_length = 0) const {
        zimage_prompt_embedding *embedding = nullptr;
        check(zimage_encode_prompt(handle_.get(), prompt.c_str(), max_sequence_length, &embedding));
        return PromptEmbedding(embedding);
    }

    // Stops the generations running now, from any thread.
    void cancel() const { check(zimage_cancel(handle_.get())); }

    const zimage_pipeline *get() const noexcept { return handle_.get(); }

private:
    Pipeline() = default;

    struct ProgressContext {
        const ProgressFunction *function;
        std::exception_ptr exception;
    };

    static bool progress_trampoline(std::uint32_t step, std::uint32_t total, double elapsed, void *user_data) {
        auto *context = static_cast<ProgressContext *>(user_data);
        try {
            return (*context->function)(step, total, elapsed);
        } catch (...) {
            context->exception = std::current_exception();
            return false;
        }
    }

    static void log_trampoline(std::uint32_t level, const char *message, void *user_data) {
        try {
            (*static_cast<LogFunction *>(user_data))(level, message);
        } catch (...) {
            // A logger that throws loses that message; it must not unwind into zimage.
        }
    }

    // The log function lives on the heap so its address, given to zimage, survives moves of
    // the Pipeline. Declared before handle_ so that it is destroyed after the pipeline.
    std::unique_ptr<LogFunction> log_;
    std::unique_ptr<zimage_pipeline, detail::Deleter<zimage_pipeline, zimage_pipeline_free>> handle_;
};

}  // namespace zimage

#endif  // ZIMAGE_HPP
