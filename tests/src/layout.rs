//! The module layering rule, checked from the sources: inside a crate, modules never import
//! each other in a circle.
//!
//! Every `crate::...` and `super::...` path in a module's non-test code (a `use` or a path
//! inline, or an intra-doc link) is an edge to the deepest module of the crate that path names.
//! A module may use its own submodules (a `mod.rs` re-exporting its children) without that
//! counting; a submodule reaching its parent, a sibling or any other module counts. Plain
//! comments and the `#[cfg(test)]` tail of a file are left out: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside a crate (`[]` is the crate root).
pub type ModulePath = Vec<String>;

/// The modules of a crate: path -> source file.
pub fn modules(src: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut out = BTreeMap::new();
    collect(src, src, &mut out);
    out
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<ModulePath, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(root, &path, out);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        let mut segments: Vec<String> = relative
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if matches!(
            segments.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            segments.pop();
        }
        // A binary's other roots (src/bin/*.rs) are crates of their own: skip them.
        if segments.first().is_some_and(|s| s == "bin") {
            continue;
        }
        out.insert(segments, path);
    }
}

/// The code of a file that counts: no comment lines, nothing from `#[cfg(test)]` on.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        // Plain comments do not count; doc comments do (rustdoc resolves their links).
        if trimmed.starts_with("//") && !trimmed.starts_with("///") && !trimmed.starts_with("//!") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every path starting with `crate::` or `super::` in `code`, expanded from `{a, b::c}` groups.
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for anchor in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(anchor) {
            let start = from + at;
            from = start + anchor.len();
            // `$crate::` and identifiers ending in `crate` are not this crate's root.
            if start > 0 {
                let before = bytes[start - 1];
                if before.is_ascii_alphanumeric() || before == b'_' || before == b'$' {
                    continue;
                }
            }
            let mut trees = Vec::new();
            parse_tree(&code[from..], Vec::new(), &mut trees);
            let root = anchor.trim_end_matches("::").to_string();
            for tree in trees {
                found.push((root.clone(), tree));
            }
        }
    }
    found
}

fn skip_space(text: &str) -> usize {
    text.len() - text.trim_start().len()
}

/// Parse one path tree (`a::b`, `a::{b, c::d}`, `a::*`) at the start of `text`.
fn parse_tree(text: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    let mut pos = 0;
    let bytes = text.as_bytes();
    loop {
        let rest = &text[pos..];
        let trimmed = rest.trim_start();
        pos += rest.len() - trimmed.len();
        if trimmed.starts_with('{') {
            pos += 1;
            loop {
                pos += skip_space(&text[pos..]);
                if text[pos..].starts_with('}') {
                    return pos + 1;
                }
                let used = parse_tree(&text[pos..], path.clone(), out);
                if used == 0 {
                    return pos;
                }
                pos += used;
                pos += skip_space(&text[pos..]);
                // `B as C`: the rename does not name a module.
                if let Some(rest) = text[pos..].strip_prefix("as ") {
                    let rest = rest.trim_start();
                    let name = rest
                        .bytes()
                        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                        .count();
                    pos = text.len() - rest.len() + name;
                    pos += skip_space(&text[pos..]);
                }
                if text[pos..].starts_with(',') {
                    pos += 1;
                    continue;
                }
                if text[pos..].starts_with('}') {
                    return pos + 1;
                }
                return pos;
            }
        }
        let ident_len = trimmed
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        if ident_len == 0 {
            out.push(path);
            return pos + usize::from(trimmed.starts_with('*'));
        }
        path.push(trimmed[..ident_len].to_string());
        pos += ident_len;
        if text[pos..].starts_with("::") && bytes.get(pos + 2) != Some(&b'<') {
            pos += 2;
            continue;
        }
        out.push(path);
        return pos;
    }
}

/// Module-to-module edges of a crate (see the module docs).
pub fn edges(
    modules: &BTreeMap<ModulePath, PathBuf>,
) -> BTreeMap<ModulePath, BTreeSet<ModulePath>> {
    let mut graph: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for (module, file) in modules {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let targets = graph.entry(module.clone()).or_default();
        for (root, path) in paths(&code(&text)) {
            let mut absolute = if root == "super" {
                let mut parent = module.clone();
                parent.pop();
                parent
            } else {
                Vec::new()
            };
            let mut rest = path.as_slice();
            while let Some((first, tail)) = rest.split_first() {
                if first != "super" {
                    break;
                }
                absolute.pop();
                rest = tail;
            }
            absolute.extend(rest.iter().cloned());
            // The deepest module the path names.
            let target = (0..=absolute.len())
                .rev()
                .map(|n| absolute[..n].to_vec())
                .find(|prefix| modules.contains_key(prefix))
                .unwrap_or_default();
            let own = target.starts_with(module);
            if !own {
                targets.insert(target);
            }
        }
    }
    graph
}

