//! The OpenAI request fields ferry reads, checked one by one so that an error names the
//! field and what was expected, and the error object clients parse.

use serde_json::{json, Map, Value};

use crate::diffuse::pipeline::SIZE_MULTIPLE;

/// An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: a field's value is wrong.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: format!("{param}: {}", message.into()),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What a request asks, its fields checked.
#[derive(Debug)]
pub struct Ask {
    pub model: String,
    /// Chat: (role, content) in order; completions: the prompt.
    pub messages: Vec<(String, String)>,
    pub prompt: String,
    /// Where a field gave it: its name, for errors about the context.
    pub max_tokens: Option<(usize, &'static str)>,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// The request body `bytes` for `endpoint`, parsed and checked.
pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Ask, ApiError> {
    let o = object(bytes)?;
    let model = string(&o, "model")?.ok_or_else(|| ApiError::field("model", "is required"))?;
    let mut ask = Ask {
        model,
        messages: Vec::new(),
        prompt: String::new(),
        max_tokens: None,
        temperature: number(&o, "temperature", 0.0, 2.0)?.unwrap_or(1.0),
        top_p: number(&o, "top_p", 0.0, 1.0)?.filter(|&p| p < 1.0),
        top_k: whole(&o, "top_k")?.map(|k| k as usize).filter(|&k| k > 0),
        seed: match o.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().map(|s| s as u64).or(v.as_u64()).ok_or_else(|| {
                ApiError::field("seed", format!("expected an integer, found {v}"))
            })?),
        },
        stop: stop(&o)?,
        stream: boolean(&o, "stream")?.unwrap_or(false),
        include_usage: false,
    };
    if let Some(p) = ask.top_p {
        if p <= 0.0 {
            return Err(ApiError::field("top_p", "expected a number in (0, 1]"));
        }
    }
    for name in ["max_completion_tokens", "max_tokens"] {
        if let Some(n) = whole(&o, name)? {
            if n < 1 {
                return Err(ApiError::field(name, "expected at least 1"));
            }
            ask.max_tokens = Some((n as usize, name));
            break;
        }
    }
    if let Some(n) = whole(&o, "n")? {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("ferry generates one choice per request; expected 1, found {n}"),
            ));
        }
    }
    match o.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(so)) => {
            ask.include_usage = match so.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::field(
                        "stream_options.include_usage",
                        format!("expected true or false, found {v}"),
                    ))
                }
            }
        }
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("expected an object, found {v}"),
            ))
        }
    }
    match endpoint {
        Endpoint::Chat => ask.messages = messages(&o)?,
        Endpoint::Completions => {
            ask.prompt = match o.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                None => return Err(ApiError::field("prompt", "is required")),
                Some(v) => {
                    return Err(ApiError::field(
                        "prompt",
                        format!("expected a string (or a list of one string), found {v}"),
                    ))
                }
            }
        }
    }
    Ok(ask)
}

fn messages(o: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    let list = match o.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        None => return Err(ApiError::field("messages", "is required")),
        Some(v) => {
            return Err(ApiError::field(
                "messages",
                format!("expected a non-empty list of messages, found {v}"),
            ))
        }
    };
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let role = match m.get("role") {
            Some(Value::String(r))
                if ["system", "user", "assistant", "developer"].contains(&r.as_str()) =>
            {
                if r == "developer" {
                    "system".to_string()
                } else {
                    r.clone()
                }
            }
            other => {
                return Err(ApiError::field(
                    &at("role"),
                    format!(
                        "expected \"system\", \"user\" or \"assistant\", found {}",
                        other.map_or("nothing".into(), Value::to_string)
                    ),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::field(
                                &at("content"),
                                "expected text parts ({\"type\": \"text\", \"text\": ...}); ferry serves text only",
                            ))
                        }
                    }
                }
                text
            }
            other => {
                return Err(ApiError::field(
                    &at("content"),
                    format!(
                        "expected a string, found {}",
                        other.map_or("nothing".into(), Value::to_string)
                    ),
                ))
            }
        };
        out.push((role, content));
    }
    Ok(out)
}

fn string(o: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ApiError::field(
            name,
            format!("expected a string, found {v}"),
        )),
    }
}

fn boolean(o: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::field(
            name,
            format!("expected true or false, found {v}"),
        )),
    }
}

fn whole(o: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::field(name, format!("expected an integer, found {v}"))),
    }
}

fn number(o: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as f32)),
            _ => Err(ApiError::field(
                name,
                format!("expected a number from {lo} to {hi}, found {v}"),
            )),
        },
    }
}

