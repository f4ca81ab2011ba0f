//! ferry: run transformer models larger than GPU memory at full precision.
//!
//! Data flows one way: [`checkpoint`] → [`model`] (over a [`backend`]) → [`generate`].

pub mod backend;
pub mod checkpoint;
pub mod date;
pub mod diffuse;
pub mod error;
pub mod generate;
pub mod model;
pub mod progress;
pub mod runtime;
pub mod serve;
pub mod stream;
pub mod synth;

pub use error::{Error, Result};
