//! No import loop inside the workspace's crates (`vmm`, `devices`, `loader`,
//! `guest-agent`, `runtime`; `seccomp` has three modules): no module takes a name from a module that
//! (directly or through others) takes a name from it. One checker for every crate,
//! here in the end-to-end crate that may look at all of them.
//!
//! The graph is read from the source text, std only: every `crate::`, `self::` and
//! `super::` path in a file (in `use` items, with their `{...}` groups, and inline), after
//! comments, strings and character literals are removed. A path points at the deepest
//! module it names, cut at the depth the test asks for (`vmm`: top-level modules such as
//! `boot`, `devices`; `devices`: `virtio::block`, `legacy::serial`, ...). A module and its
//! own submodules are one room (a `mod.rs` that re-exports its children is not a loop);
//! paths without `crate::`/`self::`/`super::` (other crates, a parent naming its
//! children) draw no arrow. Test modules count: a loop in a test is still a loop.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`["devices", "blk"]`) -> modules it takes names from.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The source with comments, string literals and character literals blanked out (each
/// replaced by a space), so that `crate::` inside them draws no arrow.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        if at(i) == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(i) == '/' && at(i + 1) == '*' {
            let mut depth = 0;
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
            out.push(' ');
        } else if (at(i) == 'r' || (at(i) == 'b' && at(i + 1) == 'r'))
            && !at(i.wrapping_sub(1)).is_alphanumeric()
            && at(i.wrapping_sub(1)) != '_'
            && {
                let mut k = if at(i) == 'b' { i + 2 } else { i + 1 };
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // Raw string: r#"..."# ends at a quote followed by as many #.
            let mut k = if at(i) == 'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while at(k) == '#' {
                hashes += 1;
                k += 1;
            }
            k += 1;
            loop {
                if k >= c.len() {
                    break;
                }
                if c[k] == '"' && (1..=hashes).all(|h| at(k + h) == '#') {
                    k += 1 + hashes;
                    break;
                }
                k += 1;
            }
            i = k;
            out.push(' ');
        } else if at(i) == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else if at(i) == '\'' && (at(i + 1) == '\\' || at(i + 2) == '\'') {
            // A character literal ('x', '\n', '\u{..}'); a lifetime ('a) has no closing quote.
            let mut k = i + 1;
            if at(k) == '\\' {
                k += 2;
            } else {
                k += 1;
            }
            while k < c.len() && c[k] != '\'' {
                k += 1;
            }
            i = k + 1;
            out.push(' ');
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The paths written at `text` (just after `crate::`): `a::b::C`, `{a, b::{c, d}}`,
/// `a::{b, c}`; each path as its segments.
fn paths_at(text: &[char]) -> Vec<Vec<String>> {
    let mut i = 0;
    parse_tree(text, &mut i)
}

fn skip_ws(text: &[char], i: &mut usize) {
    while *i < text.len() && text[*i].is_whitespace() {
        *i += 1;
    }
}

/// One use tree: segments, then optionally `::{tree, tree}` or `::*`.
fn parse_tree(text: &[char], i: &mut usize) -> Vec<Vec<String>> {
    skip_ws(text, i);
    if text.get(*i) == Some(&'{') {
        *i += 1;
        let mut all = Vec::new();
        loop {
            skip_ws(text, i);
            match text.get(*i) {
                None => return all,
                Some('}') => {
                    *i += 1;
                    return all;
                }
                Some(',') => *i += 1,
                Some(_) => {
                    let before = *i;
                    all.extend(parse_tree(text, i));
                    if *i == before {
                        *i += 1;
                    }
                }
            }
        }
    }
    let mut segments = Vec::new();
    loop {
        skip_ws(text, i);
        let start = *i;
        while *i < text.len() && is_ident(text[*i]) {
            *i += 1;
        }
        if *i > start {
            segments.push(text[start..*i].iter().collect::<String>());
        }
        skip_ws(text, i);
        if text.get(*i) == Some(&':') && text.get(*i + 1) == Some(&':') {
            *i += 2;
            skip_ws(text, i);
            if text.get(*i) == Some(&'{') {
                return parse_tree(text, i)
                    .into_iter()
                    .map(|tail| segments.iter().cloned().chain(tail).collect())
                    .collect();
            }
            if *i > start || segments.is_empty() {
                continue;
            }
        }
        return if segments.is_empty() {
            Vec::new()
        } else {
            vec![segments]
        };
    }
}

/// Every path a file names, made absolute (from the crate root). `module` is the
/// file's own module path (`["devices"]` for `devices/mod.rs`).
fn referenced_paths(src: &str, module: &[String]) -> Vec<Vec<String>> {
    let text: Vec<char> = strip(src).chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let preceded = i > 0 && (is_ident(text[i - 1]) || text[i - 1] == ':');
        let word_end = {
            let mut k = i;
            while k < text.len() && is_ident(text[k]) {
                k += 1;
            }
            k
        };
        if preceded || word_end == i {
            i += 1;
            continue;
        }
        let word: String = text[i..word_end].iter().collect();
        let mut k = word_end;
        skip_ws(&text, &mut k);
        let sep = text.get(k) == Some(&':') && text.get(k + 1) == Some(&':');
        let base: Option<Vec<String>> = match word.as_str() {
            "crate" if sep => Some(Vec::new()),
            "self" if sep => Some(module.to_vec()),
            "super" if sep => {
                // `super::super::x` climbs once per `super`.
                let mut base = module.to_vec();
                base.pop();
                let mut j = k + 2;
                loop {
                    skip_ws(&text, &mut j);
                    let rest: String = text[j..text.len().min(j + 5)].iter().collect();
                    if rest == "super" {
                        let mut n = j + 5;
                        skip_ws(&text, &mut n);
                        if text.get(n) == Some(&':') && text.get(n + 1) == Some(&':') {
                            base.pop();
                            j = n + 2;
                            continue;
                        }
                    }
                    break;
                }
                k = j - 2;
                Some(base)
            }
            _ => None,
        };
        if let Some(base) = base {
            for path in paths_at(&text[k + 2..]) {
                found.push(base.iter().cloned().chain(path).collect());
            }
        }
        i = word_end;
    }
    found
}