fn stop(o: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let list = match o.get("stop") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(v) => {
            return Err(ApiError::field(
                "stop",
                format!("expected a string or a list of up to 4 strings, found {v}"),
            ))
        }
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", "a stop text is empty"));
    }
    Ok(list)
}

/// Most denoising steps one image request may ask for.
pub const MAX_STEPS: usize = 100;

/// Longest side of an image a request may ask for, pixels (as `ferry image`).
pub const MAX_SIDE: usize = 4096;

/// What an image request asks, its fields checked: OpenAI's `prompt`, `n`, `size`,
/// `response_format` (b64_json only), `model`, and `ferry image`'s `seed`, `steps`,
/// `guidance`, `negative_prompt`.
#[derive(Debug, Clone)]
pub struct ImageAsk {
    /// None: the image model served.
    pub model: Option<String>,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Images, denoised together as one batch.
    pub n: usize,
    pub width: usize,
    pub height: usize,
    /// None: the model's default ([`ImagePipeline::defaults`](crate::diffuse::pipeline::ImagePipeline::defaults)).
    pub steps: Option<usize>,
    /// None: drawn by the server (and returned).
    pub seed: Option<u64>,
    /// None: the model's default.
    pub guidance: Option<f32>,
}

/// The image request body `bytes`, parsed and checked; at most `max_n` images a request.
pub fn parse_image(bytes: &[u8], max_n: usize) -> Result<ImageAsk, ApiError> {
    let o = object(bytes)?;
    let prompt = string(&o, "prompt")?.ok_or_else(|| ApiError::field("prompt", "is required"))?;
    if prompt.trim().is_empty() {
        return Err(ApiError::field("prompt", "is empty; describe the image"));
    }
    match string(&o, "response_format")?.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(ApiError::field(
                "response_format",
                "\"url\" is not served: ferry keeps no images to link to; ask for \"b64_json\" (the PNG's bytes in base64)",
            ))
        }
        Some(other) => {
            return Err(ApiError::field(
                "response_format",
                format!("expected \"b64_json\", found {other:?}"),
            ))
        }
    }
    match string(&o, "output_format")?.as_deref() {
        None | Some("png") => {}
        Some(other) => {
            return Err(ApiError::field(
                "output_format",
                format!("ferry writes PNG; expected \"png\", found {other:?}"),
            ))
        }
    }
    let n = whole(&o, "n")?.unwrap_or(1);
    if n < 1 || n as u64 > max_n as u64 {
        return Err(ApiError::field(
            "n",
            format!("expected 1 to {max_n} images (ferry serve --max-images), found {n}"),
        ));
    }
    let (width, height) = match string(&o, "size")?.as_deref() {
        None | Some("auto") => (1024, 1024),
        Some(s) => image_size(s)?,
    };
    let steps = whole(&o, "steps")?;
    if let Some(steps) = steps.filter(|s| !(1..=MAX_STEPS as i64).contains(s)) {
        return Err(ApiError::field(
            "steps",
            format!("expected 1 to {MAX_STEPS} denoising steps, found {steps}"),
        ));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ApiError::field("seed", format!("expected a whole number ≥ 0, found {v}"))
        })?),
    };
    let guidance = number(&o, "guidance", 0.0, 100.0)?;
    let negative_prompt = string(&o, "negative_prompt")?;
    if negative_prompt.is_some() && guidance == Some(0.0) {
        return Err(ApiError::field(
            "negative_prompt",
            "acts only with guidance > 0 (classifier-free guidance); give \"guidance\" too",
        ));
    }
    Ok(ImageAsk {
        model: string(&o, "model")?,
        prompt,
        negative_prompt,
        n: n as usize,
        width,
        height,
        steps: steps.map(|s| s as usize),
        seed,
        guidance,
    })
}

/// `"WIDTHxHEIGHT"`: positive multiples of [`SIZE_MULTIPLE`], at most [`MAX_SIDE`] a side.
fn image_size(s: &str) -> Result<(usize, usize), ApiError> {
    let parsed = s
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<usize>().ok()?, h.parse::<usize>().ok()?)));
    let Some((w, h)) = parsed else {
        return Err(ApiError::field(
            "size",
            format!("expected \"WIDTHxHEIGHT\" (e.g. \"1024x768\"), found {s:?}"),
        ));
    };
    let m = SIZE_MULTIPLE;
    if w == 0 || h == 0 || w % m != 0 || h % m != 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(ApiError::field(
            "size",
            format!("{s}: width and height must be multiples of {m} (the VAE's 8 times the DiT's patch of 2), from {m} to {MAX_SIDE}"),
        ));
    }
    Ok((w, h))
}

/// The body as a JSON object.
fn object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::new(
            400,
            "invalid_request_error",
            "the body must be a JSON object",
        )),
    }
}
