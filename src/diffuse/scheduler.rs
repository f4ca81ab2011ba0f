//! The flow-match Euler scheduler (diffusers' `FlowMatchEulerDiscreteScheduler`) as a
//! pipeline's `scheduler_config.json` configures it: sigmas for a number of steps, shifted
//! statically or by the image's token count, optionally stretched to end at `shift_terminal`,
//! and the Euler step `x ← x + (σ_next − σ)·v`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// scheduler_config.json, the fields ferry reads.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct FlowMatchConfig {
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "half")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_len")]
    pub max_image_seq_len: usize,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default = "exponential")]
    pub time_shift_type: String,
}

fn default_train_timesteps() -> usize {
    1000
}
fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_len() -> usize {
    256
}
fn max_len() -> usize {
    4096
}
fn exponential() -> String {
    "exponential".into()
}

impl FlowMatchConfig {
    /// Tongyi-MAI/Z-Image-Turbo's scheduler_config.json (static shift 3 over 1000 training
    /// steps), for split files that carry none.
    pub fn z_image_turbo() -> FlowMatchConfig {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: false,
            base_shift: half(),
            max_shift: max_shift(),
            base_image_seq_len: base_len(),
            max_image_seq_len: max_len(),
            shift_terminal: None,
            time_shift_type: exponential(),
        }
    }

    /// Qwen/Qwen-Image's scheduler_config.json (a shift that grows with the image, exponential,
    /// from 0.5 at 256 tokens to 0.9 at 8192, ending at σ 0.02), for split files that carry none.
    pub fn qwen_image() -> FlowMatchConfig {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 0.9,
            base_image_seq_len: 256,
            max_image_seq_len: 8192,
            shift_terminal: Some(0.02),
            time_shift_type: exponential(),
        }
    }

    /// black-forest-labs/FLUX.1-dev's scheduler_config.json (a shift that grows with the
    /// image, exponential, from 0.5 at 256 tokens to 1.15 at 4096), for split files of a DiT
    /// that embeds the guidance scale.
    pub fn flux_dev() -> FlowMatchConfig {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: half(),
            max_shift: max_shift(),
            base_image_seq_len: base_len(),
            max_image_seq_len: max_len(),
            shift_terminal: None,
            time_shift_type: exponential(),
        }
    }

    /// black-forest-labs/FLUX.1-schnell's scheduler_config.json (no shift), for split files
    /// of a DiT without a guidance embedder.
    pub fn flux_schnell() -> FlowMatchConfig {
        FlowMatchConfig {
            shift: 1.0,
            use_dynamic_shifting: false,
            ..FlowMatchConfig::flux_dev()
        }
    }

    /// Parse `json` (read from `path`), refusing the options ferry does not implement.
    pub fn from_json(path: &Path, json: &Value) -> Result<FlowMatchConfig> {
        for flag in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        ] {
            if json.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(Error::checkpoint(
                    path,
                    format!("{flag} = true is not supported; expected false"),
                ));
            }
        }
        let c: FlowMatchConfig = serde_json::from_value(json.clone()).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("scheduler config: {e}"),
        })?;
        if !matches!(c.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(Error::checkpoint(
                path,
                format!(
                    "time_shift_type {:?} is not supported; expected \"exponential\" or \"linear\"",
                    c.time_shift_type
                ),
            ));
        }
        if !(c.shift.is_finite() && c.shift > 0.0) || c.num_train_timesteps == 0 {
            return Err(Error::checkpoint(
                path,
                "shift must be > 0 and num_train_timesteps ≥ 1",
            ));
        }
        if c.shift_terminal.is_some_and(|t| !(0.0..1.0).contains(&t)) {
            return Err(Error::checkpoint(path, "shift_terminal must lie in [0, 1)"));
        }
        Ok(c)
    }

    /// The resolution-dependent shift `mu` for `image_tokens` (Flux's `calculate_shift`): a
    /// line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
    pub fn mu(&self, image_tokens: usize) -> f64 {
        let (x0, x1) = (
            self.base_image_seq_len as f64,
            self.max_image_seq_len as f64,
        );
        let m = (self.max_shift - self.base_shift) / (x1 - x0);
        let b = self.base_shift - m * x0;
        image_tokens as f64 * m + b
    }

    /// The schedule for `sigmas` given by the pipeline (before shifting), with `mu` for
    /// dynamic shifting.
    pub fn schedule(&self, sigmas: &[f32], mu: f64) -> Schedule {
        let mut s: Vec<f32> = sigmas
            .iter()
            .map(|&x| {
                if self.use_dynamic_shifting {
                    // numpy f32 (NEP 50): math.exp(mu), a Python float, does not widen the f32
                    // array, so everything after it is f32 arithmetic.
                    let m = match self.time_shift_type.as_str() {
                        "linear" => mu as f32,
                        _ => mu.exp() as f32,
                    };
                    m / (m + (1.0 / x - 1.0))
                } else {
                    // numpy f32: the Python float shift does not widen the array.
                    let shift = self.shift as f32;
                    shift * x / (1.0 + (shift - 1.0) * x)
                }
            })
            .collect();
        if let Some(terminal) = self.shift_terminal.filter(|&t| t > 0.0) {
            let last = 1.0 - *s.last().unwrap_or(&0.0);
            // numpy: `1 - shift_terminal` is a Python float, rounded to f32 once.
            let scale = last / (1.0 - terminal) as f32;
            for x in &mut s {
                *x = 1.0 - (1.0 - *x) / scale;
            }
        }
        let timesteps = s
            .iter()
            .map(|&x| x * self.num_train_timesteps as f32)
            .collect();
        s.push(0.0);
        Schedule {
            sigmas: s,
            timesteps,
        }
    }
}

