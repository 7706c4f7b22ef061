//! A Dockerfile as the builder uses it: stages of steps, each with its line
//! number and text. Parsing (including BuildKit heredocs) is done by the
//! `parse-dockerfile` crate; this module maps its syntax tree to a small model
//! and keeps variable expansion for later, when the values are known.

use parse_dockerfile::{Command, Flag, Instruction, JsonOrStringArray, Source};

/// A command in exec (JSON array) or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Exec(Vec<String>),
    Shell(String),
}

/// One step of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    Run {
        cmd: Cmd,
        /// Heredoc bodies, in order, with their delimiters (quoted as
        /// `'EOF'` when the body is not to be expanded). parse-dockerfile 0.1
        /// takes a heredoc only at the start (`RUN <<EOF [command]`); `cmd`
        /// is then the command after it, which reads the body on stdin.
        heredocs: Vec<(String, String)>,
    },
    Copy {
        sources: Vec<String>,
        dest: String,
        from: Option<String>,
        chown: Option<String>,
        add: bool,
        /// Heredoc sources (`COPY <<EOF /file`): (delimiter, body).
        inline: Vec<(String, String)>,
    },
    Env(String),
    Arg(String),
    Label(String),
    Workdir(String),
    User(String),
    Cmd(Cmd),
    Entrypoint(Cmd),
    Expose(String),
    Volume(Vec<String>),
    Shell(Vec<String>),
    Stopsignal(String),
    Maintainer(String),
    /// Parsed but not acted on (HEALTHCHECK, ONBUILD); reported.
    Ignored(&'static str),
}

/// A step with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    /// The instruction as written (for output and cache keys).
    pub text: String,
    pub kind: StepKind,
}

/// A stage: `FROM image [AS name]` and its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub line: usize,
    pub text: String,
    /// The base, before ARG expansion.
    pub from: String,
    pub name: Option<String>,
    pub steps: Vec<Step>,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `ARG` lines before the first `FROM` (raw arguments, line).
    pub global_args: Vec<(String, usize)>,
    pub stages: Vec<Stage>,
}

/// A parse error with its line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Dockerfile:{line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// `text[start..end]`, or nothing when a bound is not a character
/// boundary of it (spans come from the parser crate: never a panic here).
fn slice(text: &str, start: usize, end: usize) -> &str {
    text.get(start..end.min(text.len())).unwrap_or("")
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn cmd(c: &Command<'_>) -> Cmd {
    match c {
        Command::Exec(v) => Cmd::Exec(v.value.iter().map(|s| s.value.to_string()).collect()),
        Command::Shell(s) => Cmd::Shell(s.value.trim().to_string()),
        // The enum is non-exhaustive; 0.1 has no other form. An empty command
        // fails when it runs, with Docker's "no command" message.
        _ => Cmd::Exec(Vec::new()),
    }
}

fn flag<'a>(flags: &'a [Flag<'_>], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .find(|f| f.name.value == name)
        .and_then(|f| f.value.as_ref())
        .map(|v| v.value.as_ref())
}

fn json_or_words(a: &JsonOrStringArray<'_, 1>) -> Vec<String> {
    match a {
        JsonOrStringArray::Json(v) => v.value.iter().map(|s| s.value.to_string()).collect(),
        JsonOrStringArray::String(v) => v.iter().map(|s| s.value.to_string()).collect(),
    }
}

/// Heredoc delimiters in a command line, in order (`<<EOF`, `<<-"EOF"`).
fn heredoc_delimiters(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("<<") {
        let mut t = &rest[i + 2..];
        t = t.strip_prefix('-').unwrap_or(t);
        let t = t.trim_start_matches(['"', '\'']);
        let d: String = t
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !d.is_empty() {
            out.push(d);
        }
        rest = &rest[i + 2..];
    }
    out
}

/// The first `RUN` whose heredoc comes after the command (`RUN cat <<EOF`),
/// as (line, the RUN's first line). parse-dockerfile 0.1 takes a heredoc
/// only at the start of RUN's arguments (`RUN <<EOF [command]`) and would
/// read such a body's lines as instructions. A `<<WORD` counts when a later
/// line is WORD alone (its end), so `$((1<<2))` and `<<<` do not.
fn late_heredoc(text: &str) -> Option<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let first = i;
        // The instruction: this line and its continuation lines.
        let mut ins = String::new();
        while i < lines.len() {
            let l = lines[i];
            i += 1;
            match l.trim_end().strip_suffix('\\') {
                Some(head) if i < lines.len() => {
                    ins.push_str(head);
                    ins.push(' ');
                }
                _ => {
                    ins.push_str(l);
                    break;
                }
            }
        }
        let mut words = ins.split_whitespace();
        if !words.next().is_some_and(|w| w.eq_ignore_ascii_case("RUN")) {
            continue;
        }
        let args = words
            .skip_while(|w| w.starts_with("--"))
            .collect::<Vec<_>>()
            .join(" ");
        let delims: Vec<String> = heredoc_delimiters(&args)
            .into_iter()
            .filter(|d| d.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
            .collect();
        let end_of = |d: &str, from: usize| (from..lines.len()).find(|&j| lines[j].trim() == d);
        if args.starts_with("<<") {
            // `RUN <<EOF`: its body is no instruction; go past it.
            if let Some(j) = delims.first().and_then(|d| end_of(d, i)) {
                i = j + 1;
            }
            continue;
        }
        if delims.iter().any(|d| end_of(d, i).is_some()) {
            return Some((first + 1, lines[first].trim().to_string()));
        }
    }
    None
}

