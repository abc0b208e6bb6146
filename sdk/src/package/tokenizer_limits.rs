//! How much a `tokenizer.json`'s text stages may lengthen a text, checked when it is loaded.
//!
//! The `tokenizers` crate runs whatever a file's normalizer, pre-tokenizer and decoder say, and
//! some of them lengthen the text: a `Replace` of `"a"` by ten `"a"`s, nine times in a
//! `Sequence`, turns one letter into a billion, and the crate's allocation of that aborts the
//! process (no error to return). A package's checksums say the file is the one its exporter
//! wrote, not that it is harmless, so the runtime bounds each stage's growth itself: the UTF-8
//! bytes out per byte in, in the worst case, multiplied along `Sequence`s. A tokenizer whose
//! bound exceeds [`MAX_TEXT_GROWTH`] is a package error at load; Qwen3's (NFC, then a regex
//! split and byte-level mapping; a byte-level decoder) is 6 and 1.
//!
//! The file's `padding` and `truncation` are also dropped ([`without_padding_or_truncation`]):
//! a fixed padding length is another allocation of the file's choosing, and transformers turns
//! both off for every call that does not ask for them, as diffusers' and the enhancer's calls
//! do not (the SDK cuts prompts at `max_sequence_length` itself).

use serde_json::Value;
use tokenizers::Tokenizer;

/// The largest growth allowed for the text stages before the model (normalizer times
/// pre-tokenizer) and, separately, for the decoder: ten times Qwen3's, room for the Unicode
/// compatibility forms (NFKC grows UTF-8 at most 11x) but not for a multiplying chain.
pub(crate) const MAX_TEXT_GROWTH: f64 = 64.0;

/// Checks the bounds; the error names the stage and its bound.
pub(crate) fn check(tokenizer: &Tokenizer) -> Result<(), String> {
    let normalizer = growth_of(tokenizer.get_normalizer(), normalizer_growth)?;
    let pre_tokenizer = growth_of(tokenizer.get_pre_tokenizer(), pre_tokenizer_growth)?;
    let decoder = growth_of(tokenizer.get_decoder(), decoder_growth)?;
    for (what, growth) in [("normalizer and pre-tokenizer", normalizer * pre_tokenizer), ("decoder", decoder)] {
        if growth > MAX_TEXT_GROWTH {
            return Err(format!(
                "its {what} can lengthen a text up to {growth:.3e} times (the limit is {MAX_TEXT_GROWTH})"
            ));
        }
    }
    Ok(())
}

