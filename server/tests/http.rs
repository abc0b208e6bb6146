//! The server over loopback HTTP: every error status in OpenAI's shape, the queue's 429, the
//! request timeout, a disconnecting client's cancellation, 503 while loading and draining,
//! SIGTERM's drain to exit 0, and the stream's events with partial images. A plain HTTP/1.1
//! client on std's TcpStream drives it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tiny() -> String {
    root().join("models/tiny-zimage").display().to_string()
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts the server on a free loopback port; returns once it printed its address.
    fn spawn(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zimage-server"))
            .args(["--host", "127.0.0.1", "--port", "0", "--threads", "1"])
            .args(args)
            .current_dir(root())
            .env("ZIMAGE_LOG", "warn,ort=error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start zimage-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("zimage-server listening on http://").unwrap_or_else(|| panic!("{line:?}"));
        Server { addr: addr.to_string(), child }
    }

    /// Starts it and waits for /ready.
    fn start(args: &[&str]) -> Server {
        let server = Server::spawn(args);
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.get("/ready").status != 200 {
            assert!(Instant::now() < deadline, "not ready in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        send(&self.addr, method, path, headers, body)
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    fn post_json(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Response {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        self.request("POST", path, &all, body.to_string().as_bytes())
    }

    fn generate(&self, body: Value) -> Response {
        self.post_json("/v1/images/generations", &body, &[])
    }

    fn metric(&self, line_start: &str) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap();
        text.lines().find_map(|l| l.strip_prefix(line_start).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Polls a metric until `done` holds for it.
    fn wait_metric(&self, line_start: &str, done: impl Fn(f64) -> bool, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.metric(line_start);
            if done(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{line_start} stayed at {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// The body for messages (images cut short).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).chars().take(400).collect()
    }

    /// Asserts OpenAI's error shape with this status, type and code; returns the error object.
    fn assert_error(&self, status: u16, kind: &str, code: Option<&str>) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let body = self.json();
        let error = body["error"].clone();
        let keys: Vec<&String> = error.as_object().expect("error object").keys().collect();
        assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
        assert_eq!(error["type"], kind, "{body}");
        assert_eq!(error["code"].as_str(), code, "{body}");
        assert!(!error["message"].as_str().unwrap().is_empty(), "{body}");
        error
    }
}

/// One HTTP/1.1 request on its own connection.
fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    // The server may answer (413) and close before the whole body is sent.
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body));
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no response head in {:?}", String::from_utf8_lossy(raw));
    });
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 2 + size + 2..];
        }
        body = out;
    }
    Response { status, headers, body }
}

/// The events of a `text/event-stream` body: (event name, data as JSON), keep-alive comments
/// left out.
fn events(body: &[u8]) -> Vec<(String, Value)> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            Some((name?, serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"))))
        })
        .collect()
}

/// A picture in a `b64_json` field.
fn picture(item: &Value) -> image::RgbImage {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(item["b64_json"].as_str().unwrap()).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// Sends a request on a new connection and returns the connection without reading the answer.
fn open_request(addr: &str, body: &Value) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([rgb[0].wrapping_add(x as u8), rgb[1].wrapping_add(y as u8), rgb[2]])
    });
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

