//! Docker's Dockerfile word processing: the small shell lexer BuildKit applies
//! to the arguments of ENV, ARG, LABEL, WORKDIR, USER, EXPOSE, COPY/ADD,
//! STOPSIGNAL and VOLUME.
//!
//! Rules, as in Docker (`frontend/dockerfile/shell/lex.go`):
//!
//! - `$NAME` and `${NAME}` expand to the variable's value, or to nothing when
//!   it is unset. A name is letters, digits and `_` not starting with a digit,
//!   or only digits (`$1`). A `$` not followed by a name is a literal `$`.
//! - `${NAME:-word}` gives `word` when NAME is unset or empty, `${NAME-word}`
//!   only when it is unset; `${NAME:+word}` gives `word` when NAME is set and
//!   not empty (else nothing), `${NAME+word}` when it is set; `${NAME:?msg}` and
//!   `${NAME?msg}` fail with `msg` when NAME is unset (or empty, with `:`).
//!   `word` is itself processed (it may hold quotes and variables). The newer
//!   pattern forms (`${NAME#pat}`, `${NAME%pat}`, `${NAME/a/b}`) are refused as
//!   bad substitutions.
//! - Text in single quotes is literal. Text in double quotes has variables
//!   expanded; in it a backslash escapes only `"`, `$` and `\`, other
//!   backslashes stay. Outside quotes a backslash takes the next character
//!   literally (a trailing one is dropped).
//! - Only the backslash is an escape character (the `# escape=` parser
//!   directive selecting a backtick is not supported here).
//!
//! Substitutions read the variables as they were before the instruction: in
//! `ENV A=2 B=$A`, `B` gets the *previous* value of `A` (Docker evaluates the
//! whole line against the environment before it). The functions here only
//! read through the `lookup` they are given, so that is the caller's
//! contract: apply the results of a line after processing all of it.

/// Looks a variable up: `None` when it is unset.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Errors processing words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WordError {
    #[error("unexpected end of statement while looking for matching single-quote in {0:?}")]
    UnterminatedSingleQuote(String),
    #[error("unexpected end of statement while looking for matching double-quote in {0:?}")]
    UnterminatedDoubleQuote(String),
    #[error("syntax error: missing '}}' in {0:?}")]
    MissingBrace(String),
    #[error("syntax error: bad substitution in {0:?}")]
    BadSubstitution(String),
    #[error("unsupported modifier ({modifier}) in substitution in {input:?}")]
    UnsupportedModifier { modifier: char, input: String },
    #[error("{name}: {message}")]
    Required { name: String, message: String },
    #[error("syntax error: can't find = in {0:?}; must be of the form: name=value")]
    MissingEquals(String),
    #[error("empty variable name in {0:?}")]
    EmptyName(String),
}

/// Expands variables in `s`, keeping quotes and escapes as they are: quotes
/// are not removed, text in single quotes is not expanded (`'$X'` stays
/// `'$X'`), `\$` gives a literal `$` and any other backslash pair is kept
/// whole. The result is final text, not meant to be lexed again.
pub fn expand(s: &str, lookup: Lookup<'_>) -> Result<String, WordError> {
    let mut out = String::new();
    Lexer::new(s, lookup, Quotes::Keep).run_all(&mut out)?;
    Ok(out)
}

/// Docker's `ProcessWord`: expands variables and removes quotes and escapes,
/// without splitting (`/my "two words"` gives `/my two words`). This is what
/// Docker applies to WORKDIR, USER, STOPSIGNAL and to ENV/LABEL values.
pub fn process_word(s: &str, lookup: Lookup<'_>) -> Result<String, WordError> {
    let mut out = String::new();
    Lexer::new(s, lookup, Quotes::Remove).run_all(&mut out)?;
    Ok(out)
}

/// Docker's `ProcessWords`: splits `s` on unquoted whitespace, expanding
/// variables and removing quotes. The value of an unquoted variable is split
/// too (`$X` with `X="a b"` gives two words); a quoted one is not. Empty
/// words are dropped, as Docker does (`""` alone gives no word).
pub fn split_words(s: &str, lookup: Lookup<'_>) -> Result<Vec<String>, WordError> {
    let mut out = Words::default();
    Lexer::new(s, lookup, Quotes::Remove).run_all(&mut out)?;
    Ok(out.finish())
}

