//! Path patterns: Go's `filepath.Match` per path segment (`*`, `?`,
//! `[class]`, `\` escapes), plus `**` as a whole segment matching any number
//! of directories; and `.dockerignore` rules built from them.

use std::path::{Component, Path};

/// A malformed pattern (an unterminated or empty `[class]`, a trailing `\`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadPattern;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`
    One,
    /// `*`
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// `**`: any number of segments (at least one when it ends the pattern,
    /// as in Docker, where `dir/**` does not match `dir` itself).
    Any,
    Toks(Vec<Tok>),
}

/// A compiled pattern over `/`-separated relative paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pattern {
    segs: Vec<Seg>,
}

/// Whether `s` has glob metacharacters (`*`, `?`, `[`) outside escapes.
pub(super) fn has_meta(s: &str) -> bool {
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

impl Pattern {
    /// Compiles `pattern` (already cleaned: no `.` or empty segments).
    pub(super) fn new(pattern: &str) -> Result<Pattern, BadPattern> {
        let segs = pattern
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s == "**" {
                    Ok(Seg::Any)
                } else {
                    compile_segment(s).map(Seg::Toks)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Pattern { segs })
    }

    /// Whether the whole of `parts` matches.
    pub(super) fn matches(&self, parts: &[&str]) -> bool {
        match_segs(&self.segs, parts)
    }

    /// How many segments the pattern has.
    pub(super) fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// Whether segment `i` is `**`.
    pub(super) fn is_any(&self, i: usize) -> bool {
        matches!(self.segs.get(i), Some(Seg::Any))
    }

    /// Whether segment `i` (not `**`) matches the name `name`.
    pub(super) fn segment_matches(&self, i: usize, name: &str) -> bool {
        match self.segs.get(i) {
            Some(Seg::Toks(t)) => match_toks(t, &name.chars().collect::<Vec<_>>()),
            Some(Seg::Any) => true,
            None => false,
        }
    }
}

/// Whether `segs` match the whole of `parts`. Bottom-up over suffixes:
/// `ok[i][j]` is whether `segs[i..]` match `parts[j..]`, so each pair is
/// decided once. (Trying every split of each `**` in turn took exponential
/// time: a `.dockerignore` line of 25 nested `**` hung the build.)
fn match_segs(segs: &[Seg], parts: &[&str]) -> bool {
    let (ns, np) = (segs.len(), parts.len());
    let mut ok = vec![vec![false; np + 1]; ns + 1];
    ok[ns][np] = true;
    for i in (0..ns).rev() {
        for j in (0..=np).rev() {
            ok[i][j] = match &segs[i] {
                // `**` last needs at least one segment.
                Seg::Any if i + 1 == ns => j < np,
                // Zero segments, or one more and still `**`.
                Seg::Any => ok[i + 1][j] || (j < np && ok[i][j + 1]),
                Seg::Toks(t) => {
                    j < np
                        && ok[i + 1][j + 1]
                        && match_toks(t, &parts[j].chars().collect::<Vec<_>>())
                }
            };
        }
    }
    ok[0][0]
}

fn compile_segment(s: &str) -> Result<Vec<Tok>, BadPattern> {
    let chars: Vec<char> = s.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::One),
            '\\' => {
                i += 1;
                toks.push(Tok::Lit(*chars.get(i).ok_or(BadPattern)?));
            }
            '[' => {
                let (tok, next) = compile_class(&chars, i + 1)?;
                toks.push(tok);
                i = next;
                continue;
            }
            c => toks.push(Tok::Lit(c)),
        }
        i += 1;
    }
    Ok(toks)
}

/// A `[class]` starting after its `[` at `i`; returns it and the index after
/// its `]`. Go's rules: `^` (here also `!`) negates, `lo-hi` ranges, `\`
/// escapes, at least one range, `-` and `]` must be escaped inside.
fn compile_class(chars: &[char], mut i: usize) -> Result<(Tok, usize), BadPattern> {
    let mut negated = false;
    if matches!(chars.get(i), Some('^' | '!')) {
        negated = true;
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        if chars.get(i) == Some(&']') && !ranges.is_empty() {
            return Ok((Tok::Class { negated, ranges }, i + 1));
        }
        let (lo, next) = class_char(chars, i)?;
        i = next;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            let (h, next) = class_char(chars, i + 1)?;
            hi = h;
            i = next;
        }
        ranges.push((lo, hi));
    }
}

fn class_char(chars: &[char], i: usize) -> Result<(char, usize), BadPattern> {
    match chars.get(i) {
        None | Some('-' | ']') => Err(BadPattern),
        Some('\\') => chars.get(i + 1).map(|c| (*c, i + 2)).ok_or(BadPattern),
        Some(c) => Ok((*c, i + 1)),
    }
}

