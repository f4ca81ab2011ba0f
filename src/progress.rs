//! One look for progress bars over bytes (synth, GGUF dequantization, registering host
//! memory): on stderr, drawn only on a terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` bytes with the message `msg`: position, total, rate and time left.
pub fn bytes_bar(total: usize, msg: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(msg.into());
    bar
}
