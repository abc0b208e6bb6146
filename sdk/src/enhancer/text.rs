//! Generated tokens as text: streaming pieces that never split a character, and separating
//! the `<think>` block from the answer.

use tokenizers::Tokenizer;

/// Splits generated text into (reasoning, answer). The answer is what follows the last
/// `</think>`; text that opens a think block and never closes it is all reasoning (the token
/// limit cut the model off), leaving an empty answer.
pub fn split_thinking(raw: &str, open: &str, close: &str) -> (Option<String>, String) {
    if let Some(end) = raw.rfind(close) {
        let inner = &raw[..end];
        let inner = inner.find(open).map_or(inner, |s| &inner[s + open.len()..]);
        return (Some(inner.trim().to_string()), raw[end + close.len()..].trim().to_string());
    }
    let trimmed = raw.trim_start();
    if let Some(rest) = trimmed.strip_prefix(open) {
        return (Some(rest.trim().to_string()), String::new());
    }
    (None, raw.trim().to_string())
}

/// Turns tokens into text pieces as they arrive. Byte-level BPE tokens can end inside a UTF-8
/// character; such a piece decodes to U+FFFD and is held back until the character completes.
#[derive(Default)]
pub(crate) struct TextStream {
    ids: Vec<u32>,
    emitted: usize, // bytes of the decoded text already handed out
}

impl TextStream {
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.ids.push(token);
        let text = tokenizer.decode(&self.ids, true).unwrap_or_default();
        if text.ends_with('\u{FFFD}')
            || !text.is_char_boundary(self.emitted.min(text.len()))
            || text.len() < self.emitted
        {
            return String::new();
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        piece
    }
}

#[cfg(test)]
mod tests {
    use super::split_thinking;

    #[test]
    fn think_blocks_never_reach_the_answer() {
        let s = |raw| split_thinking(raw, "<think>", "</think>");
        assert_eq!(
            s("<think>\n3*2+2*4 = 14 legs\n</think>\n\nThree hens and two rabbits."),
            (Some("3*2+2*4 = 14 legs".into()), "Three hens and two rabbits.".into())
        );
        assert_eq!(s("<think>\n\n</think>\n\n A red fox. "), (Some(String::new()), "A red fox.".into()));
        assert_eq!(
            s("<think>\nstill thinking when the limit hit"),
            (Some("still thinking when the limit hit".into()), String::new())
        );
        assert_eq!(s(" A plain answer.\n"), (None, "A plain answer.".into()));
    }
}
