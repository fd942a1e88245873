//! Integration tests spanning crates, including the reference-vector conformance suite
