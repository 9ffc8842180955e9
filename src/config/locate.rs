//! Finds the line of a key path (`routes[1].pool`) in block-style YAML text.
//!
//! serde gives line numbers only for errors raised while deserializing; the
//! checks that need the whole config (a route naming a missing pool, a
//! duplicate route) run afterwards, so they use this to point at the line.
//! It understands indentation, `- ` sequence items and flow collections (for
//! which it answers with the line of the key). On anything it cannot follow
//! it returns the closest enclosing line it found.

/// One step of a key path.
#[derive(Debug, Clone, Copy)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

struct Line<'a> {
    /// 1-based line number.
    no: usize,
    /// Column of the first character of `text`, after any `- ` markers.
    indent: usize,
    /// Columns of the `-` item markers that start this line, outermost first.
    dashes: Vec<usize>,
    text: &'a str,
}

fn lines(src: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    for (i, raw) in src.lines().enumerate() {
        let mut col = raw.len() - raw.trim_start_matches(' ').len();
        let mut text = &raw[col..];
        if text.is_empty() || text.starts_with('#') || text.starts_with("---") {
            continue;
        }
        let mut dashes = Vec::new();
        while text == "-" || text.starts_with("- ") {
            dashes.push(col);
            let rest = &text[1..];
            let skip = 1 + rest.len() - rest.trim_start_matches(' ').len();
            col += skip;
            text = &text[skip..];
        }
        out.push(Line {
            no: i + 1,
            indent: col,
            dashes,
            text,
        });
    }
    out
}

fn key_of(text: &str) -> Option<&str> {
    let (k, _) = text.split_once(':')?;
    Some(k.trim().trim_matches(|c| c == '"' || c == '\''))
}

/// Returns the 1-based line of `path` in `src`, or the nearest line found.
pub fn locate(src: &str, path: &[Seg]) -> usize {
    let ls = lines(src);
    // The current node: a range of lines [lo, hi) whose entries start at column `col`.
    let (mut lo, mut hi) = (0, ls.len());
    let mut col = ls.first().map_or(0, |l| l.indent);
    let mut best = ls.first().map_or(1, |l| l.no);
    for seg in path {
        match *seg {
            Seg::Key(k) => {
                let found =
                    (lo..hi).find(|&i| ls[i].indent == col && key_of(ls[i].text) == Some(k));
                let Some(i) = found else { return best };
                best = ls[i].no;
                // The value is the following lines indented deeper than the key
                // (or a sequence whose dashes sit at the key's column).
                let end = (i + 1..hi)
                    .find(|&j| {
                        let first = ls[j].dashes.first().copied().unwrap_or(ls[j].indent);
                        first < col || (first == col && ls[j].dashes.is_empty())
                    })
                    .unwrap_or(hi);
                lo = i + 1;
                hi = end;
                col = match ls.get(lo) {
                    Some(l) if lo < hi => l.dashes.first().copied().unwrap_or(l.indent),
                    _ => return best,
                };
            }
            Seg::Index(n) => {
                // Item starts are lines with a dash at column `col`.
                let starts: Vec<usize> =
                    (lo..hi).filter(|&i| ls[i].dashes.contains(&col)).collect();
                let Some(&i) = starts.get(n) else { return best };
                best = ls[i].no;
                let end = starts.get(n + 1).copied().unwrap_or(hi);
                // The item's own entries start after its dash.
                let pos = ls[i].dashes.iter().position(|&d| d == col).unwrap_or(0);
                let inner = match ls[i].dashes.get(pos + 1) {
                    Some(&d) => d,
                    // A lone `-`: the item's entries start on the next line.
                    None if ls[i].text.is_empty() => match ls.get(i + 1) {
                        Some(next) if i + 1 < end => {
                            next.dashes.first().copied().unwrap_or(next.indent)
                        }
                        _ => return best,
                    },
                    None => ls[i].indent,
                };
                lo = i;
                hi = end;
                col = inner;
            }
        }
    }
    best
}

