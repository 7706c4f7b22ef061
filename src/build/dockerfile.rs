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
        /// `--chmod=MODE` (octal) of every copied file and directory.
        chmod: Option<String>,
        add: bool,
        /// Heredoc sources (`COPY <<EOF /file`): (delimiter, body), the
        /// delimiter quoted (`'EOF'`) when the body is not to be expanded.
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
    /// `HEALTHCHECK ...` (`test` `["NONE"]` for `HEALTHCHECK NONE`).
    Healthcheck(crate::image::extras::Healthcheck),
    /// `ONBUILD INSTRUCTION`: the trigger, as written.
    Onbuild(String),
    /// Parsed but not acted on; reported.
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

/// The options HEALTHCHECK takes.
const HEALTHCHECK_FLAGS: &[&str] = &[
    "interval",
    "timeout",
    "start-period",
    "start-interval",
    "retries",
];

/// A Go duration (`30s`, `1m30s`, `500ms`, `1h`), in nanoseconds: what
/// Docker's HEALTHCHECK options take.
pub fn go_duration(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale: f64 = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total = total.checked_add((num * scale) as u64)?;
    }
    Some(total)
}

/// Checks HEALTHCHECK's options as Docker does; the message if one is
/// wrong.
fn check_healthcheck(h: &parse_dockerfile::HealthcheckInstruction<'_>) -> Result<(), String> {
    for f in &h.options {
        let name = f.name.value.as_ref();
        if !HEALTHCHECK_FLAGS.contains(&name) {
            return Err(format!(
                "HEALTHCHECK --{name}: unknown option (it takes --interval, --timeout, --start-period, --start-interval and --retries)"
            ));
        }
        let v = f.value.as_ref().map(|v| v.value.as_ref()).unwrap_or("");
        if name == "retries" {
            if v.parse::<u32>().is_err() {
                return Err(format!("HEALTHCHECK --retries={v}: not a number"));
            }
        } else {
            match go_duration(v) {
                Some(d) if d == 0 || d >= 1_000_000 => {}
                Some(_) => {
                    return Err(format!("HEALTHCHECK --{name}={v}: cannot be less than 1ms"))
                }
                None => {
                    return Err(format!(
                        "HEALTHCHECK --{name}={v}: not a duration (30s, 1m30s, 500ms)"
                    ))
                }
            }
        }
    }
    Ok(())
}

