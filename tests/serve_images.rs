//! `POST /v1/images/generations` of `ferry serve` on the tiny Z-Image pipeline
//! (tests/fixtures/z-image), on the CPU: each answer's PNG is byte for byte the file
//! `ferry image` writes for the same prompt, seed, size, steps and guidance; bad requests get
//! OpenAI's error object naming the field; a second image request waits its turn, a third
//! finds the queue full (429); text keeps being served while an image generates; and a
//! server of one kind of model says so at the other kind's endpoints.

mod common;

use std::process::Command;

use common::fixture;
use common::server::{http, Server};
use serde_json::{json, Value};

/// A server of the tiny llama (unless `text` is false) and the tiny Z-Image, on the CPU.
fn start(text: bool, extra: &[&str]) -> Server {
    let (llama, z_image) = (fixture("llama"), fixture("z-image"));
    let mut args = vec![
        "--image-model",
        z_image.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    if text {
        args.extend(["--model", llama.to_str().unwrap()]);
    }
    args.extend(["--threads", "1"]);
    args.extend(extra);
    Server::start(&args)
}

/// The PNG files `ferry image` writes for `args` (with `--batch N`, N of them), in order.
fn ferry_image(args: &[&str], batch: usize) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = fixture("z-image");
    let run = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "image",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--batch",
            &batch.to_string(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let file = |i: usize| match batch {
        1 => out.clone(),
        _ => dir.path().join(format!("x-{i}.png")),
    };
    (0..batch)
        .map(|i| std::fs::read(file(i)).unwrap())
        .collect()
}

/// Standard base64 with padding, back to bytes.
fn unbase64(s: &str) -> Vec<u8> {
    let digit = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("{:?} is not a base64 digit", c as char),
    };
    let mut out = Vec::new();
    for quad in s.as_bytes().chunks(4) {
        assert_eq!(quad.len(), 4, "base64 comes in fours");
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let v = quad[..4 - pad]
            .iter()
            .enumerate()
            .fold(0u32, |v, (i, &c)| v | (digit(c) as u32) << (18 - 6 * i));
        out.extend(&v.to_be_bytes()[1..4 - pad]);
    }
    out
}

/// POST /v1/images/generations `body`: (status, headers, the answer as JSON).
fn generate(server: &Server, body: &Value) -> (u16, String, Value) {
    let (status, head, answer) = http(
        &server.addr,
        "POST",
        "/v1/images/generations",
        &body.to_string(),
        &[],
    );
    let v = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{body}: {e}: {answer}"));
    (status, head, v)
}

/// The PNGs of a 200 answer.
fn pngs(answer: &Value) -> Vec<Vec<u8>> {
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| unbase64(d["b64_json"].as_str().unwrap()))
        .collect()
}

fn is_png(bytes: &[u8], width: u32, height: u32) -> bool {
    let d = png::Decoder::new(std::io::Cursor::new(bytes));
    d.read_info()
        .is_ok_and(|r| (r.info().width, r.info().height) == (width, height))
}

