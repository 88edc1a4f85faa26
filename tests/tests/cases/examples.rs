//! `sql-examples/` through the CLI and `client/examples/` as built binaries, with exact output.

use std::path::{Path, PathBuf};
use std::process::Command;

use volley_tests::process::volley_bin;
use volley_tests::tpch;

fn sql_files() -> Vec<PathBuf> {
    let root = volley_tests::workspace_root().join("sql-examples");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("tpch")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "sql") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn expected_path(file: &Path) -> PathBuf {
    let stem = file.file_stem().unwrap().to_string_lossy().to_string();
    let parent = file.parent().unwrap();
    let name = if parent.ends_with("tpch") {
        format!("tpch_{stem}")
    } else {
        stem
    };
    volley_tests::workspace_root()
        .join("sql-examples/expected")
        .join(format!("{name}.csv"))
}

#[test]
fn sql_examples_print_their_expected_output() {
    let data = tpch::sf01().unwrap();
    let files = sql_files();
    assert!(
        files.len() >= 25,
        "22 TPC-H queries and the readable examples: {files:?}"
    );
    let bless = std::env::var("VOLLEY_BLESS").is_ok();
    for file in files {
        let mut command = Command::new(volley_bin().unwrap());
        command.current_dir(volley_tests::workspace_root()).args([
            "sql",
            "--executors",
            "2",
            "--slots",
            "2",
            "--format",
            "csv",
        ]);
        for table in tpch::TABLES {
            command
                .arg("--table")
                .arg(format!("{table}={}", data.join(table).display()));
        }
        let output = command.arg("-f").arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}: {stderr}", file.display());
        let stdout = String::from_utf8(output.stdout).unwrap();
        let expected = expected_path(&file);
        if bless {
            std::fs::write(&expected, &stdout).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with VOLLEY_BLESS=1 to create it)",
                expected.display()
            )
        });
        assert_eq!(
            stdout,
            want,
            "{} output differs from {}",
            file.display(),
            expected.display()
        );
    }
}

fn run_example(name: &str, args: &[&str]) -> String {
    let bin = volley_bin().unwrap();
    let example = bin.parent().unwrap().join("examples").join(name);
    let output = Command::new(&example)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo test builds examples)", example.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "example {name} failed: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn client_examples_run_on_the_embedded_cluster() {
    let sql = run_example("sql", &[]);
    for row in [
        "| east   | 2     | 370.0",
        "| north  | 3     | 237.75",
        "| south  | 3     | 849.99",
        "| west   | 1     | 11.11",
    ] {
        assert!(
            sql.contains(row),
            "sql example output lacks {row:?}:\n{sql}"
        );
    }
    let dataframe = run_example("dataframe", &[]);
    let lines: Vec<&str> = dataframe
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("name"))
        .collect();
    assert_eq!(
        lines,
        [
            "| Di   | 575.25 |",
            "| Cy   | 409.99 |",
            "| Gus  | 310.0  |"
        ],
        "{dataframe}"
    );
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("daily");
    let written = run_example("write_results", &[target.to_str().unwrap()]);
    assert!(written.contains("| 2024-01-03 | 220.49"), "{written}");
    assert!(written.contains("| 2024-01-08 | 71.11"), "{written}");
    assert!(target.exists(), "parquet output written");
}
