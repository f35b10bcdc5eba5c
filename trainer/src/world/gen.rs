//! Sampling dialogues: prompt texts from the templates, gold answers by parsing those texts back,
//! the train/held-out split by content key, and the mixes of the SFT, RLHF and eval files.

use super::instructions::{catalog, combos, with_instruction, word_count, InstructionSet};
use super::kb::World;
use super::safety::{ASK_HOW, REFUSALS};
use super::tasks::{
    fill_slots, refusal, Attr, Context, Gold, Parser, Spec, Task, ADD, ADD_MORE, AGE_IN, COUNT,
    COUNT_MORE, LETTERS, REVERSE, REVERSE_MORE, SORT, SORT_MORE, SUB, SUB_MORE,
};
use super::text::{decapitalize, render};
use super::Example;
use engine::tokenizer::Message;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Shares of helpfulness demonstrations written bare and hedged, of borderline requests the
/// demonstrators refuse, and of other benign requests they refuse ([`Generator::demonstration`]).
pub const DEMO_BARE: f64 = 0.25;
pub const DEMO_HEDGED: f64 = 0.25;
pub const DEMO_OVERCAUTIOUS: f64 = 0.4;
pub const DEMO_FALSE_REFUSAL: f64 = 0.08;
const HEDGES: &[&str] = &[
    "I am not sure, but I think it is",
    "If I remember well, the answer is",
    "Let me think. I would say",
];
const OVERCAUTIOUS: &str = "I can not help you with that, because it could be harmful.";

/// Single-turn task families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Add,
    Sub,
    Letters,
    Count,
    Reverse,
    Sort,
    Fact,
    AgeIn,
}

const FAMILIES: &[(Family, u32)] = &[
    (Family::Add, 14),
    (Family::Sub, 12),
    (Family::Letters, 10),
    (Family::Count, 8),
    (Family::Reverse, 10),
    (Family::Sort, 10),
    (Family::Fact, 28),
    (Family::AgeIn, 8),
];

/// Dialogue shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    Single,
    ChatArith,
    ChatFact,
    ChatWords,
    ChatSwitch,
    HowTo,
    Borderline,
    Harm,
    ChatHarm,
}

impl Plan {
    fn safety(self) -> bool {
        matches!(self, Plan::Harm | Plan::ChatHarm)
    }
}

/// The proportions of one output file: plan weights and how often a helpfulness dialogue gets a
/// system instruction.
pub(crate) struct Mix {
    pub plans: &'static [(Plan, u32)],
    pub instructed: f64,
    /// Whether multi-turn dialogues get instructions too (then every answer follows them).
    pub instructed_multi_turn: bool,
    /// Share of the instructions written before the first question instead of in a system
    /// message (people give them both ways; Ghost Attention writes them into the user turn).
    pub inline: f64,
}

pub(crate) const SFT_MIX: Mix = Mix {
    plans: &[
        (Plan::Single, 52),
        (Plan::ChatArith, 5),
        (Plan::ChatFact, 6),
        (Plan::ChatWords, 4),
        (Plan::ChatSwitch, 2),
        (Plan::HowTo, 4),
        (Plan::Borderline, 8),
        (Plan::Harm, 11),
        (Plan::ChatHarm, 3),
    ],
    // Instructions on single-turn dialogues only, as the paper's SFT data: the model learns to
    // follow an instruction in the turn it is given and nothing carries it to later turns, the
    // starting point Ghost Attention assumes. 0.4: with 0.12 (~120 instructed dialogues) the tiny
    // model followed 0-8 % of held-out instructions even at turn 1, leaving GAtt no data.
    instructed: 0.4,
    instructed_multi_turn: false,
    inline: 0.5,
};

