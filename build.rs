//! Finds the outside tools some integration tests drive (a headless
//! browser, `systemd-analyze`, `cargo deb`, `haproxy` and `ip` for the fleet) so that a test whose tool is
//! missing is compiled as `#[ignore]`d with the reason: `cargo test` then
//! prints `ignored, needs chromium …` and counts it in its summary line,
//! instead of a silent `ok`. With `UPGATE_REQUIRE_<TOOL>` set (as `.ci/run`
//! does), a missing tool fails the build instead.

use std::path::{Path, PathBuf};

/// (cfg set when missing, names to look for, the variable that requires it)
const TOOLS: &[(&str, &[&str], &str)] = &[
    (
        "no_browser",
        &["chromium", "chromium-browser", "google-chrome"],
        "UPGATE_REQUIRE_BROWSER",
    ),
    (
        "no_systemd_analyze",
        &["systemd-analyze"],
        "UPGATE_REQUIRE_SYSTEMD",
    ),
    ("no_cargo_deb", &["cargo-deb"], "UPGATE_REQUIRE_DEB"),
    ("no_haproxy", &["haproxy"], "UPGATE_REQUIRE_FLEET"),
    ("no_iproute", &["ip"], "UPGATE_REQUIRE_FLEET"),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATH");
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    // Installing a tool changes its directory: look again then.
    for d in dirs.iter().filter(|d| d.is_dir()) {
        println!("cargo::rerun-if-changed={}", d.display());
    }
    for (cfg, names, require) in TOOLS {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={require}");
        if names.iter().any(|n| found(&dirs, n)) {
            continue;
        }
        if std::env::var_os(require).is_some() {
            panic!("{require} is set but none of {names:?} is on PATH");
        }
        println!("cargo::rustc-cfg={cfg}");
        println!(
            "cargo::warning=no {} on PATH: the tests that need it are marked ignored (`cargo test` lists them)",
            names[0]
        );
    }
}

fn found(dirs: &[PathBuf], name: &str) -> bool {
    dirs.iter().any(|d| executable(&d.join(name)))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
