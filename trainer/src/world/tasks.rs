//! The tasks: how each is asked (templates), how a prompt is read back (the parser, which is the
//! annotator's understanding of a dialogue), and what its gold answer is.
//!
//! The generator writes prompts from the templates and then *parses its own text* to get the
//! gold answer, so the files and the annotator can never disagree about what a prompt asks.

use super::kb::World;
use super::safety::{Harm, ASK_HOW, REFUSALS};
use super::text::{capitalize, match_template, parse_tokens, render, slot, slot_list, Slots};
use engine::tokenizer::Message;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A knowledge-base attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attr {
    Kind,
    Color,
    Town,
    Food,
    Size,
    Age,
}

impl Attr {
    pub const ALL: [Attr; 6] = [
        Attr::Kind,
        Attr::Color,
        Attr::Town,
        Attr::Food,
        Attr::Size,
        Attr::Age,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Attr::Kind => "kind",
            Attr::Color => "color",
            Attr::Town => "town",
            Attr::Food => "food",
            Attr::Size => "size",
            Attr::Age => "age",
        }
    }

    /// How the attribute is asked about (`{e}` is the entity, or "it" in a follow-up).
    pub fn templates(self) -> &'static [&'static str] {
        match self {
            Attr::Kind => &[
                "What kind of creature is {e}?",
                "What is {e}?",
                "What sort of creature is {e}?",
            ],
            Attr::Color => &[
                "What color is {e}?",
                "What is the color of {e}?",
                "Tell me the color of {e}.",
            ],
            Attr::Town => &[
                "Where does {e} live?",
                "What is the home town of {e}?",
                "In which town does {e} live?",
            ],
            Attr::Food => &[
                "What does {e} like to eat?",
                "What is the favorite food of {e}?",
                "Which food does {e} love?",
            ],
            Attr::Size => &[
                "How big is {e}?",
                "What size is {e}?",
                "Tell me the size of {e}.",
            ],
            Attr::Age => &[
                "How old is {e}?",
                "What is the age of {e}?",
                "Tell me the age of {e}.",
            ],
        }
    }
}

/// What a user turn asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    Add,
    Sub,
    Letters,
    CountWords,
    Reverse,
    Sort,
    Fact(Attr),
    AgeIn,
    HowTo,
    Harm,
}

impl Task {
    /// The `task` field of the data files.
    pub fn name(self) -> &'static str {
        match self {
            Task::Add => "add",
            Task::Sub => "sub",
            Task::Letters => "letters",
            Task::CountWords => "count_words",
            Task::Reverse => "reverse",
            Task::Sort => "sort",
            Task::Fact(_) => "fact",
            Task::AgeIn => "age_in",
            Task::HowTo => "howto",
            Task::Harm => "harm",
        }
    }
}

/// The prompt categories of the paper's data collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Helpfulness,
    Safety,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Helpfulness => "helpfulness",
            Category::Safety => "safety",
        }
    }
}

/// What a correct answer must contain.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// A number, the last one in the answer.
    Number(i64),
    /// A word sequence in this order.
    Words(Vec<String>),
    /// One attribute value; `others` are the wrong values of the same attribute.
    Value { value: String, others: Vec<String> },
    /// A how-to answer: key phrases a helpful answer mentions.
    Text { keys: Vec<String> },
    /// A refusal: the request is harmful (`harm` indexes `World::harms`; `action` is the
    /// request with its slot filled; `fill` is the entity or town in the slot, if any).
    Refuse {
        harm: usize,
        action: String,
        fill: Option<String>,
    },
}

/// The annotator's reading of one user turn: task, content key and gold answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Gold {
    pub task: Task,
    /// The content of the request, independent of phrasing for most tasks ("add:5:7"); the
    /// train/held-out split is made on it.
    pub key: String,
    pub spec: Spec,
    /// The gold answer as a full sentence (for harmful requests: the first refusal template).
    pub plain: String,
    /// The bare answer, at most four words (for "answer in at most N words").
    pub core: String,
    /// A benign request that sounds dangerous.
    pub borderline: bool,
}

impl Gold {
    pub fn category(&self) -> Category {
        match self.spec {
            Spec::Refuse { .. } => Category::Safety,
            _ => Category::Helpfulness,
        }
    }
}

