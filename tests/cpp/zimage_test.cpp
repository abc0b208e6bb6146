// A C++17 client of zimage through the RAII wrapper zimage.hpp: goldens on the tiny model,
// errors as exceptions with their codes, two threads generating on one pipeline, cancel from
// a std::thread, an exception thrown by a progress callback, previews, the prompt enhancer (goldens,
// token callback, parameter errors, generation with enhancement), and LoRA adapters, editing
// and ControlNet against their diffusers goldens.
//
// Same arguments and environment as tests/c/zimage_test.c (run by ffi/tests/c_clients.rs):
//   zimage_test PACKAGE_DIR CASES_FILE IO_FIXTURE_DIR MISMATCHED_PACKAGE_DIR ENHANCER_DIR
//               ENHANCER_CASES_FILE [MAX_CASES]
#include "zimage.hpp"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK failed: " #cond << std::endl; \
            failures++;                                                                      \
        }                                                                                    \
    } while (0)

// Runs `body`, which must throw zimage::Error with `expected`.
template <typename Body>
void check_throws(zimage_result expected, Body body, int line) {
    try {
        body();
        std::cerr << __FILE__ << ":" << line << ": no exception, expected code " << expected << std::endl;
        failures++;
    } catch (const zimage::Error &e) {
        if (e.code() != expected || std::strlen(e.what()) == 0) {
            std::cerr << __FILE__ << ":" << line << ": code " << e.code() << " (" << e.what() << "), expected "
                      << expected << std::endl;
            failures++;
        }
    }
}
#define CHECK_THROWS(expected, ...) check_throws((expected), [&] { __VA_ARGS__; }, __LINE__)

std::vector<unsigned char> read_file(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct GoldenCase {
    std::string name, prompt, negative_prompt;
    unsigned width = 0, height = 0, steps = 0, count = 0, max_sequence_length = 0;
    float guidance_scale = 0, cfg_normalization = 0, cfg_truncation = 0;
    unsigned long long seed = 0;
    double strength = 0;
    std::string init_path, mask_path, images_path, latents_path;
    std::vector<unsigned char> init, mask;  // loaded by params()

    zimage_generate_params params() {
        zimage_generate_params p = zimage::generate_params();
        p.prompt = prompt.c_str();
        p.negative_prompt = negative_prompt.empty() ? nullptr : negative_prompt.c_str();
        p.width = width;
        p.height = height;
        p.steps = steps;
        p.guidance_scale = guidance_scale;
        p.cfg_normalization = cfg_normalization;
        p.cfg_truncation = cfg_truncation;
        p.seed = seed;
        p.count = count;
        p.max_sequence_length = max_sequence_length;
        p.strength = strength;
        if (init_path != "-") {
            init = read_file(init_path);
            p.init_image = zimage_image{init.data(), width, height, 0};
        }
        if (mask_path != "-") {
            mask = read_file(mask_path);
            p.mask = zimage_image{mask.data(), width, height, 0};
        }
        return p;
    }
};

// The tab-separated fields of one line of a cases file (empty fields kept).
std::vector<std::string> split_tabs(const std::string &line) {
    std::vector<std::string> f;
    std::stringstream fields(line);
    std::string field;
    while (std::getline(fields, field, '\t')) f.push_back(field);
    if (!line.empty() && line.back() == '\t') f.push_back("");
    return f;
}

// The lines of the cases file named by environment variable `name` (empty when unset).
std::vector<std::vector<std::string>> cases_from_env(const char *name) {
    std::vector<std::vector<std::string>> lines;
    const char *path = std::getenv(name);
    if (!path) {
        std::cerr << name << " must be set" << std::endl;
        failures++;
        return lines;
    }
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) lines.push_back(split_tabs(line));
    CHECK(!lines.empty());
    return lines;
}

