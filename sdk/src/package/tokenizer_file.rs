//! Reading a package's `tokenizer.json`, quickly.
//!
//! `tokenizers::Tokenizer::from_file` reads the model section through serde's untagged-enum
//! buffering and a `serde_json::Value` (a `BTreeMap` of the whole 151,643-entry vocabulary),
//! then converts that again into the BPE model: about 0.3 s of CPU per load on this project's
//! machine, the longest single piece of a quantized package's load (docs/loading.md). For the
//! byte-level BPE files that Z-Image packages carry, [`load`] reads the model's vocabulary and
//! merges straight into the types `BpeBuilder` takes and every other part with the crate's own
//! deserializers, then assembles the tokenizer as the crate's deserializer does (the builder,
//! then the added tokens in file order). Any other file (another model type, merges in the
//! legacy `"a b"` form, another format version) goes through `Tokenizer::from_bytes`, which also
//! words the error for a broken one. Either way the result must pass [`tokenizer_limits`].

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerBuilder, TruncationParams,
};

use super::tokenizer_limits;

/// Reads a package's `tokenizer.json`; a file that cannot be read or parsed is a package error.
pub(crate) fn read(path: &Path) -> crate::error::Result<Tokenizer> {
    load(path).map_err(|e| crate::error::Error::package(path, format!("tokenizer.json cannot be loaded: {e}")))
}

/// Reads `path` as a tokenizer; the error is the `tokenizers` crate's wording.
pub(crate) fn load(path: &Path) -> Result<Tokenizer, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    // The crate panics on some malformed parts (a `Precompiled` normalizer whose character map
    // does not parse): that is a broken file here, not the end of the process.
    let parsed = std::panic::catch_unwind(|| match from_bpe_file(&bytes) {
        Some(tokenizer) => Ok(tokenizer),
        None => Tokenizer::from_bytes(&bytes).map_err(|e| e.to_string()),
    });
    let tokenizer = parsed.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(format!("the tokenizers crate failed on it ({message})"))
    })?;
    tokenizer_limits::check(&tokenizer)?;
    tokenizer_limits::without_padding_or_truncation(tokenizer)
}

/// The fast path: `None` when the file is not a version-1.0 BPE tokenizer with merges as
/// pairs (or does not parse), for the caller to read it the general way.
fn from_bpe_file(bytes: &[u8]) -> Option<Tokenizer> {
    let file: BpeTokenizerFile = serde_json::from_slice(bytes).ok()?;
    if file.version != "1.0" || file.model.kind != "BPE" {
        return None;
    }
    let model = file.model;
    let mut bpe = BPE::builder().vocab_and_merges(model.vocab, model.merges);
    // The same options, applied the same way, as the crate's BPE deserializer.
    if let Some(dropout) = model.dropout {
        bpe = bpe.dropout(dropout);
    }
    if let Some(unk) = model.unk_token {
        bpe = bpe.unk_token(unk);
    }
    if let Some(prefix) = model.continuing_subword_prefix {
        bpe = bpe.continuing_subword_prefix(prefix);
    }
    if let Some(suffix) = model.end_of_word_suffix {
        bpe = bpe.end_of_word_suffix(suffix);
    }
    if let Some(fuse_unk) = model.fuse_unk {
        bpe = bpe.fuse_unk(fuse_unk);
    }
    if let Some(byte_fallback) = model.byte_fallback {
        bpe = bpe.byte_fallback(byte_fallback);
    }
    if let Some(ignore_merges) = model.ignore_merges {
        bpe = bpe.ignore_merges(ignore_merges);
    }
    let mut tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(bpe.build().ok()?.into())
    .with_normalizer(file.normalizer)
    .with_pre_tokenizer(file.pre_tokenizer)
    .with_post_processor(file.post_processor)
    .with_decoder(file.decoder)
    .with_truncation(file.truncation)
    .with_padding(file.padding)
    .build()
    .ok()?;
    // As the crate's deserializer: the added tokens get their ids from the model's vocabulary
    // or, when absent from it, the next free id, in file order.
    let added: Vec<AddedToken> = file.added_tokens.into_iter().map(|t| t.token).collect();
    tokenizer.add_tokens(&added);
    Some(tokenizer.into())
}

/// `tokenizer.json` with a BPE model; the other sections in the crate's own types.
#[derive(Deserialize)]
struct BpeTokenizerFile {
    version: String,
    #[serde(default)]
    truncation: Option<TruncationParams>,
    #[serde(default)]
    padding: Option<PaddingParams>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenWithId>,
    #[serde(default)]
    normalizer: Option<NormalizerWrapper>,
    #[serde(default)]
    pre_tokenizer: Option<PreTokenizerWrapper>,
    #[serde(default)]
    post_processor: Option<PostProcessorWrapper>,
    #[serde(default)]
    decoder: Option<DecoderWrapper>,
    model: BpeModel,
}

