//! The model's own chat template (`tokenizer_config.json`), rendered with minijinja as HF does
//! with Jinja, so a chat request gets exactly the prompt format the model was trained on.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// `bos_token` / `eos_token` are either a string or an AddedToken object with `content`.
fn token_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads the template from `tokenizer_config.json`; `Ok(None)` when the model has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| CheckpointError::Load(format!("{}: {e}", path.display())))?;
        // Either a string, or a list of named templates of which "default" is the chat one.
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(named) => match named.iter().find(|t| t["name"] == "default") {
                Some(t) => t["template"].as_str().unwrap_or_default().to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        Self::new(&source, token_text(&config["bos_token"]), token_text(&config["eos_token"])).map(Some)
    }

    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| CheckpointError::Load(format!("chat template does not parse: {e}")))?;
        Ok(Self { env, bos_token, eos_token })
    }

    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| CheckpointError::InvalidParams(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, String::new(), "<|im_end|>".into()).unwrap();
        let out = t.render(&[ChatMessage { role: "user".into(), content: " hi ".into() }]).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn template_exceptions_become_invalid_params() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", String::new(), String::new()).unwrap();
        let err = t.render(&[]).unwrap_err();
        assert!(matches!(&err, CheckpointError::InvalidParams(m) if m.contains("roles must alternate")), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}", String::new(), String::new()).unwrap();
        let out = t.render(&[ChatMessage { role: "user".into(), content: "  x  ".into() }]).unwrap();
        assert_eq!(out, "x");
    }
}
