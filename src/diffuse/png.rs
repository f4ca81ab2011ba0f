//! 8-bit RGB PNG output with the generation parameters in a text chunk, written to a temporary
//! file beside the target and renamed into place, so that a failed run leaves no partial PNG.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What made an image, as image tools read it back: the `parameters` text chunk in the
/// layout Stable Diffusion web UIs write (prompt; `Negative prompt: …`; `Steps: …, Seed: …`).
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub guidance: f32,
    pub model: String,
}

impl Parameters {
    /// The `parameters` chunk's text.
    pub fn text(&self) -> String {
        let mut s = self.prompt.clone();
        if let Some(n) = &self.negative_prompt {
            s.push_str(&format!("\nNegative prompt: {n}"));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: Euler (flow match), CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Version: ferry {}",
            self.steps,
            self.guidance,
            self.seed,
            self.width,
            self.height,
            self.model,
            env!("CARGO_PKG_VERSION")
        ));
        s
    }
}

/// Write `rgb` (`[height, width, 3]`, row-major) to `path` as an 8-bit PNG carrying
/// `params`: the bytes of [`encode`].
pub fn write(
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
    params: &Parameters,
) -> Result<()> {
    let tmp = temporary_beside(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        encode_into(BufWriter::new(file), rgb, width, height, params).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The PNG file [`write`] writes, in memory (`ferry serve`'s images).
pub fn encode(rgb: &[u8], width: usize, height: usize, params: &Parameters) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_into(&mut bytes, rgb, width, height, params)
        .expect("a PNG encodes into memory: the text chunks are representable by construction");
    bytes
}

/// One encoder for files and memory, so that both hold the same bytes. The parameters go in a
/// Latin-1 `tEXt` chunk when they fit one (what image tools read most widely), else in a
/// UTF-8 `iTXt` chunk (a prompt in Chinese, say).
fn encode_into(
    out: impl std::io::Write,
    rgb: &[u8],
    width: usize,
    height: usize,
    params: &Parameters,
) -> std::result::Result<(), png::EncodingError> {
    assert_eq!(
        rgb.len(),
        width * height * 3,
        "an RGB image of {width}x{height}"
    );
    let mut enc = png::Encoder::new(out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let text = params.text();
    if text.chars().all(|c| (c as u32) < 256) {
        enc.add_text_chunk("parameters".into(), text)?;
    } else {
        enc.add_itxt_chunk("parameters".into(), text)?;
    }
    enc.add_text_chunk(
        "Software".into(),
        format!("ferry {}", env!("CARGO_PKG_VERSION")),
    )?;
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()
}

/// `DIR/.NAME.ferry-tmp` for `DIR/NAME`: on the same file system, so the rename is atomic.
fn temporary_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.png".into());
    path.with_file_name(format!(".{name}.ferry-tmp"))
}

/// Where image `index` of `count` goes: `out` itself for one image, else `out` with `-N`
/// before its extension (`fox.png` → `fox-0.png`, `fox-1.png`, …).
pub fn numbered(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out.extension().map(|e| e.to_string_lossy().into_owned());
    let name = match ext {
        Some(e) => format!("{stem}-{index}.{e}"),
        None => format!("{stem}-{index}"),
    };
    out.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_png_reads_back_with_its_pixels_and_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let (w, h) = (5, 3);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect();
        let params = Parameters {
            prompt: "a fox".into(),
            negative_prompt: Some("blurry".into()),
            steps: 8,
            seed: 42,
            width: w,
            height: h,
            guidance: 0.0,
            model: "tiny".into(),
        };
        write(&path, &rgb, w, h, &params).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w as u32, h as u32));
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
        let text = &reader.info().uncompressed_latin1_text;
        let p = text.iter().find(|t| t.keyword == "parameters").unwrap();
        assert!(
            p.text
                .starts_with("a fox\nNegative prompt: blurry\nSteps: 8,"),
            "{}",
            p.text
        );
        assert!(
            p.text.contains("Seed: 42, Size: 5x3, Model: tiny"),
            "{}",
            p.text
        );
        assert!(!dir.path().join(".x.png.ferry-tmp").exists());
    }

    #[test]
    fn a_prompt_beyond_latin1_goes_in_utf8_and_memory_holds_the_file_s_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fox.png");
        let params = Parameters {
            prompt: "一只狐狸 in the snow".into(),
            negative_prompt: None,
            steps: 2,
            seed: 7,
            width: 2,
            height: 1,
            guidance: 0.0,
            model: "tiny".into(),
        };
        let rgb = [1, 2, 3, 4, 5, 6];
        write(&path, &rgb, 2, 1, &params).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, encode(&rgb, 2, 1, &params));
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..6], &rgb);
        let utf8 = &reader.info().utf8_text;
        let p = utf8.iter().find(|t| t.keyword == "parameters").unwrap();
        assert!(p
            .get_text()
            .unwrap()
            .starts_with("一只狐狸 in the snow\nSteps: 2,"));
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("x.png");
        let params = Parameters {
            prompt: String::new(),
            negative_prompt: None,
            steps: 1,
            seed: 0,
            width: 1,
            height: 1,
            guidance: 0.0,
            model: String::new(),
        };
        let e = write(&path, &[0, 0, 0], 1, 1, &params)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-dir"), "{e}");
    }

    #[test]
    fn batches_are_numbered_before_the_extension() {
        assert_eq!(
            numbered(Path::new("a/fox.png"), 0, 1),
            Path::new("a/fox.png")
        );
        assert_eq!(
            numbered(Path::new("a/fox.png"), 2, 4),
            Path::new("a/fox-2.png")
        );
    }
}
