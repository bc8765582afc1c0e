//! Encoding with trained ranks, with exactly tiktoken's semantics so that `Tokenizer.encode`
//! and `tiktoken.Encoding(mergeable_ranks=...)` agree token for token.

use ahash::AHashMap;

/// Appends the tokens of one pre-split chunk. Like tiktoken: a chunk that is itself a token
/// is emitted whole; otherwise, starting from single bytes, the adjacent pair whose
/// concatenation has the lowest rank (leftmost on ties) is merged until none is a token.
pub fn encode_chunk(chunk: &[u8], ranks: &AHashMap<Vec<u8>, u32>, out: &mut Vec<u32>) {
    if let Some(&rank) = ranks.get(chunk) {
        out.push(rank);
        return;
    }
    // Token boundaries; chunks are short, so a quadratic scan beats cleverer structures.
    let mut bounds: Vec<usize> = (0..=chunk.len()).collect();
    loop {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..bounds.len().saturating_sub(2) {
            if let Some(&rank) = ranks.get(&chunk[bounds[i]..bounds[i + 2]]) {
                let better = match best {
                    Some((best_rank, _)) => rank < best_rank,
                    None => true,
                };
                if better {
                    best = Some((rank, i));
                }
            }
        }
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => break,
        }
    }
    for span in bounds.windows(2) {
        // Every single byte has a rank, and merged spans were found in `ranks`.
        out.push(ranks[&chunk[span[0]..span[1]]]);
    }
}
