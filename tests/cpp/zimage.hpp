// zimage.hpp: a small C++17 RAII wrapper over the zimage C API (zimage.h).
//
// Header-only and self-contained: copy it into your project (game engine plugin, service) and
// adapt it. It adds no behaviour of its own:
// - every handle is a move-only object that frees itself;
// - a failed call throws zimage::Error, which carries the zimage_result code;
// - callbacks are std::function; an exception thrown by the progress, preview or token callback
//   stops the generation or enhancement and is rethrown from generate(), edit() or enhance()
//   (exceptions never cross the C boundary).
//
// Thread safety is the C API's: a Pipeline may generate and an Enhancer enhance from several
// threads at once, and cancel() may be called from any thread.
#ifndef ZIMAGE_HPP
#define ZIMAGE_HPP

#include "zimage.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

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

// Point zimage_load_params::tensorrt at one of these (it is read during the load call only).
inline zimage_tensorrt_params tensorrt_params() {
    zimage_tensorrt_params params;
    check(zimage_tensorrt_params_init(&params));
    return params;
}

inline zimage_generate_params generate_params() {
    zimage_generate_params params;
    check(zimage_generate_params_init(&params));
    return params;
}

// For Pipeline::edit(): the package's steps and guidance, the last reference's size.
inline zimage_edit_params edit_params() {
    zimage_edit_params params;
    check(zimage_edit_params_init(&params));
    return params;
}

inline zimage_enhance_params enhance_params() {
    zimage_enhance_params params;
    check(zimage_enhance_params_init(&params));
    return params;
}

// Called with a zimage_log_level and the message, one call at a time (from the calling thread
// or, during a load or for another thread's queued message, from another thread); it must not
// throw (the trampoline runs inside zimage).
using LogFunction = std::function<void(std::uint32_t level, const char *message)>;

namespace detail {
template <typename T, void (*Free)(T *)>
struct Deleter {
    void operator()(T *handle) const noexcept { Free(handle); }
};

inline void log_trampoline(std::uint32_t level, const char *message, void *user_data) {
    try {
        (*static_cast<LogFunction *>(user_data))(level, message);
    } catch (...) {
        // A logger that throws loses that message; it must not unwind into zimage.
    }
}

// Points `params` at `log` (kept on the heap so its address survives moves) when one is given.
inline std::unique_ptr<LogFunction> set_log(zimage_load_params &params, LogFunction log) {
    if (!log) return nullptr;
    auto function = std::make_unique<LogFunction>(std::move(log));
    params.log_callback = &log_trampoline;
    params.log_user_data = function.get();
    return function;
}
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
    // The prompt the images were made from, when the parameters named an enhancer.
    std::optional<std::string> enhanced_prompt() const {
        const char *prompt = zimage_image_list_enhanced_prompt(handle_.get());
        if (!prompt) return std::nullopt;
        return std::string(prompt);
    }

private:
    std::unique_ptr<zimage_image_list, detail::Deleter<zimage_image_list, zimage_image_list_free>> handle_;
};

// A LoRA file read and checked against one pipeline's transformer (Pipeline::load_lora()).
// Nothing changes until Pipeline::set_adapters(); a pipeline keeps its own reference to the
// adapters set on it, so an Adapter may be destroyed while they stay applied.
class Adapter {
public:
    explicit Adapter(zimage_adapter *handle) : handle_(handle) {}
    const zimage_adapter *get() const noexcept { return handle_.get(); }

private:
    std::unique_ptr<zimage_adapter, detail::Deleter<zimage_adapter, zimage_adapter_free>> handle_;
};

// One adapter and its strength for Pipeline::set_adapters() (diffusers' set_adapters weight:
// 1.0 = as trained, 0 = off; finite).
struct AdapterScale {
    const Adapter &adapter;
    float scale = 1.0f;
};

// Called after each denoising step; return false to stop (generate() or edit() then throws
// Error(ZIMAGE_RESULT_CANCELLED)).
using ProgressFunction = std::function<bool(std::uint32_t step, std::uint32_t total, double elapsed_seconds)>;

// Receives the previews that `params.preview_count` asks for (zimage_preview_callback): after
// step `step` of `total`, one RGB8 view per image at the request's size, valid only during the
// call (copy the pixels to keep them).
using PreviewFunction =
    std::function<void(std::uint32_t step, std::uint32_t total, const std::vector<zimage_image> &images)>;