/// The module path of a source file relative to `src` (`lib.rs` and `main.rs` are the
/// root, `a/mod.rs` is `a`, `a/b.rs` is `a::b`).
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    let root = parts.is_empty() && matches!(stem, "lib" | "main");
    if stem != "mod" && !root {
        parts.push(stem.to_owned());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `module` cut to `depth` segments, as a node name.
fn node(module: &[String], depth: usize) -> String {
    module[..module.len().min(depth)].join("::")
}

/// Whether one of `a`, `b` contains the other (`devices` and `devices::blk`).
fn nested(a: &str, b: &str) -> bool {
    let inside = |outer: &str, inner: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}::"))
    };
    inside(a, b) || inside(b, a)
}

/// The graph between the modules of the crate whose sources are in `src`, cut at `depth`.
fn module_graph(src: &Path, depth: usize) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: Vec<(Vec<String>, String)> = files
        .iter()
        .map(|f| {
            (
                module_of(f.strip_prefix(src).unwrap()),
                std::fs::read_to_string(f).unwrap(),
            )
        })
        .collect();
    let nodes: BTreeSet<String> = modules
        .iter()
        .filter(|(m, _)| !m.is_empty())
        .map(|(m, _)| node(m, depth))
        .collect();
    let mut graph = Graph::new();
    for (module, text) in &modules {
        if module.is_empty() {
            continue;
        }
        let from = node(module, depth);
        graph.entry(from.clone()).or_default();
        for path in referenced_paths(text, module) {
            // The deepest module the path names.
            let to = (1..=path.len().min(depth))
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|candidate| nodes.contains(candidate));
            if let Some(to) = to {
                if !nested(&from, &to) {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    graph
}

/// A loop in `graph`, as the modules along it with the first repeated at the end, or
/// `None` when there is none.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        graph: &Graph,
        at: &str,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(at.to_owned(), Mark::Open);
        stack.push(at.to_owned());
        for next in graph.get(at).into_iter().flatten() {
            match marks.get(next.as_str()) {
                Some(Mark::Open) => {
                    let start = stack.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(cycle) = visit(graph, next, marks, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        marks.insert(at.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for start in graph.keys() {
        if !marks.contains_key(start) {
            if let Some(cycle) = visit(graph, start, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Fails naming the loop and, for each arrow on it, nothing more: the files say why.
fn assert_no_loop(src: &Path, depth: usize) {
    let graph = module_graph(src, depth);
    assert!(
        graph.len() > 3,
        "read too few modules under {}: {graph:?}",
        src.display()
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import loop under {}: {}",
            src.display(),
            cycle.join(" -> ")
        );
    }
}

/// `<workspace>/<crate>/src`.
fn src_of(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

#[test]
fn vmm_src_has_no_import_loop() {
    assert_no_loop(&src_of("vmm"), 1);
}

#[test]
fn devices_src_has_no_import_loop() {
    assert_no_loop(&src_of("devices"), 2);
}

#[test]
fn guest_agent_src_has_no_import_loop() {
    assert_no_loop(&src_of("guest-agent"), 2);
}

#[test]
fn runtime_src_has_no_import_loop() {
    assert_no_loop(&src_of("runtime"), 2);
}

#[test]
fn loader_src_has_no_import_loop() {
    assert_no_loop(&src_of("loader"), 2);
}

#[test]
fn the_vmm_graph_runs_one_way() {
    let graph = module_graph(&src_of("vmm"), 1);
    let uses = |from: &str, to: &str| graph.get(from).is_some_and(|t| t.contains(to));
    assert!(uses("boot", "devices"), "{graph:?}");
    assert!(uses("devices", "error"), "{graph:?}");
    assert!(!uses("devices", "boot"), "{graph:?}");
    assert!(!uses("error", "boot"), "{graph:?}");
}

fn graph_of(edges: &[(&str, &str)]) -> Graph {
    let mut graph = Graph::new();
    for (from, to) in edges {
        graph
            .entry((*from).to_owned())
            .or_default()
            .insert((*to).to_owned());
        graph.entry((*to).to_owned()).or_default();
    }
    graph
}

#[test]
fn the_cycle_finder_names_a_loop_and_passes_a_tree() {
    let looped = graph_of(&[("a", "b"), ("b", "c"), ("c", "a"), ("a", "d")]);
    assert_eq!(find_cycle(&looped).unwrap(), ["a", "b", "c", "a"]);
    let tree = graph_of(&[("a", "b"), ("b", "c"), ("a", "c"), ("d", "c")]);
    assert_eq!(find_cycle(&tree), None);
    assert_eq!(find_cycle(&graph_of(&[("x", "x")])).unwrap(), ["x", "x"]);
}

#[test]
fn the_parser_reads_use_groups_inline_paths_and_relative_ones() {
    let src = r##"
        //! crate::doc::Ignored
        use crate::{boot::run, devices::{blk, net::NetArg}};
        use crate::error::BootError;
        use super::sibling::Thing;
        fn f() { crate::exit::code(); let s = "crate::string::Ignored"; let r = r#"crate::raw"#; }
        /* crate::block::Ignored */
        fn g<'a>(x: &'a str) -> char { let _ = self::child::h(x); '"' }
        fn h() { crate::seccomp::enter(); }
    "##;
    let module = vec!["devices".to_owned(), "blk".to_owned()];
    let found: BTreeSet<String> = referenced_paths(src, &module)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "boot::run",
        "devices::blk",
        "devices::net::NetArg",
        "error::BootError",
        "devices::sibling::Thing",
        "exit::code",
        "devices::blk::child::h",
        "seccomp::enter",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(found, want);
}

#[test]
fn file_paths_name_their_modules() {
    assert_eq!(module_of(Path::new("lib.rs")), Vec::<String>::new());
    assert_eq!(module_of(Path::new("boot.rs")), ["boot"]);
    assert_eq!(module_of(Path::new("devices/mod.rs")), ["devices"]);
    assert_eq!(module_of(Path::new("devices/blk.rs")), ["devices", "blk"]);
    assert!(nested("devices", "devices::blk"));
    assert!(!nested("devices", "devices_x"));
}
