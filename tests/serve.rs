//! `ferry serve` on loopback, over plain HTTP/1.1: many concurrent streaming clients get
//! exactly their solo greedy answers, clients that leave free their sequences, a full queue
//! answers 429, bad requests name their field, the API key is checked, memory stays flat
//! over 1000 requests, and SIGTERM ends the server with status 0.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::fixture;
use common::server::{http, Server};
use ferry::backend::cpu::Cpu;
use ferry::generate::{Generator, Request, SamplingConfig};
use ferry::model::Checkpoint;
use serde_json::{json, Value};

/// A server of the tiny llama on the CPU, one thread, with `extra` flags.
fn start(extra: &[&str]) -> Server {
    let model = fixture("llama");
    let mut args = vec!["--model", model.to_str().unwrap(), "--device", "cpu"];
    args.extend(["--threads", "1"]);
    args.extend(extra);
    Server::start(&args)
}

/// The text and finish_reason of a streamed completion's events, checking they end in [DONE].
fn read_events(body: &str) -> (String, String) {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("an SSE data line"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let mut text = String::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        text.push_str(c["text"].as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

fn prompt(i: usize) -> String {
    let words = [
        "hello", "there", "flat", "is", "better", "than", "nested", "abc",
    ];
    (0..1 + i % 7 * 3)
        .map(|k| words[(i + k) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn concurrent_streams_equal_their_solo_greedy_answers() {
    let ckpt = Checkpoint::open(fixture("llama").to_str().unwrap()).unwrap();
    let mut gen = Generator::new(&ckpt, Cpu, Some(256)).unwrap();
    let solo: Vec<(String, &str)> = (0..32)
        .map(|i| {
            let req = Request {
                prompt: gen.text.encode(&prompt(i)).unwrap(),
                max_tokens: 4 + i % 5 * 6,
                sampling: SamplingConfig::default(),
                stop_strings: vec![],
                ignore_eos: false,
            };
            let out = gen.generate(&req, &mut |_| {}).unwrap();
            let finish = match out.finish.as_str() {
                "max_tokens" => "length",
                _ => "stop",
            };
            (out.text, finish)
        })
        .collect();
    // Prompt pieces of 8 tokens: longer prompts go in over several passes.
    let server = start(&[
        "--max-batch",
        "8",
        "--max-queue",
        "64",
        "--prompt-chunk",
        "8",
    ]);
    let addr = server.addr.clone();
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "llama", "prompt": prompt(i), "temperature": 0,
                    "max_tokens": 4 + i % 5 * 6, "stream": true});
                http(&addr, "POST", "/v1/completions", &body.to_string(), &[])
            })
        })
        .collect();
    // Clients that leave after the first bytes of their answer.
    let leavers: Vec<_> = (0..4)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "llama", "prompt": prompt(i), "max_tokens": 200,
                    "stream": true})
                .to_string();
                let mut s = TcpStream::connect(&addr).unwrap();
                write!(
                    s,
                    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut first = [0u8; 64];
                s.read_exact(&mut first).unwrap();
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (status, _, body) = c.join().unwrap();
        assert_eq!(status, 200, "client {i}: {body}");
        let (text, finish) = read_events(&body);
        assert_eq!(text, solo[i].0, "client {i}");
        assert_eq!(finish, solo[i].1, "client {i}");
    }
    for l in leavers {
        l.join().unwrap();
    }
    // The leavers' sequences are freed at a pass soon after (bounded: at most 200 looks).
    let mut active = None;
    for _ in 0..200 {
        let (_, _, m) = http(&addr, "GET", "/metrics", "", &[]);
        let line = m
            .lines()
            .find(|l| l.starts_with("ferry_active_sequences "))
            .unwrap();
        active = Some(line.split(' ').nth(1).unwrap().to_string());
        if active.as_deref() == Some("0") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        active.as_deref(),
        Some("0"),
        "every sequence ended or freed"
    );
    assert!(
        server.stop().success(),
        "SIGTERM ends the server with status 0"
    );
}

