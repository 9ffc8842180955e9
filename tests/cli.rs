//! The `upgate` binary: `check` and `--help`.

use std::process::Command;

mod support;

fn upgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_upgate"))
}

#[test]
fn check_prints_the_route_table_of_the_repository_config() {
    let out = upgate().args(["check", "routes.yaml"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("routes.yaml: OK"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("ticker")
            && l.contains("/ticker")
            && l.contains("strip_prefix")),
        "{stdout}"
    );
}

#[test]
fn check_reports_a_config_error_with_file_line_and_key() {
    let dir = support::TempDir::new("cli");
    let file = dir.0.join("bad.yaml");
    std::fs::write(
        &file,
        "listen:\n  - addr: 127.0.0.1:8080\npools:\n  chat:\n    backends: [ws://127.0.0.1:9001]\nroutes:\n  - name: chat\n    path: /chat\n    pool: chta\n",
    )
    .unwrap();
    let out = upgate().arg("check").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:9: routes[0].pool: no pool named `chta`; defined pools: chat",
        file.display()
    );
    assert!(stderr.contains(&want), "{stderr}");

    std::fs::write(
        &file,
        "listen:\n  - addr: 127.0.0.1:8080\n    tsl: {}\npools: {}\nroutes: []\n",
    )
    .unwrap();
    let out = upgate().arg("check").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:3:") && stderr.contains("unknown field `tsl`"),
        "{stderr}"
    );
}

#[test]
fn help_explains_the_commands() {
    let out = upgate().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for w in ["check", "demo", "--config"] {
        assert!(s.contains(w), "{s}");
    }
}
