//! The Jinja chat template that checkpoints carry (`tokenizer_config.json`) renders what the
//! engine's `Tokenizer::chat` tokenizes: rendered by a Jinja engine and tokenized with `<s>` and
//! `</s>` as special tokens, it gives the same ids on every dialogue, and it rejects the role
//! orders `chat` rejects. (`scripts/hf_check.py` checks the same against transformers itself.)

use engine::tokenizer::{chat_template, Message, Tokenizer};

/// Llama 2's tokenizer, or `None` (the test skips, naming it and how to get it).
fn llama_tok() -> Option<Tokenizer> {
    let p = engine::shared_data::or_skip("tokenizer/llama2/tokenizer.json")?;
    Some(Tokenizer::from_file(&p).unwrap())
}

fn render(messages: &[Message]) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    // transformers provides `raise_exception` to chat templates; so does this environment.
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let src = chat_template();
    let t = env.template_from_str(&src).map_err(|e| e.to_string())?;
    t.render(minijinja::context! { messages => messages, bos_token => "<s>", eos_token => "</s>" })
        .map_err(|e| format!("{e:#}"))
}

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

#[test]
fn the_template_renders_the_engines_ids() {
    let Some(tok) = llama_tok() else {
        return;
    };
    let dialogues: Vec<Vec<Message>> = vec![
        vec![m("user", "Hello")],
        vec![m("user", "What is 2+2?"), m("assistant", "4")],
        vec![
            m("system", "Be brief."),
            m("user", "Name a colour."),
            m("assistant", "Blue."),
            m("user", "Another?"),
            m("assistant", "Red."),
        ],
        vec![
            m("system", "  You answer in French.\n"),
            m("user", "  Hi there!  \n"),
            m("assistant", "\nBonjour ! 🦙 "),
            m("user", "And in German?"),
        ],
        // An empty user turn after a system prompt: the trim also cuts the system block's tail.
        vec![m("system", "s"), m("user", " "), m("assistant", "")],
        vec![
            m("user", "a\n\nb\tc"),
            m("assistant", "multi\nline\n\nanswer"),
        ],
        vec![
            m("user", "quote ' and \\ and {{ braces }}"),
            m("assistant", "ok"),
        ],
    ];
    for d in &dialogues {
        let text = render(d).unwrap();
        let (want, _) = tok.chat(d).unwrap();
        let got = tok.encode(&text, false).unwrap();
        assert_eq!(got, want, "{d:?} rendered as {text:?}");
    }
    // The rendering is Llama 2's, spelled out once.
    assert_eq!(
        render(&dialogues[2]).unwrap(),
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST] Blue. </s><s>[INST] Another? [/INST] Red. </s>"
    );
}

#[test]
fn the_template_rejects_what_the_engine_rejects() {
    let Some(tok) = llama_tok() else {
        return;
    };
    let bad: Vec<Vec<Message>> = vec![
        vec![m("assistant", "hi")],
        vec![m("system", "s")],
        vec![m("user", "a"), m("user", "b")],
        vec![m("user", "a"), m("assistant", "b"), m("assistant", "c")],
        vec![m("system", "s"), m("system", "t"), m("user", "u")],
        vec![m("user", "a"), m("tool", "b")],
    ];
    for d in &bad {
        let engine = tok.chat(d).unwrap_err().to_string();
        let jinja = render(d).unwrap_err();
        // Both name the same message and role.
        if let Some(at) = engine.find("message ") {
            let what = &engine[at..engine.find(" (").unwrap_or(engine.len())];
            assert!(
                jinja.contains(what),
                "{d:?}: engine `{engine}`, template `{jinja}`"
            );
        } else {
            assert!(jinja.contains("followed by a user"), "{d:?}: {jinja}");
        }
    }
}
