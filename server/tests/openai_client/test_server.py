"""zimage-server driven by the official `openai` Python client (scripts/test-server.sh pins it).

- parity: `client.images.generate` / `client.images.edit` return the PNG bytes that
  `zimage generate` writes for the same seed and parameters (text chunks included);
- the response formats (b64_json, url), output formats (png, jpeg, webp) and the stream;
- errors arrive as the client's typed exceptions with OpenAI's error body;
- a bounded load test on loopback (300 requests, 24 at a time, --max-queue 8): every request
  gets its own image or a 429, no worker dies, RSS returns to its idle level;
- faults: a streaming client that goes away cancels its generation; SIGTERM in the middle of a
  burst lets the accepted requests finish and the process exit 0.

Binaries come from ZIMAGE_BIN_DIR (default target/debug; scripts/test-server.sh sets it); the server
listens on 127.0.0.1 only.
"""

import base64
import concurrent.futures
import json
import os
import pathlib
import signal
import struct
import subprocess
import threading
import time
import zlib

import httpx
import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
BIN = pathlib.Path(os.environ.get("ZIMAGE_BIN_DIR", ROOT / "target" / "debug"))
MODEL = str(ROOT / "models" / "tiny-zimage")
ENHANCER = str(ROOT / "models" / "tiny-qwen3-enhancer")
OMNI = str(ROOT / "models" / "tiny-zimage-omni")
# One ONNX Runtime thread in the server and the CLI alike: same arithmetic, same bytes.
THREADS = "1"


# --------------------------------------------------------------------------------------------
# helpers


class Server:
    """A zimage-server process on a free loopback port."""

    def __init__(self, *args, log_name="server"):
        self.log_path = ROOT / "target" / f"zimage-{log_name}-{os.getpid()}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "zimage-server"), "--host", "127.0.0.1", "--port", "0", "--threads", THREADS,
             "--model", MODEL, *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, "ZIMAGE_LOG": "info,ort=error"},
        )
        line = self.proc.stdout.readline().decode()
        prefix = "zimage-server listening on "
        assert line.startswith(prefix), (line, self.log_path.read_text())
        self.url = line[len(prefix):].strip()
        deadline = time.time() + 180
        while httpx.get(f"{self.url}/ready").status_code != 200:
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.time() < deadline, "not ready in time"
            time.sleep(0.1)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def metrics(self):
        values = {}
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_metric(self, name, predicate, within=30.0):
        deadline = time.time() + within
        while True:
            value = self.metrics().get(name, 0.0)
            if predicate(value):
                return value
            assert time.time() < deadline, f"{name} stayed at {value}"
            time.sleep(0.02)

    def rss_mib(self):
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self, signalled=False):
        """SIGTERM (unless already sent); returns the exit code."""
        if self.proc.poll() is None and not signalled:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        return code


