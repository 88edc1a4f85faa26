//! The layering rules, checked on the sources of every crate of the workspace: no module import
//! circle; in the scheduler no source file over 600 lines of code and, in its state machine
//! (`job/`) and adaptive layer (`adaptive/`), no function over 80 lines.

use std::path::Path;

use volley_tests::layout::{code_lines, crate_circles, long_functions, modules};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
}

#[test]
fn no_crate_has_a_module_import_circle() {
    let mut found = Vec::new();
    for krate in [
        "proto",
        "core",
        "scheduler",
        "executor",
        "client",
        "cli",
        "tests",
    ] {
        let src = workspace().join(krate).join("src");
        assert!(src.is_dir(), "{} is missing", src.display());
        for circle in crate_circles(&src) {
            found.push(format!("{krate}: {circle}"));
        }
    }
    assert!(
        found.is_empty(),
        "module import circles:\n{}",
        found.join("\n")
    );
}

#[test]
fn scheduler_files_and_state_machine_functions_stay_small() {
    let src = workspace().join("scheduler").join("src");
    let files = modules(&src);
    assert!(files.len() > 20, "the scheduler's modules were found");
    let mut problems = Vec::new();
    for (module, file) in &files {
        let lines = code_lines(file);
        if lines > 600 {
            problems.push(format!("{}: {lines} lines", file.display()));
        }
        if matches!(module.first().map(String::as_str), Some("job" | "adaptive")) {
            for (name, lines) in long_functions(file, 80) {
                problems.push(format!("{}: fn {name} has {lines} lines", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