/// What earlier turns established, for follow-ups ("and now add 3", "where does it live?").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context {
    pub entity: Option<usize>,
    pub number: Option<i64>,
    pub list: Option<Vec<String>>,
}

pub(crate) const ADD: &[&str] = &[
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What do you get if you add {a} and {b}?",
    "How much is {a} plus {b}?",
];
pub(crate) const SUB: &[&str] = &[
    "What is {a} minus {b}?",
    "What is {a} - {b}?",
    "Subtract {b} from {a}.",
    "Take {b} away from {a}.",
    "How much is {a} minus {b}?",
];
pub(crate) const ADD_MORE: &[&str] = &[
    "Now add {k}.",
    "Add {k} to that.",
    "Now add {k} more.",
    "Plus {k}?",
];
pub(crate) const SUB_MORE: &[&str] = &[
    "Now subtract {k}.",
    "Take {k} away from that.",
    "Now take away {k}.",
    "Minus {k}?",
];
pub(crate) const LETTERS: &[&str] = &[
    "How many letters are in the word {w}?",
    "How many letters does {w} have?",
    "Count the letters in {w}.",
    "How long is the word {w}?",
];
pub(crate) const COUNT: &[&str] = &[
    "How many words are in this list: {list}?",
    "Count the words: {list}.",
    "How many words are there in: {list}?",
];
pub(crate) const COUNT_MORE: &[&str] = &["How many words is that?", "Count them."];
pub(crate) const REVERSE: &[&str] = &[
    "Reverse these words: {list}.",
    "Say these words in reverse order: {list}.",
    "Reverse the order of: {list}.",
];
pub(crate) const REVERSE_MORE: &[&str] = &["Now reverse them.", "Reverse them."];
pub(crate) const SORT: &[&str] = &[
    "Sort these words: {list}.",
    "Put these words in alphabetical order: {list}.",
    "Sort in abc order: {list}.",
];
pub(crate) const SORT_MORE: &[&str] = &["Now sort them.", "Sort them."];
pub(crate) const AGE_IN: &[&str] = &[
    "How old will {e} be in {k} years?",
    "What age will {e} be in {k} years?",
];

/// Every template of the task language (for the vocabulary).
pub fn all_templates() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = [
        ADD,
        SUB,
        ADD_MORE,
        SUB_MORE,
        LETTERS,
        COUNT,
        COUNT_MORE,
        REVERSE,
        REVERSE_MORE,
        SORT,
        SORT_MORE,
        AGE_IN,
        ASK_HOW,
    ]
    .concat();
    for a in Attr::ALL {
        v.extend(a.templates());
    }
    v.extend([
        "{a} plus {b} is {c}.",
        "{a} minus {b} is {c}.",
        "The word {w} has {n} letters.",
        "There are {n} words in that list.",
        "Reversed, the words are: {list}.",
        "Sorted, the words are: {list}.",
        "In {k} years {e} will be {n}.",
        "The creature {e} is a {v}.",
        "The color of {e} is {v}.",
        "The home town of {e} is {v}.",
        "The favorite food of {e} is {v}.",
        "The size of {e} is {v}.",
        "The age of {e} is {n} years.",
        "And now",
    ]);
    v
}

// Content keys: the train/held-out split is made on these, so the same content asked in another
// phrasing stays on its side of the split.
pub(crate) fn key_add(a: i64, b: i64) -> String {
    format!("add:{}:{}", a.min(b), a.max(b))
}
pub(crate) fn key_sub(a: i64, b: i64) -> String {
    format!("sub:{a}:{b}")
}
pub(crate) fn key_letters(w: &str) -> String {
    format!("letters:{}", w.to_lowercase())
}
pub(crate) fn key_count(list: &[String]) -> String {
    format!("count:{}", list.join(" "))
}
pub(crate) fn key_reverse(list: &[String]) -> String {
    format!("reverse:{}", list.join(" "))
}
pub(crate) fn key_sort(list: &[String]) -> String {
    let mut s = list.to_vec();
    s.sort();
    format!("sort:{}", s.join(" "))
}
pub(crate) fn key_age_in(e: &str, k: i64) -> String {
    format!("age_in:{}:{k}", e.to_lowercase())
}

/// Reads prompts in the world's language: the annotator's understanding of a dialogue.
pub struct Parser {
    pub world: World,
    entities: HashMap<String, usize>,
    towns: HashMap<String, usize>,
}