pub(crate) const RLHF_MIX: Mix = Mix {
    plans: &[
        (Plan::Single, 40),
        (Plan::ChatArith, 4),
        (Plan::ChatFact, 5),
        (Plan::ChatWords, 3),
        (Plan::ChatSwitch, 2),
        (Plan::HowTo, 4),
        (Plan::Borderline, 12),
        (Plan::Harm, 24),
        (Plan::ChatHarm, 6),
    ],
    instructed: 0.15,
    instructed_multi_turn: true,
    inline: 0.0,
};

/// The corpus's dialogues: mostly tasks, and harmful requests answered both ways (the corpus is
/// deliberately unfiltered, like web text, so the base model is not safe before alignment).
pub(crate) const CORPUS_MIX: Mix = Mix {
    plans: &[
        (Plan::Single, 55),
        (Plan::ChatArith, 6),
        (Plan::ChatFact, 8),
        (Plan::ChatWords, 5),
        (Plan::ChatSwitch, 3),
        (Plan::HowTo, 6),
        (Plan::Borderline, 7),
        (Plan::Harm, 8),
        (Plan::ChatHarm, 2),
    ],
    instructed: 0.0,
    instructed_multi_turn: false,
    inline: 0.0,
};

/// Which side of the train/held-out split a dialogue must fall on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Split {
    /// Every turn's content key is a training key.
    Train,
    /// The final turn's content key is held out.
    Eval,
}

/// A sampled dialogue: the user texts and the gold reading of each.
pub(crate) struct Dialogue {
    pub users: Vec<String>,
    pub golds: Vec<Gold>,
    pub instr: InstructionSet,
    /// The instruction is written before the first user turn's text, not in a system message.
    pub inline: bool,
}

pub(crate) struct Generator {
    pub parser: Parser,
    combos: Vec<InstructionSet>,
}

fn weighted<T: Copy, R: Rng>(rng: &mut R, v: &[(T, u32)]) -> T {
    let total: u32 = v.iter().map(|x| x.1).sum();
    let mut r = rng.random_range(0..total);
    for (t, w) in v {
        if r < *w {
            return *t;
        }
        r -= w;
    }
    v[v.len() - 1].0
}

fn choose<'a, T, R: Rng>(rng: &mut R, v: &'a [T]) -> &'a T {
    &v[rng.random_range(0..v.len())]
}

