/*
 * A C99 client of the zimage C API: it generates on the tiny model package and compares with
 * the diffusers goldens, exercises every result code it can reach from C, cancels from a second
 * thread, and frees everything (valgrind checks that in scripts/test-c.sh).
 *
 * Run by ffi/tests/c_clients.rs, which decodes the golden PNGs to raw files first (C has no PNG
 * decoder, and the C API deliberately has none either):
 *
 *   zimage_test PACKAGE_DIR CASES_FILE IO_FIXTURE_DIR MISMATCHED_PACKAGE_DIR ENHANCER_DIR
 *               ENHANCER_CASES_FILE [MAX_CASES]
 *
 * CASES_FILE has one golden case per line, tab-separated (see write_cases_file in
 * c_clients.rs): name, prompt, negative prompt ("" = none), width, height, steps,
 * guidance, cfg_normalization, cfg_truncation, seed, count, max_sequence_length, strength,
 * init image (raw RGB or "-"), mask (raw gray or "-"), expected images (raw RGB, all images
 * concatenated), expected latents (raw float32 or "-").
 * IO_FIXTURE_DIR is a folder whose manifest.json is a directory, so reading it fails with an
 * I/O error rather than "not found". MISMATCHED_PACKAGE_DIR is the tiny package with the
 * transformer of another tiny model, consistently listed in its manifest: it loads, and fails
 * when run. ENHANCER_DIR is a standalone prompt enhancer package; ENHANCER_CASES_FILE has one
 * greedy enhancer golden per line, tab-separated (see write_enhancer_cases_file): name, prompt,
 * max_new_tokens, expected text, expected untrimmed text (the token callback's pieces joined).
 * MAX_CASES limits the golden cases of both kinds.
 */
#define _POSIX_C_SOURCE 200809L /* pthreads */

#include "zimage.h"

#include <float.h>
#include <stddef.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

/* Result codes that some check expected and got; main() requires all the reachable ones. */
#define CODE_COUNT 13
static int codes_seen[CODE_COUNT];

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
            failures++;                                                                \
        }                                                                              \
    } while (0)

#define CHECK_CODE(call, expected) check_code((call), (expected), #call, __LINE__)

static void check_code(zimage_result got, zimage_result expected, const char *call, int line) {
    const char *message = zimage_last_error_message();
    if (got != expected) {
        fprintf(stderr, "%s:%d: %s returned %u (%s), expected %u (%s). Message: %s\n", __FILE__, line, call,
                (unsigned)got, zimage_result_string(got), (unsigned)expected, zimage_result_string(expected),
                message);
        failures++;
        return;
    }
    /* A failure always explains itself; a success leaves no stale message behind. */
    if ((expected == ZIMAGE_RESULT_OK) != (message[0] == '\0')) {
        fprintf(stderr, "%s:%d: %s: unexpected last error message \"%s\"\n", __FILE__, line, call, message);
        failures++;
        return;
    }
    if (expected < CODE_COUNT) codes_seen[expected] = 1;
}

/* ---------------------------------------------------------------- files and cases */

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    long length;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (length = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        data = malloc((size_t)length + 1);
        if (data && fread(data, 1, (size_t)length, f) == (size_t)length) {
            data[length] = '\0';
            *size = (size_t)length;
        } else {
            free(data);
            data = NULL;
        }
    }
    fclose(f);
    return data;
}

#define CASE_FIELDS 17

typedef struct {
    const char *name, *prompt, *negative_prompt;
    unsigned width, height, steps, count, max_sequence_length;
    float guidance_scale, cfg_normalization, cfg_truncation;
    unsigned long long seed;
    double strength;
    const char *init_path, *mask_path, *images_path, *latents_path;
} golden_case;

/* Splits `line` in place at tabs; returns the number of fields. */
static int split_tabs(char *line, char **fields, int max) {
    int n = 0;
    while (n < max) {
        char *tab = strchr(line, '\t');
        fields[n++] = line;
        if (!tab) break;
        *tab = '\0';
        line = tab + 1;
    }
    return n;
}

/* Parses the cases file in place; returns the number of cases or -1. */
static int parse_cases(char *text, golden_case *cases, int max) {
    int n = 0;
    char *line = text;
    while (line && *line && n < max) {
        char *fields[CASE_FIELDS];
        char *newline = strchr(line, '\n');
        golden_case *c = &cases[n];
        if (newline) *newline = '\0';
        if (split_tabs(line, fields, CASE_FIELDS) != CASE_FIELDS) return -1;
        c->name = fields[0];
        c->prompt = fields[1];
        c->negative_prompt = fields[2];
        c->width = (unsigned)strtoul(fields[3], NULL, 10);
        c->height = (unsigned)strtoul(fields[4], NULL, 10);
        c->steps = (unsigned)strtoul(fields[5], NULL, 10);
        c->guidance_scale = strtof(fields[6], NULL);
        c->cfg_normalization = strtof(fields[7], NULL);
        c->cfg_truncation = strtof(fields[8], NULL);
        c->seed = strtoull(fields[9], NULL, 10);
        c->count = (unsigned)strtoul(fields[10], NULL, 10);
        c->max_sequence_length = (unsigned)strtoul(fields[11], NULL, 10);
        c->strength = strtod(fields[12], NULL);
        c->init_path = fields[13];
        c->mask_path = fields[14];
        c->images_path = fields[15];
        c->latents_path = fields[16];
        n++;
        line = newline ? newline + 1 : NULL;
    }
    return n;
}

#define ENHANCER_CASE_FIELDS 5

typedef struct {
    const char *name, *prompt;
    unsigned max_new_tokens;
    const char *text, *raw_text;
} enhancer_case;

static int parse_enhancer_cases(char *text, enhancer_case *cases, int max) {
    int n = 0;
    char *line = text;
    while (line && *line && n < max) {
        char *fields[ENHANCER_CASE_FIELDS];
        char *newline = strchr(line, '\n');
        enhancer_case *c = &cases[n];
        if (newline) *newline = '\0';
        if (split_tabs(line, fields, ENHANCER_CASE_FIELDS) != ENHANCER_CASE_FIELDS) return -1;
        c->name = fields[0];
        c->prompt = fields[1];
        c->max_new_tokens = (unsigned)strtoul(fields[2], NULL, 10);
        c->text = fields[3];
        c->raw_text = fields[4];
        n++;
        line = newline ? newline + 1 : NULL;
    }
    return n;
}

/* ---------------------------------------------------------------- callbacks */

/* Counts log messages per level; one pipeline can log from several threads, hence the lock. */
typedef struct {
    pthread_mutex_t lock;
    int per_level[5];
    char last_error[1024];
    char last_warn[1024];
} log_record;

static void on_log(uint32_t level, const char *message, void *user_data) {
    log_record *record = user_data;
    pthread_mutex_lock(&record->lock);
    if (level >= 1 && level <= 4) record->per_level[level]++;
    if (level == ZIMAGE_LOG_LEVEL_ERROR) {
        strncpy(record->last_error, message, sizeof record->last_error - 1);
        record->last_error[sizeof record->last_error - 1] = '\0';
    }
    if (level == ZIMAGE_LOG_LEVEL_WARN) {
        strncpy(record->last_warn, message, sizeof record->last_warn - 1);
        record->last_warn[sizeof record->last_warn - 1] = '\0';
    }
    pthread_mutex_unlock(&record->lock);
}

static int log_count(log_record *record, uint32_t level) {
    int n;
    pthread_mutex_lock(&record->lock);
    n = record->per_level[level];
    pthread_mutex_unlock(&record->lock);
    return n;
}

typedef struct {
    uint32_t calls, last_step, total;
    double last_elapsed;
    int in_order;        /* steps arrive as 1, 2, ... and time never goes back */
    uint32_t stop_after; /* return false at this step; 0 = never */
} progress_record;

static bool on_progress(uint32_t step, uint32_t total, double elapsed_seconds, void *user_data) {
    progress_record *p = user_data;
    if (step != p->last_step + 1 || elapsed_seconds < p->last_elapsed || (p->calls > 0 && total != p->total)) {
        p->in_order = 0;
    }
    p->calls++;
    p->last_step = step;
    p->total = total;
    p->last_elapsed = elapsed_seconds;
    return p->stop_after == 0 || step < p->stop_after;
}

/* Collects the streamed tokens of one enhancement. */
typedef struct {
    uint32_t calls;
    int in_order;        /* indices arrive as 0, 1, ... */
    int any_thinking;    /* a token was flagged as thinking */
    uint32_t stop_after; /* return false at this many calls; 0 = never */
    const zimage_enhancer *cancel; /* zimage_enhancer_cancel() this at the first token */
    char text[4096];
} token_record;

static bool on_token(uint32_t index, uint32_t token_id, const char *text, bool thinking, void *user_data) {
    token_record *r = user_data;
    (void)token_id;
    if (index != r->calls) r->in_order = 0;
    if (thinking) r->any_thinking = 1;
    r->calls++;
    if (strlen(r->text) + strlen(text) < sizeof r->text) strcat(r->text, text);
    if (r->cancel && r->calls == 1) CHECK(zimage_enhancer_cancel(r->cancel) == ZIMAGE_RESULT_OK);
    return r->stop_after == 0 || r->calls < r->stop_after;
}