/// The tokenizer as transformers runs it for a call without padding or truncation.
pub(crate) fn without_padding_or_truncation(mut tokenizer: Tokenizer) -> Result<Tokenizer, String> {
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

/// A stage's growth from its serialised form (every part of the crate serialises with its
/// `"type"`; the fields read below are the file's own names); an absent stage is 1.
fn growth_of<T: serde::Serialize>(part: Option<&T>, growth: fn(&Value) -> Result<f64, String>) -> Result<f64, String> {
    match part {
        None => Ok(1.0),
        Some(part) => growth(&serde_json::to_value(part).map_err(|e| e.to_string())?),
    }
}

fn kind(part: &Value) -> &str {
    part.get("type").and_then(Value::as_str).unwrap_or("(no type)")
}

/// The product over a `Sequence`'s members (`field` holds the list).
fn sequence(part: &Value, field: &str, growth: fn(&Value) -> Result<f64, String>) -> Result<f64, String> {
    let members = part.get(field).and_then(Value::as_array).ok_or_else(|| format!("a Sequence without {field}"))?;
    members.iter().try_fold(1.0, |product, member| Ok(product * growth(member)?))
}

fn utf8_len(part: &Value, field: &str) -> f64 {
    part.get(field).and_then(Value::as_str).map_or(0, str::len) as f64
}

/// `Replace` (a normalizer and a decoder): each match becomes `content`. A non-empty literal
/// pattern of `p` bytes consumes `p` bytes per `c` written; a regex (or an empty literal) may
/// match the empty string before every byte, so `n` bytes become at most `n + (n + 1) c`.
fn replace_growth(part: &Value) -> f64 {
    let content = utf8_len(part, "content");
    match part.get("pattern").and_then(|p| p.get("String")).and_then(Value::as_str) {
        Some(literal) if !literal.is_empty() => (content / literal.len() as f64).max(1.0),
        _ => 1.0 + 2.0 * content,
    }
}

fn normalizer_growth(part: &Value) -> Result<f64, String> {
    Ok(match kind(part) {
        "Sequence" => sequence(part, "normalizers", normalizer_growth)?,
        // UAX #15's maximum expansion factors for UTF-8 (NFC and NFD 3x, NFKC and NFKD 11x).
        "NFC" | "NFD" => 3.0,
        "NFKC" | "NFKD" => 11.0,
        // The longest lowercase mappings write 3 bytes for 2 (U+0130).
        "Lowercase" => 3.0,
        // Spaces around CJK characters (under 2x), NFD for the accents (3x), lowercase (3x).
        "BertNormalizer" => 18.0,
        "Strip" | "StripAccents" | "Nmt" => 1.0,
        // Each byte becomes one character of at most 2 bytes.
        "ByteLevel" => 2.0,
        "Prepend" => 1.0 + utf8_len(part, "prepend"),
        "Replace" => replace_growth(part),
        // Precompiled's character map can map a character to any string it holds; Qwen3
        // tokenizers never use it, so it is not parsed to find out.
        other => return Err(format!("its normalizer {other:?} cannot be bounded")),
    })
}

fn pre_tokenizer_growth(part: &Value) -> Result<f64, String> {
    Ok(match kind(part) {
        "Sequence" => sequence(part, "pretokenizers", pre_tokenizer_growth)?,
        // Each byte becomes one character of at most 2 bytes, after one space added in front
        // with `add_prefix_space` (n + 1 <= 2n bytes).
        "ByteLevel" => {
            if part.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true) {
                4.0
            } else {
                2.0
            }
        }
        // A 1-byte space becomes the replacement character (at most 4 bytes), plus one in front.
        "Metaspace" => 8.0,
        // These only split the text.
        "BertPreTokenizer" | "CharDelimiterSplit" | "Delimiter" | "Whitespace" | "Split" | "Punctuation"
        | "WhitespaceSplit" | "Digits" | "UnicodeScripts" | "FixedLength" => 1.0,
        other => return Err(format!("its pre-tokenizer {other:?} cannot be bounded")),
    })
}

