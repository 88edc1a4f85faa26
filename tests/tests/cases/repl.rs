//! The interactive shell through a pseudo-terminal: a statement over two lines, an error,
//! a good query, `\q`; history persists.

use std::process::Command;
use std::time::Duration;

use expectrl::{Eof, Expect, Session};
use volley_tests::process::volley_bin;

#[test]
fn repl_multiline_statement_error_then_query_then_quit() {
    let home = tempfile::tempdir().unwrap();
    let emp = volley_tests::workspace_root().join("tests/slt/data/emp.csv");
    let mut command = Command::new(volley_bin().unwrap());
    command
        .args([
            "sql",
            "--executors",
            "1",
            "--slots",
            "2",
            "--enable-test-hooks",
            "--table",
        ])
        .arg(format!("emp={}", emp.display()))
        .env("HOME", home.path())
        .env("NO_COLOR", "1");
    let mut shell = Session::spawn(command).unwrap();
    shell.set_expect_timeout(Some(Duration::from_secs(60)));

    shell.expect("volley> ").unwrap();
    shell.send_line("SELECT count(*) AS n").unwrap();
    shell.expect("-> ").unwrap();
    shell.send_line("FROM emp WHERE salary > 4000;").unwrap();
    shell.expect("| 4 |").unwrap();
    shell.expect("1 row").unwrap();

    shell.expect("volley> ").unwrap();
    shell.send_line("SELECT * FROM no_such_table;").unwrap();
    shell.expect("error:").unwrap();
    shell.expect("no_such_table").unwrap();

    shell.expect("volley> ").unwrap();
    shell
        .send_line("SELECT max(salary) AS top FROM emp;")
        .unwrap();
    shell.expect("| 6100 |").unwrap();

    shell.expect("volley> ").unwrap();
    shell.send_line("\\d").unwrap();
    shell.expect("| emp ").unwrap();

    // A statement running over a second shows live progress on the terminal: its first stage
    // is held until the progress bar was seen.
    let hold = volley_tests::Hold::new(1).unwrap();
    shell.expect("volley> ").unwrap();
    shell.send_line(format!("{};", hold.set_sql())).unwrap();
    shell.expect("volley> ").unwrap();
    shell
        .send_line("SELECT dept_id, count(*) FROM emp GROUP BY dept_id;")
        .unwrap();
    shell.expect("stages 0/").unwrap();
    shell.expect("tasks 0/").unwrap();
    hold.release().unwrap();
    shell.expect("4 rows").unwrap();

    shell.expect("volley> ").unwrap();
    shell.send_line("\\q").unwrap();
    shell.expect(Eof).unwrap();

    let history = std::fs::read_to_string(home.path().join(".volley_history")).unwrap();
    assert!(
        history.contains("SELECT max(salary) AS top FROM emp;"),
        "history: {history}"
    );
}