/// The arguments of ENV and LABEL (and of a one-name ARG).
///
/// - `K=V K2="two words" K3=`: every word is split at its first `=`; the key
///   and the value are each processed like [`process_word`]. In this form a
///   word without `=` is an error, as in Docker.
/// - `K value with spaces` (the legacy form, the first word has no `=` and
///   more text follows): the key is the first word and the value all the rest
///   of the line after the whitespace following it, processed like
///   [`process_word`] (variables expanded, quotes removed, inner whitespace
///   kept as written).
/// - `K` alone: `(K, None)` (an ARG without a default).
///
/// All substitutions see the variables as they were before the line (see the
/// module documentation).
pub fn key_values(s: &str, lookup: Lookup<'_>) -> Result<Vec<(String, Option<String>)>, WordError> {
    let words = raw_words(s);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        if words.len() == 1 {
            return Ok(vec![(key(first, lookup)?, None)]);
        }
        let line = s.trim();
        let (k, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = process_word(rest.trim_start(), lookup)?;
        return Ok(vec![(key(k, lookup)?, Some(value))]);
    }
    words
        .iter()
        .map(|w| {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| WordError::MissingEquals(w.clone()))?;
            Ok((key(k, lookup)?, Some(process_word(v, lookup)?)))
        })
        .collect()
}

/// The arguments of ARG: every word is `NAME` (no default: `None`) or
/// `NAME=value`. Unlike [`key_values`] there is no legacy form: `ARG A B`
/// declares two arguments.
pub fn arg_values(s: &str, lookup: Lookup<'_>) -> Result<Vec<(String, Option<String>)>, WordError> {
    raw_words(s)
        .iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => Ok((key(k, lookup)?, Some(process_word(v, lookup)?))),
            None => Ok((key(w, lookup)?, None)),
        })
        .collect()
}

/// A processed key, which must not be empty.
fn key(raw: &str, lookup: Lookup<'_>) -> Result<String, WordError> {
    let k = process_word(raw, lookup)?;
    if k.is_empty() {
        return Err(WordError::EmptyName(raw.to_string()));
    }
    Ok(k)
}

/// Docker's parser-level `parseWords`: splits on unquoted whitespace keeping
/// quotes and escapes in the words (they are processed afterwards). Lenient:
/// an unterminated quote ends the last word, and processing reports it.
fn raw_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                word.push(c);
                if c == q {
                    quote = None;
                } else if c == '\\' && q == '"' {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                in_word = true;
                word.push(c);
                if c == '\'' || c == '"' {
                    quote = Some(c);
                } else if c == '\\' {
                    if let Some(n) = chars.next() {
                        word.push(n);
                    }
                }
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Whether quotes (and escapes) are kept in the output or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quotes {
    Keep,
    Remove,
}

/// Where lexed text goes.
trait Sink {
    /// Text subject to word splitting: unquoted characters and expansions.
    fn split(&mut self, s: &str);
    /// Text never split: quoted or escaped.
    fn raw(&mut self, s: &str);
}

impl Sink for String {
    fn split(&mut self, s: &str) {
        self.push_str(s);
    }
    fn raw(&mut self, s: &str) {
        self.push_str(s);
    }
}

/// Collects words, splitting on whitespace in `split` text.
#[derive(Default)]
struct Words {
    words: Vec<String>,
    current: String,
}

impl Words {
    fn end_word(&mut self) {
        if !self.current.is_empty() {
            self.words.push(std::mem::take(&mut self.current));
        }
    }
    fn finish(mut self) -> Vec<String> {
        self.end_word();
        self.words
    }
}

impl Sink for Words {
    fn split(&mut self, s: &str) {
        for c in s.chars() {
            if c.is_whitespace() {
                self.end_word();
            } else {
                self.current.push(c);
            }
        }
    }
    fn raw(&mut self, s: &str) {
        self.current.push_str(s);
    }
}

struct Lexer<'a> {
    input: &'a str,
    chars: Vec<char>,
    pos: usize,
    lookup: Lookup<'a>,
    quotes: Quotes,
}

impl<'a> Lexer<'a> {
    fn new(input: &'a str, lookup: Lookup<'a>, quotes: Quotes) -> Self {
        Lexer {
            input,
            chars: input.chars().collect(),
            pos: 0,
            lookup,
            quotes,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn keep(&self) -> bool {
        self.quotes == Quotes::Keep
    }

    fn run_all(&mut self, sink: &mut dyn Sink) -> Result<(), WordError> {
        self.run(None, sink).map(|_| ())
    }

    /// Lexes up to `stop` (consumed; outside quotes) or the end. Returns
    /// whether `stop` was found.
    fn run(&mut self, stop: Option<char>, sink: &mut dyn Sink) -> Result<bool, WordError> {
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok(true);
            }
            match c {
                '\'' => sink.raw(&self.single_quoted()?),
                '"' => sink.raw(&self.double_quoted()?),
                '$' => sink.split(&self.dollar()?),
                '\\' => {
                    self.pos += 1;
                    self.escape(sink);
                }
                _ => {
                    self.pos += 1;
                    sink.split(c.encode_utf8(&mut [0; 4]));
                }
            }
        }
        Ok(false)
    }