#[test]
fn served_images_are_ferry_images_pngs_byte_for_byte() {
    let server = start(true, &[]);
    let (got, _, models) = http(&server.addr, "GET", "/v1/models", "", &[]);
    assert_eq!(got, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama", "z-image"], "{models}");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // One image, every default but the size, steps and seed.
    let (status, _, v) = generate(
        &server,
        &json!({"prompt": "a red fox in the snow", "size": "64x48", "steps": 2, "seed": 7}),
    );
    assert_eq!(status, 200, "{v}");
    let cli = ferry_image(
        &[
            "--prompt",
            "a red fox in the snow",
            "--size",
            "64x48",
            "--steps",
            "2",
            "--seed",
            "7",
        ],
        1,
    );
    assert_eq!(pngs(&v), cli);
    assert!(is_png(&cli[0], 64, 48));
    assert!(v["created"].as_u64().unwrap() >= before, "{v}");
    assert_eq!(v["seed"], 7);
    let u = &v["usage"];
    assert_eq!(
        u["output_tokens"],
        4 * 3,
        "64x48 is 4x3 patches of 16 pixels"
    );
    assert!(u["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["input_tokens"].as_u64().unwrap() + 12)
    );

    // Two images as one batch, guided with a negative prompt, every field a client may send.
    let body = json!({"model": "z-image", "prompt": "a lighthouse at dusk", "n": 2,
        "size": "32x64", "steps": 3, "seed": 11, "guidance": 2.5, "negative_prompt": "blurry",
        "response_format": "b64_json", "output_format": "png", "user": "someone"});
    let (status, _, v) = generate(&server, &body);
    assert_eq!(status, 200, "{v}");
    let cli = ferry_image(
        &[
            "--prompt",
            "a lighthouse at dusk",
            "--size",
            "32x64",
            "--steps",
            "3",
            "--seed",
            "11",
            "--guidance",
            "2.5",
            "--negative-prompt",
            "blurry",
        ],
        2,
    );
    let served = pngs(&v);
    assert_eq!(served, cli);
    assert_ne!(served[0], served[1], "two images of one batch differ");

    // A prompt beyond Latin-1; and no seed: the server draws one and says which.
    let (status, _, v) = generate(
        &server,
        &json!({"prompt": "一只红狐狸", "size": "48x32", "steps": 1}),
    );
    assert_eq!(status, 200, "{v}");
    let seed = v["seed"].as_u64().unwrap().to_string();
    let cli = ferry_image(
        &[
            "--prompt",
            "一只红狐狸",
            "--size",
            "48x32",
            "--steps",
            "1",
            "--seed",
            &seed,
        ],
        1,
    );
    assert_eq!(pngs(&v), cli);
    assert_eq!(server.metric("ferry_images_generated_total"), "4");
    assert!(
        server.stop().success(),
        "SIGTERM ends the server with status 0"
    );
}

#[test]
fn bad_image_requests_name_their_field() {
    let server = start(false, &["--max-images", "3"]);
    let ok = r#""prompt":"a fox","size":"64x48","steps":1"#;
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "not valid JSON"),
        ("[1]".into(), 400, "JSON object"),
        (r#"{"size":"64x48"}"#.into(), 400, "prompt"),
        (r#"{"prompt":5}"#.into(), 400, "prompt"),
        (r#"{"prompt":"  "}"#.into(), 400, "prompt"),
        (format!(r#"{{{ok},"n":0}}"#), 400, "n"),
        (format!(r#"{{{ok},"n":4}}"#), 400, "--max-images"),
        (format!(r#"{{{ok},"n":"2"}}"#), 400, "n"),
        (
            r#"{"prompt":"a fox","size":"64x50"}"#.into(),
            400,
            "multiples of 16",
        ),
        (r#"{"prompt":"a fox","size":"8192x16"}"#.into(), 400, "size"),
        (
            r#"{"prompt":"a fox","size":"big"}"#.into(),
            400,
            "WIDTHxHEIGHT",
        ),
        (r#"{"prompt":"a fox","size":64}"#.into(), 400, "size"),
        (r#"{"prompt":"a fox","steps":0}"#.into(), 400, "steps"),
        (r#"{"prompt":"a fox","steps":101}"#.into(), 400, "steps"),
        (r#"{"prompt":"a fox","steps":2.5}"#.into(), 400, "steps"),
        (format!(r#"{{{ok},"seed":-1}}"#), 400, "seed"),
        (format!(r#"{{{ok},"seed":"x"}}"#), 400, "seed"),
        (format!(r#"{{{ok},"guidance":-1}}"#), 400, "guidance"),
        (
            format!(r#"{{{ok},"negative_prompt":"blur"}}"#),
            400,
            "negative_prompt",
        ),
        (
            format!(r#"{{{ok},"response_format":"url"}}"#),
            400,
            "response_format",
        ),
        (
            format!(r#"{{{ok},"response_format":"xml"}}"#),
            400,
            "response_format",
        ),
        (
            format!(r#"{{{ok},"output_format":"jpeg"}}"#),
            400,
            "output_format",
        ),
        (format!(r#"{{{ok},"model":"dall-e-3"}}"#), 404, "dall-e-3"),
    ];
    for (body, status, field) in &cases {
        let (got, _, answer) = http(&server.addr, "POST", "/v1/images/generations", body, &[]);
        assert_eq!(got, *status, "{body}: {answer}");
        let v: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{body}: {e}: {answer}"));
        let e = &v["error"];
        assert!(
            e["message"].as_str().unwrap().contains(field),
            "{body}: {answer}"
        );
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some());
    }
    let (_, _, url) = http(
        &server.addr,
        "POST",
        "/v1/images/generations",
        &format!(r#"{{{ok},"response_format":"url"}}"#),
        &[],
    );
    assert!(url.contains(r#""param":"response_format""#), "{url}");
    // No text model: its endpoints say so, and /v1/models lists the image model only.
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = r#"{"model":"llama","prompt":"hi","messages":[{"role":"user","content":"hi"}]}"#;
        let (got, _, answer) = http(&server.addr, "POST", path, body, &[]);
        assert_eq!(got, 404, "{answer}");
        assert!(answer.contains("no text model"), "{answer}");
        assert!(answer.contains("z-image"), "{answer}");
    }
    let (_, _, models) = http(&server.addr, "GET", "/v1/models", "", &[]);
    let v: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "z-image");
    // After all that, it still generates.
    let (status, _, v) = generate(
        &server,
        &serde_json::from_str(&format!("{{{ok}}}")).unwrap(),
    );
    assert_eq!(status, 200, "{v}");
    assert!(is_png(&pngs(&v)[0], 64, 48));
    assert_eq!(
        server.metric("ferry_requests_rejected_total{reason=\"bad_request\"}"),
        "23"
    );

    // A server of a text model only says so at the image endpoint.
    let llama = fixture("llama");
    let text_only = Server::start(&["--model", llama.to_str().unwrap(), "--device", "cpu"]);
    let (got, _, answer) = http(
        &text_only.addr,
        "POST",
        "/v1/images/generations",
        r#"{"prompt":"a fox"}"#,
        &[],
    );
    assert_eq!(got, 404, "{answer}");
    assert!(
        answer.contains("no image model") && answer.contains("--image-model"),
        "{answer}"
    );
}

/// With room for one image request waiting: while one generates, a second waits its turn
/// and is answered in full, a third is answered 429; and text requests are answered while
/// the first image is still generating.
#[test]
fn image_jobs_queue_beside_the_text_batch() {
    let server = start(true, &["--max-image-queue", "1"]);
    let addr = server.addr.clone();
    let long = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let body = json!({"prompt": "a long job", "size": "512x512", "steps": 16, "seed": 1});
            http(
                &addr,
                "POST",
                "/v1/images/generations",
                &body.to_string(),
                &[],
            )
        }
    });
    let wait_for = |name: &str, value: &str| {
        for _ in 0..400 {
            if server.metric(name) == value {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{name} never became {value}");
    };
    wait_for("ferry_image_jobs_running", "1");
    let small = json!({"prompt": "a small job", "size": "64x48", "steps": 2, "seed": 3});
    let waiting = std::thread::spawn({
        let (addr, body) = (addr.clone(), small.to_string());
        move || http(&addr, "POST", "/v1/images/generations", &body, &[])
    });
    wait_for("ferry_image_queue_depth", "1");
    let (status, head, busy) = generate(&server, &small);
    assert_eq!(status, 429, "{busy}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(
        busy["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-image-queue"),
        "{busy}"
    );
    // Text, while the long image generates.
    for i in 0..4 {
        let body = json!({"model": "llama", "prompt": format!("hello there {i}"),
            "max_tokens": 4, "temperature": 0});
        let (status, _, answer) = http(&addr, "POST", "/v1/completions", &body.to_string(), &[]);
        assert_eq!(status, 200, "{answer}");
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 4, "{answer}");
    }
    assert!(
        !long.is_finished() && server.metric("ferry_image_jobs_running") == "1",
        "the text requests were answered while the image was generating"
    );
    let (status, _, answer) = long.join().unwrap();
    assert_eq!(status, 200, "{}", &answer[..answer.len().min(300)]);
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert!(is_png(&pngs(&v)[0], 512, 512));
    let (status, _, answer) = waiting.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    let cli = ferry_image(
        &[
            "--prompt",
            "a small job",
            "--size",
            "64x48",
            "--steps",
            "2",
            "--seed",
            "3",
        ],
        1,
    );
    assert_eq!(pngs(&v), cli, "the request that waited got its own image");
    assert_eq!(server.metric("ferry_images_generated_total"), "2");
    assert_eq!(
        server.metric("ferry_image_requests_rejected_total{reason=\"queue_full\"}"),
        "1"
    );
}