fn decoder_growth(part: &Value) -> Result<f64, String> {
    Ok(match kind(part) {
        "Sequence" => sequence(part, "decoders", decoder_growth)?,
        // The suffix becomes a space; an empty suffix puts one between every character.
        "BPEDecoder" => {
            if utf8_len(part, "suffix") == 0.0 {
                3.0
            } else {
                1.0
            }
        }
        // A space between tokens.
        "WordPiece" => 2.0,
        "Replace" => replace_growth(part),
        // These map tokens to at most as many bytes.
        "ByteLevel" | "Metaspace" | "CTC" | "Fuse" | "Strip" | "ByteFallback" => 1.0,
        other => return Err(format!("its decoder {other:?} cannot be bounded")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

    /// Each part as a file writes it, read by the crate and serialised back, as `check` sees it.
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(json: &str) -> Value {
        let part: T = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        serde_json::to_value(&part).unwrap()
    }

    #[test]
    fn every_stage_the_crate_knows_has_its_bound() {
        let normalizers = [
            (r#"{"type":"NFC"}"#, 3.0),
            (r#"{"type":"NFD"}"#, 3.0),
            (r#"{"type":"NFKC"}"#, 11.0),
            (r#"{"type":"NFKD"}"#, 11.0),
            (r#"{"type":"Lowercase"}"#, 3.0),
            (
                r#"{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true}"#,
                18.0,
            ),
            (r#"{"type":"Strip","strip_left":true,"strip_right":true}"#, 1.0),
            (r#"{"type":"StripAccents"}"#, 1.0),
            (r#"{"type":"Nmt"}"#, 1.0),
            (r#"{"type":"ByteLevel"}"#, 2.0),
            (r#"{"type":"Prepend","prepend":"▁"}"#, 4.0),
            (r#"{"type":"Replace","pattern":{"String":"ab"},"content":"x"}"#, 1.0),
            (r#"{"type":"Replace","pattern":{"String":"a"},"content":"xyz"}"#, 3.0),
            (r#"{"type":"Replace","pattern":{"String":""},"content":"xyz"}"#, 7.0),
            (r#"{"type":"Replace","pattern":{"Regex":"a*"},"content":"xy"}"#, 5.0),
            (r#"{"type":"Sequence","normalizers":[{"type":"NFKC"},{"type":"Lowercase"}]}"#, 33.0),
        ];
        for (json, bound) in normalizers {
            assert_eq!(normalizer_growth(&round_trip::<NormalizerWrapper>(json)), Ok(bound), "{json}");
        }
        let pre_tokenizers = [
            (r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}"#, 2.0),
            (r#"{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true}"#, 4.0),
            (r#"{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}"#, 8.0),
            (r#"{"type":"BertPreTokenizer"}"#, 1.0),
            (r#"{"type":"CharDelimiterSplit","delimiter":"x"}"#, 1.0),
            (r#"{"type":"Whitespace"}"#, 1.0),
            (r#"{"type":"WhitespaceSplit"}"#, 1.0),
            (r#"{"type":"Punctuation","behavior":"Isolated"}"#, 1.0),
            (r#"{"type":"Digits","individual_digits":true}"#, 1.0),
            (r#"{"type":"UnicodeScripts"}"#, 1.0),
            (r#"{"type":"Split","pattern":{"Regex":"\\s+"},"behavior":"Isolated","invert":false}"#, 1.0),
            (
                r#"{"type":"Sequence","pretokenizers":[{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false},{"type":"Whitespace"}]}"#,
                2.0,
            ),
        ];
        for (json, bound) in pre_tokenizers {
            assert_eq!(pre_tokenizer_growth(&round_trip::<PreTokenizerWrapper>(json)), Ok(bound), "{json}");
        }
        let decoders = [
            (r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}"#, 1.0),
            (r#"{"type":"BPEDecoder","suffix":"</w>"}"#, 1.0),
            (r#"{"type":"BPEDecoder","suffix":""}"#, 3.0),
            (r###"{"type":"WordPiece","prefix":"##","cleanup":true}"###, 2.0),
            (r#"{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}"#, 1.0),
            (r#"{"type":"CTC","pad_token":"<pad>","word_delimiter_token":"|","cleanup":true}"#, 1.0),
            (r#"{"type":"Fuse"}"#, 1.0),
            (r#"{"type":"Strip","content":" ","start":1,"stop":0}"#, 1.0),
            (r#"{"type":"ByteFallback"}"#, 1.0),
            (r#"{"type":"Replace","pattern":{"String":"▁"},"content":" "}"#, 1.0),
            (
                r###"{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"a"},"content":"aaaa"},{"type":"WordPiece","prefix":"##","cleanup":true}]}"###,
                8.0,
            ),
        ];
        for (json, bound) in decoders {
            assert_eq!(decoder_growth(&round_trip::<DecoderWrapper>(json)), Ok(bound), "{json}");
        }
    }

    fn qwen3() -> Tokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage/tokenizer.json");
        Tokenizer::from_file(path).expect("the committed Qwen3 tokenizer")
    }

    #[test]
    fn qwen3_is_within_the_limit_and_a_multiplying_chain_is_not() {
        let mut tokenizer = qwen3();
        assert_eq!(growth_of(tokenizer.get_normalizer(), normalizer_growth), Ok(3.0));
        assert_eq!(growth_of(tokenizer.get_pre_tokenizer(), pre_tokenizer_growth), Ok(2.0));
        assert_eq!(growth_of(tokenizer.get_decoder(), decoder_growth), Ok(1.0));
        assert_eq!(check(&tokenizer), Ok(()));

        let chain =
            |json: &str, n: usize| format!(r#"{{"type":"Sequence","normalizers":[{}]}}"#, vec![json; n].join(","));
        let replace = r#"{"type":"Replace","pattern":{"String":"a"},"content":"aaaaaaaaaa"}"#;
        tokenizer.with_normalizer(Some(serde_json::from_str::<NormalizerWrapper>(&chain(replace, 9)).unwrap()));
        let err = check(&tokenizer).unwrap_err();
        assert_eq!(err, "its normalizer and pre-tokenizer can lengthen a text up to 2.000e9 times (the limit is 64)");
        // NFKC, the widest Unicode form, stays within the limit with Qwen3's pre-tokenizer.
        tokenizer.with_normalizer(Some(serde_json::from_str::<NormalizerWrapper>(r#"{"type":"NFKC"}"#).unwrap()));
        assert_eq!(check(&tokenizer), Ok(()));
        // Precompiled maps characters to strings of its own: refused, not guessed. (The map
        // here is a one-unit trie, the smallest the crate parses.)
        let precompiled = serde_json::from_str::<NormalizerWrapper>(
            r#"{"type":"Precompiled","precompiled_charsmap":"BAAAAAAAAAA="}"#,
        );
        tokenizer.with_normalizer(Some(precompiled.unwrap()));
        assert_eq!(check(&tokenizer).unwrap_err(), "its normalizer \"Precompiled\" cannot be bounded");
        tokenizer.with_normalizer(None::<NormalizerWrapper>);
        let byte_levels = format!(
            r#"{{"type":"Sequence","pretokenizers":[{}]}}"#,
            vec![r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}"#; 40]
                .join(",")
        );
        tokenizer.with_pre_tokenizer(Some(serde_json::from_str::<PreTokenizerWrapper>(&byte_levels).unwrap()));
        assert!(check(&tokenizer).unwrap_err().contains("up to 1.100e12 times"));
        tokenizer.with_pre_tokenizer(None::<PreTokenizerWrapper>);
        let decoders = format!(r#"{{"type":"Sequence","decoders":[{}]}}"#, [replace; 3].join(","));
        tokenizer.with_decoder(Some(serde_json::from_str::<DecoderWrapper>(&decoders).unwrap()));
        assert_eq!(
            check(&tokenizer).unwrap_err(),
            "its decoder can lengthen a text up to 1.000e3 times (the limit is 64)"
        );
    }

    /// A file's padding (here to 10^11 tokens, an allocation that aborted) and truncation are
    /// dropped: the ids are those of the text alone, as transformers gives for a plain call.
    #[test]
    fn a_file_s_padding_and_truncation_are_dropped() {
        let mut tokenizer = qwen3();
        let padding: tokenizers::PaddingParams =
            serde_json::from_str(r#"{"strategy":{"Fixed":100000000000},"direction":"Right","pad_to_multiple_of":null,"pad_id":0,"pad_type_id":0,"pad_token":"!"}"#).unwrap();
        tokenizer.with_padding(Some(padding));
        tokenizer.with_truncation(Some(tokenizers::TruncationParams { max_length: 1, ..Default::default() })).unwrap();
        let tokenizer = without_padding_or_truncation(tokenizer).unwrap();
        assert_eq!(tokenizer.encode("hello world", true).unwrap().get_ids(), [14_990, 1_879]);
    }
}
