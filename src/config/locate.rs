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
    fn falls_back_to_nearest_line() {
        assert_eq!(locate(Y, &[Key("routes"), Index(9), Key("pool")]), 11);
        assert_eq!(locate(Y, &[Key("nope")]), 2);
    }
}