std::vector<GoldenCase> read_cases(const std::string &path) {
    std::vector<GoldenCase> cases;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
        std::vector<std::string> f = split_tabs(line);
        if (f.size() != 17) throw std::runtime_error("bad case line: " + line.substr(0, 80));
        GoldenCase c;
        c.name = f[0];
        c.prompt = f[1];
        c.negative_prompt = f[2];
        c.width = std::stoul(f[3]);
        c.height = std::stoul(f[4]);
        c.steps = std::stoul(f[5]);
        c.guidance_scale = std::stof(f[6]);
        c.cfg_normalization = std::stof(f[7]);
        c.cfg_truncation = std::stof(f[8]);
        c.seed = std::stoull(f[9]);
        c.count = std::stoul(f[10]);
        c.max_sequence_length = std::stoul(f[11]);
        c.strength = std::stod(f[12]);
        c.init_path = f[13];
        c.mask_path = f[14];
        c.images_path = f[15];
        c.latents_path = f[16];
        cases.push_back(std::move(c));
    }
    return cases;
}

struct EnhancerCase {
    std::string name, prompt;
    std::uint32_t max_new_tokens = 0;
    std::string text, raw_text;
};

std::vector<EnhancerCase> read_enhancer_cases(const std::string &path) {
    std::vector<EnhancerCase> cases;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
        std::vector<std::string> f = split_tabs(line);
        if (f.size() != 5) throw std::runtime_error("bad enhancer case line: " + line.substr(0, 80));
        cases.push_back({f[0], f[1], std::uint32_t(std::stoul(f[2])), f[3], f[4]});
    }
    return cases;
}

// The first image is `width` x `height` and within 1 level of `expected`, channel by channel.
bool same_pixels(const zimage::Images &images, std::size_t index, const std::vector<unsigned char> &expected,
                 unsigned width, unsigned height, const std::string &name) {
    const std::size_t bytes = std::size_t(width) * height * 3;
    zimage_image image = images[index];
    if (image.width != width || image.height != height || expected.size() < (index + 1) * bytes) {
        std::cerr << name << " image " << index << ": " << image.width << "x" << image.height << ", golden " << width
                  << "x" << height << std::endl;
        return false;
    }
    for (std::size_t k = 0; k < bytes; k++) {
        if (std::abs(int(image.pixels[k]) - int(expected[index * bytes + k])) > 1) {
            std::cerr << name << " image " << index << ": byte " << k << " is " << int(image.pixels[k]) << ", golden "
                      << int(expected[index * bytes + k]) << std::endl;
            return false;
        }
    }
    return true;
}

// Every image within 1 level of the golden, channel by channel.
bool matches_golden(const zimage::Images &images, const GoldenCase &c) {
    const std::vector<unsigned char> expected = read_file(c.images_path);
    const std::size_t bytes = std::size_t(c.width) * c.height * 3;
    if (images.size() != c.count || expected.size() != bytes * c.count || images.seed() != c.seed) return false;
    for (std::size_t i = 0; i < images.size(); i++) {
        if (!same_pixels(images, i, expected, c.width, c.height, c.name)) return false;
    }
    return true;
}

zimage_generate_params small_params() {
    zimage_generate_params p = zimage::generate_params();
    p.prompt = "a lighthouse at dusk";
    p.width = 64;
    p.height = 64;
    p.steps = 2;
    p.seed = 1;
    return p;
}

void test_errors(const std::string &folder_manifest, const std::string &mismatched_package) {
    CHECK_THROWS(ZIMAGE_RESULT_PACKAGE, zimage::Pipeline::load("/nonexistent/package"));
    CHECK_THROWS(ZIMAGE_RESULT_PACKAGE, zimage::Pipeline::load(folder_manifest));
    zimage_load_params params = zimage::load_params();
    params.device = 7;
    CHECK_THROWS(ZIMAGE_RESULT_INVALID_ARGUMENT, zimage::Pipeline::load(folder_manifest, params));
    params = zimage::load_params();
    zimage_tensorrt_params trt = zimage::tensorrt_params();
    trt.precision = 7;
    params.tensorrt = &trt;
    CHECK_THROWS(ZIMAGE_RESULT_INVALID_ARGUMENT, zimage::Pipeline::load(folder_manifest, params));
    params = zimage::load_params();
    params.device = ZIMAGE_DEVICE_TENSORRT;
    CHECK_THROWS(ZIMAGE_RESULT_PROVIDER, zimage::Pipeline::load(mismatched_package, params));
    zimage::Pipeline mismatched = zimage::Pipeline::load(mismatched_package);
    CHECK_THROWS(ZIMAGE_RESULT_INFERENCE, mismatched.generate(small_params()));
}