/// Every circle of the graph, each as the modules on it (first one repeated at the end).
pub fn circles(graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Vec<Vec<ModulePath>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &ModulePath,
        graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        marks: &mut BTreeMap<ModulePath, Mark>,
        stack: &mut Vec<ModulePath>,
        found: &mut Vec<Vec<ModulePath>>,
    ) {
        marks.insert(node.clone(), Mark::Open);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::New => visit(next, graph, marks, stack, found),
                Mark::Open => {
                    if let Some(at) = stack.iter().position(|m| m == next) {
                        let mut circle = stack[at..].to_vec();
                        circle.push(next.clone());
                        found.push(circle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
    }
    let mut marks = BTreeMap::new();
    let mut found = Vec::new();
    for node in graph.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New {
            visit(node, graph, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    found
}

/// The circles of the crate whose sources are under `src`, as `a -> b -> a` lines.
pub fn crate_circles(src: &Path) -> Vec<String> {
    let name = |m: &ModulePath| {
        if m.is_empty() {
            "crate".to_string()
        } else {
            m.join("::")
        }
    };
    circles(&edges(&modules(src)))
        .iter()
        .map(|c| c.iter().map(name).collect::<Vec<_>>().join(" -> "))
        .collect()
}

/// Lines of a file before its `#[cfg(test)]` tail.
pub fn code_lines(file: &Path) -> usize {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .count()
}

/// Functions of a file (before its test tail) longer than `limit` lines: (name, lines).
pub fn long_functions(file: &Path, limit: usize) -> Vec<(String, usize)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let signature = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "async fn ",
        ]
        .iter()
        .chain(&[
            "pub async fn ",
            "pub(crate) async fn ",
            "pub(super) async fn ",
        ])
        .find_map(|prefix| trimmed.strip_prefix(prefix));
        let Some(rest) = signature else { continue };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let indent = line.len() - trimmed.len();
        // The function ends at the first `}` at its own indentation.
        let end = lines[start..].iter().position(|l| {
            l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('}')
        });
        if let Some(end) = end
            && end + 1 > limit
        {
            long.push((name, end + 1));
        }
    }
    long
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_expand_groups_and_skip_macro_roots() {
        let found =
            paths("use crate::{a::B, c::{d, e::F}};\nlet x = $crate::z::Y; crate::g::h(1);");
        let got: Vec<String> = found.iter().map(|(_, p)| p.join("::")).collect();
        assert_eq!(got, ["a::B", "c::d", "c::e::F", "g::h"]);
        let found = paths("use super::super::x::Y;");
        assert_eq!(found[0].1, ["super", "x", "Y"]);
    }

    #[test]
    fn circles_are_found_and_own_submodules_do_not_count() {
        let dir = std::env::temp_dir().join(format!("volley-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("lib.rs"), "pub mod a; pub mod b;").unwrap();
        std::fs::write(dir.join("a.rs"), "use crate::b::c::X;\n").unwrap();
        std::fs::write(dir.join("b/mod.rs"), "pub mod c; pub use c::X;\n").unwrap();
        std::fs::write(
            dir.join("b/c.rs"),
            "pub struct X;\n// use crate::a;\n#[cfg(test)]\nmod tests { use crate::a::*; }\n",
        )
        .unwrap();
        assert!(crate_circles(&dir).is_empty());
        std::fs::write(
            dir.join("b/c.rs"),
            "pub struct X; fn f() { super::super::a::g() }\n",
        )
        .unwrap();
        assert_eq!(crate_circles(&dir), ["a -> b::c -> a"]);
        // An intra-doc link is a reference too.
        std::fs::write(
            dir.join("b/c.rs"),
            "/// Made by [`crate::a::g`].\npub struct X;\n",
        )
        .unwrap();
        assert_eq!(crate_circles(&dir), ["a -> b::c -> a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