static void reset_tokens(token_record *r) {
    memset(r, 0, sizeof *r);
    r->in_order = 1;
}

/* ---------------------------------------------------------------- tests */

static void test_version(void) {
    unsigned major, minor, patch;
    CHECK(sscanf(zimage_version(), "%u.%u.%u", &major, &minor, &patch) == 3);
    CHECK(strcmp(zimage_result_string(ZIMAGE_RESULT_CANCELLED), "cancelled") == 0);
    CHECK(strcmp(zimage_result_string(9999), "unknown result code") == 0);
}

/* NULL everywhere a pointer is required; NULL accepted by every free and accessor. */
static void test_null_arguments(void) {
    zimage_pipeline *pipeline = NULL;
    zimage_image_list *images = NULL;
    zimage_prompt_embedding *embedding = NULL;
    zimage_generate_params params;
    zimage_image image;
    zimage_latents latents;

    /* The init macros take the struct's size from the pointer, so NULL goes to the functions:
     * the sized ones, and (in parentheses, past the macro) the ones older programs call. */
    CHECK_CODE(zimage_load_params_init_sized(NULL, sizeof(zimage_load_params)), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE((zimage_load_params_init)(NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_generate_params_init_sized(NULL, sizeof params), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE((zimage_generate_params_init)(NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    /* A size that is no version's sizeof (here a newer header's) writes only struct_size, to 0,
     * so that a caller ignoring the result passes a struct every call refuses. */
    {
        zimage_generate_params untouched;
        memset(&untouched, 0xAB, sizeof untouched);
        memcpy(&params, &untouched, sizeof params);
        CHECK_CODE(zimage_generate_params_init_sized(&params, sizeof params + 8), ZIMAGE_RESULT_INVALID_ARGUMENT);
        CHECK(params.struct_size == 0);
        CHECK(memcmp((const char *)&params + sizeof(size_t), (const char *)&untouched + sizeof(size_t),
                     sizeof params - sizeof(size_t)) == 0);
    }
    CHECK_CODE(zimage_pipeline_load(NULL, NULL, &pipeline), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_pipeline_load("models/whatever", NULL, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_generate_params_init(&params), ZIMAGE_RESULT_OK);
    params.prompt = "a fox";
    CHECK_CODE(zimage_generate(NULL, &params, &images), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_encode_prompt(NULL, "a fox", 0, &embedding), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_cancel(NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_image_list_get(NULL, 0, &image), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_image_list_latents(NULL, &latents), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK(strstr(zimage_last_error_message(), "list is NULL") != NULL);
    CHECK(pipeline == NULL && images == NULL && embedding == NULL);
    {
        zimage_enhancer *enhancer = NULL;
        zimage_enhance_params enhance;
        char *text = NULL;
        CHECK_CODE(zimage_enhance_params_init_sized(NULL, sizeof enhance), ZIMAGE_RESULT_NULL_ARGUMENT);
        CHECK_CODE(zimage_enhancer_load(NULL, NULL, &enhancer), ZIMAGE_RESULT_NULL_ARGUMENT);
        CHECK_CODE(zimage_enhancer_load("models/whatever", NULL, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
        CHECK_CODE(zimage_enhancer_attach(NULL, NULL, &enhancer), ZIMAGE_RESULT_NULL_ARGUMENT);
        CHECK_CODE(zimage_enhance_params_init(&enhance), ZIMAGE_RESULT_OK);
        CHECK_CODE(zimage_enhance(NULL, "a fox", &enhance, NULL, NULL, &text, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
        CHECK_CODE(zimage_enhancer_cancel(NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
        CHECK(enhancer == NULL && text == NULL);
        CHECK(zimage_image_list_enhanced_prompt(NULL) == NULL);
        zimage_string_free(NULL);
        zimage_enhancer_free(NULL);
    }

    CHECK(zimage_image_list_count(NULL) == 0);
    CHECK(zimage_image_list_seed(NULL) == 0);
    CHECK(zimage_prompt_embedding_token_count(NULL) == 0);
    CHECK(!zimage_prompt_embedding_truncated(NULL));
    zimage_image_list_free(NULL);
    zimage_prompt_embedding_free(NULL);
    zimage_pipeline_free(NULL);
}

/* Load failures, each before any pipeline exists. RUNTIME must come first: once ONNX Runtime
 * is loaded, a process keeps it. */
static void test_load_errors(const char *package, const char *folder_manifest) {
    zimage_pipeline *pipeline = NULL;
    zimage_load_params params;
    const char not_utf8[] = {'m', (char)0xff, 'x', '\0'};

    CHECK_CODE(zimage_load_params_init(&params), ZIMAGE_RESULT_OK);
    CHECK(params.struct_size == sizeof params);
    params.runtime_library = "/nonexistent/libonnxruntime.so.1.31.1";
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_RUNTIME);
    CHECK(strstr(zimage_last_error_message(), "/nonexistent/libonnxruntime.so.1.31.1") != NULL);

    CHECK_CODE(zimage_pipeline_load("/nonexistent/package", NULL, &pipeline), ZIMAGE_RESULT_PACKAGE);
    CHECK(strstr(zimage_last_error_message(), "/nonexistent/package: no such folder") != NULL);
    /* A folder where manifest.json should be: the package is unusable, not the disk. */
    CHECK_CODE(zimage_pipeline_load(folder_manifest, NULL, &pipeline), ZIMAGE_RESULT_PACKAGE);
    CHECK(strstr(zimage_last_error_message(), "manifest.json: not a regular file") != NULL);
    CHECK_CODE(zimage_pipeline_load(not_utf8, NULL, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(zimage_last_error_message(), "UTF-8") != NULL);

    zimage_load_params_init(&params);
    params.device = 4; /* one past ZIMAGE_DEVICE_TENSORRT */
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    zimage_load_params_init(&params);
    params.device = ZIMAGE_DEVICE_CUDA;
    params.device_id = -1;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    zimage_load_params_init(&params);
    params.struct_size = 0; /* never initialised */
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(zimage_last_error_message(), "struct_size") != NULL);
    CHECK(pipeline == NULL);
}

/* The CPU build of ONNX Runtime these tests run with has no CUDA provider. */
static void test_provider(const char *package) {
    zimage_pipeline *pipeline = NULL;
    zimage_load_params params;
    zimage_tensorrt_params trt;
    log_record logs = {PTHREAD_MUTEX_INITIALIZER, {0}, "", ""};

    zimage_load_params_init(&params);
    params.device = ZIMAGE_DEVICE_CUDA;
    params.log_callback = on_log;
    params.log_user_data = &logs;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_PROVIDER);
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_ERROR) == 1);
    CHECK(strcmp(logs.last_error, zimage_last_error_message()) == 0);

    /* With fallback the load succeeds on CPU, and the log says so: one warning per graph
     * built at load (text encoder, transformer, VAE decoder, in that order), each with the
     * provider's error. The VAE encoder's session is made by the first image-to-image request,
     * which logs the fourth warning through the same callback. */
    params.allow_cpu_fallback = true;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_OK);
    CHECK(pipeline != NULL);
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_WARN) == 3);
    CHECK(strstr(logs.last_warn, "vae_decoder runs on the CPU") == logs.last_warn);
    CHECK(strstr(logs.last_warn, "could not be set up: ") != NULL);
    {
        zimage_generate_params gen;
        zimage_image_list *images = NULL;
        unsigned char rgb[64 * 64 * 3];
        memset(rgb, 128, sizeof rgb);
        zimage_generate_params_init(&gen);
        gen.prompt = "a lighthouse at dusk";
        gen.width = 64;
        gen.height = 64;
        gen.steps = 2;
        gen.seed = 1;
        gen.init_image.pixels = rgb;
        gen.init_image.width = 64;
        gen.init_image.height = 64;
        gen.strength = 0.5f;
        CHECK_CODE(zimage_generate(pipeline, &gen, &images), ZIMAGE_RESULT_OK);
        zimage_image_list_free(images);
    }
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_WARN) == 4);
    CHECK(strstr(logs.last_warn, "vae_encoder runs on the CPU") == logs.last_warn);
    CHECK(strstr(logs.last_warn, "could not be set up: ") != NULL);
    zimage_pipeline_free(pipeline);
    pipeline = NULL;

    /* GPU settings: the SDK's defaults, checked values, and TensorRT profiles that are checked
     * against the package before any provider is set up. */
    zimage_load_params_init(&params);
    CHECK(params.tensorrt == NULL && params.cuda_memory_limit == 0 && params.cuda_tf32 == ZIMAGE_TF32_LIKE_PYTORCH);
    CHECK_CODE(zimage_tensorrt_params_init_sized(NULL, sizeof trt), ZIMAGE_RESULT_NULL_ARGUMENT);
    zimage_tensorrt_params_init(&trt);
    CHECK(trt.struct_size == sizeof trt);
    CHECK(trt.cache_dir == NULL && trt.precision == ZIMAGE_TENSORRT_PRECISION_BF16);
    CHECK(trt.min_width == 512 && trt.min_height == 512 && trt.opt_width == 1024 && trt.opt_height == 1024 &&
          trt.max_width == 1536 && trt.max_height == 1536);
    CHECK(trt.max_images == 1 && !trt.guidance && trt.typical_caption_tokens == 128);
    params.tensorrt = &trt;
    trt.precision = 3; /* one past ZIMAGE_TENSORRT_PRECISION_FP32 */
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK(strstr(zimage_last_error_message(), "params->tensorrt->precision is 3") != NULL);
    zimage_tensorrt_params_init(&trt);
    trt.struct_size = 0; /* not initialised */
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    zimage_tensorrt_params_init(&trt);
    params.device = ZIMAGE_DEVICE_TENSORRT;
    trt.max_images = 0;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_REQUEST);
    trt.max_images = 1;
    trt.min_width = 2048; /* min > opt */
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(strstr(zimage_last_error_message(), "TensorRT") != NULL);
    /* Ignored on CPU, whatever their values. */
    params.device = ZIMAGE_DEVICE_CPU;
    trt.cache_dir = "/nonexistent/cache";
    params.cuda_memory_limit = 1;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_OK);
    zimage_pipeline_free(pipeline);
    pipeline = NULL;
    /* A caller built against the first header (no GPU fields) still loads, with the defaults. */
    zimage_load_params_init(&params);
    params.struct_size = offsetof(zimage_load_params, tensorrt);
    trt.max_images = 0;
    params.tensorrt = &trt; /* beyond that caller's struct: never read */
    params.device = ZIMAGE_DEVICE_TENSORRT;
    params.allow_cpu_fallback = true;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_OK);
    zimage_pipeline_free(pipeline);
}

static void fill_params(zimage_generate_params *p, const golden_case *c) {
    zimage_generate_params_init(p);
    p->prompt = c->prompt;
    p->negative_prompt = c->negative_prompt[0] ? c->negative_prompt : NULL;
    p->width = c->width;
    p->height = c->height;
    p->steps = c->steps;
    p->guidance_scale = c->guidance_scale;
    p->cfg_normalization = c->cfg_normalization;
    p->cfg_truncation = c->cfg_truncation;
    p->seed = c->seed;
    p->count = c->count;
    p->max_sequence_length = c->max_sequence_length;
    p->strength = c->strength;
}

/* Compares a generation with the golden images: at most 1 level apart on every channel. */
static void compare_images(const zimage_image_list *images, const golden_case *c, const unsigned char *expected) {
    size_t i, k, image_bytes = (size_t)c->width * c->height * 3;
    CHECK(zimage_image_list_count(images) == c->count);
    CHECK(zimage_image_list_seed(images) == c->seed);
    for (i = 0; i < zimage_image_list_count(images) && i < c->count; i++) {
        zimage_image image;
        int worst = 0;
        size_t differing = 0;
        CHECK_CODE(zimage_image_list_get(images, i, &image), ZIMAGE_RESULT_OK);
        CHECK(image.width == c->width && image.height == c->height && image.stride == (size_t)c->width * 3);
        if (image.width != c->width || image.height != c->height) continue;
        for (k = 0; k < image_bytes; k++) {
            int d = abs((int)image.pixels[k] - (int)expected[i * image_bytes + k]);
            if (d > worst) worst = d;
            if (d) differing++;
        }
        if (worst > 1) {
            fprintf(stderr, "case %s image %lu: max difference %d levels (%lu of %lu values differ)\n", c->name,
                    (unsigned long)i, worst, (unsigned long)differing, (unsigned long)image_bytes);
            failures++;
        }
    }
}

/* Final latents within 1e-4 of diffusers', as the SDK's own parity tests require. */
static void compare_latents(const zimage_image_list *images, const golden_case *c) {
    zimage_latents latents;
    size_t size = 0, i, n;
    float *expected = (float *)read_file(c->latents_path, &size);
    double worst = 0;
    CHECK(expected != NULL);
    CHECK_CODE(zimage_image_list_latents(images, &latents), ZIMAGE_RESULT_OK);
    n = latents.batch * latents.channels * latents.height * latents.width;
    CHECK(latents.batch == c->count && latents.height == 2 * (c->height / 16) && latents.width == 2 * (c->width / 16));
    CHECK(n * sizeof(float) == size);
    if (expected && n * sizeof(float) == size) {
        /* fmax would drop a NaN and pass it: a NaN difference is the worst one. */
        for (i = 0; i < n; i++) {
            double d = fabs((double)latents.values[i] - (double)expected[i]);
            if (isnan(d) || d > worst) worst = d;
            if (isnan(d)) break;
        }
        if (isnan(worst) || worst > 1e-4) {
            fprintf(stderr, "case %s: latents differ by up to %g\n", c->name, worst);
            failures++;
        }
    }
    free(expected);
}

typedef struct {
    unsigned char *init, *mask;
} case_inputs;

static case_inputs set_images(zimage_generate_params *p, const golden_case *c) {
    case_inputs in = {NULL, NULL};
    size_t size = 0;
    if (strcmp(c->init_path, "-") != 0) {
        in.init = read_file(c->init_path, &size);
        CHECK(in.init != NULL && size == (size_t)c->width * c->height * 3);
        p->init_image.pixels = in.init;
        p->init_image.width = c->width;
        p->init_image.height = c->height;
    }
    if (strcmp(c->mask_path, "-") != 0) {
        in.mask = read_file(c->mask_path, &size);
        CHECK(in.mask != NULL && size == (size_t)c->width * c->height);
        p->mask.pixels = in.mask;
        p->mask.width = c->width;
        p->mask.height = c->height;
    }
    return in;
}

static void test_golden_case(const zimage_pipeline *pipeline, const golden_case *c, int with_embeddings) {
    zimage_generate_params params;
    zimage_image_list *images = NULL;
    size_t size = 0;
    unsigned char *expected = read_file(c->images_path, &size);
    case_inputs inputs;

    CHECK(expected != NULL && size == (size_t)c->count * c->width * c->height * 3);
    if (!expected) return;
    fill_params(&params, c);
    inputs = set_images(&params, c);
    params.return_latents = strcmp(c->latents_path, "-") != 0;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    if (images) {
        compare_images(images, c, expected);
        if (params.return_latents) compare_latents(images, c);
        zimage_image_list_free(images);
        images = NULL;
    }

    /* The same case with prompts encoded once: the same pixels. */
    if (with_embeddings) {
        zimage_prompt_embedding *positive = NULL, *negative = NULL;
        CHECK_CODE(zimage_encode_prompt(pipeline, c->prompt, c->max_sequence_length, &positive), ZIMAGE_RESULT_OK);
        CHECK(zimage_prompt_embedding_token_count(positive) > 0);
        params.prompt = NULL;
        params.prompt_embedding = positive;
        params.return_latents = false;
        if (params.negative_prompt) {
            CHECK_CODE(zimage_encode_prompt(pipeline, params.negative_prompt, c->max_sequence_length, &negative),
                       ZIMAGE_RESULT_OK);
            params.negative_prompt = NULL;
            params.negative_prompt_embedding = negative;
        }
        CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
        if (images) compare_images(images, c, expected);
        zimage_image_list_free(images);
        zimage_prompt_embedding_free(positive);
        zimage_prompt_embedding_free(negative);
    }
    free(inputs.init);
    free(inputs.mask);
    free(expected);
}

/* Loading each graph only for its stage changes memory use, not pixels. */
static void test_sequential_memory(const char *package, const golden_case *c) {
    zimage_pipeline *pipeline = NULL;
    zimage_load_params params;

    zimage_load_params_init(&params);
    params.memory_mode = 2; /* one past ZIMAGE_MEMORY_MODE_SEQUENTIAL */
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_INVALID_ARGUMENT);
    params.memory_mode = ZIMAGE_MEMORY_MODE_SEQUENTIAL;
    CHECK_CODE(zimage_pipeline_load(package, &params, &pipeline), ZIMAGE_RESULT_OK);
    if (!pipeline) return;
    test_golden_case(pipeline, c, 0);
    zimage_pipeline_free(pipeline);
}

/* A small, fast request for the tests that are not about pixels. */
static void small_params(zimage_generate_params *p) {
    zimage_generate_params_init(p);
    p->prompt = "a lighthouse at dusk";
    p->width = 64;
    p->height = 64;
    p->steps = 2;
    p->seed = 1;
}

static void test_request_errors(const zimage_pipeline *pipeline, log_record *logs) {
    zimage_generate_params params;
    zimage_prompt_embedding *embedding = NULL;
    /* Failed calls leave outputs untouched: this sentinel must survive. */
    zimage_image_list *const sentinel = (zimage_image_list *)&params;
    zimage_image_list *images = sentinel;
    unsigned char rgb[64 * 64 * 3] = {0}, gray[64 * 64] = {0};
    const char not_utf8[] = {'a', (char)0xc3, '\0'};
    static char long_prompt[4 * 4000 + 1];
    int i;
    int errors_logged = log_count(logs, ZIMAGE_LOG_LEVEL_ERROR);

    small_params(&params);
    CHECK_CODE(zimage_generate(pipeline, NULL, &images), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_generate(pipeline, &params, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    params.prompt = NULL;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_NULL_ARGUMENT);
    params.prompt = not_utf8;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK_CODE(zimage_encode_prompt(pipeline, not_utf8, 0, &embedding), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK_CODE(zimage_encode_prompt(pipeline, "a", 0, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    /* About 4000 tokens kept (max_sequence_length 100000): more than the transformer takes. */
    for (i = 0; i < 4000; i++) memcpy(long_prompt + 4 * i, "fox ", 4);
    long_prompt[sizeof long_prompt - 1] = '\0';
    CHECK_CODE(zimage_encode_prompt(pipeline, long_prompt, 100000, &embedding), ZIMAGE_RESULT_INVALID_REQUEST);

    /* Both a text prompt and an embedding. */
    small_params(&params);
    CHECK_CODE(zimage_encode_prompt(pipeline, "a lighthouse", 0, &embedding), ZIMAGE_RESULT_OK);
    params.prompt_embedding = embedding;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);
    zimage_prompt_embedding_free(embedding);

    small_params(&params);
    params.struct_size = sizeof params + 8; /* a header newer than the library */
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);

    small_params(&params);
    params.width = 72; /* not a multiple of 16 */
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(strstr(zimage_last_error_message(), "width 72") != NULL);
    small_params(&params);
    params.steps = 0;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
    small_params(&params);
    params.count = 65;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
    small_params(&params);
    params.guidance_scale = -1.0f;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);

    /* Image-to-image inputs: a mask alone, a stride shorter than a row, an empty picture
     * (one of another size than the request is resized to it: test_image_list). */
    small_params(&params);
    params.mask.pixels = gray;
    params.mask.width = 64;
    params.mask.height = 64;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);
    small_params(&params);
    params.init_image.pixels = rgb;
    params.init_image.width = 64;
    params.init_image.height = 64;
    params.init_image.stride = 64 * 3 - 1;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);
    params.init_image.stride = 0;
    params.init_image.width = 0;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_IMAGE);
    params.init_image.width = 64;
    params.init_image.height = 64;
    params.strength = 1.5;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);

    CHECK(images == sentinel);
    /* Each of the 17 failed generate and encode calls above is logged once at ERROR level,
     * with the text of the last error message. */
    CHECK(log_count(logs, ZIMAGE_LOG_LEVEL_ERROR) - errors_logged == 17);
    CHECK(strcmp(logs->last_error, zimage_last_error_message()) == 0);
}

