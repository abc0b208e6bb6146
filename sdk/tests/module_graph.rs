//! The SDK's modules form layers: no module reaches, directly or through others, a module that
//! reaches it back. The C ABI (`ffi/src`) and the CLI (`cli/src`) are checked the same way, from
//! here, with their crate roots (`lib.rs`, `main.rs`) treated alike. Checked on the sources themselves (std only): every `crate::…`, `super::…`,
//! `self::…` path and every path through a child module becomes an edge from the file that
//! names it to the module file it names; the test fails on a cycle among files, and on a cycle
//! among the top-level modules (package, runtime, model, pipeline, enhancer …).
//!
//! Unit-test modules (`#[cfg(test)]`, at the end of a file) are left out.
//!
//! Paths through the crate root's re-exports (`crate::Pipeline`) are refused in code: they
//! hide the real dependency, so the layering would go unchecked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`pipeline::plan`) -> the paths it depends on, from the sources under `src`.
fn module_graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    let module_of = |file: &Path| -> String {
        let rel = file.strip_prefix(src).unwrap().with_extension("");
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        match parts.last().map(String::as_str) {
            // The crate root: lib.rs of a library, main.rs of a binary.
            Some("lib" | "main") if parts.len() == 1 => String::new(),
            Some("mod") => parts[..parts.len() - 1].join("::"),
            _ => parts.join("::"),
        }
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        if module.is_empty() {
            continue; // the crate root declares and re-exports; it is nobody's dependency
        }
        let code = strip_comments_and_strings(&std::fs::read_to_string(file).unwrap());
        // Unit tests sit in a `#[cfg(test)] mod tests` at the end of a file, where `super` means
        // the file's own module; they are not part of the layering.
        let code = code.split("#[cfg(test)]").next().unwrap();
        let children: BTreeSet<String> = modules
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{module}::")).filter(|rest| !rest.contains("::")))
            .map(str::to_string)
            .collect();
        let mut deps = BTreeSet::new();
        for path in paths_in(code) {
            let segments: Vec<&str> = path.split("::").collect();
            let absolute: Vec<String> = match segments[0] {
                "crate" => segments[1..].iter().map(|s| s.to_string()).collect(),
                "super" | "self" => {
                    let mut base: Vec<String> = module.split("::").map(str::to_string).collect();
                    let mut rest = &segments[..];
                    while let Some(first) = rest.first() {
                        match *first {
                            "super" => {
                                base.pop();
                            }
                            "self" => {}
                            _ => break,
                        }
                        rest = &rest[1..];
                    }
                    base.extend(rest.iter().map(|s| s.to_string()));
                    base
                }
                child if children.contains(child) => {
                    module.split("::").chain(segments.iter().copied()).map(str::to_string).collect()
                }
                _ => continue, // another crate, a local item or a variable
            };
            // The longest prefix that is a module of this crate.
            let target = (1..=absolute.len())
                .rev()
                .map(|n| absolute[..n].join("::"))
                .find(|candidate| modules.contains(candidate));
            match target {
                Some(target) if target != module => {
                    deps.insert(target);
                }
                Some(_) => {}
                None if segments[0] == "crate" => {
                    return Err(format!(
                        "{}: `{path}` goes through the crate root's re-exports; name the defining module",
                        file.display()
                    ))
                }
                None => {}
            }
        }
        graph.insert(module, deps);
    }
    Ok(graph)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Code with comments (doc comments included) and string literals blanked out.
fn strip_comments_and_strings(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            while i + 1 < chars.len() && !(chars[i] == '*' && chars[i + 1] == '/') {
                i += 1;
            }
            i += 2;
        } else if rest.starts_with(&['r', '#']) || rest.starts_with(&['r', '"']) {
            let hashes = rest[1..].iter().take_while(|c| **c == '#').count();
            if rest.get(1 + hashes) != Some(&'"') {
                out.push(chars[i]);
                i += 1;
                continue;
            }
            i += 2 + hashes;
            let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            while i < chars.len() && !chars[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.push_str("\"\"");
        } else if chars[i] == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Every `a::b::c` path in the code (with `use a::{b, c::d}` groups expanded one level, which
/// is all that matters: the first segments decide the module).
fn paths_in(code: &str) -> Vec<String> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let chars: Vec<char> = code.chars().collect();
    let mut paths = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !ident(chars[i]) || (i > 0 && (ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (ident(chars[i]) || (chars[i] == ':' && chars.get(i + 1) == Some(&':'))) {
            i += if chars[i] == ':' { 2 } else { 1 };
        }
        let path: String = chars[start..i].iter().collect();
        let path = path.trim_end_matches("::").to_string();
        if chars.get(i) == Some(&'{') && chars[i - 1] == ':' {
            // `prefix::{a, b::c}`: one path per member.
            let close = chars[i..].iter().position(|c| *c == '}').map_or(chars.len(), |p| i + p);
            let group: String = chars[i + 1..close].iter().collect();
            for member in group.split(',').map(str::trim).filter(|m| !m.is_empty() && !m.contains('{')) {
                let member = member.split(" as ").next().unwrap().trim();
                paths.push(if member == "self" { path.clone() } else { format!("{path}::{member}") });
            }
            i = close;
        } else if path.contains("::") {
            paths.push(path);
        }
    }
    paths
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str()) {
            if let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// The same graph between top-level modules (edges inside one top-level module dropped).
fn top_level(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap().to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, deps) in graph {
        let entry = out.entry(top(from)).or_default();
        entry.extend(deps.iter().map(|d| top(d)).filter(|d| *d != top(from)));
    }
    out
}

#[test]
fn sdk_modules_have_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src).unwrap();
    assert!(graph.len() > 20, "expected the SDK's module files, found {:?}", graph.keys());
    assert_eq!(find_cycle(&graph), None, "import cycle among the SDK's files");
    assert_eq!(find_cycle(&top_level(&graph)), None, "import cycle among the SDK's top-level modules");
    // The layers the crate documents: nothing below reaches up.
    let layers = top_level(&graph);
    for (module, forbidden) in [
        ("package", &["runtime", "model", "pipeline", "enhancer"][..]),
        ("runtime", &["model", "pipeline", "enhancer"][..]),
        ("model", &["pipeline", "enhancer"][..]),
        ("enhancer", &["pipeline", "model"][..]),
    ] {
        let deps = &layers[module];
        for f in forbidden {
            assert!(!deps.contains(*f), "{module} depends on {f}: {deps:?}");
        }
    }
}