/// A multipart/form-data body: text fields, then files (name, file name, bytes).
fn multipart(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "zimage-test-boundary-7d1e";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    for (name, file, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn every_error_status_has_openai_shape() {
    // "broken": the tiny package with a LoRA at scale 1e30, whose values leave float range at
    // the first step (an inference error); the package itself can no longer be made to overflow
    // (the SDK refuses VAE factors beyond 1e6 at load).
    let broken_arg = format!("broken={}", tiny());
    let lora = "broken=tests/golden/tiny-zimage/loras/peft.safetensors:1e30";
    let server = Server::start(&[
        "--model",
        &tiny(),
        "--model",
        &broken_arg,
        "--lora",
        lora,
        "--api-key",
        "key-one",
        "--api-key",
        "key-two",
        "--max-body-bytes",
        "200000",
        "--max-input-side",
        "256",
    ]);
    let auth = [("Authorization", "Bearer key-two")];
    let small = json!({"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 3});

    // Open routes.
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/ready").json()["models"], json!(["tiny-zimage", "broken"]));

    // 401: no key, a wrong key; then the models with a right one.
    server.get("/v1/models").assert_error(401, "invalid_request_error", Some("invalid_api_key"));
    server.post_json("/v1/images/generations", &small, &[("Authorization", "Bearer key-three")]).assert_error(
        401,
        "invalid_request_error",
        Some("invalid_api_key"),
    );
    // The scheme's name in any case (RFC 9110); a key without it is still refused.
    assert_eq!(server.request("GET", "/v1/models", &[("Authorization", "BEARER key-one")], b"").status, 200);
    let keyless = server.request("GET", "/v1/models", &[("Authorization", "key-one")], b"");
    keyless.assert_error(401, "invalid_request_error", Some("invalid_api_key"));
    let models = server.request("GET", "/v1/models", &[("Authorization", "Bearer key-one")], b"");
    let models = models.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny-zimage", "broken"]);

    // 200 with the key, with a request id.
    let ok = server.post_json("/v1/images/generations", &small, &auth);
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(ok.header("x-request-id").is_some_and(|id| id.starts_with("req_")));
    assert_eq!(ok.json()["data"].as_array().unwrap().len(), 1);
    assert_eq!(ok.json()["seed"], 3);

    // 400: every invalid request, with the field named where there is one.
    let bad = |body: &[u8]| {
        server.request("POST", "/v1/images/generations", &[auth[0], ("Content-Type", "application/json")], body)
    };
    bad(b"{not json").assert_error(400, "invalid_request_error", None);
    for (body, param) in [
        (json!({"size": "64x64"}), Some("prompt")),
        (json!({"prompt": "x", "size": "60x64"}), Some("size")),
        (json!({"prompt": "x", "size": "64x64", "num_inference_steps": 0}), Some("num_inference_steps")),
        (json!({"prompt": "x", "size": "64x64", "guidance_scale": -1.0}), Some("guidance_scale")),
        (json!({"prompt": "x", "size": "64x64", "n": 0}), Some("n")),
        (json!({"prompt": "x", "size": "64x64", "n": "two"}), Some("n")),
        (json!({"prompt": "x", "size": "64x64", "output_format": "gif"}), Some("output_format")),
        (json!({"prompt": "x", "size": "64x64", "enhance_prompt": true}), Some("enhance_prompt")),
        (json!({"prompt": "x", "size": "64x64", "stream": true, "response_format": "url"}), Some("response_format")),
    ] {
        let error = bad(body.to_string().as_bytes()).assert_error(400, "invalid_request_error", None);
        assert_eq!(error["param"].as_str(), param, "{body}: {error}");
    }

    // 404: an unknown model, an unknown route, an expired or unknown image URL.
    let mut unknown = small.clone();
    unknown["model"] = json!("dall-e-3");
    let error = server.post_json("/v1/images/generations", &unknown, &auth).assert_error(
        404,
        "invalid_request_error",
        Some("model_not_found"),
    );
    assert_eq!(error["param"], "model");
    server.get("/v2/nothing").assert_error(404, "invalid_request_error", Some("not_found"));
    server.get("/v1/images/files/0123.png").assert_error(404, "invalid_request_error", Some("not_found"));
    server.get("/v1/images/generations").assert_error(405, "invalid_request_error", Some("method_not_allowed"));

    // 413: a JSON body and an upload over --max-body-bytes.
    let huge = json!({"prompt": "x".repeat(300_000)});
    server.post_json("/v1/images/generations", &huge, &auth).assert_error(
        413,
        "invalid_request_error",
        Some("request_too_large"),
    );
    let big_upload = vec![7u8; 300_000];
    let (content_type, body) = multipart(&[("prompt", "x")], &[("image", "big.png", &big_upload)]);
    server.request("POST", "/v1/images/edits", &[auth[0], ("Content-Type", &content_type)], &body).assert_error(
        413,
        "invalid_request_error",
        Some("request_too_large"),
    );

    // JSON on the edits route: the route's body type, and what came instead.
    let e = server.post_json("/v1/images/edits", &small, &auth).assert_error(400, "invalid_request_error", None);
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("multipart/form-data") && message.contains("\"application/json\""), "{e}");

    // A body declared over the limit is refused at once, before any of it is read: the
    // client sends its head and one byte of a body it says is 999999999 bytes.
    for path in ["/v1/images/generations", "/v1/images/edits"] {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\n\
             Content-Length: 999999999\r\n\r\n{{",
            auth[0].1
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut raw = vec![0u8; 4096];
        let n = stream.read(&mut raw).expect("an answer before the body's timeout");
        let text = String::from_utf8_lossy(&raw[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "{path}: {text}");
        assert!(text.contains("request_too_large"), "{path}: {text}");
    }

    // Edits: 400 for no image, a file that is not a picture, a picture over --max-input-side
    // (refused from its header), a mask that is not a picture (one of another size is resized,
    // as diffusers' mask processor resizes it).
    let edit = |fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]| {
        let (content_type, body) = multipart(fields, files);
        server.request("POST", "/v1/images/edits", &[auth[0], ("Content-Type", &content_type)], &body)
    };
    let picture = png(64, 64, [40, 90, 160]);
    edit(&[("prompt", "x")], &[]).assert_error(400, "invalid_request_error", None);
    let e = edit(&[("prompt", "x")], &[("image", "a.txt", b"hello, not a picture")]).assert_error(
        400,
        "invalid_request_error",
        Some("invalid_image"),
    );
    assert_eq!(e["param"], "image");
    let e = edit(&[("prompt", "x")], &[("image", "wide.png", &png(300, 16, [0, 0, 0]))]).assert_error(
        400,
        "invalid_request_error",
        Some("image_too_large"),
    );
    assert!(e["message"].as_str().unwrap().contains("300x16"), "{e}");
    // Past the SDK's own limit (16384 a side) the header still gives this server's.
    let mut wide = Vec::new();
    image::GrayImage::new(20000, 1).write_to(&mut std::io::Cursor::new(&mut wide), image::ImageFormat::Png).unwrap();
    let e = edit(&[("prompt", "x")], &[("image", "wide.png", &wide)]).assert_error(
        400,
        "invalid_request_error",
        Some("image_too_large"),
    );
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("20000x1") && message.contains("at most 256 pixels"), "{e}");
    let e = edit(&[("prompt", "x")], &[("image", "a.png", &picture), ("mask", "m.png", b"not a mask")]).assert_error(
        400,
        "invalid_request_error",
        Some("invalid_image"),
    );
    assert_eq!(e["param"], "mask", "{e}");
    // The same edit is fine on the good model ...
    let fine = edit(&[("prompt", "x"), ("num_inference_steps", "2"), ("seed", "1")], &[("image", "a.png", &picture)]);
    assert_eq!(fine.status, 200, "{}", fine.text());
    // ... and a 500 on the model whose values leave float range.
    let e = edit(
        &[("prompt", "x"), ("model", "broken"), ("num_inference_steps", "2"), ("seed", "1")],
        &[("image", "a.png", &picture)],
    )
    .assert_error(500, "server_error", Some("inference_failed"));
    assert!(e["message"].as_str().unwrap().contains("non-finite"), "{e}");
    // The worker that failed keeps serving: it answers the next request (with the same error).
    let mut again = small.clone();
    again["model"] = json!("broken");
    server.post_json("/v1/images/generations", &again, &auth).assert_error(
        500,
        "server_error",
        Some("inference_failed"),
    );

    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    for line in [
        "zimage_errors_total{kind=\"unauthorized\"} 3",
        "zimage_errors_total{kind=\"too_large\"} 4",
        "zimage_errors_total{kind=\"inference\"} 2",
        "zimage_errors_total{kind=\"not_found\"} 3",
        "zimage_images_total{model=\"tiny-zimage\"} 2",
        "zimage_workers_alive{model=\"broken\"} 1",
        "zimage_requests_total{route=\"/v1/images/generations\",status=\"413\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("zimage_stage_seconds_count{model=\"tiny-zimage\",stage=\"denoise\"} 2"), "{metrics}");
    assert!(!metrics.contains("zimage_images_total{model=\"broken\"}"), "{metrics}");
}

/// A generation that takes far longer than the tests' --request-timeout 4 with the tiny package:
/// 1000 steps (the most a request may ask) at 512x512, about 14 s on two threads (14 ms a step;
/// the decode is 0.1 s). 200 steps were about 4 s once the VAE decode became fast: too close.
fn slow(seed: u64) -> Value {
    json!({"prompt": "a slow fox", "size": "512x512", "num_inference_steps": 1000, "seed": seed})
}

#[test]
fn full_queue_429_timeout_504_and_disconnect_cancels() {
    let server = Server::start(&["--model", &tiny(), "--max-queue", "1", "--request-timeout", "4"]);
    let addr = server.addr.clone();

    // Clients that disconnect cancel their generations, running or queued: the worker is free
    // long before the 200 steps would end, and does not start the queued one.
    let open = |seed: u64| {
        let mut stream = TcpStream::connect(&addr).unwrap();
        let body = slow(seed).to_string();
        write!(
            stream,
            "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        stream
    };
    let running = open(1);
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    let queued = open(11);
    server.wait_metric("zimage_queue_depth{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    let dropped = Instant::now();
    drop(queued);
    drop(running);
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 0.0, Duration::from_secs(3));
    server.wait_metric("zimage_queue_depth{model=\"tiny-zimage\"}", |v| v == 0.0, Duration::from_secs(3));
    let freed = dropped.elapsed();
    server.wait_metric("zimage_errors_total{kind=\"cancelled\"}", |v| v == 2.0, Duration::from_secs(3));
    assert!(freed < Duration::from_secs(3), "cancelling took {freed:?}");
    // Both left the queue; only the first ran.
    let left_queue = "zimage_stage_seconds_count{model=\"tiny-zimage\",stage=\"queue_wait\"}";
    server.wait_metric(left_queue, |v| v == 2.0, Duration::from_secs(3));
    assert_eq!(server.metric("zimage_stage_seconds_count{model=\"tiny-zimage\",stage=\"generation\"}"), 1.0);

    // One running, one queued (--max-queue 1), the third refused with Retry-After; the two
    // accepted ones run past --request-timeout 4 and are cancelled with 504.
    let first = {
        let addr = addr.clone();
        std::thread::spawn(move || send(&addr, "POST", "/v1/images/generations", &[], slow(2).to_string().as_bytes()))
    };
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    let second = {
        let addr = addr.clone();
        std::thread::spawn(move || send(&addr, "POST", "/v1/images/generations", &[], slow(3).to_string().as_bytes()))
    };
    server.wait_metric("zimage_queue_depth{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    let refused = server.generate(slow(4));
    refused.assert_error(429, "rate_limit_error", Some("queue_full"));
    let retry: u64 = refused.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 1, "{retry}");
    let first = first.join().unwrap();
    let error = first.assert_error(504, "server_error", Some("timeout"));
    assert!(error["message"].as_str().unwrap().contains("4 s"), "{error}");
    second.join().unwrap().assert_error(504, "server_error", Some("timeout"));
    // Both were cancelled, not left running.
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 0.0, Duration::from_secs(3));
    assert_eq!(server.metric("zimage_errors_total{kind=\"timeout\"}"), 2.0);
    assert_eq!(server.metric("zimage_errors_total{kind=\"queue_full\"}"), 1.0);
    let ok = server.generate(json!({"prompt": "after", "size": "64x64", "num_inference_steps": 2}));
    assert_eq!(ok.status, 200);
    assert_eq!(server.metric("zimage_workers_alive{model=\"tiny-zimage\"}"), 1.0);
}

#[test]
fn unavailable_while_loading_and_draining_then_exit_0() {
    let mut server = Server::spawn(&["--model", &tiny(), "--startup-delay-ms", "4000"]);
    // Loading: alive, not ready, the API answers 503.
    assert_eq!(server.get("/health").status, 200);
    server.get("/ready").assert_error(503, "server_error", Some("model_loading"));
    let loading = server.generate(json!({"prompt": "x", "size": "64x64"}));
    loading.assert_error(503, "server_error", Some("model_loading"));
    assert!(loading.header("retry-after").is_some());
    server.wait_ready();

    // SIGTERM while one generation runs: it completes; new work gets 503; then exit 0.
    let addr = server.addr.clone();
    let running = std::thread::spawn(move || {
        // About 3 s: the signal arrives while it runs.
        let body = json!({"prompt": "drain", "size": "512x512", "num_inference_steps": 30, "seed": 5});
        send(&addr, "POST", "/v1/images/generations", &[], body.to_string().as_bytes())
    });
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    server.signal("TERM");
    server.wait_metric("zimage_draining", |v| v == 1.0, Duration::from_secs(5));
    server.generate(json!({"prompt": "late", "size": "64x64"})).assert_error(
        503,
        "server_error",
        Some("shutting_down"),
    );
    server.get("/ready").assert_error(503, "server_error", Some("shutting_down"));
    let done = running.join().unwrap();
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(done.json()["seed"], 5);
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
}

/// A server of two models: "control", the package of ControlNet golden `entry` loaded with that
/// ControlNet, and the plain tiny package; `extra` flags added.
fn control_server(entry: &Value, extra: &[&str]) -> Server {
    let package = root().join(entry["package"].as_str().unwrap()).display().to_string();
    let controlnet = format!("control={}", entry["controlnet"].as_str().unwrap());
    let model = format!("control={package}");
    let mut args = vec!["--model", model.as_str(), "--model"];
    let tiny = tiny();
    args.extend([tiny.as_str(), "--controlnet", controlnet.as_str()]);
    args.extend(extra);
    Server::start(&args)
}

/// ControlNet on /v1/images/generations: a server started with `--controlnet` takes a base64
/// control map and scale and returns diffusers' golden image (tests/golden/controlnet, within
/// one level) with the ControlNet recorded in the PNG parameters; bad control input is a 400.
#[test]
fn generations_take_a_control_image_with_a_controlnet_loaded() {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let golden = root().join("tests/golden/controlnet");
    let cases: Value = serde_json::from_slice(&std::fs::read(golden.join("cases.json")).unwrap()).unwrap();
    let entry = &cases[0];
    let case = &entry["text_to_image"][0];
    let controlnet = entry["controlnet"].as_str().unwrap();
    let server = control_server(entry, &[]);
    let control_png = std::fs::read(golden.join(case["control_image_file"].as_str().unwrap())).unwrap();
    let body = json!({
        "model": "control",
        "prompt": case["prompt"],
        "seed": case["seed"],
        "num_inference_steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "size": format!("{}x{}", case["width"], case["height"]),
        "control_image": format!("data:image/png;base64,{}", b64(&control_png)),
        "control_scale": case["controlnet_conditioning_scale"],
    });
    let response = server.generate(body.clone());
    assert_eq!(response.status, 200, "{}", response.text());
    let png = base64::engine::general_purpose::STANDARD
        .decode(response.json()["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    let got = image::load_from_memory(&png).unwrap().to_rgb8();
    let expected = image::open(golden.join(case["image_files"][0].as_str().unwrap())).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), expected.dimensions());
    let worst = got.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "the server's ControlNet image differs from diffusers' by {worst} levels");
    let text = String::from_utf8_lossy(&png);
    assert!(text.contains(controlnet) && text.contains("control_scale"), "PNG parameters lack the ControlNet");

    // Bad control input: typed 400s naming the field.
    let mut bad = body.clone();
    bad["control_image"] = json!("not base64!");
    let e = server.generate(bad).assert_error(400, "invalid_request_error", Some("invalid_image"));
    assert_eq!(e["param"], "control_image");
    let mut bad = body.clone();
    bad["control_preprocess"] = json!("sobel");
    let e = server.generate(bad).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "control_preprocess");
    let mut bad = body.clone();
    bad.as_object_mut().unwrap().remove("control_image");
    let e = server.generate(bad).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "control_scale");
    // The other model was loaded without a ControlNet.
    let mut bad = body.clone();
    bad["model"] = json!("tiny-zimage");
    let e = server.generate(bad).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "control_image");
}