/* A package that loads (its files match its manifest) but whose transformer does not fit its
 * text encoder: ONNX Runtime fails during the run. */
static void test_inference_error(const char *mismatched_package) {
    zimage_pipeline *pipeline = NULL;
    zimage_image_list *images = NULL;
    zimage_generate_params params;

    CHECK_CODE(zimage_pipeline_load(mismatched_package, NULL, &pipeline), ZIMAGE_RESULT_OK);
    if (!pipeline) return;
    small_params(&params);
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INFERENCE);
    CHECK(strstr(zimage_last_error_message(), "transformer") != NULL);
    CHECK(images == NULL);
    zimage_pipeline_free(pipeline);
}

static void test_image_list(const zimage_pipeline *pipeline, log_record *logs) {
    zimage_generate_params params;
    zimage_image_list *images = NULL;
    zimage_image image;
    zimage_latents latents;
    int infos = log_count(logs, ZIMAGE_LOG_LEVEL_INFO);

    small_params(&params);
    params.seed = ZIMAGE_RANDOM_SEED;
    params.count = 2;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    CHECK(zimage_image_list_count(images) == 2);
    CHECK(zimage_image_list_seed(images) != ZIMAGE_RANDOM_SEED);
    CHECK_CODE(zimage_image_list_get(images, 1, &image), ZIMAGE_RESULT_OK);
    CHECK(image.pixels != NULL && image.width == 64 && image.height == 64);
    CHECK_CODE(zimage_image_list_get(images, 2, &image), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK_CODE(zimage_image_list_get(images, 0, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_image_list_latents(images, &latents), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK_CODE(zimage_image_list_latents(images, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK(log_count(logs, ZIMAGE_LOG_LEVEL_INFO) == infos + 1); /* "generated 2 image(s) ..." */
    zimage_image_list_free(images);

    /* An init picture and mask of other sizes than the 64x64 request are resized to it. */
    {
        static unsigned char rgb[40 * 24 * 3], gray[20 * 30];
        size_t k;
        for (k = 0; k < sizeof rgb; k++) rgb[k] = (unsigned char)(k * 7);
        for (k = 0; k < sizeof gray; k++) gray[k] = (k % 20) < 10 ? 255 : 0;
        small_params(&params);
        params.init_image.pixels = rgb;
        params.init_image.width = 40;
        params.init_image.height = 24;
        params.mask.pixels = gray;
        params.mask.width = 20;
        params.mask.height = 30;
        params.strength = 0.8;
        images = NULL;
        CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
        CHECK_CODE(zimage_image_list_get(images, 0, &image), ZIMAGE_RESULT_OK);
        CHECK(image.width == 64 && image.height == 64);
        zimage_image_list_free(images);
    }
}

static void test_progress(const zimage_pipeline *pipeline) {
    zimage_generate_params params;
    zimage_image_list *images = NULL;
    progress_record progress = {0, 0, 0, 0.0, 1, 0};

    small_params(&params);
    params.progress_callback = on_progress;
    params.progress_user_data = &progress;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    CHECK(progress.calls == 2 && progress.total == 2 && progress.last_step == 2 && progress.in_order);
    zimage_image_list_free(images);
    images = NULL;

    /* Returning false stops the run after that step. */
    memset(&progress, 0, sizeof progress);
    progress.in_order = 1;
    progress.stop_after = 1;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_CANCELLED);
    CHECK(progress.calls == 1 && images == NULL);
}

/* zimage_cancel() from a second thread while the first generates. The progress callback of
 * step 1 hands over to the canceller and waits until it has cancelled, so the cancel lands
 * inside the generation (not before or after it) without relying on timing. */
typedef struct {
    const zimage_pipeline *pipeline;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int step_one_reached, cancelled;
    zimage_result cancel_result;
    uint32_t steps_seen;
} cancel_state;

static bool wait_for_cancel(uint32_t step, uint32_t total, double elapsed_seconds, void *user_data) {
    cancel_state *s = user_data;
    (void)total;
    (void)elapsed_seconds;
    pthread_mutex_lock(&s->lock);
    s->steps_seen = step;
    s->step_one_reached = 1;
    pthread_cond_broadcast(&s->changed);
    while (!s->cancelled) pthread_cond_wait(&s->changed, &s->lock);
    pthread_mutex_unlock(&s->lock);
    return true; /* the stop comes from zimage_cancel(), not from here */
}

static void *canceller(void *arg) {
    cancel_state *s = arg;
    pthread_mutex_lock(&s->lock);
    while (!s->step_one_reached) pthread_cond_wait(&s->changed, &s->lock);
    s->cancel_result = zimage_cancel(s->pipeline);
    s->cancelled = 1;
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static void test_cancel_from_thread(const zimage_pipeline *pipeline) {
    zimage_generate_params params;
    zimage_image_list *images = NULL;
    pthread_t thread;
    cancel_state s;

    memset(&s, 0, sizeof s);
    s.pipeline = pipeline;
    pthread_mutex_init(&s.lock, NULL);
    pthread_cond_init(&s.changed, NULL);
    small_params(&params);
    params.steps = 4;
    params.progress_callback = wait_for_cancel;
    params.progress_user_data = &s;
    CHECK(pthread_create(&thread, NULL, canceller, &s) == 0);
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_CANCELLED);
    pthread_join(thread, NULL);
    CHECK(s.cancel_result == ZIMAGE_RESULT_OK);
    CHECK(s.steps_seen == 1 && images == NULL);
    pthread_cond_destroy(&s.changed);
    pthread_mutex_destroy(&s.lock);

    /* The pipeline stays usable, and a cancel with nothing running affects nothing later. */
    CHECK_CODE(zimage_cancel(pipeline), ZIMAGE_RESULT_OK);
    small_params(&params);
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    zimage_image_list_free(images);
}

/* The prompt enhancer: greedy goldens, streaming, stopping, parameter checks. */
static void test_enhancer(const char *enhancer_package, const char *package, const zimage_pipeline *pipeline,
                          const enhancer_case *cases, int n_cases) {
    zimage_enhancer *enhancer = NULL;
    zimage_load_params load;
    zimage_enhance_params params;
    token_record tokens;
    log_record logs = {PTHREAD_MUTEX_INITIALIZER, {0}, "", ""};
    log_record fallback_logs = {PTHREAD_MUTEX_INITIALIZER, {0}, "", ""};
    char *text = NULL, *again = NULL;
    char *const sentinel = (char *)&params; /* failed calls leave outputs untouched */
    uint64_t seed = 1, first_seed = 0;
    const char not_utf8[] = {'a', (char)0xc3, '\0'};
    int i;

    /* Packages without a decoder: a Z-Image package on its own, or attached to its pipeline. */
    CHECK_CODE(zimage_enhancer_load(package, NULL, &enhancer), ZIMAGE_RESULT_PACKAGE);
    CHECK_CODE(zimage_enhancer_attach(pipeline, NULL, &enhancer), ZIMAGE_RESULT_PACKAGE);
    CHECK_CODE(zimage_enhancer_load("/nonexistent/package", NULL, &enhancer), ZIMAGE_RESULT_PACKAGE);
    CHECK(enhancer == NULL);

    /* CUDA on the CPU runtime with fallback: the decoder runs on the CPU, and a warning says why. */
    zimage_load_params_init(&load);
    load.device = ZIMAGE_DEVICE_CUDA;
    load.allow_cpu_fallback = true;
    load.log_callback = on_log;
    load.log_user_data = &fallback_logs;
    CHECK_CODE(zimage_enhancer_load(enhancer_package, &load, &enhancer), ZIMAGE_RESULT_OK);
    CHECK(log_count(&fallback_logs, ZIMAGE_LOG_LEVEL_WARN) == 1);
    CHECK(strstr(fallback_logs.last_warn, "text_decoder runs on the CPU") == fallback_logs.last_warn);
    CHECK(strstr(fallback_logs.last_warn, "could not be set up: ") != NULL);
    zimage_enhancer_free(enhancer);
    enhancer = NULL;

    /* Load parameters of the first header version (no GPU fields) are still accepted. */
    zimage_load_params_init(&load);
    load.struct_size = offsetof(zimage_load_params, tensorrt);
    load.log_callback = on_log;
    load.log_user_data = &logs;
    CHECK_CODE(zimage_enhancer_load(enhancer_package, &load, &enhancer), ZIMAGE_RESULT_OK);
    if (!enhancer) return;
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_INFO) == 2); /* "loading ..." and "loaded ..." */

    zimage_enhance_params_init(&params);
    CHECK(params.struct_size == sizeof params && params.system_prompt == NULL && !params.thinking);
    CHECK(params.max_new_tokens == 512 && !params.sample && params.seed == ZIMAGE_RANDOM_SEED);
    for (i = 0; i < n_cases; i++) {
        const enhancer_case *c = &cases[i];
        fprintf(stderr, "enhancer case %s\n", c->name);
        zimage_enhance_params_init(&params);
        params.max_new_tokens = c->max_new_tokens;
        reset_tokens(&tokens);
        text = NULL;
        seed = 1;
        CHECK_CODE(zimage_enhance(enhancer, c->prompt, &params, on_token, &tokens, &text, &seed), ZIMAGE_RESULT_OK);
        CHECK(text != NULL && seed == 0); /* greedy: no seed */
        if (text && strcmp(text, c->text) != 0) {
            fprintf(stderr, "enhancer case %s: got \"%s\", expected \"%s\"\n", c->name, text, c->text);
            failures++;
        }
        CHECK(tokens.calls > 0 && tokens.calls <= c->max_new_tokens && tokens.in_order && !tokens.any_thinking);
        if (strcmp(tokens.text, c->raw_text) != 0) {
            fprintf(stderr, "enhancer case %s: streamed \"%s\", expected \"%s\"\n", c->name, tokens.text, c->raw_text);
            failures++;
        }
        zimage_string_free(text);
    }

    /* No callback, NULL params (the defaults: up to 512 tokens) and no seed output. */
    zimage_enhance_params_init(&params);
    params.max_new_tokens = cases[0].max_new_tokens;
    text = NULL;
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_OK);
    CHECK(text != NULL && strcmp(text, cases[0].text) == 0);
    zimage_string_free(text);

    /* The token callback stops the run: CANCELLED, no text. */
    reset_tokens(&tokens);
    tokens.stop_after = 2;
    text = sentinel;
    seed = 1;
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, on_token, &tokens, &text, &seed),
               ZIMAGE_RESULT_CANCELLED);
    CHECK(tokens.calls == 2 && text == sentinel && seed == 1);
    /* zimage_enhancer_cancel() (here from the callback of the first token) stops it too. */
    reset_tokens(&tokens);
    tokens.cancel = enhancer;
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, on_token, &tokens, &text, NULL),
               ZIMAGE_RESULT_CANCELLED);
    CHECK(tokens.calls == 1 && text == sentinel);
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_INFO) >= 4); /* cancellations are logged at INFO */

    /* Seeded sampling is reproducible and reports its seed; a drawn seed is reported too. */
    params.sample = true;
    params.seed = 42;
    params.max_new_tokens = 8;
    text = NULL;
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, NULL, NULL, &text, &seed), ZIMAGE_RESULT_OK);
    CHECK(seed == 42);
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, NULL, NULL, &again, &seed), ZIMAGE_RESULT_OK);
    CHECK(text && again && strcmp(text, again) == 0);
    zimage_string_free(text);
    zimage_string_free(again);
    params.seed = ZIMAGE_RANDOM_SEED;
    text = again = NULL;
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, NULL, NULL, &text, &first_seed), ZIMAGE_RESULT_OK);
    params.seed = first_seed;
    CHECK_CODE(zimage_enhance(enhancer, cases[0].prompt, &params, NULL, NULL, &again, &seed), ZIMAGE_RESULT_OK);
    CHECK(seed == first_seed && text && again && strcmp(text, again) == 0);
    zimage_string_free(text);
    zimage_string_free(again);

    /* Bad arguments and requests. */
    text = sentinel;
    zimage_enhance_params_init(&params);
    CHECK_CODE(zimage_enhance(enhancer, NULL, &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, NULL, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_enhance(enhancer, not_utf8, &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK_CODE(zimage_enhance(enhancer, "   ", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_REQUEST);
    params.system_prompt = not_utf8;
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_ARGUMENT);
    zimage_enhance_params_init(&params);
    params.max_new_tokens = 32769;
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(strstr(zimage_last_error_message(), "max_new_tokens") != NULL);
    zimage_enhance_params_init(&params);
    CHECK(params.max_context_tokens == 8192);
    params.max_context_tokens = 4; /* the template alone is longer */
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(strstr(zimage_last_error_message(), "context holds 4") != NULL);
    zimage_enhance_params_init(&params);
    params.sample = true;
    params.top_p = 0.0f;
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(strstr(zimage_last_error_message(), "top_p") != NULL);
    params.top_p = 0.8f;
    params.temperature = 0.0f;
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_REQUEST);
    params.sample = false; /* greedy ignores the sampling fields */
    params.max_new_tokens = 2;
    text = NULL;
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_OK);
    zimage_string_free(text);
    text = sentinel;
    zimage_enhance_params_init(&params);
    params.struct_size = 0;
    CHECK_CODE(zimage_enhance(enhancer, "a fox", &params, NULL, NULL, &text, NULL), ZIMAGE_RESULT_INVALID_ARGUMENT);
    CHECK(text == sentinel);
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_ERROR) == 10);

    zimage_enhancer_free(enhancer);
}

