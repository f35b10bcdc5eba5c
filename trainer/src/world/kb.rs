//! The knowledge base: generated entities with attributes, generated towns, the fixed vocabularies,
//! and the world's harmful things and how-to requests. Everything the annotator needs lives in
//! [`World`], which is written to `world.json` so a directory alone rebuilds the annotator.

use super::safety::{default_harms, default_howtos, Harm, HowTo};
use super::text::{capitalize, fnv1a, parse_tokens};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// How much to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Default,
    Large,
}

/// The counts behind a [`Size`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeParams {
    pub entities: usize,
    pub towns: usize,
    /// Target size of `corpus.txt` in bytes (reached to within a few hundred bytes).
    pub corpus_bytes: usize,
    pub sft: usize,
    pub rlhf: usize,
    pub eval: usize,
}

impl Size {
    pub fn params(self) -> SizeParams {
        match self {
            Size::Small => SizeParams {
                entities: 16,
                towns: 6,
                corpus_bytes: 200_000,
                sft: 1_000,
                rlhf: 500,
                eval: 200,
            },
            Size::Default => SizeParams {
                entities: 32,
                towns: 8,
                corpus_bytes: 1_000_000,
                sft: 4_000,
                rlhf: 2_000,
                eval: 500,
            },
            Size::Large => SizeParams {
                entities: 64,
                towns: 12,
                corpus_bytes: 5_000_000,
                sft: 12_000,
                rlhf: 6_000,
                eval: 1_000,
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Default => "default",
            Size::Large => "large",
        }
    }
}

impl std::str::FromStr for Size {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "small" => Size::Small,
            "default" => Size::Default,
            "large" => Size::Large,
            _ => bail!("unknown size `{s}` (small, default or large)"),
        })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A creature of the world. Names are capitalized; every attribute is one word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    pub name: String,
    pub kind: String,
    pub color: String,
    pub town: String,
    pub food: String,
    pub size: String,
    pub age: u32,
}

/// A persona for "speak as ..." instructions and the catchword that shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persona {
    pub name: String,
    pub marker: String,
}

/// The whole world definition: knowledge base, vocabularies, harms, how-tos and instruction words.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct World {
    /// Format version of `world.json`.
    pub version: u32,
    pub seed: u64,
    pub size: Size,
    /// Percentage of task instances (by content key) held out for `eval.jsonl`.
    pub holdout_percent: u32,
    pub kinds: Vec<String>,
    pub colors: Vec<String>,
    pub foods: Vec<String>,
    pub sizes: Vec<String>,
    /// Common words used in the word tasks (letters, counting, reversing, sorting).
    pub words: Vec<String>,
    pub towns: Vec<String>,
    pub entities: Vec<Entity>,
    pub harms: Vec<Harm>,
    pub howtos: Vec<HowTo>,
    pub personas: Vec<Persona>,
    pub start_words: Vec<String>,
    pub end_words: Vec<String>,
    pub max_words: usize,
}

/// RNG streams: each output gets its own, so changing one file's size never changes another.
pub(crate) mod stream {
    pub const WORLD: u64 = 1;
    pub const CORPUS: u64 = 2;
    pub const SFT: u64 = 3;
    pub const RLHF: u64 = 4;
    pub const EVAL: u64 = 5;
}

/// A deterministic RNG for one stream of one seed.
pub(crate) fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const KINDS: &[&str] = &[
    "troll", "sprite", "dragon", "gnome", "fox", "bear", "goblin", "toad",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "gray", "pink",
];
const FOODS: &[&str] = &[
    "honey", "cheese", "rice", "nuts", "berries", "soup", "bread", "cake", "pears", "beans",
    "plums", "carrots",
];
const SIZES: &[&str] = &["tiny", "small", "big", "huge"];
const WORDS: &[&str] = &[
    "moss", "fern", "lake", "stone", "cloud", "river", "apple", "lamp", "boat", "drum", "kite",
    "rope", "seed", "star", "tree", "wind", "bell", "coin", "door", "frog", "gate", "hill", "leaf",
    "moon", "nest", "pond", "rain", "road", "sand", "ship", "snow", "sun", "tent", "wall", "wolf",
    "yarn", "bird", "cup", "hat", "map",
];

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gl", "kr", "sn",
    "tr", "sh", "th", "j",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ee", "oo", "ai"];
const CODAS: &[&str] = &[
    "", "n", "r", "l", "b", "k", "m", "x", "sh", "nd", "rb", "ll",
];
const TOWN_SUFFIXES: &[&str] = &["ton", "by", "vale", "ford", "wick", "holm", "mere", "dell"];