/// The prompt piece is for all newcomers of a pass together: a short context does not cap it
/// (stop 29 on the H200: capped at `--context 256`, 64 prompts took a third of the passes),
/// only what a full batch could hold.
#[test]
fn the_prompt_piece_is_not_capped_by_one_sequences_context() {
    for (flags, piece) in [
        (&["--context", "16"][..], 512),
        (&["--context", "16", "--max-batch", "2"][..], 32),
        (&["--context", "16", "--prompt-chunk", "100"][..], 100),
    ] {
        let server = start(flags);
        assert!(
            server.banner.contains("context 16, up to ")
                && server
                    .banner
                    .contains(&format!(" {piece} prompt tokens a pass")),
            "{flags:?}: expected {piece} prompt tokens a pass in {:?}",
            server.banner
        );
    }
}

/// A batch too large to plan is refused at the flag (it overflowed the workspace arithmetic:
/// a panic in debug builds, a wrapped size in release ones).
#[test]
fn a_max_batch_past_the_limit_is_refused_by_name() {
    let model = fixture("llama");
    for batch in ["65537", "18446744073709551615"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--device",
                "cpu",
            ])
            .args(["--max-batch", batch])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--max-batch {batch} was accepted");
        assert!(
            err.contains("--max-batch") && err.contains("from 1 to 65536"),
            "--max-batch {batch}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = start(&["--max-batch", "1", "--max-queue", "1"]);
    let addr = server.addr.clone();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "llama", "prompt": "hello there", "max_tokens": 60});
                http(&addr, "POST", "/v1/completions", &body.to_string(), &[])
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(!busy.is_empty(), "16 at once into room for 2");
    for (_, head, body) in &busy {
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 1"),
            "{head}"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-queue"));
    }
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 429));
    assert!(results.iter().any(|r| r.0 == 200));
}

