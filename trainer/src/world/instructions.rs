//! System instructions for Ghost Attention: each has a full and a short rendering (GAtt shortens
//! the instruction half of the time), a checker, and a transform that turns a correct plain answer
//! into one that follows it. Sets combine at most two compatible instructions.

use super::text::{capitalize, contains_seq, decapitalize, strip_end_punct, words};
use super::World;
use serde::{Deserialize, Serialize};

/// A user message carrying an instruction: the instruction first, as a system prompt precedes the
/// user text in Llama 2's template. The annotator reads instructions from user turns as well.
pub fn with_instruction(instruction: &str, user: &str) -> String {
    format!("{} {}", instruction.trim(), user.trim())
}

/// One system instruction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Instruction {
    /// Every letter uppercase.
    Uppercase,
    /// Every letter lowercase.
    Lowercase,
    /// The first word of every answer is `word`.
    StartWith { word: String },
    /// The last word of every answer is `word`.
    EndWith { word: String },
    /// Speak as a persona: every answer contains its catchword `marker` ("arr" for a pirate).
    Persona { name: String, marker: String },
    /// Every answer has at most `n` words.
    MaxWords { n: usize },
}

impl Instruction {
    /// A stable id: `upper`, `lower`, `start:WORD`, `end:WORD`, `persona:NAME`, `max_words:N`.
    pub fn id(&self) -> String {
        match self {
            Instruction::Uppercase => "upper".into(),
            Instruction::Lowercase => "lower".into(),
            Instruction::StartWith { word } => format!("start:{word}"),
            Instruction::EndWith { word } => format!("end:{word}"),
            Instruction::Persona { name, .. } => format!("persona:{name}"),
            Instruction::MaxWords { n } => format!("max_words:{n}"),
        }
    }

    /// The full instruction text.
    pub fn full(&self) -> String {
        match self {
            Instruction::Uppercase => "Always answer in uppercase letters.".into(),
            Instruction::Lowercase => "Always answer in lowercase letters.".into(),
            Instruction::StartWith { word } => {
                format!("Start every answer with the word '{word}'.")
            }
            Instruction::EndWith { word } => format!("End every answer with the word '{word}'."),
            Instruction::Persona { name, marker } => {
                format!("Speak like a {name} in every answer and always say '{marker}'.")
            }
            Instruction::MaxWords { n } => format!("Answer in at most {n} words."),
        }
    }

    /// The shortened text (the persona's catchword is left out, so it must be remembered).
    pub fn short(&self) -> String {
        match self {
            Instruction::Uppercase => "Uppercase.".into(),
            Instruction::Lowercase => "Lowercase.".into(),
            Instruction::StartWith { word } => format!("Start with '{word}'."),
            Instruction::EndWith { word } => format!("End with '{word}'."),
            Instruction::Persona { name, .. } => format!("Act as a {name}."),
            Instruction::MaxWords { n } => format!("Max {n} words."),
        }
    }

    /// Whether `response` follows the instruction.
    pub fn check(&self, response: &str) -> bool {
        // A bare number ("12.") follows both case instructions.
        let has_text = response.chars().any(|c| c.is_alphanumeric());
        match self {
            Instruction::Uppercase => has_text && !response.chars().any(|c| c.is_lowercase()),
            Instruction::Lowercase => has_text && !response.chars().any(|c| c.is_uppercase()),
            Instruction::StartWith { word } => words(response).first() == Some(word),
            Instruction::EndWith { word } => words(response).last() == Some(word),
            Instruction::Persona { marker, .. } => words(response).contains(marker),
            Instruction::MaxWords { n } => {
                let count = word_count(response);
                count >= 1 && count <= *n
            }
        }
    }

    /// Rank used for canonical order inside a set and for compatibility.
    fn rank(&self) -> u8 {
        match self {
            Instruction::Uppercase | Instruction::Lowercase => 0,
            Instruction::StartWith { .. } => 1,
            Instruction::EndWith { .. } => 2,
            Instruction::Persona { .. } => 3,
            Instruction::MaxWords { .. } => 4,
        }
    }
}

/// Words as a reader counts them: whitespace-separated pieces with a letter or digit.
pub fn word_count(s: &str) -> usize {
    s.split_whitespace()
        .filter(|w| w.chars().any(|c| c.is_alphanumeric()))
        .count()
}