void test_goldens(const zimage::Pipeline &pipeline, std::vector<GoldenCase> &cases) {
    for (GoldenCase &c : cases) {
        std::cerr << "case " << c.name << std::endl;
        CHECK(matches_golden(pipeline.generate(c.params()), c));
    }
    // Encode once, generate with the embeddings: the same pixels.
    GoldenCase &c = cases.front();
    zimage::PromptEmbedding positive = pipeline.encode_prompt(c.prompt, c.max_sequence_length);
    CHECK(positive.token_count() > 0 && !positive.truncated());
    zimage_generate_params params = c.params();
    params.prompt = nullptr;
    params.prompt_embedding = positive.get();
    CHECK(matches_golden(pipeline.generate(params), c));
}

// Two threads generate on one pipeline at once; each result is the golden one.
void test_concurrent_generations(const zimage::Pipeline &pipeline, std::vector<GoldenCase> &cases) {
    GoldenCase &a = cases.front();
    GoldenCase &b = cases.size() > 1 ? cases[1] : cases.front();
    zimage_generate_params params_a = a.params(), params_b = b.params();
    std::atomic<bool> ok_a{false}, ok_b{false};
    std::thread thread_a([&] { ok_a = matches_golden(pipeline.generate(params_a), a); });
    std::thread thread_b([&] { ok_b = matches_golden(pipeline.generate(params_b), b); });
    thread_a.join();
    thread_b.join();
    CHECK(ok_a && ok_b);
}

// Cancel from a std::thread while step 1's progress callback waits for it.
void test_cancel(const zimage::Pipeline &pipeline) {
    std::mutex lock;
    std::condition_variable changed;
    bool step_one = false, cancelled = false;
    std::thread canceller([&] {
        std::unique_lock<std::mutex> guard(lock);
        changed.wait(guard, [&] { return step_one; });
        pipeline.cancel();
        cancelled = true;
        changed.notify_all();
    });
    zimage_generate_params params = small_params();
    params.steps = 4;
    std::uint32_t steps_seen = 0;
    CHECK_THROWS(ZIMAGE_RESULT_CANCELLED, pipeline.generate(params, [&](std::uint32_t step, std::uint32_t, double) {
        std::unique_lock<std::mutex> guard(lock);
        steps_seen = step;
        step_one = true;
        changed.notify_all();
        changed.wait(guard, [&] { return cancelled; });
        return true;
    }));
    canceller.join();
    CHECK(steps_seen == 1);
}

void test_progress_exception(const zimage::Pipeline &pipeline) {
    struct Stop {};
    std::uint32_t calls = 0;
    bool caught = false;
    try {
        pipeline.generate(small_params(), [&](std::uint32_t, std::uint32_t, double) -> bool {
            calls++;
            throw Stop{};
        });
    } catch (const Stop &) {
        caught = true;
    }
    CHECK(caught && calls == 1);
    // The pipeline is still usable, and request errors surface as codes.
    CHECK(pipeline.generate(small_params()).size() == 1);
    zimage_generate_params params = small_params();
    params.height = 40;
    CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, pipeline.generate(params));
    CHECK_THROWS(ZIMAGE_RESULT_INVALID_ARGUMENT, pipeline.generate(small_params())[1]);
}

