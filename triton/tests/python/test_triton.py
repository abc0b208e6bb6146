"""The zimage backend in a real tritonserver, driven with tritonclient (HTTP and gRPC).

The model "zimage" has two CPU instances, "zimage_reload" one; both serve the tiny package
with one ONNX Runtime thread per graph, and `zimage generate` runs with --threads 1 too, so
the reference images come from the same arithmetic.
"""

import concurrent.futures
import contextlib
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from conftest import check_clean_exit, env_path, start_server

MODEL = "zimage"
RELOAD_MODEL = "zimage_reload"
TIMEOUT = 120.0


@contextlib.contextmanager
def connect(server):
    """An HTTP client, closed afterwards: Triton waits for open connections when it stops."""
    client = httpclient.InferenceServerClient(server.http_url, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    try:
        yield client
    finally:
        client.close()


def tensor(module, name, value, datatype):
    array = np.asarray(value)
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def inputs(module, prompt, negative=None, width=None, height=None, steps=None, guidance=None, seed=None, count=None,
           init_image=None, mask=None, strength=None, control_image=None, control_scale=None, control_preprocess=None):
    items = [tensor(module, "PROMPT", np.array([prompt.encode()], dtype=object), "BYTES")]
    if negative is not None:
        items.append(tensor(module, "NEGATIVE_PROMPT", np.array([negative.encode()], dtype=object), "BYTES"))
    for name, value, dtype, wire in [
        ("WIDTH", width, np.int32, "INT32"),
        ("HEIGHT", height, np.int32, "INT32"),
        ("STEPS", steps, np.int32, "INT32"),
        ("GUIDANCE", guidance, np.float32, "FP32"),
        ("SEED", seed, np.uint64, "UINT64"),
        ("COUNT", count, np.int32, "INT32"),
        ("STRENGTH", strength, np.float64, "FP64"),
        ("CONTROL_SCALE", control_scale, np.float32, "FP32"),
    ]:
        if value is not None:
            items.append(tensor(module, name, np.array([value], dtype=dtype), wire))
    if init_image is not None:
        items.append(tensor(module, "INIT_IMAGE", init_image.astype(np.uint8), "UINT8"))
    if mask is not None:
        items.append(tensor(module, "MASK", mask.astype(np.uint8), "UINT8"))
    if control_image is not None:
        items.append(tensor(module, "CONTROL_IMAGE", control_image.astype(np.uint8), "UINT8"))
    if control_preprocess is not None:
        items.append(tensor(module, "CONTROL_PREPROCESS", np.array([control_preprocess.encode()], dtype=object), "BYTES"))
    return items


def generate_http(server, model=MODEL, **params):
    with connect(server) as client:
        result = client.infer(model, inputs(httpclient, **params))
    return result.as_numpy("IMAGE"), int(result.as_numpy("SEED")[0])


def cli_reference(zimage_cli, package, tmp_path, prompt, negative=None, width=None, height=None, steps=None,
                  guidance=None, seed=None, count=None, init_image=None, mask=None, strength=None, controlnet=None,
                  control_image=None, control_scale=None, control_preprocess=None, lora=None):
    """`zimage generate` with the same parameters: its PNGs decoded to pixels [N, H, W, 3]."""
    out = tmp_path / "cli.png"
    command = [str(zimage_cli), "generate", "--model", str(package), "--threads", "1", "--prompt", prompt,
               "--output", str(out)]
    if control_image is not None:
        path = tmp_path / "control.png"
        Image.fromarray(control_image.astype(np.uint8), "RGB").save(path)
        command += ["--controlnet", controlnet, "--control-image", str(path)]
    if lora is not None:
        command += ["--lora", lora]
    for flag, value in [("--negative-prompt", negative), ("--width", width), ("--height", height),
                        ("--steps", steps), ("--guidance", guidance), ("--seed", seed), ("--count", count),
                        ("--strength", strength), ("--control-scale", control_scale),
                        ("--control-preprocess", control_preprocess)]:
        if value is not None:
            command += [flag, str(value)]
    if init_image is not None:
        path = tmp_path / "init.png"
        Image.fromarray(init_image.astype(np.uint8), "RGB").save(path)
        command += ["--init-image", str(path)]
    if mask is not None:
        path = tmp_path / "mask.png"
        Image.fromarray(mask.astype(np.uint8), "L").save(path)
        command += ["--mask", str(path)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    files = [out] if (count or 1) == 1 else [tmp_path / f"cli-{i}.png" for i in range(count)]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def picture(height, width):
    """A deterministic RGB test picture."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), ((x + y) * 7) % 256],
                    axis=-1).astype(np.uint8)


def stats(server, model=MODEL):
    with connect(server) as client:
        return client.get_inference_statistics(model)["model_stats"][0]


def metric(values, name, **labels):
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def instance_counts(values, model=MODEL):
    return {dict(labels)["instance"]: v for (name, labels), v in values.items()
            if name == "zimage_instance_requests" and dict(labels).get("model") == model}


def test_server_and_model_metadata(server):
    with connect(server) as client:
        check_metadata(client)
    # Every listener is on loopback.
    log = server.log_path.read_text(errors="replace")
    for service in ["GRPCInferenceService", "HTTPService", "Metrics Service"]:
        assert f"Started {service} at 127.0.0.1:" in log, service


def check_metadata(client):
    assert client.get_server_metadata()["version"] == "2.51.0"
    assert client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata["platform"] == "zimage"
    declared = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert declared["PROMPT"] == ("BYTES", [1])
    assert declared["INIT_IMAGE"] == ("UINT8", [-1, -1, 3])
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs == {"IMAGE": ("UINT8", [-1, -1, -1, 3]), "SEED": ("UINT64", [1])}
    config = client.get_model_config(MODEL)
    assert [g["count"] for g in config["instance_group"]] == [2]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


CASES = {
    "text": dict(prompt="a red fox in the snow", width=64, height=64, steps=2, seed=7),
    "rectangular": dict(prompt="a lighthouse at dusk", width=80, height=48, steps=3, seed=123456789),
    "guidance": dict(prompt="a bowl of cherries", negative="blurry", width=64, height=48, steps=2, guidance=3.5,
                     seed=42),
    "count": dict(prompt="three paper boats", width=48, height=48, steps=2, seed=2024, count=2),
    "image_to_image": dict(prompt="an oil painting", steps=4, seed=5, strength=0.5, init_image=picture(64, 48)),
    "inpainting": dict(prompt="a window", width=48, height=64, steps=3, seed=9, init_image=picture(64, 48),
                       mask=(np.arange(48)[None, :] >= 24).repeat(64, 0).astype(np.uint8) * 255),
    # A picture whose sides are not multiples of 16 sets the size floored (64x48, as diffusers'
    # image processor floors it) and a mask of another size is resized to it.
    "inpainting_unsized": dict(prompt="a door", steps=2, seed=10, init_image=picture(53, 70),
                               mask=(np.arange(35)[None, :] >= 12).repeat(26, 0).astype(np.uint8) * 255),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_images_equal_zimage_generate(server, zimage_cli, package, tmp_path, case):
    params = CASES[case]
    image, seed = generate_http(server, **params)
    reference = cli_reference(zimage_cli, package, tmp_path, **params)
    assert seed == params["seed"]
    assert image.dtype == np.uint8
    if case == "inpainting_unsized":
        assert image.shape == (1, 48, 64, 3)
    assert image.shape == reference.shape
    assert np.array_equal(image, reference), f"{np.count_nonzero(image != reference)} bytes differ"


CONTROL_MODEL = "zimage_control"
CONTROLNET = "union-v2.1"  # the tiny ControlNet with inpainting channels (models/tiny-zimage-control)
CONTROL_CASES = {
    "control": dict(prompt="a lighthouse", steps=3, seed=31, control_image=picture(48, 64), control_scale=0.9),
    "control_canny_resized": dict(prompt="a red barn", width=48, height=48, steps=2, seed=32,
                                  control_image=picture(64, 80), control_preprocess="canny"),
    "control_inpainting": dict(prompt="a window", steps=3, seed=33, control_image=picture(64, 48),
                               init_image=picture(64, 48)[::-1].copy(),
                               mask=(np.arange(48)[None, :] >= 24).repeat(64, 0).astype(np.uint8) * 255),
}


@contextlib.contextmanager
def loaded(server, model):
    """`model` loaded for the duration (explicit model control), unloaded afterwards."""
    with connect(server) as client:
        client.load_model(model)
    try:
        yield model
    finally:
        with connect(server) as client:
            client.unload_model(model)


@pytest.fixture(scope="module")
def control_model(server):
    """The ControlNet model (`zimage triton-repo --controlnet`), loaded for these tests only."""
    with loaded(server, CONTROL_MODEL) as model:
        yield model


@pytest.mark.parametrize("case", sorted(CONTROL_CASES))
def test_controlnet_images_equal_zimage_generate(server, control_model, zimage_cli, tmp_path, case):
    params = CONTROL_CASES[case]
    image, seed = generate_http(server, model=control_model, **params)
    reference = cli_reference(zimage_cli, env_path("ZIMAGE_CONTROL_PACKAGE"), tmp_path, controlnet=CONTROLNET,
                              **params)
    assert seed == params["seed"]
    assert image.shape == reference.shape
    assert np.array_equal(image, reference), f"{np.count_nonzero(image != reference)} bytes differ"


def test_loras_parameter_equals_zimage_generate_with_lora(server, zimage_cli, package, tmp_path):
    """A model whose config.pbtxt lists a LoRA (`zimage triton-repo --lora FILE:0.8`) gives
    `zimage generate --lora FILE:0.8`'s image, which differs from the plain model's."""
    params = CASES["text"]
    with loaded(server, "zimage_lora") as model:
        image, _ = generate_http(server, model=model, **params)
    reference = cli_reference(zimage_cli, package, tmp_path, lora=f"{env_path('ZIMAGE_LORA_FILE')}:0.8", **params)
    assert np.array_equal(image, reference), f"{np.count_nonzero(image != reference)} bytes differ"
    plain, _ = generate_http(server, **params)
    assert not np.array_equal(image, plain), "the LoRA changed nothing"


OMNI_MODEL = "zimage_omni"
OMNI_GOLDENS = Path(__file__).resolve().parents[3] / "tests/golden/tiny-zimage-omni"
# (text_only: no reference, an empty REFERENCE_IMAGES: ZImageOmniPipeline's text-to-image)
EDIT_CASES = ["one_ref", "two_refs_cfg", "explicit_size", "text_only"]


def edit_case(name):
    cases = json.loads((OMNI_GOLDENS / "cases.json").read_text())["edit"]
    return next(c for c in cases if c["name"] == name)


def edit_inputs(module, case):
    """An edit request: the golden case's parameters, its reference files as REFERENCE_IMAGES."""
    items = inputs(module, prompt=case["prompt"], negative=case["negative_prompt"], width=case["width"],
                   height=case["height"], steps=case["num_inference_steps"], guidance=case["guidance_scale"],
                   seed=case["seed"])
    for name in ["CFG_NORMALIZATION", "CFG_TRUNCATION"]:
        items.append(tensor(module, name, np.array([case[name.lower()]], dtype=np.float32), "FP32"))
    files = [(OMNI_GOLDENS / f).read_bytes() for f in case["image_files"]]
    items.append(tensor(module, "REFERENCE_IMAGES", np.array(files, dtype=object), "BYTES"))
    return items


@pytest.fixture(scope="module")
def omni_model(server):
    """The editing model (an Omni package), loaded for these tests only."""
    with loaded(server, OMNI_MODEL) as model:
        yield model


@pytest.mark.parametrize("name", EDIT_CASES)
def test_edits_match_diffusers_and_zimage_edit(server, omni_model, zimage_cli, tmp_path, name):
    """REFERENCE_IMAGES on an editing package: diffusers' ZImageOmniPipeline image within one
    level (its golden), and `zimage edit`'s PNG byte for byte."""
    case = edit_case(name)
    with connect(server) as client:
        result = client.infer(omni_model, edit_inputs(httpclient, case))
    image, seed = result.as_numpy("IMAGE"), int(result.as_numpy("SEED")[0])
    golden = np.asarray(Image.open(OMNI_GOLDENS / case["output_files"][0]).convert("RGB"))
    assert seed == case["seed"]
    assert image.shape == (1, *golden.shape)
    assert np.abs(image[0].astype(int) - golden.astype(int)).max() <= 1
    out = tmp_path / "edit.png"
    command = [str(zimage_cli), "edit", "--model", env_path("ZIMAGE_OMNI_PACKAGE"), "--threads", "1", "--prompt",
               case["prompt"], "--output", str(out), "--seed", str(case["seed"]),
               "--steps", str(case["num_inference_steps"]), "--guidance", str(case["guidance_scale"]),
               "--cfg-normalization", str(case["cfg_normalization"]),
               "--cfg-truncation", str(case["cfg_truncation"])]
    for f in case["image_files"]:
        command += ["--image", str(OMNI_GOLDENS / f)]
    if case["negative_prompt"] is not None:
        command += ["--negative-prompt", case["negative_prompt"]]
    if case["width"] is not None:
        command += ["--width", str(case["width"]), "--height", str(case["height"])]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert np.array_equal(image[0], np.asarray(Image.open(out).convert("RGB")))


def test_loras_parameter_reaches_edits(server):
    """An editing model whose config.pbtxt lists a LoRA (`zimage triton-repo --lora FILE:0.8`)
    edits as diffusers' ZImageOmniPipeline with that adapter loaded (the `lora_peft` golden),
    within one level."""
    cases = json.loads((OMNI_GOLDENS / "cases.json").read_text())["lora"]
    case = next(c for c in cases if c["name"] == "lora_peft")
    assert [(Path(l["file"]).name, l["scale"]) for l in case["loras"]] == [("peft.safetensors", 0.8)]
    with loaded(server, "zimage_omni_lora") as model, connect(server) as client:
        image = client.infer(model, edit_inputs(httpclient, case)).as_numpy("IMAGE")
    golden = np.asarray(Image.open(OMNI_GOLDENS / case["output_files"][0]).convert("RGB"))
    assert image.shape == (1, *golden.shape)
    assert np.abs(image[0].astype(int) - golden.astype(int)).max() <= 1


def test_edit_errors_are_the_requests_own(server, omni_model):
    """Edit inputs the model or the request cannot take: INVALID_ARG with the reason, and the
    models keep serving."""
    case = edit_case("one_ref")
    with pytest.raises(InferenceServerException) as failure, connect(server) as client:
        client.infer(MODEL, edit_inputs(httpclient, case))
    assert "does not support editing" in str(failure.value)
    items = edit_inputs(httpclient, case) + [tensor(httpclient, "STRENGTH", np.array([0.5]), "FP64")]
    with pytest.raises(InferenceServerException) as failure, connect(server) as client:
        client.infer(omni_model, items)
    assert "STRENGTH does not apply to an edit" in str(failure.value)
    items = [i for i in edit_inputs(httpclient, case) if i.name() != "REFERENCE_IMAGES"]
    items.append(tensor(httpclient, "REFERENCE_IMAGES", np.array([b"not a picture"], dtype=object), "BYTES"))
    with pytest.raises(InferenceServerException) as failure, connect(server) as client:
        client.infer(omni_model, items)
    assert "REFERENCE_IMAGES" in str(failure.value)
    with connect(server) as client:
        result = client.infer(omni_model, edit_inputs(httpclient, dict(case, num_inference_steps=1)))
    assert result.as_numpy("IMAGE").shape == (1, 64, 96, 3)


def test_control_inputs_without_a_controlnet_are_refused(server):
    message = raw_request(server, inputs(httpclient, prompt="x", steps=1, control_image=picture(32, 32)))
    assert "parameter controlnet" in message


def test_grpc_gives_the_same_image(server):
    params = CASES["text"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        result = client.infer(MODEL, inputs(grpcclient, **params), client_timeout=TIMEOUT)
    finally:
        client.close()
    image_http, _ = generate_http(server, **params)
    assert np.array_equal(result.as_numpy("IMAGE"), image_http)
    assert int(result.as_numpy("SEED")[0]) == params["seed"]


def test_random_seed_is_returned_and_reproduces(server):
    image, seed = generate_http(server, prompt="a cat", width=32, height=32, steps=1)
    again, seed_again = generate_http(server, prompt="a cat", width=32, height=32, steps=1, seed=seed)
    assert seed_again == seed
    assert np.array_equal(image, again)


def test_only_requested_outputs_are_sent(server):
    with connect(server) as client:
        result = client.infer(MODEL, inputs(httpclient, prompt="a cup", width=32, height=32, steps=1, seed=3),
                              outputs=[httpclient.InferRequestedOutput("SEED")])
    assert int(result.as_numpy("SEED")[0]) == 3
    assert result.as_numpy("IMAGE") is None


def raw_request(server, items):
    """Sends `items` and returns the error message (the request must fail, as a bad request:
    INVALID_ARG, HTTP 400)."""
    with pytest.raises(InferenceServerException) as failure, connect(server) as client:
        client.infer(MODEL, items)
    assert failure.value.status() == "400", (failure.value.status(), str(failure.value))
    return str(failure.value)


def prompt_tensor(text):
    return tensor(httpclient, "PROMPT", np.array([text.encode()], dtype=object), "BYTES")


BAD_INPUTS = {
    # name: (inputs, words the error must contain, whether Triton itself rejects it before the backend)
    "missing PROMPT": (lambda: [tensor(httpclient, "WIDTH", np.array([64], dtype=np.int32), "INT32")],
                       "PROMPT is required", False),
    "WIDTH 65": (lambda: inputs(httpclient, prompt="x", width=65, height=64, steps=1), "multiple of 16", False),
    "WIDTH -64": (lambda: inputs(httpclient, prompt="x", width=-64, height=64, steps=1), "WIDTH must be positive", False),
    "wrong dtype": (lambda: [prompt_tensor("x"), tensor(httpclient, "WIDTH", np.array([64], dtype=np.int64), "INT64")],
                    "expects 'INT32'", True),
    "100k-character prompt": (lambda: [prompt_tensor("a" * 100_000)], "at most 16384", False),
    "COUNT above max_count": (lambda: inputs(httpclient, prompt="x", width=32, height=32, steps=1, count=5),
                              "at most 4", False),
    "STEPS 0": (lambda: inputs(httpclient, prompt="x", width=32, height=32, steps=0), "STEPS must be positive", False),
    "NaN GUIDANCE": (lambda: inputs(httpclient, prompt="x", width=32, height=32, steps=1, guidance=float("nan")),
                     "finite", False),
    "MASK without INIT_IMAGE": (lambda: inputs(httpclient, prompt="x", width=32, height=32, steps=1,
                                               mask=np.zeros((32, 32))), "MASK needs INIT_IMAGE", False),
    "not UTF-8": (lambda: [tensor(httpclient, "PROMPT", np.array([b"\xff\xfe"], dtype=object), "BYTES")],
                  "not UTF-8", False),
    "unknown input": (lambda: [prompt_tensor("x"), tensor(httpclient, "LORA", np.array([1], dtype=np.int32), "INT32")],
                      "unexpected inference input 'LORA'", True),
    # A picture side above the SDK's MAX_INPUT_SIDE is refused before it is resized.
    "INIT_IMAGE 1 x 16385": (lambda: inputs(httpclient, prompt="x", width=32, height=32, steps=1,
                                            init_image=np.zeros((1, 16385, 3))),
                             "input pictures may be at most 16384 pixels on a side", False),
    # A 1 x 1 picture asking for 16384 x 16384: refused by the model's size check before the
    # picture is resized (gigabytes) or a mask made.
    "1 x 1 INIT_IMAGE at 16384 x 16384": (lambda: inputs(httpclient, prompt="x", width=16384, height=16384, steps=1,
                                                         init_image=np.zeros((1, 1, 3)), mask=np.zeros((1, 1))),
                                          "width 16384 exceeds this model's limit", False),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_an_error_and_the_server_keeps_serving(server, case):
    make, words, _ = BAD_INPUTS[case]
    message = raw_request(server, make())
    assert words in message, message
    assert server.alive()
    image, seed = generate_http(server, prompt="still here", width=32, height=32, steps=1, seed=1)
    assert image.shape == (1, 32, 32, 3) and seed == 1


def test_a_cancelled_request_stops_its_run_and_frees_its_instance(server):
    """A gRPC client cancels a 1000-step 1024 x 1024 generation (minutes on this CPU): the
    backend sees it between two steps (TRITONBACKEND_RequestIsCancelled), answers CANCELLED,
    and its only instance serves the next request at once instead of after the long run."""
    with loaded(server, RELOAD_MODEL) as model:
        generate_http(server, model=model, prompt="warm up", width=64, height=64, steps=1, seed=1)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        answers = []
        try:
            long_run = client.async_infer(model, inputs(grpcclient, prompt="a long run", width=1024, height=1024,
                                                        steps=1000, seed=2),
                                          callback=lambda result, error: answers.append((result, error)))
            time.sleep(3)  # running: one step takes about 0.4 s
            long_run.cancel()
            cancelled_at = time.monotonic()
            image, seed = generate_http(server, model=model, prompt="next", width=64, height=64, steps=1, seed=3)
            waited = time.monotonic() - cancelled_at
        finally:
            client.close()
        assert image.shape == (1, 64, 64, 3) and seed == 3
        assert waited < 20, f"the next request waited {waited:.1f} s: the cancelled run went on"
        assert len(answers) == 1 and answers[0][1] is not None, answers
        deadline = time.monotonic() + 10
        while "the request was cancelled; its run stopped" not in server.log_tail(400):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)


def test_metrics_add_up(server):
    before = server.metrics()
    stats_before = stats(server)
    good = 3
    for i in range(good):
        generate_http(server, prompt="counted", width=32, height=32, steps=1, seed=i)
    backend_failures = [c for c, (_, _, by_triton) in BAD_INPUTS.items() if not by_triton]
    triton_failures = [c for c, (_, _, by_triton) in BAD_INPUTS.items() if by_triton]
    for case in backend_failures + triton_failures:
        raw_request(server, BAD_INPUTS[case][0]())
    after = server.metrics()
    stats_after = stats(server)

    def delta(name, **labels):
        return metric(after, name, model=MODEL, version="1", **labels) - metric(before, name, model=MODEL,
                                                                                 version="1", **labels)

    assert delta("nv_inference_request_success") == good
    # Requests the backend answered with an error count as BACKEND failures; the ones Triton
    # rejects itself (wrong data type, unknown input) never reach the model and are not counted.
    assert delta("nv_inference_request_failure", reason="BACKEND") == len(backend_failures)
    for reason in ["OTHER", "REJECTED", "CANCELED"]:
        assert delta("nv_inference_request_failure", reason=reason) == 0
    assert delta("nv_inference_count") == good
    # Triton's statistics agree with the metrics.
    assert stats_after["inference_stats"]["success"]["count"] - stats_before["inference_stats"]["success"]["count"] == good
    assert (stats_after["inference_stats"]["fail"]["count"] - stats_before["inference_stats"]["fail"]["count"]
            == len(backend_failures))
    # Every request that reached the backend was counted by exactly one instance.
    counts_before, counts_after = instance_counts(before), instance_counts(after)
    assert sum(counts_after.values()) - sum(counts_before.values()) == good + len(backend_failures)


def test_two_instances_serve_concurrent_requests(server):
    before_metrics = server.metrics()
    before = stats(server)
    n = 8
    params = [dict(prompt=f"a garden, variant {i}", width=256, height=256, steps=4, seed=100 + i) for i in range(n)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(lambda p: generate_http(server, **p), params))
    wall_ns = (time.monotonic() - started) * 1e9
    # Each request's statistics are in before its response leaves; an execution's (batch)
    # statistics follow its last response, so they may lag the client by a moment.
    deadline = time.monotonic() + 10
    while (after := stats(server))["execution_count"] - before["execution_count"] < n and time.monotonic() < deadline:
        time.sleep(0.05)
    after_metrics = server.metrics()
    assert [seed for _, seed in results] == [p["seed"] for p in params]
    compute_ns = after["inference_stats"]["compute_infer"]["ns"] - before["inference_stats"]["compute_infer"]["ns"]
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == n
    assert after["execution_count"] - before["execution_count"] == n
    # Triton runs one request at a time per instance: compute time that adds up to more than
    # the wall time means both instances were computing at once.
    print(f"two instances: {compute_ns / 1e9:.2f} s of compute in {wall_ns / 1e9:.2f} s of wall time")
    assert compute_ns > 1.3 * wall_ns, f"compute {compute_ns / 1e9:.2f} s in {wall_ns / 1e9:.2f} s of wall time"
    counts = {k: v - instance_counts(before_metrics).get(k, 0) for k, v in instance_counts(after_metrics).items()}
    assert sorted(counts) == ["zimage_0_0", "zimage_0_1"], counts
    assert all(v > 0 for v in counts.values()), counts
    assert sum(counts.values()) == n


def test_unload_and_reload_do_not_leak(tmp_path, results_dir):
    """Loads, runs and unloads a model again and again through the model-control API on a
    server of its own, whose resident size after each unload must stay where it was.

    That server runs with one malloc arena (MALLOC_ARENA_MAX=1): glibc otherwise gives each
    of Triton's loader threads its own arena, and which thread loads the model changes from
    one load to the next, so the resident size wanders by tens of MiB with no leak at all.
    With one arena, freed memory is reused, and what the backend hands back on unload
    (malloc_trim) shows as a drop."""
    server = start_server(tmp_path / "tritonserver.log", models=(), env={"MALLOC_ARENA_MAX": "1"})
    try:
        with connect(server) as client:
            def cycle():
                client.load_model(RELOAD_MODEL)
                assert client.is_model_ready(RELOAD_MODEL)
                loaded = server.rss_kib()
                image, _ = generate_http(server, model=RELOAD_MODEL, prompt="reload", width=64, height=64, steps=2,
                                         seed=11)
                client.unload_model(RELOAD_MODEL)
                deadline = time.monotonic() + 60
                while client.is_model_ready(RELOAD_MODEL) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not client.is_model_ready(RELOAD_MODEL)
                # Unloading finishes on Triton's side after the model stops being ready.
                time.sleep(0.5)
                return image, loaded, server.rss_kib()

            reference, _, _ = cycle()
            _, _, baseline = cycle()
            rounds = [cycle() for _ in range(5)]
        for image, _, _ in rounds:
            assert np.array_equal(image, reference)
        unloaded = [r[2] for r in rounds]
        drops = [loaded - after for _, loaded, after in rounds]
        summary = (f"after unload: {baseline / 1024:.1f} MiB, then {[round(u / 1024, 1) for u in unloaded]} MiB; "
                   f"each unload gave back {[round(d / 1024) for d in drops]} MiB")
        print(summary)
        (results_dir / "reload-rss.json").write_text(json.dumps({
            "after_unload_baseline_kib": baseline, "after_unload_kib": unloaded, "given_back_kib": drops}) + "\n")
        # No leak: five more load/run/unload rounds leave the resident size where it was.
        assert max(unloaded) - baseline < 4 * 1024, summary
        # And unloading does give the pipeline's memory back.
        assert min(drops) > 32 * 1024, summary
    finally:
        check_clean_exit(server)


def test_bounded_load_run(server, results_dir):
    """200 requests, 16 at a time, through Triton on loopback: every one answered, and every
    answer equal to the others with the same seed."""
    total, concurrency = 200, 16
    # First one request at a time: the latency without queueing, and the part of it spent in
    # the pipeline (Triton's compute_infer).
    serial = []
    stats_before = stats(server)
    for i in range(20):
        started = time.monotonic()
        generate_http(server, prompt="a small boat on a lake", width=64, height=64, steps=2, seed=i % 8)
        serial.append(time.monotonic() - started)
    stats_after = stats(server)
    compute = stats_after["inference_stats"]["compute_infer"]
    compute_before = stats_before["inference_stats"]["compute_infer"]
    compute_ms = (compute["ns"] - compute_before["ns"]) / (compute["count"] - compute_before["count"]) / 1e6
    before = server.metrics()

    def one(i):
        started = time.monotonic()
        image, seed = generate_http(server, prompt="a small boat on a lake", width=64, height=64, steps=2,
                                    seed=i % 8)
        return i, seed, image, time.monotonic() - started

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(total)))
    elapsed = time.monotonic() - started
    after = server.metrics()
    assert len(results) == total
    by_seed = {}
    for i, seed, image, _ in results:
        assert seed == i % 8
        assert image.shape == (1, 64, 64, 3)
        first = by_seed.setdefault(seed, image)
        assert np.array_equal(image, first), f"request {i} differs from the first with seed {seed}"
    succeeded = (metric(after, "nv_inference_request_success", model=MODEL, version="1")
                 - metric(before, "nv_inference_request_success", model=MODEL, version="1"))
    assert succeeded == total
    latencies = sorted(r[3] for r in results)
    numbers = {
        "requests": total,
        "concurrency": concurrency,
        "size": "64x64",
        "steps": 2,
        "instances": 2,
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(total / elapsed, 2),
        "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "latency_p90_ms": round(1000 * latencies[int(len(latencies) * 0.9)], 1),
        "latency_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
        "latency_max_ms": round(1000 * latencies[-1], 1),
        "latency_mean_ms": round(1000 * statistics.mean(latencies), 1),
        "serial_latency_p50_ms": round(1000 * statistics.median(serial), 1),
        "serial_compute_infer_mean_ms": round(compute_ms, 1),
    }
    (results_dir / "load.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print("load run:", json.dumps(numbers))
