//! The command line as a new user meets it: a random seed that is printed and repeats,
//! negative numbers read as values and checked by ferry, flags that would change nothing
//! refused, and every error one line naming the flag.

mod common;

use std::process::{Command, Output};

use common::fixture;

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> (String, String) {
    let out = ferry(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ferry {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// Run `ferry ARGS`; assert failure without a panic and an error on one line of stderr;
/// return it.
fn fails(args: &[&str]) -> String {
    let e = usage_fails(args);
    let out = ferry(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    e
}

/// [`fails`] for the errors clap reports itself (an unknown flag, two flags that conflict),
/// which it follows with a usage hint: the first line.
fn usage_fails(args: &[&str]) -> String {
    let out = ferry(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "ferry {args:?} should fail: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "ferry {args:?} panicked: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "ferry {args:?}: {stderr}");
    stderr.lines().next().unwrap().to_string()
}

/// `ferry run` on the llama fixture with `extra` flags.
fn run(extra: &[&str]) -> Vec<String> {
    let model = fixture("llama");
    let mut args: Vec<String> = [
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The seed in a statistics line `[...; seed N; on cpu]`.
fn seed_of(stderr: &str) -> u64 {
    let at = stderr
        .find("seed ")
        .unwrap_or_else(|| panic!("no seed in {stderr}"));
    stderr[at + 5..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn sampling_picks_a_random_seed_prints_it_and_repeats_with_it() {
    let sample = run(&["--temperature", "1", "--max-tokens", "12", "--ignore-eos"]);
    let (text_a, err_a) = ok(&refs(&sample));
    let (_, err_b) = ok(&refs(&sample));
    let (a, b) = (seed_of(&err_a), seed_of(&err_b));
    assert_ne!(a, b, "two runs without --seed drew the same seed");
    let mut again = sample.clone();
    again.extend(["--seed".to_string(), a.to_string()]);
    let (text, err) = ok(&refs(&again));
    assert_eq!(
        text, text_a,
        "--seed {a} should repeat the run that printed it"
    );
    assert_eq!(seed_of(&err), a);
    // Greedy draws nothing: no seed to print.
    let (_, err) = ok(&refs(&run(&["--max-tokens", "2"])));
    assert!(!err.contains("seed"), "{err}");
}

#[test]
fn negative_numbers_are_values_that_ferry_checks() {
    let e = fails(&refs(&run(&["--vram", "-1"])));
    assert!(e.contains("--vram") && e.contains("not a size"), "{e}");
    let e = fails(&refs(&run(&["--temperature", "-1"])));
    assert!(e.contains("--temperature") && e.contains("≥ 0"), "{e}");
    let e = fails(&refs(&run(&["--max-tokens", "-2"])));
    assert!(
        e.contains("--max-tokens") && e.contains("-1 for until the context is full"),
        "{e}"
    );
    let e = fails(&refs(&run(&["--context", "-5"])));
    assert!(e.contains("--context") && e.contains("≥ 1"), "{e}");
    let e = fails(&refs(&run(&["--top-k", "-1", "--temperature", "1"])));
    assert!(e.contains("--top-k"), "{e}");
    let e = fails(&refs(&run(&["--seed", "-1", "--temperature", "1"])));
    assert!(e.contains("--seed"), "{e}");
}

#[test]
fn max_tokens_minus_one_generates_until_the_context_is_full() {
    let (_, err) = ok(&refs(&run(&[
        "--max-tokens",
        "-1",
        "--context",
        "12",
        "--ignore-eos",
    ])));
    // "hello" is 5 prompt tokens here; 12 positions hold 7 more, and the 8th is never fed.
    assert!(err.contains("stopped: context full"), "{err}");
    assert!(
        err.contains("5 prompt tokens") && err.contains("; 8 tokens in"),
        "{err}"
    );
}

#[test]
fn context_zero_is_a_bad_flag_not_a_long_prompt() {
    let e = fails(&refs(&run(&["--context", "0"])));
    assert!(e.contains("--context") && !e.contains("prompt is"), "{e}");
    // A context past the model's maximum is named as such, before any prompt is measured.
    let long = "word ".repeat(300);
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let e = fails(&[
        "run",
        "--model",
        m,
        "--prompt",
        &long,
        "--context",
        "100000",
    ]);
    assert!(
        e.contains("--context") && e.contains("max_position_embeddings"),
        "{e}"
    );
}

#[test]
fn empty_stop_text_is_refused() {
    let e = fails(&refs(&run(&["--stop", ""])));
    assert!(e.contains("--stop") && e.contains("empty"), "{e}");
    // Text that starts with a hyphen is text.
    ok(&refs(&run(&["--stop", "- ", "--max-tokens", "2"])));
}

#[test]
fn flags_that_would_change_nothing_are_refused() {
    for flag in [&["--batch", "4"][..], &["--json"]] {
        let e = fails(&refs(&run(flag)));
        assert!(e.contains(flag[0]) && e.contains("--prompts"), "{e}");
    }
    for flag in [["--top-k", "5"], ["--top-p", "0.9"], ["--seed", "3"]] {
        let e = fails(&refs(&run(&flag)));
        assert!(e.contains(flag[0]) && e.contains("--temperature"), "{e}");
    }
}

#[test]
fn top_k_zero_means_off() {
    let base = [
        "--temperature",
        "1",
        "--seed",
        "11",
        "--max-tokens",
        "16",
        "--ignore-eos",
    ];
    let (all, _) = ok(&refs(&run(&base)));
    let mut off = base.to_vec();
    off.extend(["--top-k", "0"]);
    let (k0, _) = ok(&refs(&run(&off)));
    assert_eq!(k0, all);
}

#[test]
fn a_jsonl_prompts_max_tokens_acts_and_unknown_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"hello\", \"max_tokens\": 2}\n\"abc\"\n{\"prompt\": \"x\", \"max_tokens\": 7}\n",
    )
    .unwrap();
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let f = file.to_str().unwrap();
    let args = [
        "run",
        "--model",
        m,
        "--prompts",
        f,
        "--max-tokens",
        "4",
        "--ignore-eos",
    ];
    let mut json = args.to_vec();
    json.push("--json");
    let (out, _) = ok(&json);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tokens: Vec<u64> = lines
        .iter()
        .map(|l| l["tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(tokens, [2, 4, 7]);
    // Numbered from 1 in JSON as in the text blocks; the finish as a name, not Rust's.
    assert_eq!(lines[0]["number"], 1);
    assert_eq!(lines[0]["finish"], "max_tokens");
    let (text, _) = ok(&args);
    assert!(text.starts_with("--- 1 ---\n"), "{text}");

    std::fs::write(&file, "{\"prompt\": \"hello\", \"temperature\": 2}\n").unwrap();
    let e = fails(&["run", "--model", m, "--prompts", f]);
    assert!(
        e.contains("p.jsonl") && e.contains("line 1") && e.contains("\"temperature\""),
        "{e}"
    );
    std::fs::write(&file, "{\"prompt\": \"hello\", \"max_tokens\": \"many\"}\n").unwrap();
    let e = fails(&["run", "--model", m, "--prompts", f]);
    assert!(e.contains("p.jsonl") && e.contains("max_tokens"), "{e}");
}

#[test]
fn a_missing_gpu_is_named_by_the_flag_that_asked_for_it() {
    let e = fails(&refs(&run(&["--device", "cuda:99"])));
    assert!(e.contains("--device") && e.contains("cuda:99"), "{e}");
    let e = fails(&refs(&run(&["--device", "cuda:99", "--vram", "1GiB"])));
    assert!(e.contains("--device") && e.contains("cuda:99"), "{e}");
    // --vram alone (--device auto) asks for a GPU: where there is none, --vram is named.
    let out = ferry(&refs(&run(&["--vram", "1GiB", "--max-tokens", "1"])));
    if !out.status.success() {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.starts_with("error: --vram:") && e.contains("GPU"), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
}

#[test]
fn bench_and_bench_cuda_speak_one_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bench.json");
    let f = file.to_str().unwrap();
    let bench = [
        "bench",
        "--synthetic",
        "tiny",
        "--device",
        "cpu",
        "--prompt-tokens",
        "4",
    ];
    let quick = ["--runs", "1", "--warmup", "0", "--decode-tokens", "2"];
    // --json FILE: the table on stdout, the JSON in the file; --json alone: JSON instead.
    let (table, _) = ok(&[&bench[..], &quick, &["--json", f]].concat());
    assert!(table.contains("prompt tok/s"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["results"][0]["prompt_tokens"], 4);
    let (out, _) = ok(&[&bench[..], &["--json"], &quick].concat());
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["runs"], 1);

    // bench-cuda: --synthetic as on bench and plan (--preset still read), --past for the
    // positions before decoding (--context is run's maximum length, not this).
    for flag in ["--synthetic", "--preset"] {
        let e = fails(&["bench-cuda", flag, "no-such-preset"]);
        assert!(e.contains("--synthetic") && e.contains("qwen2.5-7b"), "{e}");
    }
    let e = usage_fails(&["bench-cuda", "--synthetic", "tiny", "--context", "5"]);
    assert!(e.contains("--context"), "{e}");
    // Decoding is not timed with --vram: its flags are refused there, not ignored.
    let e = usage_fails(&[
        "bench-cuda",
        "--synthetic",
        "tiny",
        "--vram",
        "1GiB",
        "--past",
        "5",
    ]);
    assert!(e.contains("--past") && e.contains("--vram"), "{e}");
    let help = String::from_utf8_lossy(&ferry(&["bench-cuda", "--help"]).stdout).to_string();
    assert!(
        help.contains("ferry synth --list") && !help.contains("synth --help"),
        "{help}"
    );
    let e = fails(&[
        "plan",
        "--synthetic",
        "no-such-preset",
        "--vram",
        "1GiB",
        "--tokens",
        "4",
    ]);
    assert!(e.contains("--synthetic"), "{e}");
    let e = fails(&[
        "plan",
        "--synthetic",
        "tiny",
        "--vram",
        "1GiB",
        "--tokens",
        "4",
        "--free-vram",
        "2GiB",
    ]);
    assert!(e.contains("--free-vram") && e.contains("auto"), "{e}");
}

#[test]
fn output_speaks_words_not_rust() {
    // One token, one pass: singular, and why it stopped in words.
    let (_, err) = ok(&refs(&run(&["--max-tokens", "1"])));
    assert!(
        err.contains("; 1 token in") && err.contains("stopped: max tokens reached"),
        "{err}"
    );
    assert!(
        !err.contains("MaxTokens") && !err.contains("1 tokens"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny");
    let (_, err) = ok(&["synth", "--preset", "tiny", "--out", out.to_str().unwrap()]);
    assert!(err.contains("in 1 shard)"), "{err}");
    let (list, _) = ok(&["synth", "--list"]);
    let tiny = list
        .lines()
        .find(|l| l.trim_start().starts_with("tiny "))
        .unwrap();
    assert!(
        tiny.contains("139.6K params") && !tiny.contains("0.00B"),
        "{tiny}"
    );
    let (info, _) = ok(&["info", "--model", out.to_str().unwrap()]);
    assert!(info.contains("format         safetensors\n"), "{info}");
    assert!(
        info.contains("stored as BF16 (") && info.contains("in memory as bf16"),
        "{info}"
    );
}

#[test]
fn plan_says_what_it_assumed_and_counts_every_group() {
    let plan = [
        "plan",
        "--synthetic",
        "tiny",
        "--vram",
        "1GiB",
        "--tokens",
        "4",
    ];
    // Two of the three figures stated: the note names the third only.
    let (out, _) = ok(&[&plan[..], &["--h2d-gbps", "25", "--tflops", "80"]].concat());
    assert!(out.contains("state yours with --hbm-gbps)"), "{out}");
    assert!(!out.contains("--h2d-gbps,"), "{out}");
    let (out, _) = ok(&[
        &plan[..],
        &["--h2d-gbps", "25", "--tflops", "80", "--hbm-gbps", "900"],
    ]
    .concat());
    assert!(!out.contains("assumed"), "{out}");
    // Everything fits: nothing streams, so no share of a bound of 0 ms.
    assert!(out.contains("4 groups, 272.6 KiB bf16"), "{out}");
    assert!(out.contains("resident     3 of 4 groups"), "{out}");
    assert!(
        out.contains("streamed     nothing") && out.contains("nothing to stream"),
        "{out}"
    );
    assert!(!out.contains("% of the bound"), "{out}");
}

/// `ferry chat ARGS` with `input` on standard input: (stdout, stderr).
fn chat(args: &[&str], input: &str) -> (String, String) {
    use std::io::Write;
    let model = fixture("qwen3");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["chat", "--model", model.to_str().unwrap()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "ferry chat {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// The prompt lengths of each turn's statistics line `[N prompt tokens in ...]`.
fn prompt_lengths(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix('[')?.split_once(" prompt token"))
        .map(|(n, _)| n.parse().unwrap())
        .collect()
}

#[test]
fn chat_keeps_the_conversation_until_reset() {
    let (out, err) = chat(
        &["--max-tokens", "3", "--ignore-eos"],
        "hello\nhello\n/reset\nhello\n/exit\nhello\n",
    );
    let turns = prompt_lengths(&err);
    assert_eq!(turns.len(), 3, "/exit ends before the last line: {err}");
    // The second turn's prompt holds the first turn and its answer; /reset forgets both.
    assert!(turns[1] > turns[0] + 3, "{turns:?}");
    assert_eq!(turns[2], turns[0], "{turns:?}");
    let answers: Vec<&str> = out.lines().collect();
    assert_eq!(answers.len(), 3, "{out:?}");
    assert_eq!(
        answers[2], answers[0],
        "greedy: the same turn, the same answer"
    );
    // A system message stays through /reset; an unknown command is said so, not sent.
    let (_, err) = chat(
        &["--system", "Be brief.", "--max-tokens", "1"],
        "hi\n/reset\nhi\n/nope\n",
    );
    let turns = prompt_lengths(&err);
    assert_eq!(turns.len(), 2, "{err}");
    assert_eq!(turns[0], turns[1]);
    assert!(err.contains("/nope: no such command"), "{err}");
}

#[test]
fn chat_needs_a_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("qwen3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let tc = tmp.path().join("tokenizer_config.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, json.to_string()).unwrap();
    let e = fails(&["chat", "--model", tmp.path().to_str().unwrap()]);
    assert!(
        e.contains("chat template") && e.contains("ferry run"),
        "{e}"
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_answer_not_the_chat() {
    use std::io::{Read, Write};
    let model = fixture("qwen3");
    // An answer that would run to the end of a 1024-token context.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "-1",
            "--ignore-eos",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.flush().unwrap();
    // Once the answer is being written, Ctrl-C.
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the chat went on after Ctrl-C: {stderr}"
    );
    assert!(stderr.contains("stopped: interrupted"), "{stderr}");
    assert_eq!(
        prompt_lengths(&stderr).len(),
        2,
        "the next turn is answered: {stderr}"
    );
}

#[test]
fn prompt_file_threads_and_answers_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, "hello\n").unwrap();
    let f = file.to_str().unwrap();
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let (from_file, _) = ok(&["run", "--model", m, "--prompt-file", f, "--max-tokens", "6"]);
    let (given, _) = ok(&[
        "run",
        "--model",
        m,
        "--prompt",
        "hello\n",
        "--max-tokens",
        "6",
    ]);
    assert_eq!(from_file, given);
    let e = usage_fails(&["run", "--model", m, "--prompt-file", f, "--prompt", "hi"]);
    assert!(e.contains("--prompt"), "{e}");
    std::fs::write(&file, "").unwrap();
    let e = fails(&["run", "--model", m, "--prompt-file", f]);
    assert!(e.contains("--prompt-file") && e.contains("empty"), "{e}");

    // --threads sets the CPU backend's threads, and is refused where the GPU computes.
    let (_, err) = ok(&[
        "run",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(err.contains("on cpu"), "{err}");
    let (table, _) = ok(&[
        "bench",
        "--model",
        m,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--prompt-tokens",
        "4",
        "--runs",
        "1",
        "--decode-tokens",
        "2",
    ]);
    assert!(table.contains("(1 thread)"), "{table}");
    let e = fails(&[
        "run",
        "--model",
        m,
        "-p",
        "hi",
        "--threads",
        "2",
        "--device",
        "cuda",
    ]);
    assert!(
        e.contains("--threads") && e.contains("--device cuda"),
        "{e}"
    );
    let e = fails(&["bench", "--model", m, "--threads", "2", "--device", "cuda"]);
    assert!(e.contains("--threads") && e.contains("--device cpu"), "{e}");
    let e = fails(&["run", "--model", m, "--prompt", "hi", "--threads", "0"]);
    assert!(e.contains("--threads") && e.contains("≥ 1"), "{e}");

    // Answers come out in the file's order, though the second ends first.
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a\", \"max_tokens\": 9}\n{\"prompt\": \"b\", \"max_tokens\": 1}\n",
    )
    .unwrap();
    let (out, _) = ok(&[
        "run",
        "--model",
        m,
        "--prompts",
        prompts.to_str().unwrap(),
        "--ignore-eos",
        "--json",
    ]);
    let numbers: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["number"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(numbers, [1, 2]);
}