/* zimage_generate() with an enhancer: the prompt it reports is what zimage_enhance() returns. */
static void test_generate_enhanced(const char *enhancer_package, const zimage_pipeline *pipeline,
                                   const enhancer_case *c) {
    zimage_enhancer *enhancer = NULL;
    zimage_enhance_params enhance;
    zimage_generate_params params;
    zimage_image_list *images = NULL;
    zimage_prompt_embedding *embedding = NULL;
    progress_record progress = {0, 0, 0, 0.0, 1, 0};
    char *text = NULL;

    CHECK_CODE(zimage_enhancer_load(enhancer_package, NULL, &enhancer), ZIMAGE_RESULT_OK);
    if (!enhancer) return;
    zimage_enhance_params_init(&enhance);
    enhance.max_new_tokens = c->max_new_tokens;
    CHECK_CODE(zimage_enhance(enhancer, c->prompt, &enhance, NULL, NULL, &text, NULL), ZIMAGE_RESULT_OK);

    small_params(&params);
    params.prompt = c->prompt;
    params.enhancer = enhancer;
    params.enhance_params = &enhance;
    params.progress_callback = on_progress;
    params.progress_user_data = &progress;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    CHECK(zimage_image_list_count(images) == 1 && progress.calls == 2);
    CHECK(text != NULL && zimage_image_list_enhanced_prompt(images) != NULL);
    if (text && zimage_image_list_enhanced_prompt(images)) {
        CHECK(strcmp(zimage_image_list_enhanced_prompt(images), text) == 0);
    }
    zimage_image_list_free(images);
    images = NULL;

    /* Without an enhancer, or with parameters of the first version (which has no enhancer
     * field), nothing is enhanced. */
    small_params(&params);
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    CHECK(images != NULL && zimage_image_list_enhanced_prompt(images) == NULL);
    zimage_image_list_free(images);
    images = NULL;
    params.enhancer = enhancer;
    params.struct_size = offsetof(zimage_generate_params, enhancer);
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    CHECK(images != NULL && zimage_image_list_enhanced_prompt(images) == NULL);
    zimage_image_list_free(images);
    images = NULL;

    /* Bad requests fail before the enhancer runs; an embedding cannot be enhanced. */
    small_params(&params);
    params.enhancer = enhancer;
    params.width = 72;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
    small_params(&params);
    params.enhancer = enhancer;
    enhance.max_new_tokens = 40000;
    params.enhance_params = &enhance;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
    enhance.struct_size = 0;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);
    small_params(&params);
    CHECK_CODE(zimage_encode_prompt(pipeline, "a lighthouse", 0, &embedding), ZIMAGE_RESULT_OK);
    params.prompt = NULL;
    params.prompt_embedding = embedding;
    params.enhancer = enhancer;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(images == NULL);

    zimage_prompt_embedding_free(embedding);
    zimage_string_free(text);
    zimage_enhancer_free(enhancer);
}

