//! The mutation engine of every bounded fuzz pass in the workspace (dataset readers, checkpoint
//! manifest, TOML config, safetensors): one owner, so a new kind of hostile edit reaches every reader.
//!
//! No fuzzing framework: a seeded SplitMix64 picks one to four edits per input: bit flips, boundary
//! bytes, 2/4/8-byte fields set to 0 / 1 / 2^31 / 2^40 / u32::MAX / u64::MAX in either byte order,
//! truncation, insertion, deletion, repeated ranges, and number or string literals replaced by
//! hostile tokens (extremes, `../` paths). Position-based edits can be aimed at a format's size
//! fields (`hot` offsets), which reaches the bound checks behind the parsers far more often than
//! uniform positions do. Deterministic for a seed, so a failing input can be regenerated.

/// Inputs per reader: `DDPM_FUZZ_ITERS`, else `default` (seconds of `cargo test`).
pub fn iterations(default: usize) -> usize {
    env_or("DDPM_FUZZ_ITERS", default)
}

/// The base seed: `DDPM_FUZZ_SEED`, else `default`.
pub fn seed(default: u64) -> u64 {
    env_or("DDPM_FUZZ_SEED", default)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Values written into size fields: where bound checks and overflows live.
pub const INTERESTING: [u64; 10] = [
    0,
    1,
    2,
    255,
    65535,
    1 << 31,
    (1 << 32) - 1,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

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
        Self { state: seed }
    }

    /// SplitMix64.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }

    /// One to four edits of `input` anywhere.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        self.mutate_aimed(input, &[])
    }

    /// One to four edits of `input`; half of the position-based ones at a `hot` offset.
    pub fn mutate_aimed(&mut self, input: &[u8], hot: &[usize]) -> Vec<u8> {
        let mut b = input.to_vec();
        for _ in 0..1 + self.below(4) {
            self.edit(&mut b, hot);
        }
        b
    }

    /// A length-preserving edit at `b[i]`: bit flip, boundary byte, or an [`INTERESTING`] value as a
    /// 2/4/8-byte field in either byte order (cut at the end of `b`, so a caller can confine it to a
    /// range by passing `&mut b[..range.end]`).
    pub fn overwrite(&mut self, b: &mut [u8], i: usize) {
        if i >= b.len() {
            return;
        }
        match self.below(4) {
            0 => b[i] ^= 1 << self.below(8),
            1 => b[i] = *self.pick(&[0u8, 1, 0x7f, 0x80, 0xfe, 0xff]),
            _ => {
                let width = *self.pick(&[2usize, 4, 8]);
                let v = *self.pick(&INTERESTING);
                let bytes = if self.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let src = if self.below(2) == 0 {
                    &bytes[..width]
                } else {
                    &bytes[8 - width..]
                };
                for (slot, &x) in b[i..].iter_mut().zip(src) {
                    *slot = x;
                }
            }
        }
    }

    fn edit(&mut self, b: &mut Vec<u8>, hot: &[usize]) {
        let len = b.len();
        if len == 0 {
            b.push(self.next_u64() as u8);
            return;
        }
        let at = self.below(len);
        match self.below(8) {
            0..=2 => {
                let i = if !hot.is_empty() && self.below(2) == 0 {
                    (*self.pick(hot)).min(len - 1)
                } else {
                    at
                };
                self.overwrite(b, i);
            }
            3 => b.truncate(self.below(len + 1)),
            4 => {
                let fill = self.next_u64() as u8;
                b.splice(at..at, std::iter::repeat_n(fill, 1 + self.below(16)));
            }
            5 => {
                b.drain(at..(at + 1 + self.below(16)).min(len));
            }
            6 => {
                let range = b[at..(at + 1 + self.below(64)).min(len)].to_vec();
                let to = self.below(len + 1);
                b.splice(to..to, range);
            }
            _ => self.replace_token(b, at),
        }
    }

    /// Replaces the number or string literal at or after `at` by a hostile token.
    fn replace_token(&mut self, b: &mut Vec<u8>, at: usize) {
        let len = b.len();
        let Some(start) = (at..len).find(|&i| b[i].is_ascii_digit() || b[i] == b'"') else {
            return;
        };
        let end = if b[start] == b'"' {
            (start + 1..len)
                .find(|&i| b[i] == b'"')
                .map_or(len, |e| e + 1)
        } else {
            (start..len)
                .find(|&i| !(b[i].is_ascii_alphanumeric() || b".-+".contains(&b[i])))
                .unwrap_or(len)
        };
        let token = TOKENS[self.below(TOKENS.len())].as_bytes();
        b.splice(start..end, token.iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use super::Mutator;

    #[test]
    fn deterministic_and_edits_every_time_somewhere() {
        let base = br#"{"n": 123, "name": "x"}"#;
        let (mut a, mut b) = (Mutator::new(5), Mutator::new(5));
        let mut changed = 0;
        for _ in 0..200 {
            let (x, y) = (a.mutate(base), b.mutate(base));
            assert_eq!(x, y);
            changed += usize::from(x != base);
        }
        assert!(changed > 150, "{changed}");
    }
}