fn step(text: &str, ins: &Instruction<'_>, span_start: usize, span_end: usize) -> Step {
    let line = line_of(text, span_start);
    let raw = slice(text, span_start, span_end).trim().to_string();
    let kind = match ins {
        Instruction::Run(r) => {
            let c = cmd(&r.arguments);
            // The parser hands over the bodies; the delimiters are in the text.
            let delims = heredoc_delimiters(&raw);
            let heredocs = r
                .here_docs
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let d = delims.get(i).cloned().unwrap_or_else(|| "EOF".into());
                    let d = if h.expand { d } else { format!("'{d}'") };
                    (d, h.value.to_string())
                })
                .collect();
            StepKind::Run { cmd: c, heredocs }
        }
        Instruction::Copy(c) => copy_kind(&c.src, &c.dest.value, &c.options, false),
        Instruction::Add(a) => copy_kind(&a.src, &a.dest.value, &a.options, true),
        Instruction::Env(e) => StepKind::Env(e.arguments.value.to_string()),
        Instruction::Arg(a) => StepKind::Arg(a.arguments.value.to_string()),
        Instruction::Label(l) => StepKind::Label(l.arguments.value.to_string()),
        Instruction::Workdir(w) => StepKind::Workdir(w.arguments.value.to_string()),
        Instruction::User(u) => StepKind::User(u.arguments.value.to_string()),
        Instruction::Cmd(c) => StepKind::Cmd(cmd(&c.arguments)),
        Instruction::Entrypoint(e) => StepKind::Entrypoint(cmd(&e.arguments)),
        Instruction::Expose(e) => StepKind::Expose(
            e.arguments
                .iter()
                .map(|a| a.value.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Instruction::Volume(v) => StepKind::Volume(json_or_words(&v.arguments)),
        Instruction::Shell(s) => {
            StepKind::Shell(s.arguments.iter().map(|a| a.value.to_string()).collect())
        }
        Instruction::Stopsignal(s) => StepKind::Stopsignal(s.arguments.value.to_string()),
        Instruction::Maintainer(m) => StepKind::Maintainer(m.name.value.to_string()),
        Instruction::Healthcheck(_) => StepKind::Ignored("HEALTHCHECK"),
        Instruction::Onbuild(_) => StepKind::Ignored("ONBUILD"),
        Instruction::From(_) => StepKind::Ignored("FROM"),
        _ => StepKind::Ignored("unknown"),
    };
    Step {
        line,
        text: raw,
        kind,
    }
}

fn copy_kind(src: &[Source<'_>], dest: &str, options: &[Flag<'_>], add: bool) -> StepKind {
    let mut sources = Vec::new();
    let mut inline = Vec::new();
    for s in src {
        match s {
            Source::Path(p) => sources.push(p.value.to_string()),
            Source::HereDoc(h) => inline.push(("EOF".to_string(), h.value.to_string())),
            _ => {}
        }
    }
    StepKind::Copy {
        sources,
        dest: dest.to_string(),
        from: flag(options, "from").map(String::from),
        chown: flag(options, "chown").map(String::from),
        add,
        inline,
    }
}

fn span_of(ins: &Instruction<'_>) -> (usize, usize) {
    // The instruction's text runs from its keyword to the next instruction;
    // the caller cuts at the next start, so only the start matters here.
    let start = match ins {
        Instruction::Add(i) => i.add.span.start,
        Instruction::Arg(i) => i.arg.span.start,
        Instruction::Cmd(i) => i.cmd.span.start,
        Instruction::Copy(i) => i.copy.span.start,
        Instruction::Entrypoint(i) => i.entrypoint.span.start,
        Instruction::Env(i) => i.env.span.start,
        Instruction::Expose(i) => i.expose.span.start,
        Instruction::From(i) => i.from.span.start,
        Instruction::Healthcheck(i) => i.healthcheck.span.start,
        Instruction::Label(i) => i.label.span.start,
        Instruction::Maintainer(i) => i.maintainer.span.start,
        Instruction::Onbuild(i) => i.onbuild.span.start,
        Instruction::Run(i) => i.run.span.start,
        Instruction::Shell(i) => i.shell.span.start,
        Instruction::Stopsignal(i) => i.stopsignal.span.start,
        Instruction::User(i) => i.user.span.start,
        Instruction::Volume(i) => i.volume.span.start,
        Instruction::Workdir(i) => i.workdir.span.start,
        _ => 0,
    };
    (start, start)
}

