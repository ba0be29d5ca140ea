//! The module layering of `docs/architecture.md`, checked on the source: a module may use modules of
//! its own layer or below, never above, and the modules form no cycle (comments are not looked at).
//! A new top-level module must be given a layer here before the suite passes again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom: leaves, records, mechanisms, agents, context, mirror, decisions, the loop,
/// surfaces.
const LAYERS: &[&[&str]] = &[
    &[
        "error",
        "fsutil",
        "failpoint",
        "console",
        "yaml",
        "redact",
        "layout",
    ],
    &["config", "task", "record"],
    &[
        "spool", "instance", "process", "marker", "watch", "cooldown",
    ],
    &["llm", "agents"],
    &["context", "snapshot"],
    &["mirror"],
    &["router", "scheduler"],
    &["supervisor"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `crate::x` references of every top-level module, from its file or folder.
fn references() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.expect("walk src");
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        // Comments may point anywhere (a doc link up the layers explains, it does not depend).
        let text: String = std::fs::read_to_string(path)
            .expect("read source")
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let used = refs.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                used.insert(name);
            }
        }
    }
    refs
}

#[test]
fn no_module_uses_one_above_it() {
    let refs = references();
    let mut problems = Vec::new();
    for (module, used) in &refs {
        let Some(mine) = layer_of(module) else {
            problems.push(format!("src/{module} is in no layer (add it to LAYERS)"));
            continue;
        };
        for u in used {
            match layer_of(u) {
                Some(theirs) if theirs > mine => {
                    problems.push(format!("{module} (layer {mine}) uses {u} (layer {theirs})"))
                }
                Some(_) => {}
                None => problems.push(format!("{module} uses {u}, which is in no layer")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn modules_form_no_cycle() {
    let refs = references();
    // Depth-first search for a back edge; the path to it is the cycle.
    fn visit<'a>(
        m: &'a str,
        refs: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(i) = stack.iter().position(|s| *s == m) {
            return Some(format!("{} → {m}", stack[i..].join(" → ")));
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m);
        for u in refs.get(m).into_iter().flatten() {
            if let Some(c) = visit(u, refs, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    for m in refs.keys() {
        if let Some(cycle) = visit(m, &refs, &mut Vec::new(), &mut done) {
            panic!("import cycle: {cycle}");
        }
    }
}
