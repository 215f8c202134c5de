//! The library target exists only so the data plane can name this crate as a
//! build-dependency (cargo then rebuilds the data plane when the program changes).
//! The program itself is `src/main.rs`, built for `bpfel-unknown-none` by aya-build.
#![no_std]