class Pipeline {
public:
    // `params.log_callback` is replaced by `log` when one is given.
    static Pipeline load(const std::string &package_dir, zimage_load_params params = load_params(),
                         LogFunction log = nullptr) {
        Pipeline pipeline;
        pipeline.log_ = detail::set_log(params, std::move(log));
        zimage_pipeline *handle = nullptr;
        check(zimage_pipeline_load(package_dir.c_str(), &params, &handle));
        pipeline.handle_.reset(handle);
        return pipeline;
    }

    // Generate parameters with this package's recommended steps and guidance (the base model's
    // differ from Turbo's); fill in the prompt and change what else differs.
    zimage_generate_params recommended_params() const {
        zimage_generate_params params;
        check(zimage_generate_params_init_for_pipeline(handle_.get(), &params));
        return params;
    }

    Images generate(zimage_generate_params params, const ProgressFunction &progress = nullptr,
                    const PreviewFunction &preview = nullptr) const {
        return run(zimage_generate, params, progress, preview);
    }

    // Images from reference pictures and an instruction (packages with the "edit" pipeline:
    // Z-Image-Omni). Fill `params.prompt` and `params.images` (views borrowed for the call).
    Images edit(zimage_edit_params params, const ProgressFunction &progress = nullptr,
                const PreviewFunction &preview = nullptr) const {
        return run(zimage_edit, params, progress, preview);
    }

    // Reads the LoRA file at `path` and checks it against this pipeline's transformer
    // (Error(ZIMAGE_RESULT_LORA) when it is for another model, ZIMAGE_RESULT_IO when unreadable).
    Adapter load_lora(const std::string &path) const {
        zimage_adapter *adapter = nullptr;
        check(zimage_lora_adapter_init(handle_.get(), path.c_str(), &adapter));
        return Adapter(adapter);
    }

    // Replaces the adapters later generations apply, all or nothing (a refused set leaves the
    // previous one active); an empty list gives back the base model exactly.
    void set_adapters(const std::vector<AdapterScale> &adapters) const {
        std::vector<zimage_adapter_setting> settings;
        settings.reserve(adapters.size());
        for (const AdapterScale &a : adapters) settings.push_back({a.adapter.get(), a.scale});
        check(zimage_pipeline_set_adapters(handle_.get(), settings.data(), settings.size()));
    }

    // Attaches the package's ControlNet `name` (then generate() takes control_image), or
    // detaches it; waits for generations running on this pipeline.
    void set_controlnet(const std::string &name) const { check(zimage_pipeline_set_controlnet(handle_.get(), name.c_str())); }
    void detach_controlnet() const { check(zimage_pipeline_set_controlnet(handle_.get(), nullptr)); }

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

    struct StepContext {
        const ProgressFunction *progress;
        const PreviewFunction *preview;
        // The caller's own C callbacks and their user data, set in the params before the call:
        // the wrapper's user data replaces theirs, so the trampolines forward to them where no
        // function of the wrapper takes their place (they got the wrapper's context instead).
        zimage_progress_callback raw_progress;
        zimage_preview_callback raw_preview;
        void *raw_user_data;
        std::exception_ptr exception;
    };

    // Calls `call` (zimage_generate or zimage_edit) with `progress` and `preview` behind the C
    // callbacks; an exception thrown by either is rethrown here, after zimage has returned.
    template <typename Params>
    Images run(zimage_result (*call)(const zimage_pipeline *, const Params *, zimage_image_list **), Params &params,
               const ProgressFunction &progress, const PreviewFunction &preview) const {
        StepContext context{&progress, &preview, params.progress_callback, params.preview_callback,
                            params.progress_user_data, nullptr};
        // With a preview function too: previews get progress_user_data, and the progress
        // trampoline is what stops the run after the preview function threw (it returns void).
        if (progress || preview) {
            params.progress_callback = &Pipeline::progress_trampoline;
            params.progress_user_data = &context;
            if (preview || params.preview_callback) params.preview_callback = &Pipeline::preview_trampoline;
        }
        zimage_image_list *images = nullptr;
        zimage_result result = call(handle_.get(), &params, &images);
        if (context.exception) std::rethrow_exception(context.exception);
        check(result);
        return Images(images);
    }

    static bool progress_trampoline(std::uint32_t step, std::uint32_t total, double elapsed, void *user_data) {
        auto *context = static_cast<StepContext *>(user_data);
        if (context->exception) return false;  // the preview function threw
        if (!*context->progress) {
            return context->raw_progress == nullptr ||
                   context->raw_progress(step, total, elapsed, context->raw_user_data);
        }
        try {
            return (*context->progress)(step, total, elapsed);
        } catch (...) {
            context->exception = std::current_exception();
            return false;
        }
    }