#[test]
fn controlnet_for_a_model_not_served_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_zimage-server"))
        .args(["--port", "0", "--model", &tiny(), "--controlnet", "other=union-v1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no model 'other' is served"));
}

/// A URL cache smaller than one request's most images (64) would drop a request's first URLs
/// before it is answered: a usage error at start.
#[test]
fn a_url_cache_below_one_requests_images_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_zimage-server"))
        .args(["--port", "0", "--model", &tiny(), "--url-cache", "2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--url-cache"), "{output:?}");
}

/// `--lora FILE[:SCALE]` merges the adapter into every served model's transformer, with a
/// ControlNet too: each model returns diffusers' golden image for its case (LoRA on the plain
/// package: tests/golden/tiny-zimage/lora.json; LoRA with the ControlNet:
/// tests/golden/controlnet, "lora" cases), and the PNG parameters record the LoRA.
#[test]
fn loras_given_at_start_apply_to_every_model_with_a_controlnet_too() {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let controlnet_golden = root().join("tests/golden/controlnet");
    let cases: Value = serde_json::from_slice(&std::fs::read(controlnet_golden.join("cases.json")).unwrap()).unwrap();
    let entry = &cases[0];
    let control_case = &entry["lora"][0];
    let lora = &control_case["loras"][0];
    let lora_file = controlnet_golden.join(lora["file"].as_str().unwrap()).display().to_string();
    let lora_golden = root().join("tests/golden/tiny-zimage");
    let plain: Value = serde_json::from_slice(&std::fs::read(lora_golden.join("lora.json")).unwrap()).unwrap();
    let plain_case = plain["cases"].as_array().unwrap().iter().find(|c| c["name"] == "peft_1.0").unwrap();
    assert_eq!(plain_case["loras"].as_array().unwrap().len(), 1);
    assert!(lora_file.ends_with(plain_case["loras"][0]["file"].as_str().unwrap()), "the same adapter");
    assert_eq!((lora["scale"].as_f64(), plain_case["loras"][0]["scale"].as_f64()), (Some(1.0), Some(1.0)));

    let server = control_server(entry, &["--lora", &lora_file]);
    let request = |model: &str, case: &Value| {
        json!({
            "model": model,
            "prompt": case["prompt"],
            "seed": case["seed"],
            "num_inference_steps": case["num_inference_steps"],
            "guidance_scale": case["guidance_scale"],
            "size": format!("{}x{}", case["width"], case["height"]),
        })
    };
    let check = |body: Value, expected: PathBuf| {
        let response = server.generate(body);
        assert_eq!(response.status, 200, "{}", response.text());
        let png = engine.decode(response.json()["data"][0]["b64_json"].as_str().unwrap()).unwrap();
        let got = image::load_from_memory(&png).unwrap().to_rgb8();
        let want = image::open(&expected).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), want.dimensions());
        let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "{}: {worst} levels from diffusers' image", expected.display());
        let text = String::from_utf8_lossy(&png).into_owned();
        assert!(text.contains("peft.safetensors"), "PNG parameters lack the LoRA");
    };
    let mut body = request("control", control_case);
    let control_png =
        std::fs::read(controlnet_golden.join(control_case["control_image_file"].as_str().unwrap())).unwrap();
    body["control_image"] = json!(format!("data:image/png;base64,{}", engine.encode(&control_png)));
    body["control_scale"] = control_case["controlnet_conditioning_scale"].clone();
    check(body, controlnet_golden.join(control_case["image_files"][0].as_str().unwrap()));
    check(request("tiny-zimage", plain_case), lora_golden.join(plain_case["image_files"][0].as_str().unwrap()));
}

