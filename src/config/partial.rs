//! Parsing that goes on after the first mistake, so `upgate check` reports
//! every error of a file in one run.
//!
//! serde stops at the first error. When the whole file does not fit the
//! config's shape (but is valid YAML), each top-level section is parsed on
//! its own, and a section that fails is parsed item by item (each route,
//! listener and pool). An item with a mistake on one of its inner lines is
//! parsed again with that line (and its block) left out, so two mistyped
//! keys in one route are both found. Every piece keeps the file's line
//! numbers (each piece's lines are mapped back), so errors point at the real line
//! and column (only unknown keys are left out to look further: after a bad
//! value the rest of an item would be guesswork). Items that parse are validated as usual; the others are
//! left out, and errors that only follow from them (a route naming a pool
//! that failed) are not reported twice.

use std::path::Path;

use serde::Deserialize;

use super::raw::{self, RawAdmin, RawListener, RawPool, RawRoute, RawServer};
use super::{syntax_error, syntax_error_in, ConfigError};

/// What parsed, in file order with each item's index, and what did not.
#[derive(Default)]
pub(super) struct Parsed {
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    pub listen: Vec<(usize, RawListener)>,
    pub pools: Vec<(String, RawPool)>,
    pub routes: Vec<(usize, RawRoute)>,
    /// Sections with an item (or the whole section) that did not parse.
    pub listen_broken: bool,
    pub routes_broken: bool,
    /// Pools that did not parse, by name.
    pub broken_pools: Vec<String>,
}

/// Any subset of the sections (the others blank).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Sections {
    server: Option<RawServer>,
    admin: Option<RawAdmin>,
    listen: Option<Vec<RawListener>>,
    pools: Option<raw::indexmap_lite::OrderedMap<RawPool>>,
    routes: Option<Vec<RawRoute>>,
}

const SECTIONS: [&str; 5] = ["server", "listen", "pools", "routes", "admin"];

/// Retries of one item with a faulty line left out.
const RETRIES: usize = 10;

/// Parses `text`; a YAML syntax error (the parser cannot go on) is the only
/// `Err`. Shape errors come back beside what parsed.
pub(super) fn parse(file: &Path, text: &str) -> Result<(Parsed, Vec<ConfigError>), ConfigError> {
    match serde_yaml::from_str::<raw::RawConfig>(text) {
        Ok(r) => {
            let parsed = Parsed {
                server: r.server,
                admin: r.admin,
                listen: r.listen.into_iter().enumerate().collect(),
                pools: r.pools.0,
                routes: r.routes.into_iter().enumerate().collect(),
                ..Parsed::default()
            };
            Ok((parsed, Vec::new()))
        }
        Err(e) => {
            if serde_yaml::from_str::<serde_yaml::Value>(text).is_err() {
                // Not even YAML: the parser cannot go on.
                return Err(syntax_error(file, text, &e));
            }
            // Valid YAML: the shape is wrong somewhere. If no section is
            // found below, this first error is still reported.
            let mut p = Partial {
                file,
                text,
                lines: text.lines().collect(),
                parsed: Parsed::default(),
                errs: Vec::new(),
            };
            p.sections();
            if p.errs.is_empty() {
                p.errs.push(syntax_error(file, text, &e));
            }
            Ok((p.parsed, p.errs))
        }
    }
}

struct Partial<'a> {
    file: &'a Path,
    text: &'a str,
    lines: Vec<&'a str>,
    parsed: Parsed,
    errs: Vec<ConfigError>,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start_matches(' ').len()
}

/// Blank, a comment, or a document marker.
fn is_filler(l: &str) -> bool {
    let t = l.trim();
    t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
}