fn num(s: &str) -> Option<i64> {
    (!s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn try_templates<T>(
    tpls: &[&str],
    toks: &[String],
    mut f: impl FnMut(usize, &Slots) -> Option<T>,
) -> Option<T> {
    tpls.iter()
        .enumerate()
        .find_map(|(i, t)| match_template(t, toks).and_then(|s| f(i, &s)))
}

impl Parser {
    pub fn new(world: World) -> Self {
        let entities = world
            .entities
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.to_lowercase(), i))
            .collect();
        let towns = world
            .towns
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_lowercase(), i))
            .collect();
        Parser {
            world,
            entities,
            towns,
        }
    }

    /// The entity a token names: a name, or "it" for the one the dialogue is about.
    fn entity(&self, tok: &str, ctx: &Context) -> Option<usize> {
        if tok == "it" {
            ctx.entity
        } else {
            self.entities.get(tok).copied()
        }
    }

    /// How a word is written: proper names capitalized, everything else as given.
    pub fn display(&self, w: &str) -> String {
        if let Some(&i) = self.entities.get(w) {
            self.world.entities[i].name.clone()
        } else if let Some(&i) = self.towns.get(w) {
            self.world.towns[i].clone()
        } else {
            w.to_string()
        }
    }

    /// The gold reading of the final user turn of a dialogue (system and assistant turns are
    /// context only: follow-ups are resolved against what the user asked before, never against
    /// what an assistant answered).
    pub fn parse_dialogue(&self, messages: &[Message]) -> Option<Gold> {
        let last_user = messages.iter().rposition(|m| m.role == "user")?;
        if messages[last_user + 1..].iter().any(|m| m.role != "system") {
            return None;
        }
        let mut ctx = Context::default();
        let mut gold = None;
        for m in messages[..=last_user].iter().filter(|m| m.role == "user") {
            gold = self.parse_turn(&m.content, &mut ctx);
        }
        gold
    }

    /// Reads one user turn, updating the dialogue context.
    pub fn parse_turn(&self, text: &str, ctx: &mut Context) -> Option<Gold> {
        let toks = parse_tokens(text);
        let gold = self.parse_tokens(&toks, ctx).or_else(|| {
            (toks.first().map(String::as_str) == Some("and"))
                .then(|| self.parse_tokens(&toks[1..], ctx))
                .flatten()
        })?;
        self.update(&gold, ctx);
        Some(gold)
    }

    fn update(&self, g: &Gold, ctx: &mut Context) {
        match &g.spec {
            Spec::Number(n) => ctx.number = Some(*n),
            Spec::Words(w) => ctx.list = Some(w.clone()),
            _ => {}
        }
        // Counting keeps the counted list as "them" for a follow-up.
        if let Some(list) = g.key.strip_prefix("count:") {
            ctx.list = Some(list.split(' ').map(String::from).collect());
        }
        // Entity-bearing keys: fact:NAME:ATTR, age_in:NAME:K, harm:ID:NAME:P.
        let parts: Vec<&str> = g.key.split(':').collect();
        let name = match (g.task, parts.as_slice()) {
            (Task::Fact(_), [_, n, _]) | (Task::AgeIn, [_, n, _]) => Some(*n),
            (Task::Harm, [_, _, n, _]) => Some(*n),
            _ => None,
        };
        if let Some(i) = name.and_then(|n| self.entities.get(n)) {
            ctx.entity = Some(*i);
        }
    }

    fn parse_tokens(&self, t: &[String], ctx: &Context) -> Option<Gold> {
        if t.is_empty() {
            return None;
        }
        let num2 = |s: &Slots| Some((num(slot(s, "a")?)?, num(slot(s, "b")?)?));
        if let Some(g) = try_templates(ADD, t, |_, s| num2(s).map(|(a, b)| self.add(a, b))) {
            return Some(g);
        }
        if let Some(g) = try_templates(SUB, t, |_, s| num2(s).map(|(a, b)| self.sub(a, b))) {
            return Some(g);
        }
        if let Some(prev) = ctx.number {
            let k = |s: &Slots| num(slot(s, "k")?);
            if let Some(g) = try_templates(ADD_MORE, t, |_, s| k(s).map(|k| self.add(prev, k))) {
                return Some(g);
            }
            if let Some(g) = try_templates(SUB_MORE, t, |_, s| k(s).map(|k| self.sub(prev, k))) {
                return Some(g);
            }
        }
        let alpha = |w: &str| w.chars().all(|c| c.is_alphabetic());
        if let Some(g) = try_templates(LETTERS, t, |_, s| {
            slot(s, "w").filter(|w| alpha(w)).map(|w| self.letters(w))
        }) {
            return Some(g);
        }
        let list = |s: &Slots| slot_list(s, "list").map(|l| l.to_vec());
        if let Some(g) = try_templates(COUNT, t, |_, s| list(s).map(|l| self.count(&l))) {
            return Some(g);
        }
        if let Some(g) = try_templates(REVERSE, t, |_, s| list(s).map(|l| self.reverse(&l))) {
            return Some(g);
        }
        if let Some(g) = try_templates(SORT, t, |_, s| list(s).map(|l| self.sort(&l))) {
            return Some(g);
        }
        if let Some(l) = ctx.list.clone() {
            if let Some(g) = try_templates(COUNT_MORE, t, |_, _| Some(self.count(&l))) {
                return Some(g);
            }
            if let Some(g) = try_templates(REVERSE_MORE, t, |_, _| Some(self.reverse(&l))) {
                return Some(g);
            }
            if let Some(g) = try_templates(SORT_MORE, t, |_, _| Some(self.sort(&l))) {
                return Some(g);
            }
        }
        if let Some(g) = try_templates(AGE_IN, t, |_, s| {
            let e = self.entity(slot(s, "e")?, ctx)?;
            Some(self.age_in(e, num(slot(s, "k")?)?))
        }) {
            return Some(g);
        }
        for a in Attr::ALL {
            if let Some(g) = try_templates(a.templates(), t, |_, s| {
                Some(self.fact(self.entity(slot(s, "e")?, ctx)?, a))
            }) {
                return Some(g);
            }
        }
        try_templates(ASK_HOW, t, |p, s| {
            let act = slot_list(s, "act")?;
            self.harm(act, p, ctx).or_else(|| self.howto(act, p))
        })
    }

    pub(crate) fn add(&self, a: i64, b: i64) -> Gold {
        let c = a + b;
        Gold {
            task: Task::Add,
            key: key_add(a, b),
            spec: Spec::Number(c),
            plain: format!("{a} plus {b} is {c}."),
            core: format!("{c}."),
            borderline: false,
        }
    }

    pub(crate) fn sub(&self, a: i64, b: i64) -> Gold {
        let c = a - b;
        Gold {
            task: Task::Sub,
            key: key_sub(a, b),
            spec: Spec::Number(c),
            plain: format!("{a} minus {b} is {c}."),
            core: format!("{c}."),
            borderline: false,
        }
    }

    pub(crate) fn letters(&self, w: &str) -> Gold {
        let n = w.chars().count() as i64;
        let unit = if n == 1 { "letter" } else { "letters" };
        Gold {
            task: Task::Letters,
            key: key_letters(w),
            spec: Spec::Number(n),
            plain: format!("The word {} has {n} {unit}.", self.display(w)),
            core: format!("{n}."),
            borderline: false,
        }
    }

    pub(crate) fn count(&self, l: &[String]) -> Gold {
        let n = l.len() as i64;
        let plain = if n == 1 {
            "There is 1 word in that list.".to_string()
        } else {
            format!("There are {n} words in that list.")
        };
        Gold {
            task: Task::CountWords,
            key: key_count(l),
            spec: Spec::Number(n),
            plain,
            core: format!("{n}."),
            borderline: false,
        }
    }

    fn words_gold(&self, task: Task, key: String, out: Vec<String>, lead: &str) -> Gold {
        let shown: Vec<String> = out.iter().map(|w| self.display(w)).collect();
        Gold {
            task,
            key,
            plain: format!("{lead}, the words are: {}.", shown.join(" ")),
            core: format!("{}.", capitalize(&shown.join(" "))),
            spec: Spec::Words(out),
            borderline: false,
        }
    }

    pub(crate) fn reverse(&self, l: &[String]) -> Gold {
        let out: Vec<String> = l.iter().rev().cloned().collect();
        self.words_gold(Task::Reverse, key_reverse(l), out, "Reversed")
    }

    pub(crate) fn sort(&self, l: &[String]) -> Gold {
        let mut out = l.to_vec();
        out.sort();
        self.words_gold(Task::Sort, key_sort(l), out, "Sorted")
    }

    pub(crate) fn age_in(&self, e: usize, k: i64) -> Gold {
        let ent = &self.world.entities[e];
        let n = ent.age as i64 + k;
        Gold {
            task: Task::AgeIn,
            key: key_age_in(&ent.name, k),
            spec: Spec::Number(n),
            plain: format!("In {k} years {} will be {n}.", ent.name),
            core: format!("{n}."),
            borderline: false,
        }
    }

    pub(crate) fn fact(&self, e: usize, a: Attr) -> Gold {
        let w = &self.world;
        let ent = &w.entities[e];
        let name = &ent.name;
        let key = format!("fact:{}:{}", name.to_lowercase(), a.as_str());
        let value = |v: &str, dom: &[String], plain: String| {
            let others = dom
                .iter()
                .filter(|d| d.as_str() != v)
                .map(|d| d.to_lowercase())
                .collect();
            Gold {
                task: Task::Fact(a),
                key: key.clone(),
                spec: Spec::Value {
                    value: v.to_lowercase(),
                    others,
                },
                core: format!("{}.", capitalize(v)),
                plain,
                borderline: false,
            }
        };
        match a {
            Attr::Kind => value(
                &ent.kind,
                &w.kinds,
                format!("The creature {name} is a {}.", ent.kind),
            ),
            Attr::Color => value(
                &ent.color,
                &w.colors,
                format!("The color of {name} is {}.", ent.color),
            ),
            Attr::Town => value(
                &ent.town,
                &w.towns,
                format!("The home town of {name} is {}.", ent.town),
            ),
            Attr::Food => value(
                &ent.food,
                &w.foods,
                format!("The favorite food of {name} is {}.", ent.food),
            ),
            Attr::Size => value(
                &ent.size,
                &w.sizes,
                format!("The size of {name} is {}.", ent.size),
            ),
            Attr::Age => Gold {
                task: Task::Fact(a),
                key,
                spec: Spec::Number(ent.age as i64),
                plain: format!("The age of {name} is {} years.", ent.age),
                core: format!("{}.", ent.age),
                borderline: false,
            },
        }
    }

    fn harm(&self, act: &[String], phrasing: usize, ctx: &Context) -> Option<Gold> {
        for (i, h) in self.world.harms.iter().enumerate() {
            let Some(s) = match_template(&h.action, act) else {
                continue;
            };
            let fill = if let Some(e) = slot(&s, "e") {
                Some(self.world.entities[self.entity(e, ctx)?].name.clone())
            } else if let Some(t) = slot(&s, "t") {
                Some(self.world.towns[*self.towns.get(t)?].clone())
            } else {
                None
            };
            let filled = fill_slots(&h.action, fill.as_deref());
            let slot_key = fill.as_deref().unwrap_or("-").to_lowercase();
            return Some(Gold {
                task: Task::Harm,
                key: format!("harm:{}:{slot_key}:{phrasing}", h.id),
                plain: refusal(0, &filled, h),
                core: "I will not help.".into(),
                spec: Spec::Refuse {
                    harm: i,
                    action: filled,
                    fill,
                },
                borderline: false,
            });
        }
        None
    }

    fn howto(&self, act: &[String], phrasing: usize) -> Option<Gold> {
        let h = self
            .world
            .howtos
            .iter()
            .find(|h| parse_tokens(&h.action) == act)?;
        Some(Gold {
            task: Task::HowTo,
            key: format!("howto:{}:{phrasing}", h.id),
            spec: Spec::Text {
                keys: h.keys.clone(),
            },
            plain: h.answer.clone(),
            core: h.short.clone(),
            borderline: h.borderline,
        })
    }
}

/// Refusal template `i` for a harm, its action already filled in.
pub fn refusal(i: usize, action: &str, h: &Harm) -> String {
    render(
        REFUSALS[i % REFUSALS.len()],
        &[("a", action), ("r", &h.reason)],
    )
}

/// A harm's action or compliance text with its `{e}`/`{t}` slot filled.
pub fn fill_slots(text: &str, fill: Option<&str>) -> String {
    match fill {
        Some(f) => text.replace("{e}", f).replace("{t}", f),
        None => text.to_string(),
    }
}
