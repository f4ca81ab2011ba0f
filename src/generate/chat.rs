//! Chat templates: the Jinja template that comes with a model, rendered with minijinja and
//! Python-compatible string methods (`.strip()`, `.startswith()`, …) as HF templates use them.

use minijinja::{Environment, ErrorKind, Value};

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    fn to_value(&self) -> Value {
        let map: std::collections::BTreeMap<&str, String> = [
            ("role", self.role.clone()),
            ("content", self.content.clone()),
        ]
        .into();
        Value::from(map)
    }

    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Render `messages` with `template`, ending with the assistant's turn opened.
pub fn render(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    render_with(template, messages, bos_token, eos_token, None)
}

/// [`render`], with `enable_thinking` set for templates that read it (Qwen3's: Z-Image
/// encodes its prompt with thinking enabled).
pub fn render_with(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
    enable_thinking: Option<bool>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |format: String| today(&format));
    env.add_template("chat", template)
        .map_err(|e| Error::Template(format!("cannot parse: {e}")))?;
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(minijinja::context! {
        messages => messages.iter().map(Message::to_value).collect::<Vec<_>>(),
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
        enable_thinking => enable_thinking,
    })
    .map_err(|e| Error::Template(format!("cannot render: {e}")))
}

/// Today's date for templates that print it (Llama 3.1's), formatted with the few strftime
/// codes they use.
fn today(format: &str) -> String {
    let (y, m, d) = crate::date::civil_today();
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    format
        .replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%Y", &y.to_string())
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_with_python_string_methods() {
        let t = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}\
                 {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let out = render(t, &[Message::new("user", "  hi  ")], "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let err = render("{{ raise_exception('roles must alternate') }}", &[], "", "").unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }
}