/// Bad `--lora` values: a model that is not served and a bad scale are usage errors (2), an
/// adapter that does not fit the model fails the start with the LoRA exit code (10).
#[test]
fn bad_loras_at_start_are_usage_or_lora_errors() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zimage-server"))
            .args(["--port", "0", "--threads", "1", "--model", &tiny()])
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    };
    let output = run(&["--lora", "other=tests/golden/tiny-zimage/loras/peft.safetensors"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--lora other="), "{output:?}");
    let output = run(&["--lora", "tests/golden/tiny-zimage/loras/peft.safetensors:inf"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not finite"), "{output:?}");
    // tiny-zimage-alt's adapter: another width.
    let output = run(&["--lora", "tests/golden/tiny-zimage-alt/loras/peft.safetensors"]);
    assert_eq!(output.status.code(), Some(10), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("model 'tiny-zimage'"), "{output:?}");
    let output = run(&["--lora", "Cargo.toml"]);
    assert_eq!(output.status.code(), Some(10), "{output:?}");
}

/// ControlNet inpainting on /v1/images/edits: `image`, `mask` and `control_image` (a file part,
/// or base64 text as a client's extra field) give diffusers' ZImageControlNetInpaintPipeline
/// golden (within one level), recorded in the PNG parameters; without a mask, with a strength,
/// or on a model without a ControlNet it is a 400 naming the field.
#[test]
fn edits_take_a_control_image_for_controlnet_inpainting() {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let golden = root().join("tests/golden/controlnet");
    let cases: Value = serde_json::from_slice(&std::fs::read(golden.join("cases.json")).unwrap()).unwrap();
    let entry = cases.as_array().unwrap().iter().find(|e| !e["inpaint"].as_array().unwrap().is_empty()).unwrap();
    let case = &entry["inpaint"][0];
    let server = control_server(entry, &[]);
    let read = |key: &str| std::fs::read(golden.join(case[key].as_str().unwrap())).unwrap();
    let (init, mask, control) = (read("init_image_file"), read("mask_file"), read("control_image_file"));
    let text = |v: &Value| v.to_string().trim_matches('"').to_string();
    let fields: Vec<(&str, String)> = vec![
        ("model", "control".into()),
        ("prompt", case["prompt"].as_str().unwrap().to_string()),
        ("seed", text(&case["seed"])),
        ("num_inference_steps", text(&case["num_inference_steps"])),
        ("guidance_scale", text(&case["guidance_scale"])),
        ("control_scale", text(&case["controlnet_conditioning_scale"])),
    ];
    let edit = |extra: &[(&str, &str)], files: &[(&str, &str, &[u8])]| {
        let mut all: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        let (content_type, body) = multipart(&all, files);
        server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body)
    };
    let expected = image::open(golden.join(case["image_files"][0].as_str().unwrap())).unwrap().to_rgb8();
    let check = |response: Response| -> String {
        assert_eq!(response.status, 200, "{}", response.text());
        let png = engine.decode(response.json()["data"][0]["b64_json"].as_str().unwrap()).unwrap();
        let got = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), expected.dimensions());
        let worst = got.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "ControlNet inpainting differs from diffusers' by {worst} levels");
        String::from_utf8_lossy(&png).into_owned()
    };
    let files =
        [("image", "init.png", init.as_slice()), ("mask", "mask.png", &mask), ("control_image", "edges.png", &control)];
    let png_text = check(edit(&[], &files));
    for recorded in ["union-v2.1", "edges.png", "control_inpaint_image", "init.png", "mask.png", "control_scale"] {
        assert!(png_text.contains(recorded), "PNG parameters lack {recorded}");
    }
    assert!(!png_text.contains("strength"), "ControlNet inpainting has no strength");
    let base64_control = format!("data:image/png;base64,{}", engine.encode(&control));
    check(edit(&[("control_image", &base64_control)], &files[..2]));

    let e = edit(&[], &[files[0], files[2]]).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "mask");
    let e = edit(&[("strength", "0.6")], &files).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "strength");
    let e = edit(&[("control_image", &base64_control)], &files).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "control_image");
    let mut plain: Vec<(&str, &str)> = vec![("model", "tiny-zimage"), ("prompt", "x")];
    plain.push(("num_inference_steps", "1"));
    let (content_type, body) = multipart(&plain, &files);
    let e = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "control_image");
}

/// `--max-pixels` refuses a size before any work, an edit's size inferred from its picture too.
#[test]
fn sizes_over_max_pixels_are_refused_before_any_work() {
    // 128x128 at most.
    let server = Server::start(&["--model", &tiny(), "--max-pixels", "16384"]);
    let json_headers = [("Content-Type", "application/json")];
    let post = |body: &[u8]| server.request("POST", "/v1/images/generations", &json_headers, body);
    let edit = |content_type: &str, body: &[u8]| {
        server.request("POST", "/v1/images/edits", &[("Content-Type", content_type)], body)
    };

    // Over --max-pixels: a generation, and an edit without `size` whose picture is too large.
    let e = post(br#"{"prompt":"x","size":"256x256","num_inference_steps":1}"#).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "size", "{e}");
    assert!(e["message"].as_str().unwrap().contains("--max-pixels"), "{e}");
    let (content_type, body) =
        multipart(&[("prompt", "x"), ("num_inference_steps", "1")], &[("image", "big.png", &png(256, 256, [9, 9, 9]))]);
    let e = edit(&content_type, &body).assert_error(400, "invalid_request_error", None);
    // (named by the picture whose size it took, and saying so: the request gave no size)
    assert_eq!(e["param"], "image", "{e}");
    assert!(e["message"].as_str().unwrap().contains("256x256"), "{e}");
    assert!(e["message"].as_str().unwrap().contains("the output takes the image's"), "{e}");
    // At the limit is fine.
    let ok = post(br#"{"prompt":"x","size":"128x128","num_inference_steps":1}"#);
    assert_eq!(ok.status, 200, "{}", ok.text());

    // n images together: at most 4 x --max-pixels by default (--max-batch-pixels), naming n.
    let e = post(br#"{"prompt":"x","size":"128x128","n":5,"num_inference_steps":1}"#).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "n", "{e}");
    assert!(e["message"].as_str().unwrap().contains("--max-batch-pixels"), "{e}");
    let (content_type, body) = multipart(
        &[("prompt", "x"), ("num_inference_steps", "1"), ("n", "5")],
        &[("image", "a.png", &png(128, 128, [9, 9, 9]))],
    );
    let e = edit(&content_type, &body).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "n", "{e}");
    let ok = post(br#"{"prompt":"x","size":"128x128","n":4,"num_inference_steps":1}"#);
    assert_eq!(ok.json()["data"].as_array().unwrap().len(), 4, "{}", ok.text());
    drop(server);

    // --max-batch-pixels below --max-pixels is a usage error; above it, it is the limit.
    let output = Command::new(env!("CARGO_BIN_EXE_zimage-server"))
        .args(["--port", "0", "--model", &tiny(), "--max-pixels", "16384", "--max-batch-pixels", "100"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-batch-pixels"), "{output:?}");
    let server = Server::start(&["--model", &tiny(), "--max-pixels", "4096", "--max-batch-pixels", "8192"]);
    let e = server.generate(json!({"prompt": "x", "size": "64x64", "n": 3})).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "n", "{e}");
    let ok = server.generate(json!({"prompt": "x", "size": "64x64", "n": 2, "num_inference_steps": 1}));
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// Malformed JSON, path segments and multipart fields are 400s in OpenAI's shape, naming the
/// field where there is one.
#[test]
fn malformed_requests_are_refused_in_openai_shape() {
    let server = Server::start(&["--model", &tiny()]);
    let json_headers = [("Content-Type", "application/json")];
    let post = |body: &[u8]| server.request("POST", "/v1/images/generations", &json_headers, body);
    let edit = |content_type: &str, body: &[u8]| {
        server.request("POST", "/v1/images/edits", &[("Content-Type", content_type)], body)
    };

    // Trailing garbage after the object, a truncated body (no field to name).
    let e = post(br#"{"prompt":"x","size":"64x64"} trailing garbage"#).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], Value::Null, "{e}");
    let e = post(br#"{"prompt":"x","size":"#).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], Value::Null, "{e}");
    // An array is not a request (serde's derive would take it as the fields in order).
    for body in [&br#"[{"prompt":"x","size":"64x64"}]"#[..], br#" ["x", 1]"#] {
        let e = post(body).assert_error(400, "invalid_request_error", None);
        assert_eq!(e["param"], Value::Null, "{e}");
        assert!(e["message"].as_str().unwrap().contains("JSON object"), "{e}");
    }

    // Path segments that are not UTF-8.
    let e = server.get("/v1/images/files/%ff").assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "name", "{e}");
    let e = server.get("/v1/models/%ff").assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "id", "{e}");

    // Multipart: a field sent twice, a prompt that is not UTF-8.
    let picture = png(64, 64, [40, 90, 160]);
    let (content_type, body) = multipart(&[("prompt", "a"), ("prompt", "b")], &[("image", "a.png", &picture)]);
    let e = edit(&content_type, &body).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "prompt", "{e}");
    let (content_type, body) = multipart(&[("prompt", "PROMPT")], &[("image", "a.png", &picture)]);
    let at = body.windows(6).position(|w| w == b"PROMPT").unwrap();
    let body = [&body[..at], b"caf\xe9", &body[at + 6..]].concat();
    let e = edit(&content_type, &body).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "prompt", "{e}");
}

/// Edits of picture files as a user has them (sides not multiples of 16, no `size`; a mask of
/// another size) give diffusers' images for the same files (tests/golden/tiny-zimage/unsized.json:
/// the picture floored to 16 and resized, the mask resized to it), within one level.
#[test]
fn edits_of_pictures_of_any_size_match_diffusers() {
    use base64::Engine;
    let golden = root().join("tests/golden/tiny-zimage");
    let cases: Value = serde_json::from_slice(&std::fs::read(golden.join("unsized.json")).unwrap()).unwrap();
    let server = Server::start(&["--model", &tiny()]);
    for c in cases.as_array().unwrap() {
        // Strings as they are (to_string would escape their quotes), numbers as JSON writes them.
        let text = |key: &str| c[key].as_str().map_or_else(|| c[key].to_string(), str::to_string);
        let fields = [
            ("prompt", text("prompt")),
            ("seed", text("seed")),
            ("num_inference_steps", text("num_inference_steps")),
            ("strength", text("strength")),
        ];
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let read = |key: &str| std::fs::read(golden.join(c[key].as_str().unwrap())).unwrap();
        let (picture, mask) = (read("init_image_file"), c.get("mask_file").map(|_| read("mask_file")));
        let mut files: Vec<(&str, &str, &[u8])> = vec![("image", "init.png", &picture)];
        if let Some(mask) = &mask {
            files.push(("mask", "mask.png", mask));
        }
        let (content_type, body) = multipart(&fields, &files);
        let response = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body);
        assert_eq!(response.status, 200, "{}", response.text());
        let b64 = response.json()["data"][0]["b64_json"].as_str().unwrap().to_string();
        let got =
            image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap().to_rgb8();
        let want = image::open(golden.join(c["image_files"][0].as_str().unwrap())).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), want.dimensions(), "{}", c["name"]);
        let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "{}: {worst} levels from diffusers'", c["name"]);
    }
}