/// The key path of the node that starts at 1-based `line` (`pools.chat`,
/// `routes[1]`), read from indentation alone: for errors of a file the
/// parser could not finish, which have a line but no path.
pub fn path_at(src: &str, line: usize) -> String {
    let ls = lines(src);
    let Some(mut i) = ls.iter().rposition(|l| l.no <= line) else {
        return String::new();
    };
    let mut segs: Vec<String> = Vec::new();
    // The line reached is an item whose first key is a sibling, not a parent.
    let mut sibling = false;
    loop {
        let l = &ls[i];
        // A key is followed by `: ` or ends the line (`ws://a` is a value).
        let is_key = l.text.contains(": ") || l.text.ends_with(':');
        if let Some(k) = key_of(l.text).filter(|_| is_key && !sibling) {
            segs.push(k.to_string());
        }
        // Where this line's node starts: its outermost dash, or its key.
        let start = l.dashes.first().copied().unwrap_or(l.indent);
        let parent = (0..i).rev().find(|&j| {
            let first = ls[j].dashes.first().copied().unwrap_or(ls[j].indent);
            first < start
                || (ls[j].indent < start && first <= start)
                // `key:` with its list's dashes at the key's own column.
                || (!l.dashes.is_empty() && ls[j].dashes.is_empty() && ls[j].indent == start)
        });
        if let Some(&d) = l.dashes.first() {
            // Item number: dashes at the same column since the parent.
            let from = parent.map_or(0, |p| p + 1);
            let n = (from..i)
                .filter(|&j| ls[j].dashes.first() == Some(&d))
                .count();
            segs.push(format!("[{n}]"));
        }
        match parent {
            Some(p) => {
                sibling = ls[p].indent == l.dashes.first().map_or(l.indent, |_| usize::MAX);
                i = p;
            }
            None => break,
        }
    }
    let mut out = String::new();
    for s in segs.iter().rev() {
        if !out.is_empty() && !s.starts_with('[') {
            out.push('.');
        }
        out.push_str(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Seg::*;

    const Y: &str = "\
# comment
listen:
  - addr: 127.0.0.1:8080
pools:
  chat:
    backends:
      - ws://a:1
      - ws://b:2
  ticker:
    backends: [ \"ws://c:3\" ]
routes:
  - name: chat
    path: /chat
    pool: chat
  -
    name: ticker
    pool: tick
";

    #[test]
    fn finds_keys_items_and_nested_values() {
        assert_eq!(locate(Y, &[Key("pools")]), 4);
        assert_eq!(locate(Y, &[Key("pools"), Key("ticker")]), 9);
        assert_eq!(
            locate(Y, &[Key("pools"), Key("chat"), Key("backends"), Index(1)]),
            8
        );
        assert_eq!(
            locate(Y, &[Key("pools"), Key("ticker"), Key("backends"), Index(0)]),
            10
        );
        assert_eq!(locate(Y, &[Key("routes"), Index(0), Key("pool")]), 14);
        assert_eq!(locate(Y, &[Key("routes"), Index(1), Key("pool")]), 17);
        assert_eq!(locate(Y, &[Key("routes"), Index(1), Key("name")]), 16);
        assert_eq!(locate(Y, &[Key("listen"), Index(0), Key("addr")]), 3);
    }

    #[test]
    fn sequences_at_the_key_column() {
        let y = "routes:\n- name: a\n  pool: x\n- name: b\n  pool: y\n";
        assert_eq!(locate(y, &[Key("routes"), Index(1), Key("pool")]), 5);
    }

    #[test]
    fn paths_of_lines() {
        assert_eq!(path_at(Y, 4), "pools");
        assert_eq!(path_at(Y, 5), "pools.chat");
        assert_eq!(path_at(Y, 10), "pools.ticker.backends");
        assert_eq!(path_at(Y, 12), "routes[0].name");
        assert_eq!(path_at(Y, 14), "routes[0].pool");
        assert_eq!(path_at(Y, 17), "routes[1].pool");
        assert_eq!(path_at(Y, 8), "pools.chat.backends[1]");
        let y = "routes:\n- name: a\n  pool: x\n- name: b\n  pool: y\n";
        assert_eq!(path_at(y, 5), "routes[1].pool");
    }

    #[test]
    fn falls_back_to_nearest_line() {
        assert_eq!(locate(Y, &[Key("routes"), Index(9), Key("pool")]), 11);
        assert_eq!(locate(Y, &[Key("nope")]), 2);
    }
}
