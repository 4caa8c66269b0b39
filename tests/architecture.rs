//! The layers of docs/ARCHITECTURE.md, kept: every `crate::` import in `src/` goes to a
//! module of the same layer or a lower one, never up, and no two modules import each other
//! in a circle (top-level modules, and the files of a folder among themselves).
//!
//! The layer table is read from docs/ARCHITECTURE.md itself, so the document and the
//! code cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `| layer | name | modules |` rows of the "Layers" table: module → layer.
fn layers() -> BTreeMap<String, usize> {
    let doc =
        std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md");
    let mut layers = BTreeMap::new();
    let table = doc
        .split("## Layers")
        .nth(1)
        .expect("a \"## Layers\" section in docs/ARCHITECTURE.md");
    for line in table.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(layer) = cells.get(1).and_then(|c| c.parse::<usize>().ok()) else {
            continue;
        };
        for module in cells[3].split(',') {
            let module = module.trim().trim_matches('`');
            if !module.is_empty() {
                layers.insert(module.to_owned(), layer);
            }
        }
    }
    layers
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/token/cache.rs` → `token::cache`; `src/config/mod.rs` → `config`.
fn module_of(file: &Path) -> String {
    let relative = file.strip_prefix(root().join("src")).expect("under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The modules a file imports: `crate::a::b` paths (as `a::b`, or `a` when `b` is not a
/// module of `a`) and `super::x` paths, outside comments.
fn imports(file: &Path, module: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).expect("read");
    let mut found = BTreeSet::new();
    let parent = module.rsplit_once("::").map(|(p, _)| p.to_owned());
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (prefix, base) in [("crate::", None), ("super::", parent.as_deref())] {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                let after = &rest[at + prefix.len()..];
                let path: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
                if let Some(first) = segments.first() {
                    let target = match base {
                        Some(base) => format!("{base}::{first}"),
                        None => match segments.get(1) {
                            Some(second) => format!("{first}::{second}"),
                            None => (*first).to_owned(),
                        },
                    };
                    found.insert(target);
                }
                rest = &after[path.len().max(1).min(after.len())..];
            }
        }
    }
    found
}

struct Graph {
    /// file module → the file modules and top-level modules it imports
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        // The crate root only declares and re-exports; tests sit beside what they test.
        if module == "main"
            || module == "lib"
            || module.ends_with("tests")
            || module.ends_with("interleavings")
        {
            continue;
        }
        let resolved: BTreeSet<String> = imports(file, &module)
            .into_iter()
            .map(|target| {
                // `a::b` where `b` is an item, not a module: the module is `a`.
                if modules.contains(&target) {
                    target
                } else {
                    target.split("::").next().unwrap_or(&target).to_owned()
                }
            })
            .filter(|target| target != &module && modules.contains(target))
            .collect();
        edges.insert(module, resolved);
    }
    Graph { edges }
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

#[test]
fn every_import_goes_to_the_same_layer_or_below() {
    let layers = layers();
    assert!(
        layers.values().max().is_some_and(|top| *top <= 7),
        "at most 7 layers: {layers:?}"
    );
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, targets) in &graph.edges {
        let Some(from) = layers.get(top(module)) else {
            wrong.push(format!("{module} is in no layer of docs/ARCHITECTURE.md"));
            continue;
        };
        for target in targets {
            let to = layers.get(top(target));
            if top(target) != top(module) && to.is_none_or(|to| to > from) {
                wrong.push(format!(
                    "{module} (layer {from}) imports {target} (layer {})",
                    to.map_or("none".into(), |l| l.to_string())
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

/// Finds a circle in `edges` (a path that comes back to its start).
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(found) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(found);
        }
    }
    None
}

#[test]
fn no_module_imports_another_in_a_circle() {
    let graph = graph();
    // Top-level modules.
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, targets) in &graph.edges {
        let entry = tops.entry(top(module).to_owned()).or_default();
        entry.extend(
            targets
                .iter()
                .map(|t| top(t).to_owned())
                .filter(|t| t != top(module)),
        );
    }
    assert_eq!(circle(&tops), None, "a circle between top-level modules");
    // The files of each folder among themselves.
    let mut files: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, targets) in &graph.edges {
        files.entry(module.clone()).or_default().extend(
            targets
                .iter()
                .filter(|t| t.contains("::") && top(t) == top(module))
                .cloned(),
        );
    }
    assert_eq!(
        circle(&files),
        None,
        "a circle between the files of a folder"
    );
}

#[test]
fn the_import_reader_sees_through_items_and_comments() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.rs");
    std::fs::write(
        &file,
        "use crate::token::{Token, TokenCache};\n// use crate::server;\nlet x = crate::metrics::Metrics::new();\nuse super::source::Grant;\n",
    )
    .unwrap();
    let found = imports(&file, "token::cache");
    let expected: BTreeSet<String> = ["token", "metrics::Metrics", "token::source"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(found, expected);
}
