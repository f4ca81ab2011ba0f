//! Image generation: the scheduler, the phases of a generation (text encoder → denoising
//! steps of the DiT → VAE decode) and image output.

pub mod flux;
pub mod flux_pipeline;
pub mod flux_text;
pub mod guidance;
pub mod packed;
pub mod pipeline;
pub mod png;
pub mod qwen_image;
pub mod qwen_image_pipeline;
pub mod qwen_text_encoder;
pub mod scheduler;
pub mod text_encoder;
pub mod z_image;