    static void preview_trampoline(std::uint32_t step, std::uint32_t total, const zimage_image *images,
                                   std::uint32_t count, void *user_data) {
        auto *context = static_cast<StepContext *>(user_data);
        if (!*context->preview) {
            if (context->raw_preview != nullptr) context->raw_preview(step, total, images, count, context->raw_user_data);
            return;
        }
        try {
            (*context->preview)(step, total, std::vector<zimage_image>(images, images + count));
        } catch (...) {
            context->exception = std::current_exception();
        }
    }

    // The log function lives on the heap so its address, given to zimage, survives moves of
    // the Pipeline. Declared before handle_ so that it is destroyed after the pipeline.
    std::unique_ptr<LogFunction> log_;
    std::unique_ptr<zimage_pipeline, detail::Deleter<zimage_pipeline, zimage_pipeline_free>> handle_;
};

// Called for each generated token: its index (from 0), id, the text it completes (often empty
// mid-character) and whether it is inside the <think> block. Return false to stop (enhance()
// then throws Error(ZIMAGE_RESULT_CANCELLED)).
using TokenFunction =
    std::function<bool(std::uint32_t index, std::uint32_t token_id, const char *text, bool thinking)>;

struct Enhancement {
    std::string text;        // the rewritten prompt
    std::uint64_t seed = 0;  // the sampling seed used; 0 with greedy decoding
};

// A prompt enhancer (zimage_enhancer). Set `params.enhancer = enhancer.get()` in
// zimage_generate_params to enhance before generating.
class Enhancer {
public:
    // A standalone enhancer package, or a Z-Image package with a decoder.
    static Enhancer load(const std::string &package_dir, zimage_load_params params = load_params(),
                         LogFunction log = nullptr) {
        Enhancer enhancer;
        enhancer.log_ = detail::set_log(params, std::move(log));
        zimage_enhancer *handle = nullptr;
        check(zimage_enhancer_load(package_dir.c_str(), &params, &handle));
        enhancer.handle_.reset(handle);
        return enhancer;
    }

    // The enhancer of the pipeline's package, cancelled by pipeline.cancel() too.
    static Enhancer attach(const Pipeline &pipeline, zimage_load_params params = load_params(),
                           LogFunction log = nullptr) {
        Enhancer enhancer;
        enhancer.log_ = detail::set_log(params, std::move(log));
        zimage_enhancer *handle = nullptr;
        check(zimage_enhancer_attach(pipeline.get(), &params, &handle));
        enhancer.handle_.reset(handle);
        return enhancer;
    }

    Enhancement enhance(const std::string &prompt, const zimage_enhance_params &params = enhance_params(),
                        const TokenFunction &on_token = nullptr) const {
        TokenContext context{&on_token, nullptr};
        char *text = nullptr;
        Enhancement result;
        zimage_result code = zimage_enhance(handle_.get(), prompt.c_str(), &params,
                                            on_token ? &Enhancer::token_trampoline : nullptr, &context, &text,
                                            &result.seed);
        if (context.exception) std::rethrow_exception(context.exception);
        check(code);
        std::unique_ptr<char, detail::Deleter<char, zimage_string_free>> owned(text);
        result.text = owned.get();
        return result;
    }

    // Stops the enhancements running now, from any thread.
    void cancel() const { check(zimage_enhancer_cancel(handle_.get())); }

    const zimage_enhancer *get() const noexcept { return handle_.get(); }

private:
    Enhancer() = default;

    struct TokenContext {
        const TokenFunction *function;
        std::exception_ptr exception;
    };

    static bool token_trampoline(std::uint32_t index, std::uint32_t token_id, const char *text, bool thinking,
                                 void *user_data) {
        auto *context = static_cast<TokenContext *>(user_data);
        try {
            return (*context->function)(index, token_id, text, thinking);
        } catch (...) {
            context->exception = std::current_exception();
            return false;
        }
    }

    std::unique_ptr<LogFunction> log_;  // destroyed after the enhancer (declared first)
    std::unique_ptr<zimage_enhancer, detail::Deleter<zimage_enhancer, zimage_enhancer_free>> handle_;
};

}  // namespace zimage

#endif  // ZIMAGE_HPP
