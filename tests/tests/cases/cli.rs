//! The `volley` binary driven as a user would: process spawned, stdout/stderr/exit code asserted.

use std::process::Command;

use volley_tests::process::volley_bin;

use volley_tests::data_file as data;

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
    // The embedded executors drain and leave at exit: no warning that they were lost.
    assert!(
        !stderr.contains("WARN") && !stderr.contains("executor lost"),
        "{stderr}"
    );
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

fn volley(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(volley_bin().unwrap())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

const BY_DEPT: &str = "SELECT dept_id, count(*) AS n FROM emp WHERE dept_id IS NOT NULL GROUP BY dept_id ORDER BY dept_id";

#[test]
fn output_formats_files_timing_and_stdin() {
    let table = format!("emp={}", data("emp.csv"));
    let base = ["sql", "--executors", "1", "--slots", "2", "--table", &table];
    let run = |extra: &[&str], stdin: Option<&str>| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let out = volley(&args, stdin);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };

    let (tsv, stderr) = run(&["--format", "tsv", "-c", BY_DEPT], None);
    assert_eq!(tsv, "dept_id\tn\n10\t2\n20\t3\n30\t2\n");
    // The embedded cluster prints its status page's URL (stderr; stdout stays data only).
    assert!(
        stderr.contains("status page: http://127.0.0.1:"),
        "{stderr}"
    );
    let (json, _) = run(&["--format", "json", "-c", BY_DEPT], None);
    assert_eq!(
        json,
        "[{\"dept_id\":10,\"n\":2},{\"dept_id\":20,\"n\":3},{\"dept_id\":30,\"n\":2}]\n"
    );
    let (ndjson, _) = run(&["--format", "ndjson", "-c", BY_DEPT], None);
    assert_eq!(
        ndjson,
        "{\"dept_id\":10,\"n\":2}\n{\"dept_id\":20,\"n\":3}\n{\"dept_id\":30,\"n\":2}\n"
    );
    let (table_out, _) = run(&["-c", BY_DEPT], None);
    assert!(
        table_out.contains("| 20      | 3 |") && table_out.ends_with("3 rows\n"),
        "{table_out}"
    );
    let (quiet, quiet_err) = run(&["--quiet", "-c", BY_DEPT], None);
    assert!(!quiet.contains("rows"), "{quiet}");
    assert!(!quiet_err.contains("status page"), "{quiet_err}");

    // Piped stdin with two statements, timing on stderr.
    let (piped, timing) = run(
        &["--format", "csv", "--timing"],
        Some("SELECT 1 AS a;\nSELECT 2 AS b;\n"),
    );
    assert_eq!(piped, "a\n1\nb\n2\n");
    assert_eq!(
        timing.matches("Elapsed ").count(),
        3,
        "table registration + 2 statements: {timing}"
    );

    // -o FILE for text formats and Parquet.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("out.csv");
    let (stdout, _) = run(
        &[
            "--format",
            "csv",
            "-o",
            csv.to_str().unwrap(),
            "-c",
            BY_DEPT,
        ],
        None,
    );
    assert!(stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        "dept_id,n\n10,2\n20,3\n30,2\n"
    );
    let parquet = dir.path().join("out.parquet");
    run(
        &[
            "--format",
            "parquet",
            "-o",
            parquet.to_str().unwrap(),
            "-c",
            BY_DEPT,
        ],
        None,
    );
    let back = run(
        &[
            "--format",
            "csv",
            "--table",
            &format!("back={}", parquet.display()),
            "-c",
            "SELECT * FROM back ORDER BY dept_id",
        ],
        None,
    )
    .0;
    assert_eq!(back, "dept_id,n\n10,2\n20,3\n30,2\n");
}

