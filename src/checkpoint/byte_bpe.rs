//! Byte-level BPE, GPT-2's scheme (and Qwen2's, Llama 3's): text split into words by a regex,
//! every byte of a word spelled as one printable character (GPT-2's byte alphabet), the
//! characters merged by rank. Built here once for the two places that rebuild such a tokenizer
//! without a `tokenizer.json`: GGUF metadata (gguf/tokenizer.rs) and a slow Hugging Face
//! tokenizer folder, vocab.json + merges.txt (slow_tokenizer.rs).

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's split regex (transformers' `PRETOKENIZE_REGEX` in tokenization_qwen2.py, and the
/// GGUF "qwen2" pre-tokenizer): GPT-4's, but digits one at a time.
pub(crate) const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// What a byte-level BPE tokenizer is built from. Added (special) tokens are the caller's to
/// register afterwards.
pub(crate) struct ByteLevelBpe<'a> {
    /// Token, spelled in the byte alphabet ("Ġthe" for " the") → id.
    pub vocab: Vocab,
    /// Merges by rank, each side and the merged token in `vocab`: checked by the caller (with
    /// [`merge_pair`]), which can say where a bad one is.
    pub merges: Vec<(String, String)>,
    /// The regex that splits text into words, its matches kept as words ("isolated"); None:
    /// GPT-2's own, built into the ByteLevel pre-tokenizer.
    pub split: Option<&'a str>,
    /// Compose the text to NFC first (Qwen2Tokenizer does; transformers' GGUF vocabularies do
    /// not).
    pub nfc: bool,
    /// Put a space before the text, so that its first word is spelled as any other.
    pub add_prefix_space: bool,
}

/// The tokenizer `spec` describes: BPE with no continuing-subword prefix, no end-of-word
/// suffix and no unknown token (every byte is in the alphabet), and the ByteLevel decoder.
pub(crate) fn build(spec: ByteLevelBpe) -> Result<Tokenizer, String> {
    let bpe = BPE::builder()
        .vocab_and_merges(spec.vocab, spec.merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| format!("byte-level BPE: {e}"))?;

    let mut tokenizer = Tokenizer::new(bpe);
    if spec.nfc {
        // No added tokens yet, so nothing to re-normalize: this cannot fail.
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| format!("NFC normalizer: {e}"))?;
    }
    let pre_tokenizer: PreTokenizerWrapper = match spec.split {
        // The regex does the splitting; ByteLevel only maps bytes to the alphabet.
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("split regex {regex:?}: {e}"))?;
            PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(spec.add_prefix_space, true, false).into(),
            ])
            .into()
        }
        None => ByteLevel::new(spec.add_prefix_space, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// What is wrong with a merge, for the caller to say where it is.
#[derive(Debug, PartialEq)]
pub(crate) enum BadMerge {
    /// Not two tokens separated by one space.
    NotAPair,
    /// This side, or the merged token, is not in the vocabulary.
    NotInVocab(String),
}

/// A merge as written ("left right"), split into its two sides, each side and the token they
/// make checked against `vocab` (the BPE builder would refuse them, without saying where).
pub(crate) fn merge_pair<'a>(
    merge: &'a str,
    vocab: &Vocab,
) -> Result<(&'a str, &'a str), BadMerge> {
    let (left, right) = match merge.split(' ').collect::<Vec<_>>()[..] {
        [left, right] => (left, right),
        _ => return Err(BadMerge::NotAPair),
    };
    for side in [left, right, &format!("{left}{right}")] {
        if !vocab.contains_key(side) {
            return Err(BadMerge::NotInVocab(side.to_string()));
        }
    }
    Ok((left, right))
}

/// GPT-2's byte alphabet: the character that stands for each byte value. Printable Latin-1
/// bytes stand for themselves; the others (controls, space, …) are given the code points from
/// U+0100 on, in byte order. So ' ' (0x20) is 'Ġ' (U+0120) and '\n' is 'Ċ'.
pub(crate) fn byte_alphabet() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut alphabet = ['\0'; 256];
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        alphabet[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    alphabet
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'a' as usize], 'a');
        assert_eq!(a[0], '\u{100}');
        assert_eq!(a[0xAD], '\u{143}');
        assert_eq!(a[0xE9], 'é');
        let distinct: HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merge_pair_checks_shape_and_vocabulary() {
        let vocab: Vocab = ["a", "b", "ab"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        assert_eq!(merge_pair("a b", &vocab), Ok(("a", "b")));
        assert_eq!(merge_pair("a b a", &vocab), Err(BadMerge::NotAPair));
        assert_eq!(merge_pair("ab", &vocab), Err(BadMerge::NotAPair));
        assert_eq!(
            merge_pair("b a", &vocab),
            Err(BadMerge::NotInVocab("ba".into()))
        );
        assert_eq!(
            merge_pair("a c", &vocab),
            Err(BadMerge::NotInVocab("c".into()))
        );
    }
}
