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
        "spool", "instance", "process", "marker", "watch", "writers", "cooldown", "budget",
        "login", "git",
    ],
    &["llm", "agents"],
    &["context", "snapshot"],
    &["mirror"],
    &["router", "scheduler"],
    &["supervisor"],
    &["project"],
    &["cli", "serve", "tui", "mcp", "notify"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The source files of `src/`, as (path under `src/`, text without comment lines). Comments may point
/// anywhere (a doc link up the layers explains, it does not depend).
fn sources() -> Vec<(std::path::PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.expect("walk src");
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text: String = std::fs::read_to_string(path)
            .expect("read source")
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        out.push((
            path.strip_prefix(&src).expect("under src").to_path_buf(),
            text,
        ));
    }
    out
}

/// The names a path prefix reaches: `prefix::a` gives `a`, `prefix::{a, b::c}` gives `a` and `b`.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        // `xsuper::` or `foo_crate::` is not the prefix.
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &text[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(ident).filter(|n| !n.is_empty()));
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// `crate::x` references of every top-level module, from its file or folder.
fn references() -> BTreeMap<String, BTreeSet<String>> {
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources() {
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
        let used = refs.entry(module.clone()).or_default();
        used.extend(
            names_after(&text, "crate::")
                .into_iter()
                .filter(|n| *n != module),
        );
    }
    refs
}

/// Within each folder module (`src/m/`), which of its parts uses which sibling, through `super::x`
/// or `crate::m::x`. The folder's `mod.rs` is the parent, not a sibling: children may use the shared
/// model it holds, and it declares them.
fn sibling_references() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (rel, text) in sources() {
        let parts: Vec<String> = rel
            .components()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .collect();
        if parts.len() < 2 || parts[1] == "mod" {
            continue;
        }
        let (folder, me) = (&parts[0], &parts[1]);
        // A file one level down (`m/x/y.rs`) belongs to `x`; its `super::super::` is the folder.
        let up = if parts.len() == 2 {
            "super::"
        } else {
            "super::super::"
        };
        let mut used = names_after(&text, up);
        used.extend(names_after(&text, &format!("crate::{folder}::")));
        let siblings = out.entry(folder.clone()).or_default();
        let entry = siblings.entry(me.clone()).or_default();
        entry.extend(used.into_iter().filter(|n| n != me && n != "super"));
    }
    out
}

/// A cycle in `graph`, as `a → b → a`, if there is one.
fn cycle_in(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
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
        for u in graph.get(m).into_iter().flatten() {
            if graph.contains_key(u.as_str())
                && let Some(c) = visit(u, graph, stack, done)
            {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
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
    if let Some(cycle) = cycle_in(&references()) {
        panic!("import cycle: {cycle}");
    }
    for (folder, graph) in sibling_references() {
        if let Some(cycle) = cycle_in(&graph) {
            panic!("import cycle inside {folder}/: {cycle}");
        }
    }
}

#[test]
fn the_reference_reader_sees_groups_and_skips_lookalikes() {
    let text =
        "use crate::{config::Config, spool};\nlet x = my_crate::thing; crate::yaml::options()";
    assert_eq!(
        names_after(text, "crate::"),
        BTreeSet::from([
            "config".to_string(),
            "spool".to_string(),
            "yaml".to_string()
        ])
    );
}

/// The live surfaces (`serve`, `tui`) share what they need through `project` below them, never
/// through each other or the CLI; only `cli` dispatches to them.
#[test]
fn live_surfaces_use_no_other_surface() {
    let refs = references();
    let mut problems = Vec::new();
    for module in ["serve", "tui"] {
        for other in ["cli", "serve", "tui"] {
            if other != module && refs.get(module).is_some_and(|u| u.contains(other)) {
                problems.push(format!("{module} uses {other}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
