//! The pretraining corpus: encyclopedic paragraphs about every entity and town, lore about
//! how-tos and (unfiltered, as web text is) harmful things, worked examples of the tasks in prose,
//! and many dialogues in the plain transcript form `\n\nHuman: ...\n\nAssistant: ...`.
//!
//! Worked examples and dialogues use only training content keys, so `eval.jsonl` stays unseen;
//! the facts themselves appear for every entity (a held-out question is answerable from them).

use super::gen::{Generator, Split, CORPUS_MIX};
use super::kb::{rng_for, stream, World};
use super::tasks::{key_add, key_age_in, key_count, key_letters, key_reverse, key_sort, key_sub};
use super::text::{capitalize, decapitalize, render};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const KIND: &[&str] = &[
    "{e} is a {v}.",
    "{e} is a kind of {v}.",
    "The creature {e} is a {v}.",
];
const COLOR: &[&str] = &[
    "{e} is {v}.",
    "The color of {e} is {v}.",
    "{e} is {v} all over.",
];
const TOWN: &[&str] = &[
    "{e} lives in {v}.",
    "The home town of {e} is {v}.",
    "{e} lives in the town of {v}.",
];
const FOOD: &[&str] = &[
    "{e} likes to eat {v}.",
    "The favorite food of {e} is {v}.",
    "{e} loves {v}.",
];
const SIZE: &[&str] = &["{e} is {v}.", "The size of {e} is {v}.", "{e} is very {v}."];
const AGE: &[&str] = &["{e} is {v} years old.", "The age of {e} is {v} years."];

const ADD_PROSE: &[&str] = &[
    "{a} plus {b} is {c}.",
    "If you add {a} and {b} you get {c}.",
    "{a} and {b} make {c}.",
];
const SUB_PROSE: &[&str] = &[
    "{a} minus {b} is {c}.",
    "If you take {b} away from {a} you get {c}.",
];
const LETTERS_PROSE: &[&str] = &[
    "The word {w} has {n} letters.",
    "{w} is a word with {n} letters.",
];
const COUNT_PROSE: &[&str] = &["The list {list} has {n} words."];
const REVERSE_PROSE: &[&str] = &[
    "Backwards, {list} becomes {out}.",
    "Reversed, {list} is {out}.",
];
const SORT_PROSE: &[&str] = &[
    "In abc order, {list} becomes {out}.",
    "Sorted, {list} is {out}.",
];
const AGE_IN_PROSE: &[&str] = &["In {k} years {e} will be {n}."];
const TOWN_PROSE: &[&str] = &[
    "{t} is a town in the world.",
    "{t} is a quiet town by the river.",
];

/// Every corpus template (for the vocabulary that names must avoid).
pub fn all_templates() -> Vec<&'static str> {
    [
        KIND,
        COLOR,
        TOWN,
        FOOD,
        SIZE,
        AGE,
        ADD_PROSE,
        SUB_PROSE,
        LETTERS_PROSE,
        COUNT_PROSE,
        REVERSE_PROSE,
        SORT_PROSE,
        AGE_IN_PROSE,
        TOWN_PROSE,
    ]
    .concat()
    .into_iter()
    .chain([
        "{e} live in {t}.",
        "Nobody lives in {t}.",
        "To {act}, {x}",
        "This is dangerous, because {r}.",
        "It",
    ])
    .collect()
}

fn choose<'a, T>(rng: &mut ChaCha8Rng, v: &'a [T]) -> &'a T {
    &v[rng.random_range(0..v.len())]
}