fn healthcheck(
    h: &parse_dockerfile::HealthcheckInstruction<'_>,
) -> crate::image::extras::Healthcheck {
    let d = |name| flag(&h.options, name).and_then(go_duration).unwrap_or(0);
    let test = match &h.arguments {
        parse_dockerfile::HealthcheckArguments::Cmd { arguments, .. } => match cmd(arguments) {
            Cmd::Exec(v) => std::iter::once("CMD".to_string()).chain(v).collect(),
            Cmd::Shell(s) => vec!["CMD-SHELL".into(), s],
        },
        _ => vec!["NONE".into()],
    };
    crate::image::extras::Healthcheck {
        test,
        interval: d("interval"),
        timeout: d("timeout"),
        start_period: d("start-period"),
        start_interval: d("start-interval"),
        retries: flag(&h.options, "retries")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0),
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

/// Heredoc delimiters in a command line, in order (`<<EOF`, `<<-"EOF"`;
/// a shift such as `$((1<<2))` opens none: see [`heredoc_at`]).
fn heredoc_delimiters(s: &str) -> Vec<String> {
    s.match_indices("<<")
        .filter_map(|(at, _)| heredoc_at(&s[at..]).map(|(d, _)| d))
        .collect()
}

/// Heredocs the shell reads (BuildKit's rule for any RUN whose heredoc is
/// not alone at the start): `RUN cat <<EOF > /x`, `RUN python3 <<EOF`,
/// `RUN <<A cat > /a && <<B cat > /b`. The RUN's command line, its
/// continuation lines joined, then its body lines and delimiter lines as
/// written, is the shell-form command, so the shell takes its heredocs
/// (with `<<-`, quoted delimiters and expansion, as sh does). parse-dockerfile
/// 0.1 takes only one heredoc, at the start (`RUN <<EOF [command]`), which it
/// is still left to read.
struct Heredocs {
    /// The text for the parser: as given, but with these RUNs' `<<` and
    /// bodies blanked (the same length, so spans and lines still match).
    masked: String,
    /// For each such RUN, its first line and its shell-form command.
    shell: Vec<(usize, String)>,
    /// RUN or COPY/ADD lines with a `<<WORD` that no later line closes, as
    /// (line, delimiter, the instruction's first line): named if the
    /// parser then fails on a line after them.
    unclosed: Vec<(usize, String, String)>,
}

/// A heredoc's delimiter if a `<<` at the start of `t` opens one: `-`
/// (strip tabs), then WORD, 'WORD' or "WORD" (starting with a letter or
/// `_`: `$((1<<2))` and `<<<` open none).
fn heredoc_at(t: &str) -> Option<(String, bool)> {
    let t = t.strip_prefix("<<")?;
    let (t, strip) = match t.strip_prefix('-') {
        Some(t) => (t, true),
        None => (t, false),
    };
    let t = t.trim_start_matches(['"', '\'', '\\']);
    let d: String = t
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    d.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        .then_some((d, strip))
}

fn find_heredocs(text: &str) -> Heredocs {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut masked: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut shell = Vec::new();
    let mut unclosed = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let first = i;
        // The instruction: this line and its continuation lines.
        let mut ins = String::new();
        while i < lines.len() {
            let l = lines[i].trim_end_matches('\r');
            i += 1;
            match l.trim_end().strip_suffix('\\') {
                Some(head) if i < lines.len() => ins.push_str(head),
                _ => {
                    ins.push_str(l);
                    break;
                }
            }
        }
        let mut words = ins.split_whitespace();
        let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
        if !matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            continue;
        }
        let args = ins.trim_start()[keyword.len()..].trim_start();
        let mut args_rest = args;
        while args_rest.starts_with("--") {
            args_rest = args_rest
                .split_once(char::is_whitespace)
                .map_or("", |(_, r)| r.trim_start());
        }
        let delims: Vec<(String, bool)> = args_rest
            .match_indices("<<")
            .filter_map(|(at, _)| heredoc_at(&args_rest[at..]))
            .collect();
        if delims.is_empty() {
            continue;
        }
        // Each body runs to the line holding its delimiter alone (tabs
        // stripped first for `<<-`), the next body after it.
        let mut end = i;
        let mut closed = true;
        for (d, strip) in &delims {
            let is_end = |l: &str| {
                let l = l.trim_end_matches('\r');
                let l = if *strip {
                    l.trim_start_matches('\t')
                } else {
                    l
                };
                l == d
            };
            match (end..lines.len()).find(|&j| is_end(lines[j])) {
                Some(j) => end = j + 1,
                None => {
                    unclosed.push((first + 1, d.clone(), lines[first].trim().to_string()));
                    closed = false;
                    break;
                }
            }
        }
        if !closed || keyword != "RUN" || (args_rest.starts_with("<<") && delims.len() == 1) {
            // The parser reads COPY/ADD heredocs and a lone leading one.
            if closed {
                i = end;
            }
            continue;
        }
        let mut cmd = args_rest.to_string();
        for l in &lines[i..end] {
            cmd.push('\n');
            cmd.push_str(l.trim_end_matches('\r'));
        }
        shell.push((first + 1, cmd));
        for m in &mut masked[first..i] {
            *m = m.replace("<<", "  ");
        }
        for m in &mut masked[i..end] {
            *m = " ".repeat(m.len());
        }
        i = end;
    }
    Heredocs {
        masked: masked.join("\n"),
        shell,
        unclosed,
    }
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
        Instruction::Copy(c) => copy_kind(&raw, &c.src, &c.dest.value, &c.options, false),
        Instruction::Add(a) => copy_kind(&raw, &a.src, &a.dest.value, &a.options, true),
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
        Instruction::Healthcheck(h) => StepKind::Healthcheck(healthcheck(h)),
        Instruction::Onbuild(_) => StepKind::Onbuild(
            raw.split_once(char::is_whitespace)
                .map_or("", |(_, t)| t)
                .trim()
                .to_string(),
        ),
        Instruction::From(_) => StepKind::Ignored("FROM"),
        _ => StepKind::Ignored("unknown"),
    };
    Step {
        line,
        text: raw,
        kind,
    }
}

/// COPY's and ADD's options vmc takes: `--link` changes only how BuildKit
/// stores the layer, never the files, so it is accepted and has no effect.
const COPY_FLAGS: &[&str] = &["from", "chown", "chmod", "link"];

