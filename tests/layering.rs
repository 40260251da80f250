//! The shape of the code, checked: no module imports a module that imports
//! it back (directly or through others), at the level of files and at the
//! level of the top-level modules (`pg`, `spool`, `repository`, ...), and
//! nothing imports the command line (`cmd`).
//!
//! Imports are read from the source: every `crate::a::b` path outside
//! comments and `#[cfg(test)] mod tests`, and every `super::x`, resolved to
//! the longest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path ("pg::error") → source file text, for every file under src/.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().with_extension("");
                let mut name = rel.to_string_lossy().replace('/', "::");
                if let Some(m) = name.strip_suffix("::mod") {
                    name = m.to_string();
                }
                out.insert(name, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The code of a file without comments and its unit tests.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths like `a::b::c` starting at each occurrence of `prefix`, with the
/// items of a `{...}` group expanded (one level, which is all walsafe uses).
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        let base = rest[..end].trim_end_matches(':').to_string();
        out.push(base.clone());
        if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
            let group = &rest[end + 1..rest[end..].find('}').map_or(end, |j| end + j)];
            for item in group.split(',') {
                let item = item.trim().split(' ').next().unwrap_or("");
                if item.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    out.push(format!("{base}::{}", item.trim_end_matches("::{")));
                }
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|c| mods.contains_key(c))
    };
    let mut g = BTreeMap::new();
    for (m, text) in &mods {
        let code = code(text);
        let mut deps = BTreeSet::new();
        for p in paths_after(&code, "crate::") {
            deps.extend(resolve(&p));
        }
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
        for p in paths_after(&code, "super::") {
            let full = if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            };
            deps.extend(resolve(&full));
        }
        // A module naming its own ancestors or itself is not a dependency.
        deps.retain(|d| d != m && !m.starts_with(&format!("{d}::")));
        g.insert(m.clone(), deps);
    }
    g
}

/// The cycles of `g`, each as its modules (Tarjan's strongly connected
/// components of more than one node).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn top(m: &str) -> String {
    m.split("::").next().unwrap_or(m).to_string()
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let g = graph();
    assert!(g.contains_key("pg::error") && g.contains_key("spool::thread"));
    let files = cycles(&g);
    assert!(files.is_empty(), "import loops between files: {files:?}");
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in &g {
        let e = tops.entry(top(m)).or_default();
        e.extend(deps.iter().map(|d| top(d)).filter(|d| *d != top(m)));
    }
    let loops = cycles(&tops);
    assert!(
        loops.is_empty(),
        "import loops between top-level modules: {loops:?}"
    );
}

#[test]
fn nothing_imports_the_command_line() {
    for (m, deps) in graph() {
        if top(&m) == "cmd" || m == "main" || m == "lib" {
            continue;
        }
        assert!(
            !deps.iter().any(|d| top(d) == "cmd"),
            "{m} imports the command line: {deps:?}"
        );
    }
}

#[test]
fn the_checker_sees_a_loop() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    g.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycles(&g).len(), 1);
    assert_eq!(
        paths_after("use crate::pg::{lsn, Lsn, walfile::x};", "crate::"),
        vec!["pg", "pg::lsn", "pg::walfile::x"]
    );
}
