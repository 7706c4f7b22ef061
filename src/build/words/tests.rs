use std::collections::HashMap;

use super::*;

fn env() -> HashMap<String, String> {
    [
        ("A", "1"),
        ("X", "x"),
        ("EMPTY", ""),
        ("SPACED", "a  b"),
        ("HOME", "/root"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn ex(s: &str) -> Result<String, WordError> {
    let e = env();
    expand(s, &|k| e.get(k).cloned())
}

fn word(s: &str) -> Result<String, WordError> {
    let e = env();
    process_word(s, &|k| e.get(k).cloned())
}

fn split(s: &str) -> Result<Vec<String>, WordError> {
    let e = env();
    split_words(s, &|k| e.get(k).cloned())
}

fn kv(s: &str) -> Result<Vec<(String, Option<String>)>, WordError> {
    let e = env();
    key_values(s, &|k| e.get(k).cloned())
}

fn pair(k: &str, v: &str) -> (String, Option<String>) {
    (k.to_string(), Some(v.to_string()))
}

#[test]
fn plain_and_braced_variables() {
    assert_eq!(ex("$A").unwrap(), "1");
    assert_eq!(ex("${A}").unwrap(), "1");
    assert_eq!(ex("pre-$X-post").unwrap(), "pre-x-post");
    assert_eq!(ex("${X}y").unwrap(), "xy");
    assert_eq!(
        ex("$Xy").unwrap(),
        "",
        "the name runs to the end of the word"
    );
    assert_eq!(ex("$HOME/bin").unwrap(), "/root/bin");
}

#[test]
fn unknown_variables_are_empty() {
    assert_eq!(ex("a${NOPE}b$NOPE").unwrap(), "ab");
}

#[test]
fn lone_dollar_is_literal() {
    assert_eq!(ex("a $ b").unwrap(), "a $ b");
    assert_eq!(ex("cost$").unwrap(), "cost$");
    assert_eq!(ex("$-x").unwrap(), "$-x");
}

#[test]
fn numeric_names() {
    let e = |k: &str| (k == "1").then(|| "one".to_string());
    assert_eq!(expand("$1x", &e).unwrap(), "onex");
    assert_eq!(expand("${1}", &e).unwrap(), "one");
}

#[test]
fn default_and_alternative() {
    assert_eq!(ex("${NOPE:-d}").unwrap(), "d");
    assert_eq!(ex("${EMPTY:-d}").unwrap(), "d");
    assert_eq!(ex("${A:-d}").unwrap(), "1");
    assert_eq!(
        ex("${EMPTY-d}").unwrap(),
        "",
        "without ':' only unset counts"
    );
    assert_eq!(ex("${NOPE-d}").unwrap(), "d");
    assert_eq!(ex("${A:+alt}").unwrap(), "alt");
    assert_eq!(ex("${EMPTY:+alt}").unwrap(), "");
    assert_eq!(ex("${NOPE:+alt}").unwrap(), "");
    assert_eq!(ex("${EMPTY+alt}").unwrap(), "alt");
    assert_eq!(ex("${NOPE+alt}").unwrap(), "");
}

#[test]
fn nested_words_are_expanded() {
    assert_eq!(ex("${NOPE:-$X/${A}}").unwrap(), "x/1");
    assert_eq!(ex("${NOPE:-${ALSO:-deep}}").unwrap(), "deep");
    assert_eq!(word("${NOPE:-'a b'}").unwrap(), "a b");
}

#[test]
fn required_variables() {
    assert_eq!(ex("${A:?}").unwrap(), "1");
    assert_eq!(
        ex("${NOPE:?must be set}").unwrap_err(),
        WordError::Required {
            name: "NOPE".into(),
            message: "must be set".into()
        }
    );
    assert_eq!(
        ex("${EMPTY:?}").unwrap_err().to_string(),
        "EMPTY: is not allowed to be empty"
    );
    assert_eq!(ex("${EMPTY?}").unwrap(), "");
    assert_eq!(
        ex("${NOPE?}").unwrap_err().to_string(),
        "NOPE: is not allowed to be unset"
    );
}

#[test]
fn escaped_dollar_is_literal() {
    assert_eq!(ex(r"\$A").unwrap(), "$A");
    assert_eq!(ex(r"\${A}").unwrap(), "${A}");
    assert_eq!(word(r"\$A").unwrap(), "$A");
    assert_eq!(split(r"\$A").unwrap(), ["$A"]);
    assert_eq!(ex(r#""\$A""#).unwrap(), r#""$A""#);
}

#[test]
fn expand_keeps_quotes_and_does_not_expand_single_quotes() {
    assert_eq!(ex("'$X'").unwrap(), "'$X'");
    assert_eq!(ex("\"$X\"").unwrap(), "\"x\"");
    assert_eq!(ex("\"'$X'\"").unwrap(), "\"'x'\"");
    assert_eq!(ex(r#""a \" b""#).unwrap(), r#""a \" b""#);
    assert_eq!(ex(r"C:\\dir \n").unwrap(), r"C:\\dir \n");
    assert_eq!(
        ex(r"\'$X").unwrap(),
        r"\'x",
        "an escaped quote opens nothing"
    );
}

#[test]
fn process_word_removes_quotes_without_splitting() {
    assert_eq!(word("/my \"two  words\"/$X").unwrap(), "/my two  words/x");
    assert_eq!(word("'$X' \"$X\"").unwrap(), "$X x");
    assert_eq!(word(r"a\ b\\c\").unwrap(), r"a b\c");
    assert_eq!(word(r#""\a\"\\""#).unwrap(), r#"\a"\"#);
}

#[test]
fn split_on_unquoted_whitespace() {
    assert_eq!(split("  a  b\tc ").unwrap(), ["a", "b", "c"]);
    assert_eq!(split("a\"b c\"d 'e  f'").unwrap(), ["ab cd", "e  f"]);
    assert_eq!(split(r"a\ b c").unwrap(), ["a b", "c"]);
    assert!(split("").unwrap().is_empty());
}

#[test]
fn split_expands_variables() {
    assert_eq!(split("$X \"$A\" '$A'").unwrap(), ["x", "1", "$A"]);
    assert_eq!(
        split("$SPACED").unwrap(),
        ["a", "b"],
        "unquoted values split"
    );
    assert_eq!(
        split("\"$SPACED\"").unwrap(),
        ["a  b"],
        "quoted ones do not"
    );
    assert_eq!(split("pre$SPACED").unwrap(), ["prea", "b"]);
    assert_eq!(split("80/tcp ${PORT:-443}").unwrap(), ["80/tcp", "443"]);
}

#[test]
fn split_double_quote_escapes() {
    assert_eq!(
        split(r#""a\"b" "c\\d" "e\f""#).unwrap(),
        [r#"a"b"#, r"c\d", r"e\f"]
    );
}

#[test]
fn empty_words_are_dropped() {
    assert_eq!(split("a \"\" '' $NOPE \"$EMPTY\" b").unwrap(), ["a", "b"]);
}

#[test]
fn syntax_errors() {
    assert_eq!(
        ex("'abc").unwrap_err(),
        WordError::UnterminatedSingleQuote("'abc".into())
    );
    assert_eq!(
        split("\"abc").unwrap_err(),
        WordError::UnterminatedDoubleQuote("\"abc".into())
    );
    assert_eq!(
        ex("\"abc\\").unwrap_err(),
        WordError::UnterminatedDoubleQuote("\"abc\\".into())
    );
    assert_eq!(ex("${").unwrap_err(), WordError::MissingBrace("${".into()));
    assert_eq!(
        ex("${A").unwrap_err(),
        WordError::MissingBrace("${A".into())
    );
    assert_eq!(
        ex("${A:-x").unwrap_err(),
        WordError::MissingBrace("${A:-x".into())
    );
    assert_eq!(
        ex("${}").unwrap_err(),
        WordError::BadSubstitution("${}".into())
    );
    assert_eq!(
        ex("${:-x}").unwrap_err(),
        WordError::BadSubstitution("${:-x}".into())
    );
    assert_eq!(
        ex("${A#x}").unwrap_err(),
        WordError::BadSubstitution("${A#x}".into())
    );
    assert_eq!(
        ex("${A:=x}").unwrap_err(),
        WordError::UnsupportedModifier {
            modifier: '=',
            input: "${A:=x}".into()
        }
    );
    assert!(ex("${A:=x}")
        .unwrap_err()
        .to_string()
        .contains("unsupported modifier (=)"));
    assert!(ex("${").unwrap_err().to_string().contains("missing '}'"));
}

#[test]
fn key_values_modern_form() {
    assert_eq!(
        kv("K=V K2=\"two words\" K3= K4='$X' K5=$X").unwrap(),
        [
            pair("K", "V"),
            pair("K2", "two words"),
            pair("K3", ""),
            pair("K4", "$X"),
            pair("K5", "x"),
        ]
    );
    assert_eq!(kv("K=a=b").unwrap(), [pair("K", "a=b")]);
    assert_eq!(kv(r"K=a\ b").unwrap(), [pair("K", "a b")]);
    assert_eq!(kv("K=\"a \\\" b\"").unwrap(), [pair("K", "a \" b")]);
    assert_eq!(
        kv("org.label-schema.name=\"x y\"").unwrap(),
        [pair("org.label-schema.name", "x y")]
    );
}

#[test]
fn key_values_legacy_form() {
    assert_eq!(
        kv("KEY value with  spaces").unwrap(),
        [pair("KEY", "value with  spaces")]
    );
    assert_eq!(
        kv("KEY   \"quoted\" $X  ").unwrap(),
        [pair("KEY", "quoted x")]
    );
    assert_eq!(kv("KEY a=b").unwrap(), [pair("KEY", "a=b")]);
}

#[test]
fn key_values_name_only() {
    assert_eq!(kv("NAME").unwrap(), [("NAME".to_string(), None)]);
    assert!(kv("   ").unwrap().is_empty());
}

#[test]
fn key_values_errors() {
    assert_eq!(
        kv("A=1 B").unwrap_err(),
        WordError::MissingEquals("B".into())
    );
    assert!(kv("A=1 B")
        .unwrap_err()
        .to_string()
        .contains("can't find = in \"B\""));
    assert_eq!(kv("=1").unwrap_err(), WordError::EmptyName("".into()));
    assert_eq!(
        kv("A=\"open").unwrap_err(),
        WordError::UnterminatedDoubleQuote("\"open".into())
    );
}

#[test]
fn key_values_see_the_environment_before_the_line() {
    // A=1 before the line: `ENV A=2 B=$A` gives B=1, as in Docker.
    assert_eq!(kv("A=2 B=$A").unwrap(), [pair("A", "2"), pair("B", "1")]);
    assert_eq!(kv("B=${A}2").unwrap(), [pair("B", "12")]);
}

#[test]
fn keys_are_expanded() {
    assert_eq!(kv("${X}KEY=v").unwrap(), [pair("xKEY", "v")]);
}

#[test]
fn arg_values_have_optional_defaults() {
    let e = env();
    let got = arg_values("A B=2 C=${X} D=", &|k| e.get(k).cloned()).unwrap();
    assert_eq!(
        got,
        [
            ("A".to_string(), None),
            pair("B", "2"),
            pair("C", "x"),
            pair("D", ""),
        ]
    );
}

#[test]
fn raw_words_keep_quotes() {
    assert_eq!(
        raw_words(r#"a="b c" 'd e'f \" g\ h"#),
        [r#"a="b c""#, "'d e'f", r#"\""#, r"g\ h"]
    );
    assert_eq!(raw_words(r#"a="x\"y z""#), [r#"a="x\"y z""#]);
}