void test_enhancer(const std::string &enhancer_package, const std::string &package, const zimage::Pipeline &pipeline,
                   const std::vector<EnhancerCase> &cases) {
    CHECK_THROWS(ZIMAGE_RESULT_PACKAGE, zimage::Enhancer::load(package));
    CHECK_THROWS(ZIMAGE_RESULT_PACKAGE, zimage::Enhancer::attach(pipeline));
    std::vector<std::string> messages;
    zimage::Enhancer loaded = zimage::Enhancer::load(enhancer_package, zimage::load_params(),
                                                     [&](std::uint32_t level, const char *message) {
                                                         messages.push_back(std::to_string(level) + " " + message);
                                                     });
    zimage::Enhancer enhancer = std::move(loaded);  // the log function survives the move
    CHECK(messages.size() == 2 && messages[1].rfind("3 loaded ", 0) == 0);

    for (const EnhancerCase &c : cases) {
        std::cerr << "enhancer case " << c.name << std::endl;
        zimage_enhance_params params = zimage::enhance_params();
        params.max_new_tokens = c.max_new_tokens;
        std::string streamed;
        zimage::Enhancement result =
            enhancer.enhance(c.prompt, params, [&](std::uint32_t, std::uint32_t, const char *text, bool thinking) {
                CHECK(!thinking);
                streamed += text;
                return true;
            });
        CHECK(result.text == c.text && result.seed == 0);
        CHECK(streamed == c.raw_text);
        if (result.text != c.text) std::cerr << "got \"" << result.text << "\", expected \"" << c.text << "\"" << std::endl;
    }

    // The token callback stops the run, by returning false or by throwing.
    zimage_enhance_params params = zimage::enhance_params();
    params.max_new_tokens = cases.front().max_new_tokens;
    std::uint32_t calls = 0;
    CHECK_THROWS(ZIMAGE_RESULT_CANCELLED, enhancer.enhance(cases.front().prompt, params,
                                                           [&](std::uint32_t, std::uint32_t, const char *, bool) {
                                                               return ++calls < 3;
                                                           }));
    CHECK(calls == 3);
    struct Stop {};
    bool caught = false;
    try {
        enhancer.enhance(cases.front().prompt, params,
                         [](std::uint32_t, std::uint32_t, const char *, bool) -> bool { throw Stop{}; });
    } catch (const Stop &) {
        caught = true;
    }
    CHECK(caught);
    // cancel() from another thread while the first token's callback waits for it.
    std::mutex lock;
    std::condition_variable changed;
    bool first_token = false, cancelled = false;
    std::thread canceller([&] {
        std::unique_lock<std::mutex> guard(lock);
        changed.wait(guard, [&] { return first_token; });
        enhancer.cancel();
        cancelled = true;
        changed.notify_all();
    });
    calls = 0;
    CHECK_THROWS(ZIMAGE_RESULT_CANCELLED,
                 enhancer.enhance(cases.front().prompt, params, [&](std::uint32_t, std::uint32_t, const char *, bool) {
                     std::unique_lock<std::mutex> guard(lock);
                     calls++;
                     first_token = true;
                     changed.notify_all();
                     changed.wait(guard, [&] { return cancelled; });
                     return true;
                 }));
    canceller.join();
    CHECK(calls == 1);

    // Bad parameters.
    params = zimage::enhance_params();
    params.max_new_tokens = 100000;
    CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, enhancer.enhance("a fox", params));
    params = zimage::enhance_params();
    params.sample = true;
    params.top_p = 0.0f;
    CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, enhancer.enhance("a fox", params));
    params.top_p = 1.0f;
    params.seed = 7;
    params.max_new_tokens = 4;
    CHECK(enhancer.enhance("a fox", params).seed == 7);

    // Generation with the enhancer: the prompt it reports is the one enhance() returns.
    params = zimage::enhance_params();
    params.max_new_tokens = cases.front().max_new_tokens;
    const std::string expected = enhancer.enhance(cases.front().prompt, params).text;
    zimage_generate_params generate = small_params();
    generate.prompt = cases.front().prompt.c_str();
    generate.enhancer = enhancer.get();
    generate.enhance_params = &params;
    zimage::Images images = pipeline.generate(generate);
    CHECK(images.size() == 1 && images.enhanced_prompt() == expected);
    CHECK(!pipeline.generate(small_params()).enhanced_prompt().has_value());
}

