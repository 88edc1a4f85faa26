//! The interactive shell: line editing, persistent history, multi-line statements ended by `;`.

use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

/// What the user typed.
pub enum Input {
    /// SQL text ending with a top-level `;`: one or more statements, as typed.
    Sql(String),
    /// Leave the shell.
    Quit,
    /// Show help.
    Help,
}

/// Help text for `\?`.
pub const HELP: &str = "\
Volley SQL shell. Statements end with ';' and may span lines.
  \\d           list tables (SHOW TABLES)
  \\?           this help
  \\q, quit     leave
Tables: CREATE EXTERNAL TABLE t STORED AS PARQUET|CSV|JSON LOCATION '/path';
Options: SET volley.<key> = <value>; SET datafusion.<key> = <value>;";

/// A line editor with history in `~/.volley_history`.
pub struct Repl {
    editor: DefaultEditor,
    history: Option<std::path::PathBuf>,
}

impl Repl {
    /// Open the editor and load history.
    pub fn new() -> Result<Self, String> {
        let mut editor = DefaultEditor::new().map_err(|e| e.to_string())?;
        let history =
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".volley_history"));
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        Ok(Self { editor, history })
    }

    /// Read the next statement or command; None at end of input.
    pub fn next(&mut self) -> Option<Input> {
        let mut buffer = String::new();
        loop {
            let prompt = if buffer.is_empty() {
                "volley> "
            } else {
                "     -> "
            };
            match self.editor.readline(prompt) {
                Ok(line) => {
                    let trimmed = line.trim();
                    if buffer.is_empty() {
                        match trimmed {
                            "" => continue,
                            "\\q" | "quit" | "exit" | "quit;" | "exit;" => {
                                return Some(Input::Quit);
                            }
                            "\\?" | "help" => return Some(Input::Help),
                            "\\d" => {
                                let _ = self.editor.add_history_entry(trimmed);
                                return Some(Input::Sql("SHOW TABLES".to_string()));
                            }
                            _ => {}
                        }
                    }
                    if !buffer.is_empty() {
                        buffer.push('\n');
                    }
                    buffer.push_str(&line);
                    // A `;` inside a string or comment does not end the input.
                    if volley::ends_statement(&buffer) {
                        // The history file keeps statements without store secrets.
                        let kept = volley_core::stores::redact::redact_sql(&buffer);
                        let _ = self.editor.add_history_entry(kept.as_str());
                        return Some(Input::Sql(buffer));
                    }
                }
                Err(ReadlineError::Interrupted) => {
                    buffer.clear();
                    continue;
                }
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        if let Some(path) = &self.history {
            let _ = self.editor.save_history(path);
        }
    }
}
