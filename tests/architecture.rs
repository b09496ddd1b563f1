//! Keeps ARCHITECTURE.md's code map true: every workspace crate is listed at its path, and no
//! crate depends on what its "never depends on" column forbids, directly or through another
//! crate (the real dependency graph, from `cargo metadata`).

use std::collections::BTreeSet;

use kindling_e2e::workspace_root;

struct Row {
    name: String,
    path: String,
    forbidden: Vec<String>,
}

fn code_map() -> Vec<Row> {
    let text = std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md")).unwrap();
    let section = text.split("## Code map").nth(1).expect("ARCHITECTURE.md has a Code map section");
    section
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| crate") && !l.starts_with("| ---"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 4, "code map row must have 4 cells: {l}");
            Row {
                name: cells[0].to_string(),
                path: cells[1].to_string(),
                forbidden: cells[3].split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            }
        })
        .collect()
}

fn workspace_members() -> BTreeSet<String> {
    let manifest: toml_edit_free::Value = toml_edit_free::parse(&workspace_root().join("Cargo.toml"));
    manifest.members
}

/// A minimal reader for the two Cargo.toml facts this test needs, to avoid a TOML dependency.
mod toml_edit_free {
    use std::collections::BTreeSet;
    use std::path::Path;

    pub struct Value {
        pub members: BTreeSet<String>,
    }

    pub fn parse(path: &Path) -> Value {
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("members = [").expect("workspace members");
        let list = &text[start + "members = [".len()..];
        let list = &list[..list.find(']').unwrap()];
        let members =
            list.split(',').map(|s| s.trim().trim_matches('"').to_string()).filter(|s| !s.is_empty()).collect();
        Value { members }
    }

    /// Dependency names from every `[*dependencies]` table (dev and build included).
    pub fn dependencies(path: &Path) -> (String, BTreeSet<String>) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut name = String::new();
        let mut deps = BTreeSet::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.trim_matches(['[', ']']).to_string();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim().trim_matches('"');
            if section == "package" && key == "name" {
                name = value.trim().trim_matches('"').to_string();
            }
            if section.ends_with("dependencies") {
                deps.insert(key.split('.').next().unwrap().to_string());
            }
        }
        (name, deps)
    }
}

#[test]
fn every_workspace_crate_is_in_the_code_map_at_its_path() {
    let rows = code_map();
    let paths: BTreeSet<String> = rows.iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, workspace_members(), "ARCHITECTURE.md code map and workspace members differ");
    for row in &rows {
        let (name, _) = toml_edit_free::dependencies(&workspace_root().join(&row.path).join("Cargo.toml"));
        assert_eq!(name, row.name, "{} is named {name} in its Cargo.toml", row.path);
    }
}

/// Every package each workspace crate pulls in, transitively, through normal and build
/// dependencies (what actually gets compiled into it), from `cargo metadata`.
fn transitive_dependencies() -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--filter-platform", "x86_64-unknown-linux-gnu"])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: std::collections::BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let edges: std::collections::BTreeMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let real = n["deps"].as_array().unwrap().iter().filter(|d| {
                d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null() || k["kind"] == "build")
            });
            (n["id"].as_str().unwrap(), real.map(|d| d["pkg"].as_str().unwrap()).collect())
        })
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for member in meta["workspace_members"].as_array().unwrap() {
        let root = member.as_str().unwrap();
        let (mut seen, mut stack) = (BTreeSet::new(), vec![root]);
        while let Some(id) = stack.pop() {
            for &dep in edges.get(id).into_iter().flatten() {
                if seen.insert(name_of[dep].to_string()) {
                    stack.push(dep);
                }
            }
        }
        out.insert(name_of[root].to_string(), seen);
    }
    out
}

#[test]
fn no_crate_depends_on_what_the_code_map_forbids_even_transitively() {
    let deps = transitive_dependencies();
    for row in code_map() {
        let pulled = deps.get(&row.name).unwrap_or_else(|| panic!("{} is not a workspace member", row.name));
        for forbidden in &row.forbidden {
            assert!(
                !pulled.contains(forbidden),
                "{} depends on {forbidden} (directly or through another crate), which ARCHITECTURE.md forbids",
                row.name
            );
        }
    }
}