// The pixels of an image list's first image (a copy that outlives the list).
std::vector<unsigned char> first_image(const zimage::Images &images) {
    zimage_image image = images[0];
    return std::vector<unsigned char>(image.pixels, image.pixels + std::size_t(image.width) * image.height * 3);
}

// LoRA adapters through Pipeline::load_lora() and set_adapters() (ZIMAGE_TEST_LORA_CASES, the C
// client's file: name, prompt, seed, width, height, steps, expected raw RGB, then adapter file
// and scale pairs): diffusers' images within 1 level, also after the Adapter objects are gone;
// an adapter for another model, a missing file and a NaN scale throw their codes and change
// nothing; an empty set gives back the base model's image exactly.
void test_lora(const std::string &package, std::size_t max_cases) {
    const char *wrong = std::getenv("ZIMAGE_TEST_WRONG_LORA");
    CHECK(wrong != nullptr);
    if (!wrong) return;
    zimage::Pipeline pipeline = zimage::Pipeline::load(package);
    const std::vector<unsigned char> base = first_image(pipeline.generate(small_params()));
    CHECK_THROWS(ZIMAGE_RESULT_LORA, pipeline.load_lora(wrong));
    CHECK_THROWS(ZIMAGE_RESULT_IO, pipeline.load_lora("no/such/lora.safetensors"));
    std::size_t n = 0;
    for (const std::vector<std::string> &f : cases_from_env("ZIMAGE_TEST_LORA_CASES")) {
        if (n++ == max_cases) break;
        CHECK(f.size() >= 9 && (f.size() - 7) % 2 == 0);
        if (f.size() < 9 || (f.size() - 7) % 2 != 0) continue;
        std::cerr << "lora case " << f[0] << std::endl;
        {
            std::vector<zimage::Adapter> adapters;
            for (std::size_t a = 7; a + 1 < f.size(); a += 2) adapters.push_back(pipeline.load_lora(f[a]));
            std::vector<zimage::AdapterScale> scales;
            for (std::size_t a = 0; a < adapters.size(); a++) scales.push_back({adapters[a], std::stof(f[8 + 2 * a])});
            pipeline.set_adapters(scales);
            CHECK_THROWS(ZIMAGE_RESULT_INVALID_ARGUMENT, pipeline.set_adapters({{adapters[0], std::nanf("")}}));
        }  // the Adapter objects go; the pipeline keeps its own references
        zimage_generate_params params = zimage::generate_params();
        params.prompt = f[1].c_str();
        params.seed = std::stoull(f[2]);
        params.width = std::stoul(f[3]);
        params.height = std::stoul(f[4]);
        params.steps = std::stoul(f[5]);
        CHECK(same_pixels(pipeline.generate(params), 0, read_file(f[6]), params.width, params.height, f[0]));
    }
    CHECK(n > 0);
    pipeline.set_adapters({});
    CHECK(first_image(pipeline.generate(small_params())) == base);
}

// One edit case of the clients' edit cases file (fields from `first`: name, prompt, negative
// prompt ("-" for none), seed, steps, guidance, cfg_normalization, cfg_truncation, output width,
// height, expected raw RGB, then per reference its raw RGB file, width and height): its
// references read, its parameters filled.
struct EditCase {
    std::vector<std::string> f;
    std::size_t first = 0;
    std::vector<std::vector<unsigned char>> pixels;
    std::vector<zimage_image> references;
    zimage_edit_params params = zimage::edit_params();