#[test]
fn bad_requests_name_their_field() {
    let server = start(&[
        "--api-key",
        "sekrit",
        "--context",
        "64",
        "--max-body",
        "4096",
    ]);
    let auth = "Authorization: Bearer sekrit";
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/chat/completions", "{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", "[1]", 400, "JSON object"),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            400,
            "model",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama"}"#,
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama","messages":[{"role":"robot","content":"hi"}]}"#,
            400,
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama","messages":[{"role":"user","content":5}]}"#,
            400,
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama","messages":[{"role":"user","content":"hi"}],"n":2}"#,
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama","messages":[{"role":"user","content":"hi"}],"max_tokens":"9"}"#,
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":60}"#,
            400,
            "max_completion_tokens",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","max_tokens":0}"#,
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","temperature":7}"#,
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","top_p":"x"}"#,
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","top_k":1.5}"#,
            400,
            "top_k",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","seed":"x"}"#,
            400,
            "seed",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","stop":[1]}"#,
            400,
            "stop",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","stream":"yes"}"#,
            400,
            "stream",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":"hi","stream_options":{"include_usage":1}}"#,
            400,
            "stream_options.include_usage",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":["a","b"]}"#,
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            r#"{"model":"llama","prompt":""}"#,
            400,
            "prompt",
        ),
    ];
    for (path, body, status, field) in cases {
        let (got, _, answer) = http(&server.addr, "POST", path, body, &[auth]);
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
    // A prompt longer than the context names the prompt.
    let long = "hello there ".repeat(40);
    let (got, _, answer) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        &json!({"model": "llama", "prompt": long}).to_string(),
        &[auth],
    );
    assert_eq!(got, 400, "{answer}");
    assert!(
        answer.contains("\"param\":\"prompt\"") && answer.contains("context"),
        "{answer}"
    );
    // Too large a body.
    let (got, _, answer) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        &json!({"model": "llama", "prompt": "x".repeat(8000)}).to_string(),
        &[auth],
    );
    assert_eq!(got, 413);
    assert!(answer.contains("--max-body"), "{answer}");
    // The key: missing or wrong is 401; right is served.
    for headers in [&[][..], &["Authorization: Bearer wrong"][..]] {
        let (got, _, answer) = http(&server.addr, "GET", "/v1/models", "", headers);
        assert_eq!(got, 401, "{answer}");
        assert!(answer.contains("invalid_api_key"), "{answer}");
    }
    let (got, _, answer) = http(&server.addr, "GET", "/v1/models", "", &[auth]);
    assert_eq!(got, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap()["data"][0]["id"],
        "llama"
    );
    let (got, _, answer) = http(&server.addr, "GET", "/health", "", &[]);
    assert_eq!((got, answer.as_str()), (200, r#"{"status":"ok"}"#));
    // After all that the server still answers.
    let (got, _, answer) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        r#"{"model":"llama","prompt":"hi","max_tokens":3,"temperature":0}"#,
        &[auth],
    );
    assert_eq!(got, 200, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap()
            + v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["total_tokens"].as_u64().unwrap()
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_stays_flat_over_1000_requests() {
    let server = start(&[]);
    let body = |i: usize| {
        json!({"model": "llama", "prompt": prompt(i), "max_tokens": 2, "temperature": 0,
        "stream": i % 2 == 0})
        .to_string()
    };
    let mut after_warmup = 0;
    for i in 0..1000 {
        let path = if i % 3 == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let b = if i % 3 == 0 {
            json!({"model": "llama", "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": 2}).to_string()
        } else {
            body(i)
        };
        let (status, _, answer) = http(&server.addr, "POST", path, &b, &[]);
        assert_eq!(status, 200, "request {i}: {answer}");
        if i == 199 {
            after_warmup = rss_kib(server.child.id());
        }
    }
    let end = rss_kib(server.child.id());
    assert!(
        end < after_warmup + 8 * 1024,
        "RSS {after_warmup} KiB after 200 requests, {end} KiB after 1000"
    );
}

/// A connection that sends nothing, or half a request head, is closed after
/// `--header-timeout` (here 1 s; the test waits up to 20); others are served meanwhile, and
/// one left open does not keep SIGTERM from ending the server.
#[test]
fn connections_that_send_no_whole_request_head_are_closed() {
    let server = start(&["--header-timeout", "1"]);
    let silent = TcpStream::connect(&server.addr).unwrap();
    let mut half = TcpStream::connect(&server.addr).unwrap();
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
        .unwrap();
    let (status, _, answer) = http(&server.addr, "GET", "/health", "", &[]);
    assert_eq!((status, answer.as_str()), (200, r#"{"status":"ok"}"#));
    for (what, mut s) in [("silent", silent), ("half a head", half)] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{what}: {rest:?}"),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{what}: still open after 20 s"
            ),
        }
    }
    let _open = TcpStream::connect(&server.addr).unwrap();
    assert!(
        server.stop().success(),
        "SIGTERM ends the server with status 0"
    );
}

/// A request whose body comes too slowly is answered 408 after `--body-timeout` (here 1 s;
/// the test waits up to 20) and its connection closed; others are served meanwhile.
#[test]
fn a_body_sent_too_slowly_is_answered_408() {
    let server = start(&["--body-timeout", "1"]);
    let mut slow = TcpStream::connect(&server.addr).unwrap();
    slow.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"model\":",
    )
    .unwrap();
    let (status, _, answer) = http(&server.addr, "GET", "/health", "", &[]);
    assert_eq!((status, answer.as_str()), (200, r#"{"status":"ok"}"#));
    slow.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut reply = Vec::new();
    let _ = slow.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("--body-timeout"), "{reply}");
    let (status, _, _) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        r#"{"model":"llama","prompt":"hi","max_tokens":2,"temperature":0}"#,
        &[],
    );
    assert_eq!(status, 200, "served after the slow one");
}
