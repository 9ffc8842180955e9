//! Turning the YAML parser's words into advice: "did you mean" for a
//! mistyped key or value, and what a tab or a misaligned key looks like.

/// The parser's message, rewritten where we can say something more useful.
/// `line` is the source line the error points at.
pub(super) fn teach(message: &str, line: &str) -> String {
    for what in ["unknown field", "unknown variant"] {
        if let Some(m) = did_you_mean(message, what) {
            return m;
        }
    }
    if message.contains("found character that cannot start any token") && line.contains('\t') {
        return format!("{message}: this line has a tab; YAML indents with spaces only");
    }
    if message.contains("did not find expected key")
        || message.contains("mapping values are not allowed")
    {
        return format!(
            "{message}: check this line's indentation against the lines above (keys of one mapping line up, list items start with `- `)"
        );
    }
    message.to_string()
}

/// `… unknown field `X`, expected one of `a`, `b` …` with the closest
/// expected word offered, and the list kept only when none is close.
fn did_you_mean(message: &str, what: &str) -> Option<String> {
    let at = message.find(what)?;
    let (before, rest) = message.split_at(at);
    let word = rest.split('`').nth(1)?;
    let expected: Vec<&str> = rest
        .split_once("expected")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let kind = if what == "unknown field" {
        "key"
    } else {
        "value"
    };
    let best = expected
        .iter()
        .map(|e| (distance(word, e), *e))
        .filter(|(d, e)| *d <= (e.len() / 3).max(2))
        .min();
    Some(match best {
        Some((_, e)) => format!("{before}unknown {kind} `{word}`; did you mean `{e}`?"),
        None if expected.is_empty() => return None,
        None => format!(
            "{before}unknown {kind} `{word}`; expected one of {}",
            expected.join(", ")
        ),
    })
}

/// Edit distance (insertions, deletions, substitutions, adjacent swaps).
fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, v) in d[0].iter_mut().enumerate() {
        *v = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_gets_the_closest_key() {
        let m = "routes[0]: unknown field `strip_prefx`, expected one of `name`, `host`, `strip_prefix`, `mode`";
        assert_eq!(
            teach(m, ""),
            "routes[0]: unknown key `strip_prefx`; did you mean `strip_prefix`?"
        );
        let m = "routes[0].mode: unknown variant `fanot`, expected `splice` or `fanout`";
        assert_eq!(
            teach(m, ""),
            "routes[0].mode: unknown value `fanot`; did you mean `fanout`?"
        );
        // Nothing close: the list stays, shorter.
        let m = "unknown field `zzzzzz`, expected one of `name`, `host`";
        assert_eq!(
            teach(m, ""),
            "unknown key `zzzzzz`; expected one of name, host"
        );
    }

    #[test]
    fn tabs_and_indentation_get_a_hint() {
        let m = "found character that cannot start any token, while scanning for the next token";
        assert!(teach(m, "\t- addr: x").contains("YAML indents with spaces only"));
        let m = "did not find expected key, while parsing a block mapping";
        assert!(teach(m, " pools:").contains("indentation"));
    }

    #[test]
    fn distances() {
        assert_eq!(distance("strip_prefx", "strip_prefix"), 1);
        assert_eq!(distance("ab", "ba"), 1);
        assert_eq!(distance("", "abc"), 3);
    }
}
