//! Text in and out: the model's tokenizer (`tokenizer.json`) and streaming detokenization.

use std::path::Path;

use tokenizers::Tokenizer;

/// A model's tokenizer.
pub struct Text {
    tokenizer: Tokenizer,
}

impl Text {
    /// Loads `dir/tokenizer.json`; `Ok(None)` when the model has none.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| format!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Some(Text { tokenizer }))
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds (a BOS, typically).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, with or without the special tokens the tokenizer adds (a rendered
    /// chat template writes its own).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id the tokenizer puts in front of every text (its post-processor's BOS), if it adds
    /// one: the first id of `encode` when the rest is `encode_with(.., false)`.
    pub fn added_bos(&self) -> Result<Option<u32>, String> {
        let with = self.encode_with("a", true)?;
        let without = self.encode_with("a", false)?;
        Ok((with.len() > without.len() && with[1..].starts_with(&without)).then(|| with[0]))
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| format!("cannot decode token ids: {e}"))
    }
}

/// Turns a sequence's tokens into text as they arrive, as text-generation-inference does: each
/// new token's text is the decoded window of recent tokens minus the window before it, so a
/// token is decoded in context (byte-level pieces, leading-space rules) in time proportional to
/// the window, not the sequence. Text that ends in an incomplete UTF-8 character is held back
/// until the character completes.
#[derive(Clone, Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens whose text has been emitted.
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes (possibly empty).
    pub fn push(&mut self, text: &Text, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let before = text.decode(&self.ids[self.prefix..self.read])?;
        let now = text.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(now[before.len()..].to_owned())
        } else {
            Ok(String::new())
        }
    }

    /// The text held back at the end (an incomplete character, or tokens with no text yet).
    pub fn finish(&mut self, text: &Text) -> Result<String, String> {
        let before = text.decode(&self.ids[self.prefix..self.read])?;
        let now = text.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_owned())
    }
}
