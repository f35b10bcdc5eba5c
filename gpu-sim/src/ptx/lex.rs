//! PTX text to tokens, each with its 1-based line (errors and `.loc`-less faults name it).

use super::LoadError;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    /// Names, opcodes, directives (`.reg`), registers (`%r1`), labels (`$L__BB0_2`).
    Ident(String),
    /// An integer literal (decimal, hex, octal or binary), without its sign.
    Int(u64),
    /// `0fXXXXXXXX`: the bits of an f32.
    F32(u32),
    /// `0dXXXXXXXXXXXXXXXX`: the bits of an f64.
    F64(u64),
    /// A decimal floating-point literal (`1.5`, `2e-3`).
    Dec(f64),
    Str(String),
    Punct(char),
}

#[derive(Clone, Debug)]
pub struct Token {
    pub tok: Tok,
    pub line: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || matches!(c, b'_' | b'$' | b'%' | b'.')
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'%' | b'.')
}

pub fn lex(text: &str) -> Result<Vec<Token>, LoadError> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(text.len() / 4);
    let mut i = 0;
    let mut line = 1;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
            continue;
        }
        if c == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\n' {
                    return Err(LoadError {
                        line,
                        message: "unterminated string".into(),
                    });
                }
                i += 1;
            }
            out.push(Token {
                tok: Tok::Str(text[start..i].to_string()),
                line,
            });
            i += 1;
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                // exponent sign of a decimal float
                if (b[i] == b'e' || b[i] == b'E')
                    && matches!(b.get(i + 1), Some(b'-') | Some(b'+'))
                    && !text[start..i].starts_with("0x")
                    && !text[start..i].starts_with("0f")
                    && !text[start..i].starts_with("0d")
                {
                    i += 2;
                    continue;
                }
                i += 1;
            }
            let s = &text[start..i];
            let tok = number(s).ok_or_else(|| LoadError {
                line,
                message: format!("bad number `{s}`"),
            })?;
            out.push(Token { tok, line });
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident_char(b[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(text[start..i].to_string()),
                line,
            });
            continue;
        }
        if b"{}[]()<>,;:+-|@!=*".contains(&c) {
            out.push(Token {
                tok: Tok::Punct(c as char),
                line,
            });
            i += 1;
            continue;
        }
        return Err(LoadError {
            line,
            message: format!("unexpected character `{}`", c as char),
        });
    }
    Ok(out)
}

fn number(s: &str) -> Option<Tok> {
    let lower = s.to_ascii_lowercase();
    let t = lower.trim_end_matches('u');
    if let Some(h) = t.strip_prefix("0f") {
        if h.len() == 8 {
            return u32::from_str_radix(h, 16).ok().map(Tok::F32);
        }
    }
    if let Some(h) = t.strip_prefix("0d") {
        if h.len() == 16 {
            return u64::from_str_radix(h, 16).ok().map(Tok::F64);
        }
    }
    if let Some(h) = t.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).ok().map(Tok::Int);
    }
    if let Some(h) = t.strip_prefix("0b") {
        return u64::from_str_radix(h, 2).ok().map(Tok::Int);
    }
    if t.contains('.') || t.contains('e') {
        return t.parse::<f64>().ok().map(Tok::Dec);
    }
    if t.len() > 1 && t.starts_with('0') {
        return u64::from_str_radix(&t[1..], 8).ok().map(Tok::Int);
    }
    t.parse::<u64>().ok().map(Tok::Int)
}