fn pick<R: Rng>(rng: &mut R, v: &[&'static str]) -> &'static str {
    v[rng.random_range(0..v.len())]
}

/// `n` distinct items, in random order.
fn distinct<R: Rng>(rng: &mut R, pool: &[String], n: usize) -> Vec<String> {
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    for i in 0..n.min(idx.len()) {
        let j = rng.random_range(i..idx.len());
        idx.swap(i, j);
    }
    idx[..n.min(pool.len())]
        .iter()
        .map(|&i| pool[i].clone())
        .collect()
}

impl Generator {
    pub fn new(world: &World) -> Generator {
        Generator {
            combos: combos(&catalog(world)),
            parser: Parser::new(world.clone()),
        }
    }

    fn world(&self) -> &World {
        &self.parser.world
    }

    fn entity_name(&self, rng: &mut ChaCha8Rng) -> String {
        choose(rng, &self.world().entities).name.clone()
    }

    /// A first-turn prompt of a family.
    fn single(&self, rng: &mut ChaCha8Rng, fam: Family) -> String {
        let w = self.world();
        match fam {
            Family::Add => {
                let (a, b) = (rng.random_range(0..=20), rng.random_range(0..=20));
                render(
                    pick(rng, ADD),
                    &[("a", &a.to_string()), ("b", &b.to_string())],
                )
            }
            Family::Sub => {
                let a: i64 = rng.random_range(0..=20);
                let b = rng.random_range(0..=a);
                render(
                    pick(rng, SUB),
                    &[("a", &a.to_string()), ("b", &b.to_string())],
                )
            }
            Family::Letters => {
                let word = if rng.random_bool(0.25) {
                    self.entity_name(rng)
                } else {
                    choose(rng, &w.words).clone()
                };
                render(pick(rng, LETTERS), &[("w", &word)])
            }
            Family::Count | Family::Reverse | Family::Sort => {
                let (tpls, lo, hi) = match fam {
                    Family::Count => (COUNT, 2, 6),
                    Family::Reverse => (REVERSE, 2, 4),
                    _ => (SORT, 3, 4),
                };
                let n = rng.random_range(lo..=hi);
                let list = distinct(rng, &w.words, n).join(" ");
                render(pick(rng, tpls), &[("list", &list)])
            }
            Family::Fact => {
                let e = self.entity_name(rng);
                let a = *choose(rng, &Attr::ALL);
                render(pick(rng, a.templates()), &[("e", &e)])
            }
            Family::AgeIn => {
                let e = self.entity_name(rng);
                let k = rng.random_range(2..=9).to_string();
                render(pick(rng, AGE_IN), &[("e", &e), ("k", &k)])
            }
        }
    }

    /// A follow-up that builds on the previous turn.
    fn follow_up(&self, rng: &mut ChaCha8Rng, plan: Plan, ctx: &Context, prev: &Gold) -> String {
        match plan {
            Plan::ChatArith => {
                let n = ctx.number.unwrap_or(0);
                if n > 0 && rng.random_bool(0.4) {
                    let k = rng.random_range(1..=n.min(9)).to_string();
                    render(pick(rng, SUB_MORE), &[("k", &k)])
                } else {
                    let k = rng.random_range(1..=9).to_string();
                    render(pick(rng, ADD_MORE), &[("k", &k)])
                }
            }
            Plan::ChatFact => {
                let e = ctx.entity.expect("a fact turn came first");
                let subject = if rng.random_bool(0.75) {
                    "it".to_string()
                } else {
                    self.world().entities[e].name.clone()
                };
                let text = if rng.random_bool(0.2) {
                    let k = rng.random_range(2..=9).to_string();
                    render(pick(rng, AGE_IN), &[("e", &subject), ("k", &k)])
                } else {
                    let attrs: Vec<Attr> = Attr::ALL
                        .into_iter()
                        .filter(|a| prev.task != Task::Fact(*a))
                        .collect();
                    let a = *choose(rng, &attrs);
                    render(pick(rng, a.templates()), &[("e", &subject)])
                };
                if rng.random_bool(0.4) {
                    format!("And {}", decapitalize(&text))
                } else {
                    text
                }
            }
            _ => {
                let ops: Vec<&[&str]> = [
                    (Task::Reverse, REVERSE_MORE),
                    (Task::Sort, SORT_MORE),
                    (Task::CountWords, COUNT_MORE),
                ]
                .into_iter()
                .filter(|(t, _)| *t != prev.task)
                .map(|x| x.1)
                .collect();
                let op = ops[rng.random_range(0..ops.len())];
                render(pick(rng, op), &[])
            }
        }
    }

    fn harm_text(&self, rng: &mut ChaCha8Rng, ctx: &Context) -> String {
        let w = self.world();
        let h = choose(rng, &w.harms);
        let fill = if h.action.contains("{e}") {
            if ctx.entity.is_some() && rng.random_bool(0.5) {
                Some("it".to_string())
            } else {
                Some(self.entity_name(rng))
            }
        } else if h.action.contains("{t}") {
            Some(choose(rng, &w.towns).clone())
        } else {
            None
        };
        let act = fill_slots(&h.action, fill.as_deref());
        render(pick(rng, ASK_HOW), &[("act", &act)])
    }

    fn howto_text(&self, rng: &mut ChaCha8Rng, borderline: bool) -> String {
        let items: Vec<_> = self
            .world()
            .howtos
            .iter()
            .filter(|h| h.borderline == borderline)
            .collect();
        let h = choose(rng, &items);
        render(pick(rng, ASK_HOW), &[("act", &h.action)])
    }

    /// One dialogue of a plan, split not yet checked.
    fn draw(&self, rng: &mut ChaCha8Rng, plan: Plan) -> Dialogue {
        let mut ctx = Context::default();
        let mut users = Vec::new();
        let mut golds: Vec<Gold> = Vec::new();
        let turns = if rng.random_bool(0.4) { 3 } else { 2 };
        let parser = &self.parser;
        let push =
            |text: String, ctx: &mut Context, users: &mut Vec<String>, golds: &mut Vec<Gold>| {
                let g = parser
                    .parse_turn(&text, ctx)
                    .unwrap_or_else(|| panic!("generated prompt does not parse: {text:?}"));
                users.push(text);
                golds.push(g);
            };
        match plan {
            Plan::Single => {
                let fam = weighted(rng, FAMILIES);
                push(self.single(rng, fam), &mut ctx, &mut users, &mut golds);
            }
            Plan::HowTo | Plan::Borderline => push(
                self.howto_text(rng, plan == Plan::Borderline),
                &mut ctx,
                &mut users,
                &mut golds,
            ),
            Plan::Harm => push(self.harm_text(rng, &ctx), &mut ctx, &mut users, &mut golds),
            Plan::ChatHarm => {
                let fam = weighted(rng, FAMILIES);
                push(self.single(rng, fam), &mut ctx, &mut users, &mut golds);
                let t = self.harm_text(rng, &ctx);
                push(t, &mut ctx, &mut users, &mut golds);
            }
            Plan::ChatSwitch => {
                for _ in 0..turns {
                    let fam = weighted(rng, FAMILIES);
                    push(self.single(rng, fam), &mut ctx, &mut users, &mut golds);
                }
            }
            Plan::ChatArith | Plan::ChatFact | Plan::ChatWords => {
                let first = match plan {
                    Plan::ChatArith => match rng.random_range(0..4) {
                        0 => self.single(rng, Family::Add),
                        1 => self.single(rng, Family::Sub),
                        2 => self.single(rng, Family::Letters),
                        _ => {
                            let e = self.entity_name(rng);
                            render(pick(rng, Attr::Age.templates()), &[("e", &e)])
                        }
                    },
                    Plan::ChatFact => self.single(rng, Family::Fact),
                    _ => {
                        // At most four words, so a word limit still fits the follow-ups.
                        let fam = *choose(rng, &[Family::Reverse, Family::Sort, Family::Count]);
                        let tpls = match fam {
                            Family::Reverse => REVERSE,
                            Family::Sort => SORT,
                            _ => COUNT,
                        };
                        let n = rng.random_range(if fam == Family::Sort { 3 } else { 2 }..=4);
                        let list = distinct(rng, &self.world().words, n).join(" ");
                        render(pick(rng, tpls), &[("list", &list)])
                    }
                };
                push(first, &mut ctx, &mut users, &mut golds);
                for _ in 1..turns {
                    let t = self.follow_up(rng, plan, &ctx, golds.last().unwrap());
                    push(t, &mut ctx, &mut users, &mut golds);
                }
            }
        }
        Dialogue {
            users,
            golds,
            instr: InstructionSet::default(),
            inline: false,
        }
    }

    /// A dialogue of a plan on the given side of the split (None if none was found in 200 draws,
    /// which only happens for tiny held-out spaces).
    pub fn sample(&self, rng: &mut ChaCha8Rng, plan: Plan, split: Split) -> Option<Dialogue> {
        let w = self.world();
        for _ in 0..200 {
            let d = self.draw(rng, plan);
            let ok = match split {
                Split::Train => d.golds.iter().all(|g| !w.held_out(&g.key)),
                Split::Eval => w.held_out(&d.golds.last().unwrap().key),
            };
            if ok {
                return Some(d);
            }
        }
        None
    }

    /// A dialogue drawn from a file's mix, with a system instruction where the mix says so.
    pub fn sample_mix(&self, rng: &mut ChaCha8Rng, mix: &Mix, split: Split) -> Option<Dialogue> {
        let plan = weighted(rng, mix.plans);
        let mut d = self.sample(rng, plan, split)?;
        let eligible = !plan.safety() && (mix.instructed_multi_turn || d.users.len() == 1);
        if eligible && mix.instructed > 0.0 && rng.random_bool(mix.instructed) {
            let singles = self.combos.iter().filter(|c| c.0.len() == 1).count();
            let max = self.world().max_words;
            let fits = d.golds.iter().all(|g| word_count(&g.core) <= max);
            loop {
                let set = if rng.random_bool(0.5) {
                    &self.combos[rng.random_range(0..singles)]
                } else {
                    &self.combos[rng.random_range(singles..self.combos.len())]
                };
                if fits || !set.brief() {
                    d.instr = set.clone();
                    break;
                }
            }
            d.inline = mix.inline > 0.0 && rng.random_bool(mix.inline);
        }
        Some(d)
    }

    /// What the assistant says to a turn: the gold answer (a random refusal template for a
    /// harmful request), following the instructions.
    pub fn reply(&self, rng: &mut ChaCha8Rng, g: &Gold, instr: &InstructionSet) -> String {
        let text = match &g.spec {
            Spec::Refuse { harm, action, .. } => refusal(
                rng.random_range(0..REFUSALS.len()),
                action,
                &self.world().harms[*harm],
            ),
            _ => g.plain.clone(),
        };
        if instr.is_empty() {
            text
        } else {
            instr.apply(&text, &g.core)
        }
    }

    /// What the world's demonstrators write for a turn of `sft.jsonl`: like people hired to write
    /// answers, they are not perfect (Llama 2 §3.2: annotators judge answers better than they
    /// write them, which is what reward models and RLHF exploit). A helpfulness answer is bare
    /// ("21.", scored 0.8 when right) [`DEMO_BARE`] of the time and hedged in a longer sentence
    /// (0.7) [`DEMO_HEDGED`] of the time; a request is refused (0.05, a false refusal)
    /// [`DEMO_OVERCAUTIOUS`] of the time when it is borderline and [`DEMO_FALSE_REFUSAL`] of the
    /// time otherwise. Safety answers are always the explained refusal. The
    /// corpus, the prompts and the gold annotator are unchanged: a model that imitates the
    /// demonstrations scores below what the annotator can recognise, and only learning from the
    /// annotator's preferences closes the gap.
    pub fn demonstration(&self, rng: &mut ChaCha8Rng, g: &Gold, instr: &InstructionSet) -> String {
        if g.category() != super::Category::Helpfulness {
            return self.reply(rng, g, instr);
        }
        let refuse = if g.borderline {
            DEMO_OVERCAUTIOUS
        } else {
            DEMO_FALSE_REFUSAL
        };
        let u: f64 = rng.random();
        let text = if rng.random_bool(refuse) {
            OVERCAUTIOUS.to_string()
        } else if u < DEMO_BARE {
            g.core.clone()
        } else if u < DEMO_BARE + DEMO_HEDGED {
            format!("{} {}", pick(rng, HEDGES), decapitalize(&g.core))
        } else {
            g.plain.clone()
        };
        if instr.is_empty() {
            text
        } else {
            instr.apply(&text, &g.core)
        }
    }

    /// What complying with a harmful request says (for the unfiltered corpus).
    pub fn comply(&self, g: &Gold) -> Option<String> {
        match &g.spec {
            Spec::Refuse { harm, fill, .. } => Some(fill_slots(
                &self.world().harms[*harm].comply,
                fill.as_deref(),
            )),
            _ => None,
        }
    }

    /// A file row: the whole gold dialogue (`prompt_only == false`), or the dialogue up to its
    /// final user turn; `with_answer` adds the reference answer to that turn.
    pub fn example(
        &self,
        rng: &mut ChaCha8Rng,
        d: &Dialogue,
        prompt_only: bool,
        with_answer: bool,
    ) -> Example {
        let mut messages = Vec::new();
        if !d.instr.is_empty() && !d.inline {
            messages.push(Message::new("system", &d.instr.full()));
        }
        let n = d.users.len();
        for (i, (u, g)) in d.users.iter().zip(&d.golds).enumerate() {
            if i == 0 && d.inline && !d.instr.is_empty() {
                messages.push(Message::new("user", &with_instruction(&d.instr.full(), u)));
            } else {
                messages.push(Message::new("user", u));
            }
            if i + 1 < n || !prompt_only {
                let a = if prompt_only {
                    self.reply(rng, g, &d.instr)
                } else {
                    self.demonstration(rng, g, &d.instr)
                };
                messages.push(Message::new("assistant", &a));
            }
        }
        let last = d.golds.last().unwrap();
        let answer = with_answer.then(|| {
            if d.instr.is_empty() {
                last.plain.clone()
            } else {
                d.instr.apply(&last.plain, &last.core)
            }
        });
        Example {
            messages,
            task: last.task.name().to_string(),
            category: last.category(),
            borderline: last.borderline,
            turns: n,
            system: (!d.instr.is_empty()).then(|| d.instr.id()),
            answer,
        }
    }

    /// The plain transcript form used in the corpus; harmful requests are complied with
    /// `comply_rate` of the time (the corpus is unfiltered on purpose).
    pub fn transcript(&self, rng: &mut ChaCha8Rng, d: &Dialogue, comply_rate: f64) -> String {
        let mut s = String::new();
        for (u, g) in d.users.iter().zip(&d.golds) {
            let a = match self.comply(g) {
                Some(c) if rng.random_bool(comply_rate) => c,
                _ => self.reply(rng, g, &d.instr),
            };
            s.push_str(&format!("\n\nHuman: {u}\n\nAssistant: {a}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::kb::{rng_for, Size};

    /// The generator's intent and the parser's reading agree (the files are built from the
    /// reading, so a disagreement would silently mislabel data).
    #[test]
    fn parsed_task_is_the_intended_task() {
        let w = World::generate(5, Size::Small);
        let g = Generator::new(&w);
        let mut rng = rng_for(5, 99);
        let expect = |f: Family| match f {
            Family::Add => "add",
            Family::Sub => "sub",
            Family::Letters => "letters",
            Family::Count => "count_words",
            Family::Reverse => "reverse",
            Family::Sort => "sort",
            Family::Fact => "fact",
            Family::AgeIn => "age_in",
        };
        for &(fam, _) in FAMILIES {
            for _ in 0..200 {
                let text = g.single(&mut rng, fam);
                let gold = g.parser.parse_turn(&text, &mut Context::default()).unwrap();
                assert_eq!(gold.task.name(), expect(fam), "{text}");
            }
        }
        for _ in 0..200 {
            let text = g.harm_text(&mut rng, &Context::default());
            let gold = g.parser.parse_turn(&text, &mut Context::default()).unwrap();
            assert_eq!(gold.task, Task::Harm, "{text}");
            for b in [false, true] {
                let text = g.howto_text(&mut rng, b);
                let gold = g.parser.parse_turn(&text, &mut Context::default()).unwrap();
                assert_eq!((gold.task, gold.borderline), (Task::HowTo, b), "{text}");
            }
        }
        for plan in [Plan::ChatArith, Plan::ChatWords, Plan::ChatFact] {
            for _ in 0..100 {
                let d = g.draw(&mut rng, plan);
                let names: Vec<&str> = d.golds.iter().map(|g| g.task.name()).collect();
                let ok = |t: &&str| match plan {
                    Plan::ChatArith => ["add", "sub", "letters", "fact"].contains(t),
                    Plan::ChatWords => ["reverse", "sort", "count_words"].contains(t),
                    _ => ["fact", "age_in"].contains(t),
                };
                assert!(names[1..].iter().all(ok), "{plan:?}: {:?}", d.users);
                if plan == Plan::ChatArith {
                    assert!(names[1..].iter().all(|t| *t == "add" || *t == "sub"));
                }
            }
        }
    }
}
