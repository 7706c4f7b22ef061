//! Docker's `--format` (`ps`, `images`, `inspect`): the subset of Go's
//! text/template that people write in scripts, over a JSON value.
//!
//! Text is copied; `{{ ... }}` is a field path (`.State.Pid`, `.` for the
//! whole value) or a function applied to arguments: `json .Config`,
//! `index .Labels "key"`, `join .Names ","`, `upper`, `lower`, `len`. Values
//! print as Go prints them (`map[k:v]`, `[a b]`, `<no value>` for a
//! missing field). A `table ` prefix makes the output a table with a
//! header row (see `ps`). `\t` and `\n` written as two characters are a
//! tab and a newline, as the docker CLI takes them. Anything else (`range`,
//! `if`, pipes, variables) is refused with its name, never misprinted.
//!
//! Written here rather than taken from a crate: the Rust template engines
//! (handlebars, tera, minijinja) speak other syntaxes, and gtmpl (Go's
//! syntax) pulls in a dependency tree for the few forms Docker users type.

use serde_json::Value;

/// A template that does not parse or cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("template: unclosed action (a '{{{{' without '}}}}')")]
    Unclosed,
    #[error("template: empty action '{{{{}}}}'")]
    Empty,
    #[error("template: '{0}' is not supported (vmc takes field paths and the functions json, index, join, upper, lower, len)")]
    Unsupported(String),
    #[error("template: {0}: {1}")]
    BadCall(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Arg {
    /// `.A.B`: field names (empty: the value itself).
    Path(Vec<String>),
    Str(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Action {
        func: Option<String>,
        args: Vec<Arg>,
    },
}

/// A parsed `--format` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// `table ...`: the rows are aligned under a header.
    pub table: bool,
}

const FUNCS: &[&str] = &["json", "index", "join", "upper", "lower", "len"];

/// Splits an action's text into words: bare words and Go string literals
/// (`"..."` with backslash escapes, or `` `...` ``).
fn words(s: &str) -> Result<Vec<(String, bool)>, TemplateError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' || c == '`' {
            chars.next();
            let mut w = String::new();
            loop {
                match chars.next() {
                    None => return Err(TemplateError::Unclosed),
                    Some(q) if q == c => break,
                    Some('\\') if c == '"' => match chars.next() {
                        Some('n') => w.push('\n'),
                        Some('t') => w.push('\t'),
                        Some(e) => w.push(e),
                        None => return Err(TemplateError::Unclosed),
                    },
                    Some(x) => w.push(x),
                }
            }
            out.push((w, true));
        } else {
            let mut w = String::new();
            while let Some(&x) = chars.peek() {
                if x.is_whitespace() {
                    break;
                }
                w.push(x);
                chars.next();
            }
            out.push((w, false));
        }
    }
    Ok(out)
}

fn arg(word: &str, quoted: bool) -> Result<Arg, TemplateError> {
    if quoted {
        return Ok(Arg::Str(word.to_string()));
    }
    match word.strip_prefix('.') {
        Some("") => Ok(Arg::Path(Vec::new())),
        Some(rest) if rest.split('.').all(|f| !f.is_empty()) => {
            Ok(Arg::Path(rest.split('.').map(String::from).collect()))
        }
        _ => Err(TemplateError::Unsupported(word.to_string())),
    }
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        let s = s.replace("\\t", "\t").replace("\\n", "\n");
        let (s, table) = match s.strip_prefix("table") {
            Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => {
                (rest.trim_start().to_string(), true)
            }
            _ => (s, false),
        };
        let mut parts = Vec::new();
        let mut rest = s.as_str();
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or(TemplateError::Unclosed)?;
            // `{{- x -}}` trims spaces around the action, as in Go.
            let mut inner = &after[..close];
            if let Some(i) = inner.strip_prefix("- ") {
                inner = i;
                if let Some(Part::Text(t)) = parts.last_mut() {
                    *t = t.trim_end().to_string();
                }
            }
            let trim_after = inner.ends_with(" -");
            inner = inner.strip_suffix(" -").unwrap_or(inner);
            let ws = words(inner)?;
            let Some(((first, quoted), rest_words)) = ws.split_first() else {
                return Err(TemplateError::Empty);
            };
            let part = if *quoted || first.starts_with('.') {
                if !rest_words.is_empty() {
                    return Err(TemplateError::Unsupported(inner.trim().to_string()));
                }
                Part::Action {
                    func: None,
                    args: vec![arg(first, *quoted)?],
                }
            } else if FUNCS.contains(&first.as_str()) {
                Part::Action {
                    func: Some(first.clone()),
                    args: rest_words
                        .iter()
                        .map(|(w, q)| arg(w, *q))
                        .collect::<Result<_, _>>()?,
                }
            } else {
                return Err(TemplateError::Unsupported(first.clone()));
            };
            parts.push(part);
            rest = &after[close + 2..];
            if trim_after {
                rest = rest.trim_start();
            }
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts, table })
    }

    /// The field paths the template prints (for a table's header).
    pub fn fields(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Action { args, .. } => args.iter().find_map(|a| match a {
                    Arg::Path(p) => Some(p.join(".")),
                    Arg::Str(_) => None,
                }),
                Part::Text(_) => None,
            })
            .collect()
    }

    /// The template applied to `v`.
    pub fn render(&self, v: &Value) -> Result<String, TemplateError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Action { func, args } => {
                    let vals: Vec<Option<Value>> = args
                        .iter()
                        .map(|a| match a {
                            Arg::Path(p) => lookup(v, p),
                            Arg::Str(s) => Some(Value::String(s.clone())),
                        })
                        .collect();
                    out.push_str(&call(func.as_deref(), &vals)?);
                }
            }
        }
        Ok(out)
    }

    /// The header cell of each column of a table: the text the template
    /// has there, with every field replaced by its name in `headers`
    /// (Docker's column titles) or, failing that, in capitals.
    pub fn header(&self, headers: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Action { args, .. } => {
                    let name = args
                        .iter()
                        .find_map(|a| match a {
                            Arg::Path(p) => Some(p.join(".")),
                            Arg::Str(_) => None,
                        })
                        .unwrap_or_default();
                    match headers.iter().find(|(f, _)| *f == name) {
                        Some((_, h)) => out.push_str(h),
                        None => out.push_str(&name.to_uppercase()),
                    }
                }
            }
        }
        out
    }
}

/// The value at `path` in `v` (`None`: no such field).
fn lookup(v: &Value, path: &[String]) -> Option<Value> {
    let mut cur = v;
    for f in path {
        cur = cur.get(f)?;
    }
    Some(cur.clone())
}

/// Go's default formatting of a value.
fn go_print(v: &Value) -> String {
    match v {
        Value::Null => "<nil>".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => format!("[{}]", a.iter().map(go_print).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => {
            // Go prints a map's keys sorted.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{k}:{}", go_print(&m[*k])))
                .collect();
            format!("map[{}]", items.join(" "))
        }
    }
}

fn call(func: Option<&str>, vals: &[Option<Value>]) -> Result<String, TemplateError> {
    let bad = |f: &str, why: &str| TemplateError::BadCall(f.to_string(), why.to_string());
    let one = |f: &str| -> Result<Option<Value>, TemplateError> {
        match vals {
            [v] => Ok(v.clone()),
            _ => Err(bad(f, "takes one argument")),
        }
    };
    let text = |v: Option<Value>| v.map_or_else(|| "<no value>".to_string(), |v| go_print(&v));
    match func {
        None => Ok(text(one(".")?)),
        Some("json") => {
            Ok(serde_json::to_string(&one("json")?.unwrap_or(Value::Null)).unwrap_or_default())
        }
        Some("upper") => Ok(text(one("upper")?).to_uppercase()),
        Some("lower") => Ok(text(one("lower")?).to_lowercase()),
        Some("len") => match one("len")? {
            Some(Value::Array(a)) => Ok(a.len().to_string()),
            Some(Value::Object(m)) => Ok(m.len().to_string()),
            Some(Value::String(s)) => Ok(s.len().to_string()),
            _ => Err(bad("len", "takes a list, map or string")),
        },
        Some("index") => match vals {
            [Some(Value::Object(m)), Some(Value::String(k))] => Ok(text(m.get(k).cloned())),
            [Some(Value::Array(a)), Some(Value::String(i))] => {
                let i: usize = i
                    .parse()
                    .map_err(|_| bad("index", "takes a number for a list"))?;
                Ok(text(a.get(i).cloned()))
            }
            [None | Some(Value::Null), _] => Ok("<no value>".into()),
            _ => Err(bad("index", "takes a map and a key")),
        },
        Some("join") => match vals {
            [Some(Value::Array(a)), Some(Value::String(sep))] => {
                Ok(a.iter().map(go_print).collect::<Vec<_>>().join(sep))
            }
            [None | Some(Value::Null), _] => Ok(String::new()),
            _ => Err(bad("join", "takes a list and a separator")),
        },
        Some(f) => Err(TemplateError::Unsupported(f.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(t: &str, v: &Value) -> String {
        Template::parse(t).unwrap().render(v).unwrap()
    }

    #[test]
    fn fields_and_functions_print_as_docker_prints_them() {
        let v = json!({
            "State": {"Pid": 42, "Running": true},
            "Config": {"Env": ["A=1", "B=2"], "Labels": {"k": "v", "a": "b"}},
            "Name": "web",
            "Ports": null,
        });
        assert_eq!(render("{{.State.Pid}}", &v), "42");
        assert_eq!(
            render("pid={{ .State.Pid }} up={{.State.Running}}\\n", &v),
            "pid=42 up=true\n"
        );
        assert_eq!(render("{{json .Config.Env}}", &v), r#"["A=1","B=2"]"#);
        assert_eq!(render("{{.Config.Env}}", &v), "[A=1 B=2]");
        assert_eq!(render("{{.Config.Labels}}", &v), "map[a:b k:v]");
        assert_eq!(render("{{index .Config.Labels \"k\"}}", &v), "v");
        assert_eq!(render("{{join .Config.Env \",\"}}", &v), "A=1,B=2");
        assert_eq!(render("{{upper .Name}}/{{len .Config.Env}}", &v), "WEB/2");
        assert_eq!(render("{{.Nope}}|{{.Ports}}", &v), "<no value>|<nil>");
        assert_eq!(render("{{json .}}", &json!({"a": 1})), r#"{"a":1}"#);
        assert_eq!(render("a\\tb", &v), "a\tb");
        assert_eq!(render("x {{- .Name -}} y", &v), "xweby");
    }

    #[test]
    fn what_is_not_supported_is_named() {
        for (t, want) in [
            ("{{range .X}}{{end}}", "'range' is not supported"),
            ("{{.Name | upper}}", "'.Name | upper' is not supported"),
            ("{{$x := 1}}", "'$x' is not supported"),
            ("{{.Name", "unclosed action"),
            ("{{ }}", "empty action"),
            ("{{printf \"%s\" .Name}}", "'printf' is not supported"),
        ] {
            let e = Template::parse(t).unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
        let e = Template::parse("{{index .Name}}")
            .unwrap()
            .render(&json!({"Name": "x"}))
            .unwrap_err();
        assert_eq!(e.to_string(), "template: index: takes a map and a key");
    }

    #[test]
    fn tables_have_a_header_of_the_fields() {
        let t = Template::parse("table {{.ID}}\\t{{.Names}}\\t{{.Labels}}").unwrap();
        assert!(t.table);
        assert_eq!(t.fields(), ["ID", "Names", "Labels"]);
        assert_eq!(
            t.header(&[("ID", "CONTAINER ID"), ("Names", "NAMES")]),
            "CONTAINER ID\tNAMES\tLABELS"
        );
        assert!(!Template::parse("tablet {{.ID}}").unwrap().table);
    }
}