    /// After an unquoted backslash.
    fn escape(&mut self, sink: &mut dyn Sink) {
        match self.next() {
            None if self.keep() => sink.raw("\\"),
            None => {}
            Some('$') => sink.raw("$"),
            Some(c) if self.keep() => sink.raw(&format!("\\{c}")),
            Some(c) => sink.raw(c.encode_utf8(&mut [0; 4])),
        }
    }

    fn single_quoted(&mut self) -> Result<String, WordError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(WordError::UnterminatedSingleQuote(self.input.into())),
                Some('\'') => break,
                Some(c) => out.push(c),
            }
        }
        Ok(if self.keep() { format!("'{out}'") } else { out })
    }

    fn double_quoted(&mut self) -> Result<String, WordError> {
        self.pos += 1;
        let mut out = String::new();
        if self.keep() {
            out.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(WordError::UnterminatedDoubleQuote(self.input.into())),
                Some('"') => {
                    self.pos += 1;
                    break;
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some('\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some('$') => {
                            self.pos += 1;
                            out.push('$');
                        }
                        Some(c @ ('"' | '\\')) => {
                            self.pos += 1;
                            if self.keep() {
                                out.push('\\');
                            }
                            out.push(c);
                        }
                        // Other backslashes stay; the next character is
                        // handled normally.
                        _ => out.push('\\'),
                    }
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
        if self.keep() {
            out.push('"');
        }
        Ok(out)
    }

    /// A variable name: digits only, or a letter or `_` then letters, digits
    /// and `_`. Empty when none follows.
    fn name(&mut self) -> String {
        let mut name = String::new();
        if self.peek().is_some_and(|c| c.is_ascii_digit()) {
            while let Some(c) = self.peek().filter(char::is_ascii_digit) {
                name.push(c);
                self.pos += 1;
            }
            return name;
        }
        while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || *c == '_') {
            name.push(c);
            self.pos += 1;
        }
        name
    }

    /// At a `$`: its expansion.
    fn dollar(&mut self) -> Result<String, WordError> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok((self.lookup)(&name).unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err(WordError::MissingBrace(self.input.into())),
            Some('{' | '}' | ':') => return Err(WordError::BadSubstitution(self.input.into())),
            Some(_) => {}
        }
        let name = self.name();
        if name.is_empty() {
            return Err(WordError::BadSubstitution(self.input.into()));
        }
        match self.next() {
            None => Err(WordError::MissingBrace(self.input.into())),
            Some('}') => Ok((self.lookup)(&name).unwrap_or_default()),
            Some(':') => match self.next() {
                None => Err(WordError::MissingBrace(self.input.into())),
                Some(m) => self.modified(&name, m, true),
            },
            Some(m @ ('-' | '+' | '?')) => self.modified(&name, m, false),
            Some(_) => Err(WordError::BadSubstitution(self.input.into())),
        }
    }

    /// `${name<modifier>word}` after the modifier; `colon`: the `:` forms,
    /// which treat an empty value as unset.
    fn modified(&mut self, name: &str, modifier: char, colon: bool) -> Result<String, WordError> {
        if !matches!(modifier, '-' | '+' | '?') {
            return Err(WordError::UnsupportedModifier {
                modifier,
                input: self.input.into(),
            });
        }
        let mut word = String::new();
        if !self.run(Some('}'), &mut word)? {
            return Err(WordError::MissingBrace(self.input.into()));
        }
        let value = (self.lookup)(name);
        let set = value.as_ref().is_some_and(|v| !colon || !v.is_empty());
        match modifier {
            '-' if set => Ok(value.unwrap_or_default()),
            '-' => Ok(word),
            '+' if set => Ok(word),
            '+' => Ok(String::new()),
            _ if set => Ok(value.unwrap_or_default()),
            _ => Err(WordError::Required {
                name: name.to_string(),
                message: required_message(&word, value.is_some()),
            }),
        }
    }
}

fn required_message(word: &str, present: bool) -> String {
    match (word.is_empty(), present) {
        (false, _) => word.to_string(),
        (true, false) => "is not allowed to be unset".into(),
        (true, true) => "is not allowed to be empty".into(),
    }
}

#[cfg(test)]
mod tests;
