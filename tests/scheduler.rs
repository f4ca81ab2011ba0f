//! The flow-match Euler scheduler against diffusers 0.42.1 (`FlowMatchEulerDiscreteScheduler`,
//! numpy 2.4) for the options the next models use: dynamic exponential and linear shift
//! from the image's token count (mu as the pipelines' `calculate_shift` computes it), and
//! `shift_terminal`, static or after a dynamic shift. Values printed by
//! `set_timesteps(sigmas=torch.linspace(1, 1/steps, steps).tolist(), mu=mu)`, compared bit for
//! bit.

// The values are diffusers' f32 written as Python prints them (exact decimal expansions).
#![allow(clippy::excessive_precision)]

use std::path::Path;

use ferry::diffuse::scheduler::{z_image_sigmas, FlowMatchConfig};

struct Case {
    name: &'static str,
    config: &'static str,
    steps: usize,
    image_tokens: usize,
    sigmas: &'static [f32],
    timesteps: &'static [f32],
}

const CASES: &[Case] = &[
    Case {
        name: "dyn_exp",
        config: r#"{"use_dynamic_shifting": true, "time_shift_type": "exponential"}"#,
        steps: 8,
        image_tokens: 4096,
        sigmas: &[
            1.0,
            0.956723690032959,
            0.9045307636260986,
            0.8403487801551819,
            0.7595109343528748,
            0.654566764831543,
            0.5128441452980042,
            0.31090107560157776,
            0.0,
        ],
        timesteps: &[
            1000.0,
            956.7236938476562,
            904.53076171875,
            840.3487548828125,
            759.5109252929688,
            654.5667724609375,
            512.8441162109375,
            310.90106201171875,
        ],
    },
    Case {
        name: "dyn_lin",
        config: r#"{"use_dynamic_shifting": true, "time_shift_type": "linear"}"#,
        steps: 8,
        image_tokens: 4096,
        sigmas: &[
            1.0,
            0.8895027041435242,
            0.7752808928489685,
            0.6571428179740906,
            0.5348836779594421,
            0.4082840383052826,
            0.27710843086242676,
            0.1411042958498001,
            0.0,
        ],
        timesteps: &[
            1000.0,
            889.502685546875,
            775.2808837890625,
            657.142822265625,
            534.8836669921875,
            408.2840270996094,
            277.1084289550781,
            141.1042938232422,
        ],
    },
    Case {
        name: "dyn_exp_small",
        config: r#"{"use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15}"#,
        steps: 5,
        image_tokens: 1024,
        sigmas: &[
            1.0,
            0.882497251033783,
            0.7379740476608276,
            0.5558990240097046,
            0.31945133209228516,
            0.0,
        ],
        timesteps: &[
            1000.0,
            882.4972534179688,
            737.9740600585938,
            555.8990478515625,
            319.4513244628906,
        ],
    },
    Case {
        name: "terminal",
        config: r#"{"shift": 3.0, "shift_terminal": 0.02}"#,
        steps: 8,
        image_tokens: 0,
        sigmas: &[
            1.0,
            0.9363635778427124,
            0.85999995470047,
            0.7666666507720947,
            0.6499999761581421,
            0.4999999403953552,
            0.2999999523162842,
            0.019999980926513672,
            0.0,
        ],
        timesteps: &[
            1000.0,
            936.3635864257812,
            859.9999389648438,
            766.6666259765625,
            650.0,
            499.99993896484375,
            299.99993896484375,
            19.999980926513672,
        ],
    },
    Case {
        name: "dyn_terminal",
        config: r#"{"use_dynamic_shifting": true, "shift_terminal": 0.1}"#,
        steps: 6,
        image_tokens: 2000,
        sigmas: &[
            1.0,
            0.8924444317817688,
            0.7608233690261841,
            0.5960429906845093,
            0.383766233921051,
            0.10000002384185791,
            0.0,
        ],
        timesteps: &[
            1000.0,
            892.4444580078125,
            760.8233642578125,
            596.04296875,
            383.7662353515625,
            100.0000228881836,
        ],
    },
];

#[test]
fn sigmas_and_timesteps_match_diffusers() {
    for c in CASES {
        let json = serde_json::from_str(c.config).unwrap();
        let config = FlowMatchConfig::from_json(Path::new("scheduler_config.json"), &json).unwrap();
        let s = config.schedule(&z_image_sigmas(c.steps), config.mu(c.image_tokens));
        // Bit for bit: the shift is f32 arithmetic as numpy does it.
        assert_eq!(s.sigmas, c.sigmas, "{}: sigmas", c.name);
        assert_eq!(s.timesteps, c.timesteps, "{}: timesteps", c.name);
    }
}

/// The scheduler split files get is the one the Qwen-Image pipeline fixture saved (diffusers
/// writing Qwen/Qwen-Image's scheduler_config.json).
#[test]
fn qwen_image_constants_are_its_released_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen-image-pipeline/scheduler/scheduler_config.json");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        FlowMatchConfig::from_json(&path, &json).unwrap(),
        FlowMatchConfig::qwen_image()
    );
}
