//! Keeps ARCHITECTURE.md's code map true: every workspace crate is listed at its path, and no
//! crate depends on what its "never depends on" column forbids (neither in Cargo.toml nor in a
//! `use` in its sources).

use std::collections::BTreeSet;
use std::path::Path;

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

fn rust_sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
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

#[test]
fn no_crate_depends_on_what_the_code_map_forbids() {
    for row in code_map() {
        let dir = workspace_root().join(&row.path);
        let (_, deps) = toml_edit_free::dependencies(&dir.join("Cargo.toml"));
        let mut sources = Vec::new();
        rust_sources(&dir, &mut sources);
        for forbidden in &row.forbidden {
            assert!(!deps.contains(forbidden), "{} depends on {forbidden}, which ARCHITECTURE.md forbids", row.name);
            let ident = forbidden.replace('-', "_");
            for src in &sources {
                let text = std::fs::read_to_string(src).unwrap();
                let uses = text.lines().any(|l| {
                    let l = l.trim_start();
                    !l.starts_with("//") && (l.contains(&format!("{ident}::")) || l.contains(&format!("use {ident}")))
                });
                assert!(!uses, "{} uses {forbidden} ({}), which ARCHITECTURE.md forbids", row.name, src.display());
            }
        }
    }
}