/// Posts golden edit case `c` (tests/golden/tiny-zimage-omni) to `server`'s /v1/images/edits
/// and checks the image within one level of diffusers'; returns the PNG.
fn golden_edit(server: &Server, golden: &std::path::Path, c: &Value) -> Vec<u8> {
    use base64::Engine;
    // Strings as they are (to_string would escape their quotes), numbers as JSON writes them.
    let text = |key: &str| c[key].as_str().map_or_else(|| c[key].to_string(), str::to_string);
    let mut fields = vec![
        ("prompt", text("prompt")),
        ("seed", text("seed")),
        ("num_inference_steps", text("num_inference_steps")),
        ("guidance_scale", text("guidance_scale")),
        ("cfg_normalization", text("cfg_normalization")),
        ("cfg_truncation", text("cfg_truncation")),
    ];
    if c["negative_prompt"].is_string() {
        fields.push(("negative_prompt", text("negative_prompt")));
    }
    if c["width"].is_u64() {
        fields.push(("size", format!("{}x{}", c["width"], c["height"])));
    }
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let pictures: Vec<Vec<u8>> = c["image_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| std::fs::read(golden.join(f.as_str().unwrap())).unwrap())
        .collect();
    let files: Vec<(&str, &str, &[u8])> = pictures.iter().map(|p| ("image[]", "ref.png", p.as_slice())).collect();
    let (content_type, body) = multipart(&fields, &files);
    let response = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body);
    assert_eq!(response.status, 200, "{}: {}", c["name"], response.text());
    let b64 = response.json()["data"][0]["b64_json"].as_str().unwrap().to_string();
    let png = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let got = image::load_from_memory(&png).unwrap().to_rgb8();
    let want = image::open(golden.join(c["output_files"][0].as_str().unwrap())).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions(), "{}", c["name"]);
    let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "{}: {worst} levels from diffusers'", c["name"]);
    png
}

/// A server started with `--lora` edits with the adapter merged: diffusers' edit with the LoRA
/// loaded (the Omni goldens' `lora` section) within one level, the PNG recording it.
#[test]
fn edits_apply_the_servers_loras() {
    let golden = root().join("tests/golden/tiny-zimage-omni");
    let cases: Value = serde_json::from_slice(&std::fs::read(golden.join("cases.json")).unwrap()).unwrap();
    let c = &cases["lora"][0];
    assert_eq!(c["name"], "lora_peft");
    let lora = golden.join(c["loras"][0]["file"].as_str().unwrap());
    let lora = format!("{}:{}", lora.display(), c["loras"][0]["scale"]);
    let omni = root().join("models/tiny-zimage-omni").to_string_lossy().into_owned();
    let server = Server::start(&["--model", &omni, "--lora", &lora]);
    let png = golden_edit(&server, &golden, c);
    let text = String::from_utf8_lossy(&png);
    assert!(text.contains("loras") && text.contains("peft.safetensors"), "the PNG records the LoRA");
}

/// `/v1/images/edits` on an editing (Omni) package edits by instruction: the uploaded pictures
/// (`image[]`, in order) are the references, and the images are diffusers'
/// `ZImageOmniPipeline` goldens (tests/golden/tiny-zimage-omni) within one level: one
/// reference, two with guidance and a negative prompt, an empty instruction, an explicit
/// size. A mask or a strength is refused naming the field, and so are more references than
/// the model takes; a second picture on a plain package is refused too.
#[test]
fn edits_on_an_editing_package_follow_the_instruction() {
    let golden = root().join("tests/golden/tiny-zimage-omni");
    let cases: Value = serde_json::from_slice(&std::fs::read(golden.join("cases.json")).unwrap()).unwrap();
    let omni = root().join("models/tiny-zimage-omni").to_string_lossy().into_owned();
    let server = Server::start(&["--model", &omni, "--model", &tiny()]);
    let edit = |fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]| {
        let (content_type, body) = multipart(fields, files);
        server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body)
    };
    let mut checked = 0;
    for c in cases["edit"].as_array().unwrap() {
        if c["num_inference_steps"].as_u64().unwrap() > 10 || c["num_images_per_prompt"].as_u64() > Some(1) {
            continue; // the 50-step defaults case and the batch: the SDK's edit tests run them
        }
        if c["image_files"].as_array().unwrap().is_empty() {
            // OpenAI's edits take at least one picture (ZImageOmniPipeline's text-to-image is
            // the SDK's, the CLI's and the C ABI's edit without references).
            let e = edit(&[("prompt", c["prompt"].as_str().unwrap())], &[]).assert_error(
                400,
                "invalid_request_error",
                None,
            );
            assert_eq!(e["param"], "image", "{e}");
            continue;
        }
        let png = golden_edit(&server, &golden, c);
        let text = String::from_utf8_lossy(&png);
        assert!(
            text.contains("reference_images") && text.contains("ref.png"),
            "{}: the PNG names its references",
            c["name"]
        );
        checked += 1;
    }
    assert_eq!(checked, 4);

    let picture = std::fs::read(golden.join("inputs/ref_96x64.png")).unwrap();
    let one = [("image", "ref.png", picture.as_slice())];
    let e = edit(&[("prompt", "x"), ("strength", "0.5")], &one).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "strength", "{e}");
    let with_mask = [one[0], ("mask", "m.png", picture.as_slice())];
    let e = edit(&[("prompt", "x")], &with_mask).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "mask", "{e}");
    let with_control = [one[0], ("control_image", "c.png", picture.as_slice())];
    let e = edit(&[("prompt", "x")], &with_control).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "control_image", "{e}");
    let many: Vec<(&str, &str, &[u8])> = (0..9).map(|_| one[0]).collect(); // the tiny package takes 8
    let e = edit(&[("prompt", "x")], &many).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "image", "{e}");
    // An instruction, or a negative prompt under guidance, past the caption positions
    // (tokenized before queueing): named.
    let words = "word ".repeat(1100);
    let long = [("prompt", words.as_str()), ("max_sequence_length", "4096")];
    let e = edit(&long, &one).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "prompt", "{e}");
    let negative = [
        ("prompt", "x"),
        ("negative_prompt", words.as_str()),
        ("guidance_scale", "2"),
        ("max_sequence_length", "4096"),
    ];
    let e = edit(&negative, &one).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "negative_prompt", "{e}");
    assert!(e["message"].as_str().unwrap().contains("the negative prompt and its 1 reference(s)"), "{e}");
    // Without size, the output is the last reference as the model prepares it: 1600x1200 is
    // scaled to about 1 MP (1182x886, the package's max_area) and cropped to 1168x880, within
    // --max-pixels 1048576 and reported as such (the picture's own size would be refused).
    use base64::Engine;
    let large = image::RgbImage::from_fn(1600, 1200, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 90]));
    let mut large_png = Vec::new();
    large.write_to(&mut std::io::Cursor::new(&mut large_png), image::ImageFormat::Png).unwrap();
    let small_server = Server::start(&["--model", &omni, "--max-pixels", "1048576"]);
    let (content_type, body) =
        multipart(&[("prompt", "x"), ("num_inference_steps", "1")], &[("image", "large.png", large_png.as_slice())]);
    let response = small_server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body);
    assert_eq!(response.status, 200, "{}", response.text());
    let json = response.json();
    assert_eq!(json["size"], "1168x880", "{json}");
    let b64 = json["data"][0]["b64_json"].as_str().unwrap();
    let got = image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap();
    assert_eq!((got.width(), got.height()), (1168, 880));
    let e = edit(&[("prompt", "x"), ("model", "tiny-zimage")], &[one[0], one[0]]).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "image", "{e}");
}