    EditCase(std::vector<std::string> fields, std::size_t start) : f(std::move(fields)), first(start) {
        const std::size_t n = f.size() - first;
        if (n < 11 || (n - 11) % 3 != 0) throw std::runtime_error("bad edit case line");
        for (std::size_t r = first + 11; r + 2 < f.size(); r += 3) pixels.push_back(read_file(f[r]));
        for (std::size_t k = 0; k < pixels.size(); k++) {
            const unsigned width = std::stoul(at(12 + 3 * k)), height = std::stoul(at(13 + 3 * k));
            CHECK(pixels[k].size() == std::size_t(width) * height * 3);
            references.push_back(zimage_image{pixels[k].data(), width, height, 0});
        }
        params.prompt = at(1).c_str();
        params.negative_prompt = at(2) == "-" ? nullptr : at(2).c_str();
        params.seed = std::stoull(at(3));
        params.steps = std::stoul(at(4));
        params.guidance_scale = std::stof(at(5));
        params.cfg_normalization = std::stof(at(6));
        params.cfg_truncation = std::stof(at(7));
        params.images = references.data();
        params.image_count = references.size();
        if (references.empty()) {  // ZImageOmniPipeline's text-to-image, at the case's size
            params.width = std::stoul(at(8));
            params.height = std::stoul(at(9));
        }
    }
    EditCase(const EditCase &) = delete;  // params points into pixels and f

    const std::string &at(std::size_t i) const { return f[first + i]; }
    const std::string &name() const { return at(0); }
    // The edit's image within 1 level of the golden.
    bool matches(const zimage::Images &images) const {
        return images.size() == 1 && images.seed() == params.seed &&
               same_pixels(images, 0, read_file(at(10)), std::stoul(at(8)), std::stoul(at(9)), name());
    }
};

// Editing through Pipeline::edit() on ZIMAGE_TEST_OMNI_PACKAGE (ZIMAGE_TEST_EDIT_CASES, the C
// client's file, EditCase's fields): diffusers' images within 1 level, with progress; a
// text-to-image pipeline and too many references throw ZIMAGE_RESULT_INVALID_REQUEST. Then the
// edits with LoRAs (ZIMAGE_TEST_EDIT_LORA_CASES: the adapters as FILE:SCALE;FILE:SCALE, then
// EditCase's fields), set with set_adapters on the same pipeline: diffusers' edits with the
// adapters loaded, within 1 level.
void test_edit(const zimage::Pipeline &text_to_image, std::size_t max_cases) {
    const char *package = std::getenv("ZIMAGE_TEST_OMNI_PACKAGE");
    CHECK(package != nullptr);
    if (!package) return;
    zimage::Pipeline pipeline = zimage::Pipeline::load(package);
    std::size_t n = 0;
    for (const std::vector<std::string> &f : cases_from_env("ZIMAGE_TEST_EDIT_CASES")) {
        if (n++ == max_cases) break;
        EditCase c(f, 0);
        std::cerr << "edit case " << c.name() << std::endl;
        std::uint32_t last_step = 0;
        zimage::Images images = pipeline.edit(c.params, [&](std::uint32_t step, std::uint32_t, double) {
            last_step = step;
            return true;
        });
        CHECK(c.matches(images) && last_step == c.params.steps);
        if (n == 1) {
            CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, text_to_image.edit(c.params));
            std::vector<zimage_image> too_many(9, c.references[0]);
            zimage_edit_params params = c.params;
            params.images = too_many.data();
            params.image_count = too_many.size();
            CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, pipeline.edit(params));
        }
    }
    CHECK(n > 0);
    n = 0;
    for (const std::vector<std::string> &f : cases_from_env("ZIMAGE_TEST_EDIT_LORA_CASES")) {
        if (n++ == max_cases) break;
        EditCase c(f, 1);
        std::cerr << "edit case with LoRAs " << c.name() << std::endl;
        std::vector<zimage::Adapter> adapters;
        std::vector<float> scales;
        std::stringstream specs(f[0]);
        for (std::string spec; std::getline(specs, spec, ';');) {
            const std::size_t colon = spec.rfind(':');
            adapters.push_back(pipeline.load_lora(spec.substr(0, colon)));
            scales.push_back(std::stof(spec.substr(colon + 1)));
        }
        std::vector<zimage::AdapterScale> set;
        for (std::size_t a = 0; a < adapters.size(); a++) set.push_back({adapters[a], scales[a]});
        pipeline.set_adapters(set);
        CHECK(c.matches(pipeline.edit(c.params)));
    }
    CHECK(n > 0);
    pipeline.set_adapters({});
}