fn copy_kind(
    raw: &str,
    src: &[Source<'_>],
    dest: &str,
    options: &[Flag<'_>],
    add: bool,
) -> StepKind {
    let mut sources = Vec::new();
    let mut inline = Vec::new();
    // The parser hands over the bodies; their delimiters are in the text.
    let mut delims = heredoc_delimiters(raw).into_iter();
    for s in src {
        match s {
            Source::Path(p) => sources.push(p.value.to_string()),
            Source::HereDoc(h) => {
                let d = delims.next().unwrap_or_else(|| "EOF".into());
                let d = if h.expand { d } else { format!("'{d}'") };
                inline.push((d, h.value.to_string()))
            }
            _ => {}
        }
    }
    StepKind::Copy {
        sources,
        dest: dest.to_string(),
        from: flag(options, "from").map(String::from),
        chown: flag(options, "chown").map(String::from),
        chmod: flag(options, "chmod").map(String::from),
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
/// An ONBUILD trigger of a base image as the step it stands for (a
/// child's build runs it right after FROM).
pub fn trigger_step(trigger: &str) -> Result<Step, ParseError> {
    let df = parse(&format!("FROM scratch\n{trigger}\n"))?;
    match df.stages.first().map(|s| s.steps.as_slice()) {
        Some([one]) => Ok(one.clone()),
        _ => Err(ParseError {
            line: 1,
            message: format!("the base image's ONBUILD trigger '{trigger}' is not one instruction"),
        }),
    }
}

fn instruction_text(text: &str, start: usize, next: usize) -> String {
    slice(text, start, next)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// A shell-form command's continuation lines joined, as Docker joins them:
/// a line ending with the escape character (`\\`, or the one `# escape=`
/// names) goes on with the next, the two characters dropped; so the shell
/// never sees a backtick meant as a line continuation.
fn join_continuations(kind: &mut StepKind, escape: char) {
    let shell = match kind {
        StepKind::Run {
            cmd: Cmd::Shell(s),
            heredocs,
        } if heredocs.is_empty() => s,
        StepKind::Cmd(Cmd::Shell(s)) | StepKind::Entrypoint(Cmd::Shell(s)) => s,
        _ => return,
    };
    if !shell.contains('\n') {
        return;
    }
    let mut out = String::with_capacity(shell.len());
    let mut lines = shell.split('\n').peekable();
    while let Some(l) = lines.next() {
        let l = l.trim_end_matches('\r');
        match l.trim_end().strip_suffix(escape) {
            Some(head) if lines.peek().is_some() => out.push_str(head),
            _ => {
                out.push_str(l);
                if lines.peek().is_some() {
                    out.push('\n');
                }
            }
        }
    }
    *shell = out;
}

/// Parses a Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    // The parser skips a byte order mark and counts its spans from after
    // it: so do we, or a span would land inside a character.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let heredocs = find_heredocs(text);
    let df = parse_dockerfile::parse(&heredocs.masked).map_err(|e| {
        // A body read as instructions: the heredoc it belongs to is named.
        match heredocs.unclosed.iter().rev().find(|u| u.0 < e.line()) {
            Some((line, d, ins)) => {
                let unclosed = format!(
                    "{ins}: the heredoc <<{d} is never closed (a line holding {d} alone ends it)"
                );
                ParseError {
                    line: *line,
                    // The parser's own complaint about a heredoc it reads
                    // adds nothing; its complaint about a body line does.
                    message: if e.to_string().contains("here-document") {
                        unclosed
                    } else {
                        format!(
                            "{unclosed}, so line {} was read as an instruction: {e}",
                            e.line()
                        )
                    },
                }
            }
            None => ParseError {
                line: e.line(),
                message: e.to_string(),
            },
        }
    })?;
    let escape = df
        .parser_directives
        .escape
        .as_ref()
        .map_or('\\', |d| d.value.value);
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
            Instruction::Copy(parse_dockerfile::CopyInstruction { options, .. })
            | Instruction::Add(parse_dockerfile::AddInstruction { options, .. })
                if options
                    .iter()
                    .any(|f| !COPY_FLAGS.contains(&f.name.value.as_ref())) =>
            {
                let f = options
                    .iter()
                    .find(|f| !COPY_FLAGS.contains(&f.name.value.as_ref()))
                    .map(|f| f.name.value.to_string())
                    .unwrap_or_default();
                let what = if matches!(ins, Instruction::Add(_)) {
                    "ADD"
                } else {
                    "COPY"
                };
                return Err(ParseError {
                    line,
                    message: format!(
                        "{what} --{f}: not supported by vmc build (it takes --from, --chown, --chmod and --link)"
                    ),
                });
            }
            Instruction::Healthcheck(h) if check_healthcheck(h).is_err() => {
                return Err(ParseError {
                    line,
                    message: check_healthcheck(h).err().unwrap_or_default(),
                });
            }
            Instruction::Onbuild(o)
                if matches!(
                    *o.instruction,
                    Instruction::Onbuild(_) | Instruction::From(_) | Instruction::Maintainer(_)
                ) =>
            {
                let what = match *o.instruction {
                    Instruction::Onbuild(_) => {
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
                    }
                    Instruction::From(_) => "FROM isn't allowed as an ONBUILD trigger",
                    _ => "MAINTAINER isn't allowed as an ONBUILD trigger",
                };
                return Err(ParseError {
                    line,
                    message: what.to_string(),
                });
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
                    if let Some((_, cmd)) = heredocs.shell.iter().find(|h| h.0 == line) {
                        s.kind = StepKind::Run {
                            cmd: Cmd::Shell(cmd.clone()),
                            heredocs: Vec::new(),
                        };
                    } else {
                        join_continuations(&mut s.kind, escape);
                    }
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
                chmod: None,
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

    fn shell_of(text: &str, step: usize) -> String {
        match &parse(text).unwrap().stages[0].steps[step].kind {
            StepKind::Run {
                cmd: Cmd::Shell(s),
                heredocs,
            } if heredocs.is_empty() => s.clone(),
            k => panic!("{k:?}"),
        }
    }

    /// BuildKit's rule: a heredoc that is not alone at the start of RUN's
    /// arguments is the shell's: the command line, then the bodies and
    /// their delimiter lines as written, is the shell-form command.
    #[test]
    fn heredocs_after_the_command_or_several_go_to_the_shell() {
        assert_eq!(
            shell_of(
                "FROM busybox\nRUN cat <<EOF > /greeting\nhello\nEOF\nRUN true\n",
                0
            ),
            "cat <<EOF > /greeting\nhello\nEOF"
        );
        let two = "FROM busybox\nRUN <<EOF1 cat > /a && <<-'EOF2' cat > /b\nWelcome\nEOF1\n\t# not a comment\n\tEOF2\nCMD x\n";
        assert_eq!(
            shell_of(two, 0),
            "<<EOF1 cat > /a && <<-'EOF2' cat > /b\nWelcome\nEOF1\n\t# not a comment\n\tEOF2"
        );
        let df = parse(two).unwrap();
        assert_eq!(df.stages[0].steps.len(), 2);
        assert_eq!(df.stages[0].steps[1].line, 7);
        // Continuation lines are joined; the RUN is named by its first line.
        let cont = "FROM busybox\nRUN set -e; \\\n  cat <<EOF\nhi\nEOF\n";
        assert_eq!(shell_of(cont, 0), "set -e;   cat <<EOF\nhi\nEOF");
        assert_eq!(parse(cont).unwrap().stages[0].steps[0].line, 2);
        // RUN options are still refused, naming the flag.
        let e = parse("FROM busybox\nRUN --mount=type=cache,target=/x cat <<-END\n\thello\nEND\n")
            .unwrap_err();
        assert!(e.to_string().contains("RUN --mount"), "{e}");
        // The parser's own: the heredoc first, its body the script or the
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
        assert_eq!(shell_of(ok, 2), "echo $((1<<2)) && cat <<< hi");
    }

    /// A heredoc that is never closed: its body's lines read as
    /// instructions (or the parser's end-of-heredoc complaint) fail the
    /// parse, and the error names the heredoc, not "unknown instruction
    /// 'Welcome'" alone.
    #[test]
    fn an_unclosed_heredoc_is_named() {
        let e = parse("FROM busybox\nRUN cat <<EOF > /x\nWelcome\nEOF \n").unwrap_err();
        assert!(
            e.to_string().ends_with("so line 3 was read as an instruction: unknown instruction 'Welcome' at line 3 column 1"),
            "{e}"
        );
        for text in [
            "FROM busybox\nRUN cat <<EOF > /x\nWelcome\nEOF \n",
            "FROM busybox\nCOPY <<EOF /x\nWelcome\n",
            "FROM busybox\nRUN <<EOF\nWelcome\n",
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, 2, "{text}: {e}");
            let m = e.to_string();
            assert!(m.contains("the heredoc <<EOF is never closed"), "{m}");
            assert!(!m.contains("line 4"), "{m}");
            assert_eq!(m.lines().count(), 1);
        }
    }

    /// Continuation lines are joined with the escape character dropped:
    /// the default `\\` and the one `# escape=` names (a backtick passed to
    /// the shell would open a command substitution).
    #[test]
    fn continuations_are_joined_with_the_escape_of_the_directive() {
        let run = |text: &str| match &parse(text).unwrap().stages[0].steps[0].kind {
            StepKind::Run {
                cmd: Cmd::Shell(s), ..
            } => s.clone(),
            k => panic!("{k:?}"),
        };
        assert_eq!(
            run("FROM busybox\nRUN echo one \\\n  two \\  \n three\n"),
            "echo one   two  three"
        );
        assert_eq!(
            run("# escape=`\nFROM busybox\nRUN echo one `\n  two > C:\\x\n"),
            "echo one   two > C:\\x"
        );
        let df = parse("# escape=`\nFROM busybox\nCMD echo a `\n b\n").unwrap();
        assert_eq!(
            df.stages[0].steps[0].kind,
            StepKind::Cmd(Cmd::Shell("echo a  b".into()))
        );
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
