//! The streaming engine, model-agnostic: plan which weight groups stay resident and how many
//! slots stream the rest, then run the cyclic copy/compute schedule within a hard VRAM budget.
//!
//! - [`plan`]: the planner and its simulation of the schedule (the predicted pass time).
//! - [`cost`]: an architecture's groups as the planner sees them (bytes, compute, splits).
//! - [`budget`]: the accounting allocator every device allocation goes through.
//! - [`schedule`]: the streamer over a copy-engine interface (the backends provide the
//!   engines: `backend::cuda::streaming`, and `backend::cpu_stream` for tests without a GPU).
//! - [`streamed`]: the model's weights group by group from a plan, over any slot engine.
//! - [`compress`]: lossless bf16 compression of streamed weights (decoded on the device).
//! - [`encoding_cache`]: the encodings kept in a file between loads.
//! - [`stats`]: what a streamed pass did.
//! - [`staging`]: the pinned staging ring, for host memory the driver will not page-lock; it
//!   reads host memory through [`staging::HostBytes`], so raw addresses stay in the backend.
//! - [`timeline`]: one pass's copy and compute intervals drawn as an SVG.

pub mod blocks;
pub mod budget;
pub mod compress;
pub mod cost;
pub mod encoding_cache;
pub mod plan;
pub mod schedule;
mod size;
pub mod staging;
pub mod stats;
pub mod streamed;
pub mod timeline;

pub use budget::{Allocation, BudgetAllocator, DeviceMemory, OverBudget, Purpose, Vram};
pub use cost::CostModel;
pub use plan::{
    plan, Group, Piece, Placement, Plan, PlanRequest, Prediction, ResidentSet, SlotSize,
};
pub use schedule::{run_pass, CopyEngine, Streamer};
pub use size::{human_bytes, parse_size};
pub use stats::PassStats;
pub use streamed::{GroupTensors, SlotEngine, StreamedWeights};
