//! A small deterministic mutator for the bounded fuzz passes over every checkpoint and config
//! reader (manifest JSON here; the TOML config and safetensors files in ddpm-train's tests).
//!
//! No fuzzing framework: a seeded xorshift picks byte-level edits (flips, deletions, insertions,
//! repeated or truncated ranges) and token-level ones (numbers replaced by extremes, strings by
//! hostile paths), which reach the parsers' error paths and the bound checks behind them. The
//! count comes from `DDPM_FUZZ_ITERS` (default: a few thousand, seconds in `cargo test`).

/// Inputs per target in `cargo test`; `DDPM_FUZZ_ITERS=1000000 cargo test ... fuzz` runs longer.
pub fn iterations(default: usize) -> usize {
    std::env::var("DDPM_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Replacement tokens for numbers and strings: extremes, negatives, paths out of the directory.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "-1e308",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "1099511627776",
    "NaN",
    "\"../../etc/passwd\"",
    "\"/dev/zero\"",
    "\"é\"",
    "\"\"",
    "null",
    "[]",
    "{}",
    "true",
    "\"a/b\"",
    "\"..\"",
];

pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// One to four edits of `input`.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.below(4) {
            self.edit(&mut out);
        }
        out
    }

    fn edit(&mut self, out: &mut Vec<u8>) {
        let len = out.len();
        let at = self.below(len + 1);
        match self.below(8) {
            0 if len > 0 => out[at.min(len - 1)] ^= 1 << self.below(8),
            1 if len > 0 => out[at.min(len - 1)] = self.next_u64() as u8,
            2 => {
                let end = (at + 1 + self.below(16)).min(len);
                out.drain(at..end);
            }
            3 => out.insert(at, self.next_u64() as u8),
            4 => out.truncate(at),
            5 if len > 0 => {
                // repeat a range
                let start = self.below(len);
                let end = (start + 1 + self.below(64)).min(len);
                let chunk = out[start..end].to_vec();
                let pos = self.below(out.len() + 1);
                out.splice(pos..pos, chunk);
            }
            _ => self.replace_token(out),
        }
    }

    /// Replaces the number or string literal nearest a random position by a hostile token.
    fn replace_token(&mut self, out: &mut Vec<u8>) {
        let len = out.len();
        if len == 0 {
            return;
        }
        let at = self.below(len);
        let Some(start) = (at..len).find(|&i| out[i].is_ascii_digit() || out[i] == b'"') else {
            return;
        };
        let end = if out[start] == b'"' {
            (start + 1..len)
                .find(|&i| out[i] == b'"')
                .map_or(len, |e| e + 1)
        } else {
            (start..len)
                .find(|&i| !(out[i].is_ascii_alphanumeric() || b".-+".contains(&out[i])))
                .unwrap_or(len)
        };
        let token = TOKENS[self.below(TOKENS.len())].as_bytes();
        out.splice(start..end, token.iter().copied());
    }
}