fn pick<'a, R: Rng>(rng: &mut R, v: &'a [&'a str]) -> &'a str {
    v[rng.random_range(0..v.len())]
}

fn syllable<R: Rng>(rng: &mut R, coda: bool) -> String {
    let mut s = format!("{}{}", pick(rng, ONSETS), pick(rng, VOWELS));
    if coda {
        s.push_str(pick(rng, CODAS));
    }
    s
}

fn fresh_name<R: Rng>(rng: &mut R, taken: &mut BTreeSet<String>, town: bool) -> String {
    loop {
        let mut n = if town {
            let coda = rng.random_bool(0.5);
            syllable(rng, coda) + pick(rng, TOWN_SUFFIXES)
        } else if rng.random_bool(0.4) {
            syllable(rng, true)
        } else {
            let coda = rng.random_bool(0.3);
            syllable(rng, coda) + &syllable(rng, true)
        };
        if !town && n.len() < 4 {
            n.push_str(pick(rng, &["a", "o", "el", "ix"]));
        }
        if n.len() <= 9 && taken.insert(n.clone()) {
            return capitalize(&n);
        }
    }
}

impl World {
    /// Builds the world of `seed` at `size`: deterministic, byte-identical for a seed.
    pub fn generate(seed: u64, size: Size) -> World {
        let p = size.params();
        let mut rng = rng_for(seed, stream::WORLD);
        let personas = [
            ("pirate", "arr"),
            ("robot", "beep"),
            ("cat", "meow"),
            ("cow", "moo"),
            ("ghost", "boo"),
        ]
        .iter()
        .map(|(n, m)| Persona {
            name: n.to_string(),
            marker: m.to_string(),
        })
        .collect();
        let mut w = World {
            version: 1,
            seed,
            size,
            holdout_percent: 20,
            kinds: strings(KINDS),
            colors: strings(COLORS),
            foods: strings(FOODS),
            sizes: strings(SIZES),
            words: strings(WORDS),
            towns: vec![],
            entities: vec![],
            harms: default_harms(),
            howtos: default_howtos(),
            personas,
            start_words: strings(&["well", "listen", "okay"]),
            end_words: strings(&["zap", "yay", "bloop"]),
            max_words: 4,
        };
        // Names must never collide with a word of the language (or "it" would be ambiguous).
        let mut taken = w.vocabulary();
        w.towns = (0..p.towns)
            .map(|_| fresh_name(&mut rng, &mut taken, true))
            .collect();
        let choose = |rng: &mut ChaCha8Rng, v: &[String]| v[rng.random_range(0..v.len())].clone();
        for _ in 0..p.entities {
            let name = fresh_name(&mut rng, &mut taken, false);
            let e = Entity {
                name,
                kind: choose(&mut rng, &w.kinds),
                color: choose(&mut rng, &w.colors),
                town: choose(&mut rng, &w.towns),
                food: choose(&mut rng, &w.foods),
                size: choose(&mut rng, &w.sizes),
                age: rng.random_range(2..=50),
            };
            w.entities.push(e);
        }
        w
    }

    /// Reads `world.json` from a directory written by [`super::run`] (or the file itself).
    pub fn load(path: &Path) -> Result<World> {
        let file = if path.is_dir() {
            path.join("world.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let w: World = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a world definition", file.display()))?;
        if w.version != 1 {
            bail!(
                "{}: world format version {} (expected 1)",
                file.display(),
                w.version
            );
        }
        if w.entities.is_empty() || w.towns.is_empty() || w.words.len() < 4 {
            bail!(
                "{}: the world has no entities, towns or words",
                file.display()
            );
        }
        Ok(w)
    }

    /// Writes `world.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let file = dir.join("world.json");
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))
    }

    /// Every lowercase word the language itself uses (templates, tables, vocabularies).
    pub fn vocabulary(&self) -> BTreeSet<String> {
        let mut v: BTreeSet<String> = BTreeSet::new();
        let mut add = |s: &str| v.extend(parse_tokens(s));
        for list in [
            &self.kinds,
            &self.colors,
            &self.foods,
            &self.sizes,
            &self.words,
        ] {
            list.iter().for_each(|s| add(s));
        }
        for t in super::tasks::all_templates()
            .into_iter()
            .chain(super::corpus::all_templates())
        {
            add(t);
        }
        for h in &self.harms {
            add(&h.action);
            add(&h.reason);
            add(&h.comply);
        }
        for h in &self.howtos {
            add(&h.action);
            add(&h.answer);
            add(&h.short);
        }
        for p in &self.personas {
            add(&p.name);
            add(&p.marker);
        }
        self.start_words
            .iter()
            .chain(&self.end_words)
            .for_each(|s| add(s));
        for t in super::safety::REFUSALS {
            add(t);
        }
        v.extend(["e", "t", "a", "b", "k", "r", "w", "it", "list", "act"].map(String::from));
        v
    }

    /// Whether a task instance (by its content key) belongs to the held-out evaluation split.
    pub fn held_out(&self, key: &str) -> bool {
        let h = fnv1a(format!("{}:{key}", self.seed).as_bytes());
        (h % 100) < self.holdout_percent as u64
    }
}