/* The cases files of test_lora and test_vae_tiling start alike (name, prompt, seed, width,
 * height, steps, ...): the case they describe, with its expected raw RGB file read. */
static unsigned char *simple_case(char **fields, const char *expected_file, golden_case *c) {
    size_t expected_size = 0;
    unsigned char *expected;
    memset(c, 0, sizeof *c);
    c->name = fields[0];
    c->seed = strtoull(fields[2], NULL, 10);
    c->width = (uint32_t)atoi(fields[3]);
    c->height = (uint32_t)atoi(fields[4]);
    c->count = 1;
    expected = read_file(expected_file, &expected_size);
    CHECK(expected != NULL && expected_size == (size_t)c->width * c->height * 3);
    return expected;
}

/* Generates `c` (no guidance) with `prompt` and `steps`, and compares with `expected`. */
static void generate_simple_case(const zimage_pipeline *pipeline, const char *prompt, uint32_t steps,
                                 const golden_case *c, const unsigned char *expected) {
    zimage_generate_params params;
    zimage_image_list *images = NULL;
    zimage_generate_params_init(&params);
    params.prompt = prompt;
    params.width = c->width;
    params.height = c->height;
    params.steps = steps;
    params.seed = c->seed;
    CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
    if (images && expected) compare_images(images, c, expected);
    zimage_image_list_free(images);
}