// ControlNet through Pipeline::set_controlnet() (ZIMAGE_TEST_CONTROLNET_CASES, the C client's
// file: name, package, controlnet, prompt, negative prompt ("" = none), seed, width, height,
// steps, guidance, scale, control RGB, expected RGB, then the inpainting picture and mask, or
// "lora" and adapter file and scale pairs): diffusers' images within 1 level; a control image
// without a ControlNet attached (before, and after detaching) and an unknown ControlNet throw.
void test_controlnet(std::size_t max_cases) {
    std::size_t n = 0;
    for (const std::vector<std::string> &f : cases_from_env("ZIMAGE_TEST_CONTROLNET_CASES")) {
        if (n++ == max_cases) break;
        const bool with_loras = f.size() >= 16 && f[13] == "lora" && f.size() % 2 == 0;
        CHECK(f.size() == 13 || f.size() == 15 || with_loras);
        if (f.size() != 13 && f.size() != 15 && !with_loras) continue;
        std::cerr << "controlnet case " << f[2] << "/" << f[0] << std::endl;
        const unsigned width = std::stoul(f[6]), height = std::stoul(f[7]);
        const std::vector<unsigned char> control = read_file(f[11]);
        std::vector<unsigned char> picture, mask;
        zimage_generate_params params = zimage::generate_params();
        params.prompt = f[3].c_str();
        params.negative_prompt = f[4].empty() ? nullptr : f[4].c_str();
        params.seed = std::stoull(f[5]);
        params.width = width;
        params.height = height;
        params.steps = std::stoul(f[8]);
        params.guidance_scale = std::stof(f[9]);
        params.control_scale = std::stof(f[10]);
        params.control_image = zimage_image{control.data(), width, height, 0};
        if (f.size() == 15 && !with_loras) {
            picture = read_file(f[13]);
            mask = read_file(f[14]);
            params.init_image = zimage_image{picture.data(), width, height, 0};
            params.mask = zimage_image{mask.data(), width, height, 0};
        }
        zimage::Pipeline pipeline = zimage::Pipeline::load(f[1]);
        CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, pipeline.generate(params));
        CHECK_THROWS(ZIMAGE_RESULT_PACKAGE, pipeline.set_controlnet("no-such-controlnet"));
        if (with_loras) {
            std::vector<zimage::Adapter> adapters;
            for (std::size_t a = 14; a + 1 < f.size(); a += 2) adapters.push_back(pipeline.load_lora(f[a]));
            std::vector<zimage::AdapterScale> scales;
            for (std::size_t a = 0; a < adapters.size(); a++) scales.push_back({adapters[a], std::stof(f[15 + 2 * a])});
            pipeline.set_adapters(scales);
        }
        pipeline.set_controlnet(f[2]);
        CHECK(same_pixels(pipeline.generate(params), 0, read_file(f[12]), width, height, f[0]));
        pipeline.detach_controlnet();
        CHECK_THROWS(ZIMAGE_RESULT_INVALID_REQUEST, pipeline.generate(params));
    }
    CHECK(n > 0);
}

}  // namespace

// Recommended settings: Turbo's for the test package; the base model's (50 steps, guidance 4)
// for ZIMAGE_TEST_BASE_PACKAGE.
void test_recommended_params(const zimage::Pipeline &turbo) {
    zimage_generate_params p = turbo.recommended_params();
    CHECK(p.steps == 8 && p.guidance_scale == 0.0f && p.prompt == nullptr);
    const char *base_package = std::getenv("ZIMAGE_TEST_BASE_PACKAGE");
    CHECK(base_package != nullptr);
    if (!base_package) return;
    zimage::Pipeline base = zimage::Pipeline::load(base_package);
    p = base.recommended_params();
    CHECK(p.steps == 50 && p.guidance_scale == 4.0f && p.cfg_truncation == 1.0f && p.width == 1024);
}

