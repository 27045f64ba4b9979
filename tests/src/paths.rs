//! Where things are: the workspace root, the `ftvmm` binary, the test guests, a test's scratch
//! directory.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The `ftvmm` binary: `$FTVMM_BIN`, or the one built next to this binary (a program in
/// target/<profile>/) or to this test binary's profile (target/<profile>/deps/<test>).
pub fn ftvmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FTVMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("ftvmm"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} not found: build it first (cargo build -p ftvmm, with the same profile)",
                candidates[candidates.len() - 1].display()
            )
        })
}

/// A test guest's ELF, built by images/build-test-guests.
pub fn test_guest(name: &str) -> PathBuf {
    let p = root().join(format!("images/out/test-guests/{name}.elf"));
    assert!(
        p.exists(),
        "{} not found: run images/build-test-guests first",
        p.display()
    );
    p
}

/// A scratch directory for one test, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Writes `text` to `dir/name` for a failure message to point at (a serial stream of thousands
/// of lines does not belong in the message itself); returns the path.
pub fn keep(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("could not keep {}: {e}", path.display());
    }
    path
}
