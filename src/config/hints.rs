//! Turning the YAML parser's words into advice: "did you mean" for a
//! mistyped key or value, and what a tab or a misaligned key looks like.

/// The parser's message, rewritten where we can say something more useful.
/// `text` is the whole file and `line` (1-based) the line the error points at.
pub(super) fn teach(message: &str, text: &str, line: usize) -> String {
    let source = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
    for what in ["unknown field", "unknown variant"] {
        if let Some(m) = did_you_mean(message, what) {
            return m;
        }
    }
    if message.contains("found character that cannot start any token") && source.contains('\t') {
        return format!("{message}: this line has a tab; YAML indents with spaces only");
    }
    if let Some(m) = broken_block(message, text, line, source) {
        return m;
    }
    if message.contains("did not find expected key")
        || message.contains("mapping values are not allowed")
    {
        return format!(
            "{message}: check this line's indentation against the lines above (keys of one mapping line up, list items start with `- `)"
        );
    }
    if let Some(m) = misplaced(message) {
        return m;
    }
    message.to_string()
}

/// An indentation mistake inside a block the parser names ("while parsing
/// a block mapping at line M column C"): which key's block it broke, and
/// where that block's keys or items start.
fn broken_block(message: &str, text: &str, line: usize, source: &str) -> Option<String> {
    let (head, at) = message.split_once(", while parsing a block ")?;
    let (kind, place) = at.split_once(" at line ")?;
    let (m, c) = place.split_once(" column ")?;
    let (m, c): (usize, usize) = (m.trim().parse().ok()?, c.trim().parse().ok()?);
    // Line M holds the block's first key (or first item's dash): the
    // block is that key's parent (or the list holding that item).
    let first = super::locate::path_at(text, m);
    let path = match kind {
        "mapping" => first.rsplit_once('.').map_or("", |(p, _)| p).to_string(),
        _ => first
            .rsplit_once('[')
            .map_or(first.as_str(), |(p, _)| p)
            .to_string(),
    };
    let (name, column) = (
        if path.is_empty() {
            "the file".to_string()
        } else {
            format!("`{path}`")
        },
        c.saturating_sub(1),
    );
    let here = source.len() - source.trim_start_matches(' ').len();
    Some(match kind {
        "mapping" => format!(
            "{head}: line {line} is indented {here} spaces, but it sits in the block of {name} (line {m}), whose keys start at {column} spaces; line it up with them, or move it under the key it belongs to"
        ),
        "collection" | "sequence" => format!(
            "{head}: line {line} (indented {here} spaces) breaks the list {name} (line {m}): a new item starts with `- ` at {column} spaces, and a line of the item above lines up with that item's first key"
        ),
        _ => return None,
    })
}

/// "expected struct RawPool" where a section got the wrong kind of value.
fn misplaced(message: &str) -> Option<String> {
    let (before, what) = message.split_once("expected struct Raw")?;
    let (noun, example) = match what.trim() {
        "Pool" => ("a pool", "`backends:` and the pool's settings"),
        "Route" => ("a route", "`name:`, `pool:` and the route's settings"),
        "Listener" => ("a listener", "`addr:`"),
        "Server" => ("the server settings", "keys such as `handshake_timeout:`"),
        "Admin" => ("the admin listener", "`addr:`"),
        _ => return None,
    };
    let mut out = format!("{before}expected {noun}: a mapping with {example}");
    // `pools.balance: …`: a pool's setting written at the level of pool names.
    if let Some(key) = before.split(':').next().and_then(|p| p.rsplit('.').next()) {
        if noun == "a pool" && POOL_KEYS.contains(&key) {
            out.push_str(&format!(
                "; `{key}` is a pool setting: indent it under the pool it belongs to"
            ));
        }
    }
    Some(out)
}

/// A pool's keys, to recognise one misplaced at the level of pool names.
const POOL_KEYS: &[&str] = &[
    "backends",
    "balance",
    "hash_key",
    "connect_timeout",
    "health",
    "eject_after",
    "eject_for",
    "fail_open",
    "on_backend_down",
    "max_attempts",
    "slow_start",
    "dns_refresh",
    "ca_file",
];

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
            teach(m, "", 1),
            "routes[0]: unknown key `strip_prefx`; did you mean `strip_prefix`?"
        );
        let m = "routes[0].mode: unknown variant `fanot`, expected `splice` or `fanout`";
        assert_eq!(
            teach(m, "", 1),
            "routes[0].mode: unknown value `fanot`; did you mean `fanout`?"
        );
        // Nothing close: the list stays, shorter.
        let m = "unknown field `zzzzzz`, expected one of `name`, `host`";
        assert_eq!(
            teach(m, "", 1),
            "unknown key `zzzzzz`; expected one of name, host"
        );
    }

    #[test]
    fn tabs_and_indentation_get_a_hint() {
        let m = "found character that cannot start any token, while scanning for the next token";
        assert!(teach(m, "\t- addr: x", 1).contains("YAML indents with spaces only"));
        let m = "did not find expected key, while parsing a block mapping";
        assert!(teach(m, " pools:", 1).contains("indentation"));
        // Which block broke, and where its keys start.
        let y = "pools:\n  chat:\n    backends: [ws://a:1]\n     balance: p2c\n";
        let m = "did not find expected key, while parsing a block mapping at line 3 column 5";
        assert_eq!(
            teach(m, y, 4),
            "did not find expected key: line 4 is indented 5 spaces, but it sits in the block of `pools.chat` (line 3), whose keys start at 4 spaces; line it up with them, or move it under the key it belongs to"
        );
        let y = "routes:\n  - name: a\n    pool: p\n   path: /x\n";
        let m = "did not find expected '-' indicator, while parsing a block collection at line 2 column 3";
        assert!(
            teach(m, y, 4).contains(
                "breaks the list `routes` (line 2): a new item starts with `- ` at 2 spaces"
            ),
            "{}",
            teach(m, y, 4)
        );
    }

    #[test]
    fn a_setting_at_the_wrong_level_is_named() {
        let m = "pools.balance: invalid type: string \"p2c\", expected struct RawPool";
        assert_eq!(
            teach(m, "", 1),
            "pools.balance: invalid type: string \"p2c\", expected a pool: a mapping with `backends:` and the pool's settings; `balance` is a pool setting: indent it under the pool it belongs to"
        );
    }

    #[test]
    fn distances() {
        assert_eq!(distance("strip_prefx", "strip_prefix"), 1);
        assert_eq!(distance("ab", "ba"), 1);
        assert_eq!(distance("", "abc"), 3);
    }
}
