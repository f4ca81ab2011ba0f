//! The CPU reference against transformers (f32) on tiny random checkpoints of each
//! architecture: logits within relative L2 1e-4, identical greedy tokens, the same prompt
//! tokens and chat rendering. Expected values come from scripts/make_fixtures.py.

mod common;

use common::{fixture, rel_l2, ARCHS};
use ferry::backend::cpu::Cpu;
use ferry::generate::{Generator, Message, Request, SamplingConfig};
use ferry::model::Checkpoint;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Prompt>,
    chat: Chat,
}

#[derive(Deserialize)]
struct Prompt {
    text: String,
    ids: Vec<u32>,
    /// [positions][vocab]
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

fn check(name: &str) {
    let dir = fixture(name);
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let mut gen = Generator::new(&ckpt, Cpu, None).unwrap();

    for p in &expected.prompts {
        assert_eq!(
            gen.text.encode(&p.text).unwrap(),
            p.ids,
            "{name}: prompt ids of {:?}",
            p.text
        );
        let logits = gen.score(&p.ids).unwrap();
        let want: Vec<f32> = p.logits.concat();
        let err = rel_l2(&logits, &want);
        eprintln!("{name}: logits relative L2 {err:.2e}");
        assert!(
            err <= 1e-4,
            "{name}: logits relative L2 {err:e} > 1e-4 for {:?}",
            p.text
        );

        let out = gen
            .generate(
                &Request {
                    prompt: p.ids.clone(),
                    max_tokens: p.greedy.len(),
                    sampling: SamplingConfig::default(),
                    stop_strings: vec![],
                    ignore_eos: true,
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            out.tokens, p.greedy,
            "{name}: greedy continuation of {:?}",
            p.text
        );
    }

    let messages: Vec<Message> = expected
        .chat
        .messages
        .iter()
        .map(|m| Message::new(&m.role, &m.content))
        .collect();
    let d = &gen.text.defaults;
    let text = ferry::generate::chat::render(
        d.chat_template.as_deref().unwrap(),
        &messages,
        d.bos_token.as_deref().unwrap_or(""),
        d.eos_token.as_deref().unwrap_or(""),
    )
    .unwrap();
    assert_eq!(text, expected.chat.text, "{name}: chat template rendering");
    assert_eq!(
        gen.text.encode_chat(&messages).unwrap(),
        expected.chat.ids,
        "{name}: chat ids"
    );
}

#[test]
fn llama() {
    check("llama");
}

#[test]
fn llama3_rope_scaling_tied_bf16() {
    check("llama3");
}

#[test]
fn mistral_sharded() {
    check("mistral");
}

#[test]
fn qwen2_bias_f16() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm() {
    check("qwen3");
}

#[test]
fn every_fixture_is_tested() {
    for a in ARCHS {
        assert!(fixture(a).join("expected.json").is_file(), "{a}");
    }
}
