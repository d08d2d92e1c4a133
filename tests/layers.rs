//! The layout's rules, checked on the source tree:
//!
//! 1. The workspace crates form layers: `wal` < `store` < `recovery` < `logd`
//!    (each depends only on crates before it), read from their `Cargo.toml`s.
//! 2. `src/`'s top-level modules (files and folders) form layers, each using
//!    only modules of lower layers:
//!
//!    | layer | modules |
//!    |---|---|
//!    | 0 | `telemetry` (its `stats.rs` is a leaf: it uses nothing of logd) |
//!    | 1 | `pipeline`, `outbox` |
//!    | 2 | `grpc`, `config` |
//!    | 3 | `server` |
//!    | 4 | `cli` |
//!
//!    An edge is a reference `crate::X` (also inside `use crate::{X, ..}`)
//!    or `super::X` resolving to another top-level module. `pb` (the
//!    generated protobuf code, inline in `lib.rs`) is outside the layers:
//!    every layer may use it, and its generated services name the codec
//!    (`crate::grpc::codec::LogdCodec`) by tonic's `codec_path`. Since every
//!    edge must go strictly down, there can be no cycle; a module missing
//!    from the table fails too, so a new one has to be placed.
//! 3. Inside each crate (`wal`, `store`, `recovery`) and each folder of
//!    `src/`, the sibling modules' references form no cycle (unit-test
//!    modules aside).
//! 4. No production source file is over 900 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The layers of `src/`, lowest first.
const LAYERS: &[&[&str]] = &[
    &["telemetry"],
    &["pipeline", "outbox"],
    &["grpc", "config"],
    &["server"],
    &["cli"],
];

/// The workspace crates, lowest first.
const CRATES: &[(&str, &str)] = &[
    ("wal", "wal"),
    ("store", "store"),
    ("recovery", "recovery"),
    ("logd", "."),
];

/// Longest production source file, in lines.
const FILE_LINES_MAX: usize = 900;

/// Files allowed over [`FILE_LINES_MAX`] (none).
const FILE_LINES_EXCEPTIONS: &[&str] = &[];

fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rs_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Code without comments (line comments and doc comments), so prose that
/// names a module is not taken for a reference.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// First path segments after `prefix::` in `code`, including every name of a
/// `prefix::{a, b::c}` group.
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let needle = format!("{prefix}::");
    let mut rest = code;
    while let Some(i) = rest.find(&needle) {
        let before = rest[..i].chars().last();
        rest = &rest[i + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // e.g. `foo_crate::` or `x::crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// (from, to) → the files of `from` that reference `to`.
type Edges = BTreeMap<(String, String), BTreeSet<String>>;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn src_modules_use_only_lower_layers_so_there_is_no_cycle() {
    let src = Path::new(ROOT).join("src");
    let (modules, edges) = sibling_edges(&src, "");
    let mut problems = Vec::new();
    for m in &modules {
        if layer_of(m).is_none() {
            problems.push(format!("module `{m}` is in no layer of tests/layers.rs: place it"));
        }
    }
    for ((from, to), files) in &edges {
        if let (Some(a), Some(b)) = (layer_of(from), layer_of(to))
            && a <= b
        {
            problems.push(format!(
                "`{from}` (layer {a}) uses `{to}` (layer {b}) in {}",
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "module layering broken (each module may use only lower layers: {LAYERS:?}):\n  {}",
        problems.join("\n  ")
    );
    // The check must see the edges it exists for.
    assert!(edges.contains_key(&("server".into(), "pipeline".into())), "{edges:?}");
    assert!(edges.contains_key(&("grpc".into(), "telemetry".into())), "{edges:?}");
}

#[test]
fn the_stats_module_is_a_leaf() {
    let stats = Path::new(ROOT).join("src/telemetry/stats.rs");
    let code = code_of(&std::fs::read_to_string(&stats).unwrap());
    let used: Vec<String> = referenced(&code, "crate")
        .into_iter()
        .chain(referenced(&code, "super"))
        .collect();
    assert!(
        used.is_empty(),
        "src/telemetry/stats.rs must use nothing of logd; it uses {used:?}"
    );
}

/// Workspace crates a crate's `Cargo.toml` depends on (any dependency
/// section), by `path = "..."`.
fn workspace_deps(dir: &str) -> BTreeSet<String> {
    let manifest = Path::new(ROOT).join(dir).join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut out = BTreeSet::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line.contains("dependencies");
            continue;
        }
        if !in_deps || !line.contains("path") {
            continue;
        }
        let name = line.split(['=', ' ']).next().unwrap_or_default().trim();
        if CRATES.iter().any(|(n, _)| *n == name) {
            out.insert(name.to_owned());
        }
    }
    out
}

#[test]
fn workspace_crates_depend_only_on_lower_crates() {
    let mut problems = Vec::new();
    for (i, (name, dir)) in CRATES.iter().enumerate() {
        for dep in workspace_deps(dir) {
            let j = CRATES.iter().position(|(n, _)| *n == dep).unwrap();
            if j >= i && dep != *name {
                problems.push(format!("crate `{name}` depends on `{dep}`, which is not below it"));
            }
        }
    }
    let members = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    for (name, dir) in CRATES {
        if !members.contains(&format!("\"{dir}\"")) {
            problems.push(format!("crate `{name}` ({dir}) is not a workspace member"));
        }
    }
    assert!(
        problems.is_empty(),
        "crate layering broken (order: {:?}):\n  {}",
        CRATES.iter().map(|c| c.0).collect::<Vec<_>>(),
        problems.join("\n  ")
    );
}

#[test]
fn no_production_source_file_is_over_900_lines() {
    let root = Path::new(ROOT);
    let mut too_long = Vec::new();
    for dir in ["src", "store/src", "recovery/src", "wal/src"] {
        for file in rs_files(&root.join(dir)) {
            let rel = file.strip_prefix(root).unwrap().display().to_string();
            // The WAL's simulated filesystem: test code behind a feature.
            if rel == "wal/src/sim.rs" || FILE_LINES_EXCEPTIONS.contains(&rel.as_str()) {
                continue;
            }
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            if lines > FILE_LINES_MAX {
                too_long.push(format!("{rel}: {lines} lines"));
            }
        }
    }
    assert!(
        too_long.is_empty(),
        "production files over {FILE_LINES_MAX} lines (split them):\n  {}",
        too_long.join("\n  ")
    );
}

/// The sibling modules of one folder (a crate's `src/`, or a folder of
/// logd's `src/`) and their references to each other: `crate::<prefix>X`,
/// and `super::X` from a sibling file. A parent's `mod.rs`/`lib.rs` is not a
/// sibling (it declares and re-exports its children); a subfolder is one
/// module.
fn sibling_edges(dir: &Path, crate_prefix: &str) -> (BTreeSet<String>, Edges) {
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            modules.insert(name);
        } else if let Some(stem) = name.strip_suffix(".rs")
            && !["mod", "lib", "main"].contains(&stem)
        {
            modules.insert(stem.to_owned());
        }
    }
    let mut edges = Edges::new();
    for file in rs_files(dir) {
        let rel = file.strip_prefix(dir).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
        let from = first.strip_suffix(".rs").unwrap_or(first).to_owned();
        if !modules.contains(&from) {
            continue; // the folder's own mod.rs / lib.rs
        }
        let code = without_test_module(&code_of(&std::fs::read_to_string(&file).unwrap()));
        let mut targets = referenced(&code, &format!("crate{crate_prefix}"));
        // `super::` is this folder in a file directly in it, or in the
        // `mod.rs` of a subfolder.
        let depth = rel.components().count();
        if depth == 1 || (depth == 2 && rel.file_name().is_some_and(|n| n == "mod.rs")) {
            targets.extend(referenced(&code, "super"));
        }
        for to in targets {
            if to != from && modules.contains(&to) {
                edges
                    .entry((from.clone(), to))
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    (modules, edges)
}

/// `code` up to its `#[cfg(test)] mod …` (unit tests may use any sibling,
/// e.g. a simulator; they are not part of the layering).
fn without_test_module(code: &str) -> String {
    let lines: Vec<&str> = code.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].trim() == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|l| l.trim_start().starts_with("mod "))
        })
        .unwrap_or(lines.len());
    lines[..end].join("\n")
}

/// A cycle in `edges`, if there is one, as the modules along it.
fn find_cycle(modules: &BTreeSet<String>, edges: &Edges) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &Edges,
        state: &mut BTreeMap<String, bool>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_owned(), false); // on the path
        path.push(m.to_owned());
        for ((from, to), _) in edges.range((m.to_owned(), String::new())..) {
            if from != m {
                break;
            }
            match state.get(to) {
                Some(false) => {
                    let start = path.iter().position(|p| p == to).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(to.clone());
                    return Some(cycle);
                }
                Some(true) => {}
                None => {
                    if let Some(c) = visit(to, edges, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(m.to_owned(), true); // done
        None
    }
    let mut state = BTreeMap::new();
    for m in modules {
        if !state.contains_key(m)
            && let Some(c) = visit(m, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_modules_inside_each_crate_and_folder_have_no_cycle() {
    let root = Path::new(ROOT);
    let mut folders: Vec<(PathBuf, String)> = ["wal/src", "store/src", "recovery/src"]
        .iter()
        .map(|d| (root.join(d), String::new()))
        .collect();
    for entry in std::fs::read_dir(root.join("src")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            folders.push((path, format!("::{name}")));
        }
    }
    let mut cycles = Vec::new();
    let mut edges_seen = 0;
    for (dir, prefix) in &folders {
        let (modules, edges) = sibling_edges(dir, prefix);
        edges_seen += edges.len();
        if let Some(cycle) = find_cycle(&modules, &edges) {
            let files: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("{} -> {} in {:?}", w[0], w[1], edges[&(w[0].clone(), w[1].clone())]))
                .collect();
            cycles.push(format!("{}: {}", dir.display(), files.join("; ")));
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n  {}", cycles.join("\n  "));
    // The check must see the edges it exists for (e.g. store's rotate.rs
    // uses its meta.rs, pipeline's writer uses its sequencer).
    assert!(edges_seen > 20, "only {edges_seen} edges found: the scan is broken");
}
