//! The module graph stays one-way: reads every `crate::NAME` path in the
//! library's sources (test modules left out), and fails on a cycle between
//! top-level modules, naming it, or on a dependency the layering forbids.
//! docs/ARCHITECTURE.md draws the same graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            // Test modules kept in their own file (`mod tests;`) are not the graph.
            if path.extension().is_none_or(|e| e != "rs")
                || path.file_name().is_some_and(|n| n == "tests.rs")
            {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("name")
                .trim_end_matches(".rs")
                .to_string();
            // The binary's own files and the crate root are not modules.
            if ["main", "lib", "memory"].contains(&top.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            let code = text.split("#[cfg(test)]\nmod ").next().unwrap_or_default();
            let deps = g.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top && name != "test_rng" {
                    deps.insert(name);
                }
            }
        }
    }
    g
}

/// A cycle through `from`, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_depend_one_way() {
    let g = graph();
    for (m, d) in &g {
        println!(
            "{m} -> {}",
            d.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(g.len() > 10, "found only {:?}", g.keys());
    if let Some(c) = cycle(&g) {
        panic!("module cycle: {}", c.join(" -> "));
    }
}

#[test]
fn the_bottom_layers_depend_on_nothing_above_them() {
    let g = graph();
    let deps = |m: &str| g.get(m).cloned().unwrap_or_default();
    // Configuration, counters and the buffer pool are the foundation: nothing of the crate.
    assert!(deps("config").is_empty(), "config -> {:?}", deps("config"));
    assert!(
        deps("buffers").is_empty(),
        "buffers -> {:?}",
        deps("buffers")
    );
    assert!(
        deps("metrics").is_empty(),
        "metrics -> {:?}",
        deps("metrics")
    );
    // Backends know nothing of sessions; sessions (splice, fan-out, frames) never
    // reach up into the request path, the shared state, the server or the
    // admin listener.
    let above_sessions = ["proxy", "state", "server", "admin", "reload"];
    for m in ["backend", "session", "fanout", "frames", "lifecycle"] {
        for above in above_sessions {
            assert!(!deps(m).contains(above), "{m} depends on {above}");
        }
    }
    for m in ["session", "fanout", "frames"] {
        assert!(!deps("backend").contains(m), "backend depends on {m}");
    }
    for (a, b) in [
        ("session", "fanout"),
        ("session", "frames"),
        ("fanout", "frames"),
        ("frames", "fanout"),
    ] {
        assert!(!deps(a).contains(b), "{a} depends on {b}");
    }
}
