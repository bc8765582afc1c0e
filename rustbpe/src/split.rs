//! Pre-splitting text into chunks with the split pattern.
//!
//! Any pattern runs on fancy-regex, a backtracking engine (needed for possessive quantifiers
//! and lookaround). Pre-splitting dominates training time, so the default pattern gets a fast
//! path on the `regex` crate's automata with the same leftmost-first semantics:
//!
//! * `X?+` and `X++` become `X?` and `X+`. In this pattern giving back never lets the rest
//!   match (`\p{L}+` cannot start on the non-letter `?+` took; `[\r\n]*` matches anything), so
//!   the first match found is the same.
//! * `\s+(?!\S)|\s+` becomes `\s+`, and the lookahead is applied afterwards: a whitespace run
//!   of 2+ characters that is followed by a non-space gives back its last character, which
//!   then starts the next chunk (so " word" keeps its space). Runs that end in `\r`/`\n` came
//!   from the earlier `\s*[\r\n]` alternative and are left alone, as in the original.
//!
//! Tests compare both paths on random Unicode.

use fancy_regex::Regex as FancyRegex;
use regex::Regex;

use crate::DEFAULT_PATTERN;

const DEFAULT_WITHOUT_LOOKAROUND: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+";

pub enum Splitter {
    Default(Regex),
    Any(FancyRegex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern == DEFAULT_PATTERN {
            let regex = Regex::new(DEFAULT_WITHOUT_LOOKAROUND).map_err(|e| e.to_string())?;
            return Ok(Splitter::Default(regex));
        }
        FancyRegex::new(pattern)
            .map(Splitter::Any)
            .map_err(|e| e.to_string())
    }

    /// Calls `on_chunk` with each chunk of `text`, in order.
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut on_chunk: impl FnMut(&'t str),
    ) -> Result<(), fancy_regex::Error> {
        match self {
            Splitter::Any(regex) => {
                for found in regex.find_iter(text) {
                    on_chunk(found?.as_str());
                }
            }
            Splitter::Default(regex) => {
                let mut at = 0;
                while let Some(found) = regex.find_at(text, at) {
                    let mut end = found.end();
                    let chunk = found.as_str();
                    if end < text.len() && gives_back_last_space(chunk) {
                        end -= chunk.chars().next_back().map_or(0, char::len_utf8);
                    }
                    on_chunk(&text[found.start()..end]);
                    at = end;
                }
            }
        }
        Ok(())
    }
}

/// Whether `\s+(?!\S)` would stop one character short of this maximal whitespace run (which
/// is followed by a non-space): 2+ whitespace characters, not ending in a line break.
fn gives_back_last_space(chunk: &str) -> bool {
    let mut chars = chunk.chars();
    match (chars.next(), chars.next_back()) {
        (Some(first), Some(last)) => {
            last != '\r'
                && last != '\n'
                && first.is_whitespace()
                && last.is_whitespace()
                && chars.all(char::is_whitespace)
        }
        _ => false, // fewer than 2 characters
    }
}