/// `picture` as a PNG, with an `eXIf` chunk holding `orientation` (1-8) when given.
fn png_with_orientation(picture: &image::DynamicImage, orientation: Option<u16>) -> Vec<u8> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut bytes);
    if let Some(orientation) = orientation {
        // A big-endian TIFF header, then one IFD entry: Orientation (0x0112), SHORT, one value.
        let mut exif = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        exif.extend_from_slice(&orientation.to_be_bytes());
        exif.extend_from_slice(&[0; 6]);
        encoder.set_exif_metadata(exif).unwrap();
    }
    encoder.write_image(picture.as_bytes(), picture.width(), picture.height(), picture.color().into()).unwrap();
    bytes
}

/// An edit's picture and mask are turned upright by their EXIF orientation (as diffusers'
/// `load_image` turns them): a 64x32 phone picture stored with each orientation gives the
/// image of the same picture stored upright (a quarter turn makes it 32x64), alone, under an
/// OpenAI mask (transparency) and under an opaque one, all three stored with the orientation.
#[test]
fn edits_turn_pictures_upright_by_their_exif_orientation() {
    use base64::Engine;
    let server = Server::start(&["--model", &tiny()]);
    let edit = |files: &[(&str, &str, &[u8])]| {
        let (content_type, body) = multipart(&[("prompt", "x"), ("num_inference_steps", "1"), ("seed", "3")], files);
        let response = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body);
        assert_eq!(response.status, 200, "{}", response.text());
        let b64 = response.json()["data"][0]["b64_json"].as_str().unwrap().to_string();
        let png = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        image::load_from_memory(&png).unwrap().to_rgb8()
    };
    // No symmetry: a gradient picture, masks covering the top-left quarter.
    let picture = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 32, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 8) as u8, ((x + 2 * y) * 2) as u8])
    }));
    let openai_mask = image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(64, 32, |x, y| {
        image::Rgba([10, 10, 10, if x < 32 && y < 16 { 0 } else { 255 }])
    }));
    let opaque_mask = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(64, 32, |x, y| {
        image::Luma([if x < 32 && y < 16 { 255 } else { 0 }])
    }));
    for orientation in [6, 8, 5, 7, 3, 2] {
        let stored = |p: &image::DynamicImage| png_with_orientation(p, Some(orientation));
        let upright = |p: &image::DynamicImage| {
            let mut p = p.clone();
            p.apply_orientation(image::metadata::Orientation::from_exif(orientation as u8).unwrap());
            png_with_orientation(&p, None)
        };
        let want_size = if orientation >= 5 { (32, 64) } else { (64, 32) };
        let got = edit(&[("image", "a.png", &stored(&picture))]);
        assert_eq!(got.dimensions(), want_size, "orientation {orientation}");
        assert_eq!(got, edit(&[("image", "a.png", &upright(&picture))]), "orientation {orientation}");
        for mask in [&openai_mask, &opaque_mask] {
            let got = edit(&[("image", "a.png", &stored(&picture)), ("mask", "m.png", &stored(mask))]);
            let want = edit(&[("image", "a.png", &upright(&picture)), ("mask", "m.png", &upright(mask))]);
            assert_eq!(got, want, "orientation {orientation}, mask {:?}", mask.color());
        }
    }
}

/// The model's own size limit (8192 pixels a side for the tiny package) is checked before the
/// uploaded picture is resized to the requested size (a 64x64 picture was resized to
/// 16384x16384, ~1 GB, before the 400); the default --max-pixels allows this many pixels.
#[test]
fn the_models_size_limit_is_checked_before_resizing() {
    let server = Server::start(&["--model", &tiny()]);
    let e = server.post_json("/v1/images/generations", &json!({"prompt": "x", "size": "16384x128"}), &[]).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "size", "{e}");
    assert!(e["message"].as_str().unwrap().contains("limit"), "{e}");
    let (content_type, body) =
        multipart(&[("prompt", "x"), ("size", "16384x128")], &[("image", "a.png", &png(64, 64, [1, 2, 3]))]);
    let started = Instant::now();
    let e = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body).assert_error(
        400,
        "invalid_request_error",
        None,
    );
    assert_eq!(e["param"], "size", "{e}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

/// A client that stalls in its headers or its body is disconnected after --header-timeout.
#[test]
fn stalled_connections_are_closed() {
    let server = Server::start(&["--model", &tiny(), "--header-timeout", "2"]);
    // Reads until the server closes the connection; returns what it sent and when it closed.
    let stall = |sent: &[u8]| {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        stream.write_all(sent).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("the server closes the connection");
        (raw, started.elapsed())
    };
    let (raw, took) = stall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Ty");
    assert!(took < Duration::from_secs(8), "closed after {took:?}");
    assert!(raw.is_empty() || raw.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&raw));
    let head = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    let (raw, took) = stall(format!("{head}Content-Length: 100\r\n\r\n{{").as_bytes());
    assert!(took < Duration::from_secs(8), "closed after {took:?}");
    parse_response(&raw).assert_error(400, "invalid_request_error", None);
    // The server still serves.
    assert_eq!(server.get("/health").status, 200);
}

/// A client that trickles its body (a byte a second: never stalled for --header-timeout) gets a
/// 400 and is disconnected at --body-timeout; connections past --max-connections are closed at
/// once, and one is served again when another closes; SIGTERM does not wait for a trickling
/// client past the drain timeout.
#[test]
fn trickling_bodies_and_connection_floods_are_bounded() {
    let server = Server::start(&[
        "--model",
        &tiny(),
        "--header-timeout",
        "30",
        "--body-timeout",
        "3",
        "--max-connections",
        "3",
        "--drain-timeout",
        "2",
    ]);
    let trickle = |seconds: u64| {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        let head = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
        stream.write_all(format!("{head}Content-Length: 100\r\n\r\n{{").as_bytes()).unwrap();
        let started = Instant::now();
        stream.set_read_timeout(Some(Duration::from_millis(900))).unwrap();
        let mut raw = Vec::new();
        while started.elapsed() < Duration::from_secs(seconds) {
            if stream.write_all(b" ").is_err() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                Err(_) => {} // nothing yet
            }
        }
        (raw, started.elapsed())
    };
    let (raw, took) = trickle(20);
    assert!(took < Duration::from_secs(10), "still open after {took:?}");
    parse_response(&raw).assert_error(400, "invalid_request_error", None);

    // Three idle connections take every place: a fourth is closed at once.
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&server.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(&server.addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut raw = Vec::new();
    let _ = extra.read_to_end(&mut raw);
    assert!(raw.is_empty(), "served past --max-connections: {:?}", String::from_utf8_lossy(&raw));
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.get("/health").status, 200);

    drop(server);

    // SIGTERM with a client trickling a body (within --body-timeout): the process ends within
    // the drain timeouts, not when the client stops.
    let mut server =
        Server::start(&["--model", &tiny(), "--header-timeout", "30", "--body-timeout", "100", "--drain-timeout", "2"]);
    let addr = server.addr.clone();
    let trickler = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(&addr).unwrap();
        let head = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
        let _ = stream.write_all(format!("{head}Content-Length: 100000\r\n\r\n{{").as_bytes());
        for _ in 0..100 {
            if stream.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0), "the process waited for the trickling client");
    trickler.join().unwrap();
}

