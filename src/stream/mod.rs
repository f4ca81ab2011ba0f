//! The streaming engine, model-agnostic: plan which weight groups stay resident and how many
//! slots stream the rest, then run the cyclic copy/compute schedule within a hard VRAM budget.

mod size;

pub use size::{human_bytes, parse_size};