impl Partial<'_> {
    /// The piece of the file made of line `header` and lines `s..e`
    /// (0-based; those marked in `skip` left blank), and the map from its
    /// 1-based line numbers to the file's.
    fn piece(
        &self,
        header: usize,
        s: usize,
        e: usize,
        skip: &[bool],
    ) -> (String, impl Fn(usize) -> usize) {
        let mut out = String::new();
        if header < s {
            out.push_str(self.lines[header]);
            out.push('\n');
        }
        for i in s..e {
            if !skip.get(i - s).copied().unwrap_or(false) {
                out.push_str(self.lines[i]);
            }
            out.push('\n');
        }
        let first = if header < s { 2 } else { 1 };
        let map = move |l: usize| {
            if l < first {
                header + 1
            } else {
                s + 1 + (l - first)
            }
        };
        (out, map)
    }

    /// The top-level keys and their line ranges (0-based, end exclusive).
    fn top_level(&self) -> Vec<(String, usize, usize)> {
        let starts: Vec<usize> = (0..self.lines.len())
            .filter(|&i| {
                let l = self.lines[i];
                !is_filler(l) && indent(l) == 0 && !l.starts_with('-')
            })
            .collect();
        starts
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let end = starts.get(k + 1).copied().unwrap_or(self.lines.len());
                (key_of(self.lines[s]), s, end)
            })
            .collect()
    }

    fn sections(&mut self) {
        let top = self.top_level();
        for (key, start, end) in &top {
            if !SECTIONS.contains(&key.as_str()) {
                let expected = SECTIONS.map(|s| format!("`{s}`")).join(", ");
                let message = format!("unknown field `{key}`, expected one of {expected}");
                self.errs.push(ConfigError::Syntax {
                    file: self.file.to_path_buf(),
                    line: start + 1,
                    column: 1,
                    message: super::hints::teach(&message, self.text, start + 1),
                });
                continue;
            }
            self.section(key, *start, *end);
        }
        for required in ["listen", "pools", "routes"] {
            if !top.iter().any(|(k, ..)| k == required) {
                self.errs.push(ConfigError::Invalid {
                    file: self.file.to_path_buf(),
                    line: 1,
                    key: required.to_string(),
                    message: format!("missing section `{required}:`"),
                });
            }
        }
    }

    /// Parses the section at lines `start..end`, item by item if needed.
    fn section(&mut self, key: &str, start: usize, end: usize) {
        let (doc, line_of) = self.piece(start, start, end, &[]);
        let e = match serde_yaml::from_str::<Sections>(&doc) {
            Ok(s) => return self.take(s, None),
            Err(e) => syntax_error_in(self.file, self.text, &e, line_of),
        };
        let items = match key {
            "listen" | "routes" => self.sequence_items(start, end),
            "pools" => self.mapping_items(start, end),
            _ => Vec::new(),
        };
        match key {
            "listen" => self.parsed.listen_broken = true,
            "routes" => self.parsed.routes_broken = true,
            _ => {}
        }
        if items.is_empty() {
            // `server`, `admin`, or a list written in flow style: the
            // section as a whole, again without each faulty inner line.
            self.item(start, start, end, None);
            return;
        }
        let before = self.errs.len();
        for (index, (s, e)) in items.into_iter().enumerate() {
            self.item(start, s, e, Some(index));
        }
        if self.errs.len() == before {
            // Each item is fine alone; the section as a whole is not (a
            // pool name used twice, say).
            self.errs.push(e);
        }
    }

    /// Parses lines `s..e` under the section header at `header` (item
    /// `index` of a list, or the whole section), leaving out each inner
    /// line that has an error and trying again.
    fn item(&mut self, header: usize, s: usize, e: usize, index: Option<usize>) {
        let mut skip = vec![false; e - s];
        for _ in 0..RETRIES {
            let (doc, line_of) = self.piece(header, s, e, &skip);
            let err = match serde_yaml::from_str::<Sections>(&doc) {
                Ok(parsed) if skip.iter().any(|&x| x) => {
                    // Parsed only without its faulty lines: not usable.
                    drop(parsed);
                    self.mark_broken(header, s);
                    return;
                }
                Ok(parsed) => return self.take(parsed, index),
                Err(err) => err,
            };
            let mut error = syntax_error_in(self.file, self.text, &err, &line_of);
            if let (Some(i), ConfigError::Syntax { message, .. }) = (index, &mut error) {
                // Alone, the item is `[0]` of its list: give its real index.
                for list in ["routes", "listen"] {
                    let alone = format!("{list}[0]");
                    if message.starts_with(&alone) {
                        message.replace_range(..alone.len(), &format!("{list}[{i}]"));
                    }
                }
            }
            // Only an unknown key can be left out cleanly; after any other
            // mistake the rest of the item would be guesswork.
            let line = error
                .line()
                .map(|l| l.saturating_sub(1))
                .filter(|_| err.to_string().contains("unknown field"));
            if !self.errs.iter().any(|x| x.to_string() == error.to_string()) {
                self.errs.push(error);
            }
            // An inner line (not the item's first) can be left out with its block.
            match line {
                Some(l) if l > s && l < e && !skip[l - s] => {
                    let depth = indent(self.lines[l]);
                    skip[l - s] = true;
                    for k in l + 1..e {
                        if is_filler(self.lines[k]) || indent(self.lines[k]) > depth {
                            skip[k - s] = true;
                        } else {
                            break;
                        }
                    }
                }
                _ => {
                    self.mark_broken(header, s);
                    return;
                }
            }
        }
        self.mark_broken(header, s);
    }

    fn mark_broken(&mut self, header: usize, s: usize) {
        if self.lines[header].starts_with("pools") {
            self.parsed.broken_pools.push(key_of(self.lines[s]));
        }
    }

    /// Keeps what a (sub-)document yielded; `index` is the item's place in its list.
    fn take(&mut self, s: Sections, index: Option<usize>) {
        if let Some(server) = s.server {
            self.parsed.server = server;
        }
        if s.admin.is_some() {
            self.parsed.admin = s.admin;
        }
        if let Some(l) = s.listen {
            match index {
                Some(i) => self.parsed.listen.extend(l.into_iter().map(|x| (i, x))),
                None => self.parsed.listen.extend(l.into_iter().enumerate()),
            }
        }
        if let Some(p) = s.pools {
            self.parsed.pools.extend(p.0);
        }
        if let Some(r) = s.routes {
            match index {
                Some(i) => self.parsed.routes.extend(r.into_iter().map(|x| (i, x))),
                None => self.parsed.routes.extend(r.into_iter().enumerate()),
            }
        }
    }

    /// The items of a block sequence under the header at `start`: each
    /// from its `- ` line to the next at the same indentation.
    fn sequence_items(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let body = (start + 1..end).filter(|&i| !is_filler(self.lines[i]));
        let Some(first) = body.clone().next() else {
            return Vec::new();
        };
        let col = indent(self.lines[first]);
        let dash = |i: usize| {
            let t = self.lines[i].trim_start_matches(' ');
            indent(self.lines[i]) == col && (t == "-" || t.starts_with("- "))
        };
        if !dash(first) {
            return Vec::new();
        }
        let starts: Vec<usize> = body.filter(|&i| dash(i)).collect();
        spans(&starts, end)
    }

    /// The entries of a block mapping under the header at `start`.
    fn mapping_items(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let body = (start + 1..end).filter(|&i| !is_filler(self.lines[i]));
        let Some(first) = body.clone().next() else {
            return Vec::new();
        };
        let col = indent(self.lines[first]);
        let starts: Vec<usize> = body
            .filter(|&i| indent(self.lines[i]) == col && self.lines[i].contains(':'))
            .collect();
        spans(&starts, end)
    }
}

/// The key a `key: value` line starts with, unquoted.
fn key_of(line: &str) -> String {
    line.split(':')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .to_string()
}

/// Consecutive ranges from each start to the next (the last to `end`).
fn spans(starts: &[usize], end: usize) -> Vec<(usize, usize)> {
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| (s, starts.get(k + 1).copied().unwrap_or(end)))
        .collect()
}