/// Matches `name` against `toks`, backtracking on the last `*`.
fn match_toks(toks: &[Tok], name: &[char]) -> bool {
    let (mut t, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match toks.get(t) {
            Some(Tok::Star) => {
                star = Some((t, n));
                t += 1;
                continue;
            }
            Some(tok) if one_matches(tok, name[n]) => {
                t += 1;
                n += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((st, sn)) => {
                t = st + 1;
                n = sn + 1;
                star = Some((st, sn + 1));
            }
            None => return false,
        }
    }
    toks.get(t..)
        .unwrap_or_default()
        .iter()
        .all(|t| *t == Tok::Star)
}

fn one_matches(tok: &Tok, c: char) -> bool {
    match tok {
        Tok::Lit(l) => *l == c,
        Tok::One => true,
        Tok::Star => false,
        Tok::Class { negated, ranges } => {
            ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated
        }
    }
}

/// Lexically cleans a `/`-separated path: drops `.`, empty segments and a
/// leading `/`; `..` removes the previous segment. `Err` when a `..` would
/// leave the top.
pub(super) fn clean(path: &str) -> Result<Vec<String>, ()> {
    let mut out: Vec<String> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop().ok_or(())?;
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// One `.dockerignore` line.
#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
    /// A `!` line: re-includes what it matches.
    exception: bool,
}

/// `.dockerignore` rules, in file order; later lines win.
#[derive(Debug, Clone, Default)]
pub(super) struct Ignore {
    rules: Vec<Rule>,
}

impl Ignore {
    /// Parses a `.dockerignore` file. `Err((line number, line))` for a bad
    /// pattern.
    pub(super) fn parse(text: &str) -> Result<Ignore, (usize, String)> {
        let mut rules = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (n, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            let bad = || (n + 1, line.to_string());
            let (exception, body) = match trimmed.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, trimmed),
            };
            if body.is_empty() {
                return Err(bad());
            }
            // `..` above the root is kept by Go's Clean and matches nothing.
            let Ok(segs) = clean(body) else { continue };
            let pattern = Pattern::new(&segs.join("/")).map_err(|_| bad())?;
            rules.push(Rule { pattern, exception });
        }
        Ok(Ignore { rules })
    }

    /// Whether there are `!` exceptions (an ignored directory may then still
    /// hold files that are not).
    pub(super) fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.exception)
    }

    /// Whether the context-relative `parts` is ignored: the last rule
    /// matching it or one of its parent directories decides.
    pub(super) fn is_ignored(&self, parts: &[&str]) -> bool {
        if parts.is_empty() {
            return false;
        }
        let mut ignored = false;
        for rule in &self.rules {
            // Only a rule that could change the answer is evaluated.
            if rule.exception != ignored {
                continue;
            }
            let hit = (1..=parts.len()).any(|k| rule.pattern.matches(&parts[..k]));
            if hit {
                ignored = !rule.exception;
            }
        }
        ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        Pattern::new(p).unwrap().matches(&parts)
    }

    #[test]
    fn segment_globs() {
        assert!(m("*.txt", "a.txt"));
        assert!(m("*.txt", ".hidden.txt"));
        assert!(!m("*.txt", "dir/a.txt"), "* does not cross '/'");
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[^a-c]x", "bx"));
        assert!(m("[!a-c]x", "dx"));
        assert!(m(r"\*", "*"));
        assert!(!m(r"\*", "a"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("*", "anything"));
    }

    #[test]
    fn double_star() {
        assert!(m("**/x", "x"));
        assert!(m("**/x", "a/b/x"));
        assert!(m("a/**/x", "a/x"));
        assert!(m("a/**/x", "a/b/c/x"));
        assert!(!m("a/**/x", "b/x"));
        assert!(m("a/**", "a/b"));
        assert!(!m("a/**", "a"));
        assert!(m("**", "a/b/c"));
        assert!(m("**/*.go", "src/x/y.go"));
        // Nested `**` match in polynomial time (this took minutes before).
        let deep = vec!["**"; 25].join("/") + "/x";
        let path = vec!["a"; 40].join("/");
        assert!(!m(&deep, &path));
        assert!(m(&deep, &(path.clone() + "/x")));
    }

    #[test]
    fn bad_patterns() {
        for p in ["[", "[]", "[a", "a\\", "[a-]", "[-a]"] {
            assert_eq!(Pattern::new(p), Err(BadPattern), "{p}");
        }
    }

    #[test]
    fn meta_detection() {
        assert!(has_meta("a*"));
        assert!(has_meta("[ab]"));
        assert!(!has_meta(r"a\*"));
        assert!(!has_meta("plain/path"));
    }

    #[test]
    fn cleaning() {
        assert_eq!(clean("./a//b/../c/").unwrap(), ["a", "c"]);
        assert_eq!(clean("/abs").unwrap(), ["abs"]);
        assert!(clean("a/../../b").is_err());
    }
}