/// Whether two instructions can be followed at once. Case instructions combine with anything but
/// each other; the word limit combines only with a case instruction (decorations would not fit).
pub fn compatible(a: &Instruction, b: &Instruction) -> bool {
    let (x, y) = if a.rank() <= b.rank() { (a, b) } else { (b, a) };
    if x.rank() == y.rank() {
        return false;
    }
    match (x, y) {
        (_, Instruction::MaxWords { .. }) => x.rank() == 0,
        _ => true,
    }
}

/// Zero, one or two compatible instructions, in canonical order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionSet(pub Vec<Instruction>);

impl InstructionSet {
    /// Canonical order; `None` if the instructions are not compatible or more than two.
    pub fn new(mut v: Vec<Instruction>) -> Option<Self> {
        v.sort_by_key(|i| i.rank());
        v.dedup();
        let ok = v.len() <= 2 && (v.len() < 2 || compatible(&v[0], &v[1]));
        ok.then_some(InstructionSet(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ids joined with `+`, e.g. `upper+end:zap`.
    pub fn id(&self) -> String {
        self.0.iter().map(|i| i.id()).collect::<Vec<_>>().join("+")
    }

    /// The system message: full texts joined.
    pub fn full(&self) -> String {
        self.0
            .iter()
            .map(|i| i.full())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The shortened system message.
    pub fn short(&self) -> String {
        self.0
            .iter()
            .map(|i| i.short())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether every instruction is followed.
    pub fn check(&self, response: &str) -> bool {
        self.0.iter().all(|i| i.check(response))
    }

    /// How many instructions the response breaks.
    pub fn failures(&self, response: &str) -> usize {
        self.0.iter().filter(|i| !i.check(response)).count()
    }

    /// Whether the set limits the length (then the bare core answer is the right answer).
    pub fn brief(&self) -> bool {
        self.0
            .iter()
            .any(|i| matches!(i, Instruction::MaxWords { .. }))
    }

    /// Turns a correct plain answer (`plain`, a full sentence) into one that follows every
    /// instruction; `core` is the bare answer (at most four words), used under a word limit.
    pub fn apply(&self, plain: &str, core: &str) -> String {
        let mut s = if self.brief() {
            capitalize(core)
        } else {
            plain.to_string()
        };
        let find = |r: u8| self.0.iter().find(|i| i.rank() == r);
        if let Some(Instruction::Persona { marker, .. }) = find(3) {
            s = format!("{}, {}", capitalize(marker), decapitalize(&s));
        }
        if let Some(Instruction::StartWith { word }) = find(1) {
            s = format!("{}, {}", capitalize(word), decapitalize(&s));
        }
        if let Some(Instruction::EndWith { word }) = find(2) {
            s = format!("{}, {word}.", strip_end_punct(&s));
        }
        match find(0) {
            Some(Instruction::Uppercase) => s.to_uppercase(),
            Some(Instruction::Lowercase) => s.to_lowercase(),
            _ => s,
        }
    }

    /// Reads the instructions out of a system message written in full or short form (any order,
    /// other text around them is ignored). Unknown text gives an empty set.
    pub fn parse(catalog: &[Instruction], system: &str) -> InstructionSet {
        let toks = words(system);
        let found: Vec<Instruction> = catalog
            .iter()
            .filter(|i| {
                contains_seq(&toks, &words(&i.full())) || contains_seq(&toks, &words(&i.short()))
            })
            .cloned()
            .collect();
        InstructionSet::new(found.clone())
            .unwrap_or_else(|| InstructionSet(found.into_iter().take(2).collect()))
    }
}

/// Every single instruction of a world.
pub fn catalog(world: &World) -> Vec<Instruction> {
    let mut v = vec![Instruction::Uppercase, Instruction::Lowercase];
    v.extend(
        world
            .start_words
            .iter()
            .map(|w| Instruction::StartWith { word: w.clone() }),
    );
    v.extend(
        world
            .end_words
            .iter()
            .map(|w| Instruction::EndWith { word: w.clone() }),
    );
    v.extend(world.personas.iter().map(|p| Instruction::Persona {
        name: p.name.clone(),
        marker: p.marker.clone(),
    }));
    v.push(Instruction::MaxWords { n: world.max_words });
    v
}

/// Every usable set: the singles, then every compatible pair.
pub fn combos(catalog: &[Instruction]) -> Vec<InstructionSet> {
    let mut out: Vec<InstructionSet> = catalog
        .iter()
        .map(|i| InstructionSet(vec![i.clone()]))
        .collect();
    for (i, a) in catalog.iter().enumerate() {
        for b in &catalog[i + 1..] {
            if compatible(a, b) {
                out.extend(InstructionSet::new(vec![a.clone(), b.clone()]));
            }
        }
    }
    out
}
