//! No import loop inside the agent's library (`guest-agent/src`): no module uses a
//! module that, directly or through others, uses it back.
//!
//! The graph is read from the source text with std only. Each file is a module
//! (`agent/connection.rs` is `agent::connection`, a `mod.rs` is its folder). Every path
//! that starts with `crate::`, `super::` or `self::` (in `use` items, with their `{...}`
//! groups, or written inline) points at the deepest module it names; comments and
//! string literals are skipped. A module and its ancestors are one room: a child using
//! its parent's items, or a parent re-exporting its children, is structure, not a loop.
//! `main.rs` is another crate (the PID-1 binary) and is left out.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module, as its path segments below the crate root (`[]` is `lib.rs`).
type Module = Vec<String>;
/// Each module and the modules it takes names from.
type Graph = BTreeMap<Module, BTreeSet<Module>>;

/// The module a source file is, relative to `src/`.
fn module_of(relative: &Path) -> Module {
    let mut parts: Module = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Every `.rs` file under `dir`, as (module, text).
fn read_modules(root: &Path, dir: &Path, out: &mut Vec<(Module, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_modules(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let relative = path.strip_prefix(root).unwrap();
            if relative == Path::new("main.rs") {
                continue;
            }
            out.push((module_of(relative), std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The code of `src` as tokens: identifiers, `::`, and single punctuation characters.
/// Comments, string literals (plain and raw), byte strings and char literals are dropped.
fn tokens(src: &str) -> Vec<String> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0usize;
            while i < c.len() {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if (ch == 'r' || (ch == 'b' && at(i + 1) == 'r'))
            && matches!(at(i + usize::from(ch == 'b') + 1), '"' | '#')
        {
            // A raw string: r"..." or r#"..."# (any number of #).
            i += usize::from(ch == 'b') + 1;
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                i += 1;
            }
            i += hashes + 1;
        } else if ch == '\'' && (at(i + 2) == '\'' || at(i + 1) == '\\') {
            // A char literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            i += 1;
            while i < c.len() && c[i] != '\'' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push(c[start..i].iter().collect());
        } else if ch == ':' && at(i + 1) == ':' {
            out.push("::".to_owned());
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(ch.to_string());
            }
            i += 1;
        }
    }
    out
}

/// Reads one path tree at `tokens[*i..]` whose first segment is already resolved to
/// `prefix`: `a::b::C`, `a::{b, c::{self, D}}`, `*`. Pushes every full path.
fn path_tree(tokens: &[String], i: &mut usize, prefix: Module, out: &mut Vec<Module>) {
    let mut path = prefix;
    loop {
        if tokens.get(*i).map(String::as_str) != Some("::") {
            out.push(path);
            return;
        }
        *i += 1;
        match tokens.get(*i).map(String::as_str) {
            Some("{") => {
                *i += 1;
                while let Some(t) = tokens.get(*i) {
                    match t.as_str() {
                        "}" => {
                            *i += 1;
                            return;
                        }
                        "," => *i += 1,
                        "self" | "*" => {
                            out.push(path.clone());
                            *i += 1;
                        }
                        _ => {
                            let mut sub = path.clone();
                            sub.push(t.clone());
                            *i += 1;
                            path_tree(tokens, i, sub, out);
                            // `as NAME` after a group member.
                            if tokens.get(*i).map(String::as_str) == Some("as") {
                                *i += 2;
                            }
                        }
                    }
                }
                return;
            }
            Some("*") | Some("<") => {
                out.push(path);
                return;
            }
            Some(segment) => {
                path.push(segment.to_owned());
                *i += 1;
            }
            None => {
                out.push(path);
                return;
            }
        }
    }
}

/// Every `crate::`/`super::`/`self::` path in `src`, from module `at`, made absolute.
fn paths_from(at: &Module, src: &str) -> Vec<Module> {
    let tokens = tokens(src);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let after_colons = i > 0 && tokens[i - 1] == "::";
        let start: Option<Module> = match tokens[i].as_str() {
            _ if after_colons => None,
            "crate" => Some(Vec::new()),
            "self" => Some(at.clone()),
            "super" => {
                let mut base = at.clone();
                base.pop();
                // `super::super::...`
                while tokens.get(i + 1).map(String::as_str) == Some("::")
                    && tokens.get(i + 2).map(String::as_str) == Some("super")
                {
                    base.pop();
                    i += 2;
                }
                Some(base)
            }
            _ => None,
        };
        i += 1;
        if let Some(prefix) = start {
            path_tree(&tokens, &mut i, prefix, &mut out);
        }
    }
    out
}

/// The deepest module of `modules` that `path` names (the crate root at worst).
fn target(path: &[String], modules: &BTreeSet<Module>) -> Module {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains(m))
        .unwrap_or_default()
}

/// Whether `a` is `b`, or an ancestor or descendant of it.
fn same_room(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The module graph of `files` (module, source).
fn graph(files: &[(Module, String)]) -> Graph {
    let modules: BTreeSet<Module> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = Graph::new();
    for (module, src) in files {
        let uses = graph.entry(module.clone()).or_default();
        for path in paths_from(module, src) {
            let to = target(&path, &modules);
            if !same_room(module, &to) {
                uses.insert(to);
            }
        }
    }
    graph
}

/// One loop of `graph`, as the modules along it (the first repeated at the end).
fn find_cycle(graph: &Graph) -> Option<Vec<Module>> {
    fn visit(
        node: &Module,
        graph: &Graph,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(pos) = stack.iter().position(|m| m == node) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut done, &mut Vec::new()))
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

fn module(path: &str) -> Module {
    path.split("::").map(str::to_owned).collect()
}

#[test]
fn the_agent_library_has_no_import_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_modules(&src, &src, &mut files);
    let graph = graph(&files);
    // The reader sees the modules it should: a broken reader finds no loop anywhere.
    assert!(
        graph.contains_key(&module("agent::connection")),
        "{graph:?}"
    );
    assert!(
        graph[&module("agent::connection")].contains(&module("agent::exec")),
        "{graph:?}"
    );
    assert!(
        graph[&module("protocol::frame")].contains(&module("protocol::message")),
        "{graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<String> = cycle.iter().map(|m| name(m)).collect();
        panic!("import loop in guest-agent/src: {}", names.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_loop_and_only_a_loop() {
    let mut looped = Graph::new();
    looped.entry(module("a")).or_default().insert(module("b"));
    looped.entry(module("b")).or_default().insert(module("c"));
    looped.entry(module("c")).or_default().insert(module("a"));
    looped.entry(module("d")).or_default().insert(module("a"));
    let cycle = find_cycle(&looped).unwrap();
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");

    looped.get_mut(&module("c")).unwrap().clear();
    assert_eq!(find_cycle(&looped), None);
}

#[test]
fn paths_are_read_from_use_groups_and_inline_but_not_comments_or_strings() {
    let files = vec![
        (
            module("agent::connection"),
            r#"
            use super::exec;
            use super::{files::{self, WriteSink}, reply::{reply as r, Responder}};
            use crate::protocol::{frame::Frame, Message};
            // use super::policy::Limits;
            /* crate::init::net */
            const X: &str = "crate::transport::Duplex";
            const Y: &str = r"super::reaper";
            fn f<'a>(c: char) -> bool { c == '"' && crate::client::ok() }
            fn g() { super::super::init::power(); }
            "#
            .to_owned(),
        ),
        (module("agent"), String::new()),
        (module("agent::exec"), String::new()),
        (module("agent::files"), String::new()),
        (module("agent::reply"), String::new()),
        (module("agent::policy"), String::new()),
        (module("agent::reaper"), String::new()),
        (module("protocol"), String::new()),
        (module("protocol::frame"), String::new()),
        (module("client"), String::new()),
        (module("init"), String::new()),
        (module("transport"), String::new()),
    ];
    let graph = graph(&files);
    let uses: Vec<String> = graph[&module("agent::connection")]
        .iter()
        .map(|m| name(m))
        .collect();
    assert_eq!(
        uses,
        [
            "agent::exec",
            "agent::files",
            "agent::reply",
            "client",
            "init",
            "protocol",
            "protocol::frame"
        ]
    );
}