def cli_generate(cwd, *args):
    """`zimage generate` with the server's model path and thread count."""
    out = subprocess.run(
        [str(BIN / "zimage"), "generate", "--model", MODEL, "--threads", THREADS, *args],
        cwd=cwd, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    return out


def png_bytes(width, height, pixels, color_type):
    """A minimal PNG (8-bit gray: color_type 0, RGB: 2) from rows of bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + row for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_text(data):
    """A PNG's size and its iTXt chunks as a dict."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text, size = 8, {}, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        if kind == b"iTXt":
            key, rest = body.split(b"\x00", 1)
            # compression flag, method, language tag \0, translated keyword \0, text
            _, _, rest = rest[0], rest[1], rest[2:]
            _, rest = rest.split(b"\x00", 1)
            _, value = rest.split(b"\x00", 1)
            text[key.decode()] = value.decode()
        pos += 12 + length
    return size, text


def b64_images(response):
    return [base64.b64decode(item.b64_json) for item in response.data]


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def server():
    s = Server("--max-queue", "8", "--workers", "1", "--enhancer", ENHANCER, "--enhance-max-new-tokens", "12")
    yield s
    # An idle server drains at once and exits 0.
    assert s.stop() == 0, s.log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# --------------------------------------------------------------------------------------------
# parity with `zimage generate`


@pytest.mark.parametrize("case", [
    dict(name="turbo", prompt="a red fox in fresh snow", n=1, extra={}),
    dict(name="guided", prompt="a lighthouse at dusk", n=1,
         extra={"negative_prompt": "blurry", "guidance_scale": 2.5, "cfg_normalization": 1.2, "cfg_truncation": 0.8}),
    dict(name="batch", prompt="two paper boats", n=2, extra={}),
])
def test_generate_is_byte_identical_to_the_cli(client, tmp_path, case):
    seed, steps = 1234, 3
    response = client.images.generate(
        model="tiny-zimage", prompt=case["prompt"], n=case["n"], size="64x48", response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": steps, **case["extra"]},
    )
    served = b64_images(response)
    assert len(served) == case["n"]
    args = ["--prompt", case["prompt"], "--width", "64", "--height", "48", "--steps", str(steps), "--seed", str(seed),
            "--count", str(case["n"]), "-o", "out.png"]
    flags = {"negative_prompt": "--negative-prompt", "guidance_scale": "--guidance",
             "cfg_normalization": "--cfg-normalization", "cfg_truncation": "--cfg-truncation"}
    for key, value in case["extra"].items():
        args += [flags[key], str(value)]
    cli_generate(tmp_path, *args)
    files = ["out.png"] if case["n"] == 1 else [f"out-{i}.png" for i in range(case["n"])]
    for index, (name, image) in enumerate(zip(files, served)):
        written = (tmp_path / name).read_bytes()
        assert image == written, f"{case['name']} image {index} differs from the CLI's"
        size, text = png_text(image)
        assert size == (64, 48)
        assert (text["seed"], text["steps"], text["batch_index"], text["model"]) == (str(seed), "3", str(index), MODEL)
    assert response.size == "64x48" and response.output_format == "png"
    assert response.model_extra["seed"] == seed


def test_enhanced_prompt_is_byte_identical_to_the_cli(client, tmp_path):
    response = client.images.generate(prompt="a cat", size="64x64",
                                      extra_body={"seed": 1, "num_inference_steps": 2, "enhance_prompt": True})
    (served,) = b64_images(response)
    cli_generate(tmp_path, "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1",
                 "--enhance", "--enhancer", ENHANCER, "--max-new-tokens", "12", "-o", "out.png")
    assert served == (tmp_path / "out.png").read_bytes()
    _, text = png_text(served)
    assert text["original_prompt"] == "a cat"
    assert response.data[0].revised_prompt == text["prompt"] != "a cat"


@pytest.mark.parametrize("inpaint", [False, True])
def test_edit_is_byte_identical_to_the_cli(client, tmp_path, inpaint):
    w, h = 64, 64
    rgb = [bytes((x * 4 + y) % 256 if c == 0 else (y * 4) % 256 if c == 1 else 128 for x in range(w) for c in range(3))
           for y in range(h)]
    (tmp_path / "init.png").write_bytes(png_bytes(w, h, rgb, 2))
    # White = repaint: the right half.
    gray = [bytes(255 if x >= w // 2 else 0 for x in range(w)) for _ in range(h)]
    (tmp_path / "mask.png").write_bytes(png_bytes(w, h, gray, 0))
    seed, steps, strength = 77, 4, 0.75
    kwargs = dict(mask=tmp_path / "mask.png") if inpaint else {}
    response = client.images.edit(
        model="tiny-zimage", image=tmp_path / "init.png", prompt="a green meadow", response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": steps, "strength": strength}, **kwargs,
    )
    (served,) = b64_images(response)
    args = ["--prompt", "a green meadow", "--init-image", "init.png", "--strength", str(strength),
            "--steps", str(steps), "--seed", str(seed), "-o", "out.png"]
    if inpaint:
        args += ["--mask", "mask.png"]
    cli_generate(tmp_path, *args)
    assert served == (tmp_path / "out.png").read_bytes()
    _, text = png_text(served)
    assert text["init_image"] == "init.png" and text["strength"] == str(strength)
    assert text.get("mask") == ("mask.png" if inpaint else None)


def test_instruction_edit_is_byte_identical_to_zimage_edit(tmp_path):
    """On an editing (Omni) package, `images.edit` with a list of pictures is an instruction edit
    with those references: the PNG `zimage edit` writes for the same files and settings."""
    golden = ROOT / "tests" / "golden" / "tiny-zimage-omni" / "inputs"
    for k, name in enumerate(["ref_80x128.png", "ref_100x70.png"]):
        (tmp_path / f"ref{k}.png").write_bytes((golden / name).read_bytes())
    s = Server("--model", OMNI, log_name="omni")
    try:
        response = s.client().images.edit(
            model="tiny-zimage-omni", image=[tmp_path / "ref0.png", tmp_path / "ref1.png"],
            prompt="put the cat on the sofa", response_format="b64_json",
            extra_body={"seed": 12, "num_inference_steps": 3, "guidance_scale": 2.0},
        )
    finally:
        assert s.stop() == 0, s.log_path.read_text()[-4000:]
    (served,) = b64_images(response)
    out = subprocess.run(
        [str(BIN / "zimage"), "edit", "--model", OMNI, "--threads", THREADS, "--image", "ref0.png", "--image",
         "ref1.png", "--prompt", "put the cat on the sofa", "--seed", "12", "--steps", "3", "--guidance", "2.0",
         "-o", "out.png"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert served == (tmp_path / "out.png").read_bytes()
    _, text = png_text(served)
    assert [r["file"] for r in json.loads(text["reference_images"])] == ["ref0.png", "ref1.png"]


# --------------------------------------------------------------------------------------------
# formats, models, stream


def test_models_and_formats(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-zimage"]
    common = dict(prompt="a small boat", size="32x32", extra_body={"seed": 5, "num_inference_steps": 2})
    png = b64_images(client.images.generate(**common))[0]
    by_url = client.images.generate(response_format="url", **common)
    url = by_url.data[0].url
    assert url.startswith(server.url + "/v1/images/files/") and url.endswith(".png")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == png
    jpeg = b64_images(client.images.generate(output_format="jpeg", output_compression=80, **common))[0]
    assert jpeg[:3] == b"\xff\xd8\xff"
    webp = client.images.generate(output_format="webp", **common)
    assert webp.output_format == "webp"
    data = b64_images(webp)[0]
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    low = client.images.generate(quality="low", prompt="q", size="32x32", extra_body={"seed": 1})
    _, text = png_text(b64_images(low)[0])
    assert text["steps"] == "4" and low.quality == "low"


def test_stream_sends_progress_then_the_same_image(client):
    common = dict(prompt="a windmill", size="64x64", extra_body={"seed": 9, "num_inference_steps": 5})
    expected = b64_images(client.images.generate(**common))[0]
    events = list(client.images.generate(stream=True, **common))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.progress"] * 5 + ["image_generation.completed"], kinds
    assert [e.model_extra["step"] for e in events[:5]] == [1, 2, 3, 4, 5]
    done = events[-1]
    assert base64.b64decode(done.b64_json) == expected
    assert (done.size, done.output_format, done.background) == ("64x64", "png", "opaque")
    # Edits stream as image_edit.*: strength 0.5 of 4 steps runs 2.
    picture = png_bytes(32, 32, [bytes(range(96))] * 32, 2)
    edit = list(client.images.edit(image=("p.png", picture, "image/png"), prompt="x", stream=True,
                                   extra_body={"seed": 2, "num_inference_steps": 4, "strength": 0.5}))
    assert [e.type for e in edit] == ["image_edit.progress"] * 2 + ["image_edit.completed"]
    assert png_text(base64.b64decode(edit[-1].b64_json))[1]["init_image"] == "p.png"


def test_stream_sends_partial_images(client):
    """`partial_images` reach the client as the library's own ImageGenPartialImageEvent, between
    the steps (8 steps, 2 previews: after steps 3 and 6), each a picture of the request's size
    that is not yet the final image."""
    common = dict(prompt="a lighthouse", size="64x64", extra_body={"seed": 4, "num_inference_steps": 8})
    expected = b64_images(client.images.generate(**common))[0]
    events = list(client.images.generate(stream=True, partial_images=2, **common))
    order = [e.model_extra["step"] if e.type == "image_generation.progress" else e.type for e in events]
    partial = "image_generation.partial_image"
    assert order == [1, 2, 3, partial, 4, 5, 6, partial, 7, 8, "image_generation.completed"], order
    previews = [e for e in events if e.type == partial]
    assert all(isinstance(e, openai.types.ImageGenPartialImageEvent) for e in previews)
    assert [e.partial_image_index for e in previews] == [0, 1]
    for e in previews:
        assert (e.size, e.quality, e.background, e.output_format) == ("64x64", "medium", "opaque", "png")
        image = base64.b64decode(e.b64_json)
        assert png_text(image)[0] == (64, 64) and image != expected
    assert base64.b64decode(events[-1].b64_json) == expected
    # A stream carries the images themselves: `url` is refused, naming the field.
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(stream=True, response_format="url", **common)
    assert bad.value.body["param"] == "response_format"


def test_errors_are_typed_with_openai_bodies(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="60x64")
    assert bad.value.status_code == 400
    assert set(bad.value.body) == {"message", "type", "param", "code"}
    assert bad.value.body["type"] == "invalid_request_error" and "multiple of 16" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt="x")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad_quality:
        client.images.generate(prompt="x", quality="ultra")
    assert bad_quality.value.body["param"] == "quality"


def test_keys_are_required_when_set(tmp_path):
    s = Server("--api-key", "secret-1", log_name="keys")
    try:
        with pytest.raises(openai.AuthenticationError) as denied:
            s.client().models.list()
        assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="secret-1", max_retries=0)
        assert [m.id for m in ok.models.list()] == ["tiny-zimage"]
    finally:
        assert s.stop() == 0


# --------------------------------------------------------------------------------------------
# load and faults


def test_load_every_request_gets_its_image_or_429(server, client):
    total, concurrency = 300, 24
    # Warm up (the first generations grow ONNX Runtime's arenas), then the idle level.
    for seed in range(3):
        client.images.generate(prompt="warm up", size="64x64", extra_body={"seed": seed, "num_inference_steps": 2})
    time.sleep(0.5)
    rss_idle = server.rss_mib()
    before = server.metrics()
    results = [None] * total

    # Every 30th request is invalid (a size that is no multiple of 16): it gets its 400 and
    # disturbs nothing else.
    bad = {i for i in range(total) if i % 30 == 29}

    def one(i):
        started = time.perf_counter()
        try:
            r = client.images.generate(prompt=f"load test request {i}", size="60x60" if i in bad else "64x64",
                                       extra_body={"seed": 10_000 + i, "num_inference_steps": 2})
            results[i] = ("ok", time.perf_counter() - started, r)
        except openai.BadRequestError as e:
            assert i in bad and "multiple of 16" in e.body["message"], (i, e.body)
            results[i] = ("400", time.perf_counter() - started, None)
        except openai.RateLimitError as e:
            assert e.body["code"] == "queue_full"
            retry_after = int(e.response.headers["retry-after"])
            assert retry_after >= 1
            results[i] = ("429", time.perf_counter() - started, None)
            # A polite client waits before its next request (this one is not retried); capped
            # so the test stays short.
            time.sleep(min(retry_after, 1))

    peak = [rss_idle]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss_mib())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    burst_start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    burst = time.perf_counter() - burst_start
    stop.set()
    sampler.join()

    # Every request answered once: its own image (its prompt and seed in the PNG) or a 429;
    # the invalid ones a 400.
    assert all(r is not None for r in results)
    ok = [(i, r) for i, r in enumerate(results) if r[0] == "ok"]
    refused = [r for r in results if r[0] == "429"]
    invalid = [i for i, r in enumerate(results) if r[0] == "400"]
    assert set(invalid) == bad
    assert len(ok) + len(refused) + len(invalid) == total
    assert len(ok) >= 9, "at least the worker's and the queue's share is served"
    images = set()
    for i, (_, _, response) in ok:
        (image,) = b64_images(response)
        _, text = png_text(image)
        assert (text["prompt"], text["seed"]) == (f"load test request {i}", str(10_000 + i))
        assert response.model_extra["seed"] == 10_000 + i
        images.add(image)
    assert len(images) == len(ok), "no image served twice"
    after = server.metrics()
    delta = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert delta('zimage_images_total{model="tiny-zimage"}') == len(ok)
    assert delta('zimage_errors_total{kind="queue_full"}') == len(refused)
    assert after['zimage_workers_alive{model="tiny-zimage"}'] == 1
    assert after['zimage_queue_depth{model="tiny-zimage"}'] == 0 and after['zimage_in_flight{model="tiny-zimage"}'] == 0

    # Memory returns to its idle level.
    time.sleep(1.0)
    rss_after = server.rss_mib()
    latencies = sorted(r[1] for _, r in ok)
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    report = {
        "requests": total, "concurrency": concurrency, "max_queue": 8, "workers": 1, "size": "64x64", "steps": 2,
        "ok": len(ok), "429": len(refused), "400": len(invalid), "burst_s": round(burst, 3),
        "images_per_s": round(len(ok) / burst, 2), "requests_per_s": round(total / burst, 1),
        "p50_ms_ok": round(pct(0.50) * 1000, 1), "p99_ms_ok": round(pct(0.99) * 1000, 1),
        "p50_ms_429": round(sorted(r[1] for r in refused)[len(refused) // 2] * 1000, 1) if refused else None,
        "rss_idle_mib": round(rss_idle, 1), "rss_peak_mib": round(peak[0], 1), "rss_after_mib": round(rss_after, 1),
    }
    print("\nload test:", json.dumps(report))
    (ROOT / "target" / "zimage-server-load.json").write_text(json.dumps(report, indent=2))
    assert rss_after <= rss_idle + 16, report


def test_a_streaming_client_that_leaves_cancels_its_generation(server, client):
    before = server.metrics().get('zimage_errors_total{kind="cancelled"}', 0)
    slow = dict(prompt="a slow river", size="512x512", extra_body={"seed": 3, "num_inference_steps": 200})
    started = time.time()
    stream = client.images.generate(stream=True, **slow)
    first = next(iter(stream))
    assert first.type == "image_generation.progress"
    stream.close()
    server.wait_metric('zimage_in_flight{model="tiny-zimage"}', lambda v: v == 0, within=5)
    assert time.time() - started < 8, "the 200 steps were not run to the end"
    server.wait_metric('zimage_errors_total{kind="cancelled"}', lambda v: v == before + 1, within=5)
    # The worker serves the next request.
    assert len(client.images.generate(prompt="next", size="32x32", extra_body={"num_inference_steps": 1}).data) == 1


def test_sigterm_mid_burst_finishes_accepted_work_and_exits_0():
    s = Server("--max-queue", "4", "--workers", "2", log_name="sigterm")
    c = s.client(timeout=120)
    results = {}

    def one(i):
        try:
            r = c.images.generate(prompt=f"burst {i}", size="256x256",
                                  extra_body={"seed": i, "num_inference_steps": 16})
            results[i] = ("ok", r)
        except openai.APIStatusError as e:
            results[i] = (e.status_code, e.body)
        except openai.APIConnectionError:
            results[i] = ("refused", None)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = [pool.submit(one, i) for i in range(8)]

        def settled():
            # Each of the 8 is running, queued, refused (429) or done.
            m = s.metrics()
            return sum(m.get(k, 0) for k in ('zimage_in_flight{model="tiny-zimage"}',
                                             'zimage_queue_depth{model="tiny-zimage"}',
                                             'zimage_errors_total{kind="queue_full"}',
                                             'zimage_images_total{model="tiny-zimage"}'))
        deadline = time.time() + 60
        while settled() < 8:
            assert time.time() < deadline
            time.sleep(0.01)
        m = s.metrics()
        assert m['zimage_workers_alive{model="tiny-zimage"}'] == 2, m
        assert m['zimage_in_flight{model="tiny-zimage"}'] >= 1 and m['zimage_queue_depth{model="tiny-zimage"}'] >= 1, m
        s.proc.send_signal(signal.SIGTERM)
        s.wait_metric("zimage_draining", lambda v: v == 1, within=5)
        late = [pool.submit(one, 100 + i) for i in range(4)]
        for f in first + late:
            f.result()
    code = s.stop(signalled=True)
    assert code == 0, s.log_path.read_text()[-4000:]
    statuses = {i: r[0] for i, r in results.items()}
    ok = [i for i in range(8) if statuses[i] == "ok"]
    # Everything accepted before the signal (one running, the queue) finished; the rest of
    # the burst got 429, and what came after the signal 503 (or no connection once it closed).
    assert all(statuses[i] in ("ok", 429) for i in range(8)), statuses
    assert len(ok) >= 3, statuses
    assert all(statuses[100 + i] in (503, "refused") for i in range(4)), statuses
    for i in ok:
        _, text = png_text(b64_images(results[i][1])[0])
        assert text["prompt"] == f"burst {i}"