// Three previews of four steps: after steps 1, 2 and 3, one picture of the request's size.
void test_previews(const zimage::Pipeline &pipeline) {
    zimage_generate_params params = small_params();
    params.steps = 4;
    params.preview_count = 3;
    std::vector<std::uint32_t> steps;
    auto preview = [&](std::uint32_t step, std::uint32_t total, const std::vector<zimage_image> &pictures) {
        steps.push_back(step);
        CHECK(total == 4 && pictures.size() == 1);
        for (const zimage_image &p : pictures) {
            CHECK(p.width == 64 && p.height == 64 && p.stride == 64 * 3 && p.pixels != nullptr);
        }
    };
    CHECK(pipeline.generate(params, nullptr, preview).size() == 1);
    CHECK((steps == std::vector<std::uint32_t>{1, 2, 3}));

    // The caller's own C preview callback with a progress function: it gets its own user data
    // (it got the wrapper's context, and the progress trampoline then crashed).
    struct Counts {
        std::uint32_t previews = 0;
        std::uint32_t progress = 0;
    } counts;
    params.preview_callback = [](std::uint32_t, std::uint32_t, const zimage_image *, std::uint32_t count,
                                 void *user_data) { static_cast<Counts *>(user_data)->previews += count; };
    params.progress_user_data = &counts;
    auto progress = [&](std::uint32_t, std::uint32_t, double) {
        counts.progress++;
        return true;
    };
    CHECK(pipeline.generate(params, progress).size() == 1);
    CHECK(counts.previews == 3 && counts.progress == 4);
}

int main(int argc, char **argv) {
    if (argc < 7) {
        std::cerr << "usage: " << argv[0]
                  << " PACKAGE_DIR CASES_FILE IO_FIXTURE_DIR MISMATCHED_PACKAGE_DIR ENHANCER_DIR ENHANCER_CASES_FILE"
                     " [MAX_CASES]\n";
        return 2;
    }
    const std::string package = argv[1], folder_manifest = argv[3], mismatched_package = argv[4],
                      enhancer_package = argv[5];
    std::vector<GoldenCase> cases = read_cases(argv[2]);
    std::vector<EnhancerCase> enhancer_cases = read_enhancer_cases(argv[6]);
    const std::size_t max_cases = argc > 7 ? std::strtoul(argv[7], nullptr, 10) : cases.size();
    if (cases.empty() || enhancer_cases.empty() || max_cases == 0) return 2;
    cases.resize(std::min(cases.size(), max_cases));
    enhancer_cases.resize(std::min(enhancer_cases.size(), max_cases));

    try {
        std::mutex log_lock;
        std::vector<std::string> messages;
        zimage::Pipeline pipeline = zimage::Pipeline::load(package, zimage::load_params(),
                                                           [&](std::uint32_t level, const char *message) {
                                                               std::lock_guard<std::mutex> guard(log_lock);
                                                               messages.push_back(std::to_string(level) + " " + message);
                                                           });
        // Moving the pipeline keeps its log function valid.
        zimage::Pipeline moved = std::move(pipeline);
        test_errors(folder_manifest, mismatched_package);
        test_goldens(moved, cases);
        test_concurrent_generations(moved, cases);
        test_cancel(moved);
        test_progress_exception(moved);
        test_previews(moved);
        test_enhancer(enhancer_package, package, moved, enhancer_cases);
        test_recommended_params(moved);
        test_lora(package, max_cases);
        test_edit(moved, max_cases);
        test_controlnet(max_cases);
        std::lock_guard<std::mutex> guard(log_lock);
        CHECK(messages.size() >= 2 && messages[1].rfind("3 loaded ", 0) == 0);
    } catch (const std::exception &e) {
        std::cerr << "unexpected exception: " << e.what() << std::endl;
        failures++;
    }
    std::cout << argv[0] << ": " << cases.size() << " golden case(s), " << enhancer_cases.size()
              << " enhancer golden case(s), " << failures << " failure(s)" << std::endl;
    return failures == 0 ? 0 : 1;
}