/// A client that stops reading its response is disconnected after --write-timeout: the server
/// does not hold the response (here about 10 MB of images) for it. It gets what the buffers
/// held, not the whole body; a client that reads gets everything.
#[test]
fn clients_that_stop_reading_are_disconnected() {
    let server = Server::start(&["--model", &tiny(), "--write-timeout", "2"]);
    let body = json!({"prompt": "x", "size": "1024x1024", "n": 4, "num_inference_steps": 1, "output_format": "png"});
    let started = Instant::now();
    let full = server.generate(body.clone());
    let generation = started.elapsed();
    assert_eq!(full.status, 200, "{}", full.text());
    let full_length = full.body.len();
    assert!(full_length > 8 << 20, "{full_length} bytes: too small to fill the buffers");

    // A receive buffer of a few kilobytes, set before connecting, and no reading.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let mut stream: TcpStream = socket.into();
    let text = body.to_string();
    write!(
        stream,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .unwrap();
    // The generation takes about as long as the first one; then the write blocks.
    std::thread::sleep(generation + Duration::from_secs(6));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let result = stream.read_to_end(&mut raw);
    assert!(started.elapsed() < Duration::from_secs(15), "the connection stayed open: {result:?}, {} bytes", raw.len());
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&raw[..raw.len().min(200)]));
    assert!(raw.len() < full_length / 2, "received {} of {full_length} bytes", raw.len());
    assert_eq!(server.get("/health").status, 200);
}

/// `partial_images` with `stream`: the previews arrive between the steps, one event per image at
/// each preview step (8 steps, 2 previews: after steps 3 and 6), before the completed images;
/// each is a picture of the request's size that is not yet the final image. Without `stream`
/// the answer is the usual JSON with the same images; more than OpenAI's 3 is a 400.
#[test]
fn streams_send_the_partial_images_between_the_steps() {
    let server = Server::start(&["--model", &tiny()]);
    let mut body = json!({
        "prompt": "a fox in the snow", "size": "64x48", "n": 2, "num_inference_steps": 8, "seed": 21,
        "stream": true, "partial_images": 2,
    });
    let response = server.generate(body.clone());
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let streamed = events(&response.body);
    let order: Vec<String> = streamed
        .iter()
        .map(|(name, data)| {
            assert_eq!(&data["type"], name, "{data}");
            match name.as_str() {
                "image_generation.progress" => format!("step {}", data["step"]),
                "image_generation.partial_image" => {
                    format!("partial {} of image {}", data["partial_image_index"], data["index"])
                }
                "image_generation.completed" => format!("image {}", data["index"]),
                other => panic!("unexpected event {other}: {data}"),
            }
        })
        .collect();
    let expected = [
        "step 1",
        "step 2",
        "step 3",
        "partial 0 of image 0",
        "partial 0 of image 1",
        "step 4",
        "step 5",
        "step 6",
        "partial 1 of image 0",
        "partial 1 of image 1",
        "step 7",
        "step 8",
        "image 0",
        "image 1",
    ];
    assert_eq!(order, expected);
    let finals: Vec<image::RgbImage> = streamed[12..].iter().map(|(_, data)| picture(data)).collect();
    let mut previews = Vec::new();
    for (_, data) in streamed.iter().filter(|(name, _)| name == "image_generation.partial_image") {
        let fields = [&data["size"], &data["quality"], &data["background"], &data["output_format"]];
        assert_eq!(fields, [&json!("64x48"), &json!("medium"), &json!("opaque"), &json!("png")], "{data}");
        assert!(data["created_at"].as_u64().unwrap() > 1_600_000_000, "{data}");
        let preview = picture(data);
        assert_eq!(preview.dimensions(), (64, 48));
        let index = data["index"].as_u64().unwrap() as usize;
        let differing = preview.as_raw().iter().zip(finals[index].as_raw()).filter(|(a, b)| a != b).count();
        assert!(differing > 100, "preview {data:?} of image {index} is the final image ({differing} values differ)");
        previews.push(preview);
    }
    assert_ne!(previews[0], previews[2], "the second preview of image 0 is a later estimate");

    // Without stream: no previews, the usual answer, the same images.
    body["stream"] = json!(false);
    let plain = server.generate(body.clone());
    assert_eq!(plain.header("content-type"), Some("application/json"), "{}", plain.text());
    let data = plain.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.iter().map(picture).collect::<Vec<_>>(), finals);

    // OpenAI's limit is 3.
    body["stream"] = json!(true);
    body["partial_images"] = json!(4);
    let e = server.generate(body).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "partial_images", "{e}");

    // Edits send image_edit.partial_image: strength 0.5 of 4 steps runs 2; one preview, after
    // the first.
    let (content_type, body) = multipart(
        &[
            ("prompt", "x"),
            ("num_inference_steps", "4"),
            ("strength", "0.5"),
            ("seed", "2"),
            ("stream", "true"),
            ("partial_images", "1"),
        ],
        &[("image", "a.png", &png(32, 32, [50, 60, 70]))],
    );
    let response = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body);
    assert_eq!(response.status, 200, "{}", response.text());
    let streamed = events(&response.body);
    let names: Vec<&str> = streamed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["image_edit.progress", "image_edit.partial_image", "image_edit.progress", "image_edit.completed"]
    );
    assert_eq!(streamed[1].1["partial_image_index"], 0);
    assert_eq!(picture(&streamed[1].1).dimensions(), (32, 32));
}

/// Requests the SDK would refuse only in the worker (when it reads the text), or whose field it
/// does not name, are 400s naming the field before anything is queued: with `stream` too,
/// which would otherwise answer 200 and then an error event.
#[test]
fn requests_the_worker_would_refuse_are_400s_before_queueing() {
    let server = Server::start(&["--model", &tiny()]);
    let long = "x".repeat((1 << 20) + 1);
    for (body, param) in [
        (json!({"prompt": "x", "max_sequence_length": 0}), "max_sequence_length"),
        (json!({"prompt": long}), "prompt"),
        (json!({"prompt": "x", "negative_prompt": long}), "negative_prompt"),
        (json!({"prompt": "x", "guidance_scale": 1e39}), "guidance_scale"),
        (json!({"prompt": "x", "cfg_normalization": -1.0}), "cfg_normalization"),
        (json!({"prompt": "x", "cfg_truncation": -0.5}), "cfg_truncation"),
    ] {
        let mut body = body;
        body["size"] = json!("64x64");
        body["stream"] = json!(true);
        let e = server.generate(body).assert_error(400, "invalid_request_error", None);
        assert_eq!(e["param"], param, "{e}");
    }
    // Captions past the transformer's 992 caption positions (tokenized before queueing), the
    // negative prompt's under guidance, each named.
    let words = "word ".repeat(2000);
    for (body, param) in [
        (json!({"prompt": words, "max_sequence_length": 5000}), "prompt"),
        (
            json!({"prompt": "x", "negative_prompt": words, "guidance_scale": 2.0, "max_sequence_length": 5000}),
            "negative_prompt",
        ),
        (
            json!({"prompt": words, "negative_prompt": words, "guidance_scale": 2.0, "max_sequence_length": 5000}),
            "prompt",
        ),
    ] {
        let mut body = body;
        body["size"] = json!("64x64");
        body["stream"] = json!(true);
        let e = server.generate(body).assert_error(400, "invalid_request_error", None);
        assert_eq!(e["param"], param, "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(&format!("the {} has 2009 tokens", param.replace('_', " "))), "{e}");
        assert!(message.contains("this model takes at most 992"), "{e}");
    }
    // An edit's strength that leaves no step to run.
    let (content_type, body) = multipart(
        &[("prompt", "x"), ("strength", "0"), ("num_inference_steps", "1"), ("stream", "true")],
        &[("image", "a.png", &png(64, 64, [1, 2, 3]))],
    );
    let response = server.request("POST", "/v1/images/edits", &[("Content-Type", &content_type)], &body);
    let e = response.assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "strength", "{e}");
    assert_eq!(server.metric("zimage_stage_seconds_count{model=\"tiny-zimage\",stage=\"queue_wait\"}"), 0.0);
}