#[derive(Deserialize)]
struct AddedTokenWithId {
    /// The id the file says; the tokenizer assigns its own (the crate only warns on a mismatch).
    #[allow(dead_code)]
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

#[derive(Deserialize)]
struct BpeModel {
    #[serde(rename = "type")]
    kind: String,
    vocab: Vocab,
    /// Pairs; the legacy `"a b"` strings fail this parse and take the general path.
    merges: Merges,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed_tokenizer() -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage/tokenizer.json");
        std::fs::read(path).expect("the committed Qwen3 tokenizer")
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, true).expect("encodes").get_ids().to_vec()
    }

    /// The fast path builds the same tokenizer as the crate: the whole serialised form (vocab,
    /// merges in rank order, added tokens with their ids and flags, every pipeline part) is
    /// equal, and so are encodings of text that exercises each part.
    #[test]
    fn qwen3_tokenizer_is_the_one_the_crate_builds() {
        let bytes = committed_tokenizer();
        let fast = from_bpe_file(&bytes).expect("the package tokenizer takes the fast path");
        let general = Tokenizer::from_bytes(&bytes).unwrap();
        // Compared whole but not printed: the serialised form is 11 MB.
        let (fast_json, general_json) = (fast.to_string(false).unwrap(), general.to_string(false).unwrap());
        let first_difference = fast_json.bytes().zip(general_json.bytes()).position(|(a, b)| a != b);
        assert!(
            fast_json == general_json,
            "serialised forms differ: lengths {} and {}, first difference at byte {first_difference:?}",
            fast_json.len(),
            general_json.len()
        );
        assert_eq!(fast.get_vocab_size(true), 151_669);
        let texts = [
            "<|im_start|>user\na red fox sitting in fresh snow<|im_end|>\n<|im_start|>assistant\n",
            "一只红色的狐狸坐在新雪中，日出时分",
            "Tokens: don't, we'll, I'M  double  spaces\t\ttabs\r\n\n 12345 3.14159 🦊🎨 café Ωmega",
            "<think>\n\n</think>\n\n<|endoftext|><|vision_start|>",
            "",
        ];
        for text in texts {
            assert_eq!(ids(&fast, text), ids(&general, text), "{text:?}");
            let round = fast.decode(&ids(&fast, text), false).unwrap();
            assert_eq!(round, general.decode(&ids(&general, text), false).unwrap());
        }
        assert_eq!(ids(&fast, "<|im_end|>"), vec![151_645]);
        assert_eq!(ids(&fast, "hello world"), vec![14_990, 1_879]);
    }

    /// Files the fast path does not take still load, through the crate, with the same result.
    #[test]
    fn other_tokenizer_files_take_the_general_path() {
        let legacy_merges = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
            "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
            "vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}"#;
        let word_level = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"ab":1},"unk_token":"[UNK]"}}"#;
        for json in [legacy_merges, word_level] {
            assert!(from_bpe_file(json.as_bytes()).is_none());
            let dir = std::env::temp_dir().join(format!("zimage-tokenizer-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("tokenizer.json");
            std::fs::write(&path, json).unwrap();
            let loaded = load(&path).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            assert_eq!(ids(&loaded, "ab"), vec![if json.contains("WordLevel") { 1 } else { 2 }]);
        }
        let version_2 = String::from_utf8(committed_tokenizer()).unwrap().replacen("\"1.0\"", "\"2.0\"", 1);
        assert!(from_bpe_file(version_2.as_bytes()).is_none());
        assert!(Tokenizer::from_bytes(version_2.as_bytes()).is_err());
    }

    #[test]
    fn broken_files_are_errors_in_the_crate_s_words() {
        let dir = std::env::temp_dir().join(format!("zimage-tokenizer-broken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let committed = committed_tokenizer();
        std::fs::write(&path, &committed[..committed.len() / 2]).unwrap();
        let truncated = load(&path).unwrap_err();
        std::fs::write(&path, b"{\"version\":\"1.0\",\"model\":{\"type\":\"BPE\"}}").unwrap();
        let no_vocab = load(&path).unwrap_err();
        let missing = load(&dir.join("absent.json")).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(truncated.contains("EOF"), "{truncated}");
        assert!(no_vocab.contains("vocab"), "{no_vocab}");
        assert!(missing.contains("No such file"), "{missing}");
    }

    /// The crate panics on a `Precompiled` normalizer whose character map does not parse; that
    /// is an error for this file, and the next load works.
    #[test]
    fn a_part_the_crate_panics_on_is_an_error() {
        let dir = std::env::temp_dir().join(format!("zimage-tokenizer-panic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let mut file: serde_json::Value = serde_json::from_slice(&committed_tokenizer()).unwrap();
        file["normalizer"] = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": ""});
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let err = load(&path).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(err, "the tokenizers crate failed on it (Precompiled: Error(\"Cannot parse precompiled_charsmap\", line: 0, column: 0))");
        assert_eq!(ids(&from_bpe_file(&committed_tokenizer()).unwrap(), "hello world"), vec![14_990, 1_879]);
    }
}