#[test]
fn continue_on_error_runs_every_statement_but_exits_1() {
    let table = format!("emp={}", data("emp.csv"));
    let args = [
        "sql",
        "--executors",
        "1",
        "--table",
        &table,
        "--format",
        "csv",
        "-c",
        "SELECT 1 AS a; SELECT * FROM nope; SELECT 3 AS c",
    ];
    let stopped = volley(&args, None);
    assert_eq!(stopped.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(stopped.stdout).unwrap(),
        "a\n1\n",
        "stops at the first error"
    );

    let mut keep_going = args.to_vec();
    keep_going.push("--continue-on-error");
    let out = volley(&keep_going, None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "a\n1\nc\n3\n");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("in statement: SELECT * FROM nope"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_against_a_running_cluster_and_ctrl_c_cancels_the_job() {
    let cluster = volley_tests::process::ProcessCluster::start(1, 2, &[])
        .await
        .unwrap();
    let table = format!("emp={}", data("emp.csv"));
    let out = Command::new(volley_bin().unwrap())
        .args([
            "sql",
            "--scheduler",
            cluster.url(),
            "--table",
            &table,
            "--format",
            "csv",
            "-c",
            BY_DEPT,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "dept_id,n\n10,2\n20,3\n30,2\n"
    );

    // A statement held by the hold hook (never released); Ctrl-C (SIGINT) cancels its job.
    let hold = volley_tests::Hold::new(1).unwrap();
    let child = Command::new(volley_bin().unwrap())
        .args(["sql", "--scheduler", cluster.url(), "--table", &table, "-c"])
        .arg(format!("{}; {BY_DEPT}", hold.set_sql()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = cluster.client().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let state = client.cluster_state().await.unwrap();
        if state.jobs.iter().any(|j| {
            j.sql.contains("GROUP BY dept_id")
                && j.state == "running"
                && j.tasks.iter().any(|t| t.state == "running")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slow job never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cancelled by Ctrl-C"), "{stderr}");
    let state = client.cluster_state().await.unwrap();
    let job = state
        .jobs
        .iter()
        .rev()
        .find(|j| j.sql.contains("GROUP BY dept_id"))
        .unwrap();
    assert_eq!(job.state, "cancelled");
}

#[test]
fn test_hooks_are_refused_without_enable_test_hooks() {
    let run = |extra: &[&str]| {
        Command::new(volley_bin().unwrap())
            .args(["sql", "--executors", "1", "--slots", "1", "--format", "csv"])
            .args(extra)
            .args(["--table", &format!("emp={}", data("emp.csv")), "-c"])
            .arg("SET volley.test_fail_task = '1:0'; SELECT count(*) AS n FROM emp")
            .env_remove("VOLLEY_ENABLE_TEST_HOOKS")
            .output()
            .unwrap()
    };
    // A production process refuses the hook by name instead of injecting a fault.
    let refused = run(&[]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("volley.test_fail_task is a test hook")
            && stderr.contains("--enable-test-hooks"),
        "{stderr}"
    );
    // With the flag the hook fires: every attempt of the task fails.
    let enabled = run(&["--enable-test-hooks"]);
    assert_eq!(enabled.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&enabled.stderr);
    assert!(stderr.contains("injected fault"), "{stderr}");
}

/// `volley sql` sends each statement as written: column lists and `OPTIONS` of `CREATE
/// EXTERNAL TABLE` and a quoted `COPY ... TO` path with a space survive (DataFusion's printer
/// dropped the first two and unquoted the third).
#[test]
fn statements_reach_the_cluster_as_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pairs.csv"), "1;one\n2;two\n").unwrap();
    let out = dir.path().join("out dir");
    std::fs::create_dir_all(&out).unwrap();
    let script = format!(
        "CREATE EXTERNAL TABLE pairs (id INT, name VARCHAR) STORED AS CSV LOCATION '{table}' \
         OPTIONS ('format.has_header' 'false', 'format.delimiter' ';');\n\
         -- a comment; with a semicolon\n\
         SELECT id, name, 'a;b' AS s FROM pairs ORDER BY id;\n\
         COPY (SELECT name FROM pairs ORDER BY id) TO '{copy}' STORED AS CSV;",
        table = dir.path().join("pairs.csv").display(),
        copy = out.join("names.csv").display(),
    );
    let output = Command::new(volley_bin().unwrap())
        .args(["sql", "--executors", "1", "--slots", "1", "--format", "csv"])
        .args(["--allowed-path", &dir.path().display().to_string(), "-c"])
        .arg(&script)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.starts_with("id,name,s\n1,one,a;b\n2,two,a;b\n"),
        "{stdout}"
    );
    let copied = std::fs::read_to_string(out.join("names.csv")).unwrap();
    assert_eq!(copied, "name\none\ntwo\n");
}

/// A scheduler that accepts connections and never answers (hung, or a wrong service on its
/// port): `volley sql` fails naming the deadline instead of waiting forever.
#[test]
fn a_scheduler_that_never_answers_is_an_error_not_a_hang() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold every connection, saying nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let started = std::time::Instant::now();
    let mut child = Command::new(volley_bin().unwrap())
        .args([
            "sql",
            "--scheduler",
            &format!("http://127.0.0.1:{port}"),
            "--rpc-timeout-secs",
            "2",
            "-c",
            "SELECT 1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = started + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("volley sql still waits for a silent scheduler after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.to_ascii_lowercase().contains("timeout") || stderr.contains("deadline"),
        "{stderr}"
    );
}

/// `volley sql` split statements in the generic dialect whatever the session used: after
/// `SET datafusion.sql_parser.dialect = 'MySQL'`, a `\'` escape or a `#` comment holding `;`
/// was cut in two (or did not tokenize). Statements are split in the session's dialect now,
/// and the statement after switching back splits in the generic one again.
#[test]
fn statements_split_in_the_dialect_the_session_set() {
    let script = "SET datafusion.sql_parser.dialect = 'MySQL';\n\
                  SELECT 'it\\'s; one' AS s # a comment; still a comment\n;\n\
                  SET datafusion.sql_parser.dialect = 'generic';\n\
                  SELECT 'two' AS s";
    let output = Command::new(volley_bin().unwrap())
        .args(["sql", "--format", "csv", "-c", script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "volley sql failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines, ["s", "it's; one", "s", "two"], "{stdout}");
}
