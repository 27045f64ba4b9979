//! The code map stays true: every path docs/ARCHITECTURE.md names exists. A file moved or
//! renamed without its line in the map fails here.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The top-level directories of the repository a path in the docs starts with.
const TOP: &[&str] = &[
    "crates/",
    "vmm/",
    "devices/",
    "ft-core/",
    "ft-pair/",
    "logging-channel/",
    "fuzz/",
    "images/",
    "tests/",
    "scripts/",
    "docs/",
];

/// Every `code` span of a line.
fn spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

fn is_path(s: &str) -> bool {
    TOP.iter().any(|t| s.starts_with(t))
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
}

#[test]
fn every_path_the_code_map_names_exists() {
    let map = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("the map");
    let mut missing = Vec::new();
    let mut checked = 0;
    for line in map.lines() {
        // In the table's first column, a bare file name is in the directory of the path
        // before it (`vmm/src/tsc.rs`, `vmm/src/debugregs.rs`; `devices/src/pic.rs`, `pit.rs`).
        let first_cell = line
            .strip_prefix("| ")
            .and_then(|rest| rest.split(" | ").next())
            .unwrap_or("");
        let mut dir: Option<PathBuf> = None;
        for span in spans(first_cell) {
            let path = if is_path(span) {
                let p = PathBuf::from(span);
                dir = p.parent().map(Path::to_path_buf);
                p
            } else if let Some(d) = dir.as_ref().filter(|_| span.ends_with(".rs")) {
                d.join(span)
            } else {
                continue;
            };
            checked += 1;
            if !root().join(&path).exists() {
                missing.push(path.display().to_string());
            }
        }
        // Anywhere else, a path from the root.
        let rest = line
            .strip_prefix("| ")
            .map_or(line, |r| r.split_once(" | ").map_or("", |(_, after)| after));
        for span in spans(rest).into_iter().filter(|s| is_path(s)) {
            checked += 1;
            if !root().join(span).exists() {
                missing.push(span.to_string());
            }
        }
    }
    assert!(
        checked > 30,
        "only {checked} paths found: is the map's format unchanged?"
    );
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}