/* LoRA adapters (ZIMAGE_TEST_LORA_CASES, written by c_clients.rs from the diffusers goldens in
 * tests/golden/tiny-zimage/lora.json, one case per line, tab-separated: name, prompt, seed, width,
 * height, steps, expected raw RGB, then adapter file and scale pairs): each set on one pipeline
 * gives diffusers' images within 1 level; removing them all gives the base model back; an
 * adapter for another model (ZIMAGE_TEST_WRONG_LORA), a missing file and a NaN scale are
 * refused with their codes and leave the pipeline usable. */
/* The package's recommended settings (ZIMAGE_TEST_BASE_PACKAGE: a package exported as the base
 * model, which recommends 50 steps with guidance 4; Turbo packages recommend 8 without). */
static void test_recommended_params(const zimage_pipeline *turbo) {
    const char *base_package = getenv("ZIMAGE_TEST_BASE_PACKAGE");
    zimage_pipeline *base = NULL;
    zimage_generate_params p;

    memset(&p, 0xAB, sizeof p);
    CHECK_CODE(zimage_generate_params_init_for_pipeline(NULL, &p), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK(p.struct_size == 0 && p.steps == 0xABABABABu); /* only struct_size written */
    CHECK_CODE((zimage_generate_params_init_for_pipeline)(NULL, &p), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_generate_params_init_for_pipeline_sized(turbo, NULL, sizeof p), ZIMAGE_RESULT_NULL_ARGUMENT);
    memset(&p, 0, sizeof p);
    CHECK_CODE(zimage_generate_params_init_for_pipeline(turbo, &p), ZIMAGE_RESULT_OK);
    CHECK(p.struct_size == sizeof p && p.steps == 8 && p.guidance_scale == 0.0f && p.cfg_truncation == 1.0f);
    CHECK(p.width == 1024 && p.height == 1024 && p.count == 1 && p.prompt == NULL);
    if (!base_package) {
        fprintf(stderr, "ZIMAGE_TEST_BASE_PACKAGE must be set\n");
        failures++;
        return;
    }
    CHECK_CODE(zimage_pipeline_load(base_package, NULL, &base), ZIMAGE_RESULT_OK);
    if (!base) return;
    memset(&p, 0, sizeof p);
    CHECK_CODE(zimage_generate_params_init_for_pipeline(base, &p), ZIMAGE_RESULT_OK);
    CHECK(p.struct_size == sizeof p && p.steps == 50 && p.guidance_scale == 4.0f);
    CHECK(p.cfg_normalization == 0.0f && p.cfg_truncation == 1.0f && p.seed == ZIMAGE_RANDOM_SEED);
    zimage_pipeline_free(base);
}

static void test_lora(const char *package, int max_cases) {
    const char *cases_path = getenv("ZIMAGE_TEST_LORA_CASES"), *wrong = getenv("ZIMAGE_TEST_WRONG_LORA");
    zimage_pipeline *pipeline = NULL;
    zimage_adapter *bad = NULL;
    char *text, *line, *save_line = NULL;
    size_t size = 0;
    int n = 0;

    if (!cases_path || !wrong) {
        fprintf(stderr, "ZIMAGE_TEST_LORA_CASES and ZIMAGE_TEST_WRONG_LORA must be set\n");
        failures++;
        return;
    }
    text = (char *)read_file(cases_path, &size);
    CHECK(text != NULL);
    if (!text) return;
    CHECK_CODE(zimage_pipeline_load(package, NULL, &pipeline), ZIMAGE_RESULT_OK);
    if (!pipeline) {
        free(text);
        return;
    }
    CHECK_CODE(zimage_lora_adapter_init(pipeline, wrong, &bad), ZIMAGE_RESULT_LORA);
    CHECK(bad == NULL);
    CHECK_CODE(zimage_lora_adapter_init(pipeline, "no/such/lora.safetensors", &bad), ZIMAGE_RESULT_IO);
    CHECK_CODE(zimage_lora_adapter_init(pipeline, NULL, &bad), ZIMAGE_RESULT_NULL_ARGUMENT);
    CHECK_CODE(zimage_pipeline_set_adapters(pipeline, NULL, 1), ZIMAGE_RESULT_NULL_ARGUMENT);

    for (line = strtok_r(text, "\n", &save_line); line && n < max_cases; line = strtok_r(NULL, "\n", &save_line), n++) {
        char *fields[16], *save_field = NULL, *field;
        int n_fields = 0, n_adapters, a;
        zimage_adapter *adapters[4] = {NULL, NULL, NULL, NULL};
        zimage_adapter_setting settings[4];
        golden_case c;
        unsigned char *expected;

        for (field = strtok_r(line, "\t", &save_field); field && n_fields < 16; field = strtok_r(NULL, "\t", &save_field))
            fields[n_fields++] = field;
        n_adapters = (n_fields - 7) / 2;
        CHECK(n_fields >= 9 && (n_fields - 7) % 2 == 0 && n_adapters <= 4);
        if (n_fields < 9 || n_adapters > 4) continue;
        expected = simple_case(fields, fields[6], &c);
        for (a = 0; a < n_adapters; a++) {
            CHECK_CODE(zimage_lora_adapter_init(pipeline, fields[7 + 2 * a], &adapters[a]), ZIMAGE_RESULT_OK);
            settings[a].adapter = adapters[a];
            settings[a].scale = (float)atof(fields[8 + 2 * a]);
        }
        CHECK_CODE(zimage_pipeline_set_adapters(pipeline, settings, (size_t)n_adapters), ZIMAGE_RESULT_OK);
        /* The pipeline keeps its own reference: the handles can go before generating. */
        for (a = 0; a < n_adapters; a++) zimage_adapter_free(adapters[a]);

        generate_simple_case(pipeline, fields[1], (uint32_t)atoi(fields[5]), &c, expected);

        /* A bad set changes nothing: the same images again. */
        settings[0].scale = NAN;
        CHECK_CODE(zimage_pipeline_set_adapters(pipeline, settings, 1), ZIMAGE_RESULT_INVALID_ARGUMENT);
        generate_simple_case(pipeline, fields[1], (uint32_t)atoi(fields[5]), &c, expected);
        free(expected);
    }
    CHECK(n > 0);
    CHECK_CODE(zimage_pipeline_set_adapters(pipeline, NULL, 0), ZIMAGE_RESULT_OK);
    zimage_pipeline_free(pipeline);
    free(text);
}

/* VAE tiling (ZIMAGE_TEST_TILING_CASE, written by c_clients.rs from the decode golden grid_3x4
 * of tests/golden/tiny-zimage/vae_tiling, one line, tab-separated: name, prompt, seed, width,
 * height, steps, tile size, overlap, expected raw RGB): a pipeline loaded with
 * vae_tile_size / vae_tile_overlap gives diffusers' tiled image within 1 level; a tile size the
 * VAE cannot tile by fails the load with ZIMAGE_RESULT_INVALID_REQUEST and no pipeline. */
static void test_vae_tiling(const char *package) {
    const char *path = getenv("ZIMAGE_TEST_TILING_CASE");
    char *text, *fields[9], *field, *save = NULL;
    int n_fields = 0;
    size_t size = 0;
    unsigned char *expected = NULL;
    zimage_load_params load;
    zimage_pipeline *pipeline = NULL;
    golden_case c;

    if (!path) {
        fprintf(stderr, "ZIMAGE_TEST_TILING_CASE must be set\n");
        failures++;
        return;
    }
    text = (char *)read_file(path, &size);
    CHECK(text != NULL);
    if (!text) return;
    for (field = strtok_r(text, "\t\n", &save); field && n_fields < 9; field = strtok_r(NULL, "\t\n", &save))
        fields[n_fields++] = field;
    CHECK(n_fields == 9);
    if (n_fields != 9) {
        free(text);
        return;
    }
    expected = simple_case(fields, fields[8], &c);

    zimage_load_params_init(&load);
    CHECK(load.vae_tile_size == 0 && load.vae_tile_overlap == 0);
    load.vae_tile_size = (uint32_t)atoi(fields[6]);
    load.vae_tile_overlap = (uint32_t)atoi(fields[7]);
    CHECK_CODE(zimage_pipeline_load(package, &load, &pipeline), ZIMAGE_RESULT_OK);
    if (pipeline) {
        generate_simple_case(pipeline, fields[1], (uint32_t)atoi(fields[5]), &c, expected);
        zimage_pipeline_free(pipeline);
        pipeline = NULL;
    }
    load.vae_tile_size = 36; /* not a multiple of the VAE's scale factor 8 */
    CHECK_CODE(zimage_pipeline_load(package, &load, &pipeline), ZIMAGE_RESULT_INVALID_REQUEST);
    CHECK(pipeline == NULL);
    free(expected);
    free(text);
}

/* Editing (ZIMAGE_TEST_OMNI_PACKAGE, ZIMAGE_TEST_EDIT_CASES: written by c_clients.rs from
 * tests/golden/tiny-zimage-omni, one case per line, tab-separated: name, prompt, negative prompt
 * ("-" for none), seed, steps, guidance, cfg_normalization, cfg_truncation, output width, height,
 * expected raw RGB, then per reference: raw RGB file, width, height). References go in as views
 * with a padded stride; the images equal diffusers' within 1 level. Then the typed errors: a
 * text-to-image package asked to edit, too many references, an empty one, NULL arguments. */
static void test_edit(const zimage_pipeline *text_to_image, int max_cases) {
    const char *package = getenv("ZIMAGE_TEST_OMNI_PACKAGE"), *cases_path = getenv("ZIMAGE_TEST_EDIT_CASES");
    zimage_pipeline *pipeline = NULL;
    zimage_edit_params params;
    zimage_image_list *images = NULL;
    zimage_image refs[9];
    unsigned char *buffers[8];
    char *text, *line, *save_line = NULL;
    size_t size = 0;
    int n = 0, r;

    if (!package || !cases_path) {
        fprintf(stderr, "ZIMAGE_TEST_OMNI_PACKAGE and ZIMAGE_TEST_EDIT_CASES must be set\n");
        failures++;
        return;
    }
    text = (char *)read_file(cases_path, &size);
    CHECK(text != NULL);
    if (!text) return;
    CHECK_CODE(zimage_pipeline_load(package, NULL, &pipeline), ZIMAGE_RESULT_OK);
    if (!pipeline) {
        free(text);
        return;
    }
    for (line = strtok_r(text, "\n", &save_line); line && n < max_cases; line = strtok_r(NULL, "\n", &save_line), n++) {
        char *fields[11 + 3 * 8], *save_field = NULL, *field;
        int n_fields = 0, n_refs;
        golden_case c;
        unsigned char *expected;
        size_t expected_size = 0;

        for (field = strtok_r(line, "\t", &save_field); field && n_fields < 11 + 3 * 8;
             field = strtok_r(NULL, "\t", &save_field))
            fields[n_fields++] = field;
        n_refs = (n_fields - 11) / 3;
        CHECK(n_fields >= 11 && (n_fields - 11) % 3 == 0);
        if (n_fields < 11) continue;
        memset(&c, 0, sizeof c);
        c.name = fields[0];
        c.seed = strtoull(fields[3], NULL, 10);
        c.width = (unsigned)atoi(fields[8]);
        c.height = (unsigned)atoi(fields[9]);
        c.count = 1;
        expected = read_file(fields[10], &expected_size);
        CHECK(expected != NULL && expected_size == (size_t)c.width * c.height * 3);
        for (r = 0; r < n_refs; r++) {
            size_t raw_size = 0, y;
            unsigned w = (unsigned)atoi(fields[12 + 3 * r]), h = (unsigned)atoi(fields[13 + 3 * r]);
            size_t stride = (size_t)w * 3 + 5; /* rows padded: the stride is honoured */
            unsigned char *raw = read_file(fields[11 + 3 * r], &raw_size);
            CHECK(raw != NULL && raw_size == (size_t)w * h * 3);
            buffers[r] = calloc(stride * h, 1);
            for (y = 0; raw && y < h; y++) memcpy(buffers[r] + y * stride, raw + y * (size_t)w * 3, (size_t)w * 3);
            free(raw);
            refs[r].pixels = buffers[r];
            refs[r].width = w;
            refs[r].height = h;
            refs[r].stride = stride;
        }
        CHECK_CODE(zimage_edit_params_init(&params), ZIMAGE_RESULT_OK);
        params.prompt = fields[1];
        params.negative_prompt = strcmp(fields[2], "-") == 0 ? NULL : fields[2];
        params.seed = c.seed;
        params.steps = (uint32_t)atoi(fields[4]);
        params.guidance_scale = (float)atof(fields[5]);
        params.cfg_normalization = (float)atof(fields[6]);
        params.cfg_truncation = (float)atof(fields[7]);
        /* No reference: ZImageOmniPipeline's text-to-image, at the case's size. */
        params.images = n_refs ? refs : NULL;
        params.image_count = (size_t)n_refs;
        if (n_refs == 0) {
            params.width = c.width;
            params.height = c.height;
        }
        CHECK_CODE(zimage_edit(pipeline, &params, &images), ZIMAGE_RESULT_OK);
        if (images && expected) compare_images(images, &c, expected);
        zimage_image_list_free(images);
        images = NULL;
        free(expected);

        if (n == 0) {
            /* The typed errors, on this case's parameters. */
            CHECK_CODE(zimage_edit(text_to_image, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
            CHECK_CODE(zimage_edit(pipeline, NULL, &images), ZIMAGE_RESULT_NULL_ARGUMENT);
            CHECK_CODE(zimage_edit(pipeline, &params, NULL), ZIMAGE_RESULT_NULL_ARGUMENT);
            for (r = 0; r < 9; r++) refs[r] = refs[0];
            params.image_count = 9;
            CHECK_CODE(zimage_edit(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
            refs[1].width = 0;
            params.image_count = 2;
            CHECK_CODE(zimage_edit(pipeline, &params, &images), ZIMAGE_RESULT_IMAGE);
            refs[1].width = 60; /* under 64 pixels */
            CHECK_CODE(zimage_edit(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
            CHECK(images == NULL);
        }
        for (r = 0; r < n_refs; r++) free(buffers[r]);
    }
    CHECK(n > 0);
    zimage_pipeline_free(pipeline);
    free(text);
}

/* Reads a raw file of exactly `size` bytes into an image view (stride: packed rows). */
static unsigned char *read_raw(const char *path, size_t size) {
    size_t got = 0;
    unsigned char *data = read_file(path, &got);
    CHECK(data != NULL && got == size);
    if (data && got != size) {
        free(data);
        return NULL;
    }
    return data;
}

/* Reads and sets `n` LoRA adapters (`specs`: path, scale, path, scale ...) on `pipeline`; the
 * handles are freed at once (the pipeline keeps its own references). */
static void set_adapters_from(zimage_pipeline *pipeline, char **specs, int n) {
    zimage_adapter *adapters[4] = {NULL, NULL, NULL, NULL};
    zimage_adapter_setting settings[4];
    int a;
    memset(settings, 0, sizeof settings);
    for (a = 0; a < n && a < 4; a++) {
        CHECK_CODE(zimage_lora_adapter_init(pipeline, specs[2 * a], &adapters[a]), ZIMAGE_RESULT_OK);
        settings[a].adapter = adapters[a];
        settings[a].scale = (float)atof(specs[2 * a + 1]);
    }
    CHECK_CODE(zimage_pipeline_set_adapters(pipeline, settings, (size_t)a), ZIMAGE_RESULT_OK);
    for (a = 0; a < n && a < 4; a++) zimage_adapter_free(adapters[a]);
}

/* ControlNet (ZIMAGE_TEST_CONTROLNET_CASES, written by c_clients.rs from the diffusers goldens in
 * tests/golden/controlnet/cases.json, one case per line, tab-separated: name, package, controlnet,
 * prompt, negative prompt ("" = none), seed, width, height, steps, guidance, scale, control RGB,
 * expected RGB, then for ControlNet inpainting the picture's RGB and the mask, or for a case with
 * LoRAs "lora" and path, scale pairs): each case through zimage_pipeline_set_controlnet() and the
 * control fields gives diffusers' image within 1 level (LoRAs set before the ControlNet is
 * attached, and after, on a pipeline loaded with it); a NaN scale, a control image of the wrong
 * size, a missing ControlNet and a control image without one attached are refused with their
 * codes. */
static void test_controlnet(int max_cases) {
    const char *cases_path = getenv("ZIMAGE_TEST_CONTROLNET_CASES");
    char *text, *line, *save_line = NULL;
    size_t size = 0;
    int n = 0;

    if (!cases_path) {
        fprintf(stderr, "ZIMAGE_TEST_CONTROLNET_CASES must be set\n");
        failures++;
        return;
    }
    text = (char *)read_file(cases_path, &size);
    CHECK(text != NULL);
    if (!text) return;
    for (line = strtok_r(text, "\n", &save_line); line && n < max_cases; line = strtok_r(NULL, "\n", &save_line), n++) {
        char *f[22];
        int n_fields = split_tabs(line, f, 22);
        int n_adapters = n_fields >= 16 && strcmp(f[13], "lora") == 0 ? (n_fields - 14) / 2 : 0;
        zimage_pipeline *pipeline = NULL;
        zimage_generate_params params;
        zimage_image_list *images = NULL;
        golden_case c;
        size_t rgb_bytes;
        unsigned char *control, *expected, *picture = NULL, *mask = NULL;
        int params_ready = 0;

        CHECK(n_fields == 13 || n_fields == 15 || (n_adapters > 0 && n_adapters <= 4 && n_fields % 2 == 0));
        if (n_fields != 13 && n_fields != 15 && n_adapters == 0) continue;
        memset(&c, 0, sizeof c);
        c.name = f[0];
        c.seed = strtoull(f[5], NULL, 10);
        c.width = (unsigned)atoi(f[6]);
        c.height = (unsigned)atoi(f[7]);
        c.count = 1;
        fprintf(stderr, "controlnet case %s/%s\n", f[2], c.name);
        rgb_bytes = (size_t)c.width * c.height * 3;
        control = read_raw(f[11], rgb_bytes);
        expected = read_raw(f[12], rgb_bytes);
        if (n_fields == 15 && n_adapters == 0) {
            picture = read_raw(f[13], rgb_bytes);
            mask = read_raw(f[14], (size_t)c.width * c.height);
        }
        CHECK_CODE(zimage_pipeline_load(f[1], NULL, &pipeline), ZIMAGE_RESULT_OK);
        if (pipeline && control && expected) {
            zimage_generate_params_init(&params);
            CHECK(params.control_image.pixels == NULL && params.control_scale == 0.75f &&
                  params.control_preprocess == ZIMAGE_CONTROL_PREPROCESS_NONE);
            params.prompt = f[3];
            if (f[4][0] != '\0') params.negative_prompt = f[4];
            params.seed = c.seed;
            params.width = c.width;
            params.height = c.height;
            params.steps = (uint32_t)atoi(f[8]);
            params.guidance_scale = (float)atof(f[9]);
            params.control_scale = (float)atof(f[10]);
            params.control_image.pixels = control;
            params.control_image.width = c.width;
            params.control_image.height = c.height;
            params.control_image.stride = 0;
            if (picture && mask) {
                params.init_image.pixels = picture;
                params.init_image.width = c.width;
                params.init_image.height = c.height;
                params.mask.pixels = mask;
                params.mask.width = c.width;
                params.mask.height = c.height;
            }
            /* Nothing attached yet: the condition is refused. */
            CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
            CHECK_CODE(zimage_pipeline_set_controlnet(pipeline, "no-such-controlnet"), ZIMAGE_RESULT_PACKAGE);
            if (n_adapters > 0) set_adapters_from(pipeline, f + 14, n_adapters);
            CHECK_CODE(zimage_pipeline_set_controlnet(pipeline, f[2]), ZIMAGE_RESULT_OK);
            CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
            if (images) compare_images(images, &c, expected);
            zimage_image_list_free(images);
            images = NULL;

            params.control_scale = NAN;
            CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_REQUEST);
            params.control_scale = 1.0f;
            params.control_image.width = 0; /* an empty picture */
            CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_IMAGE);
            /* A narrower control map is resized to the request's size. */
            params.control_image.width = c.width / 2;
            params.control_image.stride = c.width * 3;
            CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
            if (images) {
                zimage_image image;
                CHECK_CODE(zimage_image_list_get(images, 0, &image), ZIMAGE_RESULT_OK);
                CHECK(image.width == c.width && image.height == c.height);
            }
            zimage_image_list_free(images);
            images = NULL;
            params.control_image.width = c.width;
            params.control_image.stride = 0;
            params.control_preprocess = 7;
            CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_INVALID_ARGUMENT);
            CHECK(images == NULL);
            CHECK_CODE(zimage_pipeline_set_controlnet(pipeline, NULL), ZIMAGE_RESULT_OK);
            params.control_preprocess = ZIMAGE_CONTROL_PREPROCESS_NONE;
            params.control_scale = (float)atof(f[10]);
            params_ready = 1;
        }
        zimage_pipeline_free(pipeline);
        pipeline = NULL;
        if (params_ready) {
            /* The ControlNet chosen at load (the combined graph is the only transformer session):
             * the same image; an unknown name is a package error at load. */
            zimage_load_params load;
            zimage_load_params_init(&load);
            CHECK(load.controlnet == NULL);
            load.controlnet = "no-such-controlnet";
            CHECK_CODE(zimage_pipeline_load(f[1], &load, &pipeline), ZIMAGE_RESULT_PACKAGE);
            CHECK(pipeline == NULL);
            load.controlnet = f[2];
            CHECK_CODE(zimage_pipeline_load(f[1], &load, &pipeline), ZIMAGE_RESULT_OK);
            if (pipeline) {
                if (n_adapters > 0) set_adapters_from(pipeline, f + 14, n_adapters);
                CHECK_CODE(zimage_generate(pipeline, &params, &images), ZIMAGE_RESULT_OK);
                if (images) compare_images(images, &c, expected);
                zimage_image_list_free(images);
                images = NULL;
            }
            zimage_pipeline_free(pipeline);
        }
        free(control);
        free(expected);
        free(picture);
        free(mask);
    }
    CHECK(n > 0);
    free(text);
}


int main(int argc, char **argv) {
    const char *package, *cases_path, *folder_manifest, *mismatched_package, *enhancer_package;
    enhancer_case enhancer_cases[16];
    char *enhancer_text;
    int n_enhancer_cases;
    zimage_pipeline *pipeline = NULL;
    zimage_load_params load;
    log_record logs = {PTHREAD_MUTEX_INITIALIZER, {0}, "", ""};
    golden_case cases[64];
    char *cases_text;
    size_t cases_size = 0;
    int n_cases, max_cases, i, code;

    if (argc < 7) {
        fprintf(stderr,
                "usage: %s PACKAGE_DIR CASES_FILE IO_FIXTURE_DIR MISMATCHED_PACKAGE_DIR ENHANCER_DIR "
                "ENHANCER_CASES_FILE [MAX_CASES]\n",
                argv[0]);
        return 2;
    }
    package = argv[1];
    cases_path = argv[2];
    folder_manifest = argv[3];
    mismatched_package = argv[4];
    enhancer_package = argv[5];
    max_cases = argc > 7 ? atoi(argv[7]) : 64;
    enhancer_text = (char *)read_file(argv[6], &cases_size);
    if (!enhancer_text || (n_enhancer_cases = parse_enhancer_cases(enhancer_text, enhancer_cases, 16)) <= 0) {
        fprintf(stderr, "cannot read the enhancer cases in %s\n", argv[6]);
        return 2;
    }
    if (n_enhancer_cases > max_cases) n_enhancer_cases = max_cases;
    cases_text = (char *)read_file(cases_path, &cases_size);
    if (!cases_text || (n_cases = parse_cases(cases_text, cases, 64)) <= 0) {
        fprintf(stderr, "cannot read the cases in %s\n", cases_path);
        return 2;
    }
    if (n_cases > max_cases) n_cases = max_cases;

    test_version();
    test_null_arguments();
    test_load_errors(package, folder_manifest);

    zimage_load_params_init(&load);
    load.log_callback = on_log;
    load.log_user_data = &logs;
    CHECK_CODE(zimage_pipeline_load(package, &load, &pipeline), ZIMAGE_RESULT_OK);
    if (!pipeline) return 1;
    CHECK(log_count(&logs, ZIMAGE_LOG_LEVEL_INFO) == 2); /* "loading ..." and "loaded ..." */
    test_provider(package);

    for (i = 0; i < n_cases; i++) {
        /* Encoding once must give the same pixels: checked on the first case and on every case
         * with a negative prompt (then both prompts are embeddings). */
        int with_embeddings = i == 0 || cases[i].negative_prompt[0] != '\0';
        fprintf(stderr, "case %s\n", cases[i].name);
        test_golden_case(pipeline, &cases[i], with_embeddings);
    }
    test_sequential_memory(package, &cases[0]);
    test_request_errors(pipeline, &logs);
    test_inference_error(mismatched_package);
    test_image_list(pipeline, &logs);
    test_progress(pipeline);
    test_cancel_from_thread(pipeline);
    test_enhancer(enhancer_package, package, pipeline, enhancer_cases, n_enhancer_cases);
    test_generate_enhanced(enhancer_package, pipeline, &enhancer_cases[0]);
    test_lora(package, max_cases);
    test_recommended_params(pipeline);
    test_edit(pipeline, max_cases);
    test_controlnet(max_cases);
    test_vae_tiling(package);
    zimage_pipeline_free(pipeline);
    free(cases_text);
    free(enhancer_text);

    /* Every result code C can reach was produced. ZIMAGE_RESULT_INTERNAL (a caught panic) is
     * a bug path; ffi/src/panic.rs tests it. */
    for (code = ZIMAGE_RESULT_OK; code <= ZIMAGE_RESULT_LORA; code++) {
        if (code == ZIMAGE_RESULT_INTERNAL) continue;
        if (!codes_seen[code]) {
            fprintf(stderr, "result code %d (%s) was never produced\n", code, zimage_result_string((uint32_t)code));
            failures++;
        }
    }
    printf("%s: %d golden case(s), %d enhancer golden case(s), %d failure(s)\n", argv[0], n_cases, n_enhancer_cases,
           failures);
    return failures == 0 ? 0 : 1;
}