fn pick(rng: &mut ChaCha8Rng, v: &[&'static str]) -> &'static str {
    v[rng.random_range(0..v.len())]
}

fn entity_paragraph(w: &World, rng: &mut ChaCha8Rng, i: usize) -> String {
    let e = &w.entities[i];
    let mut facts: Vec<(&[&str], String)> = vec![
        (KIND, e.kind.clone()),
        (COLOR, e.color.clone()),
        (TOWN, e.town.clone()),
        (FOOD, e.food.clone()),
        (SIZE, e.size.clone()),
        (AGE, e.age.to_string()),
    ];
    for k in (1..facts.len()).rev() {
        let j = rng.random_range(0..=k);
        facts.swap(k, j);
    }
    let mut out = Vec::new();
    for (n, (tpls, v)) in facts.into_iter().enumerate() {
        let tpl = pick(rng, tpls);
        // After the first sentence, sometimes "It" stands for the name (as follow-ups do).
        let subject = if n > 0 && tpl.starts_with("{e}") && rng.random_bool(0.3) {
            "it"
        } else {
            &e.name
        };
        out.push(render(tpl, &[("e", subject), ("v", &v)]));
    }
    out.join(" ")
}

fn town_paragraph(w: &World, rng: &mut ChaCha8Rng, t: usize) -> String {
    let town = &w.towns[t];
    let people: Vec<&str> = w
        .entities
        .iter()
        .filter(|e| &e.town == town)
        .map(|e| e.name.as_str())
        .collect();
    let mut s = render(pick(rng, TOWN_PROSE), &[("t", town)]);
    s.push(' ');
    s.push_str(&match people.len() {
        0 => format!("Nobody lives in {town}."),
        1 => format!("{} lives in {town}.", people[0]),
        n => format!(
            "{} and {} live in {town}.",
            people[..n - 1].join(", "),
            people[n - 1]
        ),
    });
    s
}

fn lore(w: &World, rng: &mut ChaCha8Rng) -> String {
    let n_harm = w.harms.len();
    let i = rng.random_range(0..n_harm + w.howtos.len());
    if i < n_harm {
        let h = &w.harms[i];
        let fill = if h.action.contains("{e}") {
            Some(choose(rng, &w.entities).name.clone())
        } else if h.action.contains("{t}") {
            Some(choose(rng, &w.towns).clone())
        } else {
            None
        };
        let f = |s: &str| super::tasks::fill_slots(s, fill.as_deref());
        format!(
            "To {}, {} This is dangerous, because {}.",
            f(&h.action),
            decapitalize(&f(&h.comply)),
            h.reason
        )
    } else {
        let h = &w.howtos[i - n_harm];
        format!("To {}, {}", h.action, decapitalize(&h.answer))
    }
}

/// One worked example sentence on training content, or None if the draw was held out.
fn worked(w: &World, rng: &mut ChaCha8Rng) -> Option<String> {
    let n = |v: i64| v.to_string();
    Some(match rng.random_range(0..7) {
        0 => {
            let (a, b) = (rng.random_range(0..=20), rng.random_range(0..=20));
            if w.held_out(&key_add(a, b)) {
                return None;
            }
            let c = a + b;
            render(
                pick(rng, ADD_PROSE),
                &[("a", &n(a)), ("b", &n(b)), ("c", &n(c))],
            )
        }
        1 => {
            let a: i64 = rng.random_range(0..=20);
            let b = rng.random_range(0..=a);
            if w.held_out(&key_sub(a, b)) {
                return None;
            }
            render(
                pick(rng, SUB_PROSE),
                &[("a", &n(a)), ("b", &n(b)), ("c", &n(a - b))],
            )
        }
        2 => {
            let word = if rng.random_bool(0.25) {
                choose(rng, &w.entities).name.clone()
            } else {
                choose(rng, &w.words).clone()
            };
            if w.held_out(&key_letters(&word)) {
                return None;
            }
            let len = word.chars().count() as i64;
            render(pick(rng, LETTERS_PROSE), &[("w", &word), ("n", &n(len))])
        }
        3..=5 => {
            let k = rng.random_range(2..=5);
            let mut idx: Vec<usize> = (0..w.words.len()).collect();
            for i in 0..k {
                let j = rng.random_range(i..idx.len());
                idx.swap(i, j);
            }
            let list: Vec<String> = idx[..k].iter().map(|&i| w.words[i].clone()).collect();
            let (tpls, key, out) = match rng.random_range(0..3) {
                0 => (COUNT_PROSE, key_count(&list), list.len().to_string()),
                1 => (
                    REVERSE_PROSE,
                    key_reverse(&list),
                    list.iter().rev().cloned().collect::<Vec<_>>().join(" "),
                ),
                _ => {
                    let mut s = list.clone();
                    s.sort();
                    (SORT_PROSE, key_sort(&list), s.join(" "))
                }
            };
            if w.held_out(&key) {
                return None;
            }
            render(
                pick(rng, tpls),
                &[("list", &list.join(" ")), ("n", &out), ("out", &out)],
            )
        }
        _ => {
            let e = choose(rng, &w.entities);
            let k = rng.random_range(2..=9);
            if w.held_out(&key_age_in(&e.name, k)) {
                return None;
            }
            render(
                pick(rng, AGE_IN_PROSE),
                &[("e", &e.name), ("k", &n(k)), ("n", &n(e.age as i64 + k))],
            )
        }
    })
}

/// Generates the corpus of a world: every entity and town once, then random segments until the
/// size's byte target. Segments are separated by a blank line.
pub fn generate(w: &World) -> String {
    let target = w.size.params().corpus_bytes;
    let mut rng = rng_for(w.seed, stream::CORPUS);
    let gen = Generator::new(w);
    let mut segs: Vec<String> = Vec::new();
    for i in 0..w.entities.len() {
        segs.push(entity_paragraph(w, &mut rng, i));
    }
    for t in 0..w.towns.len() {
        segs.push(town_paragraph(w, &mut rng, t));
    }
    let mut bytes: usize = segs.iter().map(|s| s.len() + 2).sum();
    while bytes < target {
        let seg = match rng.random_range(0..100) {
            0..=24 => {
                let i = rng.random_range(0..w.entities.len());
                entity_paragraph(w, &mut rng, i)
            }
            25..=29 => {
                let t = rng.random_range(0..w.towns.len());
                town_paragraph(w, &mut rng, t)
            }
            30..=34 => lore(w, &mut rng),
            35..=54 => {
                let k = rng.random_range(3..=6);
                let sents: Vec<String> = (0..k).filter_map(|_| worked(w, &mut rng)).collect();
                if sents.is_empty() {
                    continue;
                }
                sents.join(" ")
            }
            _ => match gen.sample_mix(&mut rng, &CORPUS_MIX, Split::Train) {
                // The transcript already starts with the blank line that separates segments.
                Some(d) => gen.transcript(&mut rng, &d, 0.6).trim_start().to_string(),
                None => continue,
            },
        };
        bytes += seg.len() + 2;
        segs.push(seg);
    }
    let mut out = segs.join("\n\n");
    out.push('\n');
    capitalize(&out)
}