/// Sigmas (one per step, then the terminal 0) and the timesteps `σ · num_train_timesteps`.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
}

impl Schedule {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The Euler step from step `i` to `i + 1`: `latents += (σ_{i+1} − σ_i) · velocity`.
    pub fn step(&self, i: usize, latents: &mut [f32], velocity: &[f32]) {
        assert_eq!(latents.len(), velocity.len(), "latents and velocity");
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        for (x, &v) in latents.iter_mut().zip(velocity) {
            *x += dt * v;
        }
    }
}

/// `steps` values from `start` to `end` in f32 as `torch.linspace` computes them: the first
/// half counted up from `start`, the second down from `end`.
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// `steps` values from `start` to `end` as `np.linspace` computes them in f64 (`i · step +
/// start`, the last exactly `end`), then rounded to f32 as the scheduler's
/// `np.array(sigmas).astype(np.float32)` does.
pub fn numpy_linspace(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start as f32];
    }
    let step = (end - start) / (steps - 1) as f64;
    (0..steps)
        .map(|i| match i + 1 == steps {
            true => end as f32,
            false => (i as f64 * step + start) as f32,
        })
        .collect()
}

/// Qwen-Image's and Flux.1's default sigmas before shifting: `np.linspace(1, 1/steps, steps)`
/// (in f64).
pub fn flow_sigmas(steps: usize) -> Vec<f32> {
    numpy_linspace(1.0, 1.0 / steps as f64, steps)
}

/// Z-Image's default sigmas before shifting: `linspace(1, 1/steps, steps)`.
pub fn z_image_sigmas(steps: usize) -> Vec<f32> {
    linspace_f32(1.0, 1.0 / steps as f32, steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> FlowMatchConfig {
        FlowMatchConfig::from_json(
            Path::new("scheduler_config.json"),
            &serde_json::from_str(json).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn z_image_turbo_is_its_scheduler_config() {
        let turbo = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0, "use_dynamic_shifting": false}"#;
        assert_eq!(FlowMatchConfig::z_image_turbo(), config(turbo));
    }

    #[test]
    fn static_shift_three_over_four_steps() {
        let c = config(r#"{"shift": 3.0, "num_train_timesteps": 1000}"#);
        let s = c.schedule(&z_image_sigmas(4), 0.0);
        assert_eq!(s.sigmas, vec![1.0, 0.9, 0.75, 0.5, 0.0]);
        assert_eq!(s.timesteps, vec![1000.0, 900.0, 750.0, 500.0]);
    }

    #[test]
    fn shift_terminal_ends_the_schedule_there() {
        let c = config(r#"{"shift": 3.0, "shift_terminal": 0.02}"#);
        let s = c.schedule(&z_image_sigmas(8), 0.0);
        assert!((s.sigmas[7] - 0.02).abs() < 1e-6, "{:?}", s.sigmas);
        assert_eq!(s.sigmas[0], 1.0);
    }

    #[test]
    fn dynamic_shift_follows_the_token_count() {
        let c = config(r#"{"use_dynamic_shifting": true}"#);
        assert!((c.mu(256) - 0.5).abs() < 1e-12 && (c.mu(4096) - 1.15).abs() < 1e-12);
        let s = c.schedule(&[0.5], c.mu(4096));
        let e = 1.15f64.exp();
        assert!((s.sigmas[0] as f64 - e / (e + 1.0)).abs() < 1e-7);
    }

    #[test]
    fn unsupported_options_are_named() {
        let e = FlowMatchConfig::from_json(
            Path::new("x/scheduler_config.json"),
            &serde_json::json!({"use_karras_sigmas": true}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("use_karras_sigmas") && e.contains("scheduler_config.json"),
            "{e}"
        );
    }
}
