//! The official `openai` Python client (installed from PyPI into a virtual environment under
//! target/) against `ferry serve` on SmolLM2: chat completion, streamed chat completion,
//! completion and models, the text equal to `ferry run`'s greedy output; and
//! `images.generate` on the tiny Z-Image beside it, the PNGs equal to `ferry image`'s byte
//! for byte. Without python3, the registry or the model the test skips and says why.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn skip(why: &str) {
    eprintln!("serve_openai: SKIPPED: {why}");
}

/// A Python with `openai` installed, or why not.
fn python_with_openai() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/openai-venv");
    let python = venv.join("bin/python3");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(&python) {
        return Ok(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv", venv.to_str().unwrap()])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ])
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !pip.status.success() || !has(&python) {
        return Err(format!(
            "pip install openai failed: {}",
            String::from_utf8_lossy(&pip.stderr).trim()
        ));
    }
    Ok(python)
}

fn smollm2() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_smollm2.sh");
    let out = Command::new(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "SmolLM2 GGUF could not be fetched: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn ferry_run(model: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "run",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "-q",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

const CLIENT: &str = r#"
import base64, json, sys
from openai import OpenAI, BadRequestError
base, question, prompt, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
c = OpenAI(base_url=base + "/v1", api_key="k")
model = c.models.list().data[0].id
chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                 temperature=0, max_tokens=24)
stream = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                   temperature=0, max_tokens=24, stream=True,
                                   stream_options={"include_usage": True})
pieces, usage, finish = [], None, None
for ch in stream:
    if ch.usage:
        usage = ch.usage.completion_tokens
    for choice in ch.choices:
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
comp = c.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16)
images = c.images.generate(model="z-image", prompt="a red fox", size="64x48", n=2,
                           response_format="b64_json", extra_body={"seed": 7, "steps": 2})
for i, d in enumerate(images.data):
    open("%s/%d.png" % (out, i), "wb").write(base64.b64decode(d.b64_json))
try:
    c.images.generate(model="z-image", prompt="a red fox", response_format="url")
    url = None
except BadRequestError as e:
    url = [e.status_code, e.param]
print(json.dumps({"model": model, "models": [m.id for m in c.models.list().data],
    "images": len(images.data), "url": url, "chat": chat.choices[0].message.content,
    "chat_finish": chat.choices[0].finish_reason, "chat_usage": chat.usage.completion_tokens,
    "stream": "".join(pieces), "stream_finish": finish, "stream_usage": usage,
    "completion": comp.choices[0].text}))
"#;

#[test]
fn the_openai_client_gets_ferry_runs_text_and_ferry_images_pngs() {
    let python = match python_with_openai() {
        Ok(p) => p,
        Err(why) => return skip(&why),
    };
    let model = match smollm2() {
        Ok(m) => m,
        Err(why) => return skip(&why),
    };
    let question = "What color is the sky on a clear day?";
    let prompt = "Once upon a time";
    let chat = ferry_run(
        &model,
        &["--chat", "--prompt", question, "--max-tokens", "24"],
    );
    let completion = ferry_run(&model, &["--prompt", prompt, "--max-tokens", "16"]);
    let dir = tempfile::tempdir().unwrap();
    let z_image = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image");
    let cli = dir.path().join("cli.png");
    let made = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "image",
            "--device",
            "cpu",
            "--model",
            z_image.to_str().unwrap(),
        ])
        .args([
            "--prompt",
            "a red fox",
            "--size",
            "64x48",
            "--steps",
            "2",
            "--seed",
            "7",
        ])
        .args(["--batch", "2", "--out", cli.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mut server = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--image-model",
            z_image.to_str().unwrap(),
            "--device",
            "cpu",
            "--port",
            "0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server says where it listens")
            .unwrap();
        if let Some(at) = line.find("http://") {
            break line[at..].trim_end_matches(']').to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let out = Command::new(&python)
        .args(["-c", CLIENT, &addr, question, prompt])
        .arg(dir.path())
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(
        v["models"],
        serde_json::json!(["SmolLM2-135M-Instruct.Q4_1", "z-image"])
    );
    assert_eq!(v["images"], 2);
    for i in 0..2 {
        let served = std::fs::read(dir.path().join(format!("{i}.png"))).unwrap();
        let written = std::fs::read(dir.path().join(format!("cli-{i}.png"))).unwrap();
        assert_eq!(served, written, "image {i}: the PNG ferry image writes");
    }
    assert_eq!(v["url"], serde_json::json!([400, "response_format"]));
    assert_eq!(v["chat"], chat.as_str());
    assert_eq!(v["stream"], chat.as_str());
    assert_eq!(v["completion"], completion.as_str());
    assert_eq!(v["chat_finish"], "length");
    assert_eq!(v["stream_finish"], "length");
    assert_eq!(
        (v["chat_usage"].as_u64(), v["stream_usage"].as_u64()),
        (Some(24), Some(24))
    );
}