/// The text of an instruction: from its keyword to the end of its last
/// non-comment line before the next instruction.
fn instruction_text(text: &str, start: usize, next: usize) -> String {
    slice(text, start, next)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// Parses a Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    // The parser skips a byte order mark and counts its spans from after
    // it: so do we, or a span would land inside a character.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some((line, run)) = late_heredoc(text) {
        return Err(ParseError {
            line,
            message: format!(
                "{run}: a heredoc after the command is not supported; start the RUN arguments with it (RUN <<EOF [command]: the body is the script, or the command's stdin)"
            ),
        });
    }
    let df = parse_dockerfile::parse(text).map_err(|e| ParseError {
        line: e.line(),
        message: e.to_string(),
    })?;
    let starts: Vec<usize> = df.instructions.iter().map(|i| span_of(i).0).collect();
    let next_of = |idx: usize| starts.get(idx + 1).copied().unwrap_or(text.len());
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for (idx, ins) in df.instructions.iter().enumerate() {
        let start = starts[idx];
        let line = line_of(text, start);
        let full = instruction_text(text, start, next_of(idx));
        match ins {
            Instruction::From(f) => stages.push(Stage {
                line,
                text: full,
                from: f.image.value.to_string(),
                name: f.as_.as_ref().map(|(_, n)| n.value.to_lowercase()),
                steps: Vec::new(),
            }),
            Instruction::Arg(a) if stages.is_empty() => {
                global_args.push((a.arguments.value.to_string(), line))
            }
            Instruction::Run(r) if !r.options.is_empty() => {
                let f = &r.options[0];
                let name = f.name.value.as_ref();
                return Err(ParseError {
                    line,
                    message: format!(
                        "RUN --{name}: RUN options (--mount, --network, --security) are not supported by vmc build"
                    ),
                });
            }
            other => match stages.last_mut() {
                Some(stage) => {
                    let mut s = step(text, other, start, next_of(idx));
                    s.text = full;
                    stage.steps.push(s);
                }
                None => {
                    return Err(ParseError {
                        line,
                        message: "the first instruction must be FROM (or ARG before FROM)".into(),
                    })
                }
            },
        }
    }
    if stages.is_empty() {
        return Err(ParseError {
            line: 1,
            message: "no FROM instruction: a Dockerfile must start a stage with FROM".into(),
        });
    }
    Ok(Dockerfile {
        global_args,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_steps_and_lines() {
        let text = "# comment\nARG BASE=busybox\nFROM $BASE AS build\nRUN echo hi \\\n  && echo there\nCOPY --chown=1:2 a b /dst/\nFROM scratch\nCOPY --from=build /x /y\nCMD [\"/y\"]\n";
        let df = parse(text).unwrap();
        assert_eq!(df.global_args, vec![("BASE=busybox".to_string(), 2)]);
        assert_eq!(df.stages.len(), 2);
        let s0 = &df.stages[0];
        assert_eq!(
            (s0.from.as_str(), s0.name.as_deref(), s0.line),
            ("$BASE", Some("build"), 3)
        );
        assert_eq!(s0.steps[0].line, 4);
        assert!(s0.steps[0].text.starts_with("RUN echo hi"));
        assert!(
            matches!(&s0.steps[0].kind, StepKind::Run { cmd: Cmd::Shell(s), .. } if s.contains("echo there"))
        );
        assert_eq!(
            s0.steps[1].kind,
            StepKind::Copy {
                sources: vec!["a".into(), "b".into()],
                dest: "/dst/".into(),
                from: None,
                chown: Some("1:2".into()),
                add: false,
                inline: vec![],
            }
        );
        let s1 = &df.stages[1];
        assert!(matches!(&s1.steps[0].kind, StepKind::Copy { from: Some(f), .. } if f == "build"));
        assert_eq!(
            s1.steps[1].kind,
            StepKind::Cmd(Cmd::Exec(vec!["/y".into()]))
        );
    }

    /// Found by the `dockerfile` fuzz target: a byte order mark first (and
    /// another inside) made the parser's spans land inside a character.
    #[test]
    fn a_byte_order_mark_keeps_steps_whole() {
        let text = "\u{feff}FROM busybox\nRUN echo a\u{feff}\nRUN echo b\n";
        let df = parse(text).unwrap();
        let steps: Vec<&str> = df.stages[0].steps.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(steps, ["RUN echo a\u{feff}", "RUN echo b"]);
        assert_eq!(df.stages[0].steps[1].line, 3);
        // The fuzzer's own input, replayed: it parses or fails, never panics.
        let crash = "\u{feff}FROM busybox\nRUN %ch$UN echo a \\\n  b\u{12}\0\0\nRUN\u{feff}\nRUN\n";
        let _ = parse(crash);
    }

    #[test]
    fn heredocs_keep_their_delimiters() {
        let text =
            "FROM busybox\nRUN <<EOF\necho one\necho two\nEOF\nRUN <<-END sh -x\n\thello\nEND\n";
        let df = parse(text).unwrap();
        match &df.stages[0].steps[0].kind {
            StepKind::Run { heredocs, .. } => {
                assert_eq!(heredocs.len(), 1);
                assert_eq!(heredocs[0].0, "EOF");
                assert!(heredocs[0].1.contains("echo two"));
            }
            k => panic!("{k:?}"),
        }
        match &df.stages[0].steps[1].kind {
            StepKind::Run { heredocs, cmd } => {
                assert_eq!(heredocs[0], ("END".to_string(), "hello\n".to_string()));
                assert_eq!(cmd, &Cmd::Shell("sh -x".into()));
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn run_options_are_refused_naming_the_flag() {
        for (flag, text) in [
            ("mount", "RUN --mount=type=cache,target=/x true"),
            ("network", "RUN --network=none wget -q http://example.org/"),
            ("security", "RUN --security=insecure true"),
            (
                "mount",
                "RUN --mount=type=secret,id=x [\"cat\", \"/run/secrets/x\"]",
            ),
        ] {
            let e = parse(&format!("FROM busybox\nRUN true\n{text}\n")).unwrap_err();
            assert_eq!(e.line, 3, "{e}");
            assert_eq!(
                e.to_string(),
                format!("Dockerfile:3: RUN --{flag}: RUN options (--mount, --network, --security) are not supported by vmc build"),
            );
            assert_eq!(e.to_string().lines().count(), 1);
        }
        // The same commands without options parse.
        assert!(parse("FROM busybox\nRUN true --mount=x\n").is_ok());
    }

    /// As the README says: a heredoc is taken only at the start of RUN's
    /// arguments; one after the command is a clear error, not its body's
    /// lines read as instructions.
    #[test]
    fn heredocs_after_the_command_are_a_clear_error() {
        for text in [
            "FROM busybox\nRUN cat <<EOF > /greeting\nhello\nEOF\n",
            "FROM busybox\nRUN cat <<'EOF'\nhello\nEOF\n",
            "FROM busybox\nRUN --mount=type=cache,target=/x cat <<-END\n\thello\nEND\n",
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, 2, "{text}: {e}");
            let m = e.to_string();
            assert!(
                m.contains("a heredoc after the command is not supported"),
                "{m}"
            );
            assert!(m.contains("RUN <<EOF [command]"), "{m}");
            assert!(!m.contains("unknown instruction"), "{m}");
        }
        // Continued onto a later line, the RUN is still named by its first.
        let e = parse("FROM busybox\nRUN set -e; \\\n  cat <<EOF\nhi\nEOF\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.to_string().contains("RUN set -e;"), "{e}");
        // What is supported: the heredoc first, its body the script or the
        // command's stdin (where a nested heredoc is the script's own);
        // shifts and here-strings are no heredocs.
        let ok = "FROM busybox\nRUN <<EOF\ncat <<INNER > /x\nhi\nINNER\nEOF\nRUN <<EOF sh\necho $((1<<2))\nEOF\nRUN echo $((1<<2)) && cat <<< hi\n";
        let df = parse(ok).unwrap();
        match &df.stages[0].steps[0].kind {
            StepKind::Run { heredocs, cmd } => {
                assert_eq!(cmd, &Cmd::Shell(String::new()));
                assert_eq!(heredocs[0].1, "cat <<INNER > /x\nhi\nINNER\n");
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(df.stages[0].steps.len(), 3);
    }

    #[test]
    fn bad_dockerfiles_name_the_line() {
        let e = parse("FROM busybox\nRUN true\nFROBNICATE x\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse("RUN true\n").unwrap_err();
        assert!(e.to_string().starts_with("Dockerfile:1:"), "{e}");
        assert!(parse("# only a comment\n").is_err());
    }
}
