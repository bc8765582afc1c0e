//! Python bindings (pyo3 0.17 API, the version Debian 12 ships) for the BPE trainer.
//!
//! Same surface as nanochat's `rustbpe`, so it is a drop-in: `Tokenizer()`,
//! `train_from_iterator(iterator, vocab_size, buffer_size=8192, pattern=None)`, `get_pattern()`,
//! `get_mergeable_ranks()`, `encode(text)`, `batch_encode(texts)`, `vocab_size`.

mod encode;
mod split;
mod train;

use ahash::AHashMap;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

use crate::split::Splitter;
use crate::train::Pair;

/// nanochat's split pattern: GPT-4's, except that numbers split into runs of at most 2 digits.
const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

fn compile(pattern: &str) -> PyResult<Splitter> {
    Splitter::new(pattern)
        .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))
}

fn regex_error(e: fancy_regex::Error) -> PyErr {
    PyValueError::new_err(format!("split pattern failed on the input: {e}"))
}

/// A byte-level BPE tokenizer: 256 byte tokens plus one token per learned merge.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<Pair>,
    /// bytes -> token id, for encoding. Built like `dict(get_mergeable_ranks())`.
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn set_merges(&mut self, merges: Vec<Pair>) {
        self.ranks = train::token_bytes(&merges)
            .into_iter()
            .enumerate()
            .map(|(id, bytes)| (bytes, id as u32))
            .collect();
        self.merges = merges;
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, fancy_regex::Error> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each_chunk(text, |chunk| {
            encode::encode_chunk(chunk.as_bytes(), &self.ranks, &mut ids)
        })?;
        Ok(ids)
    }
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer (the 256 byte tokens) with the default split pattern.
    #[new]
    fn new() -> PyResult<Self> {
        let mut tokenizer = Tokenizer {
            pattern: DEFAULT_PATTERN.to_owned(),
            splitter: compile(DEFAULT_PATTERN)?,
            merges: Vec::new(),
            ranks: AHashMap::new(),
        };
        tokenizer.set_merges(Vec::new());
        Ok(tokenizer)
    }

    /// Learns `vocab_size - 256` merges from an iterable of str. Texts are pulled
    /// `buffer_size` at a time (holding the GIL) and split and counted in parallel (without
    /// it). Stops early if the corpus runs out of pairs, so `vocab_size` may end up smaller.
    #[args(buffer_size = "8192", pattern = "None")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if !(256..=u32::MAX as i64).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens) and fit in 32 bits, got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be positive, got {buffer_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_owned());
        let splitter = compile(&pattern)?;

        let mut chunk_counts: AHashMap<String, i64> = AHashMap::new();
        let buffer_size = buffer_size as usize;
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16));
        let mut items = 0usize;
        let mut flush = |buffer: &mut Vec<String>, py: Python<'_>| -> PyResult<()> {
            let counts = py
                .allow_threads(|| train::count_chunks(&splitter, buffer))
                .map_err(regex_error)?;
            for (chunk, count) in counts {
                match chunk_counts.get_mut(chunk) {
                    Some(total) => *total += count,
                    None => {
                        chunk_counts.insert(chunk.to_owned(), count);
                    }
                }
            }
            buffer.clear();
            Ok(())
        };
        if iterator.is_instance_of::<PyString>()? {
            // Iterating a str yields its characters: a corpus of one-char texts, never meant.
            return Err(PyTypeError::new_err(
                "train_from_iterator expects an iterable of str, got a single str",
            ));
        }
        let iter = iterator.iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;
        for item in iter {
            let item = item?;
            let text = item.downcast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "train_from_iterator expects str items, item {items} is {}",
                    type_name(item)
                ))
            })?;
            buffer.push(text.to_str()?.to_owned());
            items += 1;
            if buffer.len() >= buffer_size {
                flush(&mut buffer, py)?;
            }
        }
        flush(&mut buffer, py)?;
        if chunk_counts.is_empty() {
            return Err(PyValueError::new_err(format!(
                "train_from_iterator got no text to train on ({items} items, all empty)"
            )));
        }

        let num_merges = (vocab_size - 256) as usize;
        let merges = py.allow_threads(move || {
            let words = chunk_counts
                .into_iter()
                .map(|(chunk, count)| (chunk.into_bytes(), count))
                .collect();
            train::learn_merges(words, num_merges)
        });
        self.pattern = pattern;
        self.splitter = splitter;
        self.set_merges(merges);
        Ok(())
    }

    /// The regex that splits text into chunks before BPE.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// `[(token_bytes, rank), ...]` in rank order, the form tiktoken's `mergeable_ranks` takes:
    /// ranks 0..255 are the single bytes, rank `256 + k` is the product of merge `k`.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(&'py PyBytes, u32)> {
        train::token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(id, bytes)| (PyBytes::new(py, bytes), id as u32))
            .collect()
    }

    /// The chunks `text` is pre-split into (BPE never merges across them).
    fn split(&self, py: Python<'_>, text: &str) -> PyResult<Vec<String>> {
        py.allow_threads(|| {
            let mut chunks = Vec::new();
            self.splitter
                .for_each_chunk(text, |chunk| chunks.push(chunk.to_owned()))
                .map(|()| chunks)
        })
        .map_err(regex_error)
    }

    /// The learned merges as `(left_id, right_id)` pairs; merge `k` creates id `256 + k`.
    fn get_merges(&self) -> Vec<Pair> {
        self.merges.clone()
    }

    /// Token ids of `text` (same result as tiktoken with these ranks and pattern).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.encode_text(text))
            .map_err(regex_error)
    }

    /// `encode` for many texts, in parallel.
    fn batch_encode(&self, py: Python<'_>, texts: &PyAny) -> PyResult<Vec<Vec<u32>>> {
        if texts.is_instance_of::<PyString>()? {
            // A str is a sequence of str: encoding it char by char is never what was meant.
            return Err(PyTypeError::new_err(
                "batch_encode expects a list of str, got a single str (use encode)",
            ));
        }
        let texts: Vec<String> = texts.extract()?;
        py.allow_threads(|| {
            texts
                .par_iter()
                .map(|text| self.encode_text(text))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(regex_error)
    }

    /// Number of tokens: 256 + number of merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }
}

fn type_name(object: &PyAny) -> String {
    object
        .get_type()
        .name()
        .map(str::to_owned)
        .unwrap_or_else(|_| "an unknown type".to_owned())
}

#[pymodule]
fn rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
