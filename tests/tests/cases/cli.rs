//! The `volley` binary driven as a user would: process spawned, stdout/stderr/exit code asserted.

use std::process::Command;

use volley_tests::process::volley_bin;

fn data(file: &str) -> String {
    volley_tests::workspace_root()
        .join("tests/slt/data")
        .join(file)
        .display()
        .to_string()
}

#[test]
fn sql_on_embedded_cluster_prints_csv_and_explain_stages() {
    let output = Command::new(volley_bin().unwrap())
        .args([
            "sql",
            "--executors",
            "2",
            "--slots",
            "2",
            "--table",
            &format!("emp={}", data("emp.csv")),
            "--format",
            "csv",
            "-c",
            "SELECT dept_id, count(*) AS n, sum(salary) AS total FROM emp GROUP BY dept_id ORDER BY dept_id NULLS LAST",
            "-c",
            "EXPLAIN SELECT dept_id, count(*) AS n FROM emp GROUP BY dept_id ORDER BY dept_id",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "volley sql failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..6],
        [
            "dept_id,n,total",
            "10,2,9200",
            "20,3,7800",
            "30,2,10500",
            ",1,2500",
            "plan"
        ],
        "stdout: {stdout}"
    );
    let stages = &lines[6..];
    assert_eq!(stages.len(), 3, "one line per stage: {stdout}");
    assert!(
        stages[0].starts_with("Stage 1: kind=shuffle partitions=1 inputs=[]"),
        "{stdout}"
    );
    assert!(
        stages[1].starts_with("Stage 2: kind=merge partitions=4 inputs=[1]"),
        "{stdout}"
    );
    assert!(
        stages[2].starts_with("Stage 3: kind=result partitions=1 inputs=[2]"),
        "{stdout}"
    );
    assert!(
        stages[2].contains("SortPreservingMergeExec <- ShuffleReaderExec[stage 2]"),
        "{stdout}"
    );
}

#[test]
fn sql_reports_a_failed_statement_with_exit_code_1() {
    let output = Command::new(volley_bin().unwrap())
        .args([
            "sql",
            "--executors",
            "1",
            "-c",
            "SELECT * FROM missing_table",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("missing_table") && stderr.contains("not found"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("in statement: SELECT * FROM missing_table"),
        "stderr: {stderr}"
    );
    assert!(output.stdout.is_empty());
}