/// The C ABI crate (`ffi/src`, root `lib.rs`) follows the same rule: its handles, parameter
/// structs and entry points form layers too (ffi/README.md, "Handles").
#[test]
fn ffi_modules_have_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ffi/src");
    let graph = module_graph(&src).unwrap();
    assert!(
        graph.contains_key("pipeline") && graph.contains_key("error"),
        "expected the ffi modules, found {:?}",
        graph.keys()
    );
    assert_eq!(find_cycle(&graph), None, "import cycle among ffi/src's files");
    // The pipeline handle knows nothing of the handles loaded against it, nor of generation;
    // those handles know nothing of the per-call parameters that name them.
    for (module, forbidden) in [
        ("pipeline", &["prompt", "enhancer", "image", "generate_params", "generate"][..]),
        ("prompt", &["enhancer", "generate_params", "generate"][..]),
        ("enhancer", &["prompt", "generate_params", "generate"][..]),
        ("load_params", &["pipeline", "enhancer", "generate_params"][..]),
    ] {
        let deps = &graph[module];
        for f in forbidden {
            assert!(!deps.contains(*f), "ffi: {module} depends on {f}: {deps:?}");
        }
    }
}

/// The CLI (`cli/src`, root `main.rs`): the subcommands share what they need through modules,
/// not through items of `main.rs`.
#[test]
fn cli_modules_have_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/src");
    let graph = module_graph(&src).unwrap();
    assert!(
        graph.contains_key("generate") && graph.contains_key("bench"),
        "expected the CLI's modules, found {:?}",
        graph.keys()
    );
    assert_eq!(find_cycle(&graph), None, "import cycle among cli/src's files");
}

/// The checker itself finds cycles, child-module paths, `super` paths and root re-exports.
#[test]
fn the_checker_finds_what_it_should() {
    let dir = std::env::temp_dir().join(format!("zimage-module-graph-{}", std::process::id()));
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a; mod b; pub use a::X;");
    write("a/mod.rs", "mod inner; use inner::Y; // crate::b::Z in a comment\n pub struct X;");
    write("a/inner.rs", "pub struct Y; fn f() -> super::super::b::Z { let s = \"crate::b\"; todo!() }");
    write("b.rs", "pub struct Z; fn g(_: crate::a::X) {}\n#[cfg(test)]\nmod tests { use super::Z; }");
    let graph = module_graph(&dir).unwrap();
    assert_eq!(graph["a"], BTreeSet::from(["a::inner".to_string()]));
    assert_eq!(graph["a::inner"], BTreeSet::from(["b".to_string()]));
    assert_eq!(graph["b"], BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "a::inner".into(), "b".into(), "a".into()]));
    assert!(find_cycle(&top_level(&graph)).is_some());
    write("b.rs", "pub struct Z; fn g(_: crate::X) {}");
    assert!(module_graph(&dir).unwrap_err().contains("crate root"));
    write("b.rs", "pub struct Z;");
    assert_eq!(find_cycle(&module_graph(&dir).unwrap()), None);
    // A binary's root, main.rs, is the root like lib.rs: not a module, and its items are not
    // to be reached from below.
    std::fs::rename(dir.join("lib.rs"), dir.join("main.rs")).unwrap();
    assert_eq!(module_graph(&dir).unwrap().keys().collect::<Vec<_>>(), ["a", "a::inner", "b"]);
    write("b.rs", "pub struct Z; fn g() { crate::helper() }");
    assert!(module_graph(&dir).unwrap_err().contains("crate root"));
    std::fs::remove_dir_all(&dir).unwrap();
}