/// `enhance_prompt`: the model's enhancer rewrites the prompt (`revised_prompt`); a prompt that
/// fills the enhancer's context (`--enhance-max-context-tokens`) is a 400 naming `prompt` before
/// queueing, streamed or not, while the same prompt without `enhance_prompt` is generated.
#[test]
fn enhanced_prompts_are_revised_and_checked_before_queueing() {
    let server = Server::start(&["--model", "models/tiny-zimage-enhanced", "--enhance-max-new-tokens", "6"]);
    let body = json!({"prompt": "a red fox", "size": "64x64", "num_inference_steps": 1, "enhance_prompt": true});
    let ok = server.generate(body.clone());
    assert_eq!(ok.status, 200, "{}", ok.text());
    let revised = ok.json()["data"][0]["revised_prompt"].as_str().unwrap().to_string();
    assert!(!revised.is_empty() && revised != "a red fox", "{revised:?}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = events(&server.generate(streamed).body);
    let (name, completed) = events.last().unwrap();
    assert_eq!(name, "image_generation.completed");
    assert_eq!(completed["revised_prompt"], revised.as_str());
    drop(server);

    let server = Server::start(&["--model", "models/tiny-zimage-enhanced", "--enhance-max-context-tokens", "40"]);
    let long = json!({"prompt": "a red fox in the snow ".repeat(20), "size": "64x64", "num_inference_steps": 1});
    for stream in [false, true] {
        let mut body = long.clone();
        body["enhance_prompt"] = json!(true);
        body["stream"] = json!(stream);
        let e = server.generate(body).assert_error(400, "invalid_request_error", None);
        assert_eq!(e["param"], "prompt", "{e}");
        assert!(e["message"].as_str().unwrap().contains("context holds 40"), "{e}");
    }
    assert_eq!(server.metric("zimage_stage_seconds_count{model=\"tiny-zimage-enhanced\",stage=\"queue_wait\"}"), 0.0);
    assert_eq!(server.generate(long).status, 200);
    // The negative prompt is encoded as given: checked too, before queueing, naming it.
    let negative = json!({"prompt": "a fox", "negative_prompt": "word ".repeat(2000), "guidance_scale": 2.0,
        "max_sequence_length": 5000, "enhance_prompt": true, "stream": true, "size": "64x64", "num_inference_steps": 1});
    let e = server.generate(negative).assert_error(400, "invalid_request_error", None);
    assert_eq!(e["param"], "negative_prompt", "{e}");
    let e = Command::new(env!("CARGO_BIN_EXE_zimage-server"))
        .args(["--model", "models/tiny-zimage-enhanced", "--enhance-max-context-tokens", "0"])
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("max_context_tokens must be 1.."), "{e:?}");
}

/// Pictures are decoded for at most --workers + --max-queue requests at once: past that an
/// upload is refused at once (429) instead of decoded, however small its file (a PNG of a few
/// kilobytes can declare 4096x4096 16-bit pixels). Requests without pictures take no slot.
#[test]
fn uploads_past_the_decoding_slots_are_refused_at_once() {
    // Two slots (one worker, a queue of one), each held 2 s after its decoding (a testing flag).
    let server = Server::start(&["--model", &tiny(), "--max-queue", "1", "--decode-delay-ms", "2000"]);
    let (content_type, body) = multipart(
        &[("prompt", "x"), ("num_inference_steps", "1"), ("seed", "1")],
        &[("image", "a.png", &png(64, 64, [1, 2, 3]))],
    );
    let headers = [("Content-Type", content_type.as_str())];
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let (addr, headers, body) = (server.addr.clone(), content_type.clone(), body.clone());
            std::thread::spawn(move || send(&addr, "POST", "/v1/images/edits", &[("Content-Type", &headers)], &body))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    let refused = server.request("POST", "/v1/images/edits", &headers, &body);
    let e = refused.assert_error(429, "rate_limit_error", Some("queue_full"));
    assert!(e["message"].as_str().unwrap().contains("decoding"), "{e}");
    assert!(refused.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let text = server.generate(json!({"prompt": "x", "size": "64x64", "num_inference_steps": 1}));
    assert_eq!(text.status, 200, "{}", text.text());
    for holder in holders {
        let done = holder.join().unwrap();
        assert_eq!(done.status, 200, "{}", done.text());
    }
    // The slots are free again.
    let again = server.request("POST", "/v1/images/edits", &headers, &body);
    assert_eq!(again.status, 200, "{}", again.text());
}

/// Past --drain-timeout the generations left are cancelled, and their clients, still
/// connected, hear that the server is shutting down (503), streamed or not; then exit 0.
#[test]
fn clients_left_at_the_drain_timeout_get_503() {
    let mut server = Server::start(&["--model", &tiny(), "--drain-timeout", "1"]);
    let spawn = |body: Value| {
        let addr = server.addr.clone();
        std::thread::spawn(move || send(&addr, "POST", "/v1/images/generations", &[], body.to_string().as_bytes()))
    };
    let running = spawn(slow(1));
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    let queued = spawn(slow(2));
    let mut streamed = slow(3);
    streamed["stream"] = json!(true);
    let streamed = spawn(streamed);
    server.wait_metric("zimage_queue_depth{model=\"tiny-zimage\"}", |v| v == 2.0, Duration::from_secs(30));
    let signalled = Instant::now();
    server.signal("TERM");
    for response in [running, queued] {
        response.join().unwrap().assert_error(503, "server_error", Some("shutting_down"));
    }
    let streamed = streamed.join().unwrap();
    assert_eq!(streamed.status, 200);
    let (name, data) = events(&streamed.body).pop().unwrap();
    assert_eq!(
        (name.as_str(), &data["type"], &data["error"]["code"]),
        ("error", &json!("error"), &json!("shutting_down"))
    );
    assert!(signalled.elapsed() < Duration::from_secs(8), "{:?}", signalled.elapsed());
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
}

/// A queued job whose client went away does not keep its place: a full queue takes the next
/// request in its stead (it was refused with 429 until a worker reached the dead job), and
/// refuses the one after, whose place is held by a client that waits.
#[test]
fn clients_that_leave_the_queue_free_their_places() {
    let server = Server::start(&["--model", &tiny(), "--max-queue", "1"]);
    let running = open_request(&server.addr, &slow(1));
    server.wait_metric("zimage_in_flight{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    let left = open_request(&server.addr, &slow(2));
    server.wait_metric("zimage_queue_depth{model=\"tiny-zimage\"}", |v| v == 1.0, Duration::from_secs(30));
    drop(left);
    server.wait_metric("zimage_errors_total{kind=\"cancelled\"}", |v| v == 1.0, Duration::from_secs(5));
    // Still in the queue, cancelled.
    assert_eq!(server.metric("zimage_queue_depth{model=\"tiny-zimage\"}"), 1.0);
    let next = {
        let addr = server.addr.clone();
        let body = json!({"prompt": "next", "size": "64x64", "num_inference_steps": 2, "seed": 4});
        std::thread::spawn(move || send(&addr, "POST", "/v1/images/generations", &[], body.to_string().as_bytes()))
    };
    // The dead job left the queue (its wait is recorded, as the running one's was) as the next
    // one took its place.
    let left_queue = "zimage_stage_seconds_count{model=\"tiny-zimage\",stage=\"queue_wait\"}";
    server.wait_metric(left_queue, |v| v == 2.0, Duration::from_secs(5));
    server.generate(json!({"prompt": "x", "size": "64x64"})).assert_error(429, "rate_limit_error", Some("queue_full"));
    drop(running);
    let next = next.join().unwrap();
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.json()["seed"], 4);
    assert_eq!(server.metric("zimage_errors_total{kind=\"queue_full\"}"), 1.0);
}
